"""Facts read from an OpenVINO IR without loading it: weight precision and parameter count."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

# IR element types -> the quantization level names ListModels reports.
_LEVELS = {"u4": "INT4", "i4": "INT4", "nf4": "NF4", "u8": "INT8", "i8": "INT8",
           "f8e4m3": "FP8", "f8e5m2": "FP8", "f16": "FP16", "bf16": "BF16", "f32": "FP32"}


def weight_stats(xml_path: Path) -> tuple[str, int]:
    """(quantization level, number of weight elements) of an IR's constants. The level is
    the element type holding most weight elements, so small f16 scales next to int4
    weights do not count."""
    counts: Counter[str] = Counter()
    for _, elem in ET.iterparse(xml_path, events=("end",)):
        if elem.tag == "layer" and elem.get("type") == "Const":
            data = elem.find("data")
            if data is not None:
                shape = data.get("shape") or ""
                dims = [int(d) for d in shape.split(",") if d.strip().isdigit()]
                n = math.prod(dims) if dims else 1
                counts[data.get("element_type", "")] += n
            elem.clear()
    weights = {t: n for t, n in counts.items() if t in _LEVELS}
    if not weights:
        return "unknown", 0
    dominant = max(weights, key=lambda t: weights[t])
    return _LEVELS[dominant], sum(weights.values())


def parameter_count_from_config(config: dict) -> int | None:
    """Parameters of a llama-like decoder from config.json (embeddings, attention with
    grouped KV heads, gated MLP, norms, untied head); None when the shape is not one."""
    try:
        h = int(config["hidden_size"])
        layers = int(config["num_hidden_layers"])
        inter = int(config["intermediate_size"])
        vocab = int(config["vocab_size"])
        heads = int(config["num_attention_heads"])
    except (KeyError, TypeError, ValueError):
        return None
    kv = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or h // heads)
    attn = h * heads * head_dim * 2 + 2 * h * kv * head_dim
    if config.get("attention_bias", config.get("model_type") == "qwen2"):
        attn += heads * head_dim + 2 * kv * head_dim
    per_layer = attn + 3 * h * inter + 2 * h
    total = vocab * h + layers * per_layer + h
    if not config.get("tie_word_embeddings", False):
        total += vocab * h
    return total


def format_parameter_size(n: int) -> str:
    """Ollama's style: 494.03M, 1.5B."""
    if n >= 10**9:
        return f"{n / 1e9:.1f}B"
    if n >= 10**6:
        return f"{n / 1e6:.2f}M"
    return f"{n / 1e3:.2f}K"
