"""Pulls through the real huggingface_hub client from a Hub look-alike on loopback:
convert-by-type, the pre-converted fast path, detection, progress, resume, corruption,
concurrency, cancellation, disk full, refusals, and names that try to escape."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import descendants
from hub_server import HubServer

from ovms_plugin.store import pull
from ovms_plugin.store.store import STAGING, ModelStore, StoreError

IR_BIN = "openvino_model.bin"  # 1.3 MB in the tiny chat IR: an "LFS" file on the Hub


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, test_models: dict[str, Path]) -> Iterator[HubServer]:
    with HubServer() as server:
        server.add_repo("org/tiny-chat", test_models["tiny-chat-hf"])
        server.add_repo("OpenVINO/tiny-chat-ov", test_models["tiny-chat"])
        server.add_repo("org/gated-chat-ov", test_models["tiny-chat"], gated=True)
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        yield server


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    return ModelStore(tmp_path / "models")


def do_pull(store: ModelStore, model: str, cancel: threading.Event | None = None,
            **kw) -> tuple[list[dict], object]:
    msgs: list[dict] = []
    entry = pull.pull(store, pull.PullRequest(model=model, **kw), msgs.append, cancel)
    return msgs, entry


def assert_clean(store: ModelStore) -> None:
    """Nothing half-done: no model, nothing staged, no partial download."""
    assert store.list() == []
    staging = store.root / STAGING
    assert not staging.exists() or not any(staging.iterdir())
    downloads = store.root / ".downloads"
    assert not downloads.exists() or not any(downloads.iterdir())


def test_preconverted_repo_is_downloaded_only(hub: HubServer, store: ModelStore,
                                              test_models: dict[str, Path]):
    msgs, entry = do_pull(store, "OpenVINO/tiny-chat-ov", model_type="chat")
    assert not any("converting" in m.get("status", "") for m in msgs)
    assert entry.name == "OpenVINO/tiny-chat-ov" and entry.task == "text-generation"
    m = entry.manifest
    assert m["source"] == "hf:OpenVINO/tiny-chat-ov" and len(m["revision"]) == 40
    assert m["weight_format"] is None and m["quantization_level"] == "FP32"
    # Progress: per file, totals right, completed reaching them; success last.
    finals = {}
    for msg in msgs:
        if "total" in msg:
            assert 0 < msg["completed"] <= msg["total"]
            finals[msg["status"].removeprefix("pulling ")] = (msg["completed"], msg["total"])
    src = test_models["tiny-chat"]
    for path, (done, total) in finals.items():
        assert done == total == (src / path).stat().st_size, path
    assert IR_BIN in finals and msgs[-1] == {"status": "success"}
    assert (entry.path / IR_BIN).read_bytes() == (src / IR_BIN).read_bytes()
    assert pull.verify(entry) == []
    assert not (store.root / ".downloads").exists() or \
        not any((store.root / ".downloads").iterdir())
    # Pulling again: up to date, nothing downloaded.
    hub.reset_counters()
    msgs, _ = do_pull(store, "OpenVINO/tiny-chat-ov")
    assert any("up to date" in m.get("status", "") for m in msgs)
    assert sum(hub.bytes_sent.values()) == 0


def test_hf_chat_repo_is_converted_by_type(hub: HubServer, store: ModelStore):
    msgs, entry = do_pull(store, "org/tiny-chat", model_type="chat", name="conv-chat")
    assert any(m.get("status", "").startswith("converting") for m in msgs)
    assert any(m.get("status") == "validating" for m in msgs)
    m = entry.manifest
    assert m["task"] == "text-generation" and m["weight_format"] == "int8"
    assert m["quantization_level"] == "INT8" and m["validation"]["chat_template"] is True
    assert (entry.path / "openvino_detokenizer.xml").is_file()


def test_detection_without_model_type_and_weight_override(hub: HubServer, store: ModelStore):
    _, entry = do_pull(store, "org/tiny-chat", name="detected", weight_format="fp16")
    assert entry.task == "text-generation" and entry.manifest["model_type"] is None
    assert entry.manifest["quantization_level"] == "FP16"


def test_mismatched_model_type_is_refused_before_downloading(hub: HubServer,
                                                             store: ModelStore):
    with pytest.raises(StoreError, match="text-generation model, but model_type 'embed'"):
        do_pull(store, "OpenVINO/tiny-chat-ov", model_type="embed")
    assert hub.bytes_sent.get(IR_BIN, 0) == 0  # only the small metadata was read
    assert_clean(store)


def test_resume_after_the_server_drops_mid_file(hub: HubServer, store: ModelStore,
                                                test_models: dict[str, Path]):
    size = (test_models["tiny-chat"] / IR_BIN).stat().st_size
    hub.drop_after(IR_BIN, 700_000)
    _, entry = do_pull(store, "OpenVINO/tiny-chat-ov")
    ranged = [r for r in hub.requests if r[1].endswith(IR_BIN) and r[2]]
    assert ranged and ranged[0][2].startswith("bytes=")
    assert hub.bytes_sent[IR_BIN] < 2 * size  # resumed, not started over
    assert pull.verify(entry) == []


def test_an_interrupted_pull_resumes_on_the_next_pull(hub: HubServer, store: ModelStore,
                                                      test_models: dict[str, Path]):
    size = (test_models["tiny-chat"] / IR_BIN).stat().st_size
    hub.drop_after(IR_BIN, 600_000)  # the connection drops, then the server keeps failing

    def progress(msg: dict) -> None:
        if msg.get("status") == f"pulling {IR_BIN}" and not hub.request_log[-1].status >= 500:
            hub.fail(IR_BIN, 503, times=100, method="GET")

    with pytest.raises(StoreError, match="pull again to resume"):
        pull.pull(store, pull.PullRequest(model="OpenVINO/tiny-chat-ov"), progress)
    assert store.list() == []
    hub.clear_faults()
    hub.reset_counters()
    _, entry = do_pull(store, "OpenVINO/tiny-chat-ov")
    ranges = {r[2] for r in hub.requests if r[0] == "GET" and r[1].endswith(IR_BIN)}
    assert ranges == {"bytes=600000-"}  # the redirect and its target, both resuming
    assert hub.bytes_sent[IR_BIN] == size - 600_000
    assert pull.verify(entry) == []


def test_a_corrupted_file_is_fetched_again(hub: HubServer, store: ModelStore,
                                           test_models: dict[str, Path]):
    size = (test_models["tiny-chat"] / IR_BIN).stat().st_size
    hub.corrupt(IR_BIN)
    _, entry = do_pull(store, "OpenVINO/tiny-chat-ov")
    assert hub.bytes_sent[IR_BIN] == 2 * size
    assert pull.verify(entry) == []
    hub.corrupt(IR_BIN, times=2)
    with pytest.raises(StoreError, match="failed its checksum twice"):
        do_pull(store, "OpenVINO/tiny-chat-ov", name="again")


def test_concurrent_pulls_share_one_download(hub: HubServer, store: ModelStore,
                                             test_models: dict[str, Path]):
    size = (test_models["tiny-chat"] / IR_BIN).stat().st_size
    hub.throttle(IR_BIN, 2_000_000)
    results: list = []
    threads = [threading.Thread(target=lambda: results.append(
        do_pull(store, "OpenVINO/tiny-chat-ov"))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(results) == 2 and hub.bytes_sent[IR_BIN] == size
    assert [e.name for e in store.list()] == ["OpenVINO/tiny-chat-ov"]


def conversion_processes() -> list[int]:
    """The conversion job processes below this one, and what they started (other tests'
    children, such as a prompt helper still idling, are not counted)."""
    found = []
    for pid in descendants(os.getpid()):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"ovms_plugin.store.job" in cmdline:
            found += [pid, *descendants(pid)]
    return found


def assert_no_leftovers(store: ModelStore) -> None:
    for folder in (store.root / STAGING, store.root / ".downloads"):
        assert not folder.exists() or not any(folder.iterdir()), list(folder.iterdir())


def assert_nothing_installed(store: ModelStore) -> None:
    """No model and nothing staged (downloads may stay, for the next pull to resume)."""
    assert store.list() == []
    staging = store.root / STAGING
    assert not staging.exists() or not any(staging.iterdir())


def test_cancel_mid_download_keeps_what_arrived_and_the_next_pull_resumes(
        hub: HubServer, store: ModelStore, test_models: dict[str, Path]):
    size = (test_models["tiny-chat"] / IR_BIN).stat().st_size
    hub.throttle(IR_BIN, 200_000)
    cancel = threading.Event()

    def progress(msg: dict) -> None:
        if msg.get("status") == f"pulling {IR_BIN}" and msg.get("completed", 0) > 300_000:
            cancel.set()

    with pytest.raises(pull.PullCancelled, match="kept"):
        pull.pull(store, pull.PullRequest(model="OpenVINO/tiny-chat-ov"), progress, cancel)
    assert_nothing_installed(store)
    parts = list((store.root / ".downloads").rglob(f"{IR_BIN}.part"))
    assert parts and parts[0].stat().st_size > 300_000
    hub.clear_faults()
    hub.reset_counters()
    _, entry = do_pull(store, "OpenVINO/tiny-chat-ov")
    assert hub.bytes_sent[IR_BIN] < size  # resumed, not started over
    assert pull.verify(entry) == []
    assert_no_leftovers(store)


def test_cancel_mid_conversion_kills_the_job_and_keeps_the_download(hub: HubServer,
                                                                   store: ModelStore):
    cancel = threading.Event()
    jobs: list[int] = []

    def progress(msg: dict) -> None:
        if msg.get("status", "").startswith("converting"):
            threading.Timer(1.0, lambda: (jobs.extend(conversion_processes()),
                                          cancel.set())).start()

    with pytest.raises(pull.PullCancelled):
        pull.pull(store, pull.PullRequest(model="org/tiny-chat"), progress, cancel)
    assert_nothing_installed(store)
    assert jobs, "the conversion job was running when the pull was cancelled"
    assert not any(Path(f"/proc/{pid}").exists() for pid in jobs)
    hub.reset_counters()
    _, entry = do_pull(store, "org/tiny-chat")  # converts again, downloads nothing
    assert sum(hub.bytes_sent.values()) == 0 and entry.task == "text-generation"
    assert_no_leftovers(store)


def test_gated_repo_needs_a_token(hub: HubServer, store: ModelStore,
                                  monkeypatch: pytest.MonkeyPatch):
    with pytest.raises(StoreError, match="gated"):
        do_pull(store, "org/gated-chat-ov")
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    _, entry = do_pull(store, "org/gated-chat-ov")
    assert any(r.authorization == "Bearer hf_test_token" for r in hub.request_log)
    assert entry.task == "text-generation"


@pytest.mark.parametrize("model,needle", [
    ("org/missing", "no model 'org/missing'"),
    ("OpenVINO/tiny-chat-ov@v9", "has no revision 'v9'"),
    ("not-a-catalog-name", "catalog names:"),
    ("a/b/c", "not a local folder"),
])
def test_clear_errors(hub: HubServer, store: ModelStore, model: str, needle: str):
    with pytest.raises(StoreError, match=needle):
        do_pull(store, model)


@pytest.mark.parametrize("name", ["../evil", "/etc/x", "a/../../b", "x/y/z"])
def test_names_cannot_escape_the_store(hub: HubServer, store: ModelStore, name: str):
    with pytest.raises(StoreError, match="invalid model name"):
        do_pull(store, "OpenVINO/tiny-chat-ov", name=name)
    assert not any(store.root.parent.glob("evil*"))


def test_memory_check_refuses_clearly(hub: HubServer, store: ModelStore,
                                      monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("OVMS_PLUGIN_MEMORY_BUDGET", "1MB")
    with pytest.raises(StoreError, match=r"not enough memory to convert .*needs about"):
        do_pull(store, "org/tiny-chat")
    assert_clean(store)


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 3 MiB tmpfs (needs root, as in CI); skipped where mounting is not allowed."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)],
                       capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_mid_download(hub: HubServer, small_fs: Path):
    store = ModelStore(small_fs / "models")
    filler = small_fs / "filler"

    def progress(msg: dict) -> None:
        # Once the download has begun, something else takes the remaining space.
        if msg.get("status") == f"pulling {IR_BIN}" and not filler.exists():
            free = shutil.disk_usage(small_fs).free
            filler.write_bytes(b"\0" * (free - 4096))

    with pytest.raises(StoreError, match="disk full while downloading"):
        pull.pull(store, pull.PullRequest(model="OpenVINO/tiny-chat-ov"), progress)
    filler.unlink()
    assert_clean(store)
    assert not any(p.name.endswith(".part") for p in store.root.rglob("*"))


def test_disk_space_is_checked_first(hub: HubServer, small_fs: Path):
    (small_fs / "filler").write_bytes(b"\0" * (2 * 2**20))
    store = ModelStore(small_fs / "models")
    with pytest.raises(StoreError, match="not enough disk space"):
        do_pull(store, "OpenVINO/tiny-chat-ov")


def test_pull_through_the_plugin_then_use_it(hub: HubServer, start_host, tmp_path: Path):
    """AOG's model API: PullModelStream with progress, ListModels, LoadModel, chat."""
    import json
    home = tmp_path / "home"
    host = start_host(home, HF_ENDPOINT=hub.endpoint)
    msgs = list(host.call("PullModelStream", _pull_req("PullModelStream", {
        "model": "org/tiny-chat", "stream": True, "model_type": "chat"})))
    data = [json.loads(m.data) for m in msgs]
    assert all(m.code == 0 for m in msgs) and data[-1] == {"status": "success"}
    assert any(d.get("completed", 0) > 0 and d.get("total") for d in data)
    names = [m["name"] for m in json.loads(host.call("ListModels").response_json)["models"]]
    assert names == ["org/tiny-chat"]
    assert host.json_call("LoadModel", {"model": "org/tiny-chat"}).code == 0
    r = host.invoke("chat", {"model": "org/tiny-chat", "max_tokens": 8,
                             "messages": [{"role": "user", "content": "hi"}]})
    assert r.code == 0, r.message
    # The unary PullModel of an installed, unchanged model answers at once.
    r = host.json_call("PullModel", {"model": "org/tiny-chat", "model_type": "chat"})
    assert r.code == 0 and json.loads(r.response_json) == {"status": "success"}
    r = host.json_call("PullModel", {"model": "org/tiny-chat", "model_type": "embed"})
    assert r.code == 3001 and "model_type 'embed'" in r.message


