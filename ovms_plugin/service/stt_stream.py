"""speech-to-text-ws: live transcription over a bidirectional stream (AOG bridges its
client's WebSocket onto InvokeServiceBidi), in AOG's WebSocket protocol:

  client: {"action": "run-task", "model"?, "parameters": {"format", "sample_rate",
          "language", "use_vad"}} (text), then audio (binary), then
          {"action": "finish-task"} (text);
  server: task-started, result-generated (partial and final sentences), task-finished, or
          task-failed with error_code and error_message (the stream then ends).

Audio: `pcm` (signed 16-bit little-endian, mono unless `channels` says otherwise, at
`sample_rate`) or `wav` (a WAV stream: its header, then PCM; chunks that are whole WAV
files of their own are taken too). Compressed formats cannot be cut at arbitrary bytes and
are refused.

Segmentation (documented in the README): with `use_vad` (the default), an energy voice
detector on 30 ms frames opens a sentence at speech and closes it after `vad_silence_ms` of
quiet, or at `max_segment_seconds`; without it, fixed windows of `window_seconds`. While a
sentence is open it is transcribed again every `partial_seconds` of new audio (a partial
result: `end_time` null, `sentence_end` false); a closed one is transcribed once more (the
final result). Finishing, closing, or the end of the input flushes the open sentence.

Each stream holds its model (a lease) while open and waits for input at most
`stream_idle_seconds`; its transcriptions queue with every other request on the model's
engine, one stream's partials never more than one at a time, so no stream can starve
the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from ovms_plugin.engine.requests import TranscribeResult
from ovms_plugin.kinds.base import BidiMessage
from ovms_plugin.logs import escape
from ovms_plugin.service import audio, errors, speech
from ovms_plugin.service.errors import ServiceError, invalid

log = logging.getLogger(__name__)

RATE = audio.TARGET_RATE
FRAME = RATE * 30 // 1000  # 30 ms
_STREAM_FORMATS = ("pcm", "wav")
RETURN_FORMATS = ("text", "srt")


@dataclass
class StreamSettings:
    """The speech options the stream uses (settings.yaml's `speech:` section)."""

    vad_threshold_db: float = -40.0
    vad_silence_ms: int = 600
    partial_seconds: float = 1.5
    max_segment_seconds: float = 25.0
    window_seconds: float = 5.0
    stream_idle_seconds: float = 60.0
    max_audio_seconds: float = audio.DEFAULT_MAX_SECONDS

    @classmethod
    def of(cls, options: dict[str, Any]) -> StreamSettings:
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in options.items() if k in names and v is not None})


@dataclass
class Sentence:
    start: int  # sample index in the stream
    end: int
    final: bool


class Segmenter:
    """Cuts a 16 kHz stream into sentences: an energy voice detector, or fixed windows."""

    def __init__(self, s: StreamSettings, use_vad: bool) -> None:
        self.s = s
        self.use_vad = use_vad
        self.threshold = 10 ** (s.vad_threshold_db / 20)  # RMS, full scale 1.0
        self.silence_frames = max(1, math.ceil(s.vad_silence_ms / 30))
        self.max_len = int(s.max_segment_seconds * RATE)
        self.window = int(s.window_seconds * RATE)
        self.audio = np.zeros(0, np.float32)  # from `base` on
        self.base = 0  # the stream's sample index of audio[0]
        self.scanned = 0  # stream samples looked at by the detector (whole frames)
        self.open: int | None = None  # the open sentence's start
        self.quiet = 0  # quiet frames since the last speech in the open sentence
        self.last_speech = 0  # the end of the last speech frame
        self.last_end = 0  # the end of the last sentence

    @property
    def total(self) -> int:
        return self.base + len(self.audio)

    def samples(self, start: int, end: int) -> np.ndarray:
        return self.audio[start - self.base:end - self.base]

    def feed(self, samples: np.ndarray) -> list[Sentence]:
        """Adds audio; returns the sentences it closed."""
        self.audio = np.concatenate([self.audio, samples.astype(np.float32, copy=False)])
        closed: list[Sentence] = []
        while self.total - self.scanned >= FRAME:
            frame = self.samples(self.scanned, self.scanned + FRAME)
            self.scanned += FRAME
            speech = (not self.use_vad) or \
                float(np.sqrt(np.mean(frame.astype(np.float64) ** 2))) >= self.threshold
            if self.open is None:
                if speech:
                    # With voice detection, a little audio before the first loud frame
                    # keeps soft onsets (never what the last sentence had); fixed windows
                    # follow one another exactly.
                    start = self.scanned - FRAME
                    if self.use_vad:
                        start = max(self.base, self.last_end, start - 3 * FRAME)
                    self.open = start
                    self.quiet, self.last_speech = 0, self.scanned
                continue
            if speech:
                self.quiet, self.last_speech = 0, self.scanned
            else:
                self.quiet += 1
            length = self.scanned - self.open
            if self.use_vad and self.quiet >= self.silence_frames:
                closed.append(self._close(min(self.scanned, self.last_speech + 6 * FRAME)))
            elif length >= (self.max_len if self.use_vad else min(self.window, self.max_len)):
                closed.append(self._close(self.scanned))
        return closed

    def _close(self, end: int) -> Sentence:
        assert self.open is not None
        sentence = Sentence(self.open, end, True)
        self.open = None
        self.last_end = end
        return sentence

    def flush(self) -> Sentence | None:
        """Closes the open sentence at the end of the audio."""
        if self.open is None:
            return None
        return self._close(self.total)

    def open_sentence(self) -> Sentence | None:
        return None if self.open is None else Sentence(self.open, self.total, False)

    def trim(self) -> None:
        """Forgets audio no open sentence can need any more (keeps the pre-roll): called
        once the closed sentences are transcribed."""
        keep_from = self.open if self.open is not None else max(
            self.base, self.scanned - 4 * FRAME)
        if keep_from - self.base > RATE:  # in steps of a second or more
            self.audio = self.audio[keep_from - self.base:]
            self.base = keep_from


