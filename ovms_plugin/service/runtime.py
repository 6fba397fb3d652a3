"""The loaded models: starting and stopping their engine workers, and running requests on
them. Protocol adapters (AOG gRPC, HTTP) call this and nothing below it."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import aclosing, asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ovms_plugin import devices as devices_mod
from ovms_plugin import kinds, paths
from ovms_plugin import settings as settings_mod
from ovms_plugin.engine.client import EngineClient, EngineError, Output
from ovms_plugin.kinds.llm import LLMRequest
from ovms_plugin.service import detok, errors
from ovms_plugin.service.errors import ServiceError, invalid
from ovms_plugin.service.text import Detokenizer, StopMatcher, TextDelta, TextRequest
from ovms_plugin.store.store import ModelEntry, ModelNotFound, ModelStore, StoreError

log = logging.getLogger(__name__)


class Client(Protocol):
    """What the runtime needs of an engine client (engine/client.py's EngineClient, or a
    test's in-process fake)."""

    kind: str
    config: dict[str, Any]
    info: dict[str, Any]
    dead_reason: str | None

    @property
    def alive(self) -> bool: ...
    @property
    def in_flight(self) -> int: ...
    async def start(self) -> dict[str, Any]: ...
    def submit(self, payload: Any) -> AsyncIterator[Output]: ...
    async def metrics(self, timeout: float = 5.0) -> dict[str, Any]: ...
    async def stop(self, timeout: float = 1.0) -> None: ...
    def kill(self) -> None: ...


# (name, engine kind, model folder, engine config, max requests in flight) -> a client
ClientFactory = Callable[[str, str, Path, dict[str, Any], int], Client]


@dataclass
class LoadedModel:
    entry: ModelEntry
    client: Client
    settings: settings_mod.ModelSettings
    kind: kinds.Kind | None = None  # the kind whose engine runs it (a variant, maybe)
    leases: int = 0  # requests holding it: never evicted while any does
    tokenizer: Any = None
    byte_table: detok.ByteTable | None = None  # fast streaming detokenization, when exact
    counter: TokenCounter | None = None
    context: int | None = None
    max_prompt: int | None = None  # the stateful (NPU) pipeline's prompt limit
    memory_bytes: int = 0  # what the budget counts for it
    fallbacks: list[str] = field(default_factory=list)  # devices that failed first, and why
    loaded_at: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.monotonic)

    @property
    def idle(self) -> bool:
        """No request holds it or runs on it: it may be evicted."""
        return not self.leases and not self.client.in_flight


