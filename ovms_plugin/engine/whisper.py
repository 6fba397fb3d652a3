"""Speech-to-text engine (runs inside a worker process): openvino_genai's WhisperPipeline,
one request at a time, the rest waiting in order.

request: kinds.speech.TranscribeJob (16 kHz float32 samples, language, task, prompt)
-> result: kinds.speech.TranscribeResult (text, timed segments, language), "stop".
Audio over 30 seconds is transcribed by the pipeline's own long-form loop: 30-second windows,
each starting where the last one's final timestamp ended (it needs timestamps, so they are
always asked for then).
An abort reaches a request before it starts; one already in the pipeline runs to its end.
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
from ovms_plugin.engine.requests import TranscribeJob, TranscribeResult
from ovms_plugin.engine.stats import Histogram

log = logging.getLogger(__name__)

WINDOW_SECONDS = 30.0  # Whisper's input window
MIN_SAMPLES = 400  # one FFT window (25 ms)


class WhisperEngine(QueuedEngine):
    what = "the speech engine"

    def __init__(self, model_dir: Path, config: dict[str, Any]) -> None:
        super().__init__()
        self.device = config.get("device", "CPU")
        started = time.monotonic()
        self.pipe = ov_genai.WhisperPipeline(str(model_dir), self.device,
                                             **config.get("properties", {}))
        self.load_seconds = time.monotonic() - started
        gc = self.pipe.get_generation_config()
        self.languages = sorted(dict(gc.lang_to_id)) if gc.is_multilingual else []
        self.requests_total = 0
        self.audio_seconds_total = 0.0
        self.processing_seconds_total = 0.0
        self.latency = Histogram()
        log.info("loaded %s on %s in %.2fs", model_dir, self.device, self.load_seconds)

    def info(self) -> dict[str, Any]:
        return {"device": self.device, "load_seconds": round(self.load_seconds, 3),
                "openvino": ov.get_version(), "languages": self.languages,
                "multilingual": bool(self.languages)}

    def transcribe(self, job: TranscribeJob) -> TranscribeResult:
        samples = np.ascontiguousarray(job.samples, dtype=np.float32)
        seconds = len(samples) / 16000
        if len(samples) < MIN_SAMPLES:  # the feature extractor's window; Whisper pads anyway
            samples = np.pad(samples, (0, MIN_SAMPLES - len(samples)))
        kwargs: dict[str, Any] = {
            "task": job.task,
            # Long audio is decoded window by window from the timestamps.
            "return_timestamps": bool(job.timestamps or seconds > WINDOW_SECONDS)}
        if job.language:
            kwargs["language"] = job.language
        if job.prompt:
            kwargs["initial_prompt"] = job.prompt
        if job.temperature > 0:
            kwargs.update(do_sample=True, temperature=float(job.temperature))
        started = time.monotonic()
        result = self.pipe.generate(samples, **kwargs)
        spent = time.monotonic() - started
        # Times within the audio (a chunk still open at the end has no end time).
        segments = []
        for c in result.chunks or []:
            end = min(float(c.end_ts), seconds) if c.end_ts >= 0 else seconds
            segments.append((min(max(float(c.start_ts), 0.0), end), end, c.text))
        detected = getattr(result, "language", None) or \
            next(iter(getattr(result, "languages", None) or []), None)
        self.requests_total += 1
        self.audio_seconds_total += seconds
        self.processing_seconds_total += spent
        self.latency.observe(spent)
        return TranscribeResult(text=result.texts[0] if result.texts else "",
                                segments=segments,
                                language=job.language or (f"<|{detected}|>" if detected and
                                                          not detected.startswith("<|")
                                                          else detected),
                                seconds=seconds, processing_seconds=spent)

    def run(self, req_id: int, job: TranscribeJob) -> list[StepOutput]:
        return [StepOutput(req_id, self.transcribe(job), "stop")]

    def metrics(self) -> dict[str, Any]:
        return {"queued_requests": len(self.queue), "requests_total": self.requests_total,
                "audio_seconds_total": round(self.audio_seconds_total, 3),
                "processing_seconds_total": round(self.processing_seconds_total, 3),
                "latency": self.latency.snapshot()}
