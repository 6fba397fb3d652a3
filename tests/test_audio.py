"""ovms_plugin.service.audio: decoding every format to the same 16 kHz mono samples,
resampling, refusals of hostile input, PCM streams, encoding, subtitles and base64."""

from __future__ import annotations

import base64
import io
import struct

import numpy as np
import pytest
import soundfile as sf
import soxr

from ovms_plugin.service import audio
from ovms_plugin.service.audio import (
    FORMATS,
    TARGET_RATE,
    PcmResampler,
    decode,
    decode_base64_or_data_url,
    decode_pcm,
    encode,
    pcm16,
    srt,
    timestamp,
    vtt,
    wav_stream_header,
)
from ovms_plugin.service.errors import ServiceError

RATE = 44100
SECONDS = 2.0


def _tones(rate: int = RATE, seconds: float = SECONDS) -> np.ndarray:
    """A 440 Hz + 1 kHz mixture, stereo with different mixes per channel, float32."""
    t = np.arange(int(rate * seconds)) / rate
    a, b = np.sin(2 * np.pi * 440 * t), np.sin(2 * np.pi * 1000 * t)
    return np.stack([0.4 * a + 0.2 * b, 0.3 * a + 0.3 * b], axis=1).astype(np.float32)


def _file(x: np.ndarray, rate: int, fmt: str, subtype: str | None = None) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def _wav_header(rate: int, channels: int, bits: int, tag: int, data_size: int) -> bytes:
    block = channels * bits // 8
    return (b"RIFF" + struct.pack("<I", 36 + data_size) + b"WAVE" + b"fmt "
            + struct.pack("<IHHIIHH", 16, tag, channels, rate, rate * block, block, bits)
            + b"data" + struct.pack("<I", data_size))


def _peak_hz(x: np.ndarray, rate: int = TARGET_RATE) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / rate)[np.argmax(spectrum)])


def _aligned_correlation(a: np.ndarray, b: np.ndarray, max_lag: int = 4000) -> float:
    """The best correlation of b against a over lags up to max_lag (codec delay)."""
    n = min(len(a), len(b))
    best = -1.0
    core = a[max_lag:n - max_lag]
    for lag in range(-max_lag, max_lag + 1, 1):
        seg = b[max_lag + lag:n - max_lag + lag]
        if len(seg) != len(core):
            continue
        best = max(best, float(np.corrcoef(core, seg)[0, 1]))
        if best > 0.999:
            break
    return best


def _refused(data: bytes, *words: str, param: str = "file", **kw) -> ServiceError:
    with pytest.raises(ServiceError) as e:
        decode(data, param=param, **kw)
    assert e.value.param == param
    for w in words:
        assert w in e.value.message, e.value.message
    return e.value


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    return decode(_file(_tones(), RATE, "WAV", "FLOAT")).samples


# --- decoding every format to the same samples ----------------------------------------------

LOSSLESS = [("WAV", "PCM_U8", 2e-2), ("WAV", "PCM_16", 2e-3), ("WAV", "PCM_24", 2e-3),
            ("WAV", "PCM_32", 2e-3), ("WAV", "FLOAT", 1e-6), ("WAV", "DOUBLE", 1e-6),
            ("FLAC", "PCM_16", 2e-3), ("FLAC", "PCM_24", 2e-3)]


@pytest.mark.parametrize(("fmt", "subtype", "tol"), LOSSLESS)
def test_lossless_formats_decode_to_the_same_samples(reference, fmt, subtype, tol):
    a = decode(_file(_tones(), RATE, fmt, subtype))
    assert a.source_format == fmt and a.source_rate == RATE and a.source_channels == 2
    assert a.samples.dtype == np.float32
    assert len(a.samples) == len(reference) == pytest.approx(SECONDS * TARGET_RATE, abs=2)
    assert np.abs(a.samples - reference).max() < tol
    assert a.seconds == pytest.approx(SECONDS, abs=1e-3)


LOSSY = [("OGG", "VORBIS")] + ([("MP3", "MPEG_LAYER_III")] if "MP3" in sf.available_formats()
                               else [])


