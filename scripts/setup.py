"""Creates (or reuses) the virtual environment and installs ovms-plugin into it.

    python3.11 scripts/setup.py [EXTRAS]    EXTRAS: comma list of convert,test (default: none)

Prints the environment's interpreter last on stdout; everything else goes to stderr. It runs
on Linux, macOS and Windows with the standard library only: scripts/setup.sh and
scripts/setup.ps1 just find a Python 3.11 and run it.

The environment lives outside the checkout, keyed by the dependency files, so a fresh clone
(CI) reuses it: KEY is the first 16 hex digits of the sha256 of pyproject.toml, then
constraints.txt, then EXTRAS and a newline, then what `python --version` prints (the formula
setup.sh used, so environments made by it are found again). The folder is the user's cache
folder, as the plugin's own cache (ovms_plugin.paths.cache_dir) uses it:
    Linux    $XDG_CACHE_HOME/ovms-plugin/venvs/KEY, or ~/.cache/ovms-plugin/venvs/KEY
    macOS    ~/Library/Caches/ovms-plugin/venvs/KEY
    Windows  %LOCALAPPDATA%\\ovms-plugin\\venvs\\KEY
OVMS_PLUGIN_VENV names another folder (it is emptied and rebuilt unless it is a finished
environment). The Python that runs this script is the one the environment is made from.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV_ENV = "OVMS_PLUGIN_VENV"
COMPLETE = ".complete"  # written last: only a finished environment has it
REQUIRED_PYTHON = (3, 11)  # pyproject.toml: requires-python = ">=3.11,<3.12"
_EXTRAS = re.compile(r"^[A-Za-z0-9_-]+(,[A-Za-z0-9_-]+)*$")


class SetupError(Exception):
    pass


def version_output(python: str) -> bytes:
    """What `python --version` prints, byte for byte (part of the key)."""
    if python == sys.executable:  # CPython prints "Python " and the first word of sys.version
        return f"Python {sys.version.split()[0]}\n".encode()
    proc = subprocess.run([python, "--version"], stdout=subprocess.PIPE, check=True)
    return proc.stdout


def venv_key(root: Path, extras: str, python_version: bytes) -> str:
    digest = hashlib.sha256()
    digest.update((root / "pyproject.toml").read_bytes())
    digest.update((root / "constraints.txt").read_bytes())
    digest.update(extras.encode() + b"\n")
    digest.update(python_version)
    return digest.hexdigest()[:16]


def cache_base(platform: str, environ: Mapping[str, str], home: Path) -> Path:
    if platform == "win32":
        return Path(environ.get("LOCALAPPDATA") or home / "AppData" / "Local")
    if platform == "darwin":
        return home / "Library" / "Caches"
    return Path(environ.get("XDG_CACHE_HOME") or home / ".cache")


def venv_dir(key: str, platform: str = sys.platform, environ: Mapping[str, str] = os.environ,
             home: Path | None = None) -> Path:
    if environ.get(VENV_ENV):
        return Path(environ[VENV_ENV])
    base = cache_base(platform, environ, Path.home() if home is None else home)
    return base / "ovms-plugin" / "venvs" / key


def venv_python(venv: Path, platform: str = sys.platform) -> Path:
    if platform == "win32":
        return venv / "Scripts" / "python.exe"
    return venv / "bin" / "python"


def _run(cmd: Sequence[str | Path], check: bool = True) -> int:
    """Runs a step with its output on stderr (stdout carries only the interpreter's path)."""
    proc = subprocess.run([str(c) for c in cmd], cwd=ROOT, stdout=sys.stderr.fileno())
    if check and proc.returncode != 0:
        raise SetupError(f"failed (exit {proc.returncode}): {' '.join(str(c) for c in cmd)}")
    return proc.returncode


def build(venv: Path, python: str, extras: str) -> None:
    print(f"setting up {venv} (extras: {extras or 'none'})", file=sys.stderr, flush=True)
    if venv.exists():
        shutil.rmtree(venv)
    _run([python, "-m", "venv", venv])
    pip = [venv_python(venv), "-m", "pip"]
    _run([*pip, "install", "-q", "--upgrade", "pip", "setuptools", "wheel"])
    # The constraints keep the CPU torch (see constraints.txt) and the OpenVINO release together.
    _run([*pip, "install", "-q", "-c", "constraints.txt", f".[{extras}]" if extras else "."])
    # optimum-intel drags in a CUDA torchvision that cannot import on CPU torch, and nothing
    # we run needs it.
    _run([*pip, "uninstall", "-q", "-y", "torchvision"], check=False)
    (venv / COMPLETE).touch()


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Holds an exclusive lock on `path` (created), so that two setups of one environment at
    once (two terminals, two engineers) do not build over each other. The package's own
    locks cannot be used here: it is not installed yet."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        if sys.platform == "win32":
            import msvcrt

            while True:
                try:
                    msvcrt.locking(f.fileno(), msvcrt.LK_LOCK, 1)
                    break
                except OSError:  # LK_LOCK gives up after ten tries a second apart
                    continue
            try:
                yield
            finally:
                f.seek(0)
                msvcrt.locking(f.fileno(), msvcrt.LK_UNLCK, 1)
        else:
            import fcntl

            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            yield  # closing the file releases the lock


def setup(extras: str = "", python: str = sys.executable) -> Path:
    """Makes sure the environment for `extras` exists; returns its interpreter."""
    if extras and not _EXTRAS.match(extras):
        raise SetupError(f"extras must be a comma list of names such as convert,test; "
                         f"got {extras!r}")
    version = version_output(python)
    key = venv_key(ROOT, extras, version)
    venv = venv_dir(key)
    with _locked(venv.parent / f".{venv.name}.lock"):
        if not (venv / COMPLETE).is_file():
            build(venv, python, extras)
        # Point the environment at this checkout (cheap; the dependencies are already there).
        _run([venv_python(venv), "-m", "pip", "install", "-q", "--no-deps",
              "--no-build-isolation", "-e", "."])
    return venv_python(venv)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) > 1 or (args and args[0] in ("-h", "--help")):
        print(__doc__.strip().split("\n\n")[1], file=sys.stderr)
        return 0 if args and args[0] in ("-h", "--help") else 2
    if sys.version_info[:2] != REQUIRED_PYTHON:
        want = ".".join(map(str, REQUIRED_PYTHON))
        print(f"setup: ovms-plugin needs Python {want} and this is {sys.version.split()[0]} "
              f"({sys.executable}); run it with Python {want} (Windows: py -{want}; or set "
              "PYTHON for setup.sh and setup.ps1)", file=sys.stderr)
        return 2
    try:
        python = setup(args[0] if args else "")
    except (SetupError, OSError, subprocess.CalledProcessError) as e:
        print(f"setup: {e}", file=sys.stderr)
        return 1
    print(python, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
