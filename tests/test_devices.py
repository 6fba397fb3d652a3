"""Devices and memory. What this machine (CPU only) can run, for real: CPU routing, the
fallback when a device cannot compile, the stateful one-request-at-a-time LLM path (the
NPU's), the compiled-blob cache, the memory budget (LRU unloading, refusal) and idle
unloading. What needs a GPU or NPU: the routing decisions and the exact OpenVINO
properties, against device descriptions of a laptop."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import CHAT

from ovms_plugin import devices
from ovms_plugin.devices import Device
from ovms_plugin.service import generation, text
from ovms_plugin.service.errors import ServiceError
from ovms_plugin.service.runtime import Runtime
from ovms_plugin.store.store import ModelStore

LAPTOP = [Device("CPU", "Intel Core Ultra 7 155H"),
          Device("GPU.0", "Intel Arc Graphics (iGPU)", "integrated", 16 * 2**30,
                 ("FP32", "FP16", "INT8")),
          Device("GPU.1", "Intel Arc A770 Graphics (dGPU)", "discrete", 16 * 2**30,
                 ("FP32", "FP16", "INT8")),
          Device("NPU", "Intel AI Boost")]


@pytest.mark.parametrize("service,override,expected", [
    ("chat", None, ["GPU.1", "GPU.0", "CPU"]),
    ("chat", "AUTO", ["GPU.1", "GPU.0", "CPU"]),
    ("chat", "GPU", ["GPU.1", "GPU.0", "CPU"]),
    ("chat", "GPU.0", ["GPU.0", "CPU"]),
    ("chat", "NPU", ["NPU", "CPU"]),
    ("chat", "CPU", ["CPU"]),
    ("embed", None, ["CPU", "NPU"]),
    ("rerank", None, ["CPU", "NPU"]),
    ("text-to-image", None, ["GPU.1", "GPU.0", "CPU"]),
])
def test_routing_on_a_laptop(service, override, expected):
    assert devices.candidates(service, LAPTOP, override) == expected


def test_routing_without_the_devices_asked_for():
    cpu_only = [Device("CPU")]
    assert devices.candidates("chat", cpu_only, "GPU.1") == ["CPU"]
    assert devices.candidates("text-to-image", cpu_only, None) == ["CPU"]
    igpu_only = [Device("CPU"), Device("GPU", kind="integrated")]
    assert devices.candidates("chat", igpu_only, None) == ["GPU", "CPU"]


def test_engine_kind_and_properties_per_device(tmp_path: Path):
    from ovms_plugin import kinds
    from ovms_plugin.settings import ModelSettings
    llm = kinds.for_task("text-generation")
    assert llm.engine_for("NPU", ModelSettings()).name == "llm_stateful"
    assert llm.engine_for("GPU.1", ModelSettings()).name == "llm"
    assert devices.compile_properties("NPU", "text-generation", tmp_path) == {
        "CACHE_DIR": str(tmp_path), "MAX_PROMPT_LEN": 1024, "MIN_RESPONSE_LEN": 128}
    assert devices.compile_properties("NPU", "text-generation", tmp_path,
                                      {"npu_max_prompt_len": 4096})["MAX_PROMPT_LEN"] == 4096
    assert devices.compile_properties("GPU.1", "text-generation", tmp_path) == {
        "CACHE_DIR": str(tmp_path), "KV_CACHE_PRECISION": "f16"}
    assert devices.compile_properties("GPU.0", "feature-extraction", tmp_path) == {
        "CACHE_DIR": str(tmp_path)}
    assert devices.compile_properties("CPU", "text-generation", tmp_path) == {}
    # Small LLMs compute in f32 on CPU (faster than bf16 there); big ones keep the default.
    assert devices.compile_properties("CPU", "text-generation", tmp_path,
                                      model_bytes=100 * 2**20) == {
        "INFERENCE_PRECISION_HINT": "f32"}
    assert devices.compile_properties("CPU", "text-generation", tmp_path,
                                      model_bytes=4 * 2**30) == {}
    assert devices.compile_properties("GPU", "text-generation", tmp_path, cache_mode="never",
                                      model_bytes=100 * 2**20) == {"KV_CACHE_PRECISION": "f16"}
    assert devices.compile_properties("CPU", "text-generation", tmp_path,
                                      cache_mode="always") == {"CACHE_DIR": str(tmp_path)}
    assert devices.compile_properties("GPU", "text-to-image", tmp_path,
                                      cache_mode="never") == {}


def test_discovery_and_the_devices_command():
    found = devices.discover()
    assert any(d.name == "CPU" and d.full_name for d in found)
    r = subprocess.run([sys.executable, "-m", "ovms_plugin", "devices", "--json"],
                       capture_output=True, text=True, timeout=60)
    out = json.loads(r.stdout)
    cpu = next(d for d in out["devices"] if d["name"] == "CPU")
    assert "FP32" in cpu["precisions"] and "chat" in cpu["services"]
    assert out["routing"]["chat"][-1] == "CPU"


def test_prune_cache_keeps_the_newest(tmp_path: Path):
    for i, size in enumerate((300, 300, 300)):
        f = tmp_path / f"{i}.blob"
        f.write_bytes(b"x" * size)
        os.utime(f, (1000 + i, 1000 + i))
    removed = devices.prune_cache(tmp_path, 650)
    assert [p.name for p in removed] == ["0.blob"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1.blob", "2.blob"]


# --- the runtime, in process, on this machine -------------------------------------------

@pytest.fixture
def home(tmp_path: Path, plugin_home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A plugin home with two copies of the tiny chat model, whose settings each test
    writes."""
    (tmp_path / "models").mkdir()
    for name in ("chat-a", "chat-b"):
        shutil.copytree(plugin_home / "models" / CHAT, tmp_path / "models" / name)
        (tmp_path / "models" / name / "ovms-manifest.json").unlink()
    monkeypatch.setenv("OVMS_PLUGIN_HOME", str(tmp_path))
    return tmp_path