@pytest.mark.parametrize(("fmt", "subtype"), LOSSY)
def test_lossy_formats_decode_to_the_same_sound(reference, fmt, subtype):
    a = decode(_file(_tones(), RATE, fmt, subtype))
    assert a.source_format == fmt and a.source_rate == RATE and a.source_channels == 2
    # MP3 may add encoder padding; libsndfile trims it when the file says how much.
    assert abs(a.seconds - SECONDS) <= 0.1
    assert _aligned_correlation(reference, a.samples) > 0.95
    rms_ref, rms = np.sqrt(np.mean(reference ** 2)), np.sqrt(np.mean(a.samples ** 2))
    assert rms == pytest.approx(rms_ref, rel=0.1)
    assert _peak_hz(a.samples) == pytest.approx(440, abs=5)


def test_resampling_puts_a_1khz_tone_at_1khz():
    t = np.arange(RATE) / RATE
    x = (0.5 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32)
    a = decode(_file(x, RATE, "WAV", "PCM_16"))
    assert len(a.samples) == TARGET_RATE
    assert _peak_hz(a.samples) == pytest.approx(1000, abs=2)
    # Amplitude is kept (HQ passband is flat), away from the edges.
    assert np.abs(a.samples[1000:-1000]).max() == pytest.approx(0.5, abs=0.01)


def test_stereo_is_downmixed_to_the_mean_of_its_channels():
    x = _tones(TARGET_RATE, 1.0)
    a = decode(_file(x, TARGET_RATE, "WAV", "FLOAT"))  # already 16 kHz: no resampling
    assert a.source_channels == 2
    np.testing.assert_allclose(a.samples, x.mean(axis=1), atol=1e-7)


@pytest.mark.parametrize("rate", [8000, 48000])
def test_other_rates_end_at_16k(rate):
    a = decode(_file(_tones(rate, 1.0), rate, "WAV", "PCM_16"))
    assert a.source_rate == rate
    assert len(a.samples) == pytest.approx(TARGET_RATE, abs=2)
    assert _peak_hz(a.samples) == pytest.approx(440, abs=2)


def test_compressed_wav_encodings_libsndfile_reads_are_accepted():
    x = _tones(TARGET_RATE, 0.5)
    for subtype in ("ULAW", "ALAW", "IMA_ADPCM", "MS_ADPCM"):
        a = decode(_file(x, TARGET_RATE, "WAV", subtype))
        assert a.seconds == pytest.approx(0.5, abs=0.03), subtype


def test_float_wav_over_full_scale_is_clipped():
    x = np.array([0.5, 1.5, -2.0, 0.25] * 100, np.float32)
    a = decode(_file(x, TARGET_RATE, "WAV", "FLOAT"))
    assert a.samples.max() == 1.0 and a.samples.min() == -1.0


# --- refusals ---------------------------------------------------------------------------------


def test_empty_and_non_audio_bytes_are_refused():
    _refused(b"", "empty")
    _refused(np.random.default_rng(3).bytes(4096), "not audio")
    _refused(b"hello, this is a text file and not a recording\n" * 50, "not audio")
    _refused(b"RIFF\x00\x00", "not audio")  # too short to be a WAV
    _refused(b"%PDF-1.7\n" + bytes(1000), "not audio", param="upload", max_seconds=10)
    with pytest.raises(ServiceError):
        decode("a string", param="file")  # type: ignore[arg-type]


@pytest.mark.parametrize("magic", [b"fLaC", b"OggS", b"ID3\x03\x00\x00\x00\x00\x00\x00",
                                   b"\xff\xfb\x90\x00", b"RIFF\x10\x00\x00\x00WAVE"])
def test_junk_behind_an_audio_signature_is_refused(magic):
    e = _refused(magic + np.random.default_rng(4).bytes(20000), "cannot be decoded")
    assert "BytesIO" not in e.message and "/" not in e.message.split(":")[0]


