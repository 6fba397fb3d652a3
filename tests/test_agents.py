"""What agents and apps need, on the real SmolLM2-135M-Instruct through `serve` and the AOG
plugin: tool calls (forced calls always valid for their schema), structured output
(json_schema, json_object, pydantic `.parse()`), honest sampling parameters (fresh seeds,
top_k, n, logprobs), every refused parameter refused by name, Ollama's format/tools/think,
and a reasoning model's <think> split into reasoning_content."""

from __future__ import annotations

import html
import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import jsonschema
import ollama
import openai
import pydantic
import pytest
import yaml
from conftest import REAL
from test_http import Server, sse_events

from ovms_plugin import devmodels
from ovms_plugin.aog.host import AogHost

THINKER = "tiny-thinker"  # the tiny chat model with a template that opens <think>

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The time in a time zone.",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string"}},
                   "required": ["zone"]}}}
ASK = [{"role": "user", "content": "What is the weather in Paris right now?"}]

SCHEMAS = {
    "enum": {"type": "object", "properties": {
        "name": {"type": "string"}, "color": {"type": "string", "enum": ["red", "green", "blue"]}},
        "required": ["name", "color"], "additionalProperties": False},
    "nested array": {"type": "object", "properties": {
        "items": {"type": "array", "minItems": 1, "maxItems": 3, "items": {
            "type": "object", "properties": {"label": {"type": "string", "maxLength": 20},
                                             "tags": {"type": "array", "maxItems": 3,
                                                      "items": {"type": "string",
                                                                "maxLength": 12}}},
            "required": ["label", "tags"]}}},
        "required": ["items"]},
    "bounded numbers": {"type": "object", "properties": {
        "age": {"type": "integer", "minimum": 1, "maximum": 99},
        "lives": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 10},
        "weight": {"type": "number"}},
        "required": ["age", "lives", "weight"]},
}


def thinker_template() -> str:
    return ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant: {% if enable_thinking is defined and "
            "not enable_thinking %}<think></think>{% else %}<think>{% endif %}{% endif %}")


@pytest.fixture(scope="module")
def agents_home(plugin_home: Path, tmp_path_factory: pytest.TempPathFactory,
                test_models: dict[str, Path]) -> Path:
    """The real model, and a copy of the tiny chat model whose template is a reasoning
    model's (it opens <think> unless enable_thinking is false)."""
    home = tmp_path_factory.mktemp("agents-home")
    shutil.copytree(plugin_home / "models" / REAL, home / "models" / REAL)
    folder = home / "models" / THINKER
    shutil.copytree(test_models[devmodels.TINY_CHAT], folder)
    (folder / "manifest.json").unlink(missing_ok=True)
    xml = folder / "openvino_tokenizer.xml"
    text = xml.read_text()
    found = re.search(r'<chat_template value="([^"]*)"', text)
    assert found
    xml.write_text(text[:found.start(1)] + html.escape(thinker_template(), quote=True)
                   + text[found.end(1):])
    exact = {"properties": {"INFERENCE_PRECISION_HINT": "f32"}, "scheduler": {"cache_size": 1}}
    (home / "settings.yaml").write_text(yaml.safe_dump({"models": {REAL: exact,
                                                                   THINKER: exact}}))
    return home


@pytest.fixture(scope="module")
def srv(agents_home: Path) -> Iterator[Server]:
    s = Server(agents_home, ["--port", "0", "--model", REAL, "--idle-unload", "0"])
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def client(srv: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{srv.url}/v1", api_key="none", max_retries=0, timeout=120)


def chat(client: openai.OpenAI, **kw):
    return client.chat.completions.create(model=REAL, messages=kw.pop("messages", ASK), **kw)


# --- tools --------------------------------------------------------------------------------

def test_a_forced_call_is_valid_for_its_schema(client: openai.OpenAI):
    for choice in ({"type": "function", "function": {"name": "get_weather"}}, "required"):
        out = chat(client, tools=[WEATHER, TIME], tool_choice=choice, temperature=0)
        c = out.choices[0]
        assert c.finish_reason == "tool_calls", c
        assert c.message.content is None and c.message.tool_calls
        for call in c.message.tool_calls:
            assert call.type == "function" and re.fullmatch(r"call_[0-9a-f]{24}", call.id)
            schema = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]
            jsonschema.validate(json.loads(call.function.arguments),
                                schema["function"]["parameters"])
        if isinstance(choice, dict):
            assert [t.function.name for t in c.message.tool_calls] == ["get_weather"]