def settings(home: Path, data: dict) -> None:
    (home / "settings.yaml").write_text(yaml.safe_dump(data))


def run(coro):
    return asyncio.run(coro)


async def _chat(rt: Runtime, model: str, content: str = "hi", **kw) -> text.TextDelta:
    choices, prompt_tokens, completion_tokens = await text.collect(generation.generate(
        rt, text.parse("chat", {"model": model,
                                "messages": [{"role": "user", "content": content}], **kw})))
    choices[0].prompt_tokens, choices[0].completion_tokens = prompt_tokens, completion_tokens
    return choices[0]


def test_fallback_to_the_next_device(home: Path):
    """A device that cannot compile (this machine has no GPU plugin to speak of) makes the
    model start on the next, and the details say why."""
    settings(home, {"models": {"chat-a": {"scheduler": {"cache_size": 1}}}})

    async def go():
        rt = Runtime(ModelStore(home / "models"))
        rt._found_devices = [Device("GPU.0", kind="integrated"), Device("CPU")]
        try:
            lm = await rt.load("chat-a")
            assert lm.client.info["device"] == "CPU"
            assert lm.fallbacks and lm.fallbacks[0].startswith("GPU.0: ")
            [details] = [m["details"] for m in await rt.running()]
            assert details["device"] == "CPU" and details["fallbacks"] == lm.fallbacks
            assert (await _chat(rt, "chat-a", max_tokens=4)).completion_tokens > 0
        finally:
            await rt.unload_all()

    run(go())


def test_stateful_path_one_request_at_a_time(home: Path):
    """The NPU's engine (LLMPipeline, stateful), on the CPU: same answers as continuous
    batching, requests queued behind each other, long prompts refused."""
    f32 = {"INFERENCE_PRECISION_HINT": "f32"}
    settings(home, {"models": {
        "chat-a": {"engine": "stateful", "properties": f32, "llm": {"max_prompt_len": 64}},
        "chat-b": {"properties": f32, "scheduler": {"cache_size": 1}}}})

    async def go():
        rt = Runtime(ModelStore(home / "models"))
        try:
            lm = await rt.load("chat-a")
            assert lm.client.kind == "llm_stateful" and lm.max_prompt == 64
            prompts = [f"question {i}" for i in range(3)]
            stateful = await asyncio.gather(*(
                _chat(rt, "chat-a", p, max_tokens=12, temperature=0) for p in prompts))
            batched = await asyncio.gather(*(
                _chat(rt, "chat-b", p, max_tokens=12, temperature=0) for p in prompts))
            assert [d.text for d in stateful] == [d.text for d in batched]
            metrics = await lm.client.metrics()
            assert metrics["requests_total"] == 3
            # /metrics exports the stateful engine like the batching one.
            from ovms_plugin.http.metrics import Exposition
            from ovms_plugin.http.ops import export_models
            exposition = Exposition()
            export_models(exposition, await rt.running())
            assert any(name.endswith("llm_requests_total") for name in exposition.families)
            with pytest.raises(ServiceError, match="prompt limit of 64 tokens"):
                await _chat(rt, "chat-a", "word " * 100)
        finally:
            await rt.unload_all()

    run(go())


def test_budget_unloads_the_least_recently_used(home: Path, monkeypatch: pytest.MonkeyPatch):
    # Each tiny model with a 1 GB KV cache needs about 1 GB: room for one, not two.
    monkeypatch.setenv("OVMS_PLUGIN_MEMORY_BUDGET", "1.5GB")
    settings(home, {"scheduler": {"cache_size": 1}})

    async def go():
        rt = Runtime(ModelStore(home / "models"))
        try:
            await rt.load("chat-a")
            await rt.load("chat-b")  # chat-a is idle: it makes room
            assert list(rt.models) == ["chat-b"]
            # A busy model is never unloaded for another: the load is refused instead.
            stream = generation.generate(rt, text.parse("chat", {
                "model": "chat-b", "max_tokens": 1500, "ignore_eos": True,
                "messages": [{"role": "user", "content": "go"}]}))
            await stream.__anext__()
            with pytest.raises(ServiceError, match=r"not enough memory to load model "
                                                   r"'chat-a': needs about 1\.00 GB"):
                await rt.load("chat-a")
            await stream.aclose()
        finally:
            await rt.unload_all()

    run(go())