def test_a_pull_stream_cancelled_by_aog_installs_nothing_and_keeps_the_bytes(
        hub: HubServer, start_host, tmp_path: Path):
    hub.throttle(IR_BIN, 100_000)
    home = tmp_path / "home"
    host = start_host(home, HF_ENDPOINT=hub.endpoint)
    call = host.call("PullModelStream", _pull_req("PullModelStream", {
        "model": "OpenVINO/tiny-chat-ov", "stream": True}), timeout=60)
    for msg in call:
        if b"pulling openvino_model.bin" in msg.data:
            break
    call.cancel()  # AOG's client went away
    store = ModelStore(home / "models")
    from conftest import wait_for
    sizes: list[int] = []

    def stopped() -> bool:  # the part has stopped growing: the pull saw the cancel
        parts = list((store.root / ".downloads").rglob(f"{IR_BIN}.part"))
        sizes.append(parts[0].stat().st_size if parts else -1)
        return len(sizes) > 8 and sizes[-1] == sizes[-8] > 0

    assert wait_for(stopped, timeout=30, every=0.25), sizes
    assert_nothing_installed(store)
    assert host.call("HealthCheck").code == 0


def _pull_req(method: str, body: dict):
    import json

    from ovms_plugin.aog.proto import provider_pb2 as pb
    return getattr(pb, f"{method}Request")(request_json=json.dumps(body).encode())