def test_forced_calls_stream_as_tool_call_deltas(client: openai.OpenAI):
    chunks = list(chat(client, tools=[WEATHER], tool_choice="required", temperature=0,
                       parallel_tool_calls=False, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    calls = [tc for d in deltas for tc in d.tool_calls or []]
    assert len(calls) == 1 and calls[0].index == 0 and calls[0].function.name == "get_weather"
    jsonschema.validate(json.loads(calls[0].function.arguments),
                        WEATHER["function"]["parameters"])
    assert not any(d.content for d in deltas)  # the call's JSON is not sent as text
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_a_tool_result_round_trip(client: openai.OpenAI):
    first = chat(client, tools=[WEATHER], tool_choice="required", temperature=0)
    call = first.choices[0].message.tool_calls[0]
    history = [*ASK, first.choices[0].message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id,
                "content": json.dumps({"temperature": 21, "unit": "celsius"})}]
    out = chat(client, messages=history, tools=[WEATHER], temperature=0, max_tokens=40)
    assert out.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # The call and its result are in the prompt the model saw, not dropped.
    assert out.usage.prompt_tokens > first.usage.prompt_tokens + 15
    without = chat(client, messages=ASK, tools=[WEATHER], temperature=0, max_tokens=1)
    assert out.usage.prompt_tokens > without.usage.prompt_tokens


def test_tool_errors_are_named(client: openai.OpenAI):
    cases = [
        ({"tools": [WEATHER], "tool_choice": {"type": "function",
                                              "function": {"name": "nope"}}}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {
            "name": "bad", "parameters": {"type": "object",
                                          "properties": {"x": {"type": "strin"}}}}}]},
         "tools"),
        ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [WEATHER], "response_format": {"type": "json_object"}}, "response_format"),
    ]
    for kw, param in cases:
        with pytest.raises(openai.BadRequestError) as e:
            chat(client, **kw)
        assert e.value.body["param"] == param, (kw, e.value.body)


# --- structured output ----------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_json_schema_output_validates(client: openai.OpenAI, name: str):
    schema = SCHEMAS[name]
    for temperature in (0, 0.7):
        out = chat(client, messages=[{"role": "user",
                                      "content": "Give me a JSON object describing a cat."}],
                   temperature=temperature, max_tokens=200, seed=7, response_format={
                       "type": "json_schema",
                       "json_schema": {"name": "x", "schema": schema, "strict": True}})
        assert out.choices[0].finish_reason == "stop", out.choices[0]
        jsonschema.validate(json.loads(out.choices[0].message.content), schema)


def test_json_object_and_pydantic_parse(client: openai.OpenAI):
    out = chat(client, messages=[{"role": "user",
                                  "content": "Give me a JSON object describing a cat."}],
               response_format={"type": "json_object"}, temperature=0, max_tokens=200)
    # {"type": "object"} gives a 135M model nothing to stop on: it may fill max_tokens
    # with keys. What it writes is JSON from the first character, and whole when it ends.
    answer = out.choices[0].message.content
    assert answer.startswith("{")
    if out.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(answer), dict)

    class City(pydantic.BaseModel):
        name: str
        country: str
        population: int

    parsed = client.chat.completions.parse(
        model=REAL, messages=[{"role": "user", "content": "Tell me about Paris."}],
        response_format=City, temperature=0, max_tokens=120)
    assert isinstance(parsed.choices[0].message.parsed, City)


