"""Model kinds: the registry, and the model manager below the end-to-end tests. A throwaway
"echo" kind, declared and registered in this file alone (an engine that answers its input
upper-cased, and a store rule: a folder holding echo.json), is pulled from the store, loaded,
leased and served through the AOG servicer and the HTTP server, in process, with engines
run by tests/fake_engine.py instead of worker processes."""

from __future__ import annotations

import asyncio
import json
from collections import deque
from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing
from pathlib import Path
from typing import Any

import pytest
from fake_engine import InProcessClient

from ovms_plugin import kinds
from ovms_plugin.devices import Device
from ovms_plugin.engine.protocol import FailureKind, StepOutput, failed
from ovms_plugin.kinds import Kind, Service, StreamChunk
from ovms_plugin.service.errors import ServiceError
from ovms_plugin.service.runtime import Runtime
from ovms_plugin.store.store import ModelStore, task_from

# --- the echo kind: everything it is, in one place ---------------------------------------


class EchoEngine:
    """Answers each request's text upper-cased, one request per step."""

    def __init__(self, model_dir: Path, config: dict[str, Any]) -> None:
        self.device = config["device"]
        self.queue: deque[tuple[int, dict[str, Any]]] = deque()
        self.requests_total = 0

    def info(self) -> dict[str, Any]:
        return {"device": self.device}

    def add(self, req_id: int, payload: dict[str, Any]) -> None:
        self.queue.append((req_id, payload))

    def abort(self, req_id: int) -> None:
        self.queue = deque(r for r in self.queue if r[0] != req_id)

    def has_work(self) -> bool:
        return bool(self.queue)

    def step(self) -> list[StepOutput]:
        req_id, payload = self.queue.popleft()
        self.requests_total += 1
        if payload.get("fail"):  # how an engine reports a request it could not serve
            return [failed(req_id, FailureKind.BAD_REQUEST, payload["fail"])]
        return [StepOutput(req_id, payload["text"].upper(), "stop")]

    def metrics(self) -> dict[str, Any]:
        return {"requests_total": self.requests_total}


async def echo_unary(rt: Runtime, service: str, body: Any) -> dict[str, Any]:
    async with rt.lease(body["model"], service) as lm:
        out = await rt.run_once(lm, {"text": body["input"]})
    return {"model": body["model"], "output": out}


async def echo_stream(rt: Runtime, service: str, body: Any) -> AsyncIterator[StreamChunk]:
    for word in body["input"].split():
        yield StreamChunk(await echo_unary(rt, service, {**body, "input": word}))
    yield StreamChunk({"done": True}, final=True)


class EchoKind(Kind):
    name = "echo"
    task = "echo"
    services = (Service("echo", echo_unary, echo_stream, task_type="echo"),)
    required_files = ("echo.json",)
    device_preference = ("GPU.integrated", "CPU")

    def recognise(self, files: set[str], config: dict[str, Any]) -> int | None:
        return 1 if "echo.json" in files else None

    def is_native(self, files: set[str]) -> bool:
        return "echo.json" in files

    def make_engine(self, model_dir: Path, config: dict[str, Any]) -> Any:
        return EchoEngine(model_dir, config)

    def memory_needed(self, entry: Any, config: dict[str, Any]) -> int:
        return int(json.loads((entry.path / "echo.json").read_text())["memory"])

    def export_metrics(self, out: Any, labels: dict[str, Any], m: dict[str, Any]) -> None:
        out.counter("echo_requests_total", "Echo requests.", labels, m.get("requests_total"))


@pytest.fixture
def echo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ModelStore]:
    """The echo kind registered, and a store holding two echo models of 100 bytes' worth
    of memory each (folders copied in by hand: the store recognises them)."""
    kinds.register(EchoKind())
    monkeypatch.setenv("OVMS_PLUGIN_HOME", str(tmp_path))
    monkeypatch.setenv("OVMS_PLUGIN_MEMORY_BUDGET", "150B")
    for name in ("echo-a", "echo-b"):
        (tmp_path / "models" / name).mkdir(parents=True)
        (tmp_path / "models" / name / "echo.json").write_text(json.dumps({"memory": 100}))
    InProcessClient.started.clear()
    yield ModelStore(tmp_path / "models")
    kinds.unregister("echo")
    InProcessClient.fail_on = ()


def runtime(store: ModelStore) -> Runtime:
    return Runtime(store, client_factory=InProcessClient, devices=lambda: [Device("CPU")])


# --- the registry -------------------------------------------------------------------------