@pytest.mark.parametrize("recipe,model_type,task,fmt", [
    ("tiny-embed-hf", "embed", "feature-extraction", "FP16"),
    ("tiny-rerank-hf", "rerank", "text-classification", "FP16"),
    ("tiny-sd-hf", "text-to-image", "text-to-image", "FP16"),
])
def test_every_service_converts_by_type(hub: HubServer, store: ModelStore, recipe: str,
                                        model_type: str, task: str, fmt: str):
    """Converted with the task of the service, validated by running it once (one embedding,
    one rerank, one 1-step image), then detected the same way without model_type."""
    from ovms_plugin import devmodels
    folder = devmodels.ensure_models(devmodels.default_cache_dir(), [recipe])[recipe]
    hub.add_repo(f"org/{recipe}", folder)
    msgs, entry = do_pull(store, f"org/{recipe}", model_type=model_type, name="typed")
    assert entry.task == task and entry.manifest["quantization_level"] == fmt
    assert any(m.get("status") == "validating" for m in msgs)
    assert entry.manifest["conversion"]["peak_rss_bytes"] > 0
    if task == "feature-extraction":  # pooling travels with the IR
        assert (entry.path / "modules.json").is_file()
        assert (entry.path / "1_Pooling" / "config.json").is_file()
    # A repo of another kind is refused before its weights are downloaded.
    other = "embed" if model_type == "text-to-image" else "text-to-image"
    hub.reset_counters()
    with pytest.raises(StoreError, match=f"model_type '{other}'"):
        do_pull(store, f"org/{recipe}", model_type=other, name="wrong")
    assert not any(p.endswith((".safetensors", ".bin")) for p in hub.bytes_sent)


