"""The speech services' parts that need no model: request parsing and its refusals,
languages, response shapes, the live stream's segmentation and audio input, and sentence
splitting for text-to-speech."""

from __future__ import annotations

import base64
import io
import json
import struct

import numpy as np
import pytest
import soundfile as sf

from ovms_plugin.engine.requests import TranscribeResult
from ovms_plugin.service import audio, speech, stt_stream, tts
from ovms_plugin.service.errors import ServiceError

RATE = 16000


def tone(seconds: float, amp: float = 0.3, freq: float = 440.0, rate: int = RATE) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def quiet(seconds: float, rate: int = RATE) -> np.ndarray:
    return np.zeros(int(seconds * rate), np.float32)


def wav_bytes(samples: np.ndarray, rate: int = RATE) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def refused(fn, *args, param: str | None = None, match: str = "", **kw) -> ServiceError:
    with pytest.raises(ServiceError) as e:
        fn(*args, **kw)
    assert match in e.value.message, e.value.message
    if param is not None:
        assert e.value.param == param
    return e.value


# --- speech-to-text requests ----------------------------------------------------------

def test_parse_takes_aog_and_openai_bodies(tmp_path):
    data = wav_bytes(tone(1))
    b64 = base64.b64encode(data).decode()
    assert speech.parse({"model": "m", "audio": b64}).data == data
    url = f"data:audio/wav;base64,{b64}"
    assert speech.parse({"model": "m", "audio": url}).data == data
    path = tmp_path / "a.wav"
    path.write_bytes(data)
    # A path is read only for AOG, whose clients pass one.
    assert speech.parse({"model": "m", "audio": str(path)}, allow_paths=True).data == data
    refused(speech.parse, {"model": "m", "audio": str(path)}, param="audio",
            match="neither base64")
    form = speech.parse({"model": "m", "file": data, "response_format": "srt",
                         "timestamp_granularities": ["segment"], "temperature": 0.2},
                        task="translate")
    assert (form.data, form.param, form.response_format, form.task, form.temperature) == \
        (data, "file", "srt", "translate", 0.2)


@pytest.mark.parametrize(("body", "param", "match"), [
    ({"audio": "x"}, "model", "'model' is required"),
    ({"model": "m"}, "audio", "'audio' is required"),
    ({"model": "m", "audio": "aGk=", "file": b"x"}, "audio", "send the audio once"),
    ({"model": "m", "file": "text"}, "file", "multipart"),
    ({"model": "m", "audio": "aGk=", "languge": "en"}, "languge", "did you mean 'language'"),
    ({"model": "m", "audio": "aGk=", "response_format": "csv"}, "response_format", "one of"),
    ({"model": "m", "audio": "aGk=", "temperature": 3}, "temperature", "from 0 to 1"),
    ({"model": "m", "audio": "aGk=", "timestamp_granularities": ["word"]},
     "timestamp_granularities", "word timestamps are not"),
    ({"model": "m", "audio": "aGk=", "task": "summarise"}, "task", "'transcribe' or"),
    ({"model": "m", "audio": "aGk=", "stream": True}, "stream", "speech-to-text-ws"),
    ({"model": "m", "audio": "%%% not base64 %%%"}, "audio", "neither"),
])
def test_parse_refuses_what_it_cannot_honour(body, param, match):
    refused(speech.parse, body, param=param, match=match)


def test_translation_route_refuses_the_other_task():
    refused(speech.parse, {"model": "m", "audio": "aGk=", "task": "transcribe"},
            task="translate", param="task")


def test_language_tokens():
    langs = ["<|de|>", "<|en|>", "<|zh|>"]
    assert speech.language_token("EN", langs, "transcribe", "m") == "<|en|>"
    assert speech.language_token("<|zh|>", langs, "transcribe", "m") == "<|zh|>"
    assert speech.language_token(None, langs, "transcribe", "m") is None
    assert speech.language_token("auto", langs, "translate", "m") is None
    refused(speech.language_token, "xx", langs, "transcribe", "m", param="language",
            match="de, en, zh")
    # An English-only model: English or nothing, and no translation.
    assert speech.language_token("en", [], "transcribe", "m") is None
    refused(speech.language_token, "de", [], "transcribe", "m", match="English-only")
    refused(speech.language_token, None, [], "translate", "m", param="task")


