"""A Hugging Face Hub look-alike on loopback, for tests that run the real `huggingface_hub` client
(1.21.0) without internet.

    with HubServer() as hub:
        sha = hub.add_repo("org/tiny", folder)           # served at "main" and at `sha`
        hub.drop_after("model.bin", 1 << 20)             # next GET of model.bin dies after 1 MiB
        snapshot_download("org/tiny", cache_dir=tmp, endpoint=hub.endpoint)
        hub.requests, hub.bytes_sent["model.bin"]        # what the client asked for / received

Pointing the client at the server
---------------------------------
`huggingface_hub` reads `HF_ENDPOINT` (and `HF_HUB_CACHE`, `HF_HUB_OFFLINE`,
`HF_HUB_DISABLE_TELEMETRY`, ...) once, when `huggingface_hub.constants` is imported, so setting
the variable inside an already running test process changes nothing. What works:

* pass `endpoint=hub.endpoint` to `HfApi(...)`, `hf_hub_download(...)`, `snapshot_download(...)`
  (all three accept it and use it for every request they make) and `cache_dir=` for the cache;
* or call `hub.patch_client(monkeypatch)`: it patches `constants.ENDPOINT`,
  `constants.HUGGINGFACE_CO_URL_TEMPLATE` and the endpoint of the module-level `HfApi` instance
  behind `huggingface_hub.model_info` & co. (that instance is built at import time, so patching
  the constants alone does not redirect `huggingface_hub.model_info(...)`);
* or run the client in a child process with `hub.client_env()` in its environment
  (`HF_ENDPOINT` is then read at import, as in production).

`HF_TOKEN` is different: it is read at every call, so `monkeypatch.setenv("HF_TOKEN", ...)` works.

What is served (what the client really calls)
---------------------------------------------
* `GET /api/models/{repo}` and `GET /api/models/{repo}/revision/{rev}` (`?blobs=true` adds
  `size`, `blobId` and, for LFS files, `lfs: {sha256, size, pointerSize}` to each sibling).
  `snapshot_download` starts with the `revision/{rev}` form, then downloads every sibling with
  `hf_hub_download(revision=<sha>)`.
* `GET /api/models/{repo}/tree/{rev}[/{path}]?recursive=` (`list_repo_tree`, `list_repo_files`,
  `verify_repo_checksums`) and `POST /api/models/{repo}/paths-info/{rev}` (`get_paths_info`,
  form fields `paths`). Entries are `{type, oid, size, path[, lfs: {oid, size, pointerSize}]}`.
* `HEAD`/`GET /{repo}/resolve/{rev}/{path}`: `X-Repo-Commit`, `ETag` (quoted), `Content-Length`,
  `Accept-Ranges`. Files of at least `lfs_threshold` bytes (1 MiB by default) are "LFS" files:
  their etag is the sha256 of the content, sent as `X-Linked-Etag` with `X-Linked-Size`; with
  `lfs_redirect=True` (default, as the Hub does) they answer 302 to `/_lfs/{key}/{name}` on this
  same server, which the client downloads from (so the `Authorization` header is kept: same host).
  Smaller files have the git blob sha1 of their content as etag. The client names cache blobs
  after the etag and checks only the size, never the hash.
* `Range: bytes=N-`, `bytes=N-M`, `bytes=-N` get 206 + `Content-Range`; unsatisfiable: 416.
* Errors carry `X-Error-Code`/`X-Error-Message` and a JSON `{"error": ...}` body: unknown repo
  -> 404 `RepoNotFound`, unknown revision -> 404 `RevisionNotFound`, unknown file -> 404
  `EntryNotFound` (with `X-Repo-Commit`), file of a gated repo without `Authorization` -> 403
  `GatedRepo` (any bearer token unlocks it; the repo's metadata stays public, as on the Hub).
  The client maps them to `RepositoryNotFoundError`, `RevisionNotFoundError`,
  `RemoteEntryNotFoundError` (an `EntryNotFoundError`) and `GatedRepoError`.

Fault injection is armed per repo-relative file path (in every repo unless `repo_id=` is given)
and consumed when it fires; `clear_faults()` disarms everything. Counters: `requests`
(method, unquoted path with query, Range header), `request_log` (also `Authorization` and
status), `bytes_sent` (body bytes per file path, all repos and requests together).

Files are read into memory by `add_repo`: changing the folder afterwards changes nothing until
`add_repo` is called again, which publishes a new commit on "main" (older commits stay served).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import socket
import socketserver
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

LFS_THRESHOLD = 1024 * 1024
_LAST_MODIFIED = "2024-01-01T00:00:00.000Z"
_DISCONNECTS = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, TimeoutError)
_CORRUPT_TABLE = bytes(255 - i for i in range(256))
_CHUNK = 64 * 1024


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass(frozen=True)
class HubFile:
    """One file of one commit, with the hashes the Hub would report."""

    path: str
    data: bytes = field(repr=False)
    sha256: str
    is_lfs: bool

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def pointer(self) -> bytes:
        """The git-lfs pointer file (what git stores for an LFS file)."""
        return (f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\n"
                f"size {self.size}\n").encode()

    @property
    def blob_id(self) -> str:
        """Git object id: of the pointer for LFS files, of the content otherwise."""
        return _git_blob_sha1(self.pointer if self.is_lfs else self.data)

    @property
    def etag(self) -> str:
        """Unquoted etag; the client names the cached blob after it."""
        return self.sha256 if self.is_lfs else self.blob_id


@dataclass
class _Repo:
    repo_id: str
    gated: bool = False
    refs: dict[str, str] = field(default_factory=dict)
    commits: dict[str, dict[str, HubFile]] = field(default_factory=dict)

    def resolve(self, revision: str) -> str | None:
        if revision in self.refs:
            return self.refs[revision]
        return revision if revision in self.commits else None


@dataclass
class RequestRecord:
    method: str
    path: str
    range: str | None
    authorization: str | None
    status: int | None = None


@dataclass
class _Fault:
    times: int
    repo_id: str | None
    value: Any = None
    method: str | None = None


class _HttpError(Exception):
    def __init__(self, status: int, code: str | None, message: str,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = headers or {}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    hub: HubServer

    def server_bind(self) -> None:
        # HTTPServer.server_bind would call socket.getfqdn(), which can stall without DNS.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys
        if not isinstance(sys.exc_info()[1], _DISCONNECTS):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "HubServer/1.0"
    timeout = 60
    server: _Server
    _record: RequestRecord | None = None

    def setup(self) -> None:
        super().setup()
        with self.server.hub._lock:
            self.server.hub._connections.add(self.connection)

    def finish(self) -> None:
        with self.server.hub._lock:
            self.server.hub._connections.discard(self.connection)
        super().finish()

    def handle(self) -> None:
        try:
            super().handle()
        except _DISCONNECTS:
            self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def send_response(self, code: int, message: str | None = None) -> None:
        if self._record is not None:
            self._record.status = code
        super().send_response(code, message)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        hub = self.server.hub
        self._record = RequestRecord(method, unquote(self.path), self.headers.get("Range"),
                                     self.headers.get("Authorization"))
        hub._log(self._record)
        try:
            body = b""
            if method == "POST":
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            hub._route(self, method, body)
        except _HttpError as err:
            self._send_error(method, err)
        except _DISCONNECTS:
            self.close_connection = True

    # -- response helpers ---------------------------------------------------------------------

    def _send_error(self, method: str, err: _HttpError) -> None:
        body = json.dumps({"error": err.message}).encode()
        self.send_response(err.status)
        if err.code:
            self.send_header("X-Error-Code", err.code)
        self.send_header("X-Error-Message", err.message)
        for name, value in err.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(body)

    def _send_json(self, method: str, payload: Any) -> None:
        body = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(body)


class HubServer:
    """Hub-compatible HTTP server on 127.0.0.1 (ephemeral port), in a daemon thread."""

    def __init__(self, *, lfs_threshold: int = LFS_THRESHOLD, lfs_redirect: bool = True) -> None:
        self.lfs_threshold = lfs_threshold
        self.lfs_redirect = lfs_redirect
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._repos: dict[str, _Repo] = {}
        self._cdn: dict[str, tuple[str, str, str]] = {}
        self._faults: dict[str, dict[str, list[_Fault]]] = {
            "drop": {}, "corrupt": {}, "throttle": {}, "fail": {}, "fail_api": {}}
        self._log_records: list[RequestRecord] = []
        self._bytes_sent: dict[str, int] = {}
        self._connections: set[socket.socket] = set()
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.hub = self
        self._thread: threading.Thread | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> HubServer:
        if self._thread is None:
            self._thread = threading.Thread(target=self._httpd.serve_forever,
                                            kwargs={"poll_interval": 0.05},
                                            name=f"HubServer:{self.port}", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(timeout=10)
            self._thread = None
        self._httpd.server_close()
        with self._lock:  # wake handler threads parked on idle keep-alive connections
            connections = list(self._connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def client_env(self) -> dict[str, str]:
        """Environment for a child process running the client against this server."""
        return {"HF_ENDPOINT": self.endpoint, "HF_HUB_DISABLE_TELEMETRY": "1",
                "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}

    def patch_client(self, monkeypatch: Any) -> None:
        """Make the already-imported client default to this server (see module docstring)."""
        from huggingface_hub import constants, hf_api

        monkeypatch.setattr(constants, "ENDPOINT", self.endpoint)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                            self.endpoint + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(hf_api.api, "endpoint", self.endpoint)

    # -- content ------------------------------------------------------------------------------

    def add_repo(self, repo_id: str, folder: Path, revision_sha: str | None = None,
                 gated: bool = False, *, branch: str = "main",
                 extra_files: dict[str, bytes] | None = None) -> str:
        """Publish every file below `folder` as a commit of `repo_id`, pointed to by `branch`.
        Returns the commit sha (sha1 of the sorted paths and sha256s unless given).
        `extra_files` adds files by name as given, names no folder can hold included (a
        hostile mirror's `x/../../outside.txt`)."""
        folder = Path(folder)
        files: dict[str, HubFile] = {}
        items = [(p.relative_to(folder).as_posix(), p.read_bytes())
                 for p in sorted(folder.rglob("*")) if p.is_file()]
        for rel, data in [*items, *(extra_files or {}).items()]:
            files[rel] = HubFile(rel, data, hashlib.sha256(data).hexdigest(),
                                 len(data) >= self.lfs_threshold)
        if revision_sha is None:
            listing = "".join(f"{p}\0{f.sha256}\n" for p, f in sorted(files.items()))
            revision_sha = hashlib.sha1(f"{repo_id}\n{listing}".encode()).hexdigest()
        revision_sha = revision_sha.lower()
        with self._lock:
            repo = self._repos.setdefault(repo_id, _Repo(repo_id))
            repo.gated = gated
            repo.commits[revision_sha] = files
            repo.refs[branch] = revision_sha
        return revision_sha

    def file_info(self, repo_id: str, path: str, revision: str = "main") -> HubFile:
        repo = self._repos[repo_id]
        sha = repo.resolve(revision)
        assert sha is not None, revision
        return repo.commits[sha][path]

    # -- fault injection ----------------------------------------------------------------------

    def _arm(self, kind: str, path: str, fault: _Fault) -> None:
        with self._lock:
            self._faults[kind].setdefault(path, []).append(fault)

    def _take(self, kind: str, repo_id: str, path: str, method: str) -> _Fault | None:
        with self._lock:
            for fault in self._faults[kind].get(path, []):
                if (fault.times > 0 and fault.repo_id in (None, repo_id)
                        and fault.method in (None, method)):
                    fault.times -= 1
                    return fault
        return None

    def drop_after(self, path: str, nbytes: int, times: int = 1, *,
                   repo_id: str | None = None) -> None:
        """The next `times` GETs of `path` close the connection after `nbytes` body bytes
        (counted from the start of that response's body, whatever its Range)."""
        self._arm("drop", path, _Fault(times, repo_id, nbytes))

    def corrupt(self, path: str, times: int = 1, *, repo_id: str | None = None) -> None:
        """The next `times` GETs of `path` send the right number of bytes, every one inverted."""
        self._arm("corrupt", path, _Fault(times, repo_id))

    def throttle(self, path: str, bytes_per_sec: int, times: int = 1, *,
                 repo_id: str | None = None) -> None:
        """The next `times` GETs of `path` send the body at about `bytes_per_sec`."""
        self._arm("throttle", path, _Fault(times, repo_id, bytes_per_sec))

    def fail(self, path: str, status: int, times: int = 1, *, method: str | None = None,
             repo_id: str | None = None) -> None:
        """The next `times` requests for `path` (HEAD or GET, or only `method`) get `status`
        with a JSON error body and no X-Error-Code."""
        self._arm("fail", path, _Fault(times, repo_id, status, method))

    def fail_api(self, status: int, times: int = 1, *, retry_after: int | None = None,
                 repo_id: str | None = None) -> None:
        """The next `times` API requests (/api/models/...) get `status`, with a Retry-After
        header when given (a rate limit or an overloaded Hub)."""
        self._arm("fail_api", "", _Fault(times, repo_id, (status, retry_after)))

    def clear_faults(self) -> None:
        with self._lock:
            for armed in self._faults.values():
                armed.clear()

    # -- counters -----------------------------------------------------------------------------

    @property
    def requests(self) -> list[tuple[str, str, str | None]]:
        """(method, unquoted path with query, Range header) of every request so far."""
        with self._lock:
            return [(r.method, r.path, r.range) for r in self._log_records]

    @property
    def request_log(self) -> list[RequestRecord]:
        with self._lock:
            return list(self._log_records)

    @property
    def bytes_sent(self) -> dict[str, int]:
        """Body bytes written per repo-relative file path (partial and corrupt ones included)."""
        with self._lock:
            return dict(self._bytes_sent)

    def reset_counters(self) -> None:
        with self._lock:
            self._log_records.clear()
            self._bytes_sent.clear()

    def _log(self, record: RequestRecord) -> None:
        with self._lock:
            self._log_records.append(record)

    def _count(self, path: str, n: int) -> None:
        with self._lock:
            self._bytes_sent[path] = self._bytes_sent.get(path, 0) + n

    # -- routing ------------------------------------------------------------------------------

    def _route(self, h: _Handler, method: str, body: bytes) -> None:
        url = urlsplit(h.path)
        segs = [unquote(s) for s in url.path.split("/")[1:]]
        query = parse_qs(url.query)
        if len(segs) >= 3 and segs[:2] == ["api", "models"]:
            self._api(h, method, segs[2:], query, body)
        elif len(segs) >= 2 and segs[0] == "_lfs" and method in ("GET", "HEAD"):
            with self._lock:
                target = self._cdn.get(segs[1])
            if target is None:
                raise _HttpError(404, None, "No such object.")
            repo_id, sha, path = target
            hub_file = self._repos[repo_id].commits[sha][path]
            self._serve_file(h, method, repo_id, sha, hub_file, redirect=False)
        elif method in ("GET", "HEAD") and "resolve" in segs[1:3]:
            idx = segs.index("resolve", 1)
            if len(segs) < idx + 3:
                raise _HttpError(404, None, "Invalid resolve URL.")
            self._resolve(h, method, "/".join(segs[:idx]), segs[idx + 1],
                          "/".join(segs[idx + 2:]))
        else:
            raise _HttpError(404, None, f"Not found: {method} {url.path}")

    def _repo(self, repo_id: str) -> _Repo:
        with self._lock:
            repo = self._repos.get(repo_id)
        if repo is None:
            raise _HttpError(404, "RepoNotFound", "Repository not found")
        return repo

    def _commit(self, repo: _Repo, revision: str) -> tuple[str, dict[str, HubFile]]:
        sha = repo.resolve(revision)
        if sha is None:
            raise _HttpError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return sha, repo.commits[sha]

    def _api(self, h: _Handler, method: str, rest: list[str], query: dict[str, list[str]],
             body: bytes) -> None:
        repo_id, tail = "/".join(rest[:2]), rest[2:]
        with self._lock:
            if repo_id not in self._repos and rest[0] in self._repos:
                repo_id, tail = rest[0], rest[1:]
        failure = self._take("fail_api", repo_id, "", method)
        if failure is not None:
            status, wait = failure.value
            raise _HttpError(status, None, f"Injected API failure ({status})",
                             {"Retry-After": str(wait)} if wait is not None else None)
        repo = self._repo(repo_id)
        if method in ("GET", "HEAD") and (not tail or (tail[0] == "revision" and len(tail) > 1)):
            sha, files = self._commit(repo, "/".join(tail[1:]) or "main")
            blobs = query.get("blobs", ["false"])[-1].lower() in ("1", "true")
            h._send_json(method, self._model_info(repo, sha, files, blobs))
        elif method in ("GET", "HEAD") and tail and tail[0] == "tree":
            sha, files = self._commit(repo, tail[1] if len(tail) > 1 else "main")
            recursive = query.get("recursive", ["false"])[-1].lower() in ("1", "true")
            h._send_json(method, self._tree(sha, files, "/".join(tail[2:]), recursive))
        elif method == "POST" and len(tail) == 2 and tail[0] == "paths-info":
            sha, files = self._commit(repo, tail[1])
            wanted = parse_qs(body.decode()).get("paths", [])
            entries = {e["path"]: e for e in self._tree(sha, files, "", recursive=True)}
            h._send_json(method, [entries[p.strip("/")] for p in wanted
                                  if p.strip("/") in entries])
        else:
            raise _HttpError(404, None, f"Not found: {method} /api/models/{'/'.join(rest)}")

    @staticmethod
    def _model_info(repo: _Repo, sha: str, files: dict[str, HubFile], blobs: bool) -> dict:
        siblings = []
        for path, hub_file in files.items():
            sibling: dict[str, Any] = {"rfilename": path}
            if blobs:
                sibling.update(size=hub_file.size, blobId=hub_file.blob_id)
                if hub_file.is_lfs:
                    sibling["lfs"] = {"sha256": hub_file.sha256, "size": hub_file.size,
                                      "pointerSize": len(hub_file.pointer)}
            siblings.append(sibling)
        author = repo.repo_id.split("/")[0] if "/" in repo.repo_id else None
        return {"id": repo.repo_id, "modelId": repo.repo_id, "author": author, "sha": sha,
                "lastModified": _LAST_MODIFIED, "createdAt": _LAST_MODIFIED, "private": False,
                "gated": "manual" if repo.gated else False, "disabled": False, "downloads": 0,
                "likes": 0, "tags": [], "siblings": siblings,
                "usedStorage": sum(f.size for f in files.values())}

    @staticmethod
    def _tree(sha: str, files: dict[str, HubFile], under: str, recursive: bool) -> list[dict]:
        under = under.strip("/")
        prefix = f"{under}/" if under else ""
        if under and under not in files and not any(p.startswith(prefix) for p in files):
            raise _HttpError(404, "EntryNotFound", f"{under} does not exist on {sha}",
                             {"X-Repo-Commit": sha})
        if under in files:  # the Hub lists a file path as itself
            candidates = {under: files[under]}
        else:
            candidates = {p: f for p, f in files.items() if p.startswith(prefix)}
        entries: dict[str, dict] = {}
        for path, hub_file in candidates.items():
            parts = path[len(prefix):].split("/") if path != under else [path]
            for depth in range(1, len(parts)):
                folder = prefix + "/".join(parts[:depth])
                if (recursive or depth == 1) and folder not in entries:
                    oid = hashlib.sha1(f"tree {sha} {folder}".encode()).hexdigest()
                    entries[folder] = {"type": "directory", "oid": oid, "size": 0,
                                       "path": folder}
            if recursive or len(parts) == 1:
                entry: dict[str, Any] = {"type": "file", "oid": hub_file.blob_id,
                                         "size": hub_file.size, "path": path}
                if hub_file.is_lfs:
                    entry["lfs"] = {"oid": hub_file.sha256, "size": hub_file.size,
                                    "pointerSize": len(hub_file.pointer)}
                entries[path] = entry
        return [entries[p] for p in sorted(entries)]

    def _resolve(self, h: _Handler, method: str, repo_id: str, revision: str, path: str) -> None:
        repo = self._repo(repo_id)
        if repo.gated and not h.headers.get("Authorization"):
            raise _HttpError(403, "GatedRepo", f"Access to model {repo_id} is restricted. "
                             "You must have access to it and be authenticated to access it.")
        sha, files = self._commit(repo, revision)
        hub_file = files.get(path)
        if hub_file is None:
            raise _HttpError(404, "EntryNotFound", "Entry not found", {"X-Repo-Commit": sha})
        self._serve_file(h, method, repo_id, sha, hub_file, redirect=self.lfs_redirect)

    def _serve_file(self, h: _Handler, method: str, repo_id: str, sha: str, hub_file: HubFile,
                    *, redirect: bool) -> None:
        failure = self._take("fail", repo_id, hub_file.path, method)
        if failure is not None:
            raise _HttpError(int(failure.value), None, f"Injected failure ({failure.value})")
        size = hub_file.size
        common = {"X-Repo-Commit": sha, "ETag": f'"{hub_file.etag}"', "Accept-Ranges": "bytes"}
        if hub_file.is_lfs:
            common.update({"X-Linked-Etag": f'"{hub_file.sha256}"', "X-Linked-Size": str(size)})
        if redirect and hub_file.is_lfs:
            key = hashlib.sha1(f"{repo_id}\0{sha}\0{hub_file.path}".encode()).hexdigest()
            with self._lock:
                self._cdn[key] = (repo_id, sha, hub_file.path)
            name = quote(hub_file.path.rsplit("/", 1)[-1])
            location = f"{self.endpoint}/_lfs/{key}/{name}"
            note = f"Found. Redirecting to {location}".encode()
            h.send_response(302)
            for name_, value in common.items():
                h.send_header(name_, value)
            h.send_header("Location", location)
            h.send_header("Content-Type", "text/plain; charset=utf-8")
            h.send_header("Content-Length", str(len(note)))
            h.end_headers()
            if method != "HEAD":
                h.wfile.write(note)
            return

        start, end = 0, size - 1
        status = 200
        byte_range = _parse_range(h.headers.get("Range"), size)
        if byte_range == "unsatisfiable":
            raise _HttpError(416, None, "Range Not Satisfiable",
                             {"Content-Range": f"bytes */{size}"})
        if isinstance(byte_range, tuple):
            (start, end), status = byte_range, 206
        h.send_response(status)
        for name_, value in common.items():
            h.send_header(name_, value)
        h.send_header("Content-Type", "application/octet-stream")
        h.send_header("Content-Length", str(end - start + 1))
        if status == 206:
            h.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        h.end_headers()
        if method == "HEAD":
            return

        body = hub_file.data[start:end + 1]
        if self._take("corrupt", repo_id, hub_file.path, method) is not None:
            body = body.translate(_CORRUPT_TABLE)
        drop = self._take("drop", repo_id, hub_file.path, method)
        throttle = self._take("throttle", repo_id, hub_file.path, method)
        limit = len(body) if drop is None else min(len(body), int(drop.value))
        rate = None if throttle is None else max(1, int(throttle.value))
        chunk = _CHUNK if rate is None else max(1, min(_CHUNK, rate // 20))
        sent = 0
        try:
            while sent < limit and not self._stopping.is_set():
                piece = body[sent:min(limit, sent + chunk)]
                h.wfile.write(piece)
                sent += len(piece)
                self._count(hub_file.path, len(piece))
                if rate is not None:
                    time.sleep(len(piece) / rate)
        except _DISCONNECTS:
            h.close_connection = True
            return
        if sent < len(body):  # dropped (or stopping): cut the connection mid-body
            h.close_connection = True
            with contextlib.suppress(OSError):
                h.connection.shutdown(socket.SHUT_RDWR)


def _parse_range(header: str | None, size: int) -> tuple[int, int] | str | None:
    """(first, last) byte of a single `bytes=` range, "unsatisfiable", or None (serve all)."""
    if not header or "," in header or not header.strip().lower().startswith("bytes="):
        return None
    first, _, last = header.strip()[6:].partition("-")
    try:
        if not first.strip():
            suffix = int(last)
            if suffix <= 0:
                return "unsatisfiable"
            return max(0, size - suffix), size - 1
        start = int(first)
        end = int(last) if last.strip() else size - 1
    except ValueError:
        return None
    if start >= size or end < start:
        return "unsatisfiable"
    return start, min(end, size - 1)
