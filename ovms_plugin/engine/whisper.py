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


class WhisperEngine(QueuedEngine):
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
        segments = [(float(c.start_ts), float(c.end_ts) if c.end_ts >= 0 else seconds, c.text)
                    for c in (result.chunks or [])]
        languages = list(getattr(result, "languages", None) or [])
        self.requests_total += 1
        self.audio_seconds_total += seconds
        self.processing_seconds_total += spent
        self.latency.observe(spent)
        return TranscribeResult(text=result.texts[0] if result.texts else "",
                                segments=segments,
                                language=job.language or (languages[0] if languages else None),
                                seconds=seconds, processing_seconds=spent)

    def step(self) -> list[StepOutput]:
        req_id, job = self.queue.popleft()
        assert isinstance(job, TranscribeJob)
        if self.take_interrupt(req_id):
            return []
        out = self.transcribe(job)
        if self.take_interrupt(req_id):
            return []  # the caller is gone
        return [StepOutput(req_id, out, "stop")]

    def metrics(self) -> dict[str, Any]:
        return {"queued_requests": len(self.queue), "requests_total": self.requests_total,
                "audio_seconds_total": round(self.audio_seconds_total, 3),
                "processing_seconds_total": round(self.processing_seconds_total, 3),
                "latency": self.latency.snapshot()}
