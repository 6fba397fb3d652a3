"""Hugging Face Hub access through huggingface_hub (so HF_ENDPOINT mirrors and HF_TOKEN
work): a repo's file list with sizes and hashes, and resumable, verified downloads.

huggingface_hub's own downloader checks only sizes and cannot resume across processes,
so files are fetched here with the client's session, URLs and auth headers: each into
`<name>.part` (resumed with a Range request on the next attempt or pull), then checked
against the Hub's sha256 (LFS files) or git blob id (small files) before being renamed.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import posixpath
import re
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ovms_plugin.store.store import StoreError

log = logging.getLogger(__name__)

CHUNK = 1 << 20
ATTEMPTS = 5


class DownloadCancelled(StoreError):
    pass


class TransferInterrupted(StoreError):
    """The connection kept failing: what arrived is kept, and the next pull resumes."""


@dataclass(frozen=True)
class RemoteFile:
    path: str
    size: int
    sha256: str | None  # LFS files
    blob_id: str | None  # git blob sha1 of small files


@dataclass(frozen=True)
class RemoteRepo:
    repo_id: str
    revision: str
    sha: str
    files: list[RemoteFile]

    def has(self, path: str) -> bool:
        return any(f.path == path for f in self.files)


def endpoint() -> str:
    """HF_ENDPOINT as it is now (huggingface_hub reads it once, at import)."""
    from huggingface_hub import constants
    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def parse_repo(spec: str) -> tuple[str, str]:
    """'org/name@revision' -> (repo id, revision)."""
    repo, _, revision = spec.partition("@")
    return repo, revision or "main"


def repo_info(repo_id: str, revision: str) -> RemoteRepo:
    from huggingface_hub import HfApi
    from huggingface_hub import errors as hf_errors
    ep = endpoint()
    try:
        info = HfApi(endpoint=ep).model_info(repo_id, revision=revision, files_metadata=True)
    except hf_errors.GatedRepoError:
        raise StoreError(f"{repo_id} is gated on {ep}: accept its license on the Hub, then set "
                         "HF_TOKEN to a token of that account") from None
    except hf_errors.RevisionNotFoundError:
        raise StoreError(f"{repo_id} has no revision {revision!r} on {ep}") from None
    except hf_errors.RepositoryNotFoundError:
        raise StoreError(f"no model {repo_id!r} on {ep}: check the name (org/name), or set "
                         "HF_TOKEN for a private repo") from None
    except hf_errors.HfHubHTTPError as e:
        raise StoreError(f"the Hub at {ep} refused the request for {repo_id}: {e}") from None
    except OSError as e:  # httpx's connection errors are OSError subclasses or wrap them
        raise StoreError(f"cannot reach {ep} ({e}); check the network, or set HF_ENDPOINT "
                         "to a reachable mirror") from None
    except Exception as e:
        if type(e).__module__.startswith("httpx"):
            raise StoreError(f"cannot reach {ep} ({e}); check the network, or set "
                             "HF_ENDPOINT to a reachable mirror") from None
        raise
    files = []
    for s in info.siblings or []:
        lfs = s.lfs
        files.append(RemoteFile(path=check_remote_path(s.rfilename, repo_id),
                                size=int(s.size or (lfs.size if lfs else 0)),
                                sha256=lfs.sha256 if lfs else None, blob_id=s.blob_id))
    return RemoteRepo(repo_id, revision, info.sha or revision, files)


_DRIVE = re.compile(r"^[A-Za-z]:")
_MAX_PATH = 1024


def check_remote_path(path: object, repo_id: str) -> str:
    """A file name from the Hub's (or a mirror's) listing, made sure to stay inside the
    folder it is downloaded to: relative, '/'-separated, already normalised, no '..' or '.'
    segments, no drive letter, backslash or control character. A repo that lists anything
    else is refused as a whole, before anything is written."""
    ok = isinstance(path, str) and 0 < len(path) <= _MAX_PATH and not path.startswith("/") \
        and not _DRIVE.match(path) and "\\" not in path \
        and not any(ord(c) < 32 or ord(c) == 127 for c in path) \
        and all(seg not in ("", ".", "..") and len(seg) <= 255 for seg in path.split("/")) \
        and posixpath.normpath(path) == path
    if not ok:
        raise StoreError(f"{repo_id} lists a file name that is not a plain relative path "
                         f"({str(path)[:200]!r}); refusing the whole repo. Check the Hub or "
                         "mirror set in HF_ENDPOINT")
    return path


def git_blob_sha1(path: Path) -> str:
    h = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def verify(path: Path, rf: RemoteFile) -> bool:
    if path.stat().st_size != rf.size:
        return False
    if rf.sha256:
        from ovms_plugin.store.store import sha256_file
        return sha256_file(path) == rf.sha256
    if rf.blob_id:
        return git_blob_sha1(path) == rf.blob_id
    return True


# One download of a file at a time, in this process; fcntl locks add other processes.
_file_locks: dict[str, threading.Lock] = {}
_file_locks_guard = threading.Lock()


def _lock_for(path: Path) -> threading.Lock:
    with _file_locks_guard:
        return _file_locks.setdefault(str(path), threading.Lock())


Progress = Callable[[int], None]


def fetch(repo: RemoteRepo, rf: RemoteFile, dest: Path, on_bytes: Progress,
          cancel: threading.Event) -> None:
    """Downloads one file to `dest` (verified), resuming a `.part` left by an earlier try.
    `on_bytes(completed)` reports progress. Raises StoreError with a clear reason."""
    import fcntl
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _lock_for(dest), open(dest.with_name(dest.name + ".lock"), "a+b") as lockf:
        fcntl.flock(lockf, fcntl.LOCK_EX)
        if dest.is_file() and verify(dest, rf):
            on_bytes(rf.size)
            return
        part = dest.with_name(dest.name + ".part")
        for check in range(2):  # a file failing its hash is fetched once more from scratch
            _fetch_part(repo, rf, part, on_bytes, cancel)
            if verify(part, rf):
                os.replace(part, dest)
                return
            log.warning("%s from %s failed its checksum; fetching it again", rf.path,
                        repo.repo_id)
            part.unlink(missing_ok=True)
            if check:
                raise StoreError(f"{rf.path} of {repo.repo_id} failed its checksum twice "
                                 "(expected sha256 "
                                 f"{rf.sha256 or rf.blob_id}); the mirror may be serving a "
                                 "corrupted file")


def _fetch_part(repo: RemoteRepo, rf: RemoteFile, part: Path, on_bytes: Progress,
                cancel: threading.Event) -> None:
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status
    url = hf_hub_url(repo.repo_id, rf.path, revision=repo.sha, endpoint=endpoint())
    last_error: Exception | None = None
    for attempt in range(ATTEMPTS):
        have = part.stat().st_size if part.exists() else 0
        if have > rf.size:  # a stale part of another version: start over
            part.unlink()
            have = 0
        if have == rf.size:
            return
        headers = build_hf_headers()
        if have:
            headers["Range"] = f"bytes={have}-"
        try:
            with get_session().stream("GET", url, headers=headers, follow_redirects=True,
                                      timeout=30) as resp:
                hf_raise_for_status(resp)
                mode = "ab" if resp.status_code == 206 else "wb"
                done = have if mode == "ab" else 0
                with open(part, mode) as out:
                    for chunk in resp.iter_bytes():  # as it arrives: a drop loses nothing
                        if cancel.is_set():
                            raise DownloadCancelled(f"download of {rf.path} was cancelled")
                        out.write(chunk)
                        done += len(chunk)
                        on_bytes(done)
            if part.stat().st_size >= rf.size:
                return
            last_error = StoreError("the connection closed before the end of the file")
        except DownloadCancelled:
            raise
        except OSError as e:
            if e.errno == errno.ENOSPC:
                free = shutil.disk_usage(part.parent).free
                part.unlink(missing_ok=True)
                raise StoreError(f"disk full while downloading {rf.path} ({rf.size} bytes; "
                                 f"{free} bytes free in {part.parent}); free some space and "
                                 "pull again") from None
            last_error = e
        except Exception as e:  # httpx transport errors, HTTP errors from the mirror
            status = getattr(getattr(e, "response", None), "status_code", None)
            if status is not None and status < 500 and status != 429:
                raise StoreError(f"the Hub refused {rf.path} of {repo.repo_id}: {e}") from None
            last_error = e  # a dropped connection or a server error: worth another try
        log.info("download of %s interrupted (%s); resuming (attempt %d/%d)", rf.path,
                 last_error, attempt + 2, ATTEMPTS)
        time.sleep(min(2**attempt * 0.2, 2.0))
    raise TransferInterrupted(f"downloading {rf.path} of {repo.repo_id} failed after {ATTEMPTS} "
                     f"attempts: {last_error}; pull again to resume where it stopped")