def test_ir_exports_in_subfolders_are_not_taken_for_the_model(store: ModelStore,
                                                              tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch):
    """A sentence-transformers repo ships openvino/ and onnx/ exports of its own (the real
    all-MiniLM-L6-v2 does): the repo is converted from its weights, and those folders are
    not downloaded."""
    from ovms_plugin import devmodels
    src = devmodels.ensure_models(devmodels.default_cache_dir(),
                                  [devmodels.TINY_EMBED_HF])[devmodels.TINY_EMBED_HF]
    folder = tmp_path / "repo"
    shutil.copytree(src, folder)
    for sub, name in (("openvino", "openvino_model.xml"), ("openvino", "openvino_model.bin"),
                      ("onnx", "model.onnx")):
        (folder / sub).mkdir(exist_ok=True)
        (folder / sub / name).write_bytes(b"\0" * 2_000_000)
    with HubServer() as server:
        server.add_repo("sentence-transformers/tiny-embed", folder)
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        _, entry = do_pull(store, "sentence-transformers/tiny-embed")
        sent = server.bytes_sent
    assert entry.task == "feature-extraction" and entry.manifest["weight_format"] == "fp16"
    assert not any(p.startswith(("openvino/", "onnx/")) for p in sent)
    assert not any(f["path"].startswith(("openvino/", "onnx/"))
                   for f in entry.manifest["files"])


