"""Settings: one YAML file under the data dir plus environment variables, with per-model
overrides. Everything that tunes an engine is resolved here, in one place.

Example settings.yaml:

    device: AUTO                 # default device for every model (AUTO: by service)
    max_waiting_requests: 64     # per model; beyond it requests get a "busy, retry" error
    models:
      smollm2-135m-instruct:
        device: CPU
        properties: {INFERENCE_PRECISION_HINT: f32}    # passed to OpenVINO's compile
        scheduler: {cache_size: 1, max_num_seqs: 32}   # openvino_genai.SchedulerConfig fields
        llm: {npu_max_prompt_len: 2048}                # the model kind's own options

The file is parsed into typed `Settings` once and kept: `current()` looks at the file's
modification time and size at most once a second and parses it again only when they
changed (`reload()`, wired to SIGHUP, does it at once). Unknown keys and wrong types are
refused with the key's path (`models.m.embed.poolin`) and the keys known there. A file
broken by an edit while running leaves the last good settings in force (the error is
logged once); a broken file with nothing good before it is refused, as every accessor's
SettingsError. Environment variables (OVMS_PLUGIN_*) are read by the accessors, on top.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import logging
import math
import os
import threading
import time
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ovms_plugin import paths
from ovms_plugin.osutil import available_memory_bytes, physical_memory_bytes

log = logging.getLogger(__name__)


class SettingsError(ValueError):
    """The settings file or an override is malformed."""


# --- declaring settings -------------------------------------------------------------------

def option(default: Any, doc: str, *, choices: tuple[Any, ...] = (),
           minimum: float | None = None, parse: Callable[[Any], Any] | None = None) -> Any:
    """A dataclass field that is a settings key: its default, a one-line doc, and what the
    value must be beyond its annotated type (one of `choices`, at least `minimum`). `parse`
    replaces the type check: it takes the raw value and returns the setting's, raising
    ValueError. Checks across fields go in the dataclass's __post_init__, raising
    ValueError("<field> must ..."). A mutable default: field(default_factory=...,
    metadata=about(doc))."""
    return field(default=default, metadata=about(doc, choices=choices, minimum=minimum,
                                                  parse=parse))


def about(doc: str, *, choices: tuple[Any, ...] = (), minimum: float | None = None,
          parse: Callable[[Any], Any] | None = None) -> dict[str, Any]:
    """The metadata of a settings key's field (see `option`)."""
    return {"doc": doc, "choices": choices, "minimum": minimum, "parse": parse}


def keys_of(cls: type) -> list[dataclasses.Field]:
    """The settings keys a dataclass declares (its fields made with `option`)."""
    return [f for f in dataclasses.fields(cls) if "doc" in f.metadata]


def _describe(hint: Any) -> str:
    if hint is bool:
        return "true or false"
    if hint is int:
        return "an integer"
    if hint is float:
        return "a number"
    if hint is str:
        return "a string"
    origin = typing.get_origin(hint)
    if origin is dict or hint is dict:
        return "a mapping"
    if origin is list:
        return f"a list of {_describe(typing.get_args(hint)[0]).split(' ', 1)[-1]}s"
    if origin in (typing.Union, types.UnionType):
        parts = [_describe(a) for a in typing.get_args(hint) if a is not type(None)]
        return " or ".join(parts)
    return str(hint)


class _Wrong(Exception):
    pass


def _coerce(value: Any, hint: Any) -> Any:
    """`value` as `hint` (bool, int, float, str, dicts, lists, unions, Any); numbers written
    as strings are taken, booleans are never numbers. Raises _Wrong."""
    if hint is Any:
        return value
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg)
            except _Wrong:
                continue
        raise _Wrong
    if value is None or (isinstance(value, bool) and hint is not bool):
        raise _Wrong
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
    elif hint is float:
        number: float | None = None
        if isinstance(value, int | float):
            number = float(value)
        elif isinstance(value, str):
            with contextlib.suppress(ValueError):
                number = float(value.strip())
        if number is not None and math.isfinite(number):
            return number
    elif hint is str:
        if isinstance(value, str):
            return value
    elif origin is dict or hint is dict:
        if isinstance(value, Mapping):
            return {str(k): v for k, v in value.items()}
    elif origin is list and isinstance(value, list):
        (item,) = typing.get_args(hint)
        return [_coerce(v, item) for v in value]
    raise _Wrong