def test_compiled_blob_cache(home: Path):
    """With the cache on, a load leaves compiled blobs that the next load reads back. (On
    CPU, OpenVINO 2026.4 rewrites the continuous-batching LLM's blob on every load, so this
    uses an embedding model; GPU and NPU, where compiling is slow, are cached by default.)"""
    from ovms_plugin import devmodels
    embed = devmodels.ensure_models(devmodels.default_cache_dir(), ["tiny-embed"])["tiny-embed"]
    shutil.copytree(embed, home / "models" / "emb")
    settings(home, {"compile_cache": "always"})

    async def go():
        rt = Runtime(ModelStore(home / "models"))
        try:
            await rt.load("emb")
        finally:
            await rt.unload_all()

    run(go())
    blobs = list((home / "cache").glob("*.blob"))
    assert blobs
    stamp = {b: b.stat().st_mtime for b in blobs}
    run(go())
    assert {b: b.stat().st_mtime for b in (home / "cache").glob("*.blob")} == stamp


def test_idle_unload(home: Path):
    settings(home, {"scheduler": {"cache_size": 1}})

    async def go():
        rt = Runtime(ModelStore(home / "models"))
        try:
            await rt.load("chat-a")
            await rt.load("chat-b")
            rt.models["chat-a"].last_used -= 100
            assert await rt.unload_idle(50) == ["chat-a"]
            assert list(rt.models) == ["chat-b"]
        finally:
            await rt.unload_all()

    run(go())


def test_static_shape_embeddings_match_dynamic(home: Path):
    """The NPU's embedding mode on the CPU: fixed batches of max_length tokens, short
    batches filled with placeholders; same vectors as dynamic shapes."""
    import numpy as np

    from ovms_plugin import devmodels
    from ovms_plugin.kinds import embed as embed_kind
    from ovms_plugin.service import embed, jsonenc
    src = devmodels.ensure_models(devmodels.default_cache_dir(), ["tiny-embed"])["tiny-embed"]
    for name in ("static", "dynamic"):
        shutil.copytree(src, home / "models" / name)
    f32 = {"INFERENCE_PRECISION_HINT": "f32"}
    settings(home, {"models": {
        "static": {"properties": f32, "embed": {"static_shapes": True, "max_batch_size": 4,
                                                "max_length": 64}},
        "dynamic": {"properties": f32}}})
    texts = ["short", "a somewhat longer sentence about local inference", "émoji 🙂",
             "x y z", "five", "six and the last one"]

    async def go():
        rt = Runtime(ModelStore(home / "models"))
        try:
            out = {}
            for name in ("static", "dynamic"):
                r = await embed_kind.run(rt, embed.parse_embed({"model": name, "input": texts}))
                r = json.loads(jsonenc.dumps(r))  # as clients get it
                out[name] = np.asarray([d["embedding"] for d in r["data"]])
            assert rt.models["static"].client.info["static_shapes"] is True
            metrics = await rt.models["static"].client.metrics()
            sizes = metrics["batch_sizes"]  # real sizes; each batch padded to 4
            assert sum(k * n for k, n in sizes.items()) == len(texts)
            assert max(sizes) <= 4 and min(sizes) < 4
            return out
        finally:
            await rt.unload_all()

    out = run(go())
    assert np.allclose(out["static"], out["dynamic"], atol=1e-4)


def test_static_shape_images(home: Path):
    from ovms_plugin import devmodels
    from ovms_plugin.kinds import image as image_kind
    from ovms_plugin.service import image
    src = devmodels.ensure_models(devmodels.default_cache_dir(), ["tiny-sd"])["tiny-sd"]
    shutil.copytree(src, home / "models" / "sd")
    settings(home, {"models": {"sd": {"image": {"static_size": "64x64"}}}})

    async def go():
        rt = Runtime(ModelStore(home / "models"))
        try:
            async def one(**kw):
                req = image.parse({"model": "sd", "prompt": "a cat",
                                   "num_inference_steps": 2, **kw})
                return [data async for kind, data in image_kind.run(rt, req) if kind == "images"]
            [[png]] = await one(size="64x64")
            assert png[:8] == b"\x89PNG\r\n\x1a\n"
            with pytest.raises(ServiceError, match=r"static shapes: only 64x64, n=1"):
                await one(size="128x64")
        finally:
            await rt.unload_all()

    run(go())