@pytest.mark.parametrize("bad", [
    "x/../../../../outside/pwned.txt", "../pwned.txt", "/etc/pwned.txt", "C:/pwned.txt",
    "c:pwned.txt", "a\\..\\..\\pwned.txt", "a//b.txt", "./a.txt", "a/./b.txt", "a/..",
    "a\x00b.txt", "line\nbreak.txt", "x" * 300,
])
def test_a_hostile_file_list_is_refused_before_anything_is_written(
        store: ModelStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        test_models: dict[str, Path], bad: str):
    """A mirror (HF_ENDPOINT) whose listing names a file outside the download folder gets
    the whole repo refused: nothing downloaded, nothing written anywhere."""
    with HubServer() as server:
        server.add_repo("evil/chat-ov", test_models["tiny-chat"],
                        extra_files={bad: b"pwned"})
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        with pytest.raises(StoreError, match="not a plain relative path"):
            do_pull(store, "evil/chat-ov")
        assert sum(server.bytes_sent.values()) == 0
    assert not list(tmp_path.rglob("pwned*"))
    assert_clean(store)


@pytest.mark.parametrize("bad", ["nul", "sub/CON.json", "model.bin:hidden", "a?.txt",
                                 "trailing."])
def test_a_file_list_windows_cannot_hold_is_refused_everywhere(
        store: ModelStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        test_models: dict[str, Path], bad: str):
    """Device names, ':' (an NTFS alternate data stream), wildcards and trailing dots are
    refused on every system, so a store never holds what it could not hold on Windows."""
    with HubServer() as server:
        server.add_repo("evil/chat-ov", test_models["tiny-chat"], extra_files={bad: b"x"})
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        with pytest.raises(StoreError, match="Windows cannot hold"):
            do_pull(store, "evil/chat-ov")
        assert sum(server.bytes_sent.values()) == 0
    assert_clean(store)


