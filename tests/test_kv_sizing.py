"""The LLM KV cache sized from the model (kinds/llm_kv.py): bytes per token from
config.json, context × parallel within the memory left, the context served, and the
engine's own allocation agreeing with the plan on the real SmolLM2."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import REAL

from ovms_plugin import settings
from ovms_plugin.kinds import llm_kv
from ovms_plugin.service import generation, text
from ovms_plugin.service.errors import ServiceError
from ovms_plugin.service.runtime import Runtime
from ovms_plugin.store.store import ModelStore

SMOLLM2 = {"num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
           "hidden_size": 576, "max_position_embeddings": 8192}
GB = 2**30


def folder(tmp_path: Path, config: dict) -> Path:
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


def test_bytes_per_token_from_the_shape(tmp_path: Path):
    m = folder(tmp_path, SMOLLM2)
    # keys and values, 30 layers × 3 KV heads × 64-wide heads, 8-bit with scales (CPU)
    assert llm_kv.plan(m, "CPU", {}, context=None, parallel=4, room_bytes=8 * GB) == \
        llm_kv.KVPlan(13680, 8192, 4, 32768, 1024, "u8")
    f16 = llm_kv.plan(m, "CPU", {"KV_CACHE_PRECISION": "f16"}, context=2048, parallel=2,
                      room_bytes=8 * GB)
    assert (f16.bytes_per_token, f16.tokens, f16.blocks) == (23040, 4096, 128)
    gpu = llm_kv.plan(m, "GPU", {}, context=None, parallel=1, room_bytes=8 * GB)
    assert (gpu.precision, gpu.blocks) == ("f16", 512)  # 16-token blocks there
    gqa = {**SMOLLM2, "head_dim": 128, "num_key_value_heads": None}  # no GQA: all heads
    assert llm_kv.plan(folder(tmp_path, gqa), "CPU", {"KV_CACHE_PRECISION": "f32"},
                       context=None, parallel=1, room_bytes=8 * GB).bytes_per_token == \
        30 * 9 * 2 * 128 * 4


def test_memory_bounds_the_pool_then_the_context(tmp_path: Path):
    m = folder(tmp_path, SMOLLM2)
    two = llm_kv.plan(m, "CPU", {}, context=None, parallel=4, room_bytes=2 * 8192 * 13680
                      + 1000)
    assert (two.context_length, two.parallel, two.tokens) == (8192, 2, 16384)
    small = llm_kv.plan(m, "CPU", {}, context=None, parallel=4, room_bytes=1000 * 13680)
    assert (small.context_length, small.parallel, small.tokens) == (992, 1, 992)
    with pytest.raises(llm_kv.KVSizeError, match="fewer than 256 tokens"):
        llm_kv.plan(m, "CPU", {}, context=None, parallel=1, room_bytes=100 * 13680)


def test_refusals_name_what_is_wrong(tmp_path: Path):
    m = folder(tmp_path, SMOLLM2)
    with pytest.raises(llm_kv.KVSizeError, match="context_length 16384 is more than the 8192"):
        llm_kv.plan(m, "CPU", {}, context=16384, parallel=1, room_bytes=8 * GB)
    with pytest.raises(llm_kv.KVSizeError, match="KV_CACHE_PRECISION 'f8'"):
        llm_kv.plan(m, "CPU", {"KV_CACHE_PRECISION": "f8"}, context=None, parallel=1,
                    room_bytes=8 * GB)
    for bad in ({}, {**SMOLLM2, "num_hidden_layers": "30"}, [1, 2]):
        (tmp_path / "config.json").write_text(json.dumps(bad))
        assert llm_kv.plan(m, "CPU", {}, context=None, parallel=1, room_bytes=GB) is None
    with pytest.raises(settings.SettingsError, match="parallel"):
        settings._settings({"llm": {"parallel": 0}})


@pytest.fixture
def home(tmp_path: Path, plugin_home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    shutil.copytree(plugin_home / "models" / REAL, tmp_path / "models" / REAL)
    monkeypatch.setenv("OVMS_PLUGIN_HOME", str(tmp_path))
    return tmp_path


async def _chat(rt: Runtime, content: str, max_tokens: int = 8) -> text.TextDelta:
    choices, *_ = await text.collect(generation.generate(rt, text.parse("chat", {
        "model": REAL, "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens, "temperature": 0})))
    return choices[0]


def test_the_engine_allocates_what_the_plan_says(home: Path):
    """Default settings (no cache_size): the engine's KV cache is exactly the plan's, the
    details report it, and the context served is the one it was sized for."""
    (home / "settings.yaml").write_text(yaml.safe_dump(
        {"models": {REAL: {"llm": {"context_length": 512, "parallel": 3}}}}))

    async def go():
        rt = Runtime(ModelStore(home / "models"))
        try:
            lm = await rt.load(REAL)
            kv = rt.placement(REAL)["kv_cache"]
            assert kv == {"bytes_per_token": 13680, "context_length": 512, "parallel": 3,
                          "tokens": 1536, "blocks": 48, "precision": "u8",
                          "bytes": 1536 * 13680}
            assert lm.context == 512
            assert (await _chat(rt, "Say hi.")).text
            m = await lm.client.metrics(timeout=10)
            assert m["kv_cache_bytes"] == kv["bytes"]
            assert m["worker_rss_bytes"] > lm.entry.size  # the weights, at least
            [item] = await rt.running()
            assert item["details"]["kv_cache"] == kv
            with pytest.raises(ServiceError, match="context of 512 tokens"):
                await _chat(rt, "word " * 600)
        finally:
            await rt.unload_all()

    asyncio.run(go())


def test_a_context_over_the_models_refuses_the_load(home: Path):
    (home / "settings.yaml").write_text(yaml.safe_dump(
        {"models": {REAL: {"llm": {"context_length": 100000}}}}))

    async def go():
        rt = Runtime(ModelStore(home / "models"))
        try:
            with pytest.raises(ServiceError, match="context_length 100000 is more than"):
                await rt.load(REAL)
        finally:
            await rt.unload_all()

    asyncio.run(go())


def test_options_that_would_be_ignored_are_refused(home: Path):
    """llm.parallel beside a cache size set outright, and prompt-lookup tuning with prompt
    lookup off, would change nothing: the load is refused, naming them."""
    async def go():
        rt = Runtime(ModelStore(home / "models"))
        try:
            for section, why in (
                    ({"scheduler": {"cache_size": 1}, "llm": {"parallel": 2}},
                     "llm.parallel sizes the KV cache"),
                    ({"llm": {"prompt_lookup_tokens": 3}}, "tune prompt lookup, which is off")):
                (home / "settings.yaml").write_text(yaml.safe_dump({"models": {REAL: section}}))
                settings.reload()
                with pytest.raises(ServiceError, match=why):
                    await rt.load(REAL)
        finally:
            await rt.unload_all()

    asyncio.run(go())
