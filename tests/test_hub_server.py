"""The loopback Hub (tests/hub_server.py) against the real huggingface_hub client.

The client reads HF_ENDPOINT at import, so in-process tests pass `endpoint=` explicitly (or use
`HubServer.patch_client`); HF_ENDPOINT in the environment is proven in a child process."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import huggingface_hub
import pytest
from hub_server import HubServer
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

REPO = "org/tiny-model"
BIG = "model.bin"  # 3 MB: an "LFS" file (sha256 etag, served through a 302 to /_lfs/...)
BIG_SIZE = 3_000_000
SMALL_FILES = {
    "config.json": json.dumps({"hidden_size": 8}).encode(),
    "tokenizer.json": json.dumps({"vocab": {f"t{i}": i for i in range(500)}}).encode(),
    "sub/dir/notes.txt": b"nested file\n",
}


def _sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture
def repo_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "repo"
    for rel, data in SMALL_FILES.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    (folder / BIG).write_bytes(random.Random(1234).randbytes(BIG_SIZE))
    return folder


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "hf-cache"


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, cache: Path) -> Iterator[HubServer]:
    with HubServer() as server:
        # Only effective in child processes (the client read these at import); in this process
        # everything below passes endpoint= and cache_dir= explicitly.
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        monkeypatch.setenv("HF_HUB_CACHE", str(cache))
        monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
        # Read at every call: make sure no ambient token leaks into the requests.
        monkeypatch.delenv("HF_TOKEN", raising=False)
        monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
        yield server


@pytest.fixture
def sha(hub: HubServer, repo_dir: Path) -> str:
    return hub.add_repo(REPO, repo_dir)


@pytest.mark.timeout(60)
def test_binds_loopback_only(hub: HubServer) -> None:
    assert hub._httpd.server_address[0] == "127.0.0.1"
    assert hub.endpoint == f"http://127.0.0.1:{hub.port}"


@pytest.mark.timeout(60)
def test_snapshot_download_gives_identical_bytes(hub: HubServer, sha: str, repo_dir: Path,
                                                 cache: Path) -> None:
    folder = Path(snapshot_download(REPO, cache_dir=cache, endpoint=hub.endpoint))

    assert folder == cache / "models--org--tiny-model" / "snapshots" / sha
    served = sorted(p.relative_to(repo_dir).as_posix() for p in repo_dir.rglob("*") if p.is_file())
    got = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert got == served
    for rel in served:
        assert (folder / rel).read_bytes() == (repo_dir / rel).read_bytes(), rel
    assert (cache / "models--org--tiny-model" / "refs" / "main").read_text() == sha

    # What the client asked for: repo info at the branch first, then, per file (in parallel
    # threads, so in any order), HEAD at the commit sha and a GET; the big file's HEAD is
    # redirected and its GET goes to the redirect target.
    reqs = hub.requests
    assert reqs[0] == ("GET", f"/api/models/{REPO}/revision/main", None)
    heads = sorted(p for m, p, _ in reqs if m == "HEAD")
    assert heads == sorted(f"/{REPO}/resolve/{sha}/{rel}" for rel in served)
    gets = [p for m, p, _ in reqs[1:] if m == "GET"]
    assert sorted(gets) == sorted(
        [f"/{REPO}/resolve/{sha}/{rel}" for rel in SMALL_FILES]
        + [next(p for p in gets if p.startswith("/_lfs/") and p.endswith(f"/{BIG}"))])
    assert hub.bytes_sent == {rel: (repo_dir / rel).stat().st_size for rel in served}

    # A second snapshot only asks for the repo info: files are known by commit sha.
    hub.reset_counters()
    assert Path(snapshot_download(REPO, cache_dir=cache, endpoint=hub.endpoint)) == folder
    assert hub.requests == [("GET", f"/api/models/{REPO}/revision/main", None)]
    assert hub.bytes_sent == {}

    check = HfApi(endpoint=hub.endpoint).verify_repo_checksums(REPO, cache_dir=cache)
    assert check.checked_count == len(served)
    assert check.mismatches == [] and check.missing_paths == [] and check.extra_paths == []


@pytest.mark.timeout(60)
def test_model_info_files_metadata(hub: HubServer, sha: str, repo_dir: Path) -> None:
    api = HfApi(endpoint=hub.endpoint)
    info = api.model_info(REPO, files_metadata=True)

    assert hub.requests == [("GET", f"/api/models/{REPO}?blobs=true", None)]
    assert info.id == REPO and info.sha == sha and not info.gated
    siblings = {s.rfilename: s for s in info.siblings or []}
    assert set(siblings) == {*SMALL_FILES, BIG}
    big = siblings[BIG]
    assert big.size == BIG_SIZE
    assert big.lfs is not None
    assert big.lfs.sha256 == _sha256(repo_dir / BIG) and big.lfs.size == BIG_SIZE
    assert big.blob_id == hub.file_info(REPO, BIG).blob_id  # git id of the LFS pointer
    for rel, data in SMALL_FILES.items():
        assert siblings[rel].size == len(data) and siblings[rel].lfs is None
        assert siblings[rel].blob_id == huggingface_hub.utils.sha.git_hash(data)

    # Without files_metadata only the names come back; a revision goes in the path.
    plain = api.model_info(REPO, revision=sha)
    assert hub.requests[-1] == ("GET", f"/api/models/{REPO}/revision/{sha}", None)
    assert plain.sha == sha
    assert all(s.size is None and s.lfs is None for s in plain.siblings or [])

    tree = {e.path: e for e in api.list_repo_tree(REPO, recursive=True)}
    assert set(tree) == {*SMALL_FILES, BIG, "sub", "sub/dir"}
    assert tree[BIG].lfs is not None and tree[BIG].lfs.sha256 == big.lfs.sha256
    assert sorted(api.list_repo_files(REPO)) == sorted({*SMALL_FILES, BIG})
    paths = api.get_paths_info(REPO, [BIG, "sub", "missing.txt"], revision=sha)
    assert [p.path for p in paths] == [BIG, "sub"]
    assert hub.requests[-1] == ("POST", f"/api/models/{REPO}/paths-info/{sha}", None)


@pytest.mark.timeout(60)
def test_hf_hub_download_one_file(hub: HubServer, sha: str, cache: Path) -> None:
    path = hf_hub_download(REPO, "sub/dir/notes.txt", cache_dir=cache, endpoint=hub.endpoint)

    assert Path(path).read_bytes() == SMALL_FILES["sub/dir/notes.txt"]
    assert path == str(cache / "models--org--tiny-model" / "snapshots" / sha / "sub/dir/notes.txt")
    # The cached blob is named after the etag: the git blob sha1 for a small file.
    assert Path(path).resolve().name == hub.file_info(REPO, "sub/dir/notes.txt").blob_id
    # No repo info for a single file: a HEAD for the metadata, then the GET.
    assert hub.requests == [("HEAD", f"/{REPO}/resolve/main/sub/dir/notes.txt", None),
                            ("GET", f"/{REPO}/resolve/main/sub/dir/notes.txt", None)]


@pytest.mark.timeout(60)
def test_error_codes_map_to_client_exceptions(hub: HubServer, sha: str, repo_dir: Path,
                                              cache: Path) -> None:
    api = HfApi(endpoint=hub.endpoint)
    for call in (lambda: api.model_info("org/missing"),
                 lambda: hf_hub_download("org/missing", "config.json", cache_dir=cache,
                                         endpoint=hub.endpoint),
                 lambda: snapshot_download("org/missing", cache_dir=cache,
                                           endpoint=hub.endpoint)):
        with pytest.raises(RepositoryNotFoundError) as not_found:
            call()
        assert type(not_found.value) is RepositoryNotFoundError
        assert not_found.value.response.status_code == 404

    with pytest.raises(EntryNotFoundError):
        hf_hub_download(REPO, "nope.bin", cache_dir=cache, endpoint=hub.endpoint)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(REPO, "config.json", revision="v9", cache_dir=cache,
                        endpoint=hub.endpoint)
    with pytest.raises(RevisionNotFoundError):
        api.model_info(REPO, revision="v9")

    # Gated: the metadata is public (as on the Hub), the files need a token.
    hub.add_repo("org/gated", repo_dir, gated=True)
    assert api.model_info("org/gated").gated == "manual"
    with pytest.raises(GatedRepoError) as gated:
        hf_hub_download("org/gated", "config.json", cache_dir=cache, endpoint=hub.endpoint,
                        token=False)
    assert gated.value.response.status_code == 403
    with pytest.raises(GatedRepoError):
        snapshot_download("org/gated", cache_dir=cache, endpoint=hub.endpoint, token=False)
    path = hf_hub_download("org/gated", "config.json", cache_dir=cache, endpoint=hub.endpoint,
                           token="hf_granted")
    assert Path(path).read_bytes() == SMALL_FILES["config.json"]


@pytest.mark.timeout(60)
def test_token_reaches_server(hub: HubServer, sha: str, cache: Path,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    hf_hub_download(REPO, BIG, cache_dir=cache, endpoint=hub.endpoint, token="hf_explicit")
    log = hub.request_log
    assert [r.method for r in log] == ["HEAD", "GET"]
    assert log[1].path.startswith("/_lfs/")  # same host: the client keeps the header
    assert {r.authorization for r in log} == {"Bearer hf_explicit"}

    # HF_TOKEN is read at call time, unlike HF_ENDPOINT.
    hub.reset_counters()
    monkeypatch.setenv("HF_TOKEN", "hf_from_env")
    snapshot_download(REPO, cache_dir=cache / "other", endpoint=hub.endpoint)
    assert len(hub.request_log) == 1 + 2 * (len(SMALL_FILES) + 1)
    assert {r.authorization for r in hub.request_log} == {"Bearer hf_from_env"}


@pytest.mark.timeout(60)
def test_drop_mid_file_restarts_from_zero_below_10mib(hub: HubServer, sha: str,
                                                      repo_dir: Path, cache: Path) -> None:
    hub.drop_after(BIG, 1 << 20)
    path = hf_hub_download(REPO, BIG, cache_dir=cache, endpoint=hub.endpoint)

    assert _sha256(path) == _sha256(repo_dir / BIG)
    # http_get reads the body with iter_bytes(chunk_size=10 MiB): nothing of a 3 MB body reaches
    # the disk before the connection dies, so the retry (after a 1 s sleep, same call) has
    # resume_size 0 and asks again for the whole file, without a Range header.
    gets = [(p, rng) for m, p, rng in hub.requests if m == "GET"]
    assert len(gets) == 2 and gets[0] == gets[1] and gets[0][1] is None
    assert hub.bytes_sent[BIG] == (1 << 20) + BIG_SIZE


@pytest.mark.timeout(60)
def test_drop_mid_file_resumes_from_10mib_boundary(hub: HubServer, tmp_path: Path,
                                                   cache: Path) -> None:
    folder = tmp_path / "huge"
    folder.mkdir()
    size = 12 << 20
    (folder / "huge.bin").write_bytes(random.Random(7).randbytes(size))
    hub.add_repo("org/huge", folder)
    hub.drop_after("huge.bin", 11 << 20)

    path = hf_hub_download("org/huge", "huge.bin", cache_dir=cache, endpoint=hub.endpoint)

    assert _sha256(path) == hub.file_info("org/huge", "huge.bin").sha256
    # The first 10 MiB chunk was written before the drop; the retry asks for the rest only.
    ranges = [rng for m, _, rng in hub.requests if m == "GET"]
    assert ranges == [None, f"bytes={10 << 20}-"]
    assert [r.status for r in hub.request_log if r.method == "GET"] == [200, 206]
    assert hub.bytes_sent["huge.bin"] == (11 << 20) + (size - (10 << 20))


@pytest.mark.timeout(60)
def test_corrupt_file_goes_unnoticed_by_client(hub: HubServer, sha: str, repo_dir: Path,
                                               cache: Path) -> None:
    expected = HfApi(endpoint=hub.endpoint).model_info(REPO, files_metadata=True)
    lfs_sha = next(s.lfs.sha256 for s in expected.siblings or [] if s.rfilename == BIG and s.lfs)
    hub.corrupt(BIG)

    path = hf_hub_download(REPO, BIG, revision=sha, cache_dir=cache, endpoint=hub.endpoint)

    assert Path(path).stat().st_size == BIG_SIZE  # the client only checks the size...
    assert _sha256(path) != lfs_sha  # ...so the bytes are wrong,
    assert Path(path).resolve().name == lfs_sha  # yet cached under the true hash,
    hub.reset_counters()
    assert hf_hub_download(REPO, BIG, revision=sha, cache_dir=cache,
                           endpoint=hub.endpoint) == path
    assert hub.requests == []  # and served again from the cache without asking.
    check = HfApi(endpoint=hub.endpoint).verify_repo_checksums(REPO, revision=sha,
                                                               cache_dir=cache)
    assert [(m["path"], m["expected"]) for m in check.mismatches] == [(BIG, lfs_sha)]
    # The fault was consumed: a forced download is right.
    fixed = hf_hub_download(REPO, BIG, revision=sha, cache_dir=cache, endpoint=hub.endpoint,
                            force_download=True)
    assert _sha256(fixed) == lfs_sha


@pytest.mark.timeout(60)
def test_fail_is_retried_on_head_and_raised_on_get(hub: HubServer, sha: str,
                                                   cache: Path) -> None:
    hub.fail("config.json", 500)
    path = hf_hub_download(REPO, "config.json", cache_dir=cache, endpoint=hub.endpoint)
    assert Path(path).read_bytes() == SMALL_FILES["config.json"]
    assert [(r.method, r.status) for r in hub.request_log] == [
        ("HEAD", 500), ("HEAD", 200), ("GET", 200)]

    hub.fail("tokenizer.json", 503, method="GET")
    with pytest.raises(HfHubHTTPError) as err:
        hf_hub_download(REPO, "tokenizer.json", cache_dir=cache, endpoint=hub.endpoint)
    assert err.value.response.status_code == 503


@pytest.mark.timeout(60)
def test_throttle_and_client_disconnect(hub: HubServer, sha: str, cache: Path) -> None:
    hub.throttle("tokenizer.json", 20_000)
    size = len(SMALL_FILES["tokenizer.json"])
    start = time.monotonic()
    hf_hub_download(REPO, "tokenizer.json", cache_dir=cache, endpoint=hub.endpoint)
    assert time.monotonic() - start >= 0.8 * size / 20_000

    # A client that walks away mid-body (as a cancelled download does) costs the server
    # nothing: it stops sending, and keeps answering.
    hub.reset_counters()
    hub.throttle(BIG, 200_000)
    with httpx.stream("GET", f"{hub.endpoint}/{REPO}/resolve/main/{BIG}",
                      follow_redirects=True, timeout=10) as response:
        assert response.status_code == 200
        next(response.iter_bytes())
    time.sleep(0.3)
    sent = hub.bytes_sent[BIG]
    time.sleep(0.3)
    assert hub.bytes_sent[BIG] == sent < BIG_SIZE
    response = httpx.get(f"{hub.endpoint}/{REPO}/resolve/main/config.json",
                         headers={"Range": "bytes=2-"})
    assert response.status_code == 206
    assert response.content == SMALL_FILES["config.json"][2:]
    total = len(SMALL_FILES["config.json"])
    assert response.headers["Content-Range"] == f"bytes 2-{total - 1}/{total}"
    assert httpx.get(f"{hub.endpoint}/{REPO}/resolve/main/config.json",
                     headers={"Range": f"bytes={total}-"}).status_code == 416


@pytest.mark.timeout(60)
def test_patch_client_redirects_default_endpoint(hub: HubServer, sha: str, cache: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    hub.patch_client(monkeypatch)
    assert huggingface_hub.model_info(REPO).sha == sha
    path = hf_hub_download(REPO, "config.json", cache_dir=cache)
    assert Path(path).read_bytes() == SMALL_FILES["config.json"]
    assert len(hub.requests) == 3


@pytest.mark.timeout(60)
def test_hf_endpoint_env_in_child_process(hub: HubServer, sha: str, repo_dir: Path,
                                          cache: Path) -> None:
    code = ("import sys; from huggingface_hub import snapshot_download; "
            "print(snapshot_download(sys.argv[1]))")
    env = {**os.environ, **hub.client_env(), "HF_HUB_CACHE": str(cache),
           "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    done = subprocess.run([sys.executable, "-c", code, REPO], env=env, capture_output=True,
                          text=True, timeout=50, check=True)
    folder = Path(done.stdout.strip())
    assert folder == cache / "models--org--tiny-model" / "snapshots" / sha
    assert _sha256(folder / BIG) == _sha256(repo_dir / BIG)
    assert hub.requests[0] == ("GET", f"/api/models/{REPO}/revision/main", None)
