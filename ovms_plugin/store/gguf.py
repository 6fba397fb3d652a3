"""A small, hardened reader of GGUF headers (llama.cpp's model file format).

The model puller uses it to describe a GGUF file and to check that openvino-genai can load
it before converting it (openvino-genai reads the GGUF file itself). Only the header is
read: the key/value metadata and the tensor infos, never the tensor data. The file comes
from outside (a user's disk, a Hub mirror), so every count and length in it is bounded and
checked against the bytes left in the file, arrays are skipped without being materialised,
and anything malformed raises GgufError saying what is wrong.

Layout (ggml's docs/gguf.md; versions 2 and 3, little-endian): b"GGUF", u32 version, u64
tensor count, u64 key/value count; the key/values (u64-prefixed UTF-8 key, u32 value type,
value); the tensor infos (name, u32 n_dims, u64 dims, u32 ggml type, u64 offset); padding
to general.alignment (32 by default); the tensor data.
"""

from __future__ import annotations

import math
import os
import re
import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from ovms_plugin.store.store import StoreError


class GgufError(StoreError):
    """A GGUF file (or a Hub listing of GGUF files) is malformed, or holds something
    openvino-genai cannot load; the message says what and what would work."""


# --- what a header may claim ------------------------------------------------------------
# Generous for real files (the biggest tokenizers hold ~260k tokens and ~500k merges),
# small enough that a hostile header costs seconds and tens of MB at most.
MAX_KV = 65536
MAX_TENSORS = 1_000_000
MAX_STRING = 64 << 20           # bytes in one string value
MAX_ARRAY = 1 << 26             # elements in one array
MAX_ARRAY_DEPTH = 2             # an array of arrays, no deeper
MAX_DIMS = 4                    # ggml's GGML_MAX_DIMS
MAX_ELEMENTS = 1 << 48          # elements in a tensor, and in the whole model
MAX_KEY = 1024                  # bytes in a key (real keys are under 100)
MAX_TENSOR_NAME = 1024          # bytes in a tensor name (ggml itself stops at 63)
MAX_WALKED = 1 << 22            # strings in arrays, over the whole header
MAX_NESTED = 1 << 16            # arrays in arrays, over the whole header
KEEP_CHARS = 256                # metadata strings are cut to this many characters
_KEEP_BYTES = 4 * KEEP_CHARS    # enough UTF-8 for KEEP_CHARS characters
_CHUNK = 1 << 20
_TRUNCATED = "the file ends inside its header (truncated download?)"
_MAX_INFO = 8 + MAX_TENSOR_NAME + 4 + 8 * MAX_DIMS + 12  # the longest tensor info

# GGUF value types: id -> name.
_VALUE_TYPES = {0: "uint8", 1: "int8", 2: "uint16", 3: "int16", 4: "uint32", 5: "int32",
                6: "float32", 7: "bool", 8: "string", 9: "array", 10: "uint64", 11: "int64",
                12: "float64"}
_STRING, _ARRAY, _BOOL = 8, 9, 7
_SCALARS = {t: struct.Struct(f) for t, f in {
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<B", 10: "<Q",
    11: "<q", 12: "<d"}.items()}
_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")
_ARRAY_HEAD = struct.Struct("<IQ")      # element type, length
_TYPE_OFFSET = struct.Struct("<IQ")     # tensor type, data offset
_DIMS = [struct.Struct(f"<{n}Q") for n in range(MAX_DIMS + 1)]

# ggml tensor types (ggml/include/ggml.h, enum ggml_type): id -> (name, elements per block,
# bytes per block). Sizes follow gguf-py's GGML_QUANT_SIZES; None where not pinned down
# (the block check or the data-extent check is then skipped for that type). 31-33 are
# ARM repacks of Q4_0 that old files still carry; 4, 5 and 36-38 are gone from ggml.
_TENSOR_TYPES: dict[int, tuple[str, int | None, int | None]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, None),
    10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2),
    26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2), 31: ("Q4_0_4_4", 32, 18), 32: ("Q4_0_4_8", 32, 18),
    33: ("Q4_0_8_8", 32, 18), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17), 40: ("NVFP4", 64, None), 41: ("Q1_0", None, None),
}

