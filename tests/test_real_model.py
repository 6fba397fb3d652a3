"""The chat path on real weights: SmolLM2-135M-Instruct (converted from its GGUF by the real
pull), served by the plugin launched as AOG launches it. Greedy (temperature 0) answers
with f32 inference, so they are the engine's own answers, token for token."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import REAL
from test_aog_plugin import stream_chat

from ovms_plugin import devmodels
from ovms_plugin.aog.host import AogHost


def user(content: str) -> list[dict]:
    return [{"role": "user", "content": content}]


def ask(host: AogHost, messages: list[dict], **kw) -> dict:
    r = host.invoke("chat", {"model": REAL, "messages": messages, "temperature": 0,
                             "max_tokens": 48, **kw})
    assert r.code == 0, r.message
    return json.loads(r.response_data)


@pytest.fixture(scope="module")
def reference(test_models: dict[str, Path]):
    """The engine called directly: ContinuousBatchingPipeline on the same folder, f32."""
    import openvino_genai as ov_genai
    sc = ov_genai.SchedulerConfig()
    sc.cache_size = 1
    pipe = ov_genai.ContinuousBatchingPipeline(str(test_models[devmodels.SMOLLM2]), sc, "CPU",
                                               {"INFERENCE_PRECISION_HINT": "f32"})
    return pipe, ov_genai.Tokenizer(str(test_models[devmodels.SMOLLM2]))


@pytest.mark.parametrize("question, word", [
    ("What is the capital of France?", "Paris"),
    ("What is 2 + 2? Answer with a number.", "4"),
    ("What color is the sky? Answer in one word.", "blue"),
])
def test_factual_answers(host: AogHost, question: str, word: str):
    out = ask(host, user(question))
    assert word in out["choices"][0]["message"]["content"]


def test_prompt_usage_and_output_equal_the_engine_run_directly(host: AogHost, reference):
    import openvino_genai as ov_genai
    pipe, tok = reference
    messages = [{"role": "system", "content": "You are a concise assistant."},
                *user("Name a large animal that lives in the sea.")]
    out = ask(host, messages, max_tokens=40)
    # The plugin renders the model's own template (from the GGUF): the prompt it counts is
    # exactly apply_chat_template's, tokenized without extra special tokens.
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>system\nYou are a concise assistant.<|im_end|>")
    ids = tok.encode(prompt, add_special_tokens=False).input_ids.data[0].tolist()
    gc = ov_genai.GenerationConfig(max_new_tokens=40)
    gc.apply_chat_template = False
    direct = pipe.generate([prompt], [gc])[0]
    assert out["choices"][0]["message"]["content"] == direct.m_generation_ids[0]
    assert out["usage"]["prompt_tokens"] == len(ids)
    n_direct = len(tok.encode(direct.m_generation_ids[0], add_special_tokens=False)
                   .input_ids.data[0])
    assert abs(out["usage"]["completion_tokens"] - n_direct) <= 1  # re-tokenising may merge
    assert out["usage"]["total_tokens"] == len(ids) + out["usage"]["completion_tokens"]


def test_stops_at_the_models_own_end_token(host: AogHost):
    out = ask(host, user("What is the capital of France?"), max_tokens=100)
    choice = out["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert out["usage"]["completion_tokens"] < 100
    assert "<|im_end|>" not in choice["message"]["content"]
    assert "<|im_start|>" not in choice["message"]["content"]
    capped = ask(host, user("Write a long story about a dragon."), max_tokens=5)
    assert capped["choices"][0]["finish_reason"] == "length"
    assert capped["usage"]["completion_tokens"] == 5


def test_multi_turn_conversation(host: AogHost):
    messages = [*user("What is the capital of France?"),
                {"role": "assistant", "content": "The capital of France is Paris."},
                *user("And of Germany?")]
    assert "Berlin" in ask(host, messages)["choices"][0]["message"]["content"]


@pytest.mark.parametrize("question", ["Write the word cat followed by a cat emoji.",
                                      "Say hello in Japanese."])
def test_streamed_non_ascii_answer_equals_the_unary_one(host: AogHost, question: str):
    unary = ask(host, user(question), max_tokens=24)["choices"][0]["message"]["content"]
    assert any(ord(c) > 0x2FFF for c in unary)  # emoji or CJK: multi-byte tokens
    text, events, reader = stream_chat(host, {"model": REAL, "messages": user(question),
                                              "temperature": 0, "max_tokens": 24})
    assert reader.error is None
    assert text == unary and "\ufffd" not in text
    assert events[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_stop_strings_on_real_text(host: AogHost):
    out = ask(host, user("What is the capital of France?"), stop=["France"])
    choice = out["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert "France" not in choice["message"]["content"]
    assert choice["message"]["content"] in "The capital of "


def test_sampling_without_a_seed_differs_and_with_one_repeats(host: AogHost):
    """Each sampled request draws its own seed (GenAI's default seed is one for all)."""
    question = user("Tell me a short story about a cat.")
    free = {ask(host, question, temperature=1.0, max_tokens=24)["choices"][0]["message"][
        "content"] for _ in range(3)}
    assert len(free) > 1
    seeded = {ask(host, question, temperature=1.0, max_tokens=24, seed=7)["choices"][0][
        "message"]["content"] for _ in range(2)}
    assert len(seeded) == 1
