"""Export Hugging Face folders to OpenVINO IR (needs the optional conversion extras).

optimum-intel, torch, transformers and openvino-tokenizers are imported inside the functions,
so a runtime-only install can import this module without them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

WEIGHT_FORMATS = ("fp32", "fp16", "int8", "int4")

TOKENIZER_XML = "openvino_tokenizer.xml"
DETOKENIZER_XML = "openvino_detokenizer.xml"

# Tasks whose model takes text, so GenAI needs the tokenizer (and detokenizer) IR next to it.
_TEXT_TASKS = frozenset(
    {
        "text-generation",
        "text2text-generation",
        "image-text-to-text",
        "feature-extraction",
        "sentence-similarity",
        "text-classification",
        "fill-mask",
        "token-classification",
        "question-answering",
    }
)


class ConversionError(RuntimeError):
    """An export could not produce a usable OpenVINO IR folder."""


def _quantization_config(src: Path, weight_format: str) -> Any:
    """The weight-compression config `optimum-cli export openvino --weight-format` would use."""
    from optimum.intel import OVWeightQuantizationConfig
    from optimum.intel.openvino.configuration import get_default_quantization_config

    # Known model ids have tuned defaults (matched on the path's tail); else the CLI's defaults.
    default = get_default_quantization_config(str(src), weight_format)
    if default is not None:
        return default
    if weight_format == "int8":
        return OVWeightQuantizationConfig(bits=8, sym=False, ratio=1.0, group_size=-1)
    # "adjust": layers whose width 128 does not divide get a smaller group instead of failing.
    return OVWeightQuantizationConfig(
        bits=4, sym=False, ratio=1.0, group_size=128, group_size_fallback="adjust"
    )


def export_to_ir(
    src: Path,
    dst: Path,
    task: str,
    weight_format: str | None = None,
    library: str | None = None,
    trust_remote_code: bool = False,
    model_kwargs: dict[str, Any] | None = None,
) -> None:
    """Export the HF-format folder ``src`` to OpenVINO IR in ``dst``.

    ``weight_format`` None keeps optimum's default (fp32, or int8 for models over 1B
    parameters); "fp32"/"fp16" store weights in that type; "int8"/"int4" compress weights
    like the CLI. ``model_kwargs`` goes to optimum's ``main_export`` as the CLI's
    ``--model-kwargs`` does (SpeechT5 needs ``{"vocoder": <folder or id>}``). On failure
    ``dst`` may hold a partial export: export into a temporary folder.
    """
    if weight_format is not None and weight_format not in WEIGHT_FORMATS:
        raise ValueError(
            f"weight_format must be one of {WEIGHT_FORMATS} or None: {weight_format!r}"
        )
    from optimum.exporters.openvino import main_export
    from optimum.intel import OVConfig

    ov_config = None
    quantization = None
    if weight_format in ("fp32", "fp16"):
        ov_config = OVConfig(dtype=weight_format)
    elif weight_format in ("int8", "int4"):
        quantization = _quantization_config(src, weight_format)
        # main_export only reads this for runtime options: it does not compress weights itself.
        ov_config = OVConfig(quantization_config=quantization)

    main_export(
        model_name_or_path=str(src),
        output=dst,
        task=task,  # explicit: auto-detection on a local folder queries the Hub
        ov_config=ov_config,
        convert_tokenizer=True,  # without it no tokenizer IR is written
        library_name=library,
        trust_remote_code=trust_remote_code,
        model_kwargs=model_kwargs,
    )
    if quantization is not None:
        # What optimum-cli does after main_export: reload the IR and compress its weights.
        from huggingface_hub.constants import HF_HUB_CACHE
        from optimum.exporters.openvino.__main__ import _main_quantize

        _main_quantize(
            model_name_or_path=str(src),
            task=task,
            library_name=library,
            quantization_config=quantization,
            output=dst,
            cache_dir=HF_HUB_CACHE,
            trust_remote_code=trust_remote_code,
            model_kwargs=model_kwargs,
        )

    if task.removesuffix("-with-past") in _TEXT_TASKS or library == "sentence_transformers":
        _ensure_tokenizer_ir(src, dst, task, trust_remote_code)
    if task == "image-text-to-text":
        _ensure_preprocessor_config(src, dst)


def _ensure_preprocessor_config(src: Path, dst: Path) -> None:
    """transformers 5 saves a processor as one processor_config.json with the image
    processor nested in it; GenAI reads the image processor only from
    preprocessor_config.json, and without it preprocesses at the wrong size."""
    import json

    if (dst / "preprocessor_config.json").is_file():
        return
    if (src / "preprocessor_config.json").is_file():
        (dst / "preprocessor_config.json").write_bytes(
            (src / "preprocessor_config.json").read_bytes())
        return
    try:
        nested = json.loads((dst / "processor_config.json").read_text()).get("image_processor")
    except (OSError, ValueError):
        return
    if isinstance(nested, dict):
        (dst / "preprocessor_config.json").write_text(json.dumps(nested, indent=2))


def _ensure_tokenizer_ir(src: Path, dst: Path, task: str, trust_remote_code: bool) -> None:
    """optimum skips tokenizers it cannot convert without an error: check, and retry once."""
    if (dst / TOKENIZER_XML).is_file() and (dst / DETOKENIZER_XML).is_file():
        return
    log.warning("export of %s wrote no tokenizer IR; converting it directly", src)
    try:
        import openvino
        from openvino_tokenizers import convert_tokenizer
        from transformers import AutoTokenizer

        hf_tokenizer = AutoTokenizer.from_pretrained(src, trust_remote_code=trust_remote_code)
        if task.startswith("text-generation") or task == "image-text-to-text":
            hf_tokenizer.padding_side = "left"  # as optimum does: GenAI batches left-padded
        tokenizer, detokenizer = convert_tokenizer(hf_tokenizer, with_detokenizer=True)
        openvino.save_model(tokenizer, dst / TOKENIZER_XML)
        openvino.save_model(detokenizer, dst / DETOKENIZER_XML)
    except Exception as exc:
        raise ConversionError(
            f"could not convert the tokenizer of {src} to OpenVINO "
            f"({TOKENIZER_XML}, {DETOKENIZER_XML}): {type(exc).__name__}: {exc}"
        ) from exc