@pytest.mark.parametrize("status, needle", [(401, "HF_TOKEN"), (403, "HF_TOKEN"),
                                            (404, "missing from")])
def test_permanent_refusals_fail_at_once(hub: HubServer, store: ModelStore, status: int,
                                         needle: str):
    hub.fail(IR_BIN, status, times=10, method="GET")
    with pytest.raises(StoreError, match=needle) as e:
        do_pull(store, "OpenVINO/tiny-chat-ov")
    assert f"HTTP {status}" in str(e.value)
    assert sum(1 for r in hub.requests if r[0] == "GET" and r[1].endswith(IR_BIN)) == 1
    assert_clean(store)


def test_api_rate_limits_and_server_errors_are_retried(hub: HubServer, store: ModelStore,
                                                      monkeypatch: pytest.MonkeyPatch):
    from ovms_plugin.store import hub as hub_mod
    waits: list[float] = []
    monkeypatch.setattr(hub_mod, "_sleep", waits.append)
    hub.fail_api(429, times=1, retry_after=3)
    hub.fail_api(503, times=1)
    _, entry = do_pull(store, "OpenVINO/tiny-chat-ov")
    assert entry.task == "text-generation"
    assert waits[0] >= 3.0 and len(waits) == 2  # Retry-After honoured, then a back-off


def test_tries_that_make_progress_do_not_count(hub: HubServer, store: ModelStore,
                                               monkeypatch: pytest.MonkeyPatch, caplog):
    from ovms_plugin.store import hub as hub_mod
    monkeypatch.setattr(hub_mod, "_sleep", lambda s: None)
    hub.drop_after(IR_BIN, 100_000, times=hub_mod.ATTEMPTS + 3)  # 8 drops, each with progress
    with caplog.at_level("INFO", logger="ovms_plugin.store.hub"):
        _, entry = do_pull(store, "OpenVINO/tiny-chat-ov")
    assert pull.verify(entry) == []
    tries = [r.getMessage() for r in caplog.records if "interrupted" in r.getMessage()]
    assert len(tries) >= hub_mod.ATTEMPTS + 3
    assert all("try 1 of 5" in t for t in tries)  # never "attempt 6/5"