def test_registry_declares_each_service_and_task_once():
    services = kinds.services()
    assert services == ["chat", "generate", "embed", "rerank", "text-to-image",
                        "image-to-image", "speech-to-text", "speech-to-text-ws", "text-to-speech"]
    for name in services:
        assert name in [s.name for s in kinds.for_service(name).services]
    assert kinds.for_task("text-generation").name == "llm"
    assert kinds.get("llm_stateful").variant_of == "llm"
    with pytest.raises(ValueError, match="service"):
        kinds.register(type("Chat2", (Kind,), {"name": "chat2", "task": "x", "services": (
            Service("chat", kinds.service("chat").unary),)})())


@pytest.mark.parametrize("files,config,task", [
    ({"model_index.json", "unet/openvino_model.xml"}, {}, "text-to-image"),
    ({"modules.json", "openvino_model.xml"}, {"architectures": ["BertModel"]},
     "feature-extraction"),
    ({"config.json"}, {"architectures": ["XLMRobertaForSequenceClassification"]},
     "text-classification"),
    ({"openvino_model.xml", "openvino_detokenizer.xml"}, {}, "text-generation"),
    ({"config.json"}, {"architectures": ["Qwen2ForCausalLM"]}, "text-generation"),
    ({"openvino_model.xml"}, {}, "feature-extraction"),
    ({"config.json"}, {"architectures": ["Whatever"]}, None),
])
def test_store_recognition_by_the_kinds(files, config, task):
    assert task_from(files, config) == task


def test_a_kind_registered_by_a_test_is_recognised(echo: ModelStore):
    [a, _] = echo.list()
    assert (a.task, a.services) == ("echo", ("echo",))
    assert task_from({"echo.json", "openvino_model.xml"}, {}) == "echo"  # more specific


# --- the echo kind served end to end, in process ------------------------------------------

def test_echo_kind_through_the_aog_servicer(echo: ModelStore):
    from ovms_plugin.aog.proto import provider_pb2 as pb
    from ovms_plugin.aog.servicer import ProviderServicer

    async def go():
        rt = runtime(echo)
        servicer = ProviderServicer(rt)
        try:
            r = await servicer.InvokeService(pb.InvokeServiceRequest(
                service_name="echo",
                request_data=json.dumps({"model": "echo-a", "input": "hello"}).encode()),
                None)
            assert r.code == 0, r.message
            assert json.loads(r.response_data) == {"model": "echo-a", "output": "HELLO"}
            chunks = [c async for c in servicer.InvokeServiceStream(pb.InvokeServiceRequest(
                service_name="echo",
                request_data=json.dumps({"model": "echo-a", "input": "a b"}).encode()), None)]
            assert [c.is_final for c in chunks] == [False, False, True]
            assert b'"output":"A"' in chunks[0].chunk_data.replace(b" ", b"")
            assert chunks[-1].chunk_data.endswith(b"data: [DONE]\n\n")
            r = await servicer.InvokeService(pb.InvokeServiceRequest(
                service_name="echo", request_data=b'{"model": "no-such", "input": "x"}'),
                None)
            assert r.code == 3000
            models = json.loads((await servicer.GetRunningModels(
                pb.GetRunningModelsRequest(), None)).response_json)["models"]
            assert [(m["name"], m["details"]["engine"]) for m in models] == [
                ("echo-a", "echo")]
        finally:
            await rt.unload_all()

    asyncio.run(go())


def test_echo_kind_through_the_http_server(echo: ModelStore, tmp_path: Path):
    from aiohttp.test_utils import TestClient, TestServer

    from ovms_plugin.http.common import ServerState
    from ovms_plugin.http.server import create_app

    async def go():
        rt = runtime(echo)
        app = create_app(rt, ServerState(api_key=None, max_body_bytes=1 << 20,
                                         images_dir=tmp_path / "images"))
        async with TestClient(TestServer(app)) as client:
            r = await client.post("/aog/v0.2/services/echo", json={"input": "hi there"})
            assert r.status == 200, await r.text()
            # No model named: AOG's default, the first installed model serving it.
            assert await r.json() == {"model": "echo-a", "output": "HI THERE"}
            r = await client.post("/aog/v0.2/services/echo",
                                  json={"model": "echo-b", "input": "x y", "stream": True})
            body = await r.text()
            assert r.status == 200 and body.count("data: ") == 3 and '"Y"' in body
            r = await client.post("/aog/v0.2/services/nope", json={"model": "echo-a"})
            assert r.status == 404
            # The budget holds one echo model: echo-a made room for echo-b.
            metrics = await (await client.get("/metrics")).text()
            assert 'ovms_echo_requests_total{model="echo-b"} 2' in metrics
            # echo-a is no longer loaded; only its load count stays.
            assert not [line for line in metrics.splitlines()
                        if 'model="echo-a"' in line and "_load" not in line]
        await rt.unload_all()

    asyncio.run(go())


# --- the model manager, against the fake engine --------------------------------------------