# llama.cpp's file types (include/llama.h, enum llama_ftype): general.file_type -> name.
_FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
    11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S",
    17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS",
    23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S",
    29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 33: "Q4_0_4_4", 34: "Q4_0_4_8",
    35: "Q4_0_8_8", 36: "TQ1_0", 37: "TQ2_0", 38: "MXFP4_MOE", 39: "NVFP4", 40: "Q1_0",
}

# --- what openvino-genai's GGUF reader loads ----------------------------------------------
# From openvino.genai's src/cpp/src/gguf_utils/ (master da1db864 of 2026-08-21, past the
# 2026.3.0.0 tag; checked against the installed 2026.4.1 by loading altered SmolLM2 files):
# gguf_modeling.cpp create_from_gguf() builds "llama", "qwen2" and "qwen3" only.
SUPPORTED_ARCHITECTURES: frozenset[str] = frozenset({"llama", "qwen2", "qwen3"})
# gguf.cpp load_arrays() repacks Q4_0, Q4_1, Q8_0, Q4_K and Q6_K; building_blocks.cpp
# make_weights_subgraph() takes those and F16 for weight matrices (F32, BF16 and Q2_K
# matrices fail with "Unsupported quantization type", Q5_x/IQ* with "gguf_tensor_to_f16
# failed", types past BF16 with "unordered_map::at"); F32 is for the norm vectors.
SUPPORTED_TENSOR_TYPES: frozenset[str] = frozenset(
    {"F32", "F16", "Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q6_K"})
# gguf_tokenizer.cpp builds only byte-level BPE tokenizers and reads these keys.
_TOKENIZER_MODEL = "gpt2"
_TOKENIZER_KEYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                   "tokenizer.ggml.merges", "tokenizer.ggml.pre")
# gguf.cpp config_from_meta() reads these without a default (".at()").
_MODEL_KEYS = ("block_count", "embedding_length", "attention.head_count",
               "attention.layer_norm_rms_epsilon")
_HF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                     "qwen3": "Qwen3ForCausalLM"}
_ADVICE = ("pick a Q4_0, Q4_1, Q8_0 or F16 file of the model, or pull the original "
           "Hugging Face repo to convert it")


@dataclass(frozen=True)
class GgufInfo:
    version: int                  # 2 or 3
    architecture: str             # general.architecture, e.g. "llama"; "" when absent
    name: str                     # general.name or ""
    file_type: str                # quant name ("Q4_K_M", "Q8_0", "F16", ...) or ""
    tensor_types: dict[str, int]  # ggml type name -> number of elements of that type
    parameter_count: int          # elements over all tensors
    context_length: int | None    # <arch>.context_length
    split_count: int              # split.count, 1 when absent
    split_index: int              # split.no, 0 when absent
    has_chat_template: bool       # tokenizer.chat_template is a non-blank string
    metadata: dict[str, Any]      # scalars (strings cut to 256 characters); arrays as
                                  # {"array": <element type name>, "length": n}

    def _int(self, key: str) -> int | None:
        v = self.metadata.get(key)
        return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else None

    def _float(self, key: str) -> float | None:
        v = self.metadata.get(key)
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
            return float(v)
        return None

    def _arch(self, suffix: str) -> str:
        return f"{self.architecture}.{suffix}"

    def _vocab_size(self) -> int | None:
        tokens = self.metadata.get("tokenizer.ggml.tokens")
        if isinstance(tokens, dict):
            return tokens["length"]
        return self._int(self._arch("vocab_size")) if self.architecture else None

    def config(self) -> dict[str, Any]:
        """A Hugging Face-style config.json from the metadata; absent values left out."""
        out: dict[str, Any] = {}
        arch = self.architecture
        if arch:
            out["model_type"] = arch
        if arch in _HF_ARCHITECTURES:
            out["architectures"] = [_HF_ARCHITECTURES[arch]]
        values: dict[str, Any] = {
            "max_position_embeddings": self.context_length,
            "vocab_size": self._vocab_size(),
            "bos_token_id": self._int("tokenizer.ggml.bos_token_id"),
            "eos_token_id": self._int("tokenizer.ggml.eos_token_id"),
        }
        if arch:
            values |= {
                "hidden_size": self._int(self._arch("embedding_length")),
                "num_hidden_layers": self._int(self._arch("block_count")),
                "num_attention_heads": self._int(self._arch("attention.head_count")),
                "num_key_value_heads": self._int(self._arch("attention.head_count_kv")),
                "intermediate_size": self._int(self._arch("feed_forward_length")),
                "rope_theta": self._float(self._arch("rope.freq_base")),
                "rms_norm_eps": self._float(self._arch("attention.layer_norm_rms_epsilon")),
            }
        out |= {k: v for k, v in values.items() if v is not None}
        out["gguf"] = {"file_type": self.file_type, "architecture": arch}
        return out

    def generation_config(self) -> dict[str, Any]:
        """bos/eos (and pad) token ids from the tokenizer metadata; absent ones left out."""
        keys = {"bos_token_id": "tokenizer.ggml.bos_token_id",
                "eos_token_id": "tokenizer.ggml.eos_token_id",
                "pad_token_id": "tokenizer.ggml.padding_token_id"}
        return {k: v for k, key in keys.items() if (v := self._int(key)) is not None}


