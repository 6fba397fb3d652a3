"""Hostile and odd input through both adapters: messages that do not leak host paths or C++
source locations, control characters that cannot forge log lines, unknown model names that
keep nothing, lone surrogates and deep nesting refused at the front end (the engine never
sees them, and keeps serving)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from conftest import REAL, wait_for
from test_http import EMBED, RERANK, Server, http_home, srv  # noqa: F401 (fixtures)

from ovms_plugin.aog.host import AogHost
from ovms_plugin.logs import escape
from ovms_plugin.service import errors
from ovms_plugin.service.errors import ServiceError
from ovms_plugin.service.runtime import Runtime
from ovms_plugin.store.store import ModelStore

OV_ERROR = ('Exception from src/inference/src/cpp/core.cpp:84:\nException from '
            'src/inference/src/model_reader.cpp:148:\nUnable to read the model: '
            '"/home/me/.local/aog/models/x/openvino_model.xml" Please check the model.')


def test_public_messages_drop_host_paths_and_cpp_locations():
    text = errors.public(OV_ERROR)
    assert text == 'Unable to read the model: "openvino_model.xml" Please check the model.'
    assert errors.public(r"cannot open C:\Users\me\AppData\Local\AOG\m.bin: denied") == \
        "cannot open m.bin: denied"
    assert errors.public("free in /var/lib/aog/engine/ovms-plugin/models/") == \
        "free in (a folder)"
    kept = "cannot reach http://127.0.0.1:9/v1 (org/name); see 'model' and 1/2"
    assert errors.public(kept) == kept


def test_log_arguments_are_escaped():
    assert escape("a\r\n[ERROR] forged\x1b[31m\u2028") == "a\\r\\n[ERROR] forged\\x1b[31m\\x2028"


def test_unknown_model_message_has_no_host_path(host: AogHost, plugin_home: Path):
    r = host.invoke("chat", {"model": "nope", "messages": [{"role": "user", "content": "x"}]})
    assert r.code == errors.MODEL_NOT_FOUND and "available:" in r.message
    assert str(plugin_home) not in r.message and "/models" not in r.message


def test_unknown_names_keep_nothing(tmp_path: Path):
    rt = Runtime(ModelStore(tmp_path / "models"))

    async def ask_many() -> None:
        for i in range(2000):
            with pytest.raises(ServiceError) as e:
                await rt.load(f"{'x' * 5000}{i}" if i % 2 else f"missing-{i}")
            assert len(e.value.message) < 400  # the name is cut in the message
    asyncio.run(ask_many())
    assert rt._locks == {} and rt.models == {}


SURROGATE = "caf\udfff"


@pytest.mark.parametrize("service, body", [
    ("chat", {"model": REAL, "messages": [{"role": "user", "content": SURROGATE}]}),
    ("chat", {"model": REAL, "messages": [{"role": "user", "content": [
        {"type": "text", "text": SURROGATE}]}]}),
    ("generate", {"model": REAL, "prompt": SURROGATE}),
    ("chat", {"model": REAL, "messages": [{"role": "user", "content": "x"}],
              "stop": [SURROGATE]}),
])
def test_lone_surrogates_are_refused_over_aog(host: AogHost, service: str, body: dict):
    r = host.invoke(service, body)
    assert r.code == errors.INVALID_REQUEST and "lone surrogate" in r.message, r.message
    ok = host.invoke("chat", {"model": REAL, "max_tokens": 2,
                              "messages": [{"role": "user", "content": "hi"}]})
    assert ok.code == 0, ok.message


def test_deep_nesting_is_refused_over_aog(host: AogHost):
    deep: list = []
    for _ in range(200):
        deep = [deep]
    r = host.invoke("chat", {"model": REAL, "messages": deep})
    assert r.code == errors.INVALID_REQUEST and "nests too deeply" in r.message
    r = host.call("InvokeService", _raw_invoke("chat", b"[" * 100_000 + b"]" * 100_000))
    assert r.code == errors.INVALID_REQUEST and "nests too deeply" in r.message


def _raw_invoke(service: str, data: bytes):
    from ovms_plugin.aog.proto import provider_pb2 as pb
    return pb.InvokeServiceRequest(service_name=service, request_data=data)


@pytest.mark.parametrize("path, body", [
    ("/v1/embeddings", {"model": EMBED, "input": ["fine", SURROGATE]}),
    ("/v1/rerank", {"model": RERANK, "query": "q", "documents": ["a", SURROGATE]}),
    ("/v1/completions", {"model": "tiny-chat", "prompt": SURROGATE}),
])
def test_lone_surrogates_are_refused_over_http(srv: Server, path: str, body: dict):  # noqa: F811
    raw = json.dumps(body).encode()  # json escapes the surrogate as \udfff, as a client would
    r = srv.http.post(path, content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "lone surrogate" in r.json()["error"]["message"], r.text
    ok = srv.http.post("/v1/embeddings", json={"model": EMBED, "input": ["still serving"]})
    assert ok.status_code == 200, ok.text


def test_deep_nesting_and_forged_log_lines_over_http(srv: Server):  # noqa: F811
    r = srv.http.post("/v1/chat/completions", content=b"[" * 100_000 + b"]" * 100_000,
                      headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "nests too deeply" in r.json()["error"]["message"]
    evil = "evil\r\n[ERROR] forged line"
    r = srv.http.post("/v1/chat/completions", json={
        "model": evil, "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 404 and str(srv.url) not in r.text
    assert wait_for(lambda: any("evil\\r\\n[ERROR] forged" in line for line in srv.lines), 5)
    assert not any(line.startswith("[ERROR] forged") for line in srv.lines)


@pytest.mark.parametrize("service, body, needle", [
    ("chat", {"model": REAL, "messages": [{"role": "user"}]}, "content is missing or null"),
    ("chat", {"model": REAL, "messages": [{"role": "user", "content": None}]},
     "content is missing or null"),
    ("chat", {"model": REAL, "messages": [{"role": "user", "content": [
        {"type": "text", "text": 42}]}]}, "text must be a string"),
    ("chat", {"model": REAL, "stream": "false",
              "messages": [{"role": "user", "content": "x"}]}, "'stream' must be true or false"),
    ("generate", {"model": REAL, "prompt": "x", "ignore_eos": "yes"}, "'ignore_eos'"),
])
def test_odd_shapes_are_refused_over_aog(host: AogHost, service: str, body: dict, needle: str):
    r = host.invoke(service, body)
    assert r.code == errors.INVALID_REQUEST and needle in r.message, r.message


@pytest.mark.parametrize("models", ["smollm2", [1, 2], {"a": 1}])
def test_unload_model_takes_a_list_of_names_only(host: AogHost, models):
    assert host.json_call("LoadModel", {"model": REAL}).code == 0
    r = host.json_call("UnloadModel", {"models": models})
    assert r.code == errors.INVALID_REQUEST and "list of model names" in r.message
    running = json.loads(host.call("GetRunningModels").response_json)["models"]
    assert REAL in [m["name"] for m in running]  # nothing was unloaded


def test_large_bodies_pass_the_transport_and_the_limit_is_clear(start_host, tmp_path: Path,
                                                                 plugin_home: Path):
    """gRPC's default 4 MiB cap is lifted (AOG sends up to 2 GiB); the plugin's own limit
    (max_request_size) answers with a code and the limit."""
    h = start_host(plugin_home, OVMS_PLUGIN_MAX_REQUEST_SIZE="8MB")
    big = {"model": REAL, "max_tokens": 1,
           "messages": [{"role": "user", "content": "word " * (1 << 20)}]}  # 5 MiB
    r = h.invoke("chat", big)
    assert r.code == errors.INVALID_REQUEST and "context" in r.message  # parsed, then too long
    bigger = {**big, "messages": [{"role": "user", "content": "word " * (2 << 20)}]}  # 10 MiB
    r = h.invoke("chat", bigger)
    assert r.code == errors.INVALID_REQUEST and "limit of 8 MiB" in r.message


def test_documents_must_be_a_list(srv: Server):  # noqa: F811
    r = srv.http.post("/v1/rerank", json={"model": RERANK, "query": "q", "documents": "abc"})
    assert r.status_code == 400 and "'documents' must be a list" in r.text


def test_huge_model_names_do_not_flood_the_log(srv: Server):  # noqa: F811
    name = "n" * 500_000  # under the server's 1 MB body limit
    r = srv.http.post("/v1/chat/completions", json={
        "model": name, "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 404 and len(r.text) < 2000
    assert wait_for(lambda: any("chars)" in line and "status=404" in line
                                for line in srv.lines), 5)
    assert max(len(line) for line in srv.lines) < 5000
