"""The tiny speech test models (devmodels' Whisper and SpeechT5 recipes) load and run in
OpenVINO GenAI: WhisperPipeline (speech to text) and Text2SpeechPipeline (text to speech).
Random weights: the text and audio are garbage, only shapes and behaviour are checked."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ovms_plugin import devmodels

openvino = pytest.importorskip("openvino")
ov_genai = pytest.importorskip("openvino_genai")

RATE = 16000  # Whisper's input and SpeechT5's output sample rate


@pytest.fixture(scope="module")
def speech_models() -> dict[str, Path]:
    """The speech models, built once into the cache the other tests' models live in."""
    return devmodels.ensure_models(
        devmodels.default_cache_dir(),
        [devmodels.TINY_WHISPER_HF, devmodels.TINY_WHISPER, devmodels.TINY_SPEECHT5],
    )


@pytest.fixture(scope="module")
def whisper(speech_models: dict[str, Path]):
    return ov_genai.WhisperPipeline(speech_models[devmodels.TINY_WHISPER], "CPU")


@pytest.fixture(scope="module")
def tts(speech_models: dict[str, Path]):
    return ov_genai.Text2SpeechPipeline(speech_models[devmodels.TINY_SPEECHT5], "CPU")


def _signal(seconds: float) -> list[float]:
    """A 440 Hz tone with a little noise, float32 in [-1, 1] at 16 kHz (deterministic)."""
    t = np.arange(int(RATE * seconds)) / RATE
    noise = np.random.default_rng(0).standard_normal(t.size)
    return (0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * noise).astype(np.float32).tolist()


def _speaker() -> object:
    return openvino.Tensor(np.random.default_rng(1).standard_normal((1, 512)).astype(np.float32))


# --- the recipes ------------------------------------------------------------------------------


def test_ir_folders_have_what_genai_loads(speech_models: dict[str, Path]) -> None:
    common = {"openvino_encoder_model.xml", "openvino_decoder_model.xml",
              "openvino_tokenizer.xml", "openvino_detokenizer.xml", "config.json"}
    whisper_files = {p.name for p in speech_models[devmodels.TINY_WHISPER].iterdir()}
    assert common | {"generation_config.json", "preprocessor_config.json"} <= whisper_files
    tts_files = {p.name for p in speech_models[devmodels.TINY_SPEECHT5].iterdir()}
    assert common | {"openvino_postnet.xml", "openvino_vocoder.xml"} <= tts_files


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


# --- WhisperPipeline --------------------------------------------------------------------------


def test_whisper_transcribes_short_audio(whisper) -> None:
    result = whisper.generate(_signal(3), max_new_tokens=20)
    assert type(result).__name__ == "WhisperDecodedResults"  # not exported at the top level
    assert len(result.texts) == 1 and isinstance(result.texts[0], str)
    assert len(result.scores) == 1
    assert result.chunks is None  # only with return_timestamps=True
    assert isinstance(result.language, str) and result.language  # detected, e.g. "en"


def test_whisper_timestamps_give_chunks(whisper) -> None:
    result = whisper.generate(_signal(3), return_timestamps=True, max_new_tokens=20)
    assert result.chunks
    for chunk in result.chunks:
        assert isinstance(chunk.text, str)
        # Random weights: the timestamps need not stay within the 3 s of audio.
        assert 0.0 <= chunk.start_ts <= chunk.end_ts


def test_whisper_language_and_task(whisper) -> None:
    result = whisper.generate(_signal(3), language="<|en|>", task="translate", max_new_tokens=8)
    assert len(result.texts) == 1
    assert result.language == "en"  # forced: reported without the brackets
    assert whisper.generate(_signal(3), language="zh", max_new_tokens=8).language == "zh"
    with pytest.raises(RuntimeError, match="lang_to_id"):
        whisper.generate(_signal(3), language="<|xx|>", max_new_tokens=8)


def test_whisper_long_form(whisper) -> None:
    """Over 30 s GenAI decodes consecutive 30 s windows, with or without timestamps."""
    plain = whisper.generate(_signal(45), max_new_tokens=10)
    assert len(plain.texts) == 1 and plain.chunks is None
    timed = whisper.generate(_signal(45), return_timestamps=True, max_new_tokens=10)
    assert timed.chunks
    assert max(c.end_ts for c in timed.chunks) > 30.0  # the second window's chunks
    starts = [c.start_ts for c in timed.chunks]
    assert starts == sorted(starts)


# --- Text2SpeechPipeline ----------------------------------------------------------------------


def test_tts_speaks(tts) -> None:
    result = tts.generate("hello world", _speaker())
    assert isinstance(result, ov_genai.Text2SpeechDecodedResults)
    assert result.output_sample_rate == RATE
    assert len(result.speeches) == 1
    speech = result.speeches[0]
    assert speech.element_type == openvino.Type.f32
    assert speech.shape[0] == 1 and speech.shape[1] > 0
    assert np.isfinite(speech.data).all()


def test_tts_without_speaker_embedding(tts) -> None:
    """GenAI falls back to a built-in default speaker for SpeechT5."""
    speech = tts.generate("hello world").speeches[0]
    assert speech.shape[0] == 1 and speech.shape[1] > 0


def test_tts_length_follows_text_with_minlenratio(tts) -> None:
    """Random weights stop at once (about 512 samples whatever the text); minlenratio r with
    maxlenratio just above r makes decoding run exactly int(tokens * r / 2) steps of 2 mel
    frames of 256 samples, whatever the stop probability."""
    sizes = []
    for text in ("hi", "hello world", "hello world, this is a much longer sentence to speak"):
        speech = tts.generate(text, _speaker(), minlenratio=1.0, maxlenratio=1.001).speeches[0]
        sizes.append(speech.shape[1])
    assert sizes[0] < sizes[1] < sizes[2]
    assert all(size % 512 == 0 for size in sizes)
    # "hello world" is 13 tokens (a "▁" per word, 11 characters, </s>): 6 steps.
    assert sizes[1] == 6 * 2 * 256
