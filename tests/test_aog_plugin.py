"""The plugin driven the way AOG drives it: launched from its installed folder, every RPC
of protocol.ProviderService, chat and generate (unary and streamed, parsed as AOG parses
SSE), concurrency, cancellation, bad input, and Kill.

What a user sees (answers, streaming, stop strings, sampling, load -> chat -> unload) runs on
the real SmolLM2 (REAL); the random-weight tiny-chat (CHAT) stays where a test needs its
shape (a 2048-token context) or is about plumbing its weights cannot change (cancellation,
deadlines, bad input, the process tree)."""

from __future__ import annotations

import json
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from conftest import CHAT, REAL, descendants, pid_alive, wait_for
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ovms_plugin.aog.host import AogHost, SseReader
from ovms_plugin.aog.proto import go_plugin_pb2_grpc
from ovms_plugin.aog.proto import provider_pb2 as pb

RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)$")


def chat_body(content: str = "Hello there", **kw) -> dict:
    return {"model": CHAT, "messages": [{"role": "user", "content": content}], **kw}


def real_body(content: str = "Hello there", **kw) -> dict:
    """A greedy request to the real model: its answers are fixed (f32, temperature 0)."""
    return chat_body(content, model=REAL, temperature=0, **kw)


def answer(host: AogHost, body: dict) -> dict:
    r = host.invoke("chat", body)
    assert r.code == 0, r.message
    return json.loads(r.response_data)


def content(out: dict) -> str:
    return out["choices"][0]["message"]["content"]


def stream_chat(host: AogHost, body: dict) -> tuple[str, list[dict], SseReader]:
    reader = SseReader(host.invoke_stream("chat", {**body, "stream": True}))
    events = list(reader.events())
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events)
    return text, events, reader


def running(host: AogHost) -> dict:
    r = host.call("GetRunningModels")
    assert r.code == 0, r.message
    models = json.loads(r.response_json)["models"]
    return {m["name"]: m["details"] for m in models}


def workers(host: AogHost, model: str) -> list[int]:
    """The engine worker processes of one model."""
    out = []
    for pid in descendants(host.proc.pid):
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"ovms_plugin.engine.worker" in args and model.encode() in args:
            out.append(pid)
    return out


def test_lifecycle_rpcs(host: AogHost):
    for method in ("StartEngine", "InitEnv", "UpgradeEngine"):
        for _ in range(2):  # idempotent
            r = host.call(method, getattr(pb, f"{method}Request")())
            assert r.code == 0, (method, r.message)
    r = host.call("StartEngine", pb.StartEngineRequest(mode="daemon"))
    assert r.code == 0
    check = host.call("CheckEngine")
    assert check.code == 0 and check.installed and "OpenVINO" in check.message
    assert host.call("HealthCheck").code == 0
    assert host.call("GetOperateStatus").status == 1
    version = json.loads(host.json_call("GetVersion", {"version": ""}).response_json)
    assert version["version"] and version["openvino"].startswith("20")
    config = json.loads(host.call("GetConfig").config_json)
    keys = {"host", "origin", "scheme", "recommend_model", "download_url", "download_path",
            "engine_path", "exec_path", "exec_file", "device_type"}
    assert keys <= set(config) and all(isinstance(v, str) for v in config.values())
    assert config["device_type"] == "CPU"
    manifest = json.loads(host.call("GetManifest").manifest_json)
    assert manifest["provider"]["name"] == "ovms-plugin"
    for method in ("SetAuth", "ValidateAuth", "RefreshAuth"):
        assert host.call(method).code == 0
    assert isinstance(host.call("SetOperateStatus", pb.SetOperateStatusRequest(status=1)),
                      pb.SetOperateStatusResponse)


def test_go_plugin_services(host: AogHost):
    health = health_pb2_grpc.HealthStub(host.channel)
    resp = health.Check(health_pb2.HealthCheckRequest(service="plugin"), timeout=5)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING
    # GRPCStdio stays open and empty until shutdown; go-plugin only needs it to open.
    stdio = go_plugin_pb2_grpc.GRPCStdioStub(host.channel)
    from google.protobuf import empty_pb2
    call = stdio.StreamStdio(empty_pb2.Empty(), timeout=0.5)
    with pytest.raises(grpc.RpcError) as e:
        list(call)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_list_models(host: AogHost):  # tiny-chat: its known shape (qwen2, FP32, 336K)
    r = host.call("ListModels")
    assert r.code == 0
    models = json.loads(r.response_json)["models"]
    m = next(m for m in models if m["name"] == CHAT)
    assert RFC3339.match(m["modified_at"]), m["modified_at"]
    assert m["size"] > 0 and m["digest"].startswith("sha256:")
    d = m["details"]
    assert d["format"] == "openvino" and d["family"] == "qwen2"
    assert d["families"] == ["qwen2"] and d["quantization_level"] == "FP32"
    assert d["parameter_size"].endswith("K")


