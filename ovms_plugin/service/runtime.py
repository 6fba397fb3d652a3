"""The loaded models: starting and stopping their engine workers, and running requests on
them. Protocol adapters (AOG gRPC, HTTP) call this and nothing below it."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
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
from ovms_plugin.service import detok, errors
from ovms_plugin.service.errors import ServiceError, invalid
from ovms_plugin.store import pull as pull_mod
from ovms_plugin.store.store import (
    MANIFEST,
    ModelEntry,
    ModelNotFound,
    ModelStore,
    StoreError,
    check_name,
)

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
    features: Any = None  # the kind's own (generation.TextFeatures for LLMs)
    memory_bytes: int = 0  # what the budget counts for it
    fallbacks: list[str] = field(default_factory=list)  # devices that failed first, and why
    loaded_at: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.monotonic)
    stamp: tuple[int, int] | None = None  # the manifest file it was loaded from

    @property
    def idle(self) -> bool:
        """No request holds it or runs on it: it may be evicted."""
        return not self.leases and not self.client.in_flight


def _stamp(entry: ModelEntry) -> tuple[int, int] | None:
    """Identity of a model folder's manifest (inode, mtime): it changes when the model is
    installed again, and is None once the folder is gone. One stat call."""
    try:
        st = os.stat(entry.path / MANIFEST)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


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
        # Per model: (loads, seconds spent loading, the last load's seconds): cold loads
        # a request waited for show in /metrics.
        self.loads: dict[str, tuple[int, float, float]] = {}
        self._found_devices: list[devices_mod.Device] | None = None

    # --- lifecycle ----------------------------------------------------------------------

    def entry(self, name: str) -> ModelEntry:
        """The installed model of that name; a name that could not be one is refused
        before anything is looked up or kept for it."""
        try:
            check_name(name)
        except StoreError as e:
            raise ServiceError(str(e), errors.MODEL_NOT_FOUND, "model") from None
        try:
            return self.store.get(name)
        except ModelNotFound as e:
            raise ServiceError(str(e), errors.MODEL_NOT_FOUND, "model") from None

    async def load(self, name: str) -> LoadedModel:
        """Starts the model's engine; nearly free when it is already running. A model
        whose worker died is started again. A model whose folder changed in the store (pulled
        again, here or by another process) is swapped: new requests go to the new version
        once it has started, requests in flight finish on the old one; a model removed from
        the store stops being served."""
        lm = self.models.get(name)
        if lm is not None and lm.client.alive and _stamp(lm.entry) == lm.stamp:
            lm.last_used = time.monotonic()
            return lm
        if lm is None:
            self.entry(name)  # only installed models get a lock: unknown names keep nothing
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            lm = self.models.get(name)
            if lm is not None and lm.client.alive:
                stamp = _stamp(lm.entry)
                if stamp == lm.stamp:
                    return lm
                self.models.pop(name)
                why = "it was removed from the store" if stamp is None else \
                    "a new version was installed"
                log.info("model %s: %s; its running engine finishes what it has", name, why)
                asyncio.get_running_loop().create_task(self._retire(lm))
            elif lm is not None:
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
                    cache_mode, entry.size),
                    **ms.properties},
            }
            try:
                config.update(engine.engine_config(entry, device, ms,
                                                   self._budget_left(exclude=name)))
            except settings_mod.SettingsError as e:
                raise ServiceError(str(e), errors.LOAD_FAILED) from None
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
            seconds = time.monotonic() - started
            n, total, _ = self.loads.get(name, (0, 0.0, 0.0))
            self.loads[name] = (n + 1, total + seconds, seconds)
            log.info("model %s loaded on %s in %.2fs%s", name, device, seconds,
                     f" (after: {'; '.join(fallbacks)})" if fallbacks else "")
            lm = LoadedModel(entry, client, ms, kind=engine, tokenizer=tokenizer,
                             context=entry.context_length(), memory_bytes=need,
                             fallbacks=fallbacks, stamp=_stamp(entry))
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

    async def _retire(self, lm: LoadedModel, patience: float = 600.0) -> None:
        """Stops an engine that no longer serves new requests, once its requests in flight
        have finished (at most `patience` seconds)."""
        deadline = time.monotonic() + patience
        while lm.client.in_flight and lm.client.alive and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        await lm.client.stop()

    async def refresh(self, name: str) -> None:
        """Swaps a loaded model to what the store now holds (see load); errors are logged."""
        if name in self.models:
            try:
                await self.load(name)
            except ServiceError as e:
                log.warning("model %s could not be swapped to its new version: %s", name, e)

    async def pull(self, req: pull_mod.PullRequest) -> AsyncIterator[dict[str, Any]]:
        """Runs a pull in a thread; yields its progress messages, then `{"status":
        "success"}` or `{"error"}` (fit for a client). Leaving early (the caller went away)
        cancels the pull. A loaded model pulled again is swapped to the new version at once
        (ListModels and GetRunningModels agree); a pull may not change its task."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()
        req.loaded_task = self.loaded_task

        def progress(msg: dict[str, Any]) -> None:
            loop.call_soon_threadsafe(q.put_nowait, msg)

        def run() -> None:
            try:
                entry = pull_mod.pull(self.store, req, progress, cancel)
                if entry.name in self.models:
                    asyncio.run_coroutine_threadsafe(self.refresh(entry.name), loop)
            except (StoreError, ServiceError) as e:
                log.info("pull failed: %s", e)
                progress({"error": errors.public(str(e))})
            except Exception as e:
                log.exception("pull failed")
                progress({"error": errors.public(f"pull failed: {type(e).__name__}: {e}")})
            loop.call_soon_threadsafe(q.put_nowait, None)

        task = loop.run_in_executor(None, run)
        try:
            while (msg := await q.get()) is not None:
                yield msg
        finally:
            cancel.set()
            await asyncio.shield(task)

    def loaded_task(self, name: str) -> str | None:
        """The task of a loaded model (a pull must not change it under that name)."""
        lm = self.models.get(name)
        return lm.entry.task if lm is not None else None

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
        """Fails while shutting down, while a loaded model's worker is dead or stalled, and
        while the supervisor restarts one (see supervise)."""
        closing = self.shutdown_reason()
        if closing:
            return False, closing
        dead = {n: lm.client.dead_reason or f"engine of {n!r} is not running"
                for n, lm in self.models.items() if not lm.client.alive}
        for n, why in self._restarting().items():
            if n not in dead and (n not in self.models or not self.models[n].client.alive):
                dead[n] = why if "being restarted" in why else \
                    f"model {n!r} is being restarted ({why})"
        if dead:
            return False, "; ".join(dead.values())
        return True, f"ok: {len(self.models)} model(s) loaded"

    def placement(self, name: str) -> dict[str, Any]:
        """Where a loaded model runs and what it holds (empty when it is not loaded)."""
        lm = self.models.get(name)
        if lm is None:
            return {}
        return {"device": lm.client.info.get("device", lm.settings.device),
                "engine": lm.client.kind, "alive": lm.client.alive,
                "kv_cache_gb": lm.client.config.get("scheduler", {}).get("cache_size"),
                "kv_cache": lm.client.config.get("kv"),
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

    # --- supervision: engines restarted on their own; shutdown ---------------------------

    def _restarting(self) -> dict[str, str]:
        """Models the supervisor is restarting, and why (made on first use)."""
        restarting = self.__dict__.get("_restarting_models")
        if restarting is None:
            restarting = self._restarting_models = {}
        return restarting

    async def supervise(self, every: float = 0.25, max_backoff: float = 30.0) -> None:
        """Runs until cancelled: a loaded model whose engine worker died, or was killed by
        the watchdog (engine.client), is started again without waiting for a request. A
        model that dies again within a minute of its restart waits 1, 2, 4 ... up to
        `max_backoff` seconds first; one that cannot be started again is unloaded (the log
        says why; the next request tries to load it). Nothing restarts once shutdown began."""
        tasks: dict[str, asyncio.Task] = {}
        history: dict[str, tuple[float, float]] = {}  # name: (last restart, last backoff)
        try:
            while True:
                await asyncio.sleep(every)
                if self.shutdown_reason():
                    continue
                for name, lm in list(self.models.items()):
                    c = lm.client
                    if c.alive or c.stopping or c.proc is None or name in tasks:
                        continue
                    last, wait = history.get(name, (-1e9, 0.0))
                    wait = min(max_backoff, max(1.0, wait * 2)) \
                        if time.monotonic() - last < 60 else 0.0
                    history[name] = (time.monotonic() + wait, wait)
                    tasks[name] = asyncio.create_task(self._restart(name, lm, wait))
                    tasks[name].add_done_callback(lambda _, n=name: tasks.pop(n, None))
        finally:
            for task in list(tasks.values()):
                task.cancel()

    async def _restart(self, name: str, lm: LoadedModel, wait: float) -> None:
        why = lm.client.dead_reason or "its engine worker is not running"
        restarting = self._restarting()
        restarting[name] = why
        try:
            if wait:
                log.warning("model %s: restarting its engine in %.0f s (it failed again soon "
                            "after its last restart)", name, wait)
                await asyncio.sleep(wait)
            if self.models.get(name) is not lm or self.shutdown_reason():
                return  # unloaded, or already restarted by a request, meanwhile
            started = time.monotonic()
            await self.load(name)
            log.info("model %s: engine restarted in %.2f s", name, time.monotonic() - started)
        except ServiceError as e:
            log.error("model %s could not be restarted: %s; it is unloaded (the next request "
                      "for it loads it again)", name, e.message)
            if self.models.get(name) is lm:
                await self.unload(name)
        except Exception:
            log.exception("restarting model %s failed", name)
        finally:
            restarting.pop(name, None)

    def engine_events(self) -> dict[str, dict[str, int]]:
        """Per model: engine "stalls" (killed by the watchdog), "deaths" (exited on their
        own) and "restarts", since this process started."""
        out: dict[str, dict[str, int]] = {}
        for (name, event), n in EngineClient.events.items():
            out.setdefault(name, {"stalls": 0, "deaths": 0, "restarts": 0})[event] = n
        for name in self._restarting():
            out.setdefault(name, {"stalls": 0, "deaths": 0, "restarts": 0})
        return out

    def restarting(self) -> list[str]:
        """Models whose engine is being restarted now."""
        return sorted(self._restarting())

    def shutdown_reason(self) -> str | None:
        """Why new requests are refused (shutdown began), or None."""
        return self.__dict__.get("_shutdown_reason")

    def begin_shutdown(self, reason: str) -> None:
        """Refuses new requests from now on (code 14, with `reason`); running ones go on.
        Health checks fail, and the supervisor restarts nothing."""
        self._shutdown_reason = reason
        for lm in self.models.values():
            lm.client.refuse(reason)

    def requests_in_flight(self) -> int:
        return sum(lm.client.in_flight for lm in self.models.values())

    def cut_requests(self, reason: str) -> int:
        """Ends every request in flight with `reason` (code 14; a stream gets it as its
        final error); returns how many there were."""
        return sum(lm.client.cut(reason) for lm in list(self.models.values()))

    async def drain(self, seconds: float, reason: str, settle: float = 0.5,
                    running: Any = None) -> int:
        """Shutdown's first half: refuses new requests, gives running ones up to `seconds`
        to finish, then ends those still in an engine with `reason` and waits up to
        `settle` seconds for them to send it. `running()` counts what is waited for (default
        the requests in engines; a server passes its own count). Returns how many were
        cut."""
        self.begin_shutdown(reason)
        running = running or self.requests_in_flight
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, seconds)
        while running() and loop.time() < deadline:
            await asyncio.sleep(0.02)
        cut = self.cut_requests(reason) if self.requests_in_flight() else 0
        if cut:
            log.warning("shutting down: %d request(s) still running after %.1f s were ended "
                        "with an error", cut, seconds)
        deadline = loop.time() + settle
        while running() and loop.time() < deadline:
            await asyncio.sleep(0.01)
        return cut


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
