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
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ovms_plugin import paths

log = logging.getLogger(__name__)

# SchedulerConfig fields a user may set; anything else in `scheduler:` is refused on load.
SCHEDULER_FIELDS = {
    "cache_size", "num_kv_blocks", "max_num_batched_tokens", "max_num_seqs",
    "dynamic_split_fuse", "enable_prefix_caching", "use_cache_eviction",
}

# Per-device defaults. On CPU the chunk of prompt tokens per step stays small so a long
# prompt is prefilled over several steps and running streams keep getting tokens.
DEVICE_SCHEDULER_DEFAULTS: dict[str, dict[str, Any]] = {
    "CPU": {"max_num_batched_tokens": 256, "max_num_seqs": 64,
            "dynamic_split_fuse": True, "enable_prefix_caching": True},
    "GPU": {"max_num_batched_tokens": 1024, "max_num_seqs": 128,
            "dynamic_split_fuse": True, "enable_prefix_caching": True},
}


class SettingsError(ValueError):
    """The settings file or an override is malformed."""


@dataclass
class ModelSettings:
    device: str = "AUTO"  # AUTO: the service's device preference (see devices.py)
    properties: dict[str, Any] = field(default_factory=dict)
    scheduler: dict[str, Any] = field(default_factory=dict)  # the user's overrides only
    engine: str = "auto"  # "stateful": LLMPipeline one request at a time (the NPU path)
    max_waiting_requests: int = 64
    # Engine-kind options from the model's section: llm (npu_max_prompt_len,
    # npu_min_response_len, max_prompt_len), embed (pooling, normalize, max_length,
    # truncate, query_instruction, max_batch_size, max_wait_ms, parallel_batches,
    # static_shapes), rerank, image.
    options: dict[str, Any] = field(default_factory=dict)


