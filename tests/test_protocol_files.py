"""Generated stubs are current, the service matches the contract, and the AOG manifest is
what AOG accepts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from ovms_plugin import __version__
from ovms_plugin.aog.proto import provider_pb2

ROOT = Path(__file__).resolve().parent.parent

# Contract §3, in declaration order.
METHODS = ["GetManifest", "InvokeService", "InvokeServiceStream", "InvokeServiceBidi",
           "HealthCheck", "GetOperateStatus", "SetOperateStatus", "SetAuth", "ValidateAuth",
           "RefreshAuth", "StartEngine", "StopEngine", "GetConfig", "CheckEngine",
           "InstallEngine", "InitEnv", "UpgradeEngine", "PullModel", "PullModelStream",
           "DeleteModel", "ListModels", "LoadModel", "UnloadModel", "GetRunningModels",
           "GetVersion"]


def test_stubs_are_up_to_date():
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--check"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_provider_service_matches_contract():
    svc = provider_pb2.DESCRIPTOR.services_by_name["ProviderService"]
    assert svc.full_name == "protocol.ProviderService"
    assert [m.name for m in svc.methods] == METHODS
    streams = {m.name: (m.client_streaming, m.server_streaming) for m in svc.methods}
    assert streams["InvokeServiceStream"] == (False, True)
    assert streams["PullModelStream"] == (False, True)
    assert streams["InvokeServiceBidi"] == (True, True)
    assert sum(1 for s in streams.values() if s != (False, False)) == 3
    stream_resp = provider_pb2.InvokeServiceStreamResponse.DESCRIPTOR.fields_by_name
    assert {n: f.number for n, f in stream_resp.items()} == {
        "code": 1, "message": 2, "chunk_data": 3, "is_final": 4, "metadata": 5}


def test_plugin_yaml_is_what_aog_accepts():
    top = ROOT / "plugin.yaml"
    assert top.read_text() == (ROOT / "ovms_plugin" / "plugin.yaml").read_text()
    m = yaml.safe_load(top.read_text())
    name = m["provider"]["name"]
    assert "plugin" in name and "_" not in name and name not in ("openvino", "ollama")
    assert m["provider"]["type"] == "local" and m["provider"]["version"] == __version__
    assert {k: v["executable"] for k, v in m["platforms"].items()} == {
        "linux_amd64": "bin/linux-amd64/ovms-plugin",
        "linux_arm64": "bin/linux-arm64/ovms-plugin",
        "darwin_amd64": "bin/darwin-amd64/ovms-plugin",
        "darwin_arm64": "bin/darwin-arm64/ovms-plugin",
        "windows_amd64": "bin/windows-amd64/ovms-plugin.exe"}
    for s in m["services"]:
        assert s["config_ref"] == f"openvino:{s['service_name']}"
        bidi = s["service_name"] == "speech-to-text-ws"
        assert s["protocol"] == "HTTP"
        assert s["expose_protocol"] == ("WEBSOCKET" if bidi else "HTTP")
        assert s["capabilities"]["support_bidirectional"] is bidi
        if bidi:
            assert s["timeout"] == -1 and s["capabilities"]["support_streaming"] is True
        if s["service_name"] in ("chat", "generate"):
            assert s["timeout"] == -1 and s["capabilities"]["support_streaming"] is True
        if s["service_name"] in ("text-to-image", "image-to-image"):
            assert s["timeout"] == -1
    assert {s["service_name"] for s in m["services"]} == {
        "chat", "generate", "embed", "rerank", "text-to-image", "image-to-image",
        "speech-to-text", "speech-to-text-ws", "text-to-speech"}


def test_plugin_yaml_services_are_the_registered_kinds():
    """plugin.yaml declares what the kinds declare (ovms_plugin.kinds), service by service."""
    from ovms_plugin import kinds
    declared = {s["service_name"]: s for s in yaml.safe_load(
        (ROOT / "plugin.yaml").read_text())["services"]}
    assert list(declared) == kinds.services()
    for name in kinds.services():
        svc, s = kinds.service(name), declared[name]
        streaming = svc.stream is not None if svc.aog_streaming is None else svc.aog_streaming
        assert (s["task_type"], s["timeout"], s["default_model"],
                s["capabilities"]["support_streaming"],
                s["capabilities"]["support_bidirectional"]) == \
            (svc.task_type, svc.timeout, svc.default_model, streaming,
             svc.bidi is not None), name