def test_truncated_and_corrupt_headers_are_refused():
    whole = _file(_tones(TARGET_RATE, 0.2), TARGET_RATE, "WAV", "PCM_16")
    _refused(whole[:30], "WAV file", "cannot be decoded")
    flac = _file(_tones(TARGET_RATE, 0.2), TARGET_RATE, "FLAC")
    _refused(flac[:20], "FLAC file", "cannot be decoded")


def test_a_wav_encoding_libsndfile_does_not_decode_is_refused_by_name():
    pcm = bytes(3200)
    # WAVE_FORMAT_MPEGLAYER3 and an unknown tag: libsndfile says "Malformed 'fmt ' chunk".
    _refused(_wav_header(16000, 1, 16, 0x0055, len(pcm)) + pcm, "0x0055", "MPEG Layer 3",
             "cannot be decoded")
    _refused(_wav_header(16000, 1, 16, 0x1234, len(pcm)) + pcm, "0x1234", "cannot be decoded")


def test_a_wav_without_frames_is_empty():
    _refused(_wav_header(16000, 1, 16, 1, 0), "the audio is empty")
    _refused(_file(np.zeros((0, 1), np.float32), 16000, "WAV", "PCM_16"), "the audio is empty")


def test_rates_and_channel_counts_out_of_range_are_refused():
    pcm = bytes(3200)
    _refused(_wav_header(500, 1, 16, 1, len(pcm)) + pcm, "500 Hz", "from 1000 to 384000")
    _refused(_wav_header(768000, 1, 16, 1, len(pcm)) + pcm, "768000 Hz")
    _refused(_file(np.zeros((10, 33), np.float32), 16000, "WAV", "PCM_16"), "33 channels",
             "at most 32")
    assert decode(_file(np.zeros((10, 32), np.float32), 16000, "WAV")).source_channels == 32


def test_audio_longer_than_max_seconds_is_refused():
    x = _file(_tones(TARGET_RATE, 2.0), TARGET_RATE, "FLAC")
    _refused(x, "2.0 s long", "1 s allowed", max_seconds=1.0)
    assert decode(x, max_seconds=2.0).seconds == pytest.approx(2.0)


def _flac_declaring(data: bytes, total_samples: int) -> bytes:
    """A FLAC file whose STREAMINFO declares total_samples (a 36-bit field)."""
    b = bytearray(data)
    assert b[:4] == b"fLaC"
    field = 8 + 13  # STREAMINFO body starts at 8; total samples are its last 36 bits of 18
    b[field] = (b[field] & 0xF0) | ((total_samples >> 32) & 0x0F)
    b[field + 1:field + 5] = struct.pack(">I", total_samples & 0xFFFFFFFF)
    return bytes(b)


def test_a_declared_length_over_max_seconds_is_refused_without_decoding(monkeypatch):
    flac = _flac_declaring(_file(_tones(TARGET_RATE, 0.5), TARGET_RATE, "FLAC"),
                           TARGET_RATE * 3600 * 2)

    def no_decoding(*args, **kwargs):
        raise AssertionError("frames were decoded")

    monkeypatch.setattr(audio, "_read_block", no_decoding)
    _refused(flac, "7200.0 s long", "3600 s allowed")


def test_an_unknown_length_is_checked_while_reading():
    # total samples 0: "unknown", libsndfile reports a huge frame count; the limit applies
    # to what is actually decoded.
    flac = _flac_declaring(_file(_tones(TARGET_RATE, 2.0), TARGET_RATE, "FLAC"), 0)
    assert decode(flac).seconds == pytest.approx(2.0)
    _refused(flac, "longer than the 0.5 s allowed", max_seconds=0.5)


def test_a_wav_declaring_more_data_than_it_holds_decodes_what_it_holds():
    # libsndfile clamps a WAV's data size to the bytes present: a header claiming an hour
    # costs nothing, and the duration limit applies to the real length.
    pcm = np.zeros(8000, "<i2").tobytes()
    a = decode(_wav_header(16000, 1, 16, 1, 16000 * 2 * 3600) + pcm, max_seconds=1.0)
    assert a.seconds == pytest.approx(0.5)


