"""The GGUF header reader: a valid header is described fully, hostile ones are refused with
a clear GgufError quickly and without allocating, Hub listings are picked from safely, and
check_supported refuses what openvino-genai's GGUF reader cannot load."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import struct
import time
import tracemalloc
from pathlib import Path

import pytest

from ovms_plugin.store import gguf
from ovms_plugin.store.gguf import GgufError, GgufInfo
from ovms_plugin.store.store import StoreError

# --- a small GGUF writer ---------------------------------------------------------------------

U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)
_FMT = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f",
        BOOL: "<?", U64: "<Q", I64: "<q", F64: "<d"}
# ggml type id -> (name, elements per block, bytes per block), for the types used here.
T_F32, T_F16, T_Q4_1, T_Q5_K, T_Q6_K = 0, 1, 3, 13, 14
_SIZES = {T_F32: (1, 4), T_F16: (1, 2), T_Q4_1: (32, 20), T_Q5_K: (256, 176),
          T_Q6_K: (256, 210)}


def s(text: str | bytes) -> bytes:
    b = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(b)) + b


def val(vtype: int, v) -> bytes:
    return s(v) if vtype == STR else struct.pack(_FMT[vtype], v)


def arr(etype: int, items: list) -> bytes:
    """An array value: items are values of etype, or ready payloads for nested arrays."""
    body = b"".join(i if etype == ARR else val(etype, i) for i in items)
    return struct.pack("<IQ", etype, len(items)) + body


def kv(key: str, vtype: int, v) -> bytes:
    return s(key) + struct.pack("<I", vtype) + (v if vtype == ARR else val(vtype, v))


def tensor(name: str, dims: list[int], ttype: int, offset: int) -> bytes:
    return s(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, ttype, offset)


def layout(specs: list[tuple[str, list[int], int]]) -> tuple[list[bytes], bytes]:
    """Tensor infos with aligned offsets, and zero data of the right size."""
    infos, offset = [], 0
    for name, dims, ttype in specs:
        block, size = _SIZES[ttype]
        infos.append(tensor(name, dims, ttype, offset))
        n = 1
        for d in dims:
            n *= d
        offset = -(-(offset + n // block * size) // 32) * 32
    return infos, bytes(offset)


def build(kvs: list[bytes], tensors: list[bytes] = (), data: bytes = b"", *, version: int = 3,
          n_kv: int | None = None, n_tensors: int | None = None) -> bytes:
    head = b"GGUF" + struct.pack("<IQQ", version,
                                 len(tensors) if n_tensors is None else n_tensors,
                                 len(kvs) if n_kv is None else n_kv)
    body = head + b"".join(kvs) + b"".join(tensors)
    return body + bytes(-len(body) % 32) + data


TEMPLATE = "{% for m in messages %}" + "x" * 300 + "{% endfor %}"
TENSORS = [("token_embd.weight", [256, 2], T_Q6_K), ("blk.0.attn_q.weight", [64, 64], T_Q4_1),
           ("output_norm.weight", [64], T_F32)]


def valid_kvs(**drop_or_replace: bytes | None) -> list[bytes]:
    """Key/values of every value type; keyword arguments (dots as '__') drop (None) or
    replace a key/value."""
    kvs = {
        "general.architecture": kv("general.architecture", STR, "llama"),
        "general.name": kv("general.name", STR, "Tiny Llama"),
        "general.file_type": kv("general.file_type", U32, 15),
        "general.alignment": kv("general.alignment", U32, 32),
        "llama.block_count": kv("llama.block_count", U8, 2),
        "llama.context_length": kv("llama.context_length", U64, 4096),
        "llama.embedding_length": kv("llama.embedding_length", U32, 64),
        "llama.feed_forward_length": kv("llama.feed_forward_length", I32, 128),
        "llama.attention.head_count": kv("llama.attention.head_count", U16, 4),
        "llama.attention.head_count_kv": kv("llama.attention.head_count_kv", U32, 2),
        "llama.attention.layer_norm_rms_epsilon": kv(
            "llama.attention.layer_norm_rms_epsilon", F32, 1e-5),
        "llama.rope.freq_base": kv("llama.rope.freq_base", F64, 500000.0),
        "test.i8": kv("test.i8", I8, -5),
        "test.i16": kv("test.i16", I16, -300),
        "test.i64": kv("test.i64", I64, -(2 ** 40)),
        "test.nested": kv("test.nested", ARR, arr(ARR, [arr(U8, [1, 2]), arr(STR, ["a"])])),
        "tokenizer.ggml.model": kv("tokenizer.ggml.model", STR, "gpt2"),
        "tokenizer.ggml.pre": kv("tokenizer.ggml.pre", STR, "default"),
        "tokenizer.ggml.tokens": kv("tokenizer.ggml.tokens", ARR,
                                    arr(STR, ["<s>", "</s>", "a", "b", "ab"])),
        "tokenizer.ggml.token_type": kv("tokenizer.ggml.token_type", ARR,
                                        arr(I32, [3, 3, 1, 1, 1])),
        "tokenizer.ggml.merges": kv("tokenizer.ggml.merges", ARR, arr(STR, ["a b"])),
        "tokenizer.ggml.add_bos_token": kv("tokenizer.ggml.add_bos_token", BOOL, True),
        "tokenizer.ggml.bos_token_id": kv("tokenizer.ggml.bos_token_id", U32, 1),
        "tokenizer.ggml.eos_token_id": kv("tokenizer.ggml.eos_token_id", U32, 2),
        "tokenizer.ggml.padding_token_id": kv("tokenizer.ggml.padding_token_id", U32, 0),
        "tokenizer.chat_template": kv("tokenizer.chat_template", STR, TEMPLATE),
    }
    for key, v in drop_or_replace.items():
        key = key.replace("__", ".")
        assert key in kvs, key
        if v is None:
            del kvs[key]
        else:
            kvs[key] = v
    return list(kvs.values())


def valid_file(tensors=TENSORS, **changes) -> bytes:
    infos, data = layout(tensors)
    return build(valid_kvs(**changes), infos, data)


def write(tmp_path: Path, data: bytes, name: str = "m.gguf") -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


def read(tmp_path: Path, data: bytes) -> GgufInfo:
    return gguf.read_header(write(tmp_path, data))


def refused(tmp_path: Path, data: bytes, match: str, *, trace: bool = True) -> str:
    """read_header refuses `data` with a GgufError matching `match`, quickly and (traced)
    without allocating more than a few MB."""
    path = write(tmp_path, data, "hostile.gguf")
    if trace:
        tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(GgufError, match=match) as e:
            gguf.read_header(path)
        elapsed = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1] if trace else 0
    finally:
        tracemalloc.stop()
    assert elapsed < 1.0, elapsed
    assert peak < 8 << 20, peak
    return str(e.value)


def header_len(kvs: list[bytes], tensors: list[bytes]) -> int:
    return 24 + sum(map(len, kvs)) + sum(map(len, tensors))


# --- a valid header ---------------------------------------------------------------------------

def test_valid_header_is_described(tmp_path: Path):
    info = read(tmp_path, valid_file())
    assert isinstance(info, GgufInfo)
    assert info.version == 3 and info.architecture == "llama" and info.name == "Tiny Llama"
    assert info.file_type == "Q4_K_M"  # general.file_type 15, llama.cpp's numbering
    assert info.tensor_types == {"Q6_K": 512, "Q4_1": 4096, "F32": 64}
    assert info.parameter_count == 512 + 4096 + 64
    assert info.context_length == 4096
    assert (info.split_count, info.split_index) == (1, 0)
    assert info.has_chat_template
    m = info.metadata
    assert m["llama.block_count"] == 2 and m["test.i8"] == -5 and m["test.i16"] == -300
    assert m["llama.attention.head_count"] == 4 and m["llama.feed_forward_length"] == 128
    assert m["test.i64"] == -(2 ** 40) and m["llama.rope.freq_base"] == 500000.0
    assert m["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    assert m["tokenizer.ggml.add_bos_token"] is True
    assert m["tokenizer.chat_template"] == TEMPLATE[:256]  # strings cut to 256 characters
    assert m["tokenizer.ggml.tokens"] == {"array": "string", "length": 5}
    assert m["tokenizer.ggml.token_type"] == {"array": "int32", "length": 5}
    assert m["test.nested"] == {"array": "array", "length": 2}
    gguf.check_supported(info)


def test_config_and_generation_config(tmp_path: Path):
    info = read(tmp_path, valid_file())
    assert info.config() == {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"],
        "max_position_embeddings": 4096, "hidden_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128,
        "vocab_size": 5, "rope_theta": 500000.0,
        "rms_norm_eps": pytest.approx(1e-5), "bos_token_id": 1, "eos_token_id": 2,
        "gguf": {"file_type": "Q4_K_M", "architecture": "llama"}}
    assert info.generation_config() == {"bos_token_id": 1, "eos_token_id": 2,
                                        "pad_token_id": 0}


def test_absent_values_are_left_out(tmp_path: Path):
    kvs = [kv("general.architecture", STR, "gemma3"), kv("gemma3.block_count", U32, 4)]
    infos, data = layout(TENSORS[2:])
    info = read(tmp_path, build(kvs, infos, data, version=2))
    assert info.version == 2 and info.name == "" and info.context_length is None
    assert not info.has_chat_template
    assert info.file_type == "F32"  # no general.file_type: the dominant tensor type
    assert info.config() == {"model_type": "gemma3", "num_hidden_layers": 4,
                             "gguf": {"file_type": "F32", "architecture": "gemma3"}}
    assert info.generation_config() == {}
    empty = read(tmp_path, build([]))
    assert (empty.architecture, empty.file_type, empty.parameter_count) == ("", "", 0)
    assert empty.config() == {"gguf": {"file_type": "", "architecture": ""}}


def test_dominant_tensor_type_names_the_file_without_file_type(tmp_path: Path):
    info = read(tmp_path, valid_file(general__file_type=None))
    assert info.file_type == "Q4_1"


def test_split_keys(tmp_path: Path):
    info = read(tmp_path, build([*valid_kvs(), kv("split.count", U16, 3),
                                 kv("split.no", U16, 1)]))
    assert (info.split_count, info.split_index) == (3, 1)
    refused(tmp_path, build([kv("split.count", U16, 2), kv("split.no", U16, 2)]),
            "split.no 2 does not fit split.count 2")


def test_many_token_strings_read_fast(tmp_path: Path):
    tokens = [f"tok{i}" for i in range(100_000)]
    data = build([kv("general.architecture", STR, "llama"),
                  kv("tokenizer.ggml.tokens", ARR, arr(STR, tokens)),
                  kv("tokenizer.ggml.merges", ARR, arr(STR, tokens))])
    start = time.perf_counter()
    info = read(tmp_path, data)
    assert time.perf_counter() - start < 2.0  # ~0.2 s: buffered, no per-string reads
    assert info.metadata["tokenizer.ggml.tokens"]["length"] == 100_000


# --- hostile headers --------------------------------------------------------------------------

@pytest.mark.parametrize("data, match", [
    (b"PK\x03\x04 a zip, not a gguf" * 4, r"not a GGUF file.*b'GGUF'"),
    (b"<!DOCTYPE html><html>rate limited</html>", "not a GGUF file.*HTML"),
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:00\n", "Git LFS pointer"),
    (b"", "not a GGUF file"),
    (b"GG", "not a GGUF file"),
    (b"lmgg" + bytes(20), "older GGML"),
])
def test_not_a_gguf_file(tmp_path: Path, data: bytes, match: str):
    refused(tmp_path, data, match)


def test_versions(tmp_path: Path):
    refused(tmp_path, b"GGUF" + struct.pack(">IQQ", 3, 0, 0), "big-endian GGUF is not supported")
    refused(tmp_path, b"GGUF" + struct.pack("<IQQ", 1, 0, 0), "GGUF version 1 .*not supported")
    refused(tmp_path, b"GGUF" + struct.pack("<IQQ", 99, 0, 0), "GGUF version 99 is not supp")


def test_truncated_anywhere_in_the_header_or_data(tmp_path: Path):
    whole = valid_file()
    end = header_len(valid_kvs(), layout(TENSORS)[0])
    for cut in [*range(4, end), *range(end, len(whole), 61), len(whole) - 1]:
        if cut < end:
            msg = refused(tmp_path, whole[:cut], r"the file ends inside its header "
                                                 r"\(truncated download\?\)", trace=False)
        else:  # in the padding or the tensor data
            msg = refused(tmp_path, whole[:cut], r"tensor data needs.*truncated download\?",
                          trace=False)
        assert str(tmp_path) in msg
    read(tmp_path, whole)


def test_truncated_message(tmp_path: Path):
    whole = valid_file()
    end = header_len(valid_kvs(), layout(TENSORS)[0])
    msg = refused(tmp_path, whole[:end - 5], "the file ends inside its header")
    assert msg.endswith("(truncated download?) while reading tensor #3 ('output_norm.weight')")
    msg = refused(tmp_path, whole[:30], "the file ends inside its header")
    assert msg.endswith("it claims 26 key/value pairs and 3 tensors, more than its 30 bytes "
                        "can hold")


def test_huge_strings(tmp_path: Path):
    bad = s("general.name")
    refused(tmp_path, build([bad + struct.pack("<IQ", STR, 2 ** 62) + b"x" * 64]),
            r"string of 4611686018427387904 bytes; at most 67108864")
    refused(tmp_path, build([bad + struct.pack("<IQ", STR, 60 << 20) + b"x" * 64]),
            "ends inside its header")  # plausible length, past the end of the file
    refused(tmp_path, build([struct.pack("<Q", 2 ** 40) + b"k"]), "string of 1099511627776")
    refused(tmp_path, build([kv("", U8, 1)]), "empty key")


def test_huge_arrays(tmp_path: Path):
    def head(etype: int, n: int) -> bytes:
        return s("tokenizer.ggml.tokens") + struct.pack("<IIQ", ARR, etype, n)
    refused(tmp_path, build([head(U64, 2 ** 40)]), r"array of 1099511627776 elements; at most")
    refused(tmp_path, build([head(U64, 2 ** 25) + bytes(64)]),
            r"ends inside its header \(truncated download\?\): .* 33554432 uint64 values")
    refused(tmp_path, build([head(STR, 2 ** 26) + bytes(64)]), "more than the .* bytes left")
    refused(tmp_path, build([head(STR, 3) + s("a") + struct.pack("<Q", 2 ** 50)]),
            "string of 1125899906842624 bytes")


def test_too_many_strings_in_arrays(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(gguf, "MAX_WALKED", 10)
    refused(tmp_path, build([kv("t", ARR, arr(STR, ["x"] * 11))]), "more than 10 strings")


def test_huge_counts(tmp_path: Path):
    refused(tmp_path, build([], n_kv=2 ** 63), r"9223372036854775808 key/value pairs; at most")
    refused(tmp_path, build([], n_tensors=2 ** 40), r"1099511627776 tensors; at most 1000000")
    refused(tmp_path, build([], n_kv=60000), "truncated download.*more than its 32 bytes")
    refused(tmp_path, build([], n_tensors=900_000), "truncated download.*more than its 32 b")


def test_bad_values(tmp_path: Path):
    refused(tmp_path, build([s("k") + struct.pack("<I", 13) + bytes(8)]),
            r"key/value #1 \('k'\) has unknown value type 13")
    refused(tmp_path, build([kv("k", ARR, struct.pack("<IQ", 77, 1) + bytes(8))]),
            "array of unknown value type 77")
    deep = arr(ARR, [arr(ARR, [arr(U8, [1])])])
    refused(tmp_path, build([kv("k", ARR, deep)]), "nests arrays more than 2 deep")
    refused(tmp_path, build([kv("k", U8, 1), kv("k", U8, 2)]), "repeats a key")
    refused(tmp_path, build([kv("general.alignment", U32, 48)]), "power of two")
    refused(tmp_path, build([kv("general.alignment", U32, 0)]), "power of two")


def test_bad_tensors(tmp_path: Path):
    def one(info: bytes) -> bytes:
        return build([kv("general.architecture", STR, "llama")], [info]) + bytes(4096)
    refused(tmp_path, one(s("t") + struct.pack("<I9Q", 9, *[1] * 9) + struct.pack("<IQ", 0, 0)),
            r"tensor #1 \('t'\) has 9 dimensions; GGUF tensors have at most 4")
    refused(tmp_path, one(tensor("t", [8], 99, 0)), r"unknown tensor type id 99 \(type id 99")
    refused(tmp_path, one(tensor("t", [8, 0], T_F32, 0)), "zero dimension")
    refused(tmp_path, one(tensor("t", [2 ** 20] * 4, T_F32, 0)), "elements")
    refused(tmp_path, one(tensor("t", [100], T_Q4_1, 0)), "not a multiple of its block of 32")
    refused(tmp_path, one(tensor("t", [8], T_F32, 2 ** 60)), "tensor data needs")
    refused(tmp_path, one(struct.pack("<Q", 2 ** 20) + b"t"), "string of 1048576 bytes")


def test_random_corruption_raises_only_gguf_errors(tmp_path: Path):
    whole = valid_file()
    header_len = len(whole) - len(layout(TENSORS)[1])
    rng = random.Random(1234)
    for _ in range(400):
        data = bytearray(whole)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(header_len)] = rng.randrange(256)
        path = write(tmp_path, bytes(data), "fuzz.gguf")
        start = time.perf_counter()
        with contextlib.suppress(GgufError):
            gguf.read_header(path)
        assert time.perf_counter() - start < 1.0


def test_not_a_file(tmp_path: Path):
    with pytest.raises(GgufError, match="not a regular file"):
        gguf.read_header(tmp_path)
    with pytest.raises(GgufError, match="cannot read"):
        gguf.read_header(tmp_path / "missing.gguf")
    assert issubclass(GgufError, StoreError)


# --- file names and choosing the file of a Hub repo -----------------------------------------

def test_split_parts():
    assert gguf.split_parts("Qwen2.5-7B-Instruct-Q4_K_M-00001-of-00002.gguf") == \
        ("Qwen2.5-7B-Instruct-Q4_K_M", 1, 2)
    assert gguf.split_parts("Q8_0/big-00003-of-00004.gguf") == ("big", 3, 4)
    for name in ("model-Q4_K_M.gguf", "m-00003-of-00002.gguf", "m-00000-of-00002.gguf",
                 "m-1-of-2.gguf", "m-00001-of-00002.bin"):
        assert gguf.split_parts(name) is None, name


@pytest.mark.parametrize("name, quant", [
    ("Qwen2.5-7B-Instruct-Q4_K_M.gguf", "Q4_K_M"), ("x.q8_0.gguf", "Q8_0"),
    ("x-f16.gguf", "F16"), ("x-IQ4_XS.gguf", "IQ4_XS"), ("x-bf16.gguf", "BF16"),
    ("x-IQ2_XXS.gguf", "IQ2_XXS"), ("x-UD-Q4_K_XL.gguf", "Q4_K_XL"), ("x-Q3_K_L.gguf", "Q3_K_L"),
    ("x-Q4_0_4_4.gguf", "Q4_0_4_4"), ("x_Q5_1.gguf", "Q5_1"), ("x-fp16.gguf", "F16"),
    ("Q8_0/model.gguf", "Q8_0"), ("big-Q6_K-00001-of-00002.gguf", "Q6_K"),
    ("model.gguf", None), ("SmolLM2-135M.gguf", None), ("xq4_0.gguf", None),
])
def test_quant_of(name: str, quant: str | None):
    assert gguf.quant_of(name) == quant


def test_choose_default_and_fallbacks():
    repo = ["README.md", ".gitattributes", "m-Q8_0.gguf", "m-Q4_K_M.gguf", "m-Q4_0.gguf"]
    assert gguf.choose_file(repo, None) == ("m-Q4_K_M.gguf", "Q4_K_M (the default)")
    repo = ["m-Q8_0.gguf", "m-Q4_1.gguf", "m-IQ4_XS.gguf", "m-Q4_0.gguf", "m-Q4_K_S.gguf"]
    assert gguf.choose_file(repo, None) == ("m-Q4_0.gguf", "smallest 4-bit file: Q4_0")
    assert gguf.choose_file(["m-Q8_0.gguf", "m-Q4_1.gguf"], None) == \
        ("m-Q4_1.gguf", "smallest 4-bit file: Q4_1")
    assert gguf.choose_file(["README.md", "m-Q8_0.gguf"], None) == \
        ("m-Q8_0.gguf", "the only GGUF file (Q8_0)")
    assert gguf.choose_file(["model.gguf"], None) == ("model.gguf", "the only GGUF file")
    with pytest.raises(GgufError, match="no 4-bit one; ask for a quant: F16, Q8_0"):
        gguf.choose_file(["m-Q8_0.gguf", "m-F16.gguf"], None)
    with pytest.raises(GgufError, match="no GGUF model file"):
        gguf.choose_file(["README.md", "model.safetensors"], None)


def test_choose_with_quant():
    repo = ["m-Q8_0.gguf", "m-Q4_K_M.gguf", "sub/m-Q4_0.gguf", "m-Q4_0.gguf",
            "longer-name-Q4_0.gguf"]
    assert gguf.choose_file(repo, "q4_k_m") == ("m-Q4_K_M.gguf", "Q4_K_M as asked")
    assert gguf.choose_file(repo, "Q4_0") == ("m-Q4_0.gguf", "Q4_0 as asked")
    assert gguf.choose_file(["sub/a-Q4_0.gguf", "b/longer-Q4_0.gguf"], "Q4_0")[0] == \
        "sub/a-Q4_0.gguf"
    with pytest.raises(GgufError, match=r"no Q5_K_M file in the repo; available: Q4_0, "
                                        r"Q4_K_M, Q8_0$"):
        gguf.choose_file(repo, "Q5_K_M")
    with pytest.raises(GgufError, match="not a GGUF quantization name"):
        gguf.choose_file(repo, "bad-quant")


def test_split_files_are_refused_with_an_alternative():
    repo = ["big-Q8_0-00001-of-00002.gguf", "big-Q8_0-00002-of-00002.gguf", "big-Q4_K_M.gguf"]
    with pytest.raises(GgufError, match=r"split in 2 files; split GGUF files are not "
                                        r"supported.*ask for Q4_K_M instead"):
        gguf.choose_file(repo, "Q8_0")
    with pytest.raises(GgufError, match=r"Q4_K_M, Q8_0 \(split\)"):
        gguf.choose_file(repo, "Q6_K")
    # Without a quant, the split Q4_K_M is passed over for a single-file 4-bit quant.
    repo = ["a-Q4_K_M-00001-of-00002.gguf", "a-Q4_K_M-00002-of-00002.gguf", "a-Q4_0.gguf"]
    assert gguf.choose_file(repo, None) == ("a-Q4_0.gguf", "smallest 4-bit file: Q4_0")
    with pytest.raises(GgufError, match=r"no single-file quant.*llama-gguf-split --merge"):
        gguf.choose_file(repo[:2], None)
    # One part in all is one file.
    assert gguf.choose_file(["a-Q4_K_M-00001-of-00001.gguf"], None)[0] == \
        "a-Q4_K_M-00001-of-00001.gguf"


def test_projectors_hidden_folders_and_other_files_are_ignored():
    repo = ["mmproj-model-f16.gguf", "model-Q4_0.gguf", ".cache/model-Q4_K_M.gguf",
            ".hidden-Q4_K_M.gguf", "model-Q4_K_M.bin"]
    assert gguf.choose_file(repo, None) == ("model-Q4_0.gguf", "smallest 4-bit file: Q4_0")
    with pytest.raises(GgufError, match="no GGUF model file"):
        gguf.choose_file(["mmproj-F16.gguf", "vision/MMPROJ-Q8_0.gguf"], None)


@pytest.mark.parametrize("bad", [
    "/etc/x-Q4_0.gguf", "../x-Q4_0.gguf", "a/../../x-Q4_0.gguf", "a\\x-Q4_0.gguf",
    "C:x-Q4_0.gguf", "c:/x-Q4_0.gguf", "a//x-Q4_0.gguf", "x\n-Q4_0.gguf", "", "a/",
])
def test_hostile_listing_is_refused(bad: str):
    with pytest.raises(GgufError, match="unsafe path"):
        gguf.choose_file(["m-Q4_0.gguf", bad], None)
    with pytest.raises(GgufError, match="unsafe path"):
        gguf.choose_file([bad, "m-Q4_0.gguf"], "Q4_0")


# --- what openvino-genai loads -------------------------------------------------------------

def test_check_supported(tmp_path: Path):
    info = read(tmp_path, valid_file())
    gguf.check_supported(info)
    assert {"llama", "qwen2", "qwen3"} == gguf.SUPPORTED_ARCHITECTURES
    assert {"F32", "F16", "Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q6_K"} == \
        gguf.SUPPORTED_TENSOR_TYPES

    def refuses(match: str, **changes) -> str:
        with pytest.raises(GgufError, match=match) as e:
            gguf.check_supported(dataclasses.replace(info, **changes))
        return str(e.value)

    msg = refuses("'gemma3' models", architecture="gemma3")
    assert "llama, qwen2 and qwen3" in msg and "Hugging Face repo" in msg
    refuses("names no architecture", architecture="")
    msg = refuses("Q5_K tensors", tensor_types={"Q5_K": 10, "Q4_K": 10, "F32": 1})
    assert "pick a Q4_0, Q4_1, Q8_0 or F16 file" in msg
    assert "F16, F32, Q4_0, Q4_1, Q4_K, Q6_K and Q8_0" in msg
    refuses("BF16 and IQ4_XS tensors", tensor_types={"IQ4_XS": 1, "BF16": 1})
    refuses("all-F32", tensor_types={"F32": 100})
    refuses("no tensors", tensor_types={})
    refuses("part 2 of a GGUF split in 3", split_count=3, split_index=1)
    meta = dict(info.metadata)
    refuses("LoRA adapter", metadata=meta | {"general.type": "adapter"})
    refuses("lacks general.file_type", metadata={
        k: v for k, v in meta.items() if k != "general.file_type"})
    refuses("'llama' tokenizer \\(SentencePiece\\)",
            metadata=meta | {"tokenizer.ggml.model": "llama"})
    refuses("lacks tokenizer.ggml.pre", metadata={
        k: v for k, v in meta.items() if k != "tokenizer.ggml.pre"})


def test_check_supported_on_unsupported_type_read_from_a_file(tmp_path: Path):
    tensors = [("token_embd.weight", [256, 2], T_Q5_K), ("output_norm.weight", [64], T_F32)]
    info = read(tmp_path, valid_file(tensors))
    with pytest.raises(GgufError, match="Q5_K tensors, which openvino-genai"):
        gguf.check_supported(info)


# --- a real file ----------------------------------------------------------------------------

REAL = os.environ.get("OVMS_PLUGIN_SMOLLM2_GGUF", "")


@pytest.mark.skipif(not REAL or not Path(REAL).is_file(),
                    reason="set OVMS_PLUGIN_SMOLLM2_GGUF to SmolLM2-135M-Instruct.Q4_1.gguf")
def test_real_smollm2_header():
    start = time.perf_counter()
    info = gguf.read_header(Path(REAL))
    assert time.perf_counter() - start < 2.0
    assert info.architecture == "llama" and info.file_type == "Q4_1"
    assert info.context_length == 8192 and 130e6 < info.parameter_count < 140e6
    assert info.has_chat_template and info.config()["vocab_size"] == 49152
    gguf.check_supported(info)
