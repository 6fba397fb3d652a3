"""Prompt-lookup decoding (llm.prompt_lookup) on the real SmolLM2: greedy answers are the
same as without it, a request may tune it, and what it cannot do is refused by name."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import REAL

from ovms_plugin.service import generation, text
from ovms_plugin.service.errors import ServiceError
from ovms_plugin.service.runtime import Runtime
from ovms_plugin.store.store import ModelStore

LOOKUP, PLAIN, STATEFUL = "smol-lookup", "smol-plain", "smol-stateful"
TEXT = ("The plugin loads OpenVINO models in the same process and serves chat, embeddings "
        "and images. A model manager pulls models from a hub, converts them and installs "
        "them atomically.")
COPY = f"Repeat this text exactly, word for word:\n\n{TEXT}"


@pytest.fixture
def home(tmp_path: Path, plugin_home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in (LOOKUP, PLAIN, STATEFUL):
        shutil.copytree(plugin_home / "models" / REAL, tmp_path / "models" / name)
        (tmp_path / "models" / name / "ovms-manifest.json").unlink(missing_ok=True)
    exact = {"properties": {"INFERENCE_PRECISION_HINT": "f32"}}
    (tmp_path / "settings.yaml").write_text(yaml.safe_dump({"models": {
        LOOKUP: {**exact, "llm": {"prompt_lookup": True, "prompt_lookup_tokens": 4}},
        PLAIN: exact,
        STATEFUL: {**exact, "engine": "stateful", "llm": {"prompt_lookup": True}}}}))
    monkeypatch.setenv("OVMS_PLUGIN_HOME", str(tmp_path))
    return tmp_path


async def _chat(rt: Runtime, model: str, content: str = COPY, **kw) -> text.TextDelta:
    choices, *_ = await text.collect(generation.generate(rt, text.parse("chat", {
        "model": model, "messages": [{"role": "user", "content": content}],
        "max_tokens": 48, "temperature": 0, **kw})))
    return choices[0]


def test_greedy_answers_are_unchanged_and_requests_may_tune_it(home: Path):
    async def go():
        rt = Runtime(ModelStore(home / "models"))
        try:
            plain = await _chat(rt, PLAIN)
            assert plain.text.startswith("The plugin loads OpenVINO models in the same process")
            assert (await _chat(rt, LOOKUP)).text == plain.text
            tuned = await _chat(rt, LOOKUP, num_assistant_tokens=2, max_ngram_size=2)
            assert tuned.text == plain.text
            info = rt.models[LOOKUP].client.info
            assert info["prompt_lookup"] == {"num_assistant_tokens": 4, "max_ngram_size": 3}
            with pytest.raises(ServiceError, match=r"'n' above 1 .* prompt lookup"):
                await _chat(rt, LOOKUP, n=2, temperature=0.7)
            with pytest.raises(ServiceError, match=r"'num_assistant_tokens' is for "
                               r"speculative decoding \(prompt lookup or a draft model\), "
                               "which model 'smol-plain' is not"):
                await _chat(rt, PLAIN, num_assistant_tokens=3)
            with pytest.raises(ServiceError, match="'max_ngram_size' must be from 1 to 64"):
                await _chat(rt, LOOKUP, max_ngram_size=0)
            with pytest.raises(ServiceError, match="'assistant_confidence_threshold' is for "
                               "decoding with a draft model, which model 'smol-lookup'"):
                await _chat(rt, LOOKUP, assistant_confidence_threshold=0.5)
            with pytest.raises(ServiceError, match="prompt_lookup is not available on the "
                               "stateful engine"):
                await rt.load(STATEFUL)
        finally:
            await rt.unload_all()

    asyncio.run(go())
