"""speech-to-text: request parsing (AOG's JSON body and OpenAI's multipart form, as one
dict), where the audio comes from, language checks against the model, and the response
shapes (AOG's segments, OpenAI's json, text, srt, vtt and verbose_json)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from ovms_plugin.engine.requests import TranscribeResult
from ovms_plugin.service import audio
from ovms_plugin.service.errors import check_fields, invalid, require_model

# "aog": AOG's {"text", "segments": [{"id", "start", "end", "text"}]}, what a body without
# response_format gets; the OpenAI routes ask for "json" unless told otherwise.
RESPONSE_FORMATS = ("aog", "json", "text", "srt", "vtt", "verbose_json")
TASKS = ("transcribe", "translate")
FIELDS = frozenset({"model", "audio", "file", "language", "prompt", "response_format",
                    "temperature", "timestamp_granularities", "task", "stream"})
_MAX_PATH = 4096


@dataclass
class TranscribeRequest:
    model: str
    data: bytes  # the audio file's bytes, still encoded
    language: str | None = None  # as given ("en", "<|en|>"); None: detect
    prompt: str | None = None
    response_format: str = "aog"
    temperature: float = 0.0
    task: str = "transcribe"
    param: str = "audio"  # the field the audio came in: errors name it


def _audio_bytes(body: dict, allow_paths: bool) -> bytes:
    file = body.get("file")
    value = body.get("audio")
    if file is not None and value is not None:
        raise invalid("send the audio once: as 'file' (a multipart upload) or as 'audio'",
                      "audio")
    if file is not None:
        if not isinstance(file, bytes | bytearray):
            raise invalid("'file' is the audio file of a multipart/form-data upload; in a "
                          "JSON body send 'audio' (base64 or a data: URL)", "file")
        return bytes(file)
    if not isinstance(value, str) or not value.strip():
        raise invalid("'audio' is required: a path to an audio file on this machine, the "
                      "file's bytes in base64, or a data: URL", "audio")
    value = value.strip()
    if value.startswith("data:"):
        return audio.decode_base64_or_data_url(value, "audio")
    if allow_paths and len(value) < _MAX_PATH and "\0" not in value:
        path = os.path.expanduser(value)
        if os.path.isfile(path):
            return _read_file(path)
    try:
        return audio.decode_base64_or_data_url(value, "audio")
    except Exception:
        where = "a path to an audio file on this machine, " if allow_paths else ""
        raise invalid(f"'audio' is neither {where}base64 audio nor a data: URL (a path is "
                      "read only when it names an existing file)", "audio") from None


def _read_file(path: str) -> bytes:
    limit = audio.MAX_BASE64_CHARS * 3 // 4
    try:
        size = os.path.getsize(path)
        if size > limit:
            raise invalid(f"the audio file is {size / 2**20:.0f} MiB, over the limit of "
                          f"{limit / 2**20:.0f} MiB", "audio")
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise invalid(f"cannot read the audio file: {e.strerror or type(e).__name__}",
                      "audio") from None


def parse(body: Any, *, allow_paths: bool = False, task: str | None = None
          ) -> TranscribeRequest:
    """The request of a body from AOG (JSON, `audio`) or an OpenAI form (`file`);
    `allow_paths`: `audio` may name a local file (AOG passes its client's path)."""
    model = require_model(body)
    check_fields(body, FIELDS, "speech-to-text")
    if body.get("stream") not in (None, False):
        raise invalid("streamed transcription is not offered here; for live audio use the "
                      "speech-to-text-ws service (AOG's WebSocket)", "stream")
    req = TranscribeRequest(model=model, data=_audio_bytes(body, allow_paths),
                            param="file" if body.get("file") is not None else "audio")
    lang = body.get("language")
    if lang is not None:
        if not isinstance(lang, str):
            raise invalid("'language' must be a string such as 'en'", "language")
        req.language = lang.strip() or None
    prompt = body.get("prompt")
    if prompt is not None:
        if not isinstance(prompt, str):
            raise invalid("'prompt' must be a string", "prompt")
        req.prompt = prompt or None
    fmt = body.get("response_format")
    if fmt is not None:
        if fmt not in RESPONSE_FORMATS:
            raise invalid(f"'response_format' must be one of {', '.join(RESPONSE_FORMATS)}, "
                          f"got {fmt!r}", "response_format")
        req.response_format = fmt
    t = body.get("temperature")
    if t is not None:
        if isinstance(t, bool) or not isinstance(t, int | float) or not 0 <= t <= 1:
            raise invalid(f"'temperature' must be a number from 0 to 1, got {t!r}",
                          "temperature")
        req.temperature = float(t)
    grains = body.get("timestamp_granularities")
    if grains is not None:
        if not isinstance(grains, list) or not all(isinstance(g, str) for g in grains):
            raise invalid("'timestamp_granularities' must be a list such as [\"segment\"]",
                          "timestamp_granularities")
        if set(grains) - {"segment"}:
            raise invalid("only segment timestamps are offered ('timestamp_granularities': "
                          "[\"segment\"]); word timestamps are not", "timestamp_granularities")
    chosen = body.get("task", task or "transcribe")
    if chosen not in TASKS:
        raise invalid(f"'task' must be 'transcribe' or 'translate', got {chosen!r}", "task")
    if task is not None and chosen != task:
        raise invalid(f"this route is for '{task}'; 'task' {chosen!r} belongs to the other",
                      "task")
    req.task = chosen
    return req


def language_token(lang: str | None, languages: list[str], task: str, model: str
                   ) -> str | None:
    """The model's token for a language given as "en", "EN" or "<|en|>" ("auto" or None:
    detect). An English-only model (no language tokens) takes English or nothing."""
    if lang is None or lang.lower() == "auto":
        if task == "translate" and not languages:
            raise invalid(f"model {model!r} is English-only: it cannot translate", "task")
        return None
    code = lang.strip().lower().removeprefix("<|").removesuffix("|>")
    if not languages:
        if code != "en":
            raise invalid(f"model {model!r} is English-only; 'language' must be 'en' or left "
                          "out", "language")
        return None
    token = f"<|{code}|>"
    if token not in languages:
        shown = ", ".join(t[2:-2] for t in languages[:12])
        raise invalid(f"model {model!r} does not know language {lang!r}; give an ISO 639-1 "
                      f"code it knows ({shown}{', ...' if len(languages) > 12 else ''}) or "
                      "leave it out to detect it", "language")
    return token


def _code(token: str | None) -> str | None:
    return token[2:-2] if token and token.startswith("<|") else token


def response(result: TranscribeResult, fmt: str, task: str) -> dict[str, Any]:
    """The response object; for text, srt and vtt, `text` holds the formatted document
    (the HTTP routes send it as text/plain, AOG gets the object)."""
    segments = [(s, e, t) for s, e, t in result.segments if t.strip()] or \
        ([(0.0, result.seconds, result.text)] if result.text.strip() else [])
    text = result.text.strip()
    if fmt == "aog":
        return {"text": text, "language": _code(result.language),
                "duration": round(result.seconds, 3),
                "segments": [{"id": i, "start": audio.timestamp(s), "end": audio.timestamp(e),
                              "text": t.strip()} for i, (s, e, t) in enumerate(segments)]}
    if fmt == "json":
        return {"text": text, "usage": {"type": "duration",
                                        "seconds": max(1, round(result.seconds))}}
    if fmt == "verbose_json":
        return {"task": task, "language": _code(result.language),
                "duration": round(result.seconds, 3), "text": text,
                "segments": [{"id": i, "start": round(s, 3), "end": round(e, 3),
                              "text": t.strip()} for i, (s, e, t) in enumerate(segments)],
                "usage": {"type": "duration", "seconds": max(1, round(result.seconds))}}
    if fmt == "srt":
        return {"text": audio.srt(segments), "format": "srt"}
    if fmt == "vtt":
        return {"text": audio.vtt(segments), "format": "vtt"}
    return {"text": text, "format": "text"}
