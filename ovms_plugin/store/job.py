"""Conversion and validation of a model, run in a child process by store.pull:

    python -m ovms_plugin.store.job '{"convert": {...}?, "validate": {...}?}'

A child, so the conversion's memory (at least the original model's size) goes back to the
system when it ends, a crash cannot take the plugin down, and a cancelled pull can kill
it. Its last stdout line is a JSON result: {"ok": true, "peak_rss_bytes", "seconds"} or
{"ok": false, "error"}. It exits when its stdin (a pipe from the parent) closes.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from ovms_plugin import kinds
from ovms_plugin.kinds import ValidationError
from ovms_plugin.logs import setup_logging
from ovms_plugin.osutil import peak_rss_bytes
from ovms_plugin.procs import exit_on_stdin_eof

log = logging.getLogger("ovms_plugin.job")


def _kind(task: str) -> kinds.Kind:
    kind = kinds.for_task(task)
    if kind is None:
        raise ValidationError(f"unknown task {task!r}")
    return kind


def convert(src: str, dst: str, task: str, weight_format: str | None, library: str | None,
            trust_remote_code: bool) -> None:
    from ovms_plugin.store.convert import export_to_ir
    kind = _kind(task)
    extra = kind.conversion_model_kwargs(Path(src))
    export_to_ir(Path(src), Path(dst), task=kind.export_task_for(Path(src)),
                 weight_format=weight_format, library=library,
                 trust_remote_code=trust_remote_code, **({"model_kwargs": extra} if extra else {}))


def convert_gguf(src: str, dst: str, weight_format: str | None = None) -> None:
    """Converts a GGUF file to OpenVINO IR in `dst` with openvino-genai's own GGUF reader
    (no torch, no optimum-intel). The reader writes the IR and the tokenizer/detokenizer IR
    next to the file it was given, so it is given a link to the file inside `dst`, removed
    after. Weights keep their GGUF quantization (Q4_1 stays 4-bit), or with weight_format
    "int8" are re-quantised to 8 bits per channel (store/requant.py)."""
    import openvino_genai as ov_genai
    link = Path(dst) / "model.gguf"
    try:
        os.link(src, link)  # same file system: no copy
    except OSError:
        link.symlink_to(Path(src).resolve())
    try:
        pipe = ov_genai.LLMPipeline(str(link), "CPU", enable_save_ov_model=True)
        del pipe
    finally:
        link.unlink(missing_ok=True)
    if weight_format == "int8":
        from ovms_plugin.store.requant import requantize_int8
        folder = Path(dst)
        requantize_int8(folder / "openvino_model.xml", folder / "requantized.xml")
        for ext in (".bin", ".xml"):  # the IR names its .bin: both keep their names
            os.replace(folder / f"requantized{ext}", folder / f"openvino_model{ext}")
    elif weight_format is not None:
        raise ValueError(f"weight_format {weight_format!r} does not apply to a GGUF file")


def validate(folder: str, task: str, model_type: str | None) -> dict[str, Any]:
    """Loads the model the way the engine will and runs the smallest real request: the
    kind's validation recipe."""
    return _kind(task).validate(Path(folder), model_type)


def run(spec: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if c := spec.get("convert"):
        started = time.monotonic()
        convert(**c)
        out["convert_seconds"] = round(time.monotonic() - started, 2)
    if g := spec.get("convert_gguf"):
        started = time.monotonic()
        convert_gguf(**g)
        out["convert_seconds"] = round(time.monotonic() - started, 2)
    if v := spec.get("validate"):
        started = time.monotonic()
        out["validation"] = validate(**v)
        out["validate_seconds"] = round(time.monotonic() - started, 2)
    return out


def main() -> int:
    exit_on_stdin_eof()
    setup_logging(prefix="job ")
    spec = json.loads(sys.argv[1])
    started = time.monotonic()
    try:
        result = {"ok": True, **run(spec)}
    except ValidationError as e:
        result = {"ok": False, "error": f"validation failed: {e}"}
    except Exception as e:
        log.exception("job failed")
        result = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    result["seconds"] = round(time.monotonic() - started, 2)
    if (peak := peak_rss_bytes()) is not None:  # None: not readable on this OS
        result["peak_rss_bytes"] = peak
    sys.stdout.write("\n" + json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
