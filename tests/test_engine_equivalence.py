"""Greedy output through the plugin equals ContinuousBatchingPipeline.generate() on the
same prompt (f32 inference on both sides, for an exact match)."""

from __future__ import annotations

import json
from pathlib import Path

import openvino_genai as ov_genai
from conftest import CHAT

from ovms_plugin.aog.host import AogHost

PROMPTS = ["Hello, who are you?", "List three colors.", "def fib(n):", "Ünïcödé? 你好"]


def test_greedy_chat_equals_engine_generate(host: AogHost, test_models: dict[str, Path]):
    sc = ov_genai.SchedulerConfig()
    sc.cache_size = 1
    pipe = ov_genai.ContinuousBatchingPipeline(str(test_models["tiny-chat"]), sc, "CPU",
                                               {"INFERENCE_PRECISION_HINT": "f32"})
    tok = pipe.get_tokenizer()
    gc = pipe.get_config()
    gc.max_new_tokens = 40
    gc.do_sample = False
    rendered = [tok.apply_chat_template([{"role": "user", "content": p}],
                                        add_generation_prompt=True) for p in PROMPTS]
    # The rendered prompt already holds the template: generate() must not apply it again.
    gc.apply_chat_template = False
    expected = [r.m_generation_ids[0] for r in pipe.generate(rendered, [gc] * len(PROMPTS))]
    for prompt, want in zip(PROMPTS, expected, strict=True):
        r = host.invoke("chat", {"model": CHAT, "max_tokens": 40, "temperature": 0,
                                 "messages": [{"role": "user", "content": prompt}]})
        assert r.code == 0, r.message
        assert json.loads(r.response_data)["choices"][0]["message"]["content"] == want