def test_load_is_idempotent(host: AogHost):
    assert host.json_call("LoadModel", {"model": REAL}).code == 0
    assert host.json_call("LoadModel", {"model": REAL}).code == 0
    assert REAL in running(host)
    assert len(workers(host, REAL)) == 1  # loaded once
    # ListModels says where a loaded model runs, how much memory it holds and why.
    models = json.loads(host.call("ListModels").response_json)["models"]
    details = next(m for m in models if m["name"] == REAL)["details"]
    assert details["device"] == "CPU" and details["fallbacks"] == []
    assert details["memory_bytes"] > 0 and details["kv_cache_gb"] == 1


def test_chat_unary(host: AogHost):
    out = answer(host, real_body("What is the capital of Japan?", max_tokens=16))
    assert out["object"] == "chat.completion" and out["model"] == REAL
    assert out["choices"][0]["message"]["role"] == "assistant"
    assert "Tokyo" in content(out)
    assert out["choices"][0]["finish_reason"] == "stop"  # the model's own end token
    u = out["usage"]
    assert u["completion_tokens"] < 16
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    assert isinstance(out["created"], int) and out["id"].startswith("chatcmpl-")


def test_chat_stream_matches_unary(host: AogHost):
    body = real_body("What is the capital of Germany?", max_tokens=24)
    unary = answer(host, body)
    assert "Berlin" in content(unary) and unary["choices"][0]["finish_reason"] == "stop"
    text, events, reader = stream_chat(host, body)
    assert reader.error is None
    assert text == content(unary)
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    assert events[0]["choices"][0]["delta"].get("role") == "assistant"
    assert events[-1]["choices"][0]["finish_reason"] == unary["choices"][0]["finish_reason"]
    assert all(e["choices"][0]["finish_reason"] is None for e in events[:-1])
    assert events[-1]["usage"] == unary["usage"]
    assert len(events) > 3  # token by token, not one lump


def test_stream_framing_is_what_aog_reads(host: AogHost):
    msgs = list(host.invoke_stream("chat", chat_body(model=REAL, max_tokens=8, stream=True)))
    assert msgs[-1].is_final and all(not m.is_final for m in msgs[:-1])
    data = b"".join(m.chunk_data for m in msgs)
    events = data.split(b"\n\n")
    assert events[-1] == b"" and events[-2] == b"data: [DONE]"  # [DONE] last
    for ev in events[:-2]:
        assert ev.startswith(b"data: {") and b"\n" not in ev and b"\r" not in ev
        json.loads(ev[len(b"data: "):])


def test_generate_unary_and_stream(host: AogHost):
    # No chat template on this path: the model continues the raw text.
    body = {"model": REAL, "prompt": "The capital of France is", "max_tokens": 6,
            "temperature": 0}
    out = json.loads(host.invoke("generate", body).response_data)
    assert out["object"] == "text_completion"
    assert out["choices"][0]["text"].startswith(" Paris")
    reader = SseReader(host.invoke_stream("generate", {**body, "stream": True}))
    events = list(reader.events())
    assert "".join(e["choices"][0]["text"] for e in events) == out["choices"][0]["text"]
    assert events[-1]["choices"][0]["finish_reason"] == out["choices"][0]["finish_reason"]
    assert events[-1]["usage"]["completion_tokens"] == out["usage"]["completion_tokens"]


def test_max_tokens_gives_length(host: AogHost):
    # The answer ends with the model's own end token as its 8th token; ignore_eos runs on.
    out = answer(host, real_body("What is the capital of France?", max_tokens=10,
                                 ignore_eos=True))
    assert content(out).startswith("The capital of France is Paris.")
    assert out["choices"][0]["finish_reason"] == "length"
    assert out["usage"]["completion_tokens"] == 10