def available_memory_bytes() -> int:
    """Memory the OS could give us now (MemAvailable), without psutil."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def parse_bytes(value: Any) -> int:
    """8GB, 512MiB, 1.5G or a plain number of bytes."""
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


def compile_cache(data: dict | None = None) -> tuple[str, int]:
    """(mode, size cap in bytes) of the compiled-blob cache: `compile_cache` auto (GPU and
    NPU), always or never; `compile_cache_max` (default 4GB)."""
    data = load_file() if data is None else data
    mode = str(os.environ.get("OVMS_PLUGIN_COMPILE_CACHE") or data.get("compile_cache")
               or "auto").lower()
    if mode not in ("auto", "always", "never"):
        raise SettingsError(f"compile_cache must be auto, always or never, got {mode!r}")
    return mode, parse_bytes(data.get("compile_cache_max", "4GB"))


def max_request_bytes(data: dict | None = None) -> int:
    """The largest request body the AOG plugin accepts (`max_request_size`, env
    OVMS_PLUGIN_MAX_REQUEST_SIZE; default 64MB). gRPC's own 4 MiB limit is lifted to what
    AOG may send; bodies over this one get a clear invalid-request answer instead."""
    data = load_file() if data is None else data
    return parse_bytes(os.environ.get("OVMS_PLUGIN_MAX_REQUEST_SIZE")
                       or data.get("max_request_size", "64MB"))


def idle_unload_seconds(data: dict | None = None) -> float:
    """Plugin mode unloads models idle this long (0: never; AOG unloads after 5 idle
    minutes itself)."""
    data = load_file() if data is None else data
    value = os.environ.get("OVMS_PLUGIN_IDLE_UNLOAD") or data.get("idle_unload_seconds", 0)
    try:
        return float(value)
    except (TypeError, ValueError):
        raise SettingsError(f"idle_unload_seconds must be a number, got {value!r}") from None


def physical_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def memory_budget_bytes(data: dict | None = None) -> int:
    """How much memory the plugin may use for models, conversions included: the
    `memory_budget` setting or OVMS_PLUGIN_MEMORY_BUDGET; by default 75 % of physical
    memory, leaving the rest to the desktop."""
    data = load_file() if data is None else data
    value = os.environ.get("OVMS_PLUGIN_MEMORY_BUDGET") or data.get("memory_budget")
    if value is None:
        return int(physical_memory_bytes() * 0.75)
    return parse_bytes(value)


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


def load_file(path: Path | None = None) -> dict[str, Any]:
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


def model_settings(name: str, *, data: dict | None = None) -> ModelSettings:
    """The settings for one model: defaults < file's globals < environment < file's
    per-model section."""
    data = load_file() if data is None else data
    per_model = (data.get("models") or {}).get(name) or {}
    device = str(per_model.get("device") or os.environ.get("OVMS_PLUGIN_DEVICE")
                 or data.get("device") or "AUTO").upper()
    scheduler: dict[str, Any] = {}
    for source in (data.get("scheduler") or {}, per_model.get("scheduler") or {}):
        unknown = set(source) - SCHEDULER_FIELDS
        if unknown:
            raise SettingsError(f"unknown scheduler setting(s) {sorted(unknown)} for model "
                                f"{name!r}; known: {sorted(SCHEDULER_FIELDS)}")
        scheduler.update(source)
    engine = str(per_model.get("engine") or "auto").lower()
    if engine not in ("auto", "stateful"):
        raise SettingsError(f"engine must be 'auto' or 'stateful' for model {name!r}, got "
                            f"{engine!r}")
    waiting = per_model.get("max_waiting_requests", os.environ.get(
        "OVMS_PLUGIN_MAX_WAITING", data.get("max_waiting_requests", 64)))
    try:
        waiting = int(waiting)
    except (TypeError, ValueError) as e:
        raise SettingsError(f"max_waiting_requests must be an integer, got {waiting!r}") from e
    properties = {**(data.get("properties") or {}), **(per_model.get("properties") or {})}
    # The registry alone (importing it registers the built-in kinds, which import settings).
    from ovms_plugin.kinds.registry import all as all_kinds
    sections = dict.fromkeys(k.options_section for k in all_kinds() if k.options_section)
    options = {kind: {**(data.get(kind) or {}), **(per_model.get(kind) or {})}
               for kind in sections}
    return ModelSettings(device=device, properties=properties, scheduler=scheduler,
                         engine=engine, max_waiting_requests=waiting, options=options)


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


DEFAULT_ENGINE_STALL_SECONDS = 60.0
DEFAULT_IMAGE_STALL_SECONDS = 180.0


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
    data = load_file() if data is None else data
    per_model = ((data.get("models") or {}).get(model) or {}) if model else {}
    if per_model.get("engine_stall_seconds") is not None:
        return _seconds("engine_stall_seconds", per_model["engine_stall_seconds"])
    if kind == "image":
        return _seconds("image_stall_seconds",
                        data.get("image_stall_seconds", DEFAULT_IMAGE_STALL_SECONDS))
    return _seconds("engine_stall_seconds",
                    data.get("engine_stall_seconds", DEFAULT_ENGINE_STALL_SECONDS))


PLUGIN_DRAIN_SECONDS = 1.0
PLUGIN_DRAIN_MAX = 1.2  # AOG SIGKILLs the plugin 2 s after Shutdown
SERVE_DRAIN_SECONDS = 5.0


def shutdown_drain_seconds(plugin: bool, data: dict | None = None) -> float:
    """How long running requests get to finish on shutdown (SIGTERM, or Shutdown from AOG)
    before each is ended with an error: `shutdown_drain_seconds` or env
    OVMS_PLUGIN_DRAIN_SECONDS; default 1 s for the plugin (at most 1.2 s: AOG kills it
    2 s after Shutdown) and 5 s for `serve` (whose --drain flag overrides both)."""
    data = load_file() if data is None else data
    value = os.environ.get("OVMS_PLUGIN_DRAIN_SECONDS") or data.get("shutdown_drain_seconds")
    if value is None:
        return PLUGIN_DRAIN_SECONDS if plugin else SERVE_DRAIN_SECONDS
    seconds = _seconds("shutdown_drain_seconds", value)
    return min(seconds, PLUGIN_DRAIN_MAX) if plugin else seconds


DEFAULT_BODY_TIMEOUT = 30.0


def body_timeout_seconds(data: dict | None = None) -> float:
    """`serve`: how long a request body may take to arrive in full before the request is
    answered 408 and its connection closed (`body_timeout_seconds`, env
    OVMS_PLUGIN_BODY_TIMEOUT, flag --body-timeout; default 30 s, 0: no limit)."""
    data = load_file() if data is None else data
    value = os.environ.get("OVMS_PLUGIN_BODY_TIMEOUT") or data.get("body_timeout_seconds")
    return DEFAULT_BODY_TIMEOUT if value is None else _seconds("body_timeout_seconds", value)
