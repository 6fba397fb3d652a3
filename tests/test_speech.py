"""Speech through the plugin, on tiny random-weight Whisper and SpeechT5 models converted by
the real pull path: transcriptions equal WhisperPipeline.generate() on the same samples,
AOG's speech-to-text-ws stream (partial and final results, cancellation, errors), and
text-to-speech audio (sample rate, duration growing with the text, voices, errors)."""

from __future__ import annotations

import base64
import io
import json
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import openai
import openvino_genai as ov_genai
import pytest
import soundfile as sf
import yaml
from conftest import wait_for
from test_http import KEY, Server

from ovms_plugin import devmodels
from ovms_plugin.aog.host import AogHost
from ovms_plugin.service import audio
from ovms_plugin.store import pull
from ovms_plugin.store.store import ModelStore, StoreError

STT = "whisper"
TTS = "voice"
RATE = 16000


def speechlike(seconds: float, seed: int = 0, rate: int = RATE) -> np.ndarray:
    """A loud, varied signal (tones with a moving pitch and some noise)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    sig = 0.3 * np.sin(2 * np.pi * (220 + 80 * np.sin(2 * np.pi * 0.7 * t)) * t)
    return (sig + 0.05 * rng.standard_normal(len(t))).astype(np.float32)


def wav(samples: np.ndarray, rate: int = RATE, channels: int = 1) -> bytes:
    buf = io.BytesIO()
    data = np.stack([samples] * channels, axis=1) if channels > 1 else samples
    sf.write(buf, data, rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


@pytest.fixture(scope="module")
def speech_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    models = devmodels.ensure_models(devmodels.default_cache_dir(), [
        devmodels.TINY_WHISPER_HF, devmodels.TINY_SPEECHT5_HF])
    home = tmp_path_factory.mktemp("speech-home")
    store = ModelStore(home / "models")
    # Conversion through the pull path; the SpeechT5 source brings a voice of its own.
    src = tmp_path_factory.mktemp("tts-src") / "speecht5"
    shutil.copytree(models[devmodels.TINY_SPEECHT5_HF], src)
    (src / "voices").mkdir()
    np.save(src / "voices" / "anna.npy", np.random.default_rng(1).standard_normal(
        512).astype(np.float32))
    # The two conversions run side by side (each in its own job process).
    with ThreadPoolExecutor(2) as pool:
        done = [pool.submit(pull.pull, store, pull.PullRequest(
                    model=str(models[devmodels.TINY_WHISPER_HF]), name=STT,
                    model_type="speech-to-text"), lambda m: None),
                pool.submit(pull.pull, store, pull.PullRequest(model=str(src), name=TTS),
                            lambda m: None)]
        for f in done:
            f.result()
    (home / "settings.yaml").write_text(yaml.safe_dump({"models": {
        # Random weights never say "stop": speech as long as the text, exactly.
        TTS: {"tts": {"minlenratio": 1.0, "maxlenratio": 1.001}},
        STT: {"speech": {"partial_seconds": 1.0, "stream_idle_seconds": 3}}}}))
    return home


@pytest.fixture(scope="module")
def shost(plugin_dir: Path, speech_home: Path) -> Iterator[AogHost]:
    h = AogHost(plugin_dir, env={"OVMS_PLUGIN_HOME": str(speech_home)}).start()
    yield h
    h.kill()


def invoke(host: AogHost, service: str, body: dict) -> dict:
    r = host.invoke(service, body, timeout=120)
    assert r.code == 0, r.message
    return json.loads(r.response_data)


def refused(host: AogHost, service: str, body: dict, needle: str) -> str:
    r = host.invoke(service, body, timeout=120)
    assert r.code != 0 and needle in r.message, r.message
    return r.message


# --- the model manager ----------------------------------------------------------------

def test_pulled_by_type_and_recognised(speech_home: Path):
    store = ModelStore(speech_home / "models")
    stt, tts = store.find(STT), store.find(TTS)
    assert stt.task == "automatic-speech-recognition" and tts.task == "text-to-audio"
    assert (stt.path / "openvino_encoder_model.xml").is_file()
    assert (tts.path / "openvino_vocoder.xml").is_file()
    assert (tts.path / "voices" / "anna.npy").is_file()  # carried through conversion
    with pytest.raises(StoreError, match="needs a text-to-audio model"):
        pull.pull(store, pull.PullRequest(model=str(stt.path), name="x",
                                          model_type="text-to-speech"), lambda m: None)


# --- speech-to-text -------------------------------------------------------------------

def test_transcription_equals_the_pipeline(shost: AogHost, speech_home: Path,
                                           tmp_path: Path):
    source = speechlike(3.0, rate=44100)
    data = wav(source, 44100, channels=2)
    samples = audio.decode(data).samples
    pipe = ov_genai.WhisperPipeline(str(ModelStore(speech_home / "models").find(STT).path),
                                    "CPU")
    want = pipe.generate(samples, return_timestamps=True, task="transcribe")
    out = invoke(shost, "speech-to-text", {"model": STT,
                                           "audio": base64.b64encode(data).decode()})
    assert out["text"] == want.texts[0].strip()
    assert out["duration"] == pytest.approx(3.0, abs=0.01)
    assert [s["id"] for s in out["segments"]] == list(range(len(out["segments"])))
    assert all(s["start"] <= s["end"] <= "00:00:03.000" for s in out["segments"])
    # AOG passes its client's path as it is.
    path = tmp_path / "speech.wav"
    path.write_bytes(data)
    assert invoke(shost, "speech-to-text", {"model": STT, "audio": str(path)}) == out
    # A language and a task are the model's; srt comes as text.
    fixed = pipe.generate(samples, return_timestamps=True, task="translate",
                          language="<|de|>")
    srt = invoke(shost, "speech-to-text", {"model": STT, "audio": str(path), "language": "de",
                                           "task": "translate", "response_format": "srt"})
    assert srt["format"] == "srt"
    assert srt["text"].replace("\n", " ").count("-->") == max(1, len(fixed.chunks or []))


def test_long_audio_is_transcribed_in_windows_with_timestamps(shost: AogHost):
    """Over 30 s the pipeline decodes window after window; the segments' times run on
    past the first window's."""
    data = wav(speechlike(45.0, seed=2))
    out = invoke(shost, "speech-to-text", {"model": STT, "response_format": "verbose_json",
                                           "audio": base64.b64encode(data).decode()})
    assert out["duration"] == pytest.approx(45.0, abs=0.01)
    starts = [s["start"] for s in out["segments"]]
    assert starts == sorted(starts) and max(s["end"] for s in out["segments"]) > 30.0


