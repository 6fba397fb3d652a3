"""Audio in and out for the speech services: decoding uploaded files (WAV, FLAC, MP3, OGG) and
raw PCM to 16 kHz float32 mono, incremental resampling of PCM streams, encoding synthesized
speech (WAV, FLAC, MP3, raw PCM), subtitles (SRT, WebVTT), and base64 / data-URL payloads.

Decoding is libsndfile (through soundfile, whose wheels bundle it: no system ffmpeg) and
resampling is soxr. Everything decoded comes from outside: arbitrary bytes are refused with a
ServiceError (invalid request) that says what was wrong, never another exception.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import soundfile as sf
import soxr

from ovms_plugin.service.errors import ServiceError, invalid

TARGET_RATE = 16000
DEFAULT_MAX_SECONDS = 3600.0
MIN_RATE = 1000
MAX_RATE = 384000
MAX_CHANNELS = 32
# 400 MB of base64 text (about 300 MB of audio).
MAX_BASE64_CHARS = 400 * 1024 * 1024

# Content types of the encodings `encode` writes (OpenAI's response_format values). MP3 is
# written by libsndfile's LAME encoder (libsndfile >= 1.1, as in soundfile's wheels); with a
# libsndfile that has no MP3 support it is left out, and asking for it is refused.
FORMATS = {"wav": "audio/wav", "flac": "audio/flac", "mp3": "audio/mpeg", "pcm": "audio/pcm"}
if "MP3" not in sf.available_formats():
    del FORMATS["mp3"]

_NOT_AUDIO = "the file is not audio soundfile can read: WAV, FLAC, MP3 or OGG"
# libsndfile's major formats as the source_format we report; others are refused.
_SOURCE_FORMAT = {"WAV": "WAV", "WAVEX": "WAV", "RF64": "WAV", "FLAC": "FLAC", "MP3": "MP3",
                  "OGG": "OGG"}
# Frames read (and downmixed, resampled) at a time: the whole file is never held at its source
# rate and channel count, so memory follows the 16 kHz mono result.
_BLOCK_FRAMES = 1 << 16
# libsndfile's frame count for a stream of unknown length (e.g. FLAC without total samples).
_UNKNOWN_FRAMES = 1 << 62
# Sample rates the MPEG audio encoder takes.
_MP3_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)
_WAV_TAGS = {0x0001: "PCM", 0x0003: "IEEE float", 0x0006: "A-law", 0x0007: "µ-law",
             0x0002: "MS ADPCM", 0x0011: "IMA ADPCM", 0x0055: "MPEG Layer 3",
             0x0050: "MPEG", 0x0031: "GSM 6.10", 0xFFFE: "extensible"}


@dataclass
class Audio:
    samples: np.ndarray  # float32 mono at TARGET_RATE, in [-1, 1]
    source_rate: int
    source_channels: int
    source_format: str  # "WAV", "FLAC", "MP3", "OGG", "PCM"

    @property
    def seconds(self) -> float:
        return len(self.samples) / TARGET_RATE


# ---------------------------------------------------------------------------------------------
# Decoding files


def _sniff(data: bytes) -> str | None:
    """The container the first bytes announce, or None: libsndfile only sees bytes that start
    like one of the formats accepted (its parsers for the dozens of other formats stay out of
    reach of uploads)."""
    head = bytes(data[:12])
    if head[:4] in (b"RIFF", b"RIFX", b"RF64") and head[8:12] == b"WAVE":
        return "WAV"
    if head[:4] == b"fLaC":
        return "FLAC"
    if head[:4] == b"OggS":
        return "OGG"
    if head[:3] == b"ID3":  # an ID3v2 tag: MP3, or (rarely) FLAC behind a tag
        return "MP3"
    if len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0:  # MPEG frame sync
        return "MP3"
    return None


def _wav_tag(data: bytes) -> int | None:
    """The format tag of a RIFF WAV's 'fmt ' chunk, or None when there is none to read."""
    pos, end = 12, min(len(data), 1 << 20)
    while pos + 8 <= end:
        cid, size = data[pos:pos + 4], struct.unpack_from("<I", data, pos + 4)[0]
        if cid == b"fmt ":
            return struct.unpack_from("<H", data, pos + 8)[0] if pos + 10 <= len(data) else None
        pos += 8 + size + (size & 1)
    return None


def _libsndfile_reason(e: Exception) -> str:
    reason = getattr(e, "error_string", "") or ""
    # What libsndfile says when no format matched, which reads as a host-file problem.
    if not reason or "regular file" in reason or "does not exist" in reason:
        return ""
    return f" ({reason.strip().rstrip('.')})"


