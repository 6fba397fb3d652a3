"""install-aog for every platform AOG runs on: the Windows launcher is checked as a PE file
and its appended shebang and zip are read back (it is never run: no Windows here); the
POSIX layouts are /bin/sh launchers at plugin.yaml's paths."""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from ovms_plugin import paths
from ovms_plugin.aog import install as inst

WIN_PYTHON = r"C:\Users\me\venv\Scripts\python.exe"
WIN_MODELS = r"C:\Users\me\AppData\Roaming\AOG\engine\ovms-plugin\models"
WIN_SRC = r"C:\Users\me\src\ovms-plugin"


def pe_header(data: bytes) -> tuple[int, int]:
    """(machine, subsystem) of a PE image; asserts the signatures on the way."""
    assert data[:2] == b"MZ"
    pe = struct.unpack_from("<I", data, 0x3C)[0]
    assert data[pe:pe + 4] == b"PE\0\0"
    machine = struct.unpack_from("<H", data, pe + 4)[0]
    optional = pe + 24  # after the signature and the 20-byte COFF header
    assert struct.unpack_from("<H", data, optional)[0] == 0x20B  # PE32+ (64-bit)
    subsystem = struct.unpack_from("<H", data, optional + 68)[0]
    return machine, subsystem


def split_launcher(data: bytes) -> tuple[bytes, zipfile.ZipFile]:
    """The shebang line before the appended zip, and the zip."""
    zf = zipfile.ZipFile(io.BytesIO(data))  # finds the zip from the end, as the launcher
    start = data.rindex(b"PK\x05\x06") - sum(
        struct.unpack_from("<II", data, data.rindex(b"PK\x05\x06") + 12))
    head = data[:start]
    line_start = head.rindex(b"#!")
    return head[line_start:], zf


def test_windows_launcher_is_a_console_pe_with_shebang_and_zip(tmp_path: Path):
    root = inst.install(tmp_path, WIN_MODELS, platform="windows_amd64", python=WIN_PYTHON,
                        pythonpath=WIN_SRC)
    exe = root / "bin" / "windows-amd64" / "ovms-plugin.exe"
    data = exe.read_bytes()
    machine, subsystem = pe_header(data)
    assert machine == 0x8664  # AMD64
    assert subsystem == 3  # console: t64.exe, see WINDOWS_LAUNCHER
    shebang, zf = split_launcher(data)
    assert shebang == f'#!"{WIN_PYTHON}"\n'.encode()
    assert zf.namelist() == ["__main__.py"]
    src = zf.read("__main__.py").decode()
    compile(src, "__main__.py", "exec")
    assert "from ovms_plugin.__main__ import main" in src
    assert "sys.exit(main())" in src
    assert f"PYTHONPATH = {WIN_SRC!r}" in src and 'os.environ["PYTHONPATH"]' in src
    assert f"MODELS = {WIN_MODELS!r}" in src and 'os.environ["OVMS_PLUGIN_MODELS"]' in src
    assert not list(exe.parent.glob("*.tmp"))


def run_as_the_launcher_does(exe: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """What the launcher does after reading the shebang: `python <the .exe>`. Python runs a
    zip with bytes before it, so this runs the real __main__.py (here, with this python)."""
    return subprocess.run([sys.executable, str(exe)], env=env, capture_output=True,
                          text=True, timeout=60)


def test_windows_main_runs_the_plugin(tmp_path: Path):
    root = inst.install(tmp_path, None, platform="windows_amd64", python=WIN_PYTHON,
                        pythonpath=str(paths.PACKAGE_DIR.parent))
    env = {k: v for k, v in os.environ.items() if k not in ("AOG_PLUGIN", "PYTHONPATH")}
    r = run_as_the_launcher_does(root / "bin/windows-amd64/ovms-plugin.exe", env)
    assert r.returncode == 1 and r.stdout == ""  # no AOG cookie: it explains and exits
    assert "not meant to be executed directly" in r.stderr


def test_windows_main_sets_the_environment(tmp_path: Path):
    """With a stand-in package: what __main__.py puts in the environment before main()."""
    fake = tmp_path / "src" / "ovms_plugin"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "__main__.py").write_text(
        "import os\ndef main():\n"
        "    print(os.environ['PYTHONPATH'], os.environ['OVMS_PLUGIN_MODELS'], sep='|')\n"
        "    return 7\n")
    exe = tmp_path / "ovms-plugin.exe"
    exe.write_bytes(inst.windows_launcher(WIN_PYTHON, str(fake.parent), "/models/y"))
    env = {k: v for k, v in os.environ.items() if k != "OVMS_PLUGIN_MODELS"}
    env["PYTHONPATH"] = "/already"
    r = run_as_the_launcher_does(exe, env)
    assert r.returncode == 7, r.stderr  # main's return value is the exit code
    assert r.stdout.strip() == f"{fake.parent}{os.pathsep}/already|/models/y"
    env["OVMS_PLUGIN_MODELS"] = "/from/env"  # the environment wins, as in the sh launcher
    assert run_as_the_launcher_does(exe, env).stdout.strip().endswith("|/from/env")


