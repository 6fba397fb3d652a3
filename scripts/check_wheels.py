"""Checks that every runtime dependency installs from wheels on Windows, macOS and Linux.

    python scripts/check_wheels.py                       all three platforms
    python scripts/check_wheels.py --platform win_amd64  one platform (repeatable)
    python scripts/check_wheels.py -v                    also name each wheel chosen

The runtime dependencies are `[project] dependencies` of pyproject.toml with constraints.txt
applied; the whole transitive set is resolved for CPython 3.11 on each platform with
`--only-binary :all:`, so a package that would have to be built from source on a user's
laptop counts as missing. Prints one line per platform (ok, or the packages with no wheel
and which dependency pulls them in) and exits 1 if any platform misses a wheel, 2 if the
check itself could not run (no pip, index unreachable).

How: `pip install --dry-run --ignore-installed --target TMP --report JSON` with
`--platform/--python-version/--implementation/--abi`, rather than `pip download`. Both
resolve the same way and give the same answer; the dry run writes nothing but a JSON report
(the chosen files, their metadata), and on an index that serves the wheels' metadata
separately (PEP 658, as pypi.org does) it fetches only that metadata instead of whole wheels.
Measured here: 15-20 s per resolution, 35-55 s for the three platforms side by side on 2
vCPUs (Windows resolves twice, for tqdm's colorama, below), against an index that served no
separate metadata, so pip downloaded whole wheels (openvino alone is 33-59 MB).

pip evaluates environment markers for the machine it runs on, not for `--platform`: on Linux
it skips `colorama; platform_system == "Windows"` (tqdm's). So the script walks the resolved
metadata again with the target's markers (using the `packaging` that pip vendors, since pip
has no option for this), adds what only the target needs, and resolves again.

The platforms, and the oldest systems their tags admit:
- win_amd64: 64-bit Windows on x86-64.
- macos_arm64: Apple silicon, wheels tagged macosx 11.0 to 15.0 arm64 or universal2
  (universal2 wheels tagged older than 11 count: their arm64 half runs on 11+). Older tags
  are preferred, and the line says the newest macOS any chosen wheel asks for.
- linux_x86_64: manylinux wheels up to glibc 2.28 (RHEL 8, Debian 10, Ubuntu 20.04 and
  later); the line says the newest glibc any chosen wheel asks for.

The index is pypi.org, whatever pip's configuration says (`--index-url` changes it): the
question is what a laptop's pip finds there, not what this machine's wheel folders hold.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTHON_VERSION = "3.11"
DEFAULT_INDEX = "https://pypi.org/simple"


@dataclass(frozen=True)
class Platform:
    name: str
    tags: tuple[str, ...]
    markers: dict[str, str]  # PEP 508 marker values on that platform
    floor: str  # what the tags' oldest system is, for the report

    def os_floor(self, wheel_files: Iterable[str]) -> str:
        """The newest OS version any of the wheels asks for, e.g. "macOS >= 11.0". A wheel
        with several tags (manylinux_2_17.manylinux_2_28) asks for the oldest of them."""
        if self.name.startswith("macos"):
            pattern, label = r"macosx_(\d+)_(\d+)_", "macOS"
        elif self.name.startswith("linux"):
            pattern, label = r"manylinux_(\d+)_(\d+)_", "glibc"
        else:
            return ""
        floors = []
        for name in wheel_files:
            tags = name.removesuffix(".whl").split("-")[-1]
            for legacy, glibc in _LEGACY_MANYLINUX.items():
                tags = tags.replace(legacy + "_", f"manylinux_{glibc}_")
            versions = [(int(a), int(b)) for a, b in re.findall(pattern, tags)]
            if versions:
                floors.append(min(versions))
        return f"{label} >= {max(floors)[0]}.{max(floors)[1]}" if floors else ""


_LEGACY_MANYLINUX = {"manylinux1": "2_5", "manylinux2010": "2_12", "manylinux2014": "2_17"}


def _macos_tags() -> tuple[str, ...]:
    # Oldest first: pip prefers tags in the order given, so a package with both an 11.0 and a
    # 14.0 wheel is reported at 11.0, the version that admits the most Macs. pip expands each
    # macOS tag to the older ones and to universal2 itself; listing them keeps it explicit.
    tags = []
    for major in range(11, 16):
        tags += [f"macosx_{major}_0_arm64", f"macosx_{major}_0_universal2"]
    return tuple(tags)


def _manylinux_tags() -> tuple[str, ...]:
    # pip does not expand manylinux_2_28 to older glibc tags as it does for macOS: list them.
    return tuple([f"manylinux_2_{minor}_x86_64" for minor in range(28, 4, -1)]
                 + ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"])


PLATFORMS = {
    p.name: p for p in (
        Platform("win_amd64", ("win_amd64",),
                 {"os_name": "nt", "sys_platform": "win32", "platform_system": "Windows",
                  "platform_machine": "AMD64", "platform_release": "10",
                  "platform_version": "10.0.22631"},
                 "Windows 10/11 x86-64"),
        Platform("macos_arm64", _macos_tags(),
                 {"os_name": "posix", "sys_platform": "darwin", "platform_system": "Darwin",
                  "platform_machine": "arm64", "platform_release": "20.0.0",
                  "platform_version": "Darwin Kernel Version 20.0.0"},
                 "macOS 11+ on Apple silicon"),
        Platform("linux_x86_64", _manylinux_tags(),
                 {"os_name": "posix", "sys_platform": "linux", "platform_system": "Linux",
                  "platform_machine": "x86_64", "platform_release": "", "platform_version": ""},
                 "glibc 2.28+ x86-64"),
    )
}


@dataclass
class Result:
    platform: Platform
    ok: bool
    wheels: dict[str, str] = field(default_factory=dict)  # package -> wheel file name
    missing: dict[str, set[str]] = field(default_factory=dict)  # package -> pulled in by
    error: str = ""  # the check could not decide (pip failed for another reason)
    seconds: float = 0.0


class CheckError(Exception):
    """The check itself could not run (no pip, index unreachable, bad pyproject)."""


def _packaging():  # pip's vendored modules
    try:
        from pip._vendor.packaging import markers, requirements, utils
    except ImportError as e:
        raise CheckError(f"this interpreter ({sys.executable}) has no pip: {e}") from e
    return markers, requirements, utils


def runtime_requirements(pyproject: Path) -> list[str]:
    with pyproject.open("rb") as f:
        deps = tomllib.load(f).get("project", {}).get("dependencies")
    if not isinstance(deps, list) or not all(isinstance(d, str) for d in deps):
        raise CheckError(f"{pyproject}: [project] dependencies is not a list of strings")
    return deps


def marker_environment(plat: Platform, python_version: str) -> dict[str, str]:
    full = (platform.python_version() if platform.python_version().startswith(python_version + ".")
            else python_version + ".0")
    return {"implementation_name": "cpython", "platform_python_implementation": "CPython",
            "implementation_version": full, "python_full_version": full,
            "python_version": python_version, **plat.markers}


def _unmarked(req) -> str:  # req: pip's packaging.requirements.Requirement
    """The requirement without its marker (already evaluated for the target), as pip reads it."""
    extras = f"[{','.join(sorted(req.extras))}]" if req.extras else ""
    if req.url:
        return f"{req.name}{extras} @ {req.url}"
    return f"{req.name}{extras}{req.specifier}"


def target_requirements(reqs: Iterable[str], env: dict[str, str]) -> list[str]:
    """The requirements that apply on the target, markers evaluated there and removed."""
    _, requirements, _ = _packaging()
    out = []
    for text in reqs:
        req = requirements.Requirement(text)
        if req.marker is None or req.marker.evaluate({**env, "extra": ""}):
            out.append(_unmarked(req))
    return out


def target_closure(roots: list[str], report: dict, env: dict[str, str]
                   ) -> tuple[set[str], dict[str, str]]:
    """Walks the resolved metadata with the target's markers. Returns the packages the target
    needs, and those it needs that pip did not resolve (name -> requirement), because pip
    judged their markers for this machine."""
    _, requirements, utils = _packaging()
    items = {utils.canonicalize_name(i["metadata"]["name"]): i for i in report["install"]}
    needed: set[str] = set()
    extras_seen: dict[str, set[str]] = {}
    absent: dict[str, str] = {}
    queue = [requirements.Requirement(r) for r in roots]
    while queue:
        req = queue.pop()
        name = utils.canonicalize_name(req.name)
        item = items.get(name)
        if item is None:
            absent.setdefault(name, _unmarked(req))
            continue
        extras = extras_seen.setdefault(name, set())
        new_extras = set(req.extras) - extras
        if name in needed and not new_extras:
            continue
        needed.add(name)
        extras |= new_extras
        for text in item["metadata"].get("requires_dist", []):
            dep = requirements.Requirement(text)
            if dep.marker is None or any(dep.marker.evaluate({**env, "extra": x})
                                         for x in ["", *extras]):
                queue.append(dep)
    return needed, absent


_NO_DIST = re.compile(r"No matching distribution found for ([A-Za-z0-9][A-Za-z0-9._-]*)")
_NO_DIST_LIST = re.compile(r"no matching distributions available for your environment:\n"
                           r"((?:[ \t]+\S+\n?)+)")
_UNREACHABLE = ("Could not fetch URL", "NewConnectionError", "Failed to establish",
                "Max retries exceeded", "Temporary failure in name resolution")


def missing_from_pip_error(stderr: str) -> set[str]:
    """The packages pip found no usable file for, from its error output."""
    _, _, utils = _packaging()
    names = {m for m in _NO_DIST.findall(stderr)}
    for block in _NO_DIST_LIST.findall(stderr):
        names |= {line.strip() for line in block.splitlines() if line.strip()}
    return {utils.canonicalize_name(n) for n in names}


def pip_env() -> dict[str, str]:
    """The environment for pip: this machine's pip configuration files and the index and
    constraint settings of PIP_* variables left out (certificates and proxies stay)."""
    env = {k: v for k, v in os.environ.items()
           if not (k.startswith("PIP_") and k not in ("PIP_CERT", "PIP_CLIENT_CERT", "PIP_PROXY",
                                                     "PIP_TRUSTED_HOST", "PIP_DEFAULT_TIMEOUT",
                                                     "PIP_CACHE_DIR", "PIP_NO_CACHE_DIR"))}
    env["PIP_CONFIG_FILE"] = os.devnull  # pip then reads no configuration file at all
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def resolve(plat: Platform, reqs: list[str], constraints: Path, python_version: str,
            index_url: str) -> tuple[dict | None, str]:
    """One pip resolution for the platform: (report, "") or (None, pip's error output)."""
    with tempfile.TemporaryDirectory(prefix="check-wheels-") as tmp:
        report = Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed",
               "--quiet", "--no-input", "--target", str(Path(tmp) / "target"),
               "--report", str(report), "--only-binary", ":all:",
               "--python-version", python_version, "--implementation", "cp",
               "--abi", "cp" + python_version.replace(".", ""), "--index-url", index_url,
               "-c", str(constraints)]
        for tag in plat.tags:
            cmd += ["--platform", tag]
        proc = subprocess.run([*cmd, *reqs], capture_output=True, text=True, env=pip_env(),
                              timeout=900)
        if proc.returncode == 0 and report.is_file():
            return json.loads(report.read_text()), ""
        return None, (proc.stderr + proc.stdout
                      or f"pip exited with {proc.returncode} and said nothing")


