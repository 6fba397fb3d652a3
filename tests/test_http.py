"""The standalone HTTP server through real HTTP on 127.0.0.1, started as `python -m ovms_plugin
serve` would start it (ovms_plugin.http.server.main in a subprocess): the official `openai`
client for chat (plain, streamed, include_usage), completions, embeddings (float and
base64) and images; AOG-shaped requests for each service; every error status; the API
key; busy models; cancellation by disconnect; /ready, /metrics and the request log; and
SIGTERM leaving no engine worker behind.

Chat and completions as a user sees them run on the real SmolLM2 (REAL); the random-weight
tiny chat model stays for what needs its shape or does not depend on weights: busy and
broken copies, cancellation, errors, metrics."""

from __future__ import annotations

import base64
import contextlib
import http.client
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import yaml
from conftest import REAL, descendants, pid_alive, wait_for
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from ovms_plugin import devmodels
from ovms_plugin.http import server as http_server

KEY = "test-key-123"
CHAT, EMBED, RERANK, SD = "tiny-chat", "tiny-embed", "tiny-rerank", "tiny-sd"
BUSY, BROKEN = "tiny-chat-busy", "broken-chat"


@pytest.fixture(scope="module")
def http_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A home with the real SmolLM2 and the tiny chat, embedding, rerank and diffusion
    models copied into the store (the store writes their manifests on first sight), a chat
    model that takes one request at a time, and one whose weights are cut short (its load
    fails)."""
    home = tmp_path_factory.mktemp("http-home")
    store = home / "models"
    built = devmodels.ensure_models(devmodels.default_cache_dir(),
                                    [CHAT, EMBED, RERANK, SD, devmodels.SMOLLM2])
    for name, folder in built.items():
        shutil.copytree(folder, store / (REAL if name == devmodels.SMOLLM2 else name))
    shutil.copytree(built[CHAT], store / BUSY)
    shutil.copytree(built[CHAT], store / BROKEN)
    os.truncate(store / BROKEN / "openvino_model.bin", 1000)
    f32 = {"properties": {"INFERENCE_PRECISION_HINT": "f32"}}
    (home / "settings.yaml").write_text(yaml.safe_dump({"models": {
        CHAT: {**f32, "scheduler": {"cache_size": 1}},
        REAL: {**f32, "scheduler": {"cache_size": 1}},
        BUSY: {"scheduler": {"cache_size": 1, "max_num_seqs": 1}, "max_waiting_requests": 0},
        BROKEN: {"scheduler": {"cache_size": 1}}, EMBED: f32, RERANK: f32}}))
    return home


class Server:
    def __init__(self, home: Path, args: list[str], env: dict[str, str] | None = None):
        self.lines: list[str] = []
        code = ("import sys; from ovms_plugin.http.server import main; "
                f"sys.exit(main({args!r}))")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True,
            env={**os.environ, "OVMS_PLUGIN_HOME": str(home), **(env or {})})
        threading.Thread(target=self._read, daemon=True).start()
        self.port = 0
        assert wait_for(lambda: self._port() or self.proc.poll() is not None, 60), self.log()
        assert self.port, self.log()
        self.url = f"http://127.0.0.1:{self.port}"
        self.http = httpx.Client(base_url=self.url, timeout=60,
                                 headers={"Authorization": f"Bearer {KEY}"})

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def _port(self) -> int:
        for line in list(self.lines):
            if m := re.search(r"listening on http://127\.0\.0\.1:(\d+)", line):
                self.port = int(m.group(1))
        return self.port

    def log(self) -> str:
        return "\n".join(self.lines[-40:])

    def openai(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=KEY, max_retries=0,
                             timeout=60, **kw)

    def metrics(self) -> dict[str, list]:
        r = self.http.get("/metrics")
        assert r.status_code == 200, r.text
        return {f.name: f.samples for f in text_string_to_metric_families(r.text)}

    def value(self, family: str, sample: str | None = None, **labels: str) -> float | None:
        for s in self.metrics().get(family, []):
            if (sample is None or s.name == sample) and \
                    all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
        return None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    @classmethod
    @contextlib.contextmanager
    def ready(cls, home: Path, args: list[str], env: dict[str, str] | None = None
              ) -> Iterator[Server]:
        """A server that answers /ready, stopped when the block ends."""
        s = cls(home, args, env)
        try:
            assert wait_for(lambda: s.http.get("/ready").status_code == 200, 60), s.log()
            yield s
        finally:
            s.stop()


@pytest.fixture(scope="module")
def srv(http_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    images = tmp_path_factory.mktemp("images")
    with Server.ready(http_home, ["--port", "0", "--model", REAL, "--model", CHAT,
                                  "--max-body-mb", "1", "--idle-unload", "0",
                                  "--images-dir", str(images)],
                      env={"OVMS_PLUGIN_API_KEY": KEY}) as s:
        yield s


def chat_body(content: str = "Hello there", **kw) -> dict:
    return {"model": CHAT, "messages": [{"role": "user", "content": content}], **kw}


def sse_events(lines: Iterator[str]) -> list:
    out = []
    for line in lines:
        if line.startswith("data: "):
            data = line[6:]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def open_stream(srv: Server, path: str, body: dict) -> http.client.HTTPConnection:
    """A request on a connection of its own, which the test can drop."""
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
    conn.request("POST", path, json.dumps(body), {"Authorization": f"Bearer {KEY}",
                                                  "Content-Type": "application/json"})
    return conn


def drop(conn: http.client.HTTPConnection) -> None:
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()


# --- operations and the API key ------------------------------------------------------------

def test_health_ready_and_the_api_key(srv: Server):
    assert httpx.get(f"{srv.url}/health").json() == {"status": "ok"}  # open, no key
    for path in ("/ready", "/metrics", "/v1/models", "/aog/v0.2/services/models"):
        r = httpx.get(f"{srv.url}{path}")
        assert r.status_code == 401, path
        assert r.json()["error"]["code"] == "invalid_api_key"
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
    r = httpx.get(f"{srv.url}/ready", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"]["message"] == "incorrect API key"
    r = srv.http.get("/ready")
    assert r.status_code == 200 and r.json()["status"] == "ready"
    assert {REAL, CHAT} <= set(r.json()["models"])  # preloaded by --model
    with pytest.raises(openai.AuthenticationError) as e:
        openai.OpenAI(base_url=f"{srv.url}/v1", api_key="wrong", max_retries=0).models.list()
    assert e.value.status_code == 401


def test_models(srv: Server):
    client = srv.openai()
    models = {m.id: m for m in client.models.list()}
    assert {REAL, CHAT, EMBED, RERANK, SD} <= set(models)
    m = models[CHAT]
    assert m.object == "model" and m.owned_by == "ovms-plugin" and m.created > 1.6e9
    assert client.models.retrieve(RERANK).id == RERANK
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    aog = srv.http.get("/aog/v0.2/services/models").json()["models"]
    assert {m["name"] for m in aog} >= {REAL, CHAT, SD} and all("details" in m for m in aog)


# --- OpenAI-compatible -------------------------------------------------------------------

def test_chat_plain_and_streamed_with_usage(srv: Server):
    client = srv.openai()
    question = [{"role": "user", "content": "What is the capital of France?"}]
    # The answer ends with the model's own end token.
    own = client.chat.completions.create(model=REAL, messages=question, max_tokens=10,
                                         temperature=0)
    assert own.choices[0].message.content == "The capital of France is Paris."
    assert own.choices[0].finish_reason == "stop" and own.usage.completion_tokens < 10
    # ignore_eos (an extra field) runs on past it to max_tokens.
    kw = {"model": REAL, "messages": question, "max_tokens": 10, "temperature": 0,
          "extra_body": {"ignore_eos": True}}
    raw = client.chat.completions.with_raw_response.create(**kw)
    assert raw.headers["X-Request-ID"]
    plain = raw.parse()
    assert plain.object == "chat.completion" and plain.model == REAL
    assert plain.choices[0].finish_reason == "length"
    assert plain.choices[0].message.role == "assistant" and plain.choices[0].message.content
    assert plain.choices[0].message.content.startswith(own.choices[0].message.content)
    assert plain.usage.completion_tokens == 10 and plain.usage.prompt_tokens > 0
    assert plain.usage.prompt_tokens == own.usage.prompt_tokens

    chunks = list(client.chat.completions.create(
        **kw, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content  # temperature 0: the same words
    *body, finish, last = chunks
    assert finish.choices[0].finish_reason == "length" and finish.usage is None
    assert last.choices == [] and last.usage.completion_tokens == 10
    assert last.usage == plain.usage
    assert all(c.usage is None for c in body)

    plain_stream = list(client.chat.completions.create(**kw, stream=True))
    assert plain_stream[-1].choices[0].finish_reason == "length"


def test_chat_stream_ends_with_done(srv: Server):
    with srv.http.stream("POST", "/v1/chat/completions",
                         json=chat_body(model=REAL, max_tokens=4, stream=True,
                                        temperature=0, ignore_eos=True)) as r:
        assert r.status_code == 200
        assert r.headers["Content-Type"].startswith("text/event-stream")
        events = sse_events(r.iter_lines())
    assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "length"


def test_completions(srv: Server):
    client = srv.openai()
    # No chat template here: the model continues the raw text.
    prompt = "The capital of France is"
    out = client.completions.create(model=REAL, prompt=prompt, max_tokens=6,
                                    temperature=0, extra_body={"ignore_eos": True})
    assert out.object == "text_completion" and out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 6 and out.usage.prompt_tokens == 5
    assert out.choices[0].text.startswith(" Paris")
    chunks = list(client.completions.create(model=REAL, prompt=prompt,
                                            max_tokens=6, temperature=0, stream=True,
                                            extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks) == out.choices[0].text


def test_embeddings_float_and_base64(srv: Server):
    client = srv.openai()
    texts = ["local inference", "a second, longer sentence about OpenVINO"]
    floats = client.embeddings.create(model=EMBED, input=texts, encoding_format="float")
    # Without encoding_format the client asks for base64 and decodes it itself.
    b64 = client.embeddings.create(model=EMBED, input=texts)
    a = np.array([d.embedding for d in floats.data], dtype=np.float32)
    b = np.array([d.embedding for d in b64.data], dtype=np.float32)
    assert a.shape[0] == 2 and np.array_equal(a, b)
    assert np.allclose(np.linalg.norm(a, axis=1), 1, atol=1e-5)
    assert floats.usage.prompt_tokens > 0 and [d.index for d in floats.data] == [0, 1]
    raw = srv.http.post("/v1/embeddings", json={"model": EMBED, "input": texts[0],
                                                "encoding_format": "base64"}).json()
    decoded = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    single = client.embeddings.create(model=EMBED, input=texts[0], encoding_format="float")
    assert np.array_equal(decoded, np.asarray(single.data[0].embedding, dtype=np.float32))
    assert np.allclose(decoded, a[0], atol=1e-5)  # alone or batched (padding) alike


def png_size(data: bytes) -> tuple[int, int]:
    img = Image.open(io.BytesIO(data))
    img.load()
    assert img.format == "PNG"
    return img.size


def test_images(srv: Server):
    out = srv.openai().images.generate(
        model=SD, prompt="a red cat", size="64x64", response_format="b64_json", n=2,
        extra_body={"num_inference_steps": 2, "seed": 5})
    assert len(out.data) == 2
    assert all(png_size(base64.b64decode(d.b64_json)) == (64, 64) for d in out.data)


def test_rerank_cohere_shape(srv: Server):
    docs = ["Bananas are yellow.", "Run models locally with OpenVINO.", "Dogs bark."]
    r = srv.http.post("/v1/rerank", json={"model": RERANK, "query": "local models",
                                          "documents": docs, "return_documents": True})
    assert r.status_code == 200, r.text
    out = r.json()
    scores = [x["relevance_score"] for x in out["results"]]
    assert scores == sorted(scores, reverse=True) and len(scores) == 3
    assert all(x["document"] == {"text": docs[x["index"]]} for x in out["results"])
    assert out["id"] and out["model"] == RERANK and out["usage"]["total_tokens"] > 0
    top = srv.http.post("/v1/rerank", json={"model": RERANK, "query": "local models",
                                            "documents": docs, "top_n": 1}).json()
    assert len(top["results"]) == 1 and "document" not in top["results"][0]


# --- AOG-compatible ----------------------------------------------------------------------

AOG = "/aog/v0.2/services"


def test_aog_chat_plain_and_streamed(srv: Server):
    body = chat_body("Hi", model=REAL, max_tokens=10, temperature=0, ignore_eos=True)
    out = srv.http.post(f"{AOG}/chat", json=body).json()
    assert set(out) >= {"id", "model", "created_at", "message", "finished", "finish_reason"}
    assert out["finished"] is True and out["finish_reason"] == "length"
    assert out["message"]["role"] == "assistant" and out["message"]["content"]
    assert out["message"]["content"].startswith("Hello")  # the model greets back
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$", out["created_at"])
    assert out["usage"]["completion_tokens"] == 10
    with srv.http.stream("POST", f"{AOG}/chat", json={**body, "stream": True}) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        events = sse_events(r.iter_lines())
    assert "[DONE]" not in events  # AOG's streams end with the finished event
    assert [e["finished"] for e in events] == [False] * (len(events) - 1) + [True]
    assert events[-1]["finish_reason"] == "length" and events[-1]["usage"]
    assert "".join(e["message"]["content"] for e in events) == out["message"]["content"]
    # AOG's model is optional: the first preloaded chat model serves.
    default = srv.http.post(f"{AOG}/chat", json={"messages": body["messages"],
                                                 "max_tokens": 2, "temperature": 0}).json()
    assert default["model"] == REAL
    assert out["message"]["content"].startswith(default["message"]["content"])


def test_aog_generate(srv: Server):
    body = {"model": REAL, "prompt": "1, 2, 3, 4,", "max_tokens": 5, "temperature": 0,
            "ignore_eos": True}
    out = srv.http.post(f"{AOG}/generate", json=body).json()
    assert out["finished"] is True and out["response"] and out["finish_reason"] == "length"
    assert out["response"].startswith(" 5, 6")  # the raw text continued, no chat template
    with srv.http.stream("POST", f"{AOG}/generate", json={**body, "stream": True}) as r:
        events = sse_events(r.iter_lines())
    assert "".join(e["response"] for e in events) == out["response"]
    assert events[-1]["finished"] and not events[0]["finished"]


def test_aog_embed_and_rerank(srv: Server):
    out = srv.http.post(f"{AOG}/embed", json={"model": EMBED, "input": ["a", "b"]}).json()
    assert out["id"] and out["model"] == EMBED
    assert [d["index"] for d in out["data"]] == [0, 1] and len(out["data"][0]["embedding"]) > 8
    r = srv.http.post(f"{AOG}/rerank", json={"model": RERANK, "query": "q",
                                             "documents": ["x", "y"]}).json()
    assert {x["index"] for x in r["results"]} == {0, 1} and r["id"]


def test_aog_text_to_image(srv: Server):
    body = {"model": SD, "prompt": "a boat", "size": "64*64", "n": 1, "seed": 9,
            "num_inference_steps": 2}
    out = srv.http.post(f"{AOG}/text-to-image", json=body).json()
    [path] = out["data"]["url"]  # a local file, as AOG's local providers answer
    assert out["id"] and png_size(Path(path).read_bytes()) == (64, 64)
    b64 = srv.http.post(f"{AOG}/text-to-image",
                        json={**body, "response_format": "b64_json"}).json()
    assert base64.b64decode(b64["data"]["b64_json"][0]) == Path(path).read_bytes()


# --- errors ------------------------------------------------------------------------------

@pytest.mark.parametrize("path,body,status,code,param", [
    ("/v1/chat/completions", b"{not json", 400, "invalid_request", None),
    ("/v1/chat/completions", chat_body(temperature=5), 400, "invalid_request", "temperature"),
    ("/v1/chat/completions", chat_body(n=2), 400, "invalid_request", "n"),
    ("/v1/chat/completions", chat_body(stream_options={"include_usage": True}), 400,
     "invalid_request", "stream_options"),
    ("/v1/embeddings", {"model": EMBED, "input": ""}, 400, "invalid_request", "input"),
    (f"{AOG}/text-to-image", {"model": SD, "prompt": "x", "size": "big"}, 400,
     "invalid_request", "size"),
    ("/v1/chat/completions", chat_body(model="no-such-model"), 404, "model_not_found",
     "model"),
    (f"{AOG}/embed", {"model": "no-such-model", "input": "x"}, 404, "model_not_found", "model"),
    ("/v1/no-such-route", {}, 404, "not_found", None),
    ("/v1/embeddings", {"model": EMBED, "input": "x" * (2 << 20)}, 413, "request_too_large",
     None),
    ("/v1/chat/completions", chat_body(model=BROKEN), 500, "model_load_failed", None),
])
def test_error_statuses(srv: Server, path: str, body, status: int, code: str, param):
    # The catalogue of refusals is plumbing: tiny-chat and its broken copy serve it.
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = srv.http.post(path, content=content, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["param"] == param and err["message"]
    assert err["type"] == ("server_error" if status >= 500 else "invalid_request_error")


def test_openai_client_sees_typed_errors(srv: Server):
    client = srv.openai()
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=CHAT, messages=[], max_tokens=2)
    assert e.value.body["param"] == "messages"
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="no-such-model", input="x")
    with pytest.raises(openai.InternalServerError) as e:
        client.chat.completions.create(model=BROKEN, messages=[{"role": "user",
                                                                "content": "x"}])
    assert "loading model 'broken-chat' failed" in e.value.body["message"]
    with pytest.raises(openai.APIStatusError) as e:
        client.embeddings.create(model=EMBED, input="y" * (2 << 20))
    assert e.value.status_code == 413


def test_busy_model_gets_429_with_retry_after(srv: Server):
    """tiny-chat-busy runs one request and queues none: a second one is refused at once."""
    conn = open_stream(srv, "/v1/chat/completions",
                       chat_body(model=BUSY, max_tokens=1500, ignore_eos=True, stream=True))
    try:
        resp = conn.getresponse()
        assert resp.status == 200 and resp.fp.readline()  # running
        client = srv.openai()
        with pytest.raises(openai.RateLimitError) as e:
            client.chat.completions.create(model=BUSY, max_tokens=2,
                                           messages=[{"role": "user", "content": "x"}])
        assert e.value.status_code == 429 and e.value.response.headers["Retry-After"] == "1"
        assert e.value.body["code"] == "model_busy" and "busy" in e.value.body["message"]
        r = srv.http.post(f"{AOG}/chat", json=chat_body(model=BUSY, max_tokens=2))
        assert r.status_code == 429 and r.json()["error"]["code"] == "model_busy"
    finally:
        drop(conn)
    assert wait_for(lambda: srv.value("ovms_model_requests_in_flight", model=BUSY) == 0, 10)
    out = srv.openai().chat.completions.create(model=BUSY, max_tokens=2,
                                               messages=[{"role": "user", "content": "x"}])
    assert out.choices[0].message.content is not None  # free again


# --- cancellation by disconnect ------------------------------------------------------------
# (on tiny-chat: what is tested is that the request stops, whatever its weights say)

def aborted(srv: Server, model: str = CHAT) -> float:
    return srv.value("ovms_llm_requests_finished", "ovms_llm_requests_finished_total",
                     model=model, reason="aborted") or 0


def running(srv: Server, model: str = CHAT) -> float | None:
    return srv.value("ovms_llm_requests_running", model=model)


def test_disconnect_cancels_a_stream(srv: Server):
    before = aborted(srv)
    conn = open_stream(srv, "/v1/chat/completions",
                       chat_body("Go on forever", max_tokens=1500, ignore_eos=True,
                                 stream=True))
    resp = conn.getresponse()
    assert resp.status == 200
    events = 0
    while events < 3:
        if resp.fp.readline().startswith(b"data: "):
            events += 1
    drop(conn)
    assert wait_for(lambda: running(srv) == 0, 10), srv.metrics()
    assert aborted(srv) == before + 1  # stopped, not run to its 1500 tokens
    assert srv.value("ovms_model_requests_in_flight", model=CHAT) == 0
    assert srv.value("ovms_model_worker_rss_bytes", model=CHAT) > 50 * 2**20
    assert wait_for(lambda: any(f"model={CHAT} status=499" in line for line in srv.lines), 5)


def test_disconnect_cancels_a_unary_request(srv: Server):
    before = aborted(srv)
    conn = open_stream(srv, "/v1/chat/completions",
                       chat_body("Go on", max_tokens=2000, ignore_eos=True))
    try:
        assert wait_for(lambda: running(srv) == 1, 10, every=0.01)
    finally:
        drop(conn)
    assert wait_for(lambda: running(srv) == 0, 10), srv.metrics()
    assert aborted(srv) == before + 1


# --- readiness, metrics, request log -------------------------------------------------------

def worker_pid(srv: Server, model: str) -> int:
    for pid in descendants(srv.proc.pid):
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"ovms_plugin.engine.worker" in args and model.encode() in args:
            return pid
    raise AssertionError(f"no worker for {model}")


def test_ready_fails_while_an_engine_is_dead(srv: Server):
    assert srv.http.post("/v1/rerank", json={"model": RERANK, "query": "q",
                                             "documents": ["d"]}).status_code == 200
    os.kill(worker_pid(srv, RERANK), signal.SIGKILL)
    seen: list = []  # the answer while it is 503 (the supervisor restarts the engine soon)
    assert wait_for(lambda: seen.append(srv.http.get("/ready")) or
                    seen[-1].status_code == 503, 10)
    r = seen[-1].json()
    assert r["status"] == "unavailable" and RERANK in r["reason"]
    assert srv.http.get("/health").status_code == 200  # still alive
    # The supervisor (or the next request) starts the engine again: ready again.
    assert srv.http.post("/v1/rerank", json={"model": RERANK, "query": "q",
                                             "documents": ["d"]}).status_code == 200
    assert srv.http.get("/ready").status_code == 200


def test_metrics_parse_and_cover_the_engines(srv: Server):
    srv.http.post("/v1/embeddings", json={"model": EMBED, "input": ["m1", "m2", "m3"]})
    m = srv.metrics()  # parsed by prometheus_client's text parser
    assert {"ovms_http_requests", "ovms_http_request_duration_seconds",
            "ovms_llm_time_to_first_token_seconds", "ovms_llm_time_per_output_token_seconds",
            "ovms_llm_generated_tokens", "ovms_llm_kv_cache_bytes", "ovms_embed_batch_size",
            "ovms_image_steps", "ovms_model_loaded"} <= set(m)
    ttft = {s.name: s.value for s in m["ovms_llm_time_to_first_token_seconds"]
            if s.labels["model"] == CHAT and "le" not in s.labels}
    assert ttft["ovms_llm_time_to_first_token_seconds_count"] > 0
    assert srv.value("ovms_llm_kv_cache_bytes", model=CHAT) > 0
    assert srv.value("ovms_embed_texts", model=EMBED) >= 3
    assert srv.value("ovms_image_steps", model=SD) >= 2
    assert srv.value("ovms_http_requests", route="/v1/chat/completions", method="POST",
                     status="200") >= 1
    assert srv.value("ovms_http_requests", route="/v1/chat/completions", method="POST",
                     status="429") >= 1
    inf = srv.value("ovms_http_request_duration_seconds",
                    "ovms_http_request_duration_seconds_bucket",
                    route="/v1/chat/completions", le="+Inf")
    assert inf >= 3


def test_request_log_line(srv: Server):
    srv.http.post("/v1/embeddings", json={"model": EMBED, "input": "log me"},
                  headers={"X-Request-ID": "trace-42"})
    pattern = re.compile(r"request id=trace-42 method=POST path=/v1/embeddings "
                         rf"model={EMBED} status=200 latency_ms=\d+\.\d")
    assert wait_for(lambda: any(pattern.search(line) for line in srv.lines), 5), srv.log()


# --- command line and shutdown -----------------------------------------------------------

def test_command_line_flags(monkeypatch: pytest.MonkeyPatch):
    args = http_server.parse_args(["--host", "127.0.0.1", "--port", "9", "--model", "a",
                                   "--model", "b", "--api-key", "k", "--idle-unload", "30",
                                   "--max-body-mb", "2", "--models-dir", "/tmp/m"])
    assert (args.host, args.port, args.models, args.api_key) == ("127.0.0.1", 9, ["a", "b"],
                                                                 "k")
    assert (args.idle_unload, args.max_body_mb, str(args.models_dir)) == (30, 2, "/tmp/m")
    defaults = http_server.parse_args([])
    assert defaults.host == "127.0.0.1" and defaults.models is None
    with pytest.raises(SystemExit):
        http_server.parse_args(["--port", "-1"])


def test_idle_models_are_unloaded_but_preloaded_ones_stay(http_home: Path):
    s = Server(http_home, ["--port", "0", "--model", CHAT, "--idle-unload", "1"])
    try:
        assert wait_for(lambda: httpx.get(f"{s.url}/ready").status_code == 200, 60), s.log()
        r = httpx.post(f"{s.url}/v1/rerank", json={"model": RERANK, "query": "q",
                                                   "documents": ["d"]}, timeout=60)
        assert r.status_code == 200, r.text

        def loaded() -> list[str]:
            return httpx.get(f"{s.url}/ready").json()["models"]

        assert RERANK in loaded()
        assert wait_for(lambda: loaded() == [CHAT], 10), loaded()  # chat was named: kept
        assert any(f"unloading {RERANK}: idle" in line for line in s.lines)
        s.proc.send_signal(signal.SIGINT)  # Ctrl-C stops it cleanly too
        assert s.proc.wait(20) == 0
    finally:
        s.stop()


def test_a_model_that_cannot_preload_stops_the_server(http_home: Path):
    s = Server(http_home, ["--port", "0", "--model", "no-such-model"])
    try:
        assert s.proc.wait(30) == 1
        assert any("preloading model 'no-such-model' failed" in line for line in s.lines)
    finally:
        s.stop()


def test_sigterm_unloads_every_model(srv: Server):
    workers = [p for p in descendants(srv.proc.pid) if pid_alive(p)]
    assert len(workers) >= 5  # real and tiny chat, embed, rerank, image (at least)
    srv.proc.send_signal(signal.SIGTERM)
    assert srv.proc.wait(20) == 0
    assert wait_for(lambda: not any(pid_alive(p) for p in workers), 10)
    assert any("model tiny-chat unloaded" in line for line in srv.lines)
    assert any(f"model {REAL} unloaded" in line for line in srv.lines)
