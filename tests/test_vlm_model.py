"""The tiny vision-language model (devmodels' LLaVA recipe) in GenAI directly: VLMPipeline
takes one or more uint8 images and plain or chat-templated prompts, and
ContinuousBatchingPipeline takes the same requests with images and decodes the same tokens,
step by step through its handles, so an engine can serve images on either."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ovms_plugin import devmodels

PROMPT = "Describe the image."
MAX_NEW = 6


@pytest.fixture(scope="module")
def vlm_models() -> dict[str, Path]:
    return devmodels.ensure_models(devmodels.default_cache_dir(),
                                   [devmodels.TINY_VLM, devmodels.TINY_VLM_HF])


@pytest.fixture(scope="module")
def images() -> list[Any]:
    import openvino as ov

    rng = np.random.default_rng(0)
    return [ov.Tensor(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)),  # [H, W, 3]
            ov.Tensor(rng.integers(0, 256, (1, 80, 50, 3), dtype=np.uint8))]  # [1, H, W, 3]


def _vlm(pipe: Any, prompt: str, images: list[Any], apply_chat_template: bool = True) -> Any:
    config = pipe.get_generation_config()  # greedy, eos from generation_config.json
    config.max_new_tokens = MAX_NEW
    config.apply_chat_template = apply_chat_template
    return pipe.generate(prompt, images=images, generation_config=config)


def test_vlm_pipeline_generates_with_images(vlm_models: dict[str, Path], images: list[Any]) -> None:
    import openvino_genai as ov_genai

    ir = vlm_models[devmodels.TINY_VLM]
    for name in ("openvino_language_model.xml", "openvino_text_embeddings_model.xml",
                 "openvino_vision_embeddings_model.xml", "openvino_tokenizer.xml",
                 "openvino_detokenizer.xml", "preprocessor_config.json"):
        assert (ir / name).is_file(), name
    for path in ir.glob("*.json"):  # no trace of the temporary source folder
        assert "tiny-vlm-hf-" not in path.read_text(), path.name
    pipe = ov_genai.VLMPipeline(str(ir), "CPU")
    one = _vlm(pipe, PROMPT, images[:1])
    two = _vlm(pipe, PROMPT, images)
    text_only = _vlm(pipe, PROMPT, [])
    for result in (one, two, text_only):
        assert isinstance(result.texts[0], str) and result.texts[0]
    # Each image adds the same number of input tokens: 16 embeddings (56x56 in patches of 14,
    # CLS dropped) and, as GenAI counts them, one more.
    n_text = text_only.perf_metrics.get_num_input_tokens()
    per_image = one.perf_metrics.get_num_input_tokens() - n_text
    assert per_image >= 16
    assert two.perf_metrics.get_num_input_tokens() == n_text + 2 * per_image
    # Untagged images go first in order: the same as universal tags at the start.
    tagged = _vlm(pipe, "<ov_genai_image_0><ov_genai_image_1>" + PROMPT, images)
    assert tagged.texts == two.texts

    # Chat style: the model's template renders image parts as "<image>\n" (LLaVA's native tag),
    # and the rendered prompt goes in without a second templating.
    tokenizer = pipe.get_tokenizer()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert rendered == f"<|im_start|>user\n<image>\n{PROMPT}<|im_end|>\n<|im_start|>assistant\n"
    chat = _vlm(pipe, rendered, images[:1], apply_chat_template=False)
    assert chat.texts[0]
    assert chat.perf_metrics.get_num_input_tokens() == one.perf_metrics.get_num_input_tokens() + 1
    # GenAI templates a plain prompt itself: a universal tag where "<image>\n" was is the same.
    universal = rendered.replace("<image>\n", "<ov_genai_image_0>")
    assert _vlm(pipe, universal, images[:1], apply_chat_template=False).texts == one.texts


def test_continuous_batching_with_images_matches_vlm_pipeline(
    vlm_models: dict[str, Path], images: list[Any]
) -> None:
    import openvino_genai as ov_genai

    ir = str(vlm_models[devmodels.TINY_VLM])
    pipe = ov_genai.VLMPipeline(ir, "CPU")
    scheduler = ov_genai.SchedulerConfig()
    scheduler.cache_size = 1  # GB
    scheduler.max_num_batched_tokens = 256
    scheduler.dynamic_split_fuse = True
    cb = ov_genai.ContinuousBatchingPipeline(ir, scheduler, "CPU")
    tokenizer = cb.get_tokenizer()
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}],
        add_generation_prompt=True)
    cases = [
        (PROMPT, images[:1], True),
        (PROMPT, images, True),
        ("<ov_genai_image_1> and <ov_genai_image_0>: " + PROMPT, images, True),
        (PROMPT, [], True),
        (rendered, images[:1], False),
    ]
    # All at once, so the requests with images share the scheduler's batches.
    handles = []
    for request_id, (prompt, imgs, templated) in enumerate(cases):
        config = cb.get_config()
        config.max_new_tokens = MAX_NEW
        config.apply_chat_template = templated
        handles.append(cb.add_request(request_id, prompt, imgs, config))
    steps: list[list[list[int]]] = [[] for _ in cases]
    while cb.has_non_finished_requests():
        cb.step()
        for handle, got in zip(handles, steps, strict=True):
            if handle.can_read():
                got.extend(list(out.generated_ids) for out in handle.read().values())
    for (prompt, imgs, templated), handle, got in zip(cases, handles, steps, strict=True):
        assert handle.get_status() == ov_genai.GenerationStatus.FINISHED
        assert all(len(step) == 1 for step in got)  # one new token per step and read
        ids = [token for step in got for token in step]
        assert len(ids) == MAX_NEW
        assert tokenizer.decode(ids) == _vlm(pipe, prompt, imgs, templated).texts[0], prompt

    # The batch call: one image list per prompt.
    config = cb.get_config()
    config.max_new_tokens = MAX_NEW
    results = cb.generate([PROMPT, PROMPT], images=[images[:1], images],
                          generation_config=[config, config])
    assert [r.texts[0] for r in results] == [
        _vlm(pipe, PROMPT, images[:1]).texts[0], _vlm(pipe, PROMPT, images).texts[0]]


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