def test_stop_string_cuts_the_text(host: AogHost):
    body = real_body("Write a long story about a dragon.", max_tokens=12, ignore_eos=True)
    full = content(answer(host, body))
    assert "dragon" in full
    stop = full[len(full) // 2: len(full) // 2 + 3]  # wherever the token boundaries fall
    assert stop.strip(), "the test model's text is expected to have visible characters"
    expected = full[:full.index(stop)]
    out = json.loads(host.invoke("chat", {**body, "stop": [stop]}).response_data)
    assert out["choices"][0]["message"]["content"] == expected
    assert out["choices"][0]["finish_reason"] == "stop"
    text, events, _ = stream_chat(host, {**body, "stop": stop})
    assert text == expected and events[-1]["choices"][0]["finish_reason"] == "stop"


def test_seed_makes_sampling_repeatable(host: AogHost):
    body = chat_body("Name three animals.", model=REAL, max_tokens=4, temperature=1.0,
                     top_p=0.95, ignore_eos=True)
    a = content(answer(host, {**body, "seed": 7}))
    b, _events, reader = stream_chat(host, {**body, "seed": 7})  # streamed: the same draw
    c = content(answer(host, {**body, "seed": 8}))
    assert reader.error is None
    assert a == b
    assert a != c


def test_penalties_change_the_output(host: AogHost):
    body = real_body("Write the word hello ten times.", max_tokens=10, ignore_eos=True)
    plain = content(answer(host, body))
    penalised = content(answer(host, {**body, "frequency_penalty": 2.0,
                                      "presence_penalty": 2.0}))
    assert plain != penalised
    # Greedy, the model repeats a line; the penalties are there to stop exactly that.
    line = "Hello ten times"
    assert plain.count(line) >= 2 and penalised.count(line) < plain.count(line)


CAPITALS = {"France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Japan": "Tokyo",
            "Russia": "Moscow", "China": "Beijing", "England": "London", "Greece": "Athens"}


def test_eight_concurrent_streams(host: AogHost):
    prompts = [f"What is the capital of {country}?" for country in CAPITALS]
    # "The capital of X is Y": the city is the 6th token.
    expected = [content(answer(host, real_body(p, max_tokens=6))) for p in prompts]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda p: stream_chat(host, real_body(p, max_tokens=6)),
                                prompts))
    for (text, _events, reader), want, city in zip(results, expected, CAPITALS.values(),
                                                   strict=True):
        assert reader.error is None
        assert text == want  # batching with others does not change a greedy answer
        assert city in text  # and each stream got its own answer


# Cancellation, deadlines and bad input are plumbing: the fast tiny-chat serves them.

def test_cancel_one_stream_leaves_others(host: AogHost):
    long_body = chat_body("Go on forever", max_tokens=1500, ignore_eos=True, stream=True)
    other: dict = {}

    def run_other():
        other["result"] = stream_chat(host, chat_body("Short one", max_tokens=48,
                                                      ignore_eos=True))

    t = threading.Thread(target=run_other)
    call = host.invoke_stream("chat", long_body)
    t.start()
    for got, _msg in enumerate(call, 1):
        if got == 5:
            break
    call.cancel()
    t.join(60)
    _text, events, reader = other["result"]
    assert reader.error is None and events[-1]["choices"][0]["finish_reason"] == "length"
    # The engine stopped the cancelled request (it would otherwise run 1500 tokens).
    assert wait_for(lambda: running(host)[CHAT]["metrics"]["running"] == 0, timeout=20)
    assert running(host)[CHAT]["in_flight"] == 0


def test_deadline_cancels_unary(host: AogHost):
    with pytest.raises(grpc.RpcError) as e:
        host.invoke("chat", chat_body(max_tokens=1800, ignore_eos=True), timeout=0.3)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_for(lambda: running(host)[CHAT]["metrics"]["running"] == 0, timeout=20)