def check_platform(plat: Platform, reqs: list[str], constraints: Path,
                   python_version: str = PYTHON_VERSION, index_url: str = DEFAULT_INDEX
                   ) -> Result:
    start = time.monotonic()
    env = marker_environment(plat, python_version)
    roots = target_requirements(reqs, env)
    result = _check(plat, roots, constraints, python_version, index_url, env)
    result.seconds = time.monotonic() - start
    return result


def _check(plat: Platform, roots: list[str], constraints: Path, python_version: str,
           index_url: str, env: dict[str, str]) -> Result:
    _, _, utils = _packaging()
    extra: dict[str, str] = {}  # target-only requirements pip skipped on this machine
    for _ in range(5):
        report, err = resolve(plat, roots + sorted(extra.values()), constraints,
                              python_version, index_url)
        if report is None:
            return _diagnose(plat, roots + sorted(extra.values()), constraints, python_version,
                             index_url, err)
        needed, absent = target_closure(roots + sorted(extra.values()), report, env)
        if not absent.keys() - extra.keys():
            wheels = {utils.canonicalize_name(i["metadata"]["name"]):
                      i["download_info"]["url"].rsplit("/", 1)[-1] for i in report["install"]}
            return Result(plat, ok=True, wheels={n: w for n, w in sorted(wheels.items())
                                                 if n in needed})
        extra.update(absent)
    return Result(plat, ok=False, error="the target-only requirements did not settle in five "
                                        f"resolutions: {sorted(extra)}")