# --- reading --------------------------------------------------------------------------------

class _Truncated(Exception):
    pass


class _Reader:
    """Buffered little-endian reads that never go past the end of the file."""

    def __init__(self, f: BinaryIO, size: int) -> None:
        self._f, self.size = f, size
        self.buf, self.at, self._base = b"", 0, 0  # buf holds file bytes from _base

    def tell(self) -> int:
        return self._base + self.at

    def left(self) -> int:
        return self.size - self.tell()

    def need(self, n: int) -> None:
        avail = len(self.buf) - self.at
        if avail >= n:
            return
        if n > self.left():
            raise _Truncated
        chunk = self._f.read(min(max(n - avail, _CHUNK), self.left() - avail))
        self.buf, self._base, self.at = self.buf[self.at:] + chunk, self.tell(), 0
        if len(self.buf) < n:  # the file shrank while being read
            raise _Truncated

    def unpack(self, s: struct.Struct) -> tuple[Any, ...]:
        self.need(s.size)
        v = s.unpack_from(self.buf, self.at)
        self.at += s.size
        return v

    def take(self, n: int) -> bytes:
        self.need(n)
        b = self.buf[self.at:self.at + n]
        self.at += n
        return b

    def skip(self, n: int) -> None:
        if n > self.left():
            raise _Truncated
        if n <= len(self.buf) - self.at:
            self.at += n
            return
        pos = self.tell() + n
        self._f.seek(pos)
        self.buf, self._base, self.at = b"", pos, 0

    def skip_strings(self, n: int, limit: int) -> int:
        """Skips n length-prefixed strings; -1, or the first length over `limit`."""
        unpack_from = _U64.unpack_from
        while n:
            buf, at, end = self.buf, self.at, len(self.buf)
            while n and at + 8 <= end:  # the strings wholly in the buffer, in a tight loop
                (length,) = unpack_from(buf, at)
                if length > limit or at + 8 + length > end:
                    break
                at += 8 + length
                n -= 1
            self.at = at
            if n:  # one string crossing the end of the buffer (or too long)
                (length,) = self.unpack(_U64)
                if length > limit:
                    return length
                self.skip(length)
                n -= 1
        return -1