def test_windows_launcher_without_models_or_pythonpath(tmp_path: Path):
    root = inst.install(tmp_path, None, platform="windows_amd64", python=WIN_PYTHON)
    _, zf = split_launcher((root / "bin/windows-amd64/ovms-plugin.exe").read_bytes())
    src = zf.read("__main__.py").decode()
    assert "PYTHONPATH = None" in src and "MODELS = None" in src


@pytest.mark.parametrize("platform", ["darwin_arm64", "linux_amd64"])
def test_posix_layouts(tmp_path: Path, platform: str):
    python = "/Users/me/venv/bin/python" if platform.startswith("darwin") else sys.executable
    root = inst.install(tmp_path, Path("/models"), platform=platform, python=python)
    goos, goarch = platform.split("_")
    exe = root / "bin" / f"{goos}-{goarch}" / "ovms-plugin"
    assert os.access(exe, os.X_OK) and exe.stat().st_mode & 0o777 == 0o755
    text = exe.read_text()
    assert text.startswith("#!/bin/sh\n")
    assert f"exec {python} -m ovms_plugin" in text
    assert "OVMS_PLUGIN_MODELS=${OVMS_PLUGIN_MODELS:-/models}" in text
    here = platform == inst.running_platform()
    assert ("PYTHONPATH=" in text) is here  # the checkout only means something here


def test_linux_launcher_runs_the_plugin(tmp_path: Path):
    if inst.running_platform() != "linux_amd64":
        pytest.skip("runs the launcher of this machine's platform")
    root = inst.install(tmp_path)
    exe = root / "bin" / "linux-amd64" / "ovms-plugin"
    env = {k: v for k, v in os.environ.items() if k != "AOG_PLUGIN"}
    r = subprocess.run([str(exe)], env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and "not meant to be executed directly" in r.stderr


def test_installed_plugin_yaml_lists_every_platform(tmp_path: Path):
    root = inst.install(tmp_path, platform="windows_amd64", python=WIN_PYTHON)
    m = yaml.safe_load((root / "plugin.yaml").read_text())
    assert set(m["platforms"]) == set(inst.SUPPORTED)
    assert (root / "plugin.yaml").read_text() == paths.manifest_path().read_text()


def test_unsupported_platform_is_refused(tmp_path: Path):
    with pytest.raises(inst.InstallError, match=r"unsupported platform 'windows_386'.*"
                                                 r"linux_amd64.*windows_amd64"):
        inst.install(tmp_path, platform="windows_386", python=WIN_PYTHON)
    assert not (tmp_path / "ovms-plugin").exists()


def test_foreign_platform_needs_python(tmp_path: Path):
    foreign = "windows_amd64" if inst.running_platform() != "windows_amd64" else "linux_amd64"
    with pytest.raises(inst.InstallError, match="needs --python"):
        inst.install(tmp_path, platform=foreign)
    assert not (tmp_path / "ovms-plugin").exists()


def test_cli_refuses_clearly(tmp_path: Path):
    r = subprocess.run([sys.executable, "-m", "ovms_plugin", "install-aog", "--plugins-dir",
                        str(tmp_path), "--platform", "plan9_amd64"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "unsupported platform 'plan9_amd64'" in r.stderr
    r = subprocess.run([sys.executable, "-m", "ovms_plugin", "install-aog", "--plugins-dir",
                        str(tmp_path), "--platform", "windows_amd64", "--python", WIN_PYTHON],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "ovms-plugin" / "bin" / "windows-amd64" / "ovms-plugin.exe").is_file()


def test_running_platform_names():
    assert inst.running_platform() in inst.SUPPORTED or sys.platform not in (
        "linux", "darwin", "win32")
