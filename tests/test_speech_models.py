"""The tiny Whisper test model (devmodels' recipe): its offline tokenizer and generation
config agree the way transformers and GenAI read them. The models running, in the plugin
and beside it in GenAI directly, are tests/test_speech.py's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ovms_plugin import devmodels


@pytest.fixture(scope="module")
def speech_models() -> dict[str, Path]:
    return devmodels.ensure_models(devmodels.default_cache_dir(), [devmodels.TINY_WHISPER_HF])


def test_whisper_tokenizer_and_generation_config_agree(speech_models: dict[str, Path]) -> None:
    from transformers import AutoTokenizer

    src = speech_models[devmodels.TINY_WHISPER_HF]
    tokenizer = AutoTokenizer.from_pretrained(src)
    gen = json.loads((src / "generation_config.json").read_text())
    config = json.loads((src / "config.json").read_text())
    assert config["vocab_size"] == len(tokenizer)
    ids = tokenizer.convert_tokens_to_ids
    assert gen["decoder_start_token_id"] == ids("<|startoftranscript|>")
    assert gen["eos_token_id"] == ids("<|endoftext|>") == tokenizer.eos_token_id
    assert gen["no_timestamps_token_id"] == ids("<|notimestamps|>")
    assert gen["task_to_id"] == {"transcribe": ids("<|transcribe|>"),
                                 "translate": ids("<|translate|>")}
    for lang in ("en", "zh", "de", "fr", "ja"):
        assert gen["lang_to_id"][f"<|{lang}|>"] == ids(f"<|{lang}|>")
    # transformers' rule: timestamps are the ids right after the last special token.
    assert tokenizer.all_special_ids[-1] == ids("<|notimestamps|>")
    assert ids("<|0.00|>") == ids("<|notimestamps|>") + 1
    assert ids("<|30.00|>") == ids("<|0.00|>") + 1500 == len(tokenizer) - 1
    # The prefix transformers builds for a language and task.
    tokenizer.set_prefix_tokens(language="french", task="translate", predict_timestamps=False)
    assert tokenizer.prefix_tokens == [ids("<|startoftranscript|>"), ids("<|fr|>"),
                                       ids("<|translate|>"), ids("<|notimestamps|>")]