class _Parser:
    def __init__(self, r: _Reader, path: Path) -> None:
        self.r, self.path = r, path
        # What is being read, for messages: (what, index from 1 or 0, raw name).
        self.ctx: tuple[str, int, bytes] = ("the magic number", 0, b"")
        self.walked = self.nested = 0

    @property
    def where(self) -> str:
        what, i, name = self.ctx
        if not i:
            return what
        if not name:
            return f"{what} #{i}"
        return f"{what} #{i} ({name.decode('utf-8', 'replace')[:KEEP_CHARS]!r})"

    def fail(self, what: str) -> GgufError:
        return GgufError(f"{self.path}: {what}")

    def string(self, limit: int, label: str = "") -> bytes:
        """The string's first _KEEP_BYTES (keys and names, no longer, are whole)."""
        n = self.r.unpack(_U64)[0]
        if n > limit:
            raise self.fail(f"{label}{self.where} claims a string of {n} bytes; at most "
                            f"{limit} are accepted (corrupt file?)")
        if n <= _KEEP_BYTES:
            return self.r.take(n)
        if n > self.r.left():
            raise _Truncated
        head = self.r.take(_KEEP_BYTES)
        self.r.skip(n - _KEEP_BYTES)
        return head

    def value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            (v,) = self.r.unpack(_SCALARS[vtype])
            return bool(v) if vtype == _BOOL else v
        if vtype == _STRING:
            return self.string(MAX_STRING).decode("utf-8", "replace")[:KEEP_CHARS]
        if vtype == _ARRAY:
            return self.array(1)
        raise self.fail(f"{self.where} has unknown value type {vtype} (GGUF value types are "
                        "0 to 12)")

    def array(self, depth: int) -> dict[str, Any]:
        etype, n = self.r.unpack(_ARRAY_HEAD)
        if etype not in _VALUE_TYPES:
            raise self.fail(f"{self.where} is an array of unknown value type {etype} (GGUF "
                            "value types are 0 to 12)")
        if etype == _ARRAY and depth >= MAX_ARRAY_DEPTH:
            raise self.fail(f"{self.where} nests arrays more than {MAX_ARRAY_DEPTH} deep; "
                            "GGUF files hold arrays and arrays of arrays only")
        if n > MAX_ARRAY:
            raise self.fail(f"{self.where} claims an array of {n} elements; at most "
                            f"{MAX_ARRAY} are accepted (corrupt file?)")
        size = _SCALARS[etype].size if etype in _SCALARS else (8 if etype == _STRING else 12)
        if n * size > self.r.left():
            raise self.fail(f"{_TRUNCATED}: {self.where} claims an array of {n} "
                            f"{_VALUE_TYPES[etype]} values, more than the {self.r.left()} "
                            "bytes left can hold")
        if etype in _SCALARS:
            self.r.skip(n * size)
        elif etype == _STRING:
            self.walked += n
            if self.walked > MAX_WALKED:
                raise self.fail(f"the header holds more than {MAX_WALKED} strings in arrays "
                                "(corrupt file?)")
            length = self.r.skip_strings(n, MAX_STRING)
            if length >= 0:
                raise self.fail(f"{self.where} holds a string of {length} bytes; at most "
                                f"{MAX_STRING} are accepted (corrupt file?)")
        else:
            self.nested += n
            if self.nested > MAX_NESTED:
                raise self.fail(f"the header holds more than {MAX_NESTED} arrays in arrays "
                                "(corrupt file?)")
            for _ in range(n):
                self.array(depth + 1)
        return {"array": _VALUE_TYPES[etype], "length": n}

    def parse(self) -> GgufInfo:
        r, path = self.r, self.path
        head = r.take(min(4, r.size))
        if head != b"GGUF":
            raise GgufError(_not_gguf(path, head))
        self.ctx = ("the version", 0, b"")
        (version,) = r.unpack(_U32)
        if version not in (2, 3):
            swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
            if swapped in (1, 2, 3):
                raise self.fail("this is a big-endian GGUF file (its version reads "
                                "byte-swapped); big-endian GGUF is not supported: use the "
                                "usual little-endian file of the model")
            if version == 1:
                raise self.fail("GGUF version 1 (the first draft of the format, 2023) is not "
                                "supported; versions 2 and 3 are: get a current file of the "
                                "model")
            raise self.fail(f"GGUF version {version} is not supported (versions 2 and 3 are)")
        self.ctx = ("the tensor and key/value counts", 0, b"")
        n_tensors, n_kv = r.unpack(_U64)[0], r.unpack(_U64)[0]
        if n_kv > MAX_KV:
            raise self.fail(f"the header claims {n_kv} key/value pairs; at most {MAX_KV} are "
                            "accepted (corrupt file?)")
        if n_tensors > MAX_TENSORS:
            raise self.fail(f"the header claims {n_tensors} tensors; at most {MAX_TENSORS} "
                            "are accepted (corrupt file?)")
        # The smallest key/value takes 13 bytes, the smallest tensor info 24.
        if n_kv * 13 + n_tensors * 24 > r.left():
            raise self.fail(f"{_TRUNCATED}: it claims {n_kv} key/value pairs and "
                            f"{n_tensors} tensors, more than its {r.size} bytes can hold")

        metadata: dict[str, Any] = {}
        for i in range(1, n_kv + 1):
            self.ctx = ("key/value", i, b"")
            raw = self.string(MAX_KEY, "the key of ")
            if not raw:
                raise self.fail(f"{self.where} has an empty key")
            self.ctx = ("key/value", i, raw)
            key = raw.decode("utf-8", "replace")
            if key in metadata:
                raise self.fail(f"{self.where} repeats a key; each key may appear once")
            (vtype,) = r.unpack(_U32)
            metadata[key] = self.value(vtype)

        counts: dict[int, int] = {}
        total = data_end = 0
        last = self.ctx
        types, dim_structs = _TENSOR_TYPES, _DIMS
        u64, u32, type_offset = _U64.unpack_from, _U32.unpack_from, _TYPE_OFFSET.unpack_from
        for i in range(1, n_tensors + 1):
            # Straight from the buffer, which holds a whole tensor info or the rest of the
            # file: a million tensors take seconds, not minutes.
            self.ctx = ("tensor", i, b"")
            r.need(min(_MAX_INFO, r.left()))
            buf, at, end = r.buf, r.at, len(r.buf)
            if at + 8 > end:
                raise _Truncated
            (n,) = u64(buf, at)
            if n > MAX_TENSOR_NAME:
                raise self.fail(f"the name of {self.where} claims a string of {n} bytes; at "
                                f"most {MAX_TENSOR_NAME} are accepted (corrupt file?)")
            at += 8 + n
            if at + 4 > end:
                raise _Truncated
            self.ctx = ("tensor", i, buf[at - n:at])
            (n_dims,) = u32(buf, at)
            if n_dims > MAX_DIMS:
                raise self.fail(f"{self.where} has {n_dims} dimensions; GGUF tensors have at "
                                f"most {MAX_DIMS}")
            if at + 4 + 8 * n_dims + 12 > end:
                raise _Truncated
            dims = dim_structs[n_dims].unpack_from(buf, at + 4)
            at += 4 + 8 * n_dims
            ttype, offset = type_offset(buf, at)
            r.at = at + 12
            if 0 in dims:
                raise self.fail(f"{self.where} has a zero dimension {list(dims)}; dimensions "
                                "must be positive")
            count = math.prod(dims)
            if count >= MAX_ELEMENTS:
                raise self.fail(f"{self.where} claims {count} elements {list(dims)}; at most "
                                f"2^48 are accepted (corrupt file?)")
            spec = types.get(ttype)
            if spec is None:
                raise self.fail(f"{self.where} has unknown tensor type id {ttype} (type id "
                                f"{ttype} is not a ggml type this reader knows; it may need a "
                                "newer llama.cpp, and openvino-genai cannot load it)")
            tname, block, block_bytes = spec
            if block and n_dims and dims[0] % block:
                raise self.fail(f"{self.where} is {tname} with a first dimension of {dims[0]}"
                                f", not a multiple of its block of {block} (corrupt file?)")
            counts[ttype] = counts.get(ttype, 0) + count
            total += count
            end = offset + count // block * block_bytes if block and block_bytes else offset
            if end >= data_end:
                data_end, last = end, self.ctx
        if total >= MAX_ELEMENTS:
            raise self.fail(f"the tensors claim {total} elements in all (corrupt file?)")

        self.ctx = ("the end of the header", 0, b"")
        alignment = metadata.get("general.alignment", 32)
        if not (isinstance(alignment, int) and not isinstance(alignment, bool)
                and 0 < alignment <= 1 << 30 and alignment & (alignment - 1) == 0):
            raise self.fail(f"general.alignment is {alignment!r}; it must be a power of two")
        data_start = -(-r.tell() // alignment) * alignment
        if n_tensors and data_start + data_end > r.size:
            self.ctx = last
            raise self.fail(f"the file is {r.size} bytes but its tensor data needs "
                            f"{data_start + data_end} ({self.where} ends past the end of the "
                            "file; truncated download?)")
        tensor_types = {types[t][0]: c for t, c in counts.items()}
        return _info(version, metadata, tensor_types, total, self.fail)


def _not_gguf(path: Path, head: bytes) -> str:
    hint = ""
    if head.startswith(b"vers"):
        hint = " (it looks like a Git LFS pointer: the file itself was not downloaded)"
    elif head.lstrip()[:1] == b"<":
        hint = " (it looks like an HTML or XML page: a failed download?)"
    elif head in (b"lmgg", b"fmgg", b"tjgg"):
        hint = " (it is an older GGML/GGJT file, from before GGUF)"
    return (f"{path}: not a GGUF file: it starts with {head!r}, a GGUF file starts with "
            f"b'GGUF'{hint}")


def _info(version: int, metadata: dict[str, Any], tensor_types: dict[str, int], total: int,
          fail: Callable[[str], GgufError]) -> GgufInfo:
    def text(key: str) -> str:
        v = metadata.get(key)
        return v if isinstance(v, str) else ""

    def count(key: str, default: int) -> int:
        v = metadata.get(key, default)
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= 65535:
            raise fail(f"{key} is {v!r}; it must be a small non-negative integer")
        return v

    arch = text("general.architecture")
    ftype = metadata.get("general.file_type")
    known = isinstance(ftype, int) and not isinstance(ftype, bool)
    file_type = _FILE_TYPES.get(ftype, "") if known else ""
    if not file_type and tensor_types:  # the type holding the most elements
        file_type = max(sorted(tensor_types.items()), key=lambda kv: kv[1])[0]
    ctx = metadata.get(f"{arch}.context_length") if arch else None
    if not isinstance(ctx, int) or isinstance(ctx, bool) or ctx <= 0:
        ctx = None
    split_count, split_index = count("split.count", 1), count("split.no", 0)
    if split_count < 1 or split_index >= split_count:
        raise fail(f"split.no {split_index} does not fit split.count {split_count}")
    template = metadata.get("tokenizer.chat_template")
    return GgufInfo(
        version=version, architecture=arch, name=text("general.name"), file_type=file_type,
        tensor_types=tensor_types, parameter_count=total, context_length=ctx,
        split_count=split_count, split_index=split_index,
        has_chat_template=isinstance(template, str) and bool(template.strip()),
        metadata=metadata)


def read_header(path: Path) -> GgufInfo:
    """Reads and checks the header of the GGUF file at `path` (not its tensor data)."""
    path = Path(path)
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise GgufError(f"{path} is not a regular file")
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            parser = _Parser(_Reader(f, size), path)
            try:
                return parser.parse()
            except _Truncated:
                raise GgufError(f"{path}: {_TRUNCATED} while reading {parser.where}") \
                    from None
            except (struct.error, ValueError, OverflowError, MemoryError) as e:
                raise GgufError(f"{path}: malformed GGUF header near {parser.where}: {e}") \
                    from None
    except OSError as e:
        raise GgufError(f"cannot read {path}: {e.strerror or e}") from None


# --- is it loadable -------------------------------------------------------------------------

def _names(items: Any) -> str:
    items = sorted(items)
    return ", ".join(items[:-1]) + " and " + items[-1] if len(items) > 1 else "".join(items)


def check_supported(info: GgufInfo) -> None:
    """Raises GgufError when openvino-genai's GGUF reader cannot load the file."""
    m, arch = info.metadata, info.architecture
    if m.get("general.type") == "adapter":
        raise GgufError("this GGUF file is a LoRA adapter (general.type 'adapter'), not a "
                        "model: pull the base model's GGUF file instead")
    if arch not in SUPPORTED_ARCHITECTURES:
        what = f"{arch!r} models" if arch else "a file that names no architecture " \
            "(general.architecture)"
        raise GgufError(f"openvino-genai's GGUF reader cannot load {what}: it builds "
                        f"{_names(SUPPORTED_ARCHITECTURES)} models only; pull the original "
                        "Hugging Face repo of the model to convert it instead")
    if info.split_count > 1:
        raise GgufError(f"this file is part {info.split_index + 1} of a GGUF split in "
                        f"{info.split_count} files; one file is converted: merge the parts "
                        "with llama.cpp's llama-gguf-split --merge, or pick a single-file "
                        "quant")
    if not info.tensor_types:
        raise GgufError("the file holds no tensors (a vocabulary-only GGUF?); " + _ADVICE)
    bad = [t for t in info.tensor_types if t not in SUPPORTED_TENSOR_TYPES]
    if bad:
        raise GgufError(f"the file holds {_names(bad)} tensors, which openvino-genai's GGUF "
                        f"reader cannot load (it loads {_names(SUPPORTED_TENSOR_TYPES)}); "
                        + _ADVICE)
    if set(info.tensor_types) == {"F32"}:
        raise GgufError("an all-F32 file: openvino-genai's GGUF reader takes F32 for norm "
                        "vectors only, not for weight matrices; " + _ADVICE)
    missing = [k for k in ("general.file_type", *(f"{arch}.{s}" for s in _MODEL_KEYS))
               if k not in m]
    if missing:
        raise GgufError(f"the file lacks {_names(missing)}, which openvino-genai's GGUF "
                        "reader needs; pick a file made by a current llama.cpp, or pull the "
                        "original Hugging Face repo to convert it")
    model = m.get("tokenizer.ggml.model")
    if model != _TOKENIZER_MODEL:
        what = "no tokenizer (tokenizer.ggml.model)" if model is None else \
            f"a {model!r} tokenizer" + (" (SentencePiece)" if model == "llama" else "")
        raise GgufError(f"the file holds {what}; openvino-genai's GGUF reader builds byte-"
                        f"level BPE ('{_TOKENIZER_MODEL}') tokenizers only: pull the original "
                        "Hugging Face repo of the model to convert it instead")
    missing = [k for k in _TOKENIZER_KEYS if k not in m]
    if missing:
        raise GgufError(f"the file's tokenizer lacks {_names(missing)}, which openvino-"
                        "genai's GGUF reader needs; pick a file made by a current llama.cpp, "
                        "or pull the original Hugging Face repo to convert it")


# --- file names -----------------------------------------------------------------------------

_SPLIT_RE = re.compile(r"(?P<stem>.+)-(?P<no>\d{5})-of-(?P<total>\d{5})\.gguf", re.I)
_QUANT_RE = re.compile(
    r"(?<![A-Za-z0-9])("
    r"IQ[1-4]_(?:XXS|XS|NL|S|M)"
    r"|Q[1-8]_K(?:_(?:XL|S|M|L))?"
    r"|Q[1-8]_[01](?:_[48]_[48])?"
    r"|TQ[12]_0|MXFP4(?:_MOE)?|BF16|FP16|FP32|F16|F32"
    r")(?![A-Za-z0-9])", re.I)
_QUANT_NAME_RE = re.compile(r"[A-Z0-9_]{1,32}")
_DRIVE_RE = re.compile(r"[A-Za-z]:")
# Without a quant: Q4_K_M, else the first of these present. The 4-bit quants whose every
# tensor openvino-genai loads come first, smallest first; then the other 4-bit mixes
# (Q4_K_S may hold Q5_K tensors, the IQ4 and MXFP4 types do not load), by bits per weight.
DEFAULT_QUANT = "Q4_K_M"
FALLBACK_4BIT = ("Q4_0", "Q4_1", "Q4_K_S", "Q4_K_L", "IQ4_XS", "IQ4_NL", "MXFP4_MOE")


def split_parts(filename: str) -> tuple[str, int, int] | None:
    """'Model-Q4_K_M-00001-of-00002.gguf' -> ('Model-Q4_K_M', 1, 2); None if not a part."""
    m = _SPLIT_RE.fullmatch(filename.rsplit("/", 1)[-1])
    if not m:
        return None
    no, total = int(m["no"]), int(m["total"])
    return (m["stem"], no, total) if 1 <= no <= total else None


def quant_of(filename: str) -> str | None:
    """The quant a GGUF file name names, upper-case ('x.q8_0.gguf' -> 'Q8_0'), or None.
    Looks at the file name, then at the folder holding it."""
    for part in reversed(filename.split("/")[-2:]):
        found = _QUANT_RE.findall(part)
        if found:
            q = found[-1].upper()
            return {"FP16": "F16", "FP32": "F32"}.get(q, q)
    return None


def _check_listed(path: Any) -> str:
    if not isinstance(path, str) or not path or path.startswith("/") or "\\" in path \
            or ".." in path or _DRIVE_RE.match(path) or "" in path.split("/") \
            or any(ord(c) < 32 or ord(c) == 127 for c in path):
        raise GgufError(f"refusing the repo's file listing: unsafe path {str(path)[:200]!r} "
                        "(absolute, '..', a backslash, a drive letter or control characters)")
    return path


def _best(paths: list[str]) -> str:
    """Files at the repo root first, then the shortest path."""
    return min(paths, key=lambda p: (p.count("/"), len(p), p))


def _default(singles: list[str]) -> tuple[str, str] | None:
    by_quant: dict[str, list[str]] = {}
    for p in singles:
        if (q := quant_of(p)) is not None:
            by_quant.setdefault(q, []).append(p)
    if DEFAULT_QUANT in by_quant:
        return _best(by_quant[DEFAULT_QUANT]), f"{DEFAULT_QUANT} (the default)"
    for q in FALLBACK_4BIT:
        if q in by_quant:
            return _best(by_quant[q]), f"smallest 4-bit file: {q}"
    return None


def choose_file(paths: list[str], quant: str | None) -> tuple[str, str]:
    """Picks the .gguf file to pull from a Hub repo's file listing: (path, why)."""
    listed = [_check_listed(p) for p in paths]
    candidates = [p for p in listed
                  if p.lower().endswith(".gguf") and "mmproj" not in p.lower()
                  and not any(part.startswith(".") for part in p.split("/"))]
    if not candidates:
        raise GgufError("the repo holds no GGUF model file (no .gguf file outside hidden "
                        "folders, other than mmproj vision projectors)")
    singles, splits = [], []
    for p in candidates:
        parts = split_parts(p)
        (splits if parts and parts[2] > 1 else singles).append(p)
    split_only = {quant_of(p) for p in splits} - {quant_of(p) for p in singles}
    available = sorted({q for p in candidates if (q := quant_of(p))})
    listing = ", ".join(q + (" (split)" if q in split_only else "") for q in available)

    def refuse_split(parts: list[str]) -> GgufError:
        first = min(parts)
        total = (split_parts(first) or ("", 0, 0))[2]
        alt = _default(singles)
        if alt is None and len(singles) == 1:
            alt = singles[0], ""
        instead = (f"ask for {quant_of(alt[0]) or alt[0]} instead, a single-file quant of "
                   "the repo" if alt else
                   "the repo has no single-file quant: merge the parts with llama.cpp's "
                   "llama-gguf-split --merge, or pull the original Hugging Face repo to "
                   "convert it")
        return GgufError(f"{first} is split in {total} files; split GGUF files are not "
                         f"supported (openvino-genai converts one file): {instead}")

    if quant is not None:
        want = quant.strip().upper()
        if not _QUANT_NAME_RE.fullmatch(want):
            raise GgufError(f"{quant[:40]!r} is not a GGUF quantization name (like Q4_K_M)")
        matches = [p for p in singles if quant_of(p) == want]
        if matches:
            return _best(matches), f"{want} as asked"
        split_matches = [p for p in splits if quant_of(p) == want]
        if split_matches:
            raise refuse_split(split_matches)
        if not available:
            raise GgufError(f"no {want} file in the repo: its GGUF files name no quant ("
                            f"{', '.join(sorted(candidates)[:10])})")
        raise GgufError(f"no {want} file in the repo; available: {listing}")

    if not singles:
        raise refuse_split(splits)
    chosen = _default(singles)
    if chosen:
        return chosen
    if len(singles) == 1:
        q = quant_of(singles[0])
        return singles[0], f"the only GGUF file{f' ({q})' if q else ''}"
    raise GgufError(f"the repo holds {len(singles)} GGUF files and no 4-bit one; ask for a "
                    f"quant: {listing or ', '.join(sorted(singles)[:10])}")