def test_non_finite_samples_are_refused():
    for bad in (np.nan, np.inf, -np.inf):
        x = np.array([0.1, 0.2, bad, 0.3] * 50, np.float32)
        _refused(_file(x, TARGET_RATE, "WAV", "FLOAT"), "not finite", param="audio_file")


# --- raw PCM ----------------------------------------------------------------------------------


def _pcm_bytes(x: np.ndarray, width: int) -> bytes:
    """Interleaved little-endian PCM of float frames (frames, channels)."""
    flat = x.reshape(-1).astype(np.float64)
    if width == 1:
        return np.clip(np.rint(flat * 128 + 128), 0, 255).astype(np.uint8).tobytes()
    if width == 3:
        v = np.clip(np.rint(flat * 8388608), -8388608, 8388607).astype("<i4")
        return v.view(np.uint8).reshape(-1, 4)[:, :3].tobytes()
    dtype, scale = {2: ("<i2", 32768), 4: ("<i4", 2147483648)}[width]
    return np.clip(np.rint(flat * scale), -scale, scale - 1).astype(dtype).tobytes()


@pytest.mark.parametrize(("width", "tol"), [(1, 2e-2), (2, 2e-3), (3, 2e-3), (4, 2e-3)])
def test_decode_pcm_matches_the_file_decoder(reference, width, tol):
    a = decode_pcm(_pcm_bytes(_tones(), width), sample_rate=RATE, channels=2,
                   sample_width=width)
    assert a.source_format == "PCM" and a.source_rate == RATE and a.source_channels == 2
    assert len(a.samples) == len(reference)
    assert np.abs(a.samples - reference).max() < tol


def test_decode_pcm_at_16k_is_the_samples_themselves():
    x = np.array([0.0, 0.5, -0.5, -1.0, 32767 / 32768], np.float32)
    a = decode_pcm(_pcm_bytes(x, 2), sample_rate=16000)
    np.testing.assert_array_equal(a.samples, x)


def test_decode_pcm_refusals():
    with pytest.raises(ServiceError) as e:
        decode_pcm(bytes(101), sample_rate=16000, channels=2, sample_width=2, param="chunk")
    assert e.value.param == "chunk" and "whole number of 4-byte frames" in e.value.message
    with pytest.raises(ServiceError) as e:
        decode_pcm(b"", sample_rate=16000)
    assert e.value.param == "audio" and "empty" in e.value.message
    for kw, name in (({"sample_rate": 0}, "sample_rate"), ({"sample_rate": 10**6}, "sample_rate"),
                     ({"sample_rate": 16000, "channels": 0}, "channels"),
                     ({"sample_rate": 16000, "channels": 33}, "channels"),
                     ({"sample_rate": 16000, "sample_width": 5}, "sample_width"),
                     ({"sample_rate": True}, "sample_rate"),
                     ({"sample_rate": 16000.0}, "sample_rate")):
        with pytest.raises(ServiceError) as e:
            decode_pcm(bytes(48), **kw)
        assert e.value.param == name and name in e.value.message
        with pytest.raises(ServiceError):
            PcmResampler(**kw)


@pytest.mark.parametrize(("rate", "channels", "width"),
                         [(44100, 2, 2), (22050, 1, 1), (48000, 2, 3), (16000, 1, 4),
                          (8000, 3, 2)])
def test_pcm_resampler_chunked_equals_whole(rate, channels, width):
    x = _tones(rate, 1.0)
    x = np.concatenate([x, x[:, :1]], axis=1)[:, :channels] if channels != 2 else x
    data = _pcm_bytes(x, width)
    whole = PcmResampler(rate, channels, width)
    expected = np.concatenate([whole.feed(data), whole.flush()])
    assert expected.dtype == np.float32
    assert len(expected) == pytest.approx(TARGET_RATE, abs=2)
    np.testing.assert_allclose(expected, decode_pcm(data, sample_rate=rate, channels=channels,
                                                    sample_width=width).samples, atol=1e-5)

    rng = np.random.default_rng(rate + channels + width)
    r = PcmResampler(rate, channels, width)
    parts, pos = [], 0
    sizes = [1, 1, 2, 3, 5, 7, 11]  # single bytes first: frames split in every way
    while pos < len(data):
        size = sizes.pop(0) if sizes else int(rng.integers(1, 6000))
        parts.append(r.feed(data[pos:pos + size]))
        pos += size
    parts.append(r.flush())
    got = np.concatenate(parts)
    assert len(got) == len(expected)
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_pcm_resampler_refuses_a_stream_ending_within_a_frame_and_can_be_reused():
    r = PcmResampler(44100, 2, 2)
    r.feed(bytes(4 * 100 + 3))
    with pytest.raises(ServiceError) as e:
        r.flush()
    assert e.value.param == "audio" and "within a frame" in e.value.message
    out = np.concatenate([r.feed(bytes(4 * 4410)), r.flush()])  # a new stream: 0.1 s
    assert len(out) == pytest.approx(1600, abs=1)


