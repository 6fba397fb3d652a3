"""Shared fixtures: offline test models (cached between runs in the folder devmodels owns),
a plugin home with those models installed, the plugin installed as AOG installs plugins,
and a running plugin launched as AOG launches it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from ovms_plugin import devmodels
from ovms_plugin.aog.host import AogHost
from ovms_plugin.store import pull
from ovms_plugin.store.store import ModelStore

CHAT = "tiny-chat"  # random weights: for shapes a test needs (a tiny context, ...)
REAL = "smollm2"  # the real SmolLM2-135M-Instruct, converted from its GGUF


@pytest.fixture(scope="session")
def test_models() -> dict[str, Path]:
    return devmodels.ensure_models(devmodels.default_cache_dir(),
                                   [devmodels.TINY_CHAT, devmodels.TINY_CHAT_HF,
                                    devmodels.SMOLLM2_GGUF, devmodels.SMOLLM2])


@pytest.fixture(scope="session")
def plugin_home(tmp_path_factory: pytest.TempPathFactory, test_models: dict[str, Path]) -> Path:
    """OVMS_PLUGIN_HOME with the real SmolLM2 and the tiny chat model installed, and f32
    inference for both (exact comparisons with the engine run directly)."""
    home = tmp_path_factory.mktemp("home")
    exact = {"properties": {"INFERENCE_PRECISION_HINT": "f32"}, "scheduler": {"cache_size": 1}}
    (home / "settings.yaml").write_text(yaml.safe_dump({"models": {CHAT: exact, REAL: exact}}))
    for name, model in ((CHAT, devmodels.TINY_CHAT), (REAL, devmodels.SMOLLM2)):
        pull.pull(ModelStore(home / "models"),
                  pull.PullRequest(model=str(test_models[model]), name=name),
                  lambda msg: None)
    return home


@pytest.fixture(scope="session")
def plugin_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The plugin laid out by `python -m ovms_plugin install-aog`."""
    plugins = tmp_path_factory.mktemp("plugins")
    subprocess.run([sys.executable, "-m", "ovms_plugin", "install-aog", "--plugins-dir",
                    str(plugins)], check=True, capture_output=True, timeout=60)
    return plugins / "ovms-plugin"


@pytest.fixture
def start_host(plugin_dir: Path, plugin_home: Path) -> Iterator[Callable[..., AogHost]]:
    """Starts plugins as AOG does; kills whatever is left at the end of the test."""
    hosts: list[AogHost] = []

    def start(home: Path | None = None, **env: str) -> AogHost:
        host = AogHost(plugin_dir, env={"OVMS_PLUGIN_HOME": str(home or plugin_home), **env})
        hosts.append(host.start())
        return host

    yield start
    for host in hosts:
        host.kill()


@pytest.fixture(scope="module")
def host(plugin_dir: Path, plugin_home: Path) -> Iterator[AogHost]:
    """One plugin shared by a test module, launched as AOG launches it."""
    h = AogHost(plugin_dir, env={"OVMS_PLUGIN_HOME": str(plugin_home)}).start()
    yield h
    h.kill()


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0, every: float = 0.05) -> bool:
    """Polls a condition, bounded in time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(every)
    return predicate()


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"  # a zombie is dead
    except FileNotFoundError:
        return False


def descendants(pid: int) -> list[int]:
    """All processes below pid (from /proc, no psutil needed)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().split(")")[-1].split()[1])
            except (FileNotFoundError, ProcessLookupError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out