@pytest.mark.parametrize("service,body,code,needle", [
    ("chat", {"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]},
     3000, "available: smollm2, tiny-chat"),
    ("chat", {"model": CHAT, "messages": []}, 4003, "non-empty list"),
    ("chat", {"model": CHAT}, 4003, "'messages'"),
    ("chat", {"model": CHAT, "messages": [{"role": "wizard", "content": "x"}]}, 4003, "role"),
    ("chat", {"model": CHAT, "messages": [{"role": "user", "content": "x"}], "max_tokens": 0},
     4003, "positive integer"),
    ("chat", {"model": CHAT, "messages": [{"role": "user", "content": "x"}],
              "max_tokens": -3}, 4003, "positive integer"),
    ("chat", {"model": CHAT, "messages": [{"role": "user", "content": "x"}],
              "max_tokens": 10**6}, 4003, "context of 2048"),
    ("chat", {"model": CHAT, "messages": [{"role": "user", "content": "x"}],
              "temperature": 7}, 4003, "between 0 and 2"),
    ("chat", {"model": CHAT, "messages": [{"role": "user", "content": "word " * 3000}]},
     4003, "context of 2048"),
    ("chat", {"model": REAL, "messages": [{"role": "user", "content": "x"}],
              "max_tokens": 10**6}, 4003, "context of 8192"),  # each model's own context
    ("generate", {"model": CHAT, "prompt": ""}, 4003, "'prompt'"),
    ("generate", {"model": CHAT}, 4003, "'prompt'"),
    ("translate", {"model": CHAT, "prompt": "x"}, 4000, "serves chat"),
    ("chat", {"messages": [{"role": "user", "content": "x"}]}, 4003, "'model' is required"),
])
def test_bad_requests_get_clear_errors(host: AogHost, service, body, code, needle):
    r = host.invoke(service, body)
    assert r.code == code and needle in r.message, r.message
    # The stream variant fails the same way, in one final message.
    msgs = list(host.invoke_stream(service, {**body, "stream": True}))
    assert len(msgs) == 1 and msgs[0].is_final and msgs[0].code == code


def test_malformed_json(host: AogHost):
    r = host.call("InvokeService", pb.InvokeServiceRequest(service_name="chat",
                                                           request_data=b"{not json"))
    assert r.code == 4003 and "not valid JSON" in r.message
    r = host.call("LoadModel", pb.LoadModelRequest(request_json=b"[1"))
    assert r.code == 4003
    assert host.call("HealthCheck").code == 0  # nothing crashed


def test_bad_requests_do_not_disturb_others(host: AogHost):
    body = chat_body("steady", max_tokens=32, temperature=0)
    want = json.loads(host.invoke("chat", body).response_data)["choices"][0]["message"]
    with ThreadPoolExecutor(6) as pool:
        good = [pool.submit(stream_chat, host, body) for _ in range(3)]
        bad = [pool.submit(host.invoke, "chat", {"model": CHAT, "messages": "nope"})
               for _ in range(3)]
        assert all(f.result().code == 4003 for f in bad)
        assert all(f.result()[0] == want["content"] for f in good)


def test_model_api_errors(host: AogHost):
    r = host.json_call("LoadModel", {"model": "missing"})
    assert r.code == 3000 and "available" in r.message
    r = host.json_call("LoadModel", {"model": "../etc"})
    assert r.code == 3000
    r = host.json_call("DeleteModel", {"model": "missing"})
    assert r.code == 3000
    r = host.json_call("PullModel", {"model": "/no/such/folder"})
    assert r.code == 3001 and "not a folder" in r.message
    r = host.json_call("UnloadModel", {"models": ["never-loaded"]})
    assert r.code == 0  # unloading what is not loaded is a no-op, as AOG expects


def test_unload_frees_the_worker(host: AogHost):
    """AOG's scenario on the real model: load, chat, unload."""
    assert host.json_call("LoadModel", {"model": CHAT}).code == 0
    assert host.json_call("LoadModel", {"model": REAL}).code == 0
    assert "Rome" in content(answer(host, real_body("What is the capital of Italy?",
                                                    max_tokens=6)))
    pids, others = workers(host, REAL), workers(host, CHAT)
    assert pids and others
    assert host.json_call("UnloadModel", {"models": [REAL]}).code == 0
    assert REAL not in running(host)
    assert wait_for(lambda: not any(pid_alive(p) for p in pids))
    assert CHAT in running(host) and all(pid_alive(p) for p in others)  # only that one
    # Loading again on the next request does not depend on the weights: the quick
    # tiny-chat shows it (a second load of the real model would cost seconds).
    assert host.json_call("UnloadModel", {"models": [CHAT]}).code == 0
    assert CHAT not in running(host)
    assert wait_for(lambda: not any(pid_alive(p) for p in others))
    assert host.invoke("chat", chat_body(max_tokens=4)).code == 0
    assert CHAT in running(host)


def test_kill_leaves_no_process(plugin_dir, plugin_home):
    host = AogHost(plugin_dir, env={"OVMS_PLUGIN_HOME": str(plugin_home)}).start()
    assert host.json_call("LoadModel", {"model": CHAT}).code == 0
    tree = [host.proc.pid, *descendants(host.proc.pid)]
    assert len(tree) >= 2  # the plugin and its engine worker
    host.kill()  # raises if a child kept the stdout/stderr pipes open
    assert host.proc.returncode == 0  # exited on Shutdown, not by go-plugin's SIGKILL
    assert wait_for(lambda: not any(pid_alive(p) for p in tree), timeout=5)