def test_response_shapes():
    r = TranscribeResult(" Hello there. General Kenobi.", [(0.0, 1.5, " Hello there."),
                                                           (1.5, 3.25, " General Kenobi.")],
                         "<|en|>", 3.3, 0.1)
    aog = speech.response(r, "aog", "transcribe")
    assert aog == {"text": "Hello there. General Kenobi.", "language": "en", "duration": 3.3,
                   "segments": [
                       {"id": 0, "start": "00:00:00.000", "end": "00:00:01.500",
                        "text": "Hello there."},
                       {"id": 1, "start": "00:00:01.500", "end": "00:00:03.250",
                        "text": "General Kenobi."}]}
    assert speech.response(r, "json", "transcribe") == {
        "text": "Hello there. General Kenobi.", "usage": {"type": "duration", "seconds": 3}}
    verbose = speech.response(r, "verbose_json", "translate")
    assert (verbose["task"], verbose["segments"][1]["end"]) == ("translate", 3.25)
    assert speech.response(r, "srt", "transcribe")["text"] == (
        "1\n00:00:00,000 --> 00:00:01,500\nHello there.\n\n"
        "2\n00:00:01,500 --> 00:00:03,250\nGeneral Kenobi.\n\n")
    assert speech.response(r, "vtt", "transcribe")["text"].startswith("WEBVTT\n\n00:00:00.000")
    assert speech.response(r, "text", "transcribe") == {
        "text": "Hello there. General Kenobi.", "format": "text"}
    # No segments from the model (timestamps off): the whole text is one.
    bare = TranscribeResult("Hi", [], None, 2.0, 0.1)
    assert speech.response(bare, "aog", "transcribe")["segments"] == [
        {"id": 0, "start": "00:00:00.000", "end": "00:00:02.000", "text": "Hi"}]


# --- the live stream ------------------------------------------------------------------

def feed_all(seg: stt_stream.Segmenter, samples: np.ndarray, chunk: int
             ) -> list[stt_stream.Sentence]:
    out = []
    for i in range(0, len(samples), chunk):
        out += seg.feed(samples[i:i + chunk])
    if (last := seg.flush()) is not None:
        out.append(last)
    return out


def test_voice_detection_cuts_sentences_at_pauses():
    signal = np.concatenate([quiet(1), tone(2), quiet(1), tone(1.5), quiet(0.3)])
    s = stt_stream.StreamSettings()
    for chunk in (160, 3333, 16000):  # the cut does not depend on how audio arrives
        got = feed_all(stt_stream.Segmenter(s, use_vad=True), signal, chunk)
        assert len(got) == 2, got
        first, second = got
        assert abs(first.start / RATE - 0.88) < 0.1 and abs(first.end / RATE - 3.18) < 0.1
        assert abs(second.start / RATE - 3.88) < 0.1
        assert second.end == len(signal)  # still open at the end: flushed
        assert all(s.final for s in got)


def test_silence_gives_no_sentence_and_long_speech_is_cut():
    s = stt_stream.StreamSettings(max_segment_seconds=4)
    assert feed_all(stt_stream.Segmenter(s, True), quiet(5), 1600) == []
    got = feed_all(stt_stream.Segmenter(s, True), tone(10), 1600)
    assert [round((x.end - x.start) / RATE) for x in got] == [4, 4, 2]


def test_fixed_windows_without_voice_detection():
    s = stt_stream.StreamSettings(window_seconds=2.4)  # 80 frames of 30 ms
    got = feed_all(stt_stream.Segmenter(s, use_vad=False), quiet(5), 1000)
    assert [(x.start, x.end) for x in got] == [(0, 38400), (38400, 76800), (76800, 80000)]


def test_segmenter_keeps_memory_bounded():
    seg = stt_stream.Segmenter(stt_stream.StreamSettings(), True)
    for _ in range(60):
        seg.feed(quiet(1))
        seg.trim()
    assert len(seg.audio) < 2 * RATE and seg.total == 60 * RATE


def test_audio_input_pcm_and_wav_streams():
    samples = tone(1.0, rate=8000)
    pcm = audio.pcm16(samples)
    whole = stt_stream.AudioInput("pcm", 8000)
    ref = np.concatenate([whole.feed(pcm), whole.flush()])
    assert abs(len(ref) - RATE) < 50
    chunked = stt_stream.AudioInput("pcm", 8000)
    got = [chunked.feed(pcm[i:i + 333]) for i in range(0, len(pcm), 333)] + [chunked.flush()]
    np.testing.assert_allclose(np.concatenate(got), ref, atol=1e-5)
    # A WAV stream: the header (split across chunks) says the rate, then PCM follows.
    wav = wav_bytes(samples, 8000)
    w = stt_stream.AudioInput("wav", RATE)
    got = [w.feed(wav[i:i + 7]) for i in range(0, 63, 7)] + [w.feed(wav[63:]), w.flush()]
    # (soundfile rounds to 16 bits a little differently from pcm16)
    np.testing.assert_allclose(np.concatenate(got), ref, atol=2e-4)
    # Chunks that are whole WAV files each.
    w = stt_stream.AudioInput("wav", RATE)
    half = len(samples) // 2
    got = [w.feed(wav_bytes(samples[:half], 8000)), w.feed(wav_bytes(samples[half:], 8000)),
           w.flush()]
    assert abs(sum(len(g) for g in got) - len(ref)) < 50