def test_a_leased_model_is_not_evicted(echo: ModelStore):
    """The budget holds one echo model. A request that holds echo-a (between finding it and
    submitting to it, as rerank waits for its token count) keeps it loaded: loading echo-b
    is refused instead of evicting it. Once the lease ends, echo-a makes room."""

    async def go():
        rt = runtime(echo)
        async with rt.lease("echo-a", "echo") as lm:
            assert lm.leases == 1 and not lm.idle
            with pytest.raises(ServiceError, match="not enough memory to load model 'echo-b'"):
                await rt.load("echo-b")
            assert await rt.run_once(lm, {"text": "still here"}) == "STILL HERE"
        assert lm.idle
        await rt.load("echo-b")
        assert list(rt.models) == ["echo-b"]
        await rt.unload_all()

    asyncio.run(go())


def test_concurrent_load_waits_for_the_lease(echo: ModelStore):
    async def go():
        rt = runtime(echo)
        found = asyncio.Event()
        proceed = asyncio.Event()

        async def request() -> Any:
            async with rt.lease("echo-a", "echo") as lm:
                found.set()
                await proceed.wait()  # the front end's await between found and submitted
                return await rt.run_once(lm, {"text": "ok"})

        task = asyncio.create_task(request())
        await found.wait()
        with pytest.raises(ServiceError, match="not enough memory"):
            await rt.load("echo-b")
        proceed.set()
        assert await task == "OK"
        assert await rt.unload_idle(0) == ["echo-a"]
        await rt.unload_all()

    asyncio.run(go())


def test_wrong_service_and_delete_while_leased(echo: ModelStore):
    async def go():
        rt = runtime(echo)
        with pytest.raises(ServiceError, match="serves \\['echo'\\], not 'chat'"):
            async with rt.lease("echo-a", "chat"):
                pass
        async with rt.lease("echo-a"):
            with pytest.raises(ServiceError, match="serving 1 request"):
                await rt.delete("echo-a")
        await rt.delete("echo-a")
        assert [e.name for e in echo.list()] == ["echo-b"]

    asyncio.run(go())


def test_routing_prefers_the_kinds_device_and_falls_back(echo: ModelStore):
    InProcessClient.fail_on = ("GPU",)

    async def go():
        rt = Runtime(echo, client_factory=InProcessClient,
                     devices=lambda: [Device("GPU.0", kind="integrated"), Device("CPU")])
        lm = await rt.load("echo-a")
        assert [c.config["device"] for c in InProcessClient.started] == ["GPU.0", "CPU"]
        assert lm.client.info["device"] == "CPU"
        assert lm.fallbacks == ["GPU.0: cannot compile on GPU.0"]
        await rt.unload_all()

    asyncio.run(go())


def test_engine_failures_become_service_errors(echo: ModelStore):
    async def go():
        rt = runtime(echo)
        async with rt.lease("echo-a") as lm:
            with pytest.raises(ServiceError, match="boom") as e:
                await rt.run_once(lm, {"text": "x", "fail": "boom"})
        assert e.value.code == 4003 and e.value.http_status == 400
        await rt.unload_all()

    asyncio.run(go())


def test_stream_closed_early_aborts_in_the_engine(echo: ModelStore):
    async def go():
        rt = runtime(echo)
        async with rt.lease("echo-a") as lm:
            async with aclosing(rt.submit(lm, {"text": "x"})) as outs:
                async for out in outs:
                    assert out.result == "X"
                    break
            assert lm.client.in_flight == 0
        await rt.unload_all()

    asyncio.run(go())


# --- the typed engine protocol --------------------------------------------------------------

@pytest.mark.parametrize("kind,code,status,retry", [
    (FailureKind.BAD_REQUEST, 4003, 400, None),
    (FailureKind.NO_KV_SPACE, 11, 500, None),
    (FailureKind.BUSY, 6, 429, 1.0),
    (FailureKind.ENGINE_DIED, 14, 503, None),
    (FailureKind.LOAD_FAILED, 3003, 500, None),
    (FailureKind.INTERNAL, 11, 500, None),
])
def test_engine_failures_map_to_codes_in_one_place(kind, code, status, retry):
    from ovms_plugin.engine.protocol import EngineFailure
    from ovms_plugin.service.errors import from_engine
    e = from_engine(EngineFailure(kind, "why"))
    assert (e.code, e.http_status, e.retry_after, e.message) == (code, status, retry, "why")


def test_step_outputs_travel_as_tuples():
    import pickle

    from ovms_plugin.engine import ipc
    outs = [StepOutput(1, [5, 6]), StepOutput(2, [], "length"),
            failed(3, FailureKind.NO_KV_SPACE, "full")]
    wire = [o.wire() for o in outs]
    assert all(type(t) is tuple for t in wire)
    msg = pickle.loads(ipc.encode(("out", wire))[4:])
    assert [StepOutput.from_wire(t) for t in msg[1]] == outs
