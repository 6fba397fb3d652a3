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
from typing import Any

from ovms_plugin.osutil import windows_name_problem
from ovms_plugin.store.store import StoreError

log = logging.getLogger(__name__)

CHUNK = 1 << 20
ATTEMPTS = 5
_sleep = time.sleep  # the waits between tries (tests replace it)


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
        info = _with_retries(lambda: HfApi(endpoint=ep).model_info(
            repo_id, revision=revision, files_metadata=True), repo_id)
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


def _with_retries(call: Callable[[], Any], repo_id: str) -> Any:
    """An API call, tried again after a rate limit (429) or a server error (5xx), waiting
    as the server asks (Retry-After) or backing off; other errors go up at once."""
    from huggingface_hub import errors as hf_errors
    for attempt in range(1, ATTEMPTS + 1):
        try:
            return call()
        except hf_errors.HfHubHTTPError as e:
            response = getattr(e, "response", None)
            status = getattr(response, "status_code", None)
            if attempt == ATTEMPTS or status is None or not (status == 429 or status >= 500):
                raise
            wait = max(retry_after(response.headers), min(2**attempt * 0.2, 2.0))
            log.info("the Hub answered HTTP %d for %s; trying again in %.1f s (attempt %d "
                     "of %d)", status, repo_id, wait, attempt + 1, ATTEMPTS)
            _sleep(wait)
    raise AssertionError("unreachable")


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
    for seg in path.split("/"):  # Windows' rules on every system: the store may meet it
        if (why := windows_name_problem(seg)) is not None:
            raise StoreError(f"{repo_id} lists a file name Windows cannot hold: {why[:200]}; "
                             "refusing the whole repo")
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


# One download of a file at a time, in this process; file locks add other processes.
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
    from ovms_plugin.osutil import file_lock
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _lock_for(dest), file_lock(dest.with_name(dest.name + ".lock")):
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


class _Retry(Exception):
    """A failure worth another try, after `wait` seconds at least (a Retry-After)."""

    def __init__(self, why: str, wait: float = 0.0) -> None:
        super().__init__(why)
        self.wait = wait


def retry_after(headers: Any) -> float:
    """Seconds a server asked to wait (Retry-After in seconds), capped at a minute."""
    try:
        return min(max(float(headers.get("Retry-After", 0)), 0.0), 60.0)
    except (TypeError, ValueError):
        return 0.0


def refusal(status: int, what: str, repo_id: str) -> StoreError:
    """The error for an answer that another try will not change."""
    if status in (401, 403):
        return StoreError(f"the Hub refused {what} of {repo_id} (HTTP {status}): the repo is "
                          "private or gated; accept its license on the Hub and set HF_TOKEN to "
                          "a token of that account")
    if status == 404:
        return StoreError(f"{what} is missing from {repo_id} on {endpoint()} (HTTP 404): the "
                          "repo changed during the pull, or the mirror lacks the file; pull "
                          "again, or use another mirror")
    return StoreError(f"the Hub refused {what} of {repo_id} (HTTP {status})")


def download_timeout() -> float:
    """HF_HUB_DOWNLOAD_TIMEOUT (seconds without data before a try is given up), as the
    huggingface_hub client reads it; 30 s when unset."""
    try:
        return max(float(os.environ.get("HF_HUB_DOWNLOAD_TIMEOUT", "30")), 1.0)
    except ValueError:
        return 30.0


def _fetch_part(repo: RemoteRepo, rf: RemoteFile, part: Path, on_bytes: Progress,
                cancel: threading.Event) -> None:
    """Fetches into `part` until it holds the whole file. Tries that brought no byte count
    toward ATTEMPTS; a try that made progress does not (the file still ends, since every
    such try brings it closer)."""
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import build_hf_headers, get_session
    url = hf_hub_url(repo.repo_id, rf.path, revision=repo.sha, endpoint=endpoint())
    failures = 0
    while True:
        have = part.stat().st_size if part.exists() else 0
        if have > rf.size:  # a stale part of another version: start over
            part.unlink()
            have = 0
        if have == rf.size:
            return
        try:
            _get_part(get_session(), url, build_hf_headers(), have, repo, rf, part, on_bytes,
                      cancel)
            if part.stat().st_size >= rf.size:
                return
            why, wait = "the connection closed before the end of the file", 0.0
        except _Retry as e:
            why, wait = str(e), e.wait
        if (part.stat().st_size if part.exists() else 0) > have:
            failures = 0  # progress: this try does not count
        else:
            failures += 1
        if failures >= ATTEMPTS:
            raise TransferInterrupted(
                f"downloading {rf.path} of {repo.repo_id} failed {ATTEMPTS} times in a row "
                f"without progress ({why}); pull again to resume where it stopped")
        log.info("download of %s interrupted (%s); resuming (try %d of %d without progress)",
                 rf.path, why, failures + 1, ATTEMPTS)
        _sleep(max(wait, min(2**failures * 0.2, 2.0)))


def _get_part(session: Any, url: str, headers: dict[str, str], have: int, repo: RemoteRepo,
              rf: RemoteFile, part: Path, on_bytes: Progress, cancel: threading.Event) -> None:
    """One GET from byte `have` on, appended to `part` as it arrives. Raises _Retry for what
    another try may mend, StoreError for what it will not."""
    if have:
        headers = {**headers, "Range": f"bytes={have}-"}
    try:
        with session.stream("GET", url, headers=headers, follow_redirects=True,
                            timeout=download_timeout()) as resp:
            status = resp.status_code
            if status == 416 and have:  # the part is not a prefix of this file
                part.unlink(missing_ok=True)
                raise _Retry("the server refused the resumed range; starting over")
            if status == 429 or status >= 500:
                raise _Retry(f"HTTP {status}", retry_after(resp.headers))
            if status >= 400:
                raise refusal(status, rf.path, repo.repo_id)
            mode = "ab" if status == 206 else "wb"
            done = have if mode == "ab" else 0
            with open(part, mode) as out:
                for chunk in resp.iter_bytes():  # as it arrives: a drop loses nothing
                    if cancel.is_set():
                        raise DownloadCancelled(f"download of {rf.path} was cancelled")
                    out.write(chunk)
                    done += len(chunk)
                    on_bytes(done)
    except (DownloadCancelled, StoreError, _Retry):
        raise
    except OSError as e:
        if e.errno == errno.ENOSPC:
            free = shutil.disk_usage(part.parent).free
            part.unlink(missing_ok=True)
            raise StoreError(f"disk full while downloading {rf.path} ({rf.size} bytes; "
                             f"{free} bytes free where the store is); free some space and "
                             "pull again") from None
        raise _Retry(f"{type(e).__name__}: {e}") from None
    except Exception as e:  # httpx transport errors: a dropped connection, a timeout
        raise _Retry(f"{type(e).__name__}: {e}") from None
