"""scripts/setup.py, what setup.sh and setup.ps1 run: the environment's key is the one setup.sh
always computed (environments already built are found again), its folder on each OS, and the
steps it runs, against fake interpreters (no environment is built here)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "setup.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("ovms_setup_script", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


setup = _load()
posix_only = pytest.mark.skipif(sys.platform == "win32", reason="runs bash and sh fakes")


@posix_only
@pytest.mark.parametrize("extras", ["", "convert,test", "test"])
def test_key_is_the_shell_formula(extras: str) -> None:
    """The formula setup.sh used before setup.py, byte for byte."""
    shell = subprocess.run(
        ["bash", "-c", 'sum=sha256sum; command -v $sum >/dev/null || sum="shasum -a 256"; '
                       '{ cat pyproject.toml constraints.txt; echo "$1"; "$2" --version; } '
                       "| $sum | cut -c1-16", "-", extras, sys.executable],
        cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    assert len(shell) == 16
    assert setup.venv_key(ROOT, extras, setup.version_output(sys.executable)) == shell


def test_version_without_a_subprocess_is_what_python_prints() -> None:
    printed = subprocess.run([sys.executable, "--version"], capture_output=True,
                             check=True).stdout
    assert setup.version_output(sys.executable) == printed


def test_folders_per_os(monkeypatch: pytest.MonkeyPatch) -> None:
    home, key = Path("/home/me"), "0123456789abcdef"
    win = setup.venv_dir(key, "win32", {"LOCALAPPDATA": r"C:\Users\me\AppData\Local"}, home)
    assert str(win).startswith(r"C:\Users\me\AppData\Local")
    assert win.parts[-3:] == ("ovms-plugin", "venvs", key)
    assert setup.venv_dir(key, "win32", {}, home) == (
        home / "AppData" / "Local" / "ovms-plugin" / "venvs" / key)
    assert setup.venv_dir(key, "darwin", {"XDG_CACHE_HOME": "/x"}, home) == (
        home / "Library" / "Caches" / "ovms-plugin" / "venvs" / key)
    assert setup.venv_dir(key, "linux", {"XDG_CACHE_HOME": "/x"}, home) == (
        Path("/x/ovms-plugin/venvs") / key)
    # As ${XDG_CACHE_HOME:-$HOME/.cache}: empty counts as unset.
    for env in ({}, {"XDG_CACHE_HOME": ""}):
        assert setup.venv_dir(key, "linux", env, home) == home / ".cache/ovms-plugin/venvs" / key
    for plat in ("win32", "darwin", "linux"):
        assert setup.venv_dir(key, plat, {"OVMS_PLUGIN_VENV": "/elsewhere"}, home) == (
            Path("/elsewhere"))
    venv = Path("/v")
    assert setup.venv_python(venv, "win32") == venv / "Scripts" / "python.exe"
    assert setup.venv_python(venv, "darwin") == venv / "bin" / "python"
    assert setup.venv_python(venv, "linux") == venv / "bin" / "python"
    # The defaults are this machine's.
    monkeypatch.delenv("OVMS_PLUGIN_VENV", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", "/cache")
    assert setup.venv_dir(key) == Path("/cache/ovms-plugin/venvs") / key


def _recorder(path: Path, log: Path, on_venv: str = ":;") -> Path:
    """A fake interpreter that appends its arguments to `log`; `-m venv DIR` also lays out a
    fake DIR/bin/python that records to the same log."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"""#!/bin/sh
echo "$(basename "$0") $*" >> "{log}"
[ "$1" = --version ] && echo "Python 3.11.99"
if [ "$1 $2" = "-m venv" ]; then {on_venv} fi
exit 0
""")
    path.chmod(0o755)
    return path


@posix_only
def test_setup_sh_reuses_a_finished_environment(tmp_path: Path) -> None:
    venv, log = tmp_path / "venv", tmp_path / "calls"
    _recorder(venv / "bin" / "python", log)
    (venv / ".complete").touch()
    env = {**os.environ, "OVMS_PLUGIN_VENV": str(venv), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "setup.sh"), "convert,test"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == str(venv / "bin" / "python")
    assert log.read_text().splitlines() == [
        "python -m pip install -q --no-deps --no-build-isolation -e ."]
    assert "setting up" not in proc.stderr


@posix_only
def test_a_new_environment_is_built_with_the_constraints(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    venv, log = tmp_path / "venv", tmp_path / "calls"
    venv.mkdir()
    (venv / "leftover").touch()  # an unfinished build: removed first
    base = _recorder(tmp_path / "base" / "python3.11", log,
                     on_venv='mkdir -p "$3/bin" && cp "$0" "$3/bin/python";')
    monkeypatch.setenv("OVMS_PLUGIN_VENV", str(venv))
    assert setup.setup("convert", python=str(base)) == venv / "bin" / "python"
    assert not (venv / "leftover").exists() and (venv / ".complete").is_file()
    assert log.read_text().splitlines() == [
        "python3.11 --version",
        f"python3.11 -m venv {venv}",
        "python -m pip install -q --upgrade pip setuptools wheel",
        "python -m pip install -q -c constraints.txt .[convert]",
        "python -m pip uninstall -q -y torchvision",
        "python -m pip install -q --no-deps --no-build-isolation -e ."]


def test_refusals(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(setup.SetupError, match="comma list"):
        setup.setup("convert; rm -rf /")
    monkeypatch.setattr(setup, "REQUIRED_PYTHON", (3, 99))
    assert setup.main([]) == 2
    assert "needs Python 3.99" in capsys.readouterr().err


def test_powershell_twins_run_what_the_shell_scripts_run() -> None:
    """demo.ps1 and test.ps1 cannot run here (no PowerShell): at least they run the same
    commands as demo.sh and test.sh, through setup.ps1, which runs setup.py."""
    scripts = ROOT / "scripts"
    sh = (scripts / "test.sh").read_text()
    ps = (scripts / "test.ps1").read_text()
    for command in ("-m ruff check ovms_plugin tests scripts benchmarks",
                    "-m pytest -q -ra --durations=15"):
        assert command in sh and command in ps
    assert "setup.sh convert,test" in sh and '"setup.ps1") "convert,test"' in ps
    assert '-m ovms_plugin demo "$@"' in (scripts / "demo.sh").read_text()
    assert "-m ovms_plugin demo @args" in (scripts / "demo.ps1").read_text()
    assert '(Join-Path $PSScriptRoot "setup.py")' in (scripts / "setup.ps1").read_text()
    assert "scripts/setup.py" in (scripts / "setup.sh").read_text()