class AudioInput:
    """Bytes of the stream's format in, 16 kHz float samples out."""

    def __init__(self, fmt: str, sample_rate: int, channels: int = 1) -> None:
        if fmt not in _STREAM_FORMATS:
            raise invalid(f"stream audio format {fmt!r} is not supported: send 'pcm' (signed "
                          "16-bit little-endian) or 'wav'; compressed formats cannot be "
                          "decoded from arbitrary chunks", "format")
        self.fmt = fmt
        self.header = bytearray()
        self.resampler: audio.PcmResampler | None = None
        if fmt == "pcm":
            self.resampler = audio.PcmResampler(sample_rate, channels, 2)

    def feed(self, data: bytes) -> np.ndarray:
        if self.fmt == "wav" and data[:4] == b"RIFF" and self.resampler is not None:
            # A chunk that is a whole WAV file of its own: the last one's tail, then it.
            tail = self.resampler.flush()
            self.header = bytearray()
            self.resampler = None
            return np.concatenate([tail, self.feed(data)])
        if self.resampler is None:
            self.header += data
            parsed = _wav_header(bytes(self.header))
            if parsed is None:
                if len(self.header) > 1 << 16:
                    raise invalid("the WAV stream has no 'data' chunk in its first 64 KiB",
                                  "format")
                return np.zeros(0, np.float32)
            rate, channels, width, offset = parsed
            self.resampler = audio.PcmResampler(rate, channels, width)
            data = bytes(self.header[offset:])
            self.header = bytearray()
        return self.resampler.feed(data)

    def flush(self) -> np.ndarray:
        return self.resampler.flush() if self.resampler is not None else np.zeros(0, np.float32)


