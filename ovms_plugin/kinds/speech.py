"""Speech-to-text: WhisperPipeline (engine/whisper.py), one request at a time. Services:
speech-to-text (a whole file: AOG's JSON body, OpenAI's transcriptions and translations)
and speech-to-text-ws (live audio over AOG's bidirectional stream, service/stt_stream.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ovms_plugin.engine.requests import TranscribeJob, TranscribeResult
from ovms_plugin.kinds.base import BidiMessage, Kind, Service, ValidationError
from ovms_plugin.service import audio, speech, stt_stream
from ovms_plugin.settings import option

if TYPE_CHECKING:
    from ovms_plugin.http.metrics import Exposition
    from ovms_plugin.service.runtime import LoadedModel, Runtime
    from ovms_plugin.settings import ModelSettings
    from ovms_plugin.store.store import ModelEntry

WHISPER_FILES = ("openvino_encoder_model.xml", "openvino_decoder_model.xml",
                 "openvino_tokenizer.xml", "openvino_detokenizer.xml")


@dataclass(frozen=True)
class SpeechOptions:
    """settings.yaml's `speech:` section (globally or in a model's)."""

    max_audio_seconds: float = option(audio.DEFAULT_MAX_SECONDS, "the longest audio accepted, "
                                      "a file or a live stream, in seconds", minimum=1)
    vad_threshold_db: float = option(-40.0, "live streams: frames louder than this (dB "
                                            "below full scale) are speech")
    vad_silence_ms: int = option(600, "live streams: this much quiet ends a sentence",
                                 minimum=30)
    partial_seconds: float = option(1.5, "live streams: a partial result after this much "
                                         "new audio in an open sentence", minimum=0.3)
    max_segment_seconds: float = option(25.0, "live streams: a sentence is cut at this "
                                              "length (Whisper hears 30 s at once)",
                                        minimum=1)
    window_seconds: float = option(5.0, "live streams without voice detection (use_vad "
                                        "false): the fixed window", minimum=1)
    stream_idle_seconds: float = option(60.0, "live streams: closed after this long "
                                              "without a message", minimum=1)

    def __post_init__(self) -> None:
        if not -100 <= self.vad_threshold_db <= 0:
            raise ValueError(f"vad_threshold_db must be from -100 to 0, got "
                             f"{self.vad_threshold_db}")
        if self.max_segment_seconds > 30:
            raise ValueError(f"max_segment_seconds must be at most 30 (Whisper's window), "
                             f"got {self.max_segment_seconds}")


async def transcribe(rt: Runtime, req: speech.TranscribeRequest, service: str
                     ) -> TranscribeResult:
    async with rt.lease(req.model, service) as lm:
        limit = float(lm.settings.options["speech"].get("max_audio_seconds")
                      or audio.DEFAULT_MAX_SECONDS)
        decoded = await asyncio.to_thread(audio.decode, req.data, max_seconds=limit,
                                          param=req.param)
        language = speech.language_token(req.language, lm.client.info.get("languages", []),
                                         req.task, req.model)
        job = TranscribeJob(decoded.samples, language, req.task, True, req.prompt,
                            req.temperature)
        return await rt.run_once(lm, job)


async def run_body(rt: Runtime, body: Any, *, allow_paths: bool, task: str | None = None,
                   default_format: str = "aog") -> dict[str, Any]:
    """A whole-file request from any adapter: the response object."""
    if isinstance(body, dict) and "response_format" not in body:
        body = {**body, "response_format": default_format}
    req = speech.parse(body, allow_paths=allow_paths, task=task)
    result = await transcribe(rt, req, "speech-to-text")
    return speech.response(result, req.response_format, req.task)


async def unary(rt: Runtime, service: str, body: Any) -> dict[str, Any]:
    # AOG passes its client's `audio` as given: a path on this machine, or base64.
    return await run_body(rt, body, allow_paths=True)


async def bidi(rt: Runtime, service: str, metadata: dict[str, str],
               messages: AsyncIterator[BidiMessage]) -> AsyncIterator[BidiMessage]:
    async def run(lm: LoadedModel, samples: Any, language: str | None) -> TranscribeResult:
        job = TranscribeJob(samples, language, "transcribe", False)
        return await rt.run_once(lm, job)

    async for out in stt_stream.session(rt, service, metadata, messages, run,
                                        lambda lm: lm.settings.options["speech"]):
        yield out


class SpeechKind(Kind):
    name = "speech"
    task = "automatic-speech-recognition"
    services = (
        Service("speech-to-text", unary, task_type="speech-to-text", timeout=-1,
                default_model="NamoLi/whisper-large-v3-ov"),
        Service("speech-to-text-ws", unary, task_type="speech-to-text", timeout=-1,
                default_model="NamoLi/whisper-large-v3-ov", aog_streaming=True,
                bidi=bidi),
    )
    required_files = WHISPER_FILES
    export_task = "automatic-speech-recognition-with-past"
    options_section = "speech"
    options_type = SpeechOptions
    device_preference = ("GPU.discrete", "GPU.integrated", "CPU")

    def recognise(self, files: set[str], config: dict[str, Any]) -> int | None:
        archs = config.get("architectures") or []
        if "WhisperForConditionalGeneration" in archs or config.get("model_type") == "whisper":
            return 0
        return None

    def is_native(self, files: set[str]) -> bool:
        return {"openvino_encoder_model.xml", "openvino_decoder_model.xml"} <= files

    def validate(self, folder: Path, model_type: str | None) -> dict[str, Any]:
        import numpy as np
        import openvino_genai as ov_genai
        pipe = ov_genai.WhisperPipeline(str(folder), "CPU")
        result = pipe.generate(np.zeros(audio.TARGET_RATE, np.float32), max_new_tokens=4)
        if len(result.texts) != 1:
            raise ValidationError("the speech model returned no transcription")
        gc = pipe.get_generation_config()
        return {"multilingual": bool(gc.is_multilingual),
                "languages": len(dict(gc.lang_to_id))}

    def make_engine(self, model_dir: Path, config: dict[str, Any]) -> Any:
        from ovms_plugin.engine.whisper import WhisperEngine
        return WhisperEngine(model_dir, config)

    def engine_config(self, entry: ModelEntry, device: str, ms: ModelSettings,
                      budget_left: int) -> dict[str, Any]:
        return {"speech": ms.options["speech"]}

    def export_metrics(self, out: Exposition, labels: dict[str, Any],
                       m: dict[str, Any]) -> None:
        out.counter("speech_requests_total", "Transcriptions run (files and stream "
                    "sentences).", labels, m.get("requests_total"))
        out.counter("speech_audio_seconds_total", "Seconds of audio transcribed.", labels,
                    m.get("audio_seconds_total"))
        out.counter("speech_processing_seconds_total", "Seconds the engine spent "
                    "transcribing.", labels, m.get("processing_seconds_total"))
        audio_s = m.get("audio_seconds_total") or 0
        out.gauge("speech_real_time_factor", "Processing time over audio time, since "
                  "load (below 1: faster than real time).", labels,
                  round(m.get("processing_seconds_total", 0) / audio_s, 4) if audio_s else None)
        out.gauge("speech_queued_requests", "Transcriptions waiting.", labels,
                  m.get("queued_requests"))


KIND = SpeechKind()