def _diagnose(plat: Platform, roots: list[str], constraints: Path, python_version: str,
              index_url: str, err: str) -> Result:
    """The whole set failed: resolves each top-level requirement alone (side by side) to name
    every package with no wheel and the requirement that pulls it in, not just pip's first."""
    if any(s in err for s in _UNREACHABLE):
        raise CheckError(f"{plat.name}: the index {index_url} could not be reached:\n"
                         + _tail(err))
    if not missing_from_pip_error(err):
        return Result(plat, ok=False, error="pip could not resolve the set (not for want of a "
                                            "wheel):\n" + _tail(err))
    with ThreadPoolExecutor(max_workers=4) as pool:
        alone = list(pool.map(lambda r: resolve(plat, [r], constraints, python_version,
                                                index_url), roots))
    missing: dict[str, set[str]] = {}
    for root, (_, root_err) in zip(roots, alone, strict=True):
        for name in missing_from_pip_error(root_err):
            missing.setdefault(name, set()).add(root)
    if not missing:  # only the combination fails; name what pip named
        missing = {name: {"the combined set"} for name in missing_from_pip_error(err)}
    return Result(plat, ok=False, missing=missing)


def _tail(text: str, lines: int = 12) -> str:
    return "\n".join("    " + line for line in text.strip().splitlines()[-lines:])


