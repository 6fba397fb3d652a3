"""The model CLI: pull (with a progress bar), list, show, rm, catalog, and clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from hub_server import HubServer


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ovms_plugin", *args], capture_output=True,
                          text=True, timeout=300, env={**os.environ, **(env or {})})


def test_pull_list_show_rm(tmp_path: Path, test_models: dict[str, Path]):
    models = str(tmp_path / "models")
    with HubServer() as hub:
        hub.add_repo("OpenVINO/tiny-chat-ov", test_models["tiny-chat"])
        r = cli("--models-dir", models, "pull", "OpenVINO/tiny-chat-ov", "--type", "chat",
                env={"HF_ENDPOINT": hub.endpoint})
    assert r.returncode == 0, r.stderr
    assert "installed OpenVINO/tiny-chat-ov" in r.stdout
    assert "pulling openvino_model.bin" in r.stderr and "MiB" in r.stderr  # the bar
    r = cli("--models-dir", models, "list")
    assert "OpenVINO/tiny-chat-ov" in r.stdout and "FP32" in r.stdout
    r = cli("--models-dir", models, "show", "OpenVINO/tiny-chat-ov")
    shown = json.loads(r.stdout)
    assert shown["source"] == "hf:OpenVINO/tiny-chat-ov" and shown["task"] == "text-generation"
    assert cli("--models-dir", models, "rm", "OpenVINO/tiny-chat-ov").returncode == 0
    r = cli("--models-dir", models, "show", "OpenVINO/tiny-chat-ov")
    assert r.returncode == 1 and "not in the model store" in r.stderr


def test_cli_errors_are_clear(tmp_path: Path):
    models = str(tmp_path / "models")
    r = cli("--models-dir", models, "pull", "../../etc", "--name", "../x")
    assert r.returncode == 1 and "error:" in r.stderr and "Traceback" not in r.stderr
    r = cli("--models-dir", models, "pull", "x", "--type", "video")
    assert r.returncode == 1 and "unknown model_type 'video'" in r.stderr


def test_catalog_lists_every_service():
    r = cli("catalog")
    assert r.returncode == 0
    for service in ("chat", "embed", "rerank", "text-to-image"):
        assert service in r.stdout
    assert "OpenVINO/stable-diffusion-v1-5-fp16-ov" in r.stdout  # AOG's own default


def test_ctrl_c_during_a_pull_says_cancelled_and_keeps_the_bytes(tmp_path: Path,
                                                                 test_models: dict[str, Path]):
    import signal
    import time
    models = tmp_path / "models"
    with HubServer() as hub:
        hub.add_repo("OpenVINO/tiny-chat-ov", test_models["tiny-chat"])
        hub.throttle("openvino_model.bin", 100_000)
        proc = subprocess.Popen(
            [sys.executable, "-m", "ovms_plugin", "--models-dir", str(models), "pull",
             "OpenVINO/tiny-chat-ov"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, env={**os.environ, "HF_ENDPOINT": hub.endpoint},
            # A shell's background job (as CI may be) ignores SIGINT, and Python keeps an
            # ignored SIGINT ignored: give the CLI the terminal's default, as a user's has.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not list(models.rglob("*.bin.part")):
            time.sleep(0.1)
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "cancelled" in err and "pulling again resumes" in err
    assert "Traceback" not in err
    parts = list(models.rglob("*.bin.part"))
    assert parts and parts[0].stat().st_size > 0