def _unknown(where: str, key: str, known: list[str]) -> SettingsError:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    there = f"in {where}" if where else "at the top level"
    return SettingsError(f"unknown setting {_join(where, key)}{hint}; the settings known "
                         f"{there}: {', '.join(sorted(known)) or 'none'}")


def _join(where: str, key: Any) -> str:
    return f"{where}.{key}" if where else str(key)


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise SettingsError(f"{where} must be a mapping of settings, got {value!r}")
    return {str(k): v for k, v in value.items()}


def parse_keys(cls: type, data: Any, where: str, *, more: tuple[str, ...] = ()
               ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Checks a mapping against a dataclass of `option` fields: every key known (its own
    or one of `more`, which the caller parses), every value of its type and within its
    bounds. Returns (the values it sets, coerced; the `more` keys' raw values)."""
    data = _mapping(data, where or "the settings file")
    declared = {f.name: f for f in keys_of(cls)}
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    rest: dict[str, Any] = {}
    for key, raw in data.items():
        path = _join(where, key)
        if key in more:
            rest[key] = raw
            continue
        f = declared.get(key)
        if f is None:
            raise _unknown(where, key, [*declared, *more])
        if raw is None:  # `key:` with no value: the default
            continue
        meta = f.metadata
        if meta["parse"] is not None:
            try:
                value = meta["parse"](raw)
            except (ValueError, TypeError) as e:
                why = str(e)
                raise SettingsError(f"{path} {why}" if why.startswith("must ") else
                                    f"{path}: {why}") from None
        else:
            try:
                value = _coerce(raw, hints[key])
            except _Wrong:
                raise SettingsError(f"{path} must be {_describe(hints[key])}, got "
                                    f"{raw!r}") from None
        if value is not None and meta["choices"] and value not in meta["choices"]:
            raise SettingsError(f"{path} must be one of "
                                f"{', '.join(map(str, meta['choices']))}, got {raw!r}")
        if value is not None and meta["minimum"] is not None and value < meta["minimum"]:
            raise SettingsError(f"{path} must be {meta['minimum']:g} or more, got {raw!r}")
        values[key] = value
    try:
        cls(**values)  # the dataclass's own checks (__post_init__)
    except ValueError as e:
        raise SettingsError(_join(where, e)) from None
    return values, rest


def parse_bytes(value: Any) -> int:
    """8GB, 512MiB, 1.5G or a plain number of bytes."""
    if isinstance(value, bool):
        raise SettingsError(f"{value!r} is not a size; write it like 8GB or 512MB")
    if isinstance(value, int | float):
        return int(value)
    text = str(value).strip().upper().replace("IB", "B")
    for suffix, scale in (("TB", 2**40), ("GB", 2**30), ("MB", 2**20), ("KB", 2**10),
                          ("T", 2**40), ("G", 2**30), ("M", 2**20), ("K", 2**10), ("B", 1)):
        if text.endswith(suffix):
            try:
                return int(float(text[: -len(suffix)]) * scale)
            except ValueError:
                break
    try:
        return int(text)
    except ValueError:
        raise SettingsError(f"{value!r} is not a size; write it like 8GB or 512MB") from None


def _word(case: Callable[[str], str]) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if not isinstance(value, str):
            raise ValueError(f"must be a string, got {value!r}")
        return case(value.strip())
    return parse


# --- the schema -----------------------------------------------------------------------------

@dataclass(frozen=True)
class SchedulerOptions:
    """`scheduler:` (global or per model): openvino_genai.SchedulerConfig fields a user may
    set; the device's defaults (DEVICE_SCHEDULER_DEFAULTS) fill the rest."""

    cache_size: int | None = option(None, "KV cache size in whole GB", minimum=0)
    num_kv_blocks: int | None = option(None, "KV cache size in blocks (replaces cache_size)",
                                       minimum=1)
    max_num_batched_tokens: int | None = option(None, "prompt tokens per engine step",
                                                minimum=1)
    max_num_seqs: int | None = option(None, "sequences generated at once", minimum=1)
    dynamic_split_fuse: bool | None = option(None, "prefill long prompts in chunks")
    enable_prefix_caching: bool | None = option(None, "reuse the KV cache of shared prefixes")
    use_cache_eviction: bool | None = option(None, "evict KV cache blocks of long sequences")


SCHEDULER_FIELDS = {f.name for f in keys_of(SchedulerOptions)}

# Per-device defaults. On CPU the chunk of prompt tokens per step stays small so a long
# prompt is prefilled over several steps and running streams keep getting tokens.
DEVICE_SCHEDULER_DEFAULTS: dict[str, dict[str, Any]] = {
    "CPU": {"max_num_batched_tokens": 256, "max_num_seqs": 64,
            "dynamic_split_fuse": True, "enable_prefix_caching": True},
    "GPU": {"max_num_batched_tokens": 1024, "max_num_seqs": 128,
            "dynamic_split_fuse": True, "enable_prefix_caching": True},
}

DEFAULT_ENGINE_STALL_SECONDS = 60.0
DEFAULT_IMAGE_STALL_SECONDS = 180.0
DEFAULT_BODY_TIMEOUT = 30.0
PLUGIN_DRAIN_SECONDS = 1.0
PLUGIN_DRAIN_MAX = 1.2  # AOG SIGKILLs the plugin 2 s after Shutdown
SERVE_DRAIN_SECONDS = 5.0


def _seconds_option(default: float | None, doc: str) -> Any:
    return option(default, doc, minimum=0)


@dataclass(frozen=True)
class ModelSection:
    """A model's own section, `models.<name>`; what it sets wins over the globals. The
    kinds' option sections (`llm`, `embed`, ...) are in `options`, with the values set."""

    device: str | None = option(None, "device for this model: AUTO, CPU, GPU, GPU.1, NPU",
                                parse=_word(str.upper))
    properties: dict[str, Any] = field(default_factory=dict,
                                       metadata=about("OpenVINO compile properties"))
    scheduler: dict[str, Any] = field(default_factory=dict, metadata=about(
        "openvino_genai.SchedulerConfig fields"))
    engine: str | None = option(None, "auto, or stateful: LLMPipeline, one request at a time",
                                parse=_word(str.lower), choices=("auto", "stateful"))
    max_waiting_requests: int | None = option(None, "requests queued beyond the running ones",
                                              minimum=0)
    engine_stall_seconds: float | None = _seconds_option(
        None, "the engine watchdog's limit for this model (0: off)")
    options: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class Settings:
    """The whole settings file, typed. Defaults are what an absent key means."""

    device: str | None = option(None, "default device: AUTO, CPU, GPU, GPU.1, NPU",
                                parse=_word(str.upper))
    max_waiting_requests: int | None = option(None, "per model, beyond its running requests",
                                              minimum=0)
    properties: dict[str, Any] = field(default_factory=dict, metadata=about(
        "OpenVINO compile properties for every model"))
    scheduler: dict[str, Any] = field(default_factory=dict, metadata=about(
        "SchedulerConfig fields for every LLM"))
    memory_budget: int | None = option(None, "memory for models (default 75 % of RAM)",
                                       parse=parse_bytes)
    compile_cache: str = option("auto", "cache compiled blobs: auto (GPU, NPU), always, never",
                                parse=_word(str.lower), choices=("auto", "always", "never"))
    compile_cache_max: int = option(4 * 2**30, "the compiled-blob cache's size cap",
                                    parse=parse_bytes)
    max_request_size: int = option(64 * 2**20, "the largest AOG request body",
                                   parse=parse_bytes)
    idle_unload_seconds: float = _seconds_option(0.0, "plugin mode: unload models idle this "
                                                      "long (0: never)")
    engine_stall_seconds: float = _seconds_option(
        DEFAULT_ENGINE_STALL_SECONDS, "the engine watchdog's limit (0: off)")
    image_stall_seconds: float = _seconds_option(
        DEFAULT_IMAGE_STALL_SECONDS, "the watchdog's limit for image engines")
    shutdown_drain_seconds: float | None = _seconds_option(
        None, "time running requests get on shutdown (default 1 s plugin, 5 s serve)")
    body_timeout_seconds: float = _seconds_option(
        DEFAULT_BODY_TIMEOUT, "serve: time a request body may take to arrive (0: no limit)")
    cors_origins: list[str] | str | None = field(default=None, metadata=about(
        "serve: origins browsers may call from"))
    options: dict[str, dict[str, Any]] = field(default_factory=dict)  # kind sections
    models: dict[str, ModelSection] = field(default_factory=dict)

    def model(self, name: str) -> ModelSection:
        return self.models.get(name) or ModelSection()


def _kind_options() -> dict[str, type]:
    """Each kind's settings section -> the dataclass of its options."""
    # The registry alone (importing it registers the built-in kinds, which import settings).
    from ovms_plugin.kinds.registry import all as all_kinds
    out: dict[str, type] = {}
    for kind in all_kinds():
        if kind.options_section:
            out.setdefault(kind.options_section, kind.options_type or _NoOptions)
    return out


@dataclass(frozen=True)
class _NoOptions:
    """A kind section whose kind declares no options."""


def kind_options(section: str, values: Mapping[str, Any] | None = None) -> Any:
    """The typed options of a kind's section: its dataclass, defaults filled in."""
    return _kind_options()[section](**(values or {}))


def _parse_scheduler(value: Any, where: str) -> dict[str, Any]:
    return parse_keys(SchedulerOptions, value, where)[0]


def _parse_options(sections: Mapping[str, Any], kinds: dict[str, type], where: str
                   ) -> dict[str, dict[str, Any]]:
    return {name: parse_keys(kinds[name], sections.get(name), _join(where, name))[0]
            for name in kinds}


def parse(data: Any) -> Settings:
    """Settings from a file's data (the mapping at its top level); raises SettingsError
    naming the first key that is unknown or wrong."""
    if not isinstance(data, Mapping):
        raise SettingsError("the settings file must hold a mapping at the top level")
    kinds = _kind_options()
    values, rest = parse_keys(Settings, data, "", more=("models", *kinds))
    if "scheduler" in values:
        values["scheduler"] = _parse_scheduler(values["scheduler"], "scheduler")
    models: dict[str, ModelSection] = {}
    for name, section in _mapping(rest.get("models"), "models").items():
        where = f"models.{name}"
        own, sections = parse_keys(ModelSection, section, where, more=tuple(kinds))
        if "scheduler" in own:
            own["scheduler"] = _parse_scheduler(own["scheduler"], f"{where}.scheduler")
        models[name] = ModelSection(**own, options=_parse_options(sections, kinds, where))
    return Settings(**values, options=_parse_options(rest, kinds, ""), models=models)


# --- the file, read once ---------------------------------------------------------------------

CHECK_INTERVAL = 1.0  # seconds between looks at the file's modification time and size


def load_file(path: Path | None = None) -> dict[str, Any]:
    """The file's raw data (a mapping; {} when there is no file), not validated."""
    path = path or paths.settings_file()
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise SettingsError(f"settings file {path} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise SettingsError(f"settings file {path} must hold a mapping at the top level")
    return data


def _read(path: Path) -> Settings:
    return parse(load_file(path))


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


@dataclass
class _Cached:
    path: Path
    stamp: tuple[int, int] | bool | None  # False: never read
    checked: float  # time.monotonic() of the last look
    good: Settings | None  # the last good settings of this path
    error: SettingsError | None  # the file as it is now is broken


_lock = threading.Lock()
_cache: _Cached | None = None


def current() -> Settings:
    """The settings: the file parsed once, parsed again when its modification time or size
    changed (looked at most once per CHECK_INTERVAL). A broken file raises SettingsError
    unless good settings were read before, which then stay in force."""
    global _cache
    path = paths.settings_file()
    now = time.monotonic()
    with _lock:
        c = _cache
        if c is None or c.path != path:
            c = _cache = _Cached(path, False, now, None, None)
        elif now - c.checked >= CHECK_INTERVAL or c.stamp is False:
            c.checked = now
        else:
            return _answer(c)
        stamp = _stamp(path)
        if stamp == c.stamp:
            return _answer(c)
        first = c.stamp is False
        c.stamp = stamp
        try:
            settings = _read(path)
        except SettingsError as e:
            if c.good is not None:  # changed to something broken: keep what worked
                log.error("the settings file %s changed but is not valid, so the last good "
                          "settings stay in force: %s", path, e)
            c.error = e
            return _answer(c)
        if not first:
            log.info("settings reloaded from %s", path)
        c.good, c.error = settings, None
        return settings


def _answer(c: _Cached) -> Settings:
    if c.good is not None:
        return c.good
    assert c.error is not None or c.stamp is False
    raise c.error or SettingsError("no settings")


def reload() -> Settings | None:
    """Reads the file again now (SIGHUP); returns the settings in force, or None (logged)
    when the file is broken and nothing good was read before."""
    with _lock:
        if _cache is not None:
            _cache.stamp = False if _cache.good is None else (-1, -1)
            _cache.checked = -math.inf
    try:
        return current()
    except SettingsError as e:
        log.error("%s", e)
        return None


def reload_on_sighup(loop: Any) -> bool:
    """Wires SIGHUP to reload() on an asyncio loop, where the platform has it (not on
    Windows) and the loop is the main thread's; returns whether it did."""
    from ovms_plugin.osutil import on_reload_signal
    return on_reload_signal(loop, reload)


def _settings(data: dict | None) -> Settings:
    return current() if data is None else parse(data)


# --- what the rest of the plugin asks --------------------------------------------------------

@dataclass
class ModelSettings:
    device: str = "AUTO"  # AUTO: the service's device preference (see devices.py)
    properties: dict[str, Any] = field(default_factory=dict)
    scheduler: dict[str, Any] = field(default_factory=dict)  # the user's overrides only
    engine: str = "auto"  # "stateful": LLMPipeline one request at a time (the NPU path)
    max_waiting_requests: int = 64
    # Engine-kind options from the model's section, validated against the kind's options
    # dataclass (kinds/*.py, e.g. EmbedOptions): only the keys set, so the engines'
    # defaults and the model's own config (sentence-transformers pooling) fill the rest.
    options: dict[str, Any] = field(default_factory=dict)


def compile_cache(data: dict | None = None) -> tuple[str, int]:
    """(mode, size cap in bytes) of the compiled-blob cache: `compile_cache` auto (GPU and
    NPU), always or never; `compile_cache_max` (default 4GB)."""
    s = _settings(data)
    mode = str(os.environ.get("OVMS_PLUGIN_COMPILE_CACHE") or s.compile_cache).lower()
    if mode not in ("auto", "always", "never"):
        raise SettingsError(f"compile_cache must be auto, always or never, got {mode!r}")
    return mode, s.compile_cache_max


def max_request_bytes(data: dict | None = None) -> int:
    """The largest request body the AOG plugin accepts (`max_request_size`, env
    OVMS_PLUGIN_MAX_REQUEST_SIZE; default 64MB). gRPC's own 4 MiB limit is lifted to what
    AOG may send; bodies over this one get a clear invalid-request answer instead."""
    env = os.environ.get("OVMS_PLUGIN_MAX_REQUEST_SIZE")
    return parse_bytes(env) if env else _settings(data).max_request_size


def idle_unload_seconds(data: dict | None = None) -> float:
    """Plugin mode unloads models idle this long (0: never; AOG unloads after 5 idle
    minutes itself)."""
    env = os.environ.get("OVMS_PLUGIN_IDLE_UNLOAD")
    if env:
        try:
            return float(env)
        except ValueError:
            raise SettingsError(f"idle_unload_seconds must be a number, got {env!r}") from None
    return _settings(data).idle_unload_seconds


def memory_budget_bytes(data: dict | None = None) -> int:
    """How much memory the plugin may use for models, conversions included: the
    `memory_budget` setting or OVMS_PLUGIN_MEMORY_BUDGET; by default 75 % of physical
    memory, leaving the rest to the desktop."""
    env = os.environ.get("OVMS_PLUGIN_MEMORY_BUDGET")
    if env:
        return parse_bytes(env)
    value = _settings(data).memory_budget
    return int(physical_memory_bytes() * 0.75) if value is None else value


def default_kv_cache_gb(model_bytes: int, budget_left: int | None = None) -> int:
    """A bounded KV cache (SchedulerConfig.cache_size takes whole GB): a quarter of what is
    free (and left in the memory budget, after the other loaded models) once the weights are
    in, between 1 and 8 GB. An unbounded dynamic cache grows until the OS kills the
    process."""
    free = available_memory_bytes()
    if budget_left is not None:
        free = min(free, budget_left)
    free = max(0, free - 2 * model_bytes)
    return int(min(8, max(1, free // 4 // 2**30)))


def model_settings(name: str, *, data: dict | None = None) -> ModelSettings:
    """The settings for one model: defaults < file's globals < environment < file's
    per-model section."""
    s = _settings(data)
    own = s.model(name)
    device = own.device or os.environ.get("OVMS_PLUGIN_DEVICE") or s.device or "AUTO"
    waiting: Any = own.max_waiting_requests
    if waiting is None:
        waiting = os.environ.get("OVMS_PLUGIN_MAX_WAITING") or s.max_waiting_requests
    try:
        waiting = 64 if waiting is None else int(waiting)
    except (TypeError, ValueError) as e:
        raise SettingsError(f"max_waiting_requests must be an integer, got {waiting!r}") from e
    options = {kind: {**s.options.get(kind, {}), **own.options.get(kind, {})}
               for kind in s.options}
    return ModelSettings(device=device.upper(), properties={**s.properties, **own.properties},
                         scheduler={**s.scheduler, **own.scheduler},
                         engine=own.engine or "auto", max_waiting_requests=waiting,
                         options=options)


def scheduler_config(device: str, ms: ModelSettings, model_bytes: int,
                     budget_left: int | None = None) -> dict[str, Any]:
    """The continuous-batching scheduler for a model on a device: the device's defaults, a
    KV cache bounded by free memory and the budget left, then the user's overrides."""
    scheduler = dict(DEVICE_SCHEDULER_DEFAULTS.get(device.split(".")[0],
                                                   DEVICE_SCHEDULER_DEFAULTS["CPU"]))
    scheduler["cache_size"] = default_kv_cache_gb(model_bytes, budget_left)
    scheduler.update(ms.scheduler)
    if "num_kv_blocks" in ms.scheduler:
        scheduler.pop("cache_size", None)
    return scheduler


def _seconds(name: str, value: Any) -> float:
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise SettingsError(f"{name} must be a number of seconds, got {value!r}") from None
    if seconds < 0 or seconds != seconds:
        raise SettingsError(f"{name} must be 0 or more seconds, got {value!r}")
    return seconds


def engine_stall_seconds(kind: str, model: str = "", data: dict | None = None) -> float:
    """How long an engine worker with requests in flight may go without any sign of
    progress (an output, a heartbeat, CPU time spent) before the watchdog reports it,
    fails its requests, kills it and starts it again; 0 turns the watchdog off.
    `engine_stall_seconds` (default 60) for LLM, embedding and rerank engines,
    `image_stall_seconds` (default 180; images report progress per denoising step) for
    image engines, a model's own `engine_stall_seconds`, and env
    OVMS_PLUGIN_ENGINE_STALL_SECONDS over all of them. A worker still loading gets five
    times the limit."""
    env = os.environ.get("OVMS_PLUGIN_ENGINE_STALL_SECONDS")
    if env:
        return _seconds("OVMS_PLUGIN_ENGINE_STALL_SECONDS", env)
    s = _settings(data)
    own = s.model(model).engine_stall_seconds if model else None
    if own is not None:
        return own
    return s.image_stall_seconds if kind == "image" else s.engine_stall_seconds


def shutdown_drain_seconds(plugin: bool, data: dict | None = None) -> float:
    """How long running requests get to finish on shutdown (SIGTERM, or Shutdown from AOG)
    before each is ended with an error: `shutdown_drain_seconds` or env
    OVMS_PLUGIN_DRAIN_SECONDS; default 1 s for the plugin (at most 1.2 s: AOG kills it
    2 s after Shutdown) and 5 s for `serve` (whose --drain flag overrides both)."""
    env = os.environ.get("OVMS_PLUGIN_DRAIN_SECONDS")
    seconds = _seconds("OVMS_PLUGIN_DRAIN_SECONDS", env) if env else \
        _settings(data).shutdown_drain_seconds
    if seconds is None:
        return PLUGIN_DRAIN_SECONDS if plugin else SERVE_DRAIN_SECONDS
    return min(seconds, PLUGIN_DRAIN_MAX) if plugin else seconds


def body_timeout_seconds(data: dict | None = None) -> float:
    """`serve`: how long a request body may take to arrive in full before the request is
    answered 408 and its connection closed (`body_timeout_seconds`, env
    OVMS_PLUGIN_BODY_TIMEOUT, flag --body-timeout; default 30 s, 0: no limit)."""
    env = os.environ.get("OVMS_PLUGIN_BODY_TIMEOUT")
    return _seconds("OVMS_PLUGIN_BODY_TIMEOUT", env) if env else \
        _settings(data).body_timeout_seconds