def _open_error(data: bytes, kind: str, e: Exception, param: str) -> ServiceError:
    reason = _libsndfile_reason(e)
    if kind == "WAV":
        tag = _wav_tag(data) if data[:4] == b"RIFF" else None
        what = ""
        if tag is not None:
            what = f" encoded as format 0x{tag:04X}"
            if tag in _WAV_TAGS:
                what += f" ({_WAV_TAGS[tag]})"
        return invalid(f"the WAV file{what} cannot be decoded{reason}: send WAV as PCM "
                       "(8, 16, 24 or 32-bit), float, µ-law, A-law or ADPCM, or FLAC, MP3 or "
                       "OGG", param)
    return invalid(f"the {kind} file cannot be decoded{reason}: it is truncated, corrupt or "
                   f"in an encoding libsndfile does not read; {_NOT_AUDIO}", param)


def _check_format(rate: int, channels: int, param: str) -> None:
    if not MIN_RATE <= rate <= MAX_RATE:
        raise invalid(f"the audio's sample rate is {rate} Hz: it must be from {MIN_RATE} to "
                      f"{MAX_RATE} Hz", param)
    if not 1 <= channels <= MAX_CHANNELS:
        raise invalid(f"the audio has {channels} channels: at most {MAX_CHANNELS} are "
                      "accepted", param)


def _too_long(seconds: float, max_seconds: float, param: str) -> ServiceError:
    return invalid(f"the audio is {seconds:.1f} s long, longer than the {max_seconds:g} s "
                   "allowed: send a shorter recording or split it", param)


def _new_stream(rate: int) -> soxr.ResampleStream:
    return soxr.ResampleStream(rate, TARGET_RATE, 1, dtype="float32", quality="HQ")


class _ReadError(Exception):
    def __init__(self, error_string: str):
        super().__init__(error_string)
        self.error_string = error_string


def _read_block(f: sf.SoundFile, frames: int) -> np.ndarray:
    """Up to `frames` frames as float32 (frames, channels); none at the end.

    libsndfile is called directly (soundfile's own C handles): SoundFile.read seeks to keep its
    position after every read, and seeking fails in a file of unknown length (a FLAC written
    to a pipe, whose header says 0 samples), so read() could not decode such a file."""
    out = np.empty((frames, f.channels), np.float32)
    got = sf._snd.sf_readf_float(f._file, sf._ffi.cast("float *", out.ctypes.data), frames)
    err = sf._snd.sf_error(f._file)
    if err:
        raise _ReadError(sf._ffi.string(sf._snd.sf_error_number(err)).decode("utf-8", "replace"))
    return out[:got]


def decode(data: bytes, *, max_seconds: float = DEFAULT_MAX_SECONDS,
           param: str = "file") -> Audio:
    """A whole audio file from memory as float32 mono at 16 kHz.

    The file is read in blocks, each downmixed (mean of channels) and fed to one soxr HQ
    resampling stream, which gives the same samples as soxr.resample on the whole signal while
    holding only the 16 kHz mono result. The duration is checked from the header before any
    frame is decoded, and again while reading (headers can lie, or not know the length)."""
    if not math.isfinite(max_seconds) or max_seconds <= 0:
        raise ValueError(f"max_seconds must be a positive number, got {max_seconds!r}")
    if not isinstance(data, bytes | bytearray | memoryview):
        raise invalid(f"the file must be bytes, got {type(data).__name__}", param)
    data = bytes(data)
    if not data:
        raise invalid("the file is empty: send the bytes of a WAV, FLAC, MP3 or OGG file",
                      param)
    kind = _sniff(data)
    if kind is None:
        raise invalid(_NOT_AUDIO, param)
    try:
        f = sf.SoundFile(io.BytesIO(data))
    except Exception as e:  # libsndfile's refusals, and anything its wrapper raises on junk
        raise _open_error(data, kind, e, param) from None
    with f:
        source_format = _SOURCE_FORMAT.get(f.format)
        if source_format is None:
            raise invalid(_NOT_AUDIO, param)
        rate, channels, frames = int(f.samplerate), int(f.channels), int(f.frames)
        _check_format(rate, channels, param)
        if frames <= 0:
            raise invalid("the audio is empty: the file holds no samples", param)
        if frames < _UNKNOWN_FRAMES and frames / rate > max_seconds:
            raise _too_long(frames / rate, max_seconds, param)
        limit = math.floor(max_seconds * rate)
        stream = _new_stream(rate) if rate != TARGET_RATE else None
        out: list[np.ndarray] = []
        total = 0
        while True:
            try:
                block = _read_block(f, _BLOCK_FRAMES)
            except Exception as e:
                raise invalid(f"the {source_format} file is corrupt: decoding failed after "
                              f"{total / rate:.2f} s{_libsndfile_reason(e)}", param) from None
            if len(block) == 0:
                break
            total += len(block)
            if total > limit:
                raise _too_long(total / rate, max_seconds, param)
            if not np.isfinite(block).all():
                raise invalid(f"the {source_format} file holds samples that are not finite "
                              "numbers (NaN or infinity): float audio must hold values in "
                              "[-1, 1]", param)
            mono = block.mean(axis=1, dtype=np.float32) if channels > 1 else block[:, 0]
            out.append(stream.resample_chunk(mono, last=False) if stream else mono.copy())
        if stream is not None:
            out.append(stream.resample_chunk(np.zeros(0, np.float32), last=True))
    if total == 0:
        raise invalid("the audio is empty: the file holds no samples", param)
    samples = np.concatenate(out) if out else np.zeros(0, np.float32)
    # Float WAVs may hold values slightly over 1.0, and lossy decoders and the resampler can
    # overshoot a full-scale signal a little: finite values are clipped to [-1, 1] silently.
    np.clip(samples, -1.0, 1.0, out=samples)
    return Audio(samples.astype(np.float32, copy=False), rate, channels, source_format)


