"""The runtime dependencies install from wheels on Windows x86-64, macOS arm64 and Linux x86-64
(scripts/check_wheels.py, against the package index), and the check's own parts, offline."""

from __future__ import annotations

import hashlib
import importlib.util
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest

from ovms_plugin import devmodels

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "check_wheels.py"
# A pass is kept this long for the same pyproject.toml, constraints.txt and check: the
# unpinned dependencies still move on the index, so it is checked again now and then.
PASS_MAX_AGE = 7 * 24 * 3600


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("check_wheels", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["check_wheels"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


cw = _load()


def _pass_marker() -> Path:
    digest = hashlib.sha256()
    for path in (ROOT / "pyproject.toml", ROOT / "constraints.txt", SCRIPT):
        digest.update(path.read_bytes())
    return devmodels.default_cache_dir() / "wheel-check" / f"pass-{digest.hexdigest()[:16]}"


@pytest.mark.slow
def test_runtime_wheels_exist_for_every_platform() -> None:
    """About 50 s against the index (three platforms side by side), so a pass is remembered
    for the same dependency files; a miss is never remembered."""
    marker = _pass_marker()
    if marker.is_file() and time.time() - marker.stat().st_mtime < PASS_MAX_AGE:
        return
    proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, f"wheel check failed:\n{proc.stdout}\n{proc.stderr}"
    for name in cw.PLATFORMS:
        assert any(line.split()[:2] == [name, "ok"] for line in proc.stdout.splitlines()), (
            proc.stdout)
    marker.parent.mkdir(parents=True, exist_ok=True)
    tmp = marker.with_name(marker.name + ".tmp")
    tmp.write_text(proc.stdout)
    tmp.replace(marker)


def test_pip_errors_name_the_packages_without_wheels() -> None:
    old_style = ("ERROR: Could not find a version that satisfies the requirement soxr<2,>=0.5 "
                 "(from versions: none)\nERROR: No matching distribution found for soxr<2,>=0.5\n")
    assert cw.missing_from_pip_error(old_style) == {"soxr"}
    conflict = ("ERROR: Cannot install grpcio==1.85.1 because these package versions have "
                "conflicting dependencies.\n\nAdditionally, some packages in these conflicts "
                "have no matching distributions available for your environment:\n    grpcio\n"
                "    Open_VINO\n\nTo fix this you could try to:\n")
    assert cw.missing_from_pip_error(conflict) == {"grpcio", "open-vino"}
    assert cw.missing_from_pip_error("ERROR: ResolutionImpossible: a real conflict") == set()


def test_markers_are_judged_for_the_target_not_this_machine() -> None:
    win = cw.marker_environment(cw.PLATFORMS["win_amd64"], "3.11")
    mac = cw.marker_environment(cw.PLATFORMS["macos_arm64"], "3.11")
    reqs = ["numpy>=1.26", "pywin32>=306; sys_platform == 'win32'",
            "uvloop; platform_system != 'Windows'", "tomli; python_version < '3.11'"]
    assert cw.target_requirements(reqs, win) == ["numpy>=1.26", "pywin32>=306"]
    assert cw.target_requirements(reqs, mac) == ["numpy>=1.26", "uvloop"]

    # A report as pip writes it on Linux: tqdm's colorama was skipped, click's extra too.
    def item(name: str, requires: list[str]) -> dict:
        return {"metadata": {"name": name, "requires_dist": requires},
                "download_info": {"url": f"https://x/{name}-1-py3-none-any.whl"}}

    report = {"install": [
        item("tqdm", ['colorama; platform_system == "Windows"']),
        item("Typer", ["click>=8", 'rich; extra == "all"', 'shellingham; os_name != "nt"']),
        item("click", []), item("rich", []), item("shellingham", [])]}
    needed, absent = cw.target_closure(["tqdm", "typer[all]"], report, win)
    assert needed == {"tqdm", "typer", "click", "rich"}  # shellingham is not for Windows
    assert absent == {"colorama": "colorama"}
    needed, absent = cw.target_closure(["tqdm", "typer"], report, mac)
    assert needed == {"tqdm", "typer", "click", "shellingham"} and absent == {}


def test_the_report_says_how_old_a_system_the_wheels_admit() -> None:
    linux, mac = cw.PLATFORMS["linux_x86_64"], cw.PLATFORMS["macos_arm64"]
    assert linux.os_floor(["a-1-cp311-cp311-manylinux2014_x86_64.manylinux_2_28_x86_64.whl",
                           "b-1-py3-none-any.whl"]) == "glibc >= 2.17"
    assert linux.os_floor(["a-1-cp311-cp311-manylinux_2_28_x86_64.whl",
                           "c-1-cp311-cp311-manylinux1_x86_64.whl"]) == "glibc >= 2.28"
    assert mac.os_floor(["p-7-cp310-abi3-macosx_10_9_universal2.whl",
                         "n-2-cp311-cp311-macosx_11_0_arm64.whl"]) == "macOS >= 11.0"
    # Every Apple-silicon macOS from 11 on, oldest first (pip prefers the order given).
    assert mac.tags[:2] == ("macosx_11_0_arm64", "macosx_11_0_universal2")
    assert "macosx_15_0_arm64" in mac.tags and "macosx_16_0_arm64" not in mac.tags
    assert "manylinux_2_28_x86_64" in linux.tags and "manylinux_2_29_x86_64" not in linux.tags
    line = cw.report_line(cw.Result(cw.PLATFORMS["win_amd64"], ok=False,
                                    missing={"soxr": {"soxr>=0.5,<2"}}))
    assert "win_amd64" in line and "MISSING" in line and "soxr (needed by soxr>=0.5,<2)" in line