def test_transcription_errors(shost: AogHost, tmp_path: Path):
    b64 = base64.b64encode(wav(speechlike(1.0))).decode()
    refused(shost, "speech-to-text", {"model": STT, "audio": base64.b64encode(
        b"this is plain text, not audio").decode()}, "not audio")
    refused(shost, "speech-to-text", {"model": STT, "audio": base64.b64encode(
        wav(np.zeros(0, np.float32))).decode()}, "empty")
    refused(shost, "speech-to-text", {"model": STT, "audio": b64, "language": "xx"},
            "does not know language 'xx'")
    refused(shost, "speech-to-text", {"model": STT, "audio": "/no/such/file.wav"}, "neither")
    refused(shost, "speech-to-text", {"model": TTS, "audio": b64}, "pick a speech-to-text")
    refused(shost, "speech-to-text", {"model": STT, "audio": b64, "prompts": "x"},
            "did you mean 'prompt'")


# --- speech-to-text-ws ----------------------------------------------------------------

def run_task(**params) -> tuple[str, bytes]:
    return ("text", json.dumps({"task": "speech-to-text-ws", "action": "run-task",
                                "model": STT, "parameters": {"format": "pcm",
                                                             "sample_rate": RATE,
                                                             **params}}).encode())


FINISH = ("text", json.dumps({"action": "finish-task"}).encode())


def paced(signal: np.ndarray, chunk_s: float = 0.25, pause: float = 0.02
          ) -> Iterator[tuple[str, bytes]]:
    step = int(chunk_s * RATE)
    for i in range(0, len(signal), step):
        time.sleep(pause)
        yield "binary", audio.pcm16(signal[i:i + step])


def events(responses) -> Iterator[dict]:
    for r in responses:
        assert r.code == 0, r.message
        assert r.message_type == "text"
        yield json.loads(r.data)