# ---------------------------------------------------------------------------------------------
# Raw PCM


def _check_pcm(sample_rate: int, channels: int, sample_width: int) -> None:
    for name, value, lo, hi in (("sample_rate", sample_rate, MIN_RATE, MAX_RATE),
                                ("channels", channels, 1, MAX_CHANNELS),
                                ("sample_width", sample_width, 1, 4)):
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            unit = " (bytes: 1 = unsigned 8-bit, 2, 3 or 4 = signed 16, 24 or 32-bit)" \
                if name == "sample_width" else ""
            raise invalid(f"'{name}' must be an integer from {lo} to {hi}{unit}, got "
                          f"{value!r}", name)


def _pcm_frames(data: bytes, channels: int, width: int) -> np.ndarray:
    """Whole frames of little-endian PCM as float32 in [-1, 1), shape (frames, channels)."""
    if width == 1:
        x = (np.frombuffer(data, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 2:
        x = np.frombuffer(data, "<i2").astype(np.float32) / 32768.0
    elif width == 3:
        b = np.frombuffer(data, np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        v = (v << 8) >> 8  # sign-extend the 24-bit value
        x = v.astype(np.float32) / 8388608.0
    else:
        x = (np.frombuffer(data, "<i4").astype(np.float64) / 2147483648.0).astype(np.float32)
    return x.reshape(-1, channels)


def _mono(frames: np.ndarray) -> np.ndarray:
    if frames.shape[1] == 1:
        return np.ascontiguousarray(frames[:, 0], dtype=np.float32)
    return frames.mean(axis=1, dtype=np.float32)


def decode_pcm(data: bytes, *, sample_rate: int, channels: int = 1, sample_width: int = 2,
               param: str = "audio") -> Audio:
    """Raw little-endian PCM (width 1: unsigned 8-bit; 2, 3, 4: signed 16, 24, 32-bit),
    channels interleaved, as float32 mono at 16 kHz."""
    _check_pcm(sample_rate, channels, sample_width)
    if not isinstance(data, bytes | bytearray | memoryview):
        raise invalid(f"the audio must be bytes, got {type(data).__name__}", param)
    data = bytes(data)
    frame = channels * sample_width
    if not data:
        raise invalid("the audio is empty: no PCM bytes were sent", param)
    if len(data) % frame:
        raise invalid(f"the audio is {len(data)} bytes, not a whole number of {frame}-byte "
                      f"frames ({channels} channel(s) of {sample_width} byte(s)): the last "
                      "frame is cut", param)
    mono = _mono(_pcm_frames(data, channels, sample_width))
    if sample_rate != TARGET_RATE:
        mono = soxr.resample(mono, sample_rate, TARGET_RATE, quality="HQ").astype(np.float32)
    np.clip(mono, -1.0, 1.0, out=mono)
    return Audio(mono, sample_rate, channels, "PCM")


class PcmResampler:
    """Raw PCM arriving in chunks, as float32 mono at 16 kHz: one soxr stream across the
    chunks (no click at their boundaries), and a partial frame kept until its rest arrives.
    Any chunking of a stream gives the same samples as feeding it at once."""

    def __init__(self, sample_rate: int, channels: int = 1, sample_width: int = 2):
        _check_pcm(sample_rate, channels, sample_width)
        self.sample_rate = sample_rate
        self.channels = channels
        self.sample_width = sample_width
        self._frame = channels * sample_width
        self._pending = b""
        self._stream = _new_stream(sample_rate) if sample_rate != TARGET_RATE else None

    def feed(self, data: bytes) -> np.ndarray:
        """16 kHz samples for the whole frames received so far and not yet returned."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise invalid(f"the audio must be bytes, got {type(data).__name__}", "audio")
        buf = self._pending + bytes(data)
        whole = len(buf) - len(buf) % self._frame
        self._pending = buf[whole:]
        mono = _mono(_pcm_frames(buf[:whole], self.channels, self.sample_width))
        if self._stream is not None:
            mono = self._stream.resample_chunk(mono, last=False)
        return np.clip(mono, -1.0, 1.0).astype(np.float32, copy=False)

    def flush(self) -> np.ndarray:
        """The resampler's tail at the end of the stream; the resampler is then ready for a
        new stream. A stream that ends within a frame is refused."""
        pending, self._pending = self._pending, b""
        tail = np.zeros(0, np.float32)
        if self._stream is not None:
            tail = self._stream.resample_chunk(tail, last=True)
            self._stream = _new_stream(self.sample_rate)
        if pending:
            raise invalid(f"the audio stream ended within a frame: {len(pending)} byte(s) "
                          f"left over, frames are {self._frame} bytes ({self.channels} "
                          f"channel(s) of {self.sample_width} byte(s))", "audio")
        return np.clip(tail, -1.0, 1.0).astype(np.float32, copy=False)


# ---------------------------------------------------------------------------------------------
# Encoding


def _as_mono(samples: np.ndarray) -> np.ndarray:
    x = np.asarray(samples, dtype=np.float32)
    if x.ndim == 2 and x.shape[1] == 1:
        x = x[:, 0]
    if x.ndim != 1:
        raise ValueError(f"samples must be one channel (a 1-D array), got shape {x.shape}")
    # NaN (a broken model output) becomes silence; everything is clipped to [-1, 1].
    return np.clip(np.nan_to_num(x, nan=0.0, posinf=1.0, neginf=-1.0), -1.0, 1.0)


def pcm16(samples: np.ndarray) -> bytes:
    """Float samples (clipped to [-1, 1]) as raw signed 16-bit little-endian bytes."""
    return np.rint(_as_mono(samples) * 32767.0).astype("<i2").tobytes()


def encode(samples: np.ndarray, rate: int, fmt: str) -> bytes:
    """Mono float samples at `rate` as a file: 16-bit WAV, 16-bit FLAC, MP3, or raw s16le
    ("pcm", what OpenAI's response_format pcm is)."""
    if fmt not in FORMATS:
        raise invalid(f"'response_format' must be one of: {', '.join(FORMATS)}; got {fmt!r}",
                      "response_format")
    if isinstance(rate, bool) or not isinstance(rate, int) or not MIN_RATE <= rate <= MAX_RATE:
        raise ValueError(f"rate must be an integer from {MIN_RATE} to {MAX_RATE}, got {rate!r}")
    if fmt == "pcm":
        return pcm16(samples)
    x = _as_mono(samples)
    buf = io.BytesIO()
    if fmt == "mp3":
        if rate not in _MP3_RATES:  # MPEG audio has a fixed set of rates: the next one up
            to = next((r for r in _MP3_RATES if r >= rate), _MP3_RATES[-1])
            x = np.clip(soxr.resample(x, rate, to, quality="HQ"), -1.0, 1.0)
            rate = to
        sf.write(buf, x.astype(np.float32), rate, format="MP3", subtype="MPEG_LAYER_III")
    else:
        pcm = np.rint(x * 32767.0).astype(np.int16)
        sf.write(buf, pcm, rate, format=fmt.upper(), subtype="PCM_16")
    return buf.getvalue()


def wav_stream_header(rate: int) -> bytes:
    """The 44-byte header of a 16-bit mono PCM WAV of unknown length (RIFF and data sizes
    0xFFFFFFFF, as streaming servers send), to be followed by pcm16() chunks."""
    return (b"RIFF" + struct.pack("<I", 0xFFFFFFFF) + b"WAVE"
            + b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16)
            + b"data" + struct.pack("<I", 0xFFFFFFFF))


# ---------------------------------------------------------------------------------------------
# Subtitles


def timestamp(seconds: float, sep: str = ".") -> str:
    """HH:MM:SS.mmm (sep "," for SRT); hours are zero-padded to at least two digits."""
    ms = round(seconds * 1000) if math.isfinite(seconds) and seconds > 0 else 0
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def _cue_text(text: str) -> str:
    # A blank line would end the cue early: line breaks inside a text are kept single.
    return re.sub(r"\s*\n\s*", "\n", text.strip())


def srt(segments: Iterable[tuple[float, float, str]], first: int = 1) -> str:
    """SubRip: numbered cues from `first`, "00:00:01,000 --> 00:00:02,500", the text, a
    blank line."""
    cues = []
    for start, end, text in segments:
        text = _cue_text(text)
        if text:
            cues.append(f"{len(cues) + first}\n{timestamp(start, ',')} --> {timestamp(end, ',')}\n"
                        f"{text}\n\n")
    return "".join(cues)


def vtt(segments: Iterable[tuple[float, float, str]]) -> str:
    """WebVTT: the WEBVTT header, then "00:00:01.000 --> 00:00:02.500", the text, a blank
    line per cue. Text is escaped (&, <, >), as cue text is markup in WebVTT."""
    out = ["WEBVTT\n\n"]
    for start, end, text in segments:
        text = _cue_text(text)
        if text:
            text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            out.append(f"{timestamp(start)} --> {timestamp(end)}\n{text}\n\n")
    return "".join(out)


# ---------------------------------------------------------------------------------------------
# Base64 and data URLs

_DATA_URL = re.compile(r"data:([^,;]*)((?:;[^,;]*)*),", re.IGNORECASE)
_WHITESPACE = re.compile(r"\s+")


def decode_base64_or_data_url(value: str, param: str = "audio") -> bytes:
    """The bytes of base64 text (standard or URL-safe alphabet, padded or not, whitespace
    allowed) or of a data:audio/...;base64,... URL."""
    if not isinstance(value, str):
        raise invalid(f"'{param}' must be a base64 string or a data:audio/...;base64, URL, got "
                      f"{type(value).__name__}", param)
    if len(value) > MAX_BASE64_CHARS:
        raise invalid(f"'{param}' is {len(value) / 1e6:.0f} million characters of base64: at "
                      f"most {MAX_BASE64_CHARS // (1024 * 1024)} MB are accepted", param)
    text = value.strip()
    if text[:5].lower() == "data:":
        m = _DATA_URL.match(text)
        if m is None:
            raise invalid(f"'{param}' is not a valid data URL: expected "
                          "data:audio/<type>;base64,<data>", param)
        media = m.group(1).strip().lower()
        params = [p.strip().lower() for p in m.group(2).split(";") if p.strip()]
        if media and not media.startswith("audio/") and media != "application/octet-stream":
            raise invalid(f"'{param}' is a data URL of {media}: expected an audio/... data URL",
                          param)
        if "base64" not in params:
            raise invalid(f"'{param}' is a data URL without ;base64: expected "
                          "data:audio/<type>;base64,<data>", param)
        text = text[m.end():]
    if text.isascii() and len(text) % 4 == 0:
        # The common case (standard, padded, no whitespace) at C speed: megabytes of audio
        # in a few milliseconds; anything else takes the careful path below.
        try:
            raw = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            pass
        else:
            if raw:
                return raw
    text = _WHITESPACE.sub("", text)
    if not text:
        raise invalid(f"'{param}' is empty: expected base64-encoded audio", param)
    if not text.isascii():
        raise invalid(f"'{param}' is not base64: it holds characters outside the base64 "
                      "alphabet", param)
    # The URL-safe alphabet's - and _ are the standard + and /; padding is optional.
    text = text.replace("-", "+").replace("_", "/").rstrip("=")
    if len(text) % 4 == 1:
        raise invalid(f"'{param}' is not valid base64: its length ({len(text)} characters "
                      "without padding) cannot be a whole number of bytes", param)
    try:
        raw = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise invalid(f"'{param}' is not base64: it holds characters outside the base64 "
                      "alphabet (A-Z, a-z, 0-9, + and /, or - and _)", param) from None
    if not raw:
        raise invalid(f"'{param}' is empty: expected base64-encoded audio", param)
    return raw
