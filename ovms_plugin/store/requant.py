"""Re-quantising an LLM's weights to 8-bit symmetric, one scale per output channel (the
layout OpenVINO's CPU plugin runs as a compressed fully-connected layer, as NNCF's
INT8_SYM writes it), for models whose own layout runs slowly: the 4-bit asymmetric
groups of a GGUF's Q4_1, for one.

Each MatMul whose weights are a constant subgraph (the stored integers, their zero points
and scales) gets that subgraph evaluated to float once, then replaced by int8 values and
a float16 scale per row. Embedding lookups keep their own weights.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


def _constant_subgraph(output: Any) -> bool:
    """The value feeding this output depends on no input or state of the model."""
    stack, seen = [output.get_node()], set()
    while stack:
        node = stack.pop()
        if node.get_type_name() in ("Parameter", "ReadValue"):
            return False
        for port in node.inputs():
            src = port.get_source_output().get_node()
            if id(src) not in seen:
                seen.add(id(src))
                stack.append(src)
    return True


def _evaluate(core: Any, output: Any) -> np.ndarray:
    import openvino as ov
    import openvino.opset13 as ops
    sub = ov.Model([ops.result(output)], [])
    req = core.compile_model(sub, "CPU", {"INFERENCE_PRECISION_HINT": "f32"}) \
        .create_infer_request()
    req.infer()
    return np.asarray(req.get_output_tensor(0).data, dtype=np.float32).copy()


def quantize_rows(w: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """int8 values and float16 scales, symmetric, one scale along `axis`'s other side:
    w ≈ q * scale, |q| <= 127."""
    peak = np.max(np.abs(w), axis=axis, keepdims=True)
    scale = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float16)
    q = np.clip(np.rint(w / scale.astype(np.float32)), -127, 127).astype(np.int8)
    return q, scale


def requantize_int8(model_xml: Path, out_xml: Path) -> int:
    """Writes model_xml's model with its MatMul weights as int8 per channel to out_xml;
    returns how many weights it changed."""
    import openvino as ov
    import openvino.opset13 as ops
    core = ov.Core()
    model = core.read_model(model_xml)
    changed = 0
    for node in model.get_ordered_ops():
        if node.get_type_name() != "MatMul":
            continue
        port = node.input(1)
        source = port.get_source_output()
        if source.get_node().get_type_name() == "Constant" or \
                not _constant_subgraph(source) or len(source.get_partial_shape()) != 2:
            continue
        w = _evaluate(core, source)
        # The reduction runs along K: rows of [N, K] when transpose_b, else columns.
        axis = 1 if node.get_attributes().get("transpose_b") else 0
        q, scale = quantize_rows(w, axis)
        restored = ops.multiply(ops.convert(ops.constant(q), "f16"), ops.constant(scale))
        port.replace_source_output(ops.convert(restored, "f32").output(0))
        changed += 1
    model.validate_nodes_and_infer_types()
    ov.save_model(model, out_xml, compress_to_fp16=False)
    log.info("re-quantised %d weights of %s to int8 per channel", changed, model_xml.name)
    return changed