def test_stream_gives_partial_and_final_sentences(shost: AogHost):
    signal = np.concatenate([np.zeros(RATE, np.float32), speechlike(3.5),
                             np.zeros(RATE, np.float32), speechlike(1.2, seed=3),
                             np.zeros(RATE // 2, np.float32)])
    import threading
    partial = threading.Event()
    cut = int(2.5 * RATE)  # 1.5 s into the first sentence

    def send() -> Iterator[tuple[str, bytes]]:
        yield run_task()
        yield from paced(signal[:cut])
        partial.wait(60)  # the sentence is still open: a partial result comes first
        yield from paced(signal[cut:])
        yield FINISH

    got = []
    for e in events(shost.invoke_bidi("speech-to-text-ws", send(),
                                      {"ws_conn_id": "conn-1", "model": STT})):
        got.append(e)
        if not e["payload"].get("output", {}).get("sentence", {}).get("sentence_end", True):
            partial.set()
    partial.set()
    names = [e["header"]["event"] for e in got]
    assert names[0] == "task-started" and names[-1] == "task-finished"
    assert all(e["header"]["task_id"] == "conn-1" for e in got)
    sentences = [e["payload"]["output"]["sentence"] for e in got
                 if e["header"]["event"] == "result-generated"]
    finals = [s for s in sentences if s["sentence_end"]]
    partials = [s for s in sentences if not s["sentence_end"]]
    assert len(finals) == 2, sentences
    assert partials and all(p["end_time"] is None for p in partials)
    first, second = finals
    assert abs(first["begin_time"] - 900) < 150 and abs(first["end_time"] - 4700) < 200
    assert abs(second["begin_time"] - 5400) < 150
    # Each final is the engine's transcription of its audio.
    assert all(isinstance(s["text"], str) for s in sentences)


def test_stream_without_vad_uses_fixed_windows_and_flushes_at_the_end(shost: AogHost):
    msgs = [run_task(use_vad=False), ("binary", audio.pcm16(speechlike(5.5)))]
    # No finish-task: the end of the input flushes the rest.
    got = list(events(shost.invoke_bidi("speech-to-text-ws", iter(msgs),
                                        {"ws_conn_id": "c2"})))
    finals = [e["payload"]["output"]["sentence"] for e in got
              if e["header"]["event"] == "result-generated"
              and e["payload"]["output"]["sentence"]["sentence_end"]]
    assert [(s["begin_time"], s["end_time"]) for s in finals] == [
        (0, 5010), (5010, 5500)]
    assert got[-1]["header"]["event"] == "task-finished"


@pytest.mark.parametrize(("msgs", "meta", "needle"), [
    ([run_task(format="mp3")], {}, "'mp3' is not supported"),
    ([("binary", b"\0\0")], {}, "names no model"),
    ([run_task(sample_rate=7)], {}, "'sample_rate' must be from"),
    ([run_task(colour="red")], {}, "unknown parameter 'colour'"),
    ([("binary", b"\0\0")], {"model": "no-such-model"}, "no-such-model"),
    ([run_task(), ("text", b"not json")], {}, "JSON actions"),
])
def test_stream_errors_end_with_task_failed(shost: AogHost, msgs, meta, needle):
    got = list(events(shost.invoke_bidi("speech-to-text-ws", iter(msgs),
                                        {"ws_conn_id": "bad", **meta})))
    last = got[-1]["header"]
    assert last["event"] == "task-failed" and needle in last["error_message"], last
    assert last["error_code"] == "CLIENT_ERROR"


def test_a_cancelled_stream_frees_the_model_and_others_go_on(shost: AogHost):
    def endless() -> Iterator[tuple[str, bytes]]:
        yield run_task()
        for _ in range(400):  # bounded: 100 s of audio at most
            time.sleep(0.05)
            yield "binary", audio.pcm16(speechlike(0.25))

    call = shost.invoke_bidi("speech-to-text-ws", endless(), {"ws_conn_id": "gone"})
    for i, _ in enumerate(call):
        if i == 1:  # a result came: the stream is transcribing
            break
    call.cancel()

    def idle() -> bool:
        models = json.loads(shost.call("GetRunningModels").response_json)["models"]
        m = next((m for m in models if m["name"] == STT), None)
        return m is not None and m["details"]["in_flight"] == 0
    assert wait_for(idle, 30)
    out = invoke(shost, "speech-to-text", {"model": STT, "audio": base64.b64encode(
        wav(speechlike(1.0))).decode()})
    assert isinstance(out["text"], str)


def test_a_silent_client_is_let_go_and_does_not_hold_up_others(shost: AogHost):
    import threading
    served = threading.Event()

    def stalls() -> Iterator[tuple[str, bytes]]:
        yield run_task()
        yield "binary", audio.pcm16(speechlike(0.5))
        served.wait(60)  # the stream stays open while a whole file is transcribed
        time.sleep(4)  # then nothing for longer than stream_idle_seconds (3)
        yield FINISH

    call = shost.invoke_bidi("speech-to-text-ws", stalls(), {"ws_conn_id": "quiet"})
    first = next(call)
    assert json.loads(first.data)["header"]["event"] == "task-started"
    out = invoke(shost, "speech-to-text", {"model": STT, "audio": base64.b64encode(
        wav(speechlike(1.0))).decode()})
    served.set()
    assert isinstance(out["text"], str)
    last = json.loads(list(call)[-1].data)["header"]
    assert last["event"] == "task-failed" and "no audio for 3 seconds" in last["error_message"]


# --- text-to-speech -------------------------------------------------------------------

def speak(host: AogHost, **body) -> tuple[np.ndarray, int, dict]:
    out = invoke(host, "text-to-speech", {"model": TTS, **body})
    data = base64.b64decode(out["audio"])
    samples, rate = sf.read(io.BytesIO(data), dtype="float32")
    return samples, rate, out


def test_speech_is_audio_that_grows_with_the_text(shost: AogHost):
    short, rate, out = speak(shost, input="Hello.")
    assert (rate, out["sample_rate"], out["format"]) == (16000, 16000, "wav")
    longer, _, _ = speak(shost, input="Hello. This is a much longer text to speak.")
    assert len(longer) > 2 * len(short) > 0
    assert out["duration"] == pytest.approx(len(short) / rate, abs=1e-3)
    voiced, _, _ = speak(shost, input="Hello.", voice="anna", response_format="flac")
    assert len(voiced) == len(short)  # (random weights speak near silence: no timbre to compare)
    # AOG's body says "text".
    assert len(speak(shost, text="Hello.")[0]) == len(short)


def test_speech_streams_sentence_by_sentence(shost: AogHost):
    from ovms_plugin.aog.host import SseReader
    reader = SseReader(shost.invoke_stream("text-to-speech", {
        "model": TTS, "input": "One. Two two. Three three three.", "stream": True}))
    got = list(reader.events())
    assert reader.error is None
    assert [e["text"] for e in got] == ["One.", "Two two.", "Three three three."]
    durations = [e["duration"] for e in got]
    assert durations == sorted(durations) and got[-1]["total_duration"] == pytest.approx(
        sum(durations), abs=1e-3)


def test_speech_errors(shost: AogHost):
    refused(shost, "text-to-speech", {"model": TTS, "input": ""}, "non-empty text")
    refused(shost, "text-to-speech", {"model": TTS, "input": "x" * 5000}, "over the limit")
    refused(shost, "text-to-speech", {"model": TTS, "input": "hi", "voice": "alloy"},
            "its voices: default, anna")
    refused(shost, "text-to-speech", {"model": TTS, "input": "hi", "speed": 2.0},
            "one speed")
    refused(shost, "text-to-speech", {"model": STT, "input": "hi"}, "pick a text-to-speech")


def test_metrics_have_the_real_time_factor(shost: AogHost):
    speak(shost, input="Hello.")
    models = json.loads(shost.call("GetRunningModels").response_json)["models"]
    by_name = {m["name"]: m["details"]["metrics"] for m in models}
    assert by_name[STT]["audio_seconds_total"] > 0
    assert by_name[STT]["processing_seconds_total"] > 0
    assert by_name[TTS]["audio_seconds_total"] > 0 and by_name[TTS]["characters_total"] > 0


# --- the standalone server: OpenAI's audio routes and AOG's WebSocket -----------------

@pytest.fixture(scope="module")
def ssrv(speech_home: Path) -> Iterator[Server]:
    with Server.ready(speech_home, ["--port", "0", "--idle-unload", "0"],
                      env={"OVMS_PLUGIN_API_KEY": KEY}) as s:
        yield s


def test_openai_transcriptions_and_translations(ssrv: Server, shost: AogHost):
    data = wav(speechlike(2.0, seed=5))
    client = ssrv.openai()
    out = client.audio.transcriptions.create(model=STT, file=("a.wav", data))
    aog = invoke(shost, "speech-to-text", {"model": STT,
                                           "audio": base64.b64encode(data).decode()})
    assert out.text == aog["text"]
    srt = client.audio.transcriptions.create(model=STT, file=("a.wav", data),
                                             response_format="srt")
    assert isinstance(srt, str) and "-->" in srt
    verbose = client.audio.translations.create(model=STT, file=("a.flac", data),
                                               response_format="verbose_json")
    assert verbose.task == "translate" and verbose.duration == pytest.approx(2.0, abs=0.01)
    with pytest.raises(openai.BadRequestError, match="not audio"):
        client.audio.transcriptions.create(model=STT, file=("a.wav", b"hello, not audio"))
    with pytest.raises(openai.BadRequestError, match="word timestamps"):
        client.audio.transcriptions.create(model=STT, file=("a.wav", data),
                                           timestamp_granularities=["word"])
    r = ssrv.http.post("/v1/audio/transcriptions", json={"model": STT, "audio": "x"})
    assert r.status_code == 400 and "multipart/form-data" in r.text


def test_openai_speech_whole_streamed_and_sse(ssrv: Server):
    client = ssrv.openai()
    text = "One. Two two."
    whole = client.audio.speech.create(model=TTS, voice="default", input=text,
                                       response_format="wav").content
    samples, rate = sf.read(io.BytesIO(whole), dtype="float32")
    assert rate == 16000 and len(samples) > 0
    mp3 = client.audio.speech.create(model=TTS, voice="anna", input=text).content
    assert sf.info(io.BytesIO(mp3)).format == "MP3"  # OpenAI's default format
    # Streamed: a WAV of unknown length, sentence after sentence.
    with ssrv.http.stream("POST", "/v1/audio/speech", json={
            "model": TTS, "input": text, "response_format": "wav",
            "stream_format": "audio"}) as r:
        assert r.status_code == 200 and r.headers["content-type"] == "audio/wav"
        body = b"".join(r.iter_bytes())
    streamed, _ = sf.read(io.BytesIO(body), dtype="float32")
    assert len(streamed) == len(samples)
    with ssrv.http.stream("POST", "/v1/audio/speech", json={
            "model": TTS, "input": text, "response_format": "pcm",
            "stream_format": "sse"}) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    assert [e["type"] for e in events] == ["speech.audio.delta"] * 2 + ["speech.audio.done"]
    assert sum(len(base64.b64decode(e["audio"])) for e in events[:2]) == 2 * len(samples)
    with pytest.raises(openai.BadRequestError, match="its voices"):
        client.audio.speech.create(model=TTS, voice="alloy", input=text)


def test_websocket_stream_on_the_server(ssrv: Server):
    import asyncio

    import aiohttp

    async def run() -> list[dict]:
        url = f"{ssrv.url.replace('http', 'ws')}/aog/v0.2/services/speech-to-text-ws"
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as s, \
                s.ws_connect(url, timeout=aiohttp.ClientWSTimeout(ws_close=30)) as ws:
            await ws.send_str(run_task()[1].decode())
            await ws.send_bytes(audio.pcm16(np.concatenate([speechlike(1.5),
                                                           np.zeros(RATE, np.float32)])))
            await ws.send_str(FINISH[1].decode())
            out = []
            async with asyncio.timeout(60):
                async for msg in ws:
                    out.append(json.loads(msg.data))
                    if out[-1]["header"]["event"] in ("task-finished", "task-failed"):
                        break
            return out

    got = asyncio.run(run())
    names = [e["header"]["event"] for e in got]
    assert names[0] == "task-started" and names[-1] == "task-finished", got
    assert names.count("result-generated") >= 1


def test_speech_metrics_on_the_server(ssrv: Server):
    assert ssrv.value("ovms_speech_audio_seconds", model=STT) > 0
    assert ssrv.value("ovms_speech_real_time_factor", model=STT) > 0
    assert ssrv.value("ovms_tts_audio_seconds", model=TTS) > 0
