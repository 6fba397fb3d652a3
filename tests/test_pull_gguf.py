"""GGUF pulls on the real SmolLM2-135M-Instruct Q4_1 file: from a local file (through the CLI,
in an environment where torch and optimum cannot be imported), from the loopback Hub
look-alike (quant selection, a missing quant, a corrupted and an interrupted download),
and through AOG's PullModelStream; each installs an ordinary OpenVINO model folder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hub_server import HubServer
from test_pull import _pull_req, assert_clean, do_pull

from ovms_plugin import builtin, devmodels
from ovms_plugin.store import hub as hub_mod
from ovms_plugin.store import pull
from ovms_plugin.store.store import ModelStore, StoreError

REPO = "org/SmolLM2-135M-Instruct-GGUF"
Q4 = "SmolLM2-135M-Instruct-Q4_1.gguf"
Q8 = "SmolLM2-135M-Instruct-Q8_0.gguf"  # the same bytes under another quant's name


@pytest.fixture(scope="module")
def gguf_file(test_models: dict[str, Path]) -> Path:
    return test_models[devmodels.SMOLLM2_GGUF] / builtin.GGUF_NAME


@pytest.fixture(scope="module")
def gguf_repo(tmp_path_factory: pytest.TempPathFactory, gguf_file: Path) -> Path:
    folder = tmp_path_factory.mktemp("gguf-repo")
    for name in (Q4, Q8):
        os.link(gguf_file, folder / name)
    (folder / "README.md").write_text("SmolLM2-135M-Instruct in GGUF\n")
    return folder


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, gguf_repo: Path) -> Iterator[HubServer]:
    with HubServer() as server:
        server.add_repo(REPO, gguf_repo)
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        yield server


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    return ModelStore(tmp_path / "models")


def check_installed(entry, file: str) -> None:
    m = entry.manifest
    assert entry.task == "text-generation" and m["format"] == "openvino"
    assert {"openvino_model.xml", "openvino_model.bin", "openvino_tokenizer.xml",
            "openvino_detokenizer.xml", "config.json", "generation_config.json"} <= \
        {f["path"] for f in m["files"]}
    assert not any(f["path"].endswith(".gguf") for f in m["files"])  # IR only, no copy
    g = m["gguf"]
    assert g["file"] == file and g["sha256"] == builtin.GGUF_SHA256
    assert g["file_type"] == "Q4_1" and g["architecture"] == "llama"
    assert 130e6 < g["parameter_count"] < 140e6 and g["context_length"] == 8192
    assert m["quantization_level"] == "Q4_1" and m["family"] == "llama"
    assert m["parameter_size"].endswith("M") and m["validation"]["chat_template"] is True
    # ListModels' line: what a user needs, no host path.
    line = entry.to_aog()
    assert line["details"]["quantization_level"] == "Q4_1"
    assert line["details"]["family"] == "llama" and line["details"]["context_length"] == 8192
    assert file in line["source"] and builtin.GGUF_SHA256[:12] in line["source"]
    assert str(entry.path.parent) not in line["source"] and "/tmp" not in line["source"]
    assert entry.context_length() == 8192
    assert pull.verify(entry) == []


def test_hub_gguf_quant_selection_and_up_to_date(hub: HubServer, store: ModelStore):
    msgs, entry = do_pull(store, REPO, model_type="chat")  # no quant: the smallest 4-bit
    assert any(m.get("status") == f"using {Q4}: smallest 4-bit file: Q4_1" for m in msgs), msgs
    assert entry.name == REPO and msgs[-1] == {"status": "success"}
    assert hub.bytes_sent.get(Q8, 0) == 0 and hub.bytes_sent[Q4] == builtin.GGUF_SIZE
    assert entry.manifest["source"] == f"hf:{REPO}" and len(entry.manifest["revision"]) == 40
    check_installed(entry, Q4)
    assert not (store.root / ".downloads").exists() or \
        not any((store.root / ".downloads").iterdir())
    # Again: up to date, nothing downloaded.
    hub.reset_counters()
    msgs, again = do_pull(store, REPO)
    assert any("up to date" in m.get("status", "") for m in msgs)
    assert sum(hub.bytes_sent.values()) == 0 and again.path == entry.path
    # Ollama's spelling with a quant, in any case: that file only, under its own name.
    msgs, q8 = do_pull(store, f"hf.co/{REPO}:q8_0")
    assert q8.name == f"{REPO}-Q8_0" and q8.manifest["gguf"]["file"] == Q8
    assert hub.bytes_sent.get(Q4, 0) == 0 and hub.bytes_sent[Q8] == builtin.GGUF_SIZE


def test_missing_quant_lists_the_available_ones(hub: HubServer, store: ModelStore):
    with pytest.raises(StoreError, match=r"Q5_K_M.*Q4_1, Q8_0"):
        do_pull(store, f"{REPO}:Q5_K_M")
    assert sum(hub.bytes_sent.values()) == 0
    assert_clean(store)


@pytest.mark.parametrize("spec, why", [
    (f"{REPO}:bad-quant", "not a GGUF quantization name"),
])
def test_bad_quant_spelling(hub: HubServer, store: ModelStore, spec: str, why: str):
    with pytest.raises(StoreError, match=why):
        do_pull(store, spec)


def test_options_that_do_not_apply_to_gguf_are_refused(hub: HubServer, store: ModelStore):
    with pytest.raises(StoreError, match="weight_format 'int4' does not apply to a GGUF"):
        do_pull(store, f"{REPO}:Q4_1", weight_format="int4")
    with pytest.raises(StoreError, match="model_type 'embed'"):
        do_pull(store, f"{REPO}:Q4_1", model_type="embed")
    assert sum(hub.bytes_sent.values()) == 0


def test_corrupted_download_is_refused_and_leaves_nothing(hub: HubServer, store: ModelStore):
    hub.corrupt(Q4, times=2)  # corrupt twice: the one retry is corrupted too
    with pytest.raises(StoreError, match="failed its checksum twice"):
        do_pull(store, f"{REPO}:Q4_1")
    assert_clean(store)


def test_interrupted_download_resumes_on_the_next_pull(hub: HubServer, store: ModelStore,
                                                       monkeypatch: pytest.MonkeyPatch):
    # 10 MiB arrive, then the file fails five times in a row with no byte more (tries that
    # bring bytes do not count toward the limit).
    hub.drop_after(Q4, 10 << 20, times=1)
    hub.drop_after(Q4, 0, times=hub_mod.ATTEMPTS)
    monkeypatch.setattr(hub_mod, "_sleep", lambda s: None)
    with pytest.raises(hub_mod.TransferInterrupted):
        do_pull(store, f"{REPO}:Q4_1")
    parts = list((store.root / ".downloads").rglob("*.part"))
    assert parts and parts[0].stat().st_size >= 10 << 20
    hub.reset_counters()
    _, entry = do_pull(store, f"{REPO}:Q4_1")
    resumed = [r for r in hub.requests if r[1].endswith(Q4) and r[2]]
    assert resumed and resumed[0][2].startswith("bytes=")
    assert hub.bytes_sent[Q4] < builtin.GGUF_SIZE  # only the rest was sent
    check_installed(entry, Q4)


def test_cancelled_pull_leaves_nothing_installed(hub: HubServer, store: ModelStore):
    cancel = threading.Event()

    def progress(msg: dict) -> None:
        if msg.get("completed", 0) > 10 << 20:
            cancel.set()

    with pytest.raises(pull.PullCancelled):
        pull.pull(store, pull.PullRequest(model=f"{REPO}:Q4_1"), progress, cancel)
    assert store.list() == []


def test_split_gguf_is_refused_clearly(store: ModelStore, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch, gguf_file: Path):
    folder = tmp_path / "split"
    folder.mkdir()
    for i in (1, 2):
        os.link(gguf_file, folder / f"Big-Q4_K_M-0000{i}-of-00002.gguf")
    with HubServer() as server:
        server.add_repo("org/Big-GGUF", folder)
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        with pytest.raises(StoreError, match="split"):
            do_pull(store, "org/Big-GGUF:Q4_K_M")
        assert sum(server.bytes_sent.values()) == 0


def test_not_a_gguf_file_is_refused(store: ModelStore, tmp_path: Path):
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf at all" * 10)
    with pytest.raises(StoreError, match="not a GGUF file"):
        do_pull(store, str(fake))
    assert_clean(store)


BLOCKER = '''
import importlib.abc, sys
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"torch", "optimum", "transformers", "diffusers", "nncf"}:
            raise ImportError(f"{name} is blocked: this is a runtime-only environment")
sys.meta_path.insert(0, _Block())
'''


def test_local_gguf_through_the_cli_without_torch(tmp_path: Path, gguf_file: Path):
    """The runtime-only install: torch, optimum-intel and transformers cannot be imported
    (in the CLI and in its conversion child), and the GGUF pull works all the same."""
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(BLOCKER)
    env = {**os.environ, "PYTHONPATH": str(blocker)}
    probe = subprocess.run([sys.executable, "-c", "import torch"], env=env,
                           capture_output=True, text=True)
    assert "blocked" in probe.stderr
    local = tmp_path / "My Model.Q4_1.gguf"  # a space: names are made safe
    shutil.copy(gguf_file, local)
    models = tmp_path / "models"
    r = subprocess.run([sys.executable, "-m", "ovms_plugin", "--models-dir", str(models),
                        "pull", str(local)], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert "installed My-Model.Q4_1" in r.stdout and "converting llama Q4_1 GGUF" in r.stderr
    entry = ModelStore(models).get("My-Model.Q4_1")
    check_installed(entry, local.name)
    assert entry.manifest["conversion"]["peak_rss_bytes"] > 0
    assert local.is_file()  # the user's file is left alone
    r = subprocess.run([sys.executable, "-m", "ovms_plugin", "--models-dir", str(models),
                        "list"], env=env, capture_output=True, text=True, timeout=60)
    assert "My-Model.Q4_1" in r.stdout and "Q4_1" in r.stdout


def test_pull_model_stream_through_the_plugin(hub: HubServer, start_host, tmp_path: Path):
    host = start_host(tmp_path / "home", HF_ENDPOINT=hub.endpoint)
    msgs = list(host.call("PullModelStream", _pull_req("PullModelStream", {
        "model": f"hf.co/{REPO}:Q4_1", "stream": True, "model_type": "chat"})))
    data = [json.loads(m.data) for m in msgs]
    assert all(m.code == 0 for m in msgs) and data[-1] == {"status": "success"}
    assert any(d.get("completed", 0) > 0 and d.get("total") == builtin.GGUF_SIZE for d in data)
    models = json.loads(host.call("ListModels").response_json)["models"]
    assert [m["name"] for m in models] == [f"{REPO}-Q4_1"]
    assert models[0]["details"]["quantization_level"] == "Q4_1"
    r = host.invoke("chat", {"model": f"{REPO}-Q4_1", "max_tokens": 16, "temperature": 0,
                             "messages": [{"role": "user",
                                           "content": "What is the capital of France?"}]})
    assert r.code == 0, r.message
    assert "Paris" in json.loads(r.response_data)["choices"][0]["message"]["content"]


def _logits(folder: Path, ids) -> Any:
    """Every position's logits from the model's IR, in f32, teacher-forced."""
    import numpy as np
    import openvino as ov
    req = ov.Core().compile_model(folder / "openvino_model.xml", "CPU", {
        "INFERENCE_PRECISION_HINT": "f32"}).create_infer_request()
    n = ids.shape[1]
    req.infer({"input_ids": ids, "attention_mask": np.ones((1, n), np.int64),
               "position_ids": np.arange(n, dtype=np.int64)[None],
               "beam_idx": np.zeros(1, np.int32)})
    return req.get_tensor("logits").data[0].copy()


def test_int8_requantisation_keeps_the_model(store: ModelStore, gguf_file: Path,
                                             test_models: dict[str, Path]):
    """weight_format int8 on a GGUF pull: every matrix the model multiplies by becomes int8
    with a scale per channel, and the model still predicts what the Q4_1 IR predicts
    (teacher-forced on real text)."""
    import numpy as np
    import openvino as ov
    import openvino_genai as ov_genai
    entry = pull.pull(store, pull.PullRequest(model=str(gguf_file), name="smol8",
                                              weight_format="int8"), lambda m: None)
    m = entry.manifest
    assert m["weight_format"] == "int8" and m["quantization_level"] == "int8"
    assert m["gguf"]["file_type"] == "Q4_1" and pull.verify(entry) == []
    model = ov.Core().read_model(entry.path / "openvino_model.xml")
    kinds = {}
    for node in model.get_ordered_ops():
        if node.get_type_name() == "MatMul":
            src = node.input(1).get_source_output().get_node()
            while src.get_input_size() and src.get_type_name() != "Constant":
                src = src.input(0).get_source_output().get_node()
            kinds[node.get_friendly_name()] = str(src.get_output_element_type(0))
    weights = [k for k in kinds.values() if k != "<Type: 'int64_t'>"]
    assert len(weights) == 211 and all(k == "<Type: 'int8_t'>" for k in weights), kinds
    original = test_models[devmodels.SMOLLM2]
    tok = ov_genai.Tokenizer(str(original))
    text = Path(__file__).with_name("test_pull_gguf.py").read_text()[:2000]
    ids = np.asarray(tok.encode(text, add_special_tokens=False).input_ids.data)[:, :200]
    a, b = _logits(original, ids), _logits(entry.path, ids)
    assert (a.argmax(-1) == b.argmax(-1)).mean() >= 0.85

    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))
    pa, pb = log_softmax(a), log_softmax(b)
    assert (np.exp(pa) * (pa - pb)).sum(-1).mean() < 0.02
