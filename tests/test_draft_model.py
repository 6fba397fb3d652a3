"""Speculative decoding with a draft model (llm.draft_model) on the tiny chat model: greedy
answers are the model's own whether the draft agrees or not, a request may tune it, and
what cannot work is refused by name (in the settings, at load, per request)."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import CHAT, REAL

from ovms_plugin import settings
from ovms_plugin.engine.llm import check_draft_tokenizer
from ovms_plugin.kinds.llm import LLMOptions
from ovms_plugin.service import generation, text
from ovms_plugin.service.errors import ServiceError
from ovms_plugin.service.runtime import Runtime
from ovms_plugin.store.store import ModelStore

MAIN, PLAIN, DRAFT, WIDE = "tiny-main", "tiny-plain", "tiny-draft", "tiny-wide-vocab"
EXACT = {"properties": {"INFERENCE_PRECISION_HINT": "f32"}}
PROMPT = "Tell me about the plugin and its models, please."


def _perturb(folder: Path, seed: int = 7) -> None:
    """Noise on the layers' f32 weight matrices (not the embedding): a draft that agrees
    with the model on some tokens and not on others."""
    xml = (folder / "openvino_model.xml").read_text()
    data = bytearray((folder / "openvino_model.bin").read_bytes())
    rng = np.random.default_rng(seed)
    pattern = r'element_type="f32" shape="(\d+), (\d+)" offset="(\d+)" size="(\d+)"'
    for rows, cols, offset, size in re.findall(pattern, xml):
        if int(rows) * int(cols) * 4 != int(size) or int(rows) > 1024:
            continue
        w = np.frombuffer(data, np.float32, int(rows) * int(cols), int(offset)).copy()
        w += rng.normal(0, 0.6 * float(w.std()), w.shape).astype(np.float32)
        data[int(offset):int(offset) + int(size)] = w.tobytes()
    (folder / "openvino_model.bin").write_bytes(bytes(data))


@pytest.fixture
def home(tmp_path: Path, plugin_home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    models = tmp_path / "models"
    for name in (MAIN, PLAIN, DRAFT, WIDE):
        shutil.copytree(plugin_home / "models" / CHAT, models / name)
        (models / name / "ovms-manifest.json").unlink(missing_ok=True)
    _perturb(models / DRAFT)
    config = json.loads((models / WIDE / "config.json").read_text())
    (models / WIDE / "config.json").write_text(json.dumps({**config, "vocab_size": 8192}))
    (models / "an-embedder").mkdir()  # only its manifest: never loaded
    (models / "an-embedder" / "ovms-manifest.json").write_text(json.dumps(
        {"format": "openvino", "task": "feature-extraction", "files": []}))
    _settings(tmp_path, {MAIN: {**EXACT, "llm": {"draft_model": DRAFT, "draft_tokens": 3}},
                         PLAIN: EXACT, DRAFT: EXACT})
    monkeypatch.setenv("OVMS_PLUGIN_HOME", str(tmp_path))
    settings.reload()
    return tmp_path


def _settings(home: Path, models: dict) -> None:
    (home / "settings.yaml").write_text(yaml.safe_dump({"models": models}))
    settings.reload()


async def _chat(rt: Runtime, model: str, **kw) -> text.TextDelta:
    choices, *_ = await text.collect(generation.generate(rt, text.parse("chat", {
        "model": model, "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": 40, "temperature": 0, "ignore_eos": True, **kw})))
    return choices[0]


def test_greedy_answers_are_the_models_and_requests_may_tune_the_draft(home: Path):
    async def go():
        rt = Runtime(ModelStore(home / "models"))
        try:
            plain = (await _chat(rt, PLAIN)).text
            assert (await _chat(rt, DRAFT)).text != plain  # the draft is wrong at times
            assert (await _chat(rt, MAIN)).text == plain
            assert (await _chat(rt, MAIN, num_assistant_tokens=1)).text == plain
            assert (await _chat(rt, MAIN, assistant_confidence_threshold=0.2)).text == plain
            lm = rt.models[MAIN]
            assert lm.client.info["draft"] == {"model": DRAFT, "device": "CPU",
                                               "num_assistant_tokens": 3}
            draft = lm.client.config["speculative"]["draft"]
            kv = lm.client.config["kv"]
            # The draft's cache has as many blocks as the model's; same shape, same bytes.
            assert draft["kv_bytes"] == kv["bytes"] > 0
            assert lm.memory_bytes >= kv["bytes"] + draft["kv_bytes"] + draft["weights_bytes"]
            with pytest.raises(ServiceError, match=r"'n' above 1 .* a draft model"):
                await _chat(rt, MAIN, n=2, temperature=0.7)
            with pytest.raises(ServiceError, match="'max_ngram_size' is for prompt-lookup "
                               "decoding, which model 'tiny-main' is not set up for"):
                await _chat(rt, MAIN, max_ngram_size=2)
            with pytest.raises(ServiceError, match="'assistant_confidence_threshold' is for "
                               "decoding with a draft model, which model 'tiny-plain'"):
                await _chat(rt, PLAIN, assistant_confidence_threshold=0.5)
            with pytest.raises(ServiceError, match="exclude each other"):
                await _chat(rt, MAIN, num_assistant_tokens=2,
                            assistant_confidence_threshold=0.5)
            with pytest.raises(ServiceError, match="must be greater than 0"):
                await _chat(rt, MAIN, assistant_confidence_threshold=0)
        finally:
            await rt.unload_all()

    asyncio.run(go())


def test_drafts_that_cannot_work_are_refused_by_name(home: Path):
    llm = {"llm": {"draft_model": DRAFT}}
    cases = [
        ({"llm": {"draft_model": "nope"}}, "llm.draft_model 'nope' is not an installed model; "
         "installed LLMs: tiny-draft, tiny-plain, tiny-wide-vocab"),
        ({"llm": {"draft_model": "an-embedder"}}, "'an-embedder' is a feature-extraction "
         "model; a draft must be a text LLM"),
        ({"llm": {"draft_model": MAIN}}, "names the model itself"),
        ({"llm": {"draft_model": DRAFT, "prompt_lookup": True}},
         "llm.prompt_lookup and llm.draft_model are two kinds"),
        ({"llm": {"draft_tokens": 2}}, "llm.draft_tokens tunes the draft model, which is not "
         "set"),
        ({"llm": {**llm["llm"], "draft_tokens": 2, "draft_confidence_threshold": 0.4}},
         "exclude each other"),
        ({"engine": "stateful", **llm}, "llm.draft_model is not available on the stateful"),
        # At load: a vocabulary the model does not have (config.json's vocab_size).
        ({"llm": {"draft_model": WIDE}}, "has a vocabulary of 8192 tokens, more than the "
         "model's 4096"),
    ]

    async def go():
        rt = Runtime(ModelStore(home / "models"))
        try:
            for section, why in cases:
                _settings(home, {MAIN: section})
                with pytest.raises(ServiceError, match=re.escape(why)):
                    await rt.load(MAIN)
        finally:
            await rt.unload_all()

    asyncio.run(go())
    with pytest.raises(settings.SettingsError, match=re.escape(
            "llm.draft_confidence_threshold must be a number above 0 and at most 1")):
        settings.parse_keys(LLMOptions, {"draft_confidence_threshold": 1.5}, "llm")


def test_a_draft_with_another_tokenizer_is_refused_before_genai_is_asked(tmp_path: Path,
                                                                         plugin_home: Path):
    """GenAI's own check compares the length of one sentence's ids and the special tokens;
    the engine compares the ids of several texts, and says which."""
    with pytest.raises(ValueError, match="draft model 'smollm2' has another tokenizer"):
        check_draft_tokenizer(plugin_home / "models" / CHAT, plugin_home / "models" / REAL,
                              "smollm2")
    check_draft_tokenizer(plugin_home / "models" / CHAT, plugin_home / "models" / CHAT, "same")