def _wav_header(b: bytes) -> tuple[int, int, int, int] | None:
    """(rate, channels, sample width, offset of the PCM) of a WAV stream's start; None
    while the header is incomplete."""
    if len(b) < 12:
        return None
    if b[:4] != b"RIFF" or b[8:12] != b"WAVE":
        raise invalid("the stream's format is 'wav' but the audio does not start with a "
                      "RIFF/WAVE header; send 'format': 'pcm' for raw samples", "format")
    pos, fmt = 12, None
    while pos + 8 <= len(b):
        cid, size = b[pos:pos + 4], struct.unpack_from("<I", b, pos + 4)[0]
        if cid == b"fmt ":
            if pos + 8 + 16 > len(b):
                return None
            tag, channels, rate, _, _, bits = struct.unpack_from("<HHIIHH", b, pos + 8)
            if tag not in (1, 0xFFFE) or bits not in (8, 16, 24, 32):
                raise invalid("the WAV stream must hold integer PCM (8, 16, 24 or 32-bit)",
                              "format")
            fmt = (rate, channels, bits // 8)
        elif cid == b"data":
            if fmt is None:
                raise invalid("the WAV stream's 'data' chunk comes before its 'fmt '",
                              "format")
            return (*fmt, pos + 8)
        pos += 8 + size + (size & 1)
    return None


@dataclass
class _Task:
    task_id: str
    model: str | None = None
    language: str | None = None
    fmt: str = "pcm"
    sample_rate: int = RATE
    channels: int = 1
    use_vad: bool = True
    return_format: str = "text"
    started: bool = False
    finals: int = 0  # final sentences sent (the SubRip cue numbers)


def _event(task_id: str, name: str, payload: dict[str, Any] | None = None,
           **header: Any) -> BidiMessage:
    body = {"header": {"task_id": task_id, "event": name, **header}, "payload": payload or {}}
    return BidiMessage("text", json.dumps(body, ensure_ascii=False).encode(),
                       {"event": name, "task_id": task_id})


def _sentence(task: _Task, s: Sentence, text: str) -> BidiMessage:
    if task.return_format == "srt" and text:
        text = audio.srt([(s.start / RATE, s.end / RATE, text)], first=task.finals + 1)
    task.finals += s.final
    return _event(task.task_id, "result-generated", {"output": {"sentence": {
        "begin_time": s.start * 1000 // RATE,
        "end_time": s.end * 1000 // RATE if s.final else None,
        "text": text, "sentence_end": s.final}}})


def _int(value: Any, name: str, lo: int, hi: int) -> int:
    try:
        n = int(str(value).strip())
    except ValueError:
        raise invalid(f"'{name}' must be an integer, got {value!r}", name) from None
    if not lo <= n <= hi:
        raise invalid(f"'{name}' must be from {lo} to {hi}, got {n}", name)
    return n


def _apply(task: _Task, params: dict[str, Any]) -> None:
    """Task settings from the metadata or a run-task's parameters."""
    for key, value in params.items():
        if value is None or value == "":
            continue
        if key == "model":
            task.model = str(value)
        elif key == "language":
            task.language = str(value)
        elif key in ("format", "audio_format"):
            task.fmt = str(value).lower()
        elif key == "sample_rate":
            task.sample_rate = _int(value, "sample_rate", 1000, 384000)
        elif key == "channels":
            task.channels = _int(value, "channels", 1, 32)
        elif key == "use_vad":
            if not isinstance(value, bool) and str(value).lower() not in ("true", "false"):
                raise invalid(f"'use_vad' must be true or false, got {value!r}", "use_vad")
            task.use_vad = value if isinstance(value, bool) else str(value).lower() == "true"
        elif key == "return_format":
            if str(value) not in RETURN_FORMATS:
                raise invalid(f"'return_format' must be text or srt (a sentence's text as a "
                              f"SubRip cue), got {value!r}", "return_format")
            task.return_format = str(value)
        elif key not in ("ws_conn_id", "service", "task", "task_id", "conn_id"):
            # (those name the connection and the service: nothing to set)
            raise invalid(f"unknown parameter {key!r} for speech-to-text-ws; known: model, "
                          "language, format, sample_rate, channels, use_vad, return_format",
                          key)


async def session(rt: Any, service: str, metadata: dict[str, str],
                  messages: AsyncIterator[BidiMessage],
                  transcribe: Any, options_of: Any) -> AsyncIterator[BidiMessage]:
    """One live transcription. `transcribe(lm, samples, language)` runs a request on the
    leased model; `options_of(lm)` are its speech settings."""
    task = _Task(task_id=metadata.get("ws_conn_id") or metadata.get("task_id") or "task")
    # Bounded: a client sending faster than the engine transcribes is slowed down by the
    # transport's flow control instead of filling memory.
    queue: asyncio.Queue[BidiMessage | None] = asyncio.Queue(maxsize=64)

    async def read() -> None:
        try:
            async for m in messages:
                await queue.put(m)
        finally:
            await queue.put(None)

    reader = asyncio.create_task(read())
    try:
        async for out in _run(rt, service, metadata, task, queue, transcribe, options_of):
            yield out
    except ServiceError as e:
        code = "CLIENT_ERROR" if e.code in (errors.INVALID_REQUEST, errors.INVALID_ARGUMENT,
                                            errors.MODEL_NOT_FOUND) else "MODEL_ERROR"
        yield _event(task.task_id, "task-failed", error_code=code, error_message=e.message)
    except Exception as e:
        log.exception("speech-to-text-ws %s failed", escape(task.task_id))
        yield _event(task.task_id, "task-failed", error_code="SERVER_ERROR",
                     error_message=errors.public(f"internal error: {type(e).__name__}: {e}"))
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await reader


async def _run(rt: Any, service: str, metadata: dict[str, str], task: _Task,
               queue: asyncio.Queue, transcribe: Any, options_of: Any
               ) -> AsyncIterator[BidiMessage]:
    _apply(task, {k: v for k, v in metadata.items() if k != "ws_conn_id"})
    pending: list[BidiMessage | None] = []
    first = await _next(queue, StreamSettings.stream_idle_seconds)
    if first is None:
        return
    if first.message_type == "text":
        action = _action(first.data)
        if action.get("action") == "finish-task":
            yield _event(task.task_id, "task-finished")
            return
        if action.get("action") == "run-task":
            _start(task, action)
        else:
            pending.append(first)
    else:
        pending.append(first)
    if not task.model:
        raise invalid("the stream names no model: send a run-task with 'model' first (or "
                      "the 'model' metadata)", "model")
    async with rt.lease(task.model, service) as lm:
        s = StreamSettings.of(options_of(lm))
        languages = lm.client.info.get("languages", [])
        language = speech.language_token(task.language, languages, "transcribe", task.model)
        if not task.started:
            task.started = True
            yield _event(task.task_id, "task-started")
        src = AudioInput(task.fmt, task.sample_rate, task.channels)
        seg = Segmenter(s, task.use_vad)
        last_partial = 0
        limit = int(s.max_audio_seconds * RATE)

        async def result(sentence: Sentence) -> BidiMessage:
            samples = seg.samples(sentence.start, sentence.end)
            out: TranscribeResult = await transcribe(lm, samples, language)
            return _sentence(task, sentence, out.text.strip())

        finishing = False
        while not finishing:
            batch = pending or [await _next(queue, s.stream_idle_seconds)]
            pending = []
            while not queue.empty():  # what arrived meanwhile, all at once
                batch.append(queue.get_nowait())
            closed: list[Sentence] = []
            for m in batch:
                if m is None:
                    finishing = True
                    break
                kind = m.message_type
                if kind in ("binary", "audio"):
                    closed += seg.feed(src.feed(m.data))
                    if seg.total > limit:
                        raise invalid(f"the stream is over {s.max_audio_seconds:.0f} seconds "
                                      "of audio (speech.max_audio_seconds)", "audio")
                elif kind == "text":
                    action = _action(m.data)
                    name = action.get("action")
                    if name == "finish-task":
                        finishing = True
                        break
                    if name == "run-task":
                        if seg.total or action.get("model") not in (None, task.model):
                            raise invalid("the task is already running: a run-task may "
                                          "change its parameters only before any audio, "
                                          "and not its model", "action")
                        _start(task, action)
                        language = speech.language_token(task.language, languages,
                                                         "transcribe", task.model)
                        src = AudioInput(task.fmt, task.sample_rate, task.channels)
                        seg = Segmenter(s, task.use_vad)
                        continue
                    raise invalid(f"unknown action {name!r}: send audio as binary messages, "
                                  "then {\"action\": \"finish-task\"}", "action")
                elif kind == "ping":
                    yield BidiMessage("pong", m.data)
                elif kind == "close":
                    finishing = True
                    break
                elif kind != "pong":
                    raise invalid(f"unknown message type {kind!r}: send 'binary' audio and "
                                  "'text' actions", "message_type")
            if finishing:
                closed += seg.feed(src.flush())
                if (last := seg.flush()) is not None:
                    closed.append(last)
            for sentence in closed:
                yield await result(sentence)
                last_partial = 0
            seg.trim()
            if not finishing and (open_ := seg.open_sentence()) is not None:
                length = open_.end - open_.start
                if length - last_partial >= s.partial_seconds * RATE:
                    last_partial = length
                    yield await result(open_)
        yield _event(task.task_id, "task-finished")


def _start(task: _Task, action: dict[str, Any]) -> None:
    params = action.get("parameters") or {}
    if not isinstance(params, dict):
        raise invalid("run-task 'parameters' must be an object", "parameters")
    if action.get("model"):
        params = {**params, "model": action["model"]}
    _apply(task, params)


def _action(data: bytes) -> dict[str, Any]:
    try:
        action = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise invalid("text messages must be JSON actions such as {\"action\": "
                      "\"finish-task\"}; send audio as binary messages", "action") from None
    if not isinstance(action, dict):
        raise invalid("a text message must be a JSON object with an 'action'", "action")
    header = action.get("header")
    if isinstance(header, dict) and "action" in header and "action" not in action:
        action = {**action.get("payload", {}), "action": header["action"]}
    return action


async def _next(queue: asyncio.Queue, idle: float) -> BidiMessage | None:
    try:
        return await asyncio.wait_for(queue.get(), idle)
    except TimeoutError:
        raise invalid(f"no audio for {idle:.0f} seconds: the stream is closed "
                      "(speech.stream_idle_seconds)", "audio") from None
