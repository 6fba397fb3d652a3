"""Each built-in kind's front-end processing (request body -> engine request, engine outputs
-> response objects) through the model manager, against fake engines run in process: the
kind's make_engine is replaced, nothing else. The real engines are tested end to end
elsewhere (test_aog_plugin, test_embed, test_image, test_devices)."""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fake_engine import InProcessClient

from ovms_plugin import devmodels, kinds
from ovms_plugin.devices import Device
from ovms_plugin.engine.protocol import StepOutput
from ovms_plugin.kinds.embed import EmbedJob, EmbedResult
from ovms_plugin.kinds.image import ImageJob, ImageProgress, ImageResult
from ovms_plugin.kinds.llm import LLMRequest
from ovms_plugin.kinds.rerank import RerankJob
from ovms_plugin.service import invoke, jsonenc
from ovms_plugin.service.errors import ServiceError
from ovms_plugin.service.runtime import Runtime
from ovms_plugin.store.store import ModelStore


class FakeEngine:
    """Answers each request with `answer(request)`: a list of (result, finish) outputs, one
    per step."""

    def __init__(self, answer: Any) -> None:
        self.answer = answer
        self.queue: deque[tuple[int, Any]] = deque()
        self.pending: deque[StepOutput] = deque()
        self.seen: list[Any] = []

    def info(self) -> dict[str, Any]:
        return {"device": "CPU"}

    def add(self, req_id: int, payload: Any) -> None:
        self.seen.append(payload)
        self.pending.extend(StepOutput(req_id, r, f) for r, f in self.answer(payload))

    def abort(self, req_id: int) -> None:
        self.pending = deque(o for o in self.pending if o.req_id != req_id)

    def has_work(self) -> bool:
        return bool(self.pending)

    def step(self) -> list[StepOutput]:
        return [self.pending.popleft()]

    def metrics(self) -> dict[str, Any]:
        return {}


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ModelStore:
    monkeypatch.setenv("OVMS_PLUGIN_HOME", str(tmp_path))
    models = devmodels.ensure_models(devmodels.default_cache_dir(), [
        devmodels.TINY_CHAT, devmodels.TINY_EMBED, devmodels.TINY_RERANK, devmodels.TINY_SD])
    for name, model in (("chat", devmodels.TINY_CHAT), ("emb", devmodels.TINY_EMBED),
                        ("rr", devmodels.TINY_RERANK), ("sd", devmodels.TINY_SD)):
        shutil.copytree(models[model], tmp_path / "models" / name)
        (tmp_path / "models" / name / "ovms-manifest.json").unlink(missing_ok=True)
    return ModelStore(tmp_path / "models")


def fake(monkeypatch: pytest.MonkeyPatch, kind: str, answer: Any) -> list[FakeEngine]:
    made: list[FakeEngine] = []

    def make(model_dir: Path, config: dict[str, Any]) -> FakeEngine:
        made.append(FakeEngine(answer))
        return made[-1]

    monkeypatch.setattr(kinds.get(kind), "make_engine", make)
    return made


def call(store: ModelStore, service: str, body: dict[str, Any], stream: bool = False) -> Any:
    async def go():
        rt = Runtime(store, client_factory=InProcessClient, devices=lambda: [Device("CPU")])
        try:
            svc = invoke.lookup(service, streaming=stream)
            if stream:
                return [c async for c in svc.stream(rt, service, body)]
            return await svc.unary(rt, service, body)
        finally:
            await rt.unload_all()

    return asyncio.run(go())