def test_bad_schemas_are_refused_before_the_engine(client: openai.OpenAI):
    for fmt in ({"type": "json_schema", "json_schema": {"name": "x",
                                                        "schema": {"type": "objectx"}}},
                {"type": "json_schema", "json_schema": {"name": "x", "schema": {
                    "type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}}},
                {"type": "regex", "regex": "((("},
                {"type": "xml"}):
        with pytest.raises(openai.BadRequestError) as e:
            chat(client, response_format=fmt)
        assert e.value.body["param"] == "response_format"
    # The engine was not disturbed: the next request is answered.
    assert chat(client, max_tokens=2, temperature=0).choices[0].message.content


# --- sampling ---------------------------------------------------------------------------------

def test_sampling_without_a_seed_is_random_and_with_one_repeatable(client: openai.OpenAI):
    kw = {"messages": [{"role": "user", "content": "Write a short poem."}], "max_tokens": 16,
          "temperature": 1.5}
    free = {chat(client, **kw).choices[0].message.content for _ in range(3)}
    assert len(free) > 1
    seeded = {chat(client, **kw, seed=11).choices[0].message.content for _ in range(2)}
    assert len(seeded) == 1


def test_top_k_1_is_greedy(client: openai.OpenAI):
    kw = {"messages": [{"role": "user", "content": "Name three fruits."}], "max_tokens": 20}
    greedy = chat(client, temperature=0, **kw).choices[0].message.content
    k1 = chat(client, temperature=1.5, extra_body={"top_k": 1}, **kw)
    assert k1.choices[0].message.content == greedy


def test_n_choices_and_logprobs(client: openai.OpenAI):
    out = chat(client, n=3, temperature=1.2, max_tokens=8, logprobs=True, top_logprobs=0)
    assert [c.index for c in out.choices] == [0, 1, 2]
    for c in out.choices:
        lps = c.logprobs.content
        assert lps and all(t.logprob <= 0 for t in lps)
        assert len(lps) <= 8
    assert out.usage.completion_tokens == sum(len(c.logprobs.content) for c in out.choices)
    streamed = list(chat(client, n=2, temperature=1.0, max_tokens=4, stream=True))
    finishes = [c.choices[0] for c in streamed if c.choices and c.choices[0].finish_reason]
    assert sorted(f.index for f in finishes) == [0, 1]
    comp = client.completions.create(model=REAL, prompt="The sky is", max_tokens=5,
                                     temperature=0, logprobs=0, echo=False)
    lp = comp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == 5
    assert "".join(lp.tokens) == comp.choices[0].text
    echo = client.completions.create(model=REAL, prompt="The sky is", max_tokens=5,
                                     temperature=0, echo=True)
    assert echo.choices[0].text == "The sky is" + comp.choices[0].text


REFUSED = [
    ({"logit_bias": {"1": 5}}, "logit_bias"),
    ({"top_logprobs": 2, "logprobs": True}, "top_logprobs"),
    ({"n": 2, "temperature": 0}, "n"),
    ({"n": 99}, "n"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"reasoning_effort": "low"}, "reasoning_effort"),
    ({"store": True}, "store"),
    ({"top_k": "a"}, "top_k"),
    ({"min_p": 2}, "min_p"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"temprature": 0.5}, "temprature"),
    ({"chat_template_kwargs": {"messages": []}}, "chat_template_kwargs"),
    ({"stream_options": {"include_usage": True, "x": 1}, "stream": True}, "stream_options"),
]


@pytest.mark.parametrize(("extra", "param"), REFUSED, ids=[p for _, p in REFUSED])
def test_refused_parameters_name_themselves(srv: Server, extra: dict, param: str):
    body = {"model": REAL, "messages": ASK, "max_tokens": 2, **extra}
    r = httpx.post(f"{srv.url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and param in err["message"], err


def test_refused_completion_parameters(srv: Server):
    for extra, param in (({"suffix": "end"}, "suffix"), ({"best_of": 3}, "best_of"),
                         ({"logprobs": 2}, "logprobs"), ({"echo": True, "logprobs": 0}, "echo"),
                         ({"messages": ASK}, "messages")):
        r = httpx.post(f"{srv.url}/v1/completions",
                       json={"model": REAL, "prompt": "Hi", "max_tokens": 2, **extra}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_cold_loads_show_in_metrics(srv: Server, client: openai.OpenAI):
    chat(client, max_tokens=1)
    text = httpx.get(f"{srv.url}/metrics", timeout=30).text
    loads = re.search(rf'ovms_model_loads_total{{model="{REAL}"}} (\S+)', text)
    last = re.search(rf'ovms_model_last_load_seconds{{model="{REAL}"}} (\S+)', text)
    assert loads and float(loads.group(1)) >= 1, text[-2000:]
    assert last and float(last.group(1)) > 0


def test_usage_only_when_asked(client: openai.OpenAI):
    plain = list(chat(client, max_tokens=3, temperature=0, stream=True))
    assert all(c.usage is None for c in plain)
    asked = list(chat(client, max_tokens=3, temperature=0, stream=True,
                      stream_options={"include_usage": True}))
    assert asked[-1].choices == [] and asked[-1].usage.completion_tokens == 3


# --- reasoning models -------------------------------------------------------------------------

def test_thinking_goes_to_reasoning_content(srv: Server):
    url = f"{srv.url}/v1/chat/completions"
    body = {"model": THINKER, "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    thinking = httpx.post(url, json=body, timeout=120).json()["choices"][0]["message"]
    assert thinking["reasoning_content"] and not thinking["content"]
    off = httpx.post(url, json={**body, "chat_template_kwargs": {"enable_thinking": False}},
                     timeout=120).json()["choices"][0]["message"]
    assert off["content"] and "reasoning_content" not in off
    think_false = httpx.post(url, json={**body, "think": False}, timeout=120).json()
    assert think_false["choices"][0]["message"] == off
    r = httpx.post(url, json={**body, "stream": True}, timeout=120)
    events = [e for e in sse_events(r.iter_lines()) if e != "[DONE]"]
    streamed = "".join(e["choices"][0]["delta"].get("reasoning_content", "")
                       for e in events if e["choices"])
    assert streamed == thinking["reasoning_content"]


# --- Ollama -----------------------------------------------------------------------------------

def test_ollama_format_tools_options_and_think(srv: Server):
    client = ollama.Client(host=srv.url)
    schema = SCHEMAS["enum"]
    cat = [{"role": "user", "content": "Give me a JSON object describing a cat."}]
    opts = {"temperature": 0, "num_predict": 200}
    out = client.chat(model=REAL, messages=cat, format=schema, options=opts)
    jsonschema.validate(json.loads(out.message.content), schema)
    out = client.chat(model=REAL, messages=cat, format="json", options=opts)
    assert out.message.content.startswith("{")
    k1 = client.generate(model=REAL, prompt="Name a color.", options={
        "temperature": 1.5, "top_k": 1, "num_predict": 8, "repeat_penalty": 1.0, "min_p": 0})
    greedy = client.generate(model=REAL, prompt="Name a color.",
                             options={"temperature": 0, "num_predict": 8})
    assert k1.response == greedy.response
    out = client.chat(model=REAL, messages=ASK, tools=[WEATHER],
                      options={"temperature": 0, "num_predict": 40})
    assert out.message.content is not None or out.message.tool_calls  # auto: its choice
    thought = client.chat(model=THINKER, messages=[{"role": "user", "content": "hi"}],
                          think=True, options={"temperature": 0, "num_predict": 4})
    assert thought.message.thinking and not thought.message.content
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model=REAL, messages=ASK, options={"mirostat": 1})
    assert "options.mirostat" in e.value.error


# --- the same through AOG -------------------------------------------------------------------------

def test_tools_and_json_through_the_aog_plugin(start_host, agents_home: Path):
    host: AogHost = start_host(agents_home)
    r = host.invoke("chat", {"model": REAL, "messages": ASK, "tools": [WEATHER],
                             "tool_choice": "required", "temperature": 0})
    assert r.code == 0, r.message
    out = json.loads(r.response_data)
    call = out["choices"][0]["message"]["tool_calls"][0]
    jsonschema.validate(json.loads(call["function"]["arguments"]),
                        WEATHER["function"]["parameters"])
    schema = SCHEMAS["bounded numbers"]
    r = host.invoke("chat", {"model": REAL, "temperature": 0, "max_tokens": 200, "messages": [
        {"role": "user", "content": "Give me a JSON object describing a cat."}],
                             "response_format": {"type": "json_schema", "json_schema": {
                                 "name": "x", "schema": schema}}})
    assert r.code == 0, r.message
    jsonschema.validate(json.loads(json.loads(r.response_data)["choices"][0]["message"]
                                   ["content"]), schema)
    chunks = list(host.invoke_stream("chat", {"model": REAL, "messages": ASK, "stream": True,
                                              "tools": [WEATHER], "tool_choice": "required",
                                              "temperature": 0}))
    data = b"".join(c.chunk_data for c in chunks).decode()
    events = [json.loads(x[6:]) for x in data.splitlines()
              if x.startswith("data: ") and x != "data: [DONE]"]
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert events[-1]["usage"]["completion_tokens"] > 0  # AOG's streams end with the usage
    r = host.invoke("chat", {"model": REAL, "messages": ASK, "logit_bias": {"1": 1}})
    assert r.code != 0 and "logit_bias" in r.message
