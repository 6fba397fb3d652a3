"""Real-time factor of the speech services through the plugin against the pipelines called
directly (issue 17), on the tiny offline Whisper and SpeechT5 models: the same audio and
text, one request at a time, in interleaved rounds (the order alternates each round). The
plugin is launched as AOG launches it and called with InvokeService as AOG calls it.

    python benchmarks/speech_rtf.py [--seconds 10] [--rounds 7] [--json benchmarks/speech_rtf.json]

speech-to-text: a WAV file (44.1 kHz stereo, as a recording might be) in base64; directly,
WhisperPipeline.generate on the same samples already decoded at 16 kHz, so the plugin's
figure includes decoding and resampling. text-to-speech: three sentences; directly,
Text2SpeechPipeline.generate once per sentence, as the plugin speaks them, and once on the
whole text. Target: plugin <= direct x 1.05 + 50 ms per request.
RTF = wall time / audio seconds (below 1: faster than real time).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

TEXT = ("The plugin speaks this first sentence. Then it goes on with a second one, a little "
        "longer than the first. And it ends here.")


def speechlike(seconds: float, rate: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    t = np.arange(int(seconds * rate)) / rate
    sig = 0.3 * np.sin(2 * np.pi * (220 + 80 * np.sin(2 * np.pi * 0.7 * t)) * t)
    return (sig + 0.05 * rng.standard_normal(len(t))).astype(np.float32)


def _timed(fn: Any) -> tuple[float, Any]:
    started = time.perf_counter()
    out = fn()
    return time.perf_counter() - started, out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="audio length")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    import openvino as ov
    import openvino_genai as ov_genai
    import soundfile as sf
    import yaml

    from ovms_plugin import devmodels
    from ovms_plugin.aog.host import AogHost
    from ovms_plugin.aog.install import install
    from ovms_plugin.service import audio, tts
    from ovms_plugin.store import pull
    from ovms_plugin.store.store import ModelStore
    from ovms_plugin.sysinfo import machine_description

    models = devmodels.ensure_models(devmodels.default_cache_dir(),
                                     [devmodels.TINY_WHISPER, devmodels.TINY_SPEECHT5])
    length = {"minlenratio": 1.0, "maxlenratio": 1.001}  # random weights never stop
    stereo = speechlike(args.seconds, 44100)
    buf = io.BytesIO()
    sf.write(buf, np.stack([stereo, stereo], axis=1), 44100, format="WAV", subtype="PCM_16")
    wav = buf.getvalue()
    samples = audio.decode(wav).samples
    sentences = tts.sentences(TEXT)

    whisper = ov_genai.WhisperPipeline(str(models[devmodels.TINY_WHISPER]), "CPU")
    speaker = ov_genai.Text2SpeechPipeline(str(models[devmodels.TINY_SPEECHT5]), "CPU")

    def direct_stt() -> float:
        return _timed(lambda: whisper.generate(samples, return_timestamps=True,
                                               task="transcribe"))[0]

    def direct_tts(split: bool) -> tuple[float, float]:
        def run() -> int:
            parts = sentences if split else [TEXT]
            return sum(np.asarray(speaker.generate(p, **length).speeches[0].data).size
                       for p in parts)
        spent, n = _timed(run)
        return spent, n / 16000

    rows: dict[str, list[float]] = {k: [] for k in (
        "stt_direct", "stt_plugin", "tts_direct_sentences", "tts_direct_whole", "tts_plugin")}
    tts_audio: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        store = ModelStore(home / "models")
        for name, key in (("whisper", devmodels.TINY_WHISPER), ("voice", devmodels.TINY_SPEECHT5)):
            pull.pull(store, pull.PullRequest(model=str(models[key]), name=name), lambda m: None)
        (home / "settings.yaml").write_text(yaml.safe_dump({"models": {"voice": {"tts": length}}}))
        host = AogHost(install(home / "plugins"), env={"OVMS_PLUGIN_HOME": str(home)}).start()
        try:
            stt_body = {"model": "whisper", "audio": base64.b64encode(wav).decode()}
            tts_body = {"model": "voice", "input": TEXT}

            def plugin(service: str, body: dict) -> tuple[float, dict]:
                spent, r = _timed(lambda: host.invoke(service, body, timeout=600))
                assert r.code == 0, r.message
                return spent, json.loads(r.response_data)

            for _ in range(2):  # warm both sides
                plugin("speech-to-text", stt_body)
                plugin("text-to-speech", tts_body)
                direct_stt()
                direct_tts(True)
                direct_tts(False)
            for i in range(args.rounds):
                order = [0, 1] if i % 2 == 0 else [1, 0]
                for side in order:
                    if side == 0:
                        rows["stt_direct"].append(direct_stt())
                        spent, tts_audio["direct_sentences"] = direct_tts(True)
                        rows["tts_direct_sentences"].append(spent)
                        spent, tts_audio["direct_whole"] = direct_tts(False)
                        rows["tts_direct_whole"].append(spent)
                    else:
                        rows["stt_plugin"].append(plugin("speech-to-text", stt_body)[0])
                        spent, out = plugin("text-to-speech", tts_body)
                        rows["tts_plugin"].append(spent)
                        tts_audio["plugin"] = out["duration"]
        finally:
            host.kill()

    med = {k: statistics.median(v) for k, v in rows.items()}

    def verdict(plugin_s: float, direct_s: float) -> dict[str, Any]:
        return {"overhead_ms": round((plugin_s - direct_s) * 1000, 1),
                "ratio": round(plugin_s / direct_s, 4),
                "target_s": round(direct_s * 1.05 + 0.05, 4),
                "met": plugin_s <= direct_s * 1.05 + 0.05}

    result = {
        "command": "python benchmarks/speech_rtf.py " + " ".join(argv or sys.argv[1:]),
        "machine": machine_description(), "openvino": ov.get_version(),
        "rounds": args.rounds, "audio_seconds": args.seconds,
        "tts_text_chars": len(TEXT), "tts_sentences": len(sentences),
        "tts_audio_seconds": {k: round(v, 3) for k, v in tts_audio.items()},
        "median_seconds": {k: round(v, 4) for k, v in med.items()},
        "rtf": {"stt_direct": round(med["stt_direct"] / args.seconds, 4),
                "stt_plugin": round(med["stt_plugin"] / args.seconds, 4),
                "tts_direct_sentences": round(med["tts_direct_sentences"]
                                              / tts_audio["direct_sentences"], 4),
                "tts_plugin": round(med["tts_plugin"] / tts_audio["plugin"], 4)},
        "speech_to_text": verdict(med["stt_plugin"], med["stt_direct"]),
        "text_to_speech": verdict(med["tts_plugin"], med["tts_direct_sentences"]),
        "text_to_speech_vs_whole_text": verdict(med["tts_plugin"], med["tts_direct_whole"]),
        "rounds_seconds": {k: [round(x, 4) for x in v] for k, v in rows.items()},
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
