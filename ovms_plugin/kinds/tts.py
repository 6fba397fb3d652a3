"""Text-to-speech: Text2SpeechPipeline (engine/tts.py), one request at a time, spoken
sentence by sentence so a streaming caller hears the first one early. Service:
text-to-speech (AOG's body; OpenAI's /v1/audio/speech in http/routes_openai.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ovms_plugin.engine.requests import SpeakJob, SpeechChunk
from ovms_plugin.kinds.base import Kind, Service, StreamChunk, ValidationError
from ovms_plugin.service import tts
from ovms_plugin.service.errors import invalid
from ovms_plugin.settings import option
from ovms_plugin.store.store import read_json

if TYPE_CHECKING:
    from ovms_plugin.http.metrics import Exposition
    from ovms_plugin.service.runtime import Runtime
    from ovms_plugin.settings import ModelSettings
    from ovms_plugin.store.store import ModelEntry

SPEECHT5_FILES = ("openvino_encoder_model.xml", "openvino_decoder_model.xml",
                  "openvino_postnet.xml", "openvino_vocoder.xml", "openvino_tokenizer.xml")


@dataclass(frozen=True)
class TtsOptions:
    """settings.yaml's `tts:` section (globally or in a model's)."""

    max_input_chars: int = option(tts.DEFAULT_MAX_CHARS, "the longest text accepted",
                                  minimum=1)
    minlenratio: float | None = option(None, "SpeechT5: the shortest speech, in frames per "
                                             "input token (default: the model's)", minimum=0)
    maxlenratio: float | None = option(None, "SpeechT5: the longest speech, in frames per "
                                             "input token (default: the model's)", minimum=0)
    threshold: float | None = option(None, "SpeechT5: the stop probability that ends "
                                           "speech (default: the model's)", minimum=0)

    def __post_init__(self) -> None:
        if self.minlenratio is not None and self.maxlenratio is not None and \
                self.maxlenratio <= self.minlenratio:
            raise ValueError(f"maxlenratio must be over minlenratio, got {self.maxlenratio} "
                             f"and {self.minlenratio}")


def _speecht5(folder: Path) -> bool:
    return read_json(folder / "config.json").get("model_type") == "speecht5"


async def speak(rt: Runtime, req: tts.SpeechRequest) -> AsyncIterator[tuple[str, SpeechChunk]]:
    """Yields (sentence, its audio) as each is spoken."""
    async with rt.lease(req.model, "text-to-speech") as lm:
        limit = int(lm.settings.options["tts"].get("max_input_chars") or tts.DEFAULT_MAX_CHARS)
        sentences = tts.sentences(req.text, limit)
        info = lm.client.info
        voice = tts.check_voice(req.voice, info.get("voices", []), req.model)
        if req.speed not in (None, 1.0) and not info.get("honours_speed"):
            raise invalid(f"model {req.model!r} speaks at one speed: 'speed' must be 1.0 or "
                          "left out", "speed")
        job = SpeakJob(sentences, voice, req.speed)
        async with aclosing(rt.submit(lm, job)) as outputs:
            async for out in outputs:
                chunk: SpeechChunk = out.result
                yield sentences[chunk.index], chunk


async def speak_all(rt: Runtime, req: tts.SpeechRequest) -> tuple[np.ndarray, int]:
    """The whole text's audio: the sentences' samples, end to end."""
    parts: list[np.ndarray] = []
    rate = 16000
    async with aclosing(speak(rt, req)) as chunks:
        async for _text, chunk in chunks:
            parts.append(chunk.samples)
            rate = chunk.rate
    return (np.concatenate(parts) if parts else np.zeros(0, np.float32)), rate


def _parse(body: Any) -> tts.SpeechRequest:
    """AOG's body: the call decides whether it streams (sentence events), so OpenAI's
    stream_format, which picks how /v1/audio/speech streams, has nothing to choose."""
    if isinstance(body, dict) and body.get("stream_format") is not None:
        raise invalid("'stream_format' is for /v1/audio/speech; here a streamed call sends "
                      "one event per sentence", "stream_format")
    return tts.parse(body)


async def unary(rt: Runtime, service: str, body: Any) -> dict[str, Any]:
    req = _parse(body)
    samples, rate = await speak_all(rt, req)
    return tts.response(samples, rate, req.response_format)


async def stream(rt: Runtime, service: str, body: Any) -> AsyncIterator[StreamChunk]:
    req = _parse(body)
    total = 0.0
    last: StreamChunk | None = None
    async with aclosing(speak(rt, req)) as chunks:
        async for text, chunk in chunks:
            if last is not None:
                yield last
            total += len(chunk.samples) / chunk.rate
            last = StreamChunk(tts.chunk(chunk.samples, chunk.rate, req.response_format,
                                         chunk.index, text))
    if last is not None:
        last.data["total_duration"] = round(total, 3)
        last.final = True
        yield last


class TtsKind(Kind):
    name = "tts"
    task = "text-to-audio"
    services = (Service("text-to-speech", unary, stream, task_type="text-to-speech",
                        timeout=-1, default_model="NamoLi/speecht5-tts",
                        # AOG reads one answer; the sentence stream is for direct callers.
                        aog_streaming=False),)
    required_files = SPEECHT5_FILES
    carries = ("voices",)  # the speaker embeddings a source folder brings
    options_section = "tts"
    options_type = TtsOptions
    device_preference = ("CPU", "GPU.integrated")

    def recognise(self, files: set[str], config: dict[str, Any]) -> int | None:
        archs = config.get("architectures") or []
        if "SpeechT5ForTextToSpeech" in archs or (
                config.get("model_type") == "speecht5" and "openvino_vocoder.xml" in files):
            return 0
        return None

    def is_native(self, files: set[str]) -> bool:
        return {"openvino_decoder_model.xml", "openvino_vocoder.xml"} <= files

    def conversion_model_kwargs(self, src: Path) -> dict[str, Any]:
        """SpeechT5 is exported with its vocoder (a HiFi-GAN of its own): the source
        folder's vocoder/ subfolder."""
        if (src / "vocoder" / "config.json").is_file():
            return {"vocoder": str(src / "vocoder")}
        raise ValidationError("a SpeechT5 model converts with its vocoder: put the HiFi-GAN "
                              "vocoder (e.g. microsoft/speecht5_hifigan) in a vocoder/ "
                              "subfolder of the model, or pull an OpenVINO export that "
                              "includes openvino_vocoder.xml")

    def validate(self, folder: Path, model_type: str | None) -> dict[str, Any]:
        import openvino_genai as ov_genai
        pipe = ov_genai.Text2SpeechPipeline(str(folder), "CPU")
        result = pipe.generate("test")
        samples = np.asarray(result.speeches[0].data).reshape(-1)
        if samples.size == 0 or not np.isfinite(samples).all():
            raise ValidationError("the speech model produced no usable audio")
        return {"sample_rate": int(getattr(result, "output_sample_rate", 16000) or 16000)}

    def make_engine(self, model_dir: Path, config: dict[str, Any]) -> Any:
        from ovms_plugin.engine.tts import TtsEngine
        return TtsEngine(model_dir, config)

    def engine_config(self, entry: ModelEntry, device: str, ms: ModelSettings,
                      budget_left: int) -> dict[str, Any]:
        speecht5 = _speecht5(entry.path)
        # SpeechT5 has a default speaker and no speed control; other architectures
        # (Kokoro) take a speaker embedding and a speed.
        return {"tts": {**ms.options["tts"], "builtin_speaker": speecht5,
                        "honours_speed": not speecht5}}

    def export_metrics(self, out: Exposition, labels: dict[str, Any],
                       m: dict[str, Any]) -> None:
        out.counter("tts_requests_total", "Speech requests served.", labels,
                    m.get("requests_total"))
        out.counter("tts_characters_total", "Characters spoken.", labels,
                    m.get("characters_total"))
        out.counter("tts_audio_seconds_total", "Seconds of audio produced.", labels,
                    m.get("audio_seconds_total"))
        out.counter("tts_processing_seconds_total", "Seconds the engine spent speaking.",
                    labels, m.get("processing_seconds_total"))
        audio_s = m.get("audio_seconds_total") or 0
        out.gauge("tts_real_time_factor", "Processing time over audio time, since load.",
                  labels,
                  round(m.get("processing_seconds_total", 0) / audio_s, 4) if audio_s else None)
        out.gauge("tts_queued_requests", "Speech requests waiting.", labels,
                  m.get("queued_requests"))


KIND = TtsKind()
