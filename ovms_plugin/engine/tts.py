"""Text-to-speech engine (runs inside a worker process): openvino_genai's
Text2SpeechPipeline (SpeechT5 with its vocoder; whatever else the installed GenAI reads),
one request at a time, the rest waiting in order.

request: kinds.tts.SpeakJob (sentences, voice, speed)
-> one SpeechChunk per sentence as it is spoken; the last has finish "stop".
Voices: files voices/NAME.bin (512 float32, SpeechT5's x-vector) or voices/NAME.npy in
the model folder, plus "default" (the pipeline's own speaker) when the model has one.
An abort stops a request between sentences.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov
import openvino_genai as ov_genai

from ovms_plugin.engine.protocol import StepOutput
from ovms_plugin.engine.queued import QueuedEngine
from ovms_plugin.engine.requests import SpeakJob, SpeechChunk

log = logging.getLogger(__name__)

EMBEDDING_SIZE = 512  # SpeechT5's speaker x-vector


def load_voices(model_dir: Path) -> dict[str, np.ndarray]:
    """The speaker embeddings a model folder ships (voices/NAME.bin or .npy); files of the
    wrong size are skipped with a warning."""
    out: dict[str, np.ndarray] = {}
    folder = model_dir / "voices"
    if not folder.is_dir():
        return out
    for path in sorted(folder.iterdir()):
        try:
            if path.suffix == ".bin":
                vec = np.fromfile(path, dtype="<f4")
            elif path.suffix == ".npy":
                vec = np.load(path, allow_pickle=False).astype(np.float32).ravel()
            else:
                continue
        except (OSError, ValueError) as e:
            log.warning("voice %s skipped: %s", path.name, e)
            continue
        if vec.size != EMBEDDING_SIZE or not np.isfinite(vec).all():
            log.warning("voice %s skipped: %d values, not %d finite float32", path.name,
                        vec.size, EMBEDDING_SIZE)
            continue
        out[path.stem] = vec.reshape(1, EMBEDDING_SIZE)
    return out


class TtsEngine(QueuedEngine):
    what = "the speech engine"

    def __init__(self, model_dir: Path, config: dict[str, Any]) -> None:
        super().__init__()
        self.device = config.get("device", "CPU")
        started = time.monotonic()
        self.pipe = ov_genai.Text2SpeechPipeline(str(model_dir), self.device,
                                                 **config.get("properties", {}))
        self.load_seconds = time.monotonic() - started
        self.voices = load_voices(model_dir)
        # SpeechT5 has a speaker of its own; models that need one given (Kokoro) do not.
        self.has_default = bool(config.get("tts", {}).get("builtin_speaker", True))
        self.honours_speed = bool(config.get("tts", {}).get("honours_speed", False))
        # Generation settings from the model's settings (None: the model's own).
        self.generation = {k: float(v) for k, v in config.get("tts", {}).items()
                           if k in ("minlenratio", "maxlenratio", "threshold")
                           and v is not None}
        self.rate = 16000
        self.requests_total = 0
        self.characters_total = 0
        self.audio_seconds_total = 0.0
        self.processing_seconds_total = 0.0
        log.info("loaded %s on %s in %.2fs (%d voices)", model_dir, self.device,
                 self.load_seconds, len(self.voices))

    def info(self) -> dict[str, Any]:
        voices = (["default"] if self.has_default else []) + list(self.voices)
        return {"device": self.device, "load_seconds": round(self.load_seconds, 3),
                "openvino": ov.get_version(), "voices": voices,
                "honours_speed": self.honours_speed}

    def speak(self, text: str, voice: str | None, speed: float | None) -> np.ndarray:
        kwargs: dict[str, Any] = dict(self.generation)
        if speed is not None and self.honours_speed:
            kwargs["speed"] = float(speed)
        args: list[Any] = [text]
        if voice is not None:
            args.append(ov.Tensor(self.voices[voice]))
        started = time.monotonic()
        result = self.pipe.generate(*args, **kwargs)
        samples = np.asarray(result.speeches[0].data, dtype=np.float32).reshape(-1)
        self.rate = int(getattr(result, "output_sample_rate", 0) or self.rate)
        self.processing_seconds_total += time.monotonic() - started
        self.audio_seconds_total += len(samples) / self.rate
        self.characters_total += len(text)
        return samples

    def run(self, req_id: int, job: SpeakJob) -> list[StepOutput]:
        """Each sentence's audio as it is spoken; the last one ends the request."""
        self.requests_total += 1
        for i, sentence in enumerate(job.sentences):
            if i and self.is_interrupted(req_id):
                return []
            chunk = SpeechChunk(i, self.speak(sentence, job.voice, job.speed), self.rate)
            if i == len(job.sentences) - 1:
                return [StepOutput(req_id, chunk, "stop")]
            self.emit([StepOutput(req_id, chunk)])
        return []

    def metrics(self) -> dict[str, Any]:
        return {"queued_requests": len(self.queue), "requests_total": self.requests_total,
                "characters_total": self.characters_total,
                "audio_seconds_total": round(self.audio_seconds_total, 3),
                "processing_seconds_total": round(self.processing_seconds_total, 3)}