class Runtime:
    """The model manager: loads models (on the device their kind prefers), leases them to
    requests, evicts idle ones, and knows nothing of any kind in particular.

    `client_factory` makes engine clients (worker processes by default) and `devices` lists
    the devices to route to (OpenVINO's by default): tests pass fakes for both."""

    def __init__(self, store: ModelStore, client_factory: ClientFactory = EngineClient,
                 devices: Callable[[], list[devices_mod.Device]] | None = None) -> None:
        self.store = store
        self.client_factory = client_factory
        self.models: dict[str, LoadedModel] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._discover = devices or devices_mod.discover
        self._found_devices: list[devices_mod.Device] | None = None

    # --- lifecycle ----------------------------------------------------------------------

    def entry(self, name: str) -> ModelEntry:
        try:
            return self.store.get(name)
        except ModelNotFound as e:
            raise ServiceError(str(e), errors.MODEL_NOT_FOUND, "model") from None

    async def load(self, name: str) -> LoadedModel:
        """Starts the model's engine; nearly free when it is already running. A model
        whose worker died is started again."""
        lm = self.models.get(name)
        if lm is not None and lm.client.alive:
            lm.last_used = time.monotonic()
            return lm
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            lm = self.models.get(name)
            if lm is not None and lm.client.alive:
                return lm
            if lm is not None:
                log.warning("restarting model %s: %s", name, lm.client.dead_reason)
                await lm.client.stop()
                del self.models[name]
            entry = self.entry(name)
            if kinds.for_task(entry.task) is None:
                raise ServiceError(f"model {name!r} is a {entry.task} model, which this "
                                   "version cannot serve yet", errors.LOAD_FAILED)
            try:
                ms = settings_mod.model_settings(name)
            except settings_mod.SettingsError as e:
                raise ServiceError(str(e), errors.LOAD_FAILED) from None
            lm = await self._start(name, entry, ms)
            self.models[name] = lm
            return lm

    async def _devices(self) -> list[devices_mod.Device]:
        if self._found_devices is None:
            self._found_devices = await asyncio.to_thread(self._discover)
        return self._found_devices

    async def _start(self, name: str, entry: ModelEntry, ms: settings_mod.ModelSettings
                     ) -> LoadedModel:
        """Starts an engine on the best device for the model's kind, falling back to the
        next candidate when compiling fails; refuses, or first unloads idle models, when
        the memory budget would be exceeded."""
        kind = kinds.for_task(entry.task)
        assert kind is not None  # load() refused models no kind serves
        service = entry.services[0]  # the routing is by the model's first service
        candidates = devices_mod.candidates(service, await self._devices(), ms.device)
        cache_dir = paths.plugin_data_dir() / "cache"
        try:
            cache_mode, cache_max = settings_mod.compile_cache()
        except settings_mod.SettingsError as e:
            raise ServiceError(str(e), errors.LOAD_FAILED) from None
        if cache_mode != "never":
            await asyncio.to_thread(devices_mod.prune_cache, cache_dir, cache_max)
        tokenizer = None
        if kind.needs_tokenizer:
            tokenizer = await asyncio.to_thread(_load_tokenizer, entry)
        fallbacks: list[str] = []
        for device in candidates:
            engine = kind.engine_for(device, ms)  # the engine variant, decided once, here
            config: dict[str, Any] = {
                "device": device,
                "properties": {**devices_mod.compile_properties(
                    device, entry.task, cache_dir, ms.options.get(kind.options_section),
                    cache_mode),
                    **ms.properties},
                **engine.engine_config(entry, device, ms, self._budget_left(exclude=name))}
            need = engine.memory_needed(entry, config)
            await self._make_room(name, need)
            client = self.client_factory(name, engine.name, entry.path, config,
                                         engine.capacity(config) + ms.max_waiting_requests)
            started = time.monotonic()
            try:
                await client.start()
            except EngineError as e:
                fallbacks.append(f"{device}: {e}")
                log.warning("model %s could not start on %s; %s", name, device,
                            "trying the next device" if device != candidates[-1] else
                            "no device left")
                continue
            log.info("model %s loaded on %s in %.2fs%s", name, device,
                     time.monotonic() - started,
                     f" (after: {'; '.join(fallbacks)})" if fallbacks else "")
            lm = LoadedModel(entry, client, ms, kind=engine, tokenizer=tokenizer,
                             context=entry.context_length(), memory_bytes=need,
                             fallbacks=fallbacks)
            if tokenizer is not None:
                lm.counter = TokenCounter(tokenizer)
            await engine.on_loaded(lm, config)
            return lm
        raise ServiceError(f"loading model {name!r} failed on every device tried: "
                           f"{'; '.join(fallbacks)}", errors.LOAD_FAILED)

    def _budget_left(self, exclude: str = "") -> int:
        used = sum(lm.memory_bytes for n, lm in self.models.items() if n != exclude)
        return settings_mod.memory_budget_bytes() - used

    async def _make_room(self, name: str, need: int) -> None:
        """Unloads least-recently-used idle models until `need` fits in the memory budget
        and in free memory; refuses with needed vs available when that is not enough."""
        while True:
            left = self._budget_left(exclude=name)
            free = settings_mod.available_memory_bytes()
            if need <= left and need <= free:
                return
            idle = sorted((lm.last_used, n) for n, lm in self.models.items()
                          if n != name and lm.idle)
            if not idle:
                break
            victim = idle[0][1]
            log.info("unloading %s (least recently used) to make room for %s", victim, name)
            await self.unload(victim)
        available = min(self._budget_left(exclude=name), settings_mod.available_memory_bytes())
        raise ServiceError(
            f"not enough memory to load model {name!r}: needs about {need / 2**30:.2f} GB, "
            f"{max(0, available) / 2**30:.2f} GB available (free memory within the plugin's "
            f"memory budget of {settings_mod.memory_budget_bytes() / 2**30:.2f} GB, after "
            f"{len(self.models)} busy model(s)); unload models or raise memory_budget",
            errors.RESOURCE_EXHAUSTED)

    async def unload(self, name: str) -> bool:
        lm = self.models.pop(name, None)
        if lm is None:
            return False
        await lm.client.stop()
        log.info("model %s unloaded", name)
        return True

    async def unload_idle(self, max_idle: float, keep: Iterable[str] = ()) -> list[str]:
        """Unloads models with no request in flight and none for `max_idle` seconds, except
        those in `keep`."""
        now = time.monotonic()
        keep = set(keep)
        idle = [n for n, lm in self.models.items() if n not in keep
                and lm.idle and now - lm.last_used >= max_idle]
        for name in idle:
            log.info("unloading %s: idle for %.0f s", name, now - self.models[name].last_used)
            await self.unload(name)
        return idle

    async def unload_all(self) -> None:
        await asyncio.gather(*(self.unload(n) for n in list(self.models)))

    def kill_all(self) -> None:
        for lm in self.models.values():
            lm.client.kill()

    async def delete(self, name: str) -> None:
        lm = self.models.get(name)
        if lm is not None and not lm.idle:
            busy = max(lm.client.in_flight, lm.leases)
            raise ServiceError(f"model {name!r} is serving {busy} request(s); "
                               "wait for them to finish or unload it first, then delete",
                               errors.FAILED_PRECONDITION)
        await self.unload(name)
        try:
            self.store.delete(name)
        except ModelNotFound as e:
            raise ServiceError(str(e), errors.MODEL_NOT_FOUND) from None
        except (StoreError, OSError) as e:
            raise ServiceError(f"deleting model {name!r} failed: {e}", errors.INTERNAL) \
                from None

    def health(self) -> tuple[bool, str]:
        dead = [lm.client.dead_reason or f"engine of {n!r} is not running"
                for n, lm in self.models.items() if not lm.client.alive]
        if dead:
            return False, "; ".join(dead)
        return True, f"ok: {len(self.models)} model(s) loaded"

    def placement(self, name: str) -> dict[str, Any]:
        """Where a loaded model runs and what it holds (empty when it is not loaded)."""
        lm = self.models.get(name)
        if lm is None:
            return {}
        return {"device": lm.client.info.get("device", lm.settings.device),
                "engine": lm.client.kind, "alive": lm.client.alive,
                "kv_cache_gb": lm.client.config.get("scheduler", {}).get("cache_size"),
                "memory_bytes": lm.memory_bytes, "fallbacks": lm.fallbacks}

    async def running(self) -> list[dict[str, Any]]:
        """Loaded models in ListModels' shape, with engine details."""
        out = []
        for name, lm in list(self.models.items()):
            item = lm.entry.to_aog()
            details = item["details"]
            details.update(self.placement(name))
            details["in_flight"] = lm.client.in_flight
            if lm.counter is not None and lm.counter.calls:
                details["tokenizer_batching"] = round(lm.counter.requests / lm.counter.calls, 2)
            if lm.client.alive:
                with suppress(EngineError, TimeoutError):
                    details["metrics"] = await lm.client.metrics(timeout=2.0)
            out.append(item)
        return out

    # --- text generation ----------------------------------------------------------------

    async def text(self, req: TextRequest) -> AsyncIterator[TextDelta]:
        """Runs a chat or generate request; yields text as it is produced. The last delta
        carries finish_reason and the token counts."""
        async with self.lease(req.model, req.service) as lm, \
                aclosing(self._text(lm, req)) as deltas:
            async for d in deltas:
                yield d

    async def _text(self, lm: LoadedModel, req: TextRequest) -> AsyncIterator[TextDelta]:
        tok = lm.tokenizer
        if req.service == "chat":
            try:
                prompt = tok.apply_chat_template(req.messages, add_generation_prompt=True)
            except Exception as e:
                raise invalid(f"the model's chat template could not render these messages: "
                              f"{e}", "messages") from None
            ids = _encode(tok, prompt, add_special_tokens=False)
        else:
            ids = _encode(tok, req.prompt, add_special_tokens=True)
        n_prompt = len(ids)
        if lm.max_prompt and n_prompt > lm.max_prompt:
            raise invalid(f"the prompt has {n_prompt} tokens, but model {req.model!r} runs on "
                          f"{lm.client.info.get('device')} with a prompt limit of "
                          f"{lm.max_prompt} tokens (MAX_PROMPT_LEN); shorten the prompt, or "
                          "raise npu_max_prompt_len in the model's llm settings",
                          "messages")
        max_new = _max_new_tokens(req, n_prompt, lm.context)
        payload = LLMRequest(ids, max_new, temperature=req.temperature, top_p=req.top_p,
                             presence_penalty=req.presence_penalty,
                             frequency_penalty=req.frequency_penalty, seed=req.seed,
                             ignore_eos=req.ignore_eos)
        detokenizer = detok.FastDetokenizer(lm.byte_table) if lm.byte_table else \
            Detokenizer(tok)
        stops = StopMatcher(req.stop)
        n_out = 0
        try:
            async with aclosing(lm.client.submit(payload)) as outputs:
                async for out in outputs:
                    lm.last_used = time.monotonic()
                    n_out += len(out.result)
                    text = detokenizer.push(out.result)
                    if out.finish:
                        text += detokenizer.flush()
                    text, hit = stops.feed(text)
                    if hit:
                        yield TextDelta(text, "stop", n_prompt, n_out)
                        return
                    if out.finish:
                        yield TextDelta(text + stops.flush(), out.finish, n_prompt, n_out)
                        return
                    if text:
                        yield TextDelta(text, None, n_prompt, n_out)
        except EngineError as e:
            raise _engine_failure(e) from None


    # --- leases and engine calls, for every kind ------------------------------------------

    @asynccontextmanager
    async def lease(self, model: str, service: str | None = None
                    ) -> AsyncIterator[LoadedModel]:
        """The model, loaded, for a request's whole life: a leased model is never evicted
        (to make room or when idle), so nothing can unload it between finding it and
        submitting to it. `service` is checked against what the model serves."""
        lm = await self.load(model)
        # No await between the load and the count: an eviction cannot come in between.
        if service is not None and service not in lm.entry.services:
            raise invalid(f"model {model!r} serves {list(lm.entry.services)}, not "
                          f"{service!r}; pick a {service} model", "model")
        lm.leases += 1
        try:
            yield lm
        finally:
            lm.leases -= 1
            lm.last_used = time.monotonic()

    async def submit(self, lm: LoadedModel, payload: Any) -> AsyncIterator[Output]:
        """Runs one request on a (leased) model's engine; yields its outputs. Engine
        failures come out as service errors."""
        try:
            async with aclosing(lm.client.submit(payload)) as outputs:
                async for out in outputs:
                    lm.last_used = time.monotonic()
                    yield out
        except EngineError as e:
            raise _engine_failure(e) from None

    async def run_once(self, lm: LoadedModel, payload: Any) -> Any:
        """A request with one result (embeddings, rerank)."""
        async with aclosing(self.submit(lm, payload)) as outputs:
            async for out in outputs:
                return out.result
        raise ServiceError("the engine returned no result", errors.INTERNAL)