def report_line(r: Result) -> str:
    head = f"  {r.platform.name:<13} "
    if r.ok:
        floor = r.platform.os_floor(r.wheels.values())
        return (f"{head}ok       {len(r.wheels)} packages, all wheels"
                + (f", need {floor}" if floor else "") + f" ({r.seconds:.0f} s)")
    if r.error:
        return f"{head}FAILED   {r.error}"
    misses = "; ".join(f"{name} (needed by {', '.join(sorted(by))})"
                       for name, by in sorted(r.missing.items()))
    return (f"{head}MISSING  no {r.platform.name} wheel for CPython {PYTHON_VERSION}: {misses}"
            f" ({r.seconds:.0f} s)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--platform", action="append", choices=sorted(PLATFORMS),
                    help="check only this platform (repeatable; default: all)")
    ap.add_argument("--pyproject", type=Path, default=ROOT / "pyproject.toml")
    ap.add_argument("--constraints", type=Path, default=ROOT / "constraints.txt")
    ap.add_argument("--index-url", default=DEFAULT_INDEX)
    ap.add_argument("-v", "--verbose", action="store_true", help="name each wheel chosen")
    args = ap.parse_args(argv)
    plats = [PLATFORMS[n] for n in (args.platform or PLATFORMS)]
    try:
        reqs = runtime_requirements(args.pyproject)
        print(f"wheels of {len(reqs)} runtime dependencies and what they pull in, CPython "
              f"{PYTHON_VERSION}, {args.constraints.name} applied "
              f"(pip install --dry-run --only-binary :all:, {args.index_url}):", flush=True)
        with ThreadPoolExecutor(max_workers=len(plats)) as pool:
            results = list(pool.map(lambda p: check_platform(
                p, reqs, args.constraints, PYTHON_VERSION, args.index_url), plats))
    except CheckError as e:
        print(f"check_wheels: {e}", file=sys.stderr)
        return 2
    for r in results:
        print(report_line(r))
        if args.verbose:
            for name, wheel in r.wheels.items():
                print(f"      {name:<28} {wheel}")
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
