"""Ollama's API through the official `ollama` Python client (and raw HTTP where the shape
itself is checked), against the standalone server started as `serve` starts it: chat and
generate (plain and NDJSON), embed and embeddings, tags, show, ps, pull with progress,
delete, version; every parameter that is not supported yet refused 400 by name; names with
tags; keep_alive; CORS preflights; /v1/models marking loaded models.

Answers a user reads run on the real SmolLM2 (REAL); the random-weight tiny chat model
serves what depends only on shapes."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
import ollama
import pytest
from conftest import REAL, wait_for
from test_http import CHAT, EMBED, RERANK, Server, http_home  # noqa: F401 (a fixture)

from ovms_plugin import __version__, devmodels, settings
from ovms_plugin.http import cors
from ovms_plugin.http import routes_ollama as ro
from ovms_plugin.http import server as http_server

APP = "http://localhost:3000"  # the web app --cors-origins allows
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
QUANT_NAME = "org/tiny-Q4_K_M"  # how the puller names org/tiny:Q4_K_M


@pytest.fixture(scope="module")
def srv(http_home: Path) -> Iterator[Server]:  # noqa: F811
    # A model stored under the puller's GGUF naming, for name resolution.
    shutil.copytree(http_home / "models" / CHAT, http_home / "models" / "org--tiny-Q4_K_M")
    s = Server(http_home, ["--port", "0", "--model", REAL, "--idle-unload", "30",
                           "--cors-origins", f"{APP}, chrome-extension://*"],
               env={"OVMS_PLUGIN_API_KEY": "", "OVMS_PLUGIN_CORS_ORIGINS": ""})
    try:
        assert wait_for(lambda: s.http.get("/ready").status_code == 200, 90), s.log()
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def client(srv: Server) -> ollama.Client:
    return ollama.Client(host=srv.url, timeout=120)


def loaded(client: ollama.Client) -> set[str]:
    return {m.model for m in client.ps().models}


def rfc3339(text: str) -> datetime:
    assert text.endswith("Z"), text
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


# --- chat and generate ----------------------------------------------------------------------

def test_chat_plain_and_streamed(client: ollama.Client, srv: Server):
    options = {"temperature": 0, "num_predict": 20}
    out = client.chat(model=f"{REAL}:latest", messages=QUESTION, options=options)
    assert "Paris" in out.message.content and out.message.role == "assistant"
    assert out.model == f"{REAL}:latest"  # named as the request named it
    assert out.done is True and out.done_reason == "stop"
    assert 0 < out.eval_count < 20 and out.prompt_eval_count > 5
    assert out.total_duration >= out.eval_duration > 0 and out.prompt_eval_duration > 0
    assert out.load_duration >= 0
    assert abs((datetime.now(UTC) - rfc3339(out.created_at)).total_seconds()) < 60

    parts = list(client.chat(model=REAL, messages=QUESTION, options=options, stream=True))
    assert len(parts) > 2 and [p.done for p in parts] == [False] * (len(parts) - 1) + [True]
    assert "".join(p.message.content for p in parts) == out.message.content  # greedy
    last = parts[-1]
    assert last.message.content == "" and last.done_reason == "stop"
    assert last.eval_count == out.eval_count and last.prompt_eval_count == out.prompt_eval_count

    # The wire: NDJSON, one object per line.
    body = {"model": REAL, "messages": QUESTION, "options": {**options, "num_predict": 3}}
    with srv.http.stream("POST", "/api/chat", json=body) as r:
        assert r.status_code == 200
        assert r.headers["Content-Type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in r.iter_lines() if line]
    assert lines[-1]["done"] is True and lines[-1]["done_reason"] == "length"
    assert lines[-1]["eval_count"] == 3
    assert set(lines[0]) == {"model", "created_at", "message", "done"}
    plain = srv.http.post("/api/chat", json={**body, "stream": False})
    assert plain.headers["Content-Type"].startswith("application/json")
    assert plain.json()["message"]["content"] == "".join(x["message"]["content"] for x in lines)


def test_generate(client: ollama.Client):
    options = {"temperature": 0, "num_predict": 20}
    # Rendered with the model's chat template, as Ollama does.
    out = client.generate(model=REAL, prompt="What is the capital of France?", options=options)
    assert "Paris" in out.response and out.done_reason == "stop" and out.eval_count > 0
    parts = list(client.generate(model=REAL, prompt="What is the capital of France?",
                                 options=options, stream=True))
    assert "".join(p.response for p in parts) == out.response and parts[-1].done
    # raw: the prompt as it is, continued.
    raw = client.generate(model=REAL, prompt="The capital of France is", raw=True,
                          options={"temperature": 0, "num_predict": 4})
    assert raw.response.startswith(" Paris") and raw.done_reason == "length"
    assert raw.eval_count == 4 and raw.prompt_eval_count == 5
    # system goes before the prompt, in the template.
    sys_out = client.generate(model=REAL, prompt="What is the capital of France?",
                              system="Answer in one word.", options=options)
    assert sys_out.prompt_eval_count != out.prompt_eval_count  # instead of the default one
    assert sys_out.response and sys_out.done


def test_options_are_honoured(client: ollama.Client):
    base = {"model": REAL, "messages": QUESTION}
    three = client.chat(**base, options={"temperature": 0, "num_predict": 3})
    assert three.eval_count == 3 and three.done_reason == "length"
    stopped = client.chat(**base, options={"temperature": 0, "num_predict": 20,
                                           "stop": ["Paris"]})
    assert "Paris" not in stopped.message.content and stopped.done_reason == "stop"
    assert stopped.message.content.startswith("The capital of France is")
    sampled = {"temperature": 1.0, "top_p": 0.9, "seed": 7, "num_predict": 12,
               "presence_penalty": 0.5, "frequency_penalty": 0.5}
    a = client.chat(**base, options=sampled).message.content
    b = client.chat(**base, options=sampled).message.content
    assert a == b  # the same seed, the same draw
    unlimited = client.chat(**base, options={"temperature": 0, "num_predict": -1})
    assert "Paris" in unlimited.message.content and unlimited.done_reason == "stop"


# Each parameter not supported yet, and how it is refused: (route, body, name in the error).
REFUSED = [
    ("chat", {"options": {"top_k": "many"}}, "options.top_k"),
    ("chat", {"options": {"min_p": 5}}, "options.min_p"),
    ("chat", {"options": {"typical_p": 0.9}}, "options.typical_p"),
    ("chat", {"options": {"repeat_penalty": 0}}, "options.repeat_penalty"),
    ("chat", {"options": {"repeat_last_n": 64}}, "options.repeat_last_n"),
    ("chat", {"options": {"mirostat": 1}}, "options.mirostat"),
    ("chat", {"options": {"penalize_newline": True}}, "options.penalize_newline"),
    ("chat", {"options": {"num_keep": 4}}, "options.num_keep"),
    ("chat", {"options": {"num_ctx": 4096}}, "options.num_ctx"),
    ("chat", {"options": {"num_gpu": 1}}, "options.num_gpu"),
    ("chat", {"options": {"num_thread": 2}}, "options.num_thread"),
    ("chat", {"options": {"bogus": 1}}, "options.bogus"),
    ("chat", {"options": {"temperature": 5}}, "options.temperature"),
    ("chat", {"options": {"num_predict": 0}}, "options.num_predict"),
    ("chat", {"options": {"top_p": 0}}, "options.top_p"),
    ("chat", {"options": {"stop": [""]}}, "options.stop"),
    ("chat", {"options": {"seed": "x"}}, "options.seed"),
    ("chat", {"format": "yaml"}, "format"),
    ("chat", {"format": {"type": "objectx"}}, "format"),
    ("chat", {"tools": [{"type": "function", "function": {"name": "no spaces"}}]}, "tools"),
    ("chat", {"think": "high"}, "think"),
    ("chat", {"logprobs": True}, "logprobs"),
    ("chat", {"top_logprobs": 3}, "top_logprobs"),
    ("chat", {"messages": [{"role": "user", "content": "hi", "images": ["aGk="]}]},
     "text-only model"),
    ("chat", {"messages": [{"role": "user", "content": "hi", "images": "aGk="}]},
     "messages[0].images"),
    ("chat", {"messages": [{"role": "assistant", "content": "",
                            "tool_calls": [{"function": "f"}]}]}, "messages[0].tool_calls"),
    ("chat", {"messages": [{"role": "user", "content": "hi", "extra": 1}]}, "'extra'"),
    ("chat", {"keep_alive": -1}, "keep_alive"),  # tiny-chat is not kept for good here
    ("chat", {"keep_alive": "1h"}, "keep_alive"),  # longer than --idle-unload 30
    ("chat", {"keep_alive": "soon"}, "keep_alive"),
    ("chat", {"stream": "yes"}, "stream"),
    ("chat", {"unknown_field": 1}, "unknown_field"),
    ("generate", {"images": ["aGk="]}, "text-only model"),
    ("generate", {"images": ["aGk="], "raw": True}, "images"),
    ("generate", {"suffix": "end"}, "suffix"),
    ("generate", {"template": "{{ .Prompt }}"}, "template"),
    ("generate", {"context": [1, 2, 3]}, "context"),
    ("generate", {"raw": True, "system": "Be brief."}, "system"),
    ("generate", {"width": 64}, "width"),
    ("generate", {"think": "high"}, "think"),
    ("generate", {"options": {"tfs_z": 1.0}}, "options.tfs_z"),
    ("embed", {"options": {"num_ctx": 512}}, "options.num_ctx"),
    ("embed", {"truncate": "no"}, "truncate"),
    ("embed", {"dimensions": 0}, "dimensions"),
    ("embeddings", {"options": {"temperature": 0}}, "options.temperature"),
    ("show", {"verbose": True}, "verbose"),
    ("pull", {"insecure": True}, "insecure"),
]


@pytest.mark.parametrize("route, extra, name", REFUSED,
                         ids=[f"{r}-{n}-{i}" for i, (r, _, n) in enumerate(REFUSED)])
def test_refused_parameters(srv: Server, route: str, extra: dict, name: str):
    body: dict = {"model": EMBED if route.startswith("embed") else CHAT}
    if route == "chat":
        body["messages"] = [{"role": "user", "content": "hi"}]
    elif route == "generate":
        body["prompt"] = "hi"
    elif route == "embed":
        body["input"] = "hi"
    elif route == "embeddings":
        body["prompt"] = "hi"
    elif route == "pull":
        body["model"] = "/nonexistent"
    body.update(extra)
    r = srv.http.post(f"/api/{route}", json=body)
    assert r.status_code == 400, r.text
    assert r.headers["Content-Type"].startswith("application/json")
    error = r.json()["error"]
    assert isinstance(error, str) and name in error, error


def test_refused_through_the_client(client: ollama.Client):
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model=CHAT, messages=QUESTION, options={"typical_p": 0.5})
    assert e.value.status_code == 400 and "'options.typical_p' (" in e.value.error
    assert "not supported" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:  # streamed: refused before the stream
        next(iter(client.generate(model=CHAT, prompt="hi", images=[b"\x89PNG"], stream=True)))
    assert e.value.status_code == 400 and "text-only model" in e.value.error
    # What a refused request names, it did not load.
    assert f"{CHAT}:latest" not in loaded(client)


def test_context_errors_name_the_option(srv: Server):
    r = srv.http.post("/api/chat", json={"model": CHAT, "messages": QUESTION,
                                         "options": {"num_predict": 10**6}, "stream": False})
    assert r.status_code == 400 and "options.num_predict" in r.json()["error"]
    assert "max_tokens" not in r.json()["error"]


# --- names ---------------------------------------------------------------------------------

def test_names_with_tags(client: ollama.Client, srv: Server):
    for name in (REAL, f"{REAL}:latest", f"{CHAT}:fp32", "org/tiny:Q4_K_M", "org/tiny:q4_k_m",
                 "hf.co/org/tiny:Q4_K_M", "hf.co/org/tiny-Q4_K_M:latest", f"{QUANT_NAME}"):
        assert client.show(name).details.family, name
    for name in ("nope", "nope:latest", f"{REAL}:135m", f"{CHAT}:q4_k_m", "org/tiny"):
        r = srv.http.post("/api/show", json={"model": name})
        assert r.status_code == 404 and r.json() == {"error": f"model '{name}' not found"}
    with pytest.raises(ollama.ResponseError) as e:
        list(client.chat(model="nope", messages=QUESTION, stream=True))
    assert e.value.status_code == 404 and e.value.error == "model 'nope' not found"
    with pytest.raises(ollama.ResponseError) as e:
        client.embed(model="nope", input="x")
    assert e.value.status_code == 404


def test_name_and_duration_parsing():
    assert ro.split_name("smollm2:latest") == ("smollm2", None)
    assert ro.split_name("hf.co/org/repo:Q4_K_M") == ("org/repo", "Q4_K_M")
    assert ro.split_name("https://huggingface.co/org/repo") == ("org/repo", None)
    assert ro.pull_spec("smollm2-135m-instruct:latest") == "smollm2-135m-instruct"
    assert ro.pull_spec("hf.co/org/repo:q4_k_m") == "hf.co/org/repo:q4_k_m"
    assert ro.pull_spec("/some/folder") == "/some/folder"
    assert ro.parse_keep_alive(None) is None
    assert ro.parse_keep_alive("5m") == 300 and ro.parse_keep_alive("1h30m") == 5400
    assert ro.parse_keep_alive("250ms") == 0.25 and ro.parse_keep_alive(0) == 0
    assert ro.parse_keep_alive("0") == 0 and ro.parse_keep_alive("90") == 90
    assert math.isinf(ro.parse_keep_alive(-1)) and math.isinf(ro.parse_keep_alive("-5m"))
    for bad in ("", "5 minutes", "m5", True, [1]):
        with pytest.raises(ro.ServiceError) as e:
            ro.parse_keep_alive(bad)
        assert e.value.param == "keep_alive"


# --- embeddings ---------------------------------------------------------------------------

def test_embed_and_embeddings(client: ollama.Client):
    texts = ["local inference", "a second, longer sentence about OpenVINO"]
    out = client.embed(model=EMBED, input=texts)
    vectors = np.array(out.embeddings, dtype=np.float32)
    assert vectors.shape[0] == 2 and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    assert out.model == EMBED and out.prompt_eval_count > 0 and out.total_duration > 0
    one = client.embed(model=EMBED, input=texts[0])
    assert np.allclose(one.embeddings[0], vectors[0], atol=1e-5)
    cut = client.embed(model=EMBED, input=texts[0], dimensions=8)
    assert len(cut.embeddings[0]) == 8
    assert math.isclose(float(np.linalg.norm(cut.embeddings[0])), 1, abs_tol=1e-5)
    legacy = np.array(client.embeddings(model=EMBED, prompt=texts[0]).embedding)
    assert np.allclose(legacy / np.linalg.norm(legacy), vectors[0], atol=1e-5)
    assert client.embed(model=EMBED, input=[]).embeddings == []  # loads only
    assert client.embeddings(model=EMBED, prompt="").embedding == []
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model=EMBED, messages=QUESTION)
    assert e.value.status_code == 400 and "does not support chat" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        client.embed(model=REAL, input="x")
    assert e.value.status_code == 400 and "does not support embeddings" in e.value.error


# --- models ------------------------------------------------------------------------------

def test_tags_show_ps_version(client: ollama.Client, srv: Server):
    tags = {m.model: m for m in client.list().models}
    assert {f"{REAL}:latest", f"{CHAT}:latest", f"{EMBED}:latest",
            f"{QUANT_NAME}:latest"} <= set(tags)
    real = tags[f"{REAL}:latest"]
    assert real.size > 10**7 and len(real.digest) == 64 and real.modified_at.year > 2020
    assert real.details.format == "openvino" and real.details.family == "llama"
    assert real.details.parameter_size and real.details.quantization_level
    raw = srv.http.get("/api/tags").json()["models"]
    assert all(set(m) == {"name", "model", "modified_at", "size", "digest", "details"}
               for m in raw)

    shown = client.show(REAL)
    assert "<|im_start|>" in shown.template  # the tokenizer's chat template
    assert shown.modelinfo["general.architecture"] == "llama"
    assert shown.modelinfo["llama.context_length"] == 8192
    assert shown.capabilities == ["completion"] and shown.details.family == "llama"
    assert shown.modelfile == "" and isinstance(shown.parameters, str)
    assert client.show(EMBED).capabilities == ["embedding"]
    assert client.show(EMBED).template == ""
    assert client.show(CHAT).parameters == ""  # its generation_config sets no sampling

    ps = {m.model: m for m in client.ps().models}
    assert f"{REAL}:latest" in ps and f"{RERANK}:latest" not in ps
    running = ps[f"{REAL}:latest"]
    assert running.size_vram == 0 and running.size > 0 and running.context_length == 8192
    assert running.expires_at.year == 9999  # preloaded with --model: kept loaded
    assert srv.http.get("/api/version").json() == {"version": __version__}


def test_keep_alive(client: ollama.Client):
    # No prompt: load the model (Ollama's way), kept 2 s after its last request.
    out = client.generate(model=CHAT, keep_alive="2s")
    assert out.done and out.done_reason == "load" and out.response == ""
    ps = {m.model: m for m in client.ps().models}
    expires = ps[f"{CHAT}:latest"].expires_at
    assert 0 < (expires - datetime.now(UTC)).total_seconds() <= 3
    assert wait_for(lambda: f"{CHAT}:latest" not in loaded(client), 15)
    # keep_alive 0: unloaded when the request ends.
    done = client.chat(model=CHAT, messages=QUESTION, options={"num_predict": 2},
                       keep_alive=0)
    assert done.done and f"{CHAT}:latest" not in loaded(client)
    client.generate(model=CHAT)  # loads, with the server's default
    assert f"{CHAT}:latest" in loaded(client)
    gone = client.generate(model=CHAT, keep_alive=0)  # how `ollama stop` unloads
    assert gone.done_reason == "unload" and f"{CHAT}:latest" not in loaded(client)
    # The preloaded model is kept anyway: keeping it for good is what happens.
    kept = client.chat(model=REAL, messages=QUESTION, options={"num_predict": 1},
                       keep_alive=-1)
    assert kept.done and f"{REAL}:latest" in loaded(client)


def test_pull_and_delete(client: ollama.Client, srv: Server, tmp_path: Path):
    source = tmp_path / "ollama-pulled"
    shutil.copytree(devmodels.ensure_models(devmodels.default_cache_dir(), [CHAT])[CHAT],
                    source)
    progress = list(client.pull(str(source), stream=True))
    statuses = [p.status for p in progress]
    assert statuses[-1] == "success" and "validating" in statuses
    copies = [p for p in progress if p.status.startswith("copying")]
    assert copies and all(p.total and 0 < p.completed <= p.total and p.digest for p in copies)
    assert "ollama-pulled:latest" in {m.model for m in client.list().models}
    # Pulled again (before it is loaded: a loaded model would be swapped to the new copy),
    # answered once with stream false.
    assert client.pull(str(source)).status == "success"
    out = client.chat(model="ollama-pulled", messages=QUESTION, options={"num_predict": 2})
    assert out.done and out.eval_count == 2
    with pytest.raises(ollama.ResponseError) as e:
        client.pull(str(tmp_path / "missing"))
    assert e.value.status_code == 500 and "not a folder" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:  # a failure before any progress
        list(client.pull(str(tmp_path / "missing"), stream=True))
    assert e.value.status_code == 500

    assert client.delete("ollama-pulled:latest").status == "success"
    assert "ollama-pulled:latest" not in {m.model for m in client.list().models}
    assert "ollama-pulled:latest" not in loaded(client)
    with pytest.raises(ollama.ResponseError) as e:
        client.delete("ollama-pulled")
    assert e.value.status_code == 404 and e.value.error == "model 'ollama-pulled' not found"


# --- browsers -----------------------------------------------------------------------------

def preflight(url: str, origin: str, method: str = "POST") -> httpx.Response:
    return httpx.options(f"{url}/api/chat", headers={
        "Origin": origin, "Access-Control-Request-Method": method,
        "Access-Control-Request-Headers": "content-type, authorization"})


def test_cors_enabled(srv: Server):
    r = preflight(srv.url, APP)
    assert r.status_code == 204
    assert r.headers["Access-Control-Allow-Origin"] == APP
    assert "POST" in r.headers["Access-Control-Allow-Methods"]
    assert r.headers["Access-Control-Allow-Headers"] == "content-type, authorization"
    assert preflight(srv.url, "chrome-extension://abcdef").status_code == 204  # a pattern
    tags = httpx.get(f"{srv.url}/api/tags", headers={"Origin": APP})
    assert tags.status_code == 200 and tags.headers["Access-Control-Allow-Origin"] == APP
    assert "X-Request-ID" in tags.headers["Access-Control-Expose-Headers"]
    body = {"model": REAL, "messages": QUESTION, "options": {"num_predict": 2}}
    with httpx.stream("POST", f"{srv.url}/api/chat", json=body, headers={"Origin": APP},
                      timeout=60) as r:  # a streamed answer carries it too
        assert r.headers["Access-Control-Allow-Origin"] == APP
        assert json.loads(list(r.iter_lines())[-1])["done"] is True
    models = httpx.get(f"{srv.url}/v1/models", headers={"Origin": APP})
    assert models.headers["Access-Control-Allow-Origin"] == APP

    other = preflight(srv.url, "http://evil.example")
    assert other.status_code == 403 and "Access-Control-Allow-Origin" not in other.headers
    assert "not allowed" in other.json()["error"]
    # A page of another origin cannot act through simple requests either.
    r = httpx.post(f"{srv.url}/api/pull", content=json.dumps({"model": "/x"}),
                   headers={"Origin": "http://evil.example", "Content-Type": "text/plain"})
    assert r.status_code == 403 and "Access-Control-Allow-Origin" not in r.headers
    assert preflight(srv.url, APP, method="PUT").status_code == 403


def test_cors_origins_from_flag_environment_or_settings(monkeypatch: pytest.MonkeyPatch,
                                                       tmp_path: Path):
    args = http_server.parse_args(["--cors-origins", "http://LocalHost:3000/, app://x"])
    assert args.cors_origins == ("http://localhost:3000", "app://x")
    assert http_server.parse_args([]).cors_origins is None
    with pytest.raises(SystemExit):  # no scheme: not an origin
        http_server.parse_args(["--cors-origins", "localhost:3000"])
    with pytest.raises(SystemExit):  # a path: not an origin
        http_server.parse_args(["--cors-origins", "http://a.example/app"])
    settings_file = tmp_path / "settings.yaml"
    settings_file.write_text("cors_origins: [http://a.example, 'http://localhost:*']\n")
    monkeypatch.setenv("OVMS_PLUGIN_SETTINGS", str(settings_file))
    monkeypatch.delenv(cors.ENV, raising=False)
    assert cors.configured_origins() == ("http://a.example", "http://localhost:*")
    monkeypatch.setenv(cors.ENV, "http://b.example")
    assert cors.configured_origins() == ("http://b.example",)
    assert cors.configured_origins(("http://c.example",)) == ("http://c.example",)
    assert cors.configured_origins(()) == ()  # the flag wins, even empty
    monkeypatch.setenv(cors.ENV, "not an origin")
    with pytest.raises(settings.SettingsError):
        cors.configured_origins()
    policy = cors.CorsPolicy(("http://localhost:*",))
    assert policy.allows("http://localhost:5173") and not policy.allows("http://evil.example")


def test_cors_off_by_default(http_home: Path):  # noqa: F811
    s = Server(http_home, ["--port", "0", "--idle-unload", "0"],
               env={"OVMS_PLUGIN_API_KEY": "", "OVMS_PLUGIN_CORS_ORIGINS": ""})
    try:
        assert wait_for(lambda: s.http.get("/ready").status_code == 200, 60), s.log()
        r = preflight(s.url, APP)
        assert r.status_code == 403 and "Access-Control-Allow-Origin" not in r.headers
        assert "--cors-origins" in r.json()["error"]
        r = httpx.get(f"{s.url}/api/tags", headers={"Origin": APP})
        assert r.status_code == 403 and "Access-Control-Allow-Origin" not in r.headers
        plain = httpx.get(f"{s.url}/api/tags")  # not a browser: no Origin, served
        assert plain.status_code == 200 and "Access-Control-Allow-Origin" not in plain.headers
        assert httpx.get(f"{s.url}/api/ps").json() == {"models": []}
    finally:
        s.stop()


def test_v1_models_marks_loaded(srv: Server, client: ollama.Client):
    client.embed(model=EMBED, input="load me")
    models = {m["id"]: m for m in srv.http.get("/v1/models").json()["data"]}
    assert models[REAL]["loaded"] is True and models[EMBED]["loaded"] is True
    assert models[RERANK]["loaded"] is False
    assert all(isinstance(m["loaded"], bool) for m in models.values())