def test_llm_generate_detokenizes_what_the_engine_generates(store, monkeypatch):
    """An engine that 'generates' the prompt's own ids back, two per step: the answer is the
    prompt's text, and the counts are the prompt's and the engine's."""
    def echo_ids(req: LLMRequest) -> list[tuple[Any, Any]]:
        ids = req.ids
        steps = [ids[i:i + 2] for i in range(0, len(ids), 2)]
        return [(s, None) for s in steps[:-1]] + [(steps[-1], "stop")]

    made = fake(monkeypatch, "llm", echo_ids)
    out = call(store, "generate", {"model": "chat", "prompt": "hello there world",
                                   "max_tokens": 50, "temperature": 0})
    [engine] = made
    assert isinstance(engine.seen[0], LLMRequest)
    assert engine.seen[0].max_new_tokens == 50 and engine.seen[0].temperature == 0
    assert "hello there world" in out["choices"][0]["text"]
    assert out["choices"][0]["finish_reason"] == "stop"
    assert out["usage"]["completion_tokens"] == out["usage"]["prompt_tokens"]


def test_llm_stop_strings_end_the_stream(store, monkeypatch):
    fake(monkeypatch, "llm", lambda req: [(req.ids[i:i + 1], None)
                                          for i in range(len(req.ids))] + [([], "length")])
    chunks = call(store, "generate", {"model": "chat", "prompt": "one two three four",
                                      "stop": ["three"], "stream": True}, stream=True)
    text = "".join(c.data["choices"][0]["text"] or "" for c in chunks)
    assert "three" not in text and "two" in text and chunks[-1].final
    assert [c.data["choices"][0]["finish_reason"] for c in chunks if
            c.data["choices"][0]["finish_reason"]] == ["stop"]


def test_embed_sends_an_embed_job_and_shapes_the_response(store, monkeypatch):
    def vectors(job: EmbedJob) -> list[tuple[Any, Any]]:
        counts = [len(t.split()) for t in job.texts]
        return [(EmbedResult(np.eye(len(job.texts), 4, dtype=np.float32), counts), "stop")]

    made = fake(monkeypatch, "embed", vectors)
    out = json.loads(jsonenc.dumps(call(store, "embed", {"model": "emb",
                                                         "input": ["a b", "c"]})))
    [engine] = made
    assert isinstance(engine.seen[0], EmbedJob) and engine.seen[0].texts == [
        "a b", "c"]
    assert [d["index"] for d in out["data"]] == [0, 1]
    assert out["data"][1]["embedding"][1] == 1.0 and out["usage"]["prompt_tokens"] == 3
    # Counts over the model's limit (without truncate) are refused, naming the input.
    fake(monkeypatch, "embed", lambda job: [(EmbedResult(None, [10**6]), "stop")])
    with pytest.raises(ServiceError, match="input"):
        call(store, "embed", {"model": "emb", "input": "x"})


def test_rerank_sends_a_rerank_job_and_sorts_the_scores(store, monkeypatch):
    made = fake(monkeypatch, "rerank", lambda job: [
        ([(i, float(i)) for i in range(len(job.documents))], "stop")])
    out = call(store, "rerank", {"model": "rr", "query": "q", "documents": ["x", "y", "z"],
                                 "top_n": 2})
    [engine] = made
    assert engine.seen[0] == RerankJob("q", ["x", "y", "z"])
    assert [r["index"] for r in out["results"]] == [2, 1]


def test_image_streams_progress_then_the_images(store, monkeypatch):
    png = b"\x89PNG fake"
    made = fake(monkeypatch, "image", lambda job: [
        (ImageProgress(1, 2), None), (ImageProgress(2, 2), None),
        (ImageResult([png] * job.n), "stop")])
    chunks = call(store, "text-to-image", {"model": "sd", "prompt": "a cat", "size": "64x64",
                                           "num_inference_steps": 2, "n": 2}, stream=True)
    [engine] = made
    assert isinstance(engine.seen[0], ImageJob)
    assert (engine.seen[0].width, engine.seen[0].steps, engine.seen[0].n) == (64, 2, 2)
    assert [c.data.get("step") for c in chunks[:2]] == [1, 2] and chunks[-1].final
    assert [base64.b64decode(d["b64_json"]) for d in chunks[-1].data["data"]] == [png, png]
