"""The plugin driven the way AOG drives it: launched from its installed folder, every RPC
of protocol.ProviderService, chat and generate (unary and streamed, parsed as AOG parses
SSE), concurrency, cancellation, bad input, and Kill."""

from __future__ import annotations

import json
import re
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from conftest import CHAT, descendants, pid_alive, wait_for
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ovms_plugin.aog.host import AogHost, SseReader
from ovms_plugin.aog.proto import go_plugin_pb2_grpc
from ovms_plugin.aog.proto import provider_pb2 as pb

RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)$")


def chat_body(content: str = "Hello there", **kw) -> dict:
    return {"model": CHAT, "messages": [{"role": "user", "content": content}], **kw}


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


def test_list_models(host: AogHost):
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
    assert host.json_call("LoadModel", {"model": CHAT}).code == 0
    assert host.json_call("LoadModel", {"model": CHAT}).code == 0
    assert CHAT in running(host)
    # ListModels says where a loaded model runs, how much memory it holds and why.
    models = json.loads(host.call("ListModels").response_json)["models"]
    details = next(m for m in models if m["name"] == CHAT)["details"]
    assert details["device"] == "CPU" and details["fallbacks"] == []
    assert details["memory_bytes"] > 0 and details["kv_cache_gb"] == 1


def test_chat_unary(host: AogHost):
    r = host.invoke("chat", chat_body(max_tokens=16, temperature=0))
    assert r.code == 0, r.message
    out = json.loads(r.response_data)
    assert out["object"] == "chat.completion" and out["model"] == CHAT
    assert out["choices"][0]["message"]["role"] == "assistant"
    assert out["choices"][0]["finish_reason"] in ("stop", "length")
    u = out["usage"]
    assert u["completion_tokens"] <= 16
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    assert isinstance(out["created"], int) and out["id"].startswith("chatcmpl-")


def test_chat_stream_matches_unary(host: AogHost):
    body = chat_body("Tell me a story", max_tokens=40, temperature=0)
    unary = json.loads(host.invoke("chat", body).response_data)
    text, events, reader = stream_chat(host, body)
    assert reader.error is None
    assert text == unary["choices"][0]["message"]["content"]
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    assert events[0]["choices"][0]["delta"].get("role") == "assistant"
    assert events[-1]["choices"][0]["finish_reason"] == unary["choices"][0]["finish_reason"]
    assert all(e["choices"][0]["finish_reason"] is None for e in events[:-1])
    assert events[-1]["usage"] == unary["usage"]
    assert len(events) > 3  # token by token, not one lump


def test_stream_framing_is_what_aog_reads(host: AogHost):
    msgs = list(host.invoke_stream("chat", chat_body(max_tokens=8, stream=True)))
    assert msgs[-1].is_final and all(not m.is_final for m in msgs[:-1])
    data = b"".join(m.chunk_data for m in msgs)
    events = data.split(b"\n\n")
    assert events[-1] == b"" and events[-2] == b"data: [DONE]"  # [DONE] last
    for ev in events[:-2]:
        assert ev.startswith(b"data: {") and b"\n" not in ev and b"\r" not in ev
        json.loads(ev[len(b"data: "):])


def test_generate_unary_and_stream(host: AogHost):
    body = {"model": CHAT, "prompt": "def main(", "max_tokens": 24, "temperature": 0}
    out = json.loads(host.invoke("generate", body).response_data)
    assert out["object"] == "text_completion"
    reader = SseReader(host.invoke_stream("generate", {**body, "stream": True}))
    events = list(reader.events())
    assert "".join(e["choices"][0]["text"] for e in events) == out["choices"][0]["text"]
    assert events[-1]["choices"][0]["finish_reason"] == out["choices"][0]["finish_reason"]
    assert events[-1]["usage"]["completion_tokens"] == out["usage"]["completion_tokens"]


def test_max_tokens_gives_length(host: AogHost):
    out = json.loads(host.invoke("chat", chat_body(max_tokens=5, ignore_eos=True)).response_data)
    assert out["choices"][0]["finish_reason"] == "length"
    assert out["usage"]["completion_tokens"] == 5


def test_stop_string_cuts_the_text(host: AogHost):
    body = chat_body("Say something long", max_tokens=48, temperature=0, ignore_eos=True)
    full = json.loads(host.invoke("chat", body).response_data)["choices"][0]["message"]["content"]
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert stop.strip(), "the test model's text is expected to have visible characters"
    expected = full[:full.index(stop)]
    out = json.loads(host.invoke("chat", {**body, "stop": [stop]}).response_data)
    assert out["choices"][0]["message"]["content"] == expected
    assert out["choices"][0]["finish_reason"] == "stop"
    text, events, _ = stream_chat(host, {**body, "stop": stop})
    assert text == expected and events[-1]["choices"][0]["finish_reason"] == "stop"


def test_seed_makes_sampling_repeatable(host: AogHost):
    body = chat_body("Pick words", max_tokens=24, temperature=1.0, top_p=0.95, ignore_eos=True)
    a = json.loads(host.invoke("chat", {**body, "seed": 7}).response_data)
    b = json.loads(host.invoke("chat", {**body, "seed": 7}).response_data)
    c = json.loads(host.invoke("chat", {**body, "seed": 8}).response_data)
    content = [x["choices"][0]["message"]["content"] for x in (a, b, c)]
    assert content[0] == content[1]
    assert content[0] != content[2]


def test_penalties_change_the_output(host: AogHost):
    body = chat_body("Repeat", max_tokens=32, temperature=0, ignore_eos=True)
    plain = json.loads(host.invoke("chat", body).response_data)
    penalised = json.loads(host.invoke("chat", {**body, "frequency_penalty": 2.0,
                                                "presence_penalty": 2.0}).response_data)
    assert plain["choices"][0]["message"]["content"] != \
        penalised["choices"][0]["message"]["content"]


def test_eight_concurrent_streams(host: AogHost):
    prompts = [f"Question number {i}: what is {i} plus {i}?" for i in range(8)]
    expected = [json.loads(host.invoke("chat", chat_body(p, max_tokens=32, temperature=0))
                           .response_data)["choices"][0]["message"]["content"] for p in prompts]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(
            lambda p: stream_chat(host, chat_body(p, max_tokens=32, temperature=0)), prompts))
    for (text, _events, reader), want in zip(results, expected, strict=True):
        assert reader.error is None
        assert text == want  # batching with others does not change a greedy answer


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
    assert host.json_call("LoadModel", {"model": CHAT}).code == 0
    workers = descendants(host.proc.pid)
    assert workers
    assert host.json_call("UnloadModel", {"models": [CHAT]}).code == 0
    assert CHAT not in running(host)
    assert wait_for(lambda: not any(pid_alive(p) for p in workers))
    # The next request loads it again.
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
