"""The tiny vision-language model (devmodels' LLaVA recipe): its Hugging Face folder is a
LLaVA with the processor and chat template GenAI reads. The model running, in the plugin
and in VLMPipeline beside it, is tests/test_vision.py's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ovms_plugin import devmodels


@pytest.fixture(scope="module")
def vlm_models() -> dict[str, Path]:
    return devmodels.ensure_models(devmodels.default_cache_dir(), [devmodels.TINY_VLM_HF])


def test_hf_folder_is_a_llava_with_its_processor(vlm_models: dict[str, Path]) -> None:
    from transformers import AutoTokenizer

    src = vlm_models[devmodels.TINY_VLM_HF]
    config = json.loads((src / "config.json").read_text())
    assert config["architectures"] == ["LlavaForConditionalGeneration"]
    tokenizer = AutoTokenizer.from_pretrained(src)
    assert config["image_token_index"] == tokenizer.convert_tokens_to_ids(devmodels.IMAGE_TOKEN)
    assert config["text_config"]["vocab_size"] == len(tokenizer)
    processor = json.loads((src / "processor_config.json").read_text())
    assert processor["processor_class"] == "LlavaProcessor"
    assert processor["image_token"] == devmodels.IMAGE_TOKEN
    size = devmodels.TINY_VLM_VISION_CONFIG["image_size"]
    assert json.loads((src / "preprocessor_config.json").read_text())["crop_size"] == {
        "height": size, "width": size}
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Both?"}, {"type": "image"},
                                     {"type": "image"}]},
    ]
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\n<image>\n<image>\nBoth?<|im_end|>\n<|im_start|>assistant\n")