def _engine_failure(e: EngineError) -> ServiceError:
    return errors.from_engine(e.failure)


def _token_counts(tok: Any, texts: list[str]) -> list[int]:
    """Tokens per text, from the model's own tokenizer (one batched call)."""
    enc = tok.encode(texts)
    return [int(n) for n in enc.attention_mask.data.sum(axis=1)]


class TokenCounter:
    """Counts tokens for many concurrent requests with one tokenizer call: requests that
    arrive within a millisecond are encoded together. One batched encode costs
    about a tenth of the CPU of encoding the same texts one call each, and on a small
    machine the front end's CPU is taken from the engine."""

    WAIT = 0.001  # seconds; the batcher behind it waits for company anyway

    def __init__(self, tok: Any) -> None:
        self.tok = tok
        self.pending: list[tuple[list[str], asyncio.Future]] = []
        self.calls = self.requests = 0  # how well requests are merged

    async def count(self, texts: list[str]) -> list[int]:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        if not self.pending:
            # gRPC hands us one request per event-loop turn: wait a moment for the others.
            loop.call_later(self.WAIT, self._flush)
        self.pending.append((texts, fut))
        return await fut

    def _flush(self) -> None:
        batch, self.pending = self.pending, []
        self.calls += 1
        self.requests += len(batch)
        try:
            counts = _token_counts(self.tok, [t for texts, _ in batch for t in texts])
        except Exception as e:
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(e)
            return
        start = 0
        for texts, fut in batch:
            if not fut.done():
                fut.set_result(counts[start:start + len(texts)])
            start += len(texts)


def _load_tokenizer(entry: ModelEntry) -> Any:
    import openvino_genai as ov_genai
    # One thread: the front end calls it from its event loop, and OpenVINO's thread pool
    # doubles the CPU a small encode costs (measured 0.59 vs 0.29 ms for one sentence).
    return ov_genai.Tokenizer(str(entry.path), INFERENCE_NUM_THREADS=1)


def _encode(tok: Any, text: str, add_special_tokens: bool) -> list[int]:
    enc = tok.encode(text, add_special_tokens=add_special_tokens)
    return enc.input_ids.data[0].tolist()


def _max_new_tokens(req: TextRequest, n_prompt: int, context: int | None) -> int:
    if context is None:
        return req.max_tokens or 4096
    if n_prompt >= context:
        raise invalid(f"the prompt has {n_prompt} tokens, but model {req.model!r} has a "
                      f"context of {context} tokens; shorten the prompt", "messages")
    room = context - n_prompt
    if req.max_tokens is None:
        return room
    if req.max_tokens > room:
        raise invalid(f"max_tokens {req.max_tokens} plus the prompt's {n_prompt} tokens "
                      f"exceeds model {req.model!r}'s context of {context}; use max_tokens "
                      f"<= {room}", "max_tokens")
    return req.max_tokens