@pytest.mark.parametrize(("fmt", "data", "match"), [
    ("mp3", b"", "compressed formats"),
    ("wav", b"JUNKJUNKJUNKJUNK", "RIFF/WAVE header"),
    ("wav", b"RIFF\0\0\0\0WAVEfmt " + struct.pack("<IHHIIHH", 16, 3, 1, 16000, 64000, 4, 32)
     + b"data\0\0\0\0", "integer PCM"),
])
def test_audio_input_refusals(fmt, data, match):
    with pytest.raises(ServiceError) as e:
        stt_stream.AudioInput(fmt, RATE).feed(data)
    assert match in e.value.message


# --- text-to-speech -------------------------------------------------------------------

def test_sentences():
    assert tts.sentences("Hello there! How are you?\nFine.  Thanks") == [
        "Hello there!", "How are you?", "Fine.", "Thanks"]
    assert tts.sentences("你好。今天天气很好！") == ["你好。", "今天天气很好！"]
    long = ", ".join(["word " * 10] * 10)
    parts = tts.sentences(long)
    assert all(len(p) <= tts.SENTENCE_CHARS for p in parts) and len(parts) >= 2
    assert " ".join(parts).split() == long.split()
    refused(tts.sentences, "x" * 11, 10, param="input", match="over the limit of 10")
    refused(tts.sentences, " ... !!! ", param="input", match="no words")


def test_speech_request_refusals():
    assert tts.parse({"model": "m", "text": "hi"}).text == "hi"  # AOG's name for it
    req = tts.parse({"model": "m", "input": "hi", "voice": {"id": "v"}, "speed": 1.0,
                     "stream_format": "sse"})
    assert (req.voice, req.speed, req.stream, req.response_format) == ("v", 1.0, True, "wav")
    for body, param in [({"model": "m"}, "input"),
                        ({"model": "m", "input": "  "}, "input"),
                        ({"model": "m", "input": "a", "text": "b"}, "input"),
                        ({"model": "m", "input": "a", "response_format": "opus"},
                         "response_format"),
                        ({"model": "m", "input": "a", "speed": 9}, "speed"),
                        ({"model": "m", "input": "a", "instructions": "whisper"},
                         "instructions"),
                        ({"model": "m", "input": "a", "stream_format": "ws"}, "stream_format"),
                        ({"model": "m", "input": "a", "pitch": 2}, "pitch")]:
        refused(tts.parse, body, param=param)


def test_voices():
    assert tts.check_voice(None, ["default", "anna"], "m") is None
    assert tts.check_voice("default", ["default", "anna"], "m") is None
    assert tts.check_voice("anna", ["default", "anna"], "m") == "anna"
    assert tts.check_voice(None, ["anna"], "m") == "anna"  # no built-in speaker
    refused(tts.check_voice, "alloy", ["default", "anna"], "m", param="voice",
            match="its voices: default, anna")


def test_stream_return_format_srt_numbers_the_final_sentences():
    task = stt_stream._Task("t", return_format="srt")
    partial = stt_stream._sentence(task, stt_stream.Sentence(0, RATE, False), "Hel")
    final = stt_stream._sentence(task, stt_stream.Sentence(0, 2 * RATE, True), "Hello.")
    second = stt_stream._sentence(task, stt_stream.Sentence(3 * RATE, 4 * RATE, True), "Bye.")
    texts = [json.loads(m.data)["payload"]["output"]["sentence"]["text"]
             for m in (partial, final, second)]
    assert texts == ["1\n00:00:00,000 --> 00:00:01,000\nHel\n\n",
                     "1\n00:00:00,000 --> 00:00:02,000\nHello.\n\n",
                     "2\n00:00:03,000 --> 00:00:04,000\nBye.\n\n"]
    plain = stt_stream._Task("t")
    stt_stream._apply(plain, {"return_format": "text"})
    assert json.loads(stt_stream._sentence(plain, stt_stream.Sentence(0, RATE, True), "Hi")
                      .data)["payload"]["output"]["sentence"]["text"] == "Hi"
    refused(stt_stream._apply, plain, {"return_format": "json"}, param="return_format")


def test_speech_over_aog_refuses_openai_stream_format():
    import asyncio

    from ovms_plugin.kinds import tts as tts_kind
    with pytest.raises(ServiceError, match="stream_format"):
        asyncio.run(tts_kind.unary(None, "text-to-speech",  # type: ignore[arg-type]
                                   {"model": "m", "input": "hi", "stream_format": "sse"}))
