"""text-to-speech: request parsing (AOG's `{"model", "input" or "text", "voice"?}` and
OpenAI's /v1/audio/speech), splitting text into sentences, and the response shapes."""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from ovms_plugin.service import audio
from ovms_plugin.service.errors import bool_field, check_fields, invalid, require_model

FIELDS = frozenset({"model", "input", "text", "voice", "response_format", "speed", "stream",
                    "stream_format", "instructions"})
DEFAULT_MAX_CHARS = 4096  # OpenAI's limit for one request
SENTENCE_CHARS = 300  # longer sentences are cut at a comma or a space
STREAM_FORMATS = ("audio", "sse")
# A sentence ends at . ! ? ; : (then a space) or at their full-width forms, or a newline.
_END = re.compile(r"(?<=[.!?;:])\s+|(?<=[。！？；：])|\n+")


@dataclass
class SpeechRequest:
    model: str
    text: str
    voice: str | None = None
    response_format: str = "wav"
    speed: float | None = None
    stream: bool = False
    stream_format: str = "audio"


def parse(body: Any, default_format: str = "wav") -> SpeechRequest:
    model = require_model(body)
    check_fields(body, FIELDS, "text-to-speech")
    text, other = body.get("input"), body.get("text")
    if text is not None and other is not None:
        raise invalid("send the text once: as 'input' or as 'text'", "input")
    text = text if text is not None else other
    if not isinstance(text, str) or not text.strip():
        raise invalid("'input' must be the non-empty text to speak", "input")
    req = SpeechRequest(model=model, text=text)
    voice = body.get("voice")
    if voice is not None:
        if isinstance(voice, dict) and isinstance(voice.get("id"), str):
            voice = voice["id"]  # OpenAI's custom-voice object form
        if not isinstance(voice, str) or not voice.strip():
            raise invalid("'voice' must be the name of one of the model's voices", "voice")
        req.voice = voice.strip()
    fmt = body.get("response_format", default_format)
    if fmt not in audio.FORMATS:
        raise invalid(f"'response_format' must be one of {', '.join(audio.FORMATS)}, got "
                      f"{fmt!r}", "response_format")
    req.response_format = fmt
    speed = body.get("speed")
    if speed is not None:
        if isinstance(speed, bool) or not isinstance(speed, int | float) or \
                not 0.25 <= speed <= 4.0:
            raise invalid(f"'speed' must be a number from 0.25 to 4.0, got {speed!r}", "speed")
        req.speed = float(speed)
    if body.get("instructions") not in (None, ""):
        raise invalid("'instructions' (a spoken style) is not supported by these models; "
                      "leave it out", "instructions")
    req.stream = bool_field(body, "stream")
    sf = body.get("stream_format")
    if sf is not None:
        if sf not in STREAM_FORMATS:
            raise invalid(f"'stream_format' must be 'audio' or 'sse', got {sf!r}",
                          "stream_format")
        req.stream_format = sf
        req.stream = True
    return req


def sentences(text: str, max_chars: int = DEFAULT_MAX_CHARS) -> list[str]:
    """The text in sentences, each at most SENTENCE_CHARS; refuses over-long text."""
    if len(text) > max_chars:
        raise invalid(f"the input is {len(text)} characters, over the limit of {max_chars} "
                      "(tts.max_input_chars); split it into several requests", "input")
    out: list[str] = []
    for part in _END.split(text):
        part = " ".join(part.split())
        while len(part) > SENTENCE_CHARS:
            cut = max(part.rfind(", ", 0, SENTENCE_CHARS), part.rfind(" ", 0, SENTENCE_CHARS))
            cut = cut + 1 if cut > 0 else SENTENCE_CHARS
            out.append(part[:cut].strip())
            part = part[cut:].strip()
        if part and any(ch.isalnum() for ch in part):
            out.append(part)
    if not out:
        raise invalid("the input has no words to speak", "input")
    return out


def check_voice(voice: str | None, voices: list[str], model: str) -> str | None:
    """The voice to use (None: the model's default); refuses unknown ones by listing the
    known."""
    if voice is None or voice == "default":
        if "default" in voices:
            return None  # the engine's own default speaker
        if voices:
            return voices[0]
        raise invalid(f"model {model!r} has no voice: add one as voices/NAME.bin (512 "
                      "float32 values) in the model's folder", "voice")
    if voice not in voices:
        raise invalid(f"model {model!r} has no voice {voice!r}; its voices: "
                      f"{', '.join(voices) or 'none'} (add one as voices/NAME.bin, 512 "
                      "float32 values, in the model's folder)", "voice")
    return voice


def response(samples: np.ndarray, rate: int, fmt: str) -> dict[str, Any]:
    """AOG's unary answer: the audio file in base64 with what it is."""
    return {"audio": base64.b64encode(audio.encode(samples, rate, fmt)).decode(),
            "format": fmt, "content_type": audio.FORMATS[fmt], "sample_rate": rate,
            "duration": round(len(samples) / rate, 3)}


def chunk(samples: np.ndarray, rate: int, fmt: str, index: int, text: str) -> dict[str, Any]:
    """One streamed sentence: its audio (a whole file of `fmt`) in base64."""
    return {"object": "audio.speech.chunk", "index": index, "text": text,
            "audio": base64.b64encode(audio.encode(samples, rate, fmt)).decode(),
            "format": fmt, "sample_rate": rate, "duration": round(len(samples) / rate, 3)}