# --- encoding ---------------------------------------------------------------------------------


def _speech_like(rate: int = 24000, seconds: float = 1.0) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (0.5 * np.sin(2 * np.pi * 220 * t) * np.sin(2 * np.pi * 3 * t)).astype(np.float32)


@pytest.mark.parametrize("fmt", ["wav", "flac"])
def test_wav_and_flac_round_trip_within_16_bit_quantisation(fmt):
    x = _speech_like(TARGET_RATE)
    data = encode(x, TARGET_RATE, fmt)
    info = sf.info(io.BytesIO(data))
    assert info.format == fmt.upper() and info.subtype == "PCM_16" and info.channels == 1
    a = decode(data)
    assert len(a.samples) == len(x)
    assert np.abs(a.samples - x).max() <= 1.5 / 32768


def test_encode_keeps_the_rate_and_clips():
    x = np.array([0.0, 2.0, -3.0, np.nan, 0.5], np.float32)
    back, rate = sf.read(io.BytesIO(encode(x, 24000, "wav")), dtype="int16")
    assert rate == 24000
    assert back.tolist() == [0, 32767, -32767, 0, 16384]


def test_pcm_is_raw_s16le():
    x = _speech_like()
    data = encode(x, 24000, "pcm")
    assert len(data) == 2 * len(x)
    assert data == pcm16(x)
    assert np.frombuffer(pcm16(np.array([1.0, -1.0, 0.0, 5.0])), "<i2").tolist() == \
        [32767, -32767, 0, 32767]


@pytest.mark.skipif("mp3" not in FORMATS, reason="this libsndfile has no MP3 encoder")
@pytest.mark.parametrize("rate", [24000, 22050, 16000, 19000])
def test_mp3_is_readable_back(rate):
    x = _speech_like(rate)
    data = encode(x, rate, "mp3")
    info = sf.info(io.BytesIO(data))
    assert info.format == "MP3"
    assert info.samplerate == (rate if rate != 19000 else 22050)  # MPEG rates only
    a = decode(data)
    assert abs(a.seconds - 1.0) <= 0.1
    ref = soxr.resample(x, rate, TARGET_RATE, quality="HQ")
    assert _aligned_correlation(ref, a.samples, max_lag=2000) > 0.95


def test_unknown_format_is_refused():
    with pytest.raises(ServiceError) as e:
        encode(np.zeros(10, np.float32), 24000, "aac")
    assert e.value.param == "response_format"
    assert "one of: wav, flac, mp3, pcm" in e.value.message or "mp3" not in FORMATS
    assert FORMATS["wav"] == "audio/wav" and FORMATS["pcm"] == "audio/pcm"


def test_wav_stream_header():
    h = wav_stream_header(24000)
    assert len(h) == 44
    riff, riff_size, wave, fmt, fmt_size, tag, channels, rate, byte_rate, align, bits, data, \
        data_size = struct.unpack("<4sI4s4sIHHIIHH4sI", h)
    assert (riff, wave, fmt, data) == (b"RIFF", b"WAVE", b"fmt ", b"data")
    assert riff_size == data_size == 0xFFFFFFFF
    assert (fmt_size, tag, channels, rate, byte_rate, align, bits) == \
        (16, 1, 1, 24000, 48000, 2, 16)
    # libsndfile reads such a stream once it has ended: the data size is clamped to the bytes.
    x = _speech_like(16000)
    body = h[:24] + struct.pack("<I", 16000) + h[28:] + pcm16(x[:8000]) + pcm16(x[8000:])
    a = decode(body)
    assert a.source_rate == 16000 and len(a.samples) == len(x)
    assert np.abs(a.samples - x).max() <= 1.5 / 32768


