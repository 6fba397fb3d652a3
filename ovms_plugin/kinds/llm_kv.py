"""The LLM kind's KV cache, sized from the model: bytes per token (layers × KV heads ×
(head size × element bytes + quantisation scales) × 2 for keys and values) × the context
served × the full-length sequences the model is set up for (`llm.parallel`), within the
memory budget. Short requests share the same pool of blocks, so far more than `parallel`
of them run at once.

A `scheduler.cache_size` or `scheduler.num_kv_blocks` in the settings still wins.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Tokens per KV cache block in openvino-genai 2026.4 (CPU 32, GPU 16).
BLOCK_TOKENS = {"CPU": 32, "GPU": 16}
# Bytes per element of each KV cache precision. The 8-bit ones also keep a scale and a
# zero point per token and head (measured: 12 bytes for SmolLM2's 64-wide heads on CPU).
_ELEMENT_BYTES = {"u8": 1.0, "i8": 1.0, "u4": 0.5, "f16": 2.0, "bf16": 2.0, "f32": 4.0}
_QUANT_EXTRA = {"u8": 12, "i8": 12, "u4": 12}
DEFAULT_PRECISION = {"CPU": "u8", "GPU": "f16"}
MIN_CONTEXT = 256  # less than this serves nothing useful: refuse to load instead


class KVSizeError(ValueError):
    """The model's KV cache cannot be sized as its settings ask."""


@dataclass(frozen=True)
class KVPlan:
    bytes_per_token: int
    context_length: int  # tokens one sequence may hold, prompt and answer
    parallel: int  # full-length sequences the pool holds at once
    tokens: int  # the pool, in tokens
    blocks: int
    precision: str

    @property
    def bytes(self) -> int:
        return self.bytes_per_token * self.tokens

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "bytes": self.bytes}


def model_shape(model_dir: Path) -> dict[str, int] | None:
    """Layers, KV heads, head size and trained context from config.json (None when it does
    not say)."""
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    config = config.get("text_config") if isinstance(config.get("text_config"), dict) \
        else config
    layers = config.get("num_hidden_layers")
    heads = config.get("num_attention_heads")
    kv_heads = config.get("num_key_value_heads") or heads
    hidden = config.get("hidden_size")
    head = config.get("head_dim") or (hidden // heads if isinstance(hidden, int) and
                                      isinstance(heads, int) and heads > 0 else None)
    context = config.get("max_position_embeddings")
    values = (layers, kv_heads, head, context)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
        return None
    return {"layers": layers, "kv_heads": kv_heads, "head_size": head, "context": context}


def bytes_per_token(shape: dict[str, int], precision: str) -> int:
    per_head = shape["head_size"] * _ELEMENT_BYTES[precision] + _QUANT_EXTRA.get(precision, 0)
    return math.ceil(shape["layers"] * shape["kv_heads"] * 2 * per_head)


def precision_of(properties: dict[str, Any], device: str) -> str:
    """The KV cache precision compiled with these properties on a device (or family)."""
    precision = str(properties.get("KV_CACHE_PRECISION")
                    or DEFAULT_PRECISION.get(device.split(".")[0], "f16")).lower()
    if precision not in _ELEMENT_BYTES:
        raise KVSizeError(f"KV_CACHE_PRECISION {precision!r} is not one of "
                          f"{sorted(_ELEMENT_BYTES)}")
    return precision


def plan(model_dir: Path, family: str, properties: dict[str, Any], *, context: int | None,
         parallel: int, room_bytes: int, extra_bytes_per_token: int = 0) -> KVPlan | None:
    """The KV cache for this model on a device family, or None when config.json does not
    give its shape. `room_bytes` is what the cache may take; when context × parallel does
    not fit, the pool shrinks to what does, and below one full context so does the context
    served (logged). `extra_bytes_per_token`: a second cache of as many tokens shares the
    room (a draft model's); the plan's bytes are this model's own."""
    shape = model_shape(model_dir)
    if shape is None:
        return None
    precision = precision_of(properties, family)
    trained = shape["context"]
    if context is not None and context > trained:
        raise KVSizeError(f"llm.context_length {context} is more than the {trained} tokens "
                          "the model was trained for; use at most that")
    context = context or trained
    block = BLOCK_TOKENS.get(family, 16)
    bpt = bytes_per_token(shape, precision)
    tokens = context * parallel
    if tokens * (bpt + extra_bytes_per_token) > room_bytes:
        tokens = max(0, room_bytes // (bpt + extra_bytes_per_token)) // block * block
        if tokens < context:
            if tokens < MIN_CONTEXT:
                raise KVSizeError(
                    f"the memory left ({room_bytes / 2**20:.0f} MiB for the KV cache at "
                    f"{bpt + extra_bytes_per_token} bytes per token) holds fewer than "
                    f"{MIN_CONTEXT} tokens; unload other models, raise memory_budget, or "
                    "lower llm.context_length")
            log.warning("the KV cache that fits holds %d tokens: serving a context of %d "
                        "instead of %d (set llm.context_length and llm.parallel, or raise "
                        "memory_budget)", tokens, tokens, context)
            context = tokens
        parallel = max(1, tokens // context)
    blocks = math.ceil(tokens / block)
    return KVPlan(bpt, context, parallel, blocks * block, blocks, precision)