def test_download_timeout_is_honoured(hub: HubServer, store: ModelStore,
                                      monkeypatch: pytest.MonkeyPatch):
    import huggingface_hub.utils as hf_utils
    seen: list[float] = []
    real = hf_utils.get_session

    class Spy:
        def __init__(self, session):
            self.session = session

        def stream(self, *args, **kw):
            seen.append(kw["timeout"])
            return self.session.stream(*args, **kw)

    monkeypatch.setattr(hf_utils, "get_session", lambda: Spy(real()))
    monkeypatch.setenv("HF_HUB_DOWNLOAD_TIMEOUT", "7")
    do_pull(store, "OpenVINO/tiny-chat-ov")
    assert seen and set(seen) == {7.0}


def test_up_to_date_means_same_weights_and_undamaged_files(hub: HubServer, store: ModelStore):
    _, _entry = do_pull(store, "org/tiny-chat", name="c", weight_format="int8")
    msgs, again = do_pull(store, "org/tiny-chat", name="c", weight_format="fp16")
    assert not any("up to date" in m.get("status", "") for m in msgs)
    assert again.manifest["weight_format"] == "fp16"
    assert again.manifest["quantization_level"] == "FP16"
    msgs, _ = do_pull(store, "org/tiny-chat", name="c")  # no format asked: the installed one
    assert any("up to date" in m.get("status", "") for m in msgs)
    # A damaged file (same size, other bytes) is found and the model pulled again (an IR
    # repo: the check is the same whether the files were downloaded or converted).
    _, ir = do_pull(store, "OpenVINO/tiny-chat-ov", name="ir")
    xml = ir.path / "openvino_tokenizer.xml"
    xml.write_bytes(xml.read_bytes().replace(b"<", b"[", 1))
    msgs, repaired = do_pull(store, "OpenVINO/tiny-chat-ov", name="ir")
    assert any("damaged" in m.get("status", "") for m in msgs)
    assert pull.verify(repaired) == []


def test_two_names_for_one_repo_do_not_break_each_other(hub: HubServer, store: ModelStore):
    """The catalog's short name and the repo id are two names for one repo: a pull of the
    second that fails must not delete the download the first is using."""
    hub.throttle(IR_BIN, 400_000)
    results: dict[str, object] = {}

    def run(name: str, model_type: str | None) -> None:
        try:
            results[name] = do_pull(store, "OpenVINO/tiny-chat-ov", name=name,
                                    model_type=model_type)[1]
        except StoreError as e:
            results[name] = e

    first = threading.Thread(target=run, args=("first", "chat"))
    first.start()
    assert wait_for_path(store.root / ".downloads", f"{IR_BIN}.part")
    second = threading.Thread(target=run, args=("second", "embed"))  # fails: wrong type
    second.start()
    for t in (first, second):
        t.join(120)
    assert isinstance(results["second"], StoreError)
    assert getattr(results["first"], "name", None) == "first", results["first"]
    assert pull.verify(results["first"]) == []


def wait_for_path(root: Path, pattern: str, timeout: float = 20.0) -> bool:
    from conftest import wait_for
    return wait_for(lambda: root.exists() and any(root.rglob(pattern)), timeout)


@pytest.mark.parametrize("name, why", [
    ("org--x", "no '--'"), ("CON", "device name"), ("org/nul.txt", "device name"),
    ("a" * 120 + "/" + "b" * 120, "at most 200"), ("x.", "ends with a dot"),
])
def test_one_name_one_folder(hub: HubServer, store: ModelStore, name: str, why: str):
    with pytest.raises(StoreError, match=why):
        do_pull(store, "OpenVINO/tiny-chat-ov", name=name)
    assert_clean(store)