# --- subtitles --------------------------------------------------------------------------------

SEGMENTS = [(0.0, 1.0, " Hello there. "), (1.0, 2.5, ""), (2.5, 3661.5, "General <Kenobi> & co\n\n"
                                                                         "second line")]


def test_timestamp():
    assert timestamp(3661.5) == "01:01:01.500"
    assert timestamp(3661.5, ",") == "01:01:01,500"
    assert timestamp(0) == "00:00:00.000"
    assert timestamp(1.0005) == "00:00:01.000" or timestamp(1.0005) == "00:00:01.001"
    assert timestamp(59.9996) == "00:01:00.000"
    assert timestamp(360000) == "100:00:00.000"
    assert timestamp(-1) == timestamp(float("nan")) == "00:00:00.000"


def test_srt():
    assert srt(SEGMENTS) == (
        "1\n00:00:00,000 --> 00:00:01,000\nHello there.\n\n"
        "2\n00:00:02,500 --> 01:01:01,500\nGeneral <Kenobi> & co\nsecond line\n\n")
    assert srt([]) == ""


def test_vtt():
    assert vtt(SEGMENTS) == (
        "WEBVTT\n\n"
        "00:00:00.000 --> 00:00:01.000\nHello there.\n\n"
        "00:00:02.500 --> 01:01:01.500\nGeneral &lt;Kenobi&gt; &amp; co\nsecond line\n\n")
    assert vtt([]) == "WEBVTT\n\n"


# --- base64 and data URLs ---------------------------------------------------------------------


def test_base64_and_data_urls():
    raw = bytes(range(256)) * 3 + b"\xfb\xff"
    std = base64.b64encode(raw).decode()
    url = base64.urlsafe_b64encode(raw).decode()
    assert "-" in url or "_" in url
    for value in (std, url, std.rstrip("="), url.rstrip("="),
                  "\n".join(std[i:i + 76] for i in range(0, len(std), 76)),
                  f"  {std}  ", f"data:audio/wav;base64,{std}",
                  f"DATA:Audio/MPEG;BASE64,{url.rstrip('=')}",
                  f"data:audio/ogg;codecs=opus;base64,{std}",
                  f"data:;base64,{std}", f"data:application/octet-stream;base64,{std}"):
        assert decode_base64_or_data_url(value) == raw, value[:40]


@pytest.mark.parametrize(("value", "words"), [
    ("", "empty"), ("   ", "empty"), ("====", "empty"),
    ("not base64 at all!", "not base64"), ("abcde", "length"),
    ("aGVsbG8=Zm9v", "not base64"),  # padding in the middle
    ("aGVsbG8é", "not base64"),
    ("data:image/png;base64,aGVsbG8=", "image/png"),
    ("data:audio/wav,hello", "without ;base64"),
    ("data:audio/wav;base64", "not a valid data URL"),
    ("data:audio/wav;base64,", "empty"),
])
def test_junk_base64_is_refused(value, words):
    with pytest.raises(ServiceError) as e:
        decode_base64_or_data_url(value, "input_audio")
    assert e.value.param == "input_audio"
    assert words in e.value.message, e.value.message


def test_too_much_base64_is_refused(monkeypatch):
    monkeypatch.setattr(audio, "MAX_BASE64_CHARS", 1000)
    assert decode_base64_or_data_url("QUJD" * 250) == b"ABC" * 250
    with pytest.raises(ServiceError) as e:
        decode_base64_or_data_url("QUJD" * 251)
    assert e.value.param == "audio" and "at most" in e.value.message
    with pytest.raises(ServiceError):
        decode_base64_or_data_url(b"QUJD")  # type: ignore[arg-type]