def test_gc_removes_what_killed_pulls_left(store: ModelStore):
    import subprocess
    import sys
    staging = store.root / STAGING
    (staging / "new-999999-dead").mkdir(parents=True)
    (staging / "new-999999-dead" / "openvino_model.bin").write_bytes(b"\0" * 3_000_000)
    mine = store.staging_dir()  # this process runs: kept
    stale = store.root / ".downloads" / "org--gone@abc"
    stale.mkdir(parents=True)
    (stale / "model.safetensors.part").write_bytes(b"\0" * 1_000_000)
    r = subprocess.run([sys.executable, "-m", "ovms_plugin", "--models-dir", str(store.root),
                        "gc"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "staging folder new-999999-dead (2.9 MB)" in r.stdout
    assert "download org--gone@abc (1.0 MB)" in r.stdout and "freed 3.8 MB" in r.stdout
    assert mine.is_dir() and not stale.exists()


def test_verify_command_finds_and_repairs_damage(hub: HubServer, store: ModelStore):
    import subprocess
    import sys
    _, entry = do_pull(store, "OpenVINO/tiny-chat-ov")

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "ovms_plugin", "--models-dir",
                               str(store.root), "verify", "OpenVINO/tiny-chat-ov", *args],
                              capture_output=True, text=True, timeout=120,
                              env={**os.environ, "HF_ENDPOINT": hub.endpoint})

    assert cli().returncode == 0
    (entry.path / IR_BIN).write_bytes(b"\0" * 10)
    r = cli()
    assert r.returncode == 1 and IR_BIN in r.stdout and "--repair" in r.stdout
    r = cli("--repair")
    assert r.returncode == 0 and "repaired" in r.stdout, r.stderr
    assert cli().returncode == 0


def test_real_hub_layouts_download_only_what_the_path_needs(
        store: ModelStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        test_models: dict[str, Path]):
    """Weights at the root and a complete IR export in openvino/ (tokenizer IR included):
    the IR is downloaded alone and lifted to the top, no conversion. `convert` forces
    conversion from the weights instead, without the IR. A root IR repo that also carries
    other frameworks' files gets only the IR."""
    hf, ir_folder = test_models["tiny-chat-hf"], test_models["tiny-chat"]
    both = tmp_path / "both"
    shutil.copytree(hf, both)
    shutil.copytree(ir_folder, both / "openvino")
    (both / "onnx").mkdir()
    (both / "onnx" / "model.onnx").write_bytes(b"\0" * 2_000_000)
    root_ir = tmp_path / "root-ir"
    shutil.copytree(ir_folder, root_ir)
    (root_ir / "pytorch_model.bin").write_bytes(b"\0" * 2_000_000)
    (root_ir / "model.onnx").write_bytes(b"\0" * 2_000_000)
    with HubServer() as server:
        server.add_repo("org/both", both)
        server.add_repo("org/root-ir", root_ir)
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        msgs, entry = do_pull(store, "org/both", name="sub")
        sent = dict(server.bytes_sent)
        assert not any(m.get("status", "").startswith("converting") for m in msgs)
        assert any("OpenVINO IR in openvino/" in m.get("status", "") for m in msgs)
        assert set(sent) <= {f"openvino/{p.name}" for p in ir_folder.iterdir()} | \
            {"config.json", "generation_config.json"}, sorted(sent)
        assert (entry.path / "openvino_model.xml").is_file() and \
            not (entry.path / "openvino").exists()
        assert pull.verify(entry) == [] and entry.task == "text-generation"
        server.reset_counters()
        msgs, converted = do_pull(store, "org/both", name="conv", convert=True)
        assert any(m.get("status", "").startswith("converting") for m in msgs)
        assert not any(p.startswith(("openvino/", "onnx/")) for p in server.bytes_sent)
        assert converted.manifest["weight_format"] == "int8"
        server.reset_counters()
        _, plain = do_pull(store, "org/root-ir", name="plain")
        assert "pytorch_model.bin" not in server.bytes_sent
        assert "model.onnx" not in server.bytes_sent and pull.verify(plain) == []


def test_the_plugin_cleans_leftovers_at_start_up(start_host, tmp_path: Path):
    from conftest import wait_for
    home = tmp_path / "home"
    leftover = home / "models" / STAGING / "new-999999-killed"
    leftover.mkdir(parents=True)
    (leftover / "openvino_model.bin").write_bytes(b"\0" * 1000)
    host = start_host(home)
    assert wait_for(lambda: not leftover.exists(), timeout=20)
    assert host.call("HealthCheck").code == 0
