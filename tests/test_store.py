"""The model store: local pulls are staged and atomic, manifests describe the model,
names cannot escape the store, and ListModels reads what is there."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest

from ovms_plugin.store import ir, pull
from ovms_plugin.store.store import MANIFEST, STAGING, ModelStore, StoreError, check_name


def _pull(store: ModelStore, src: Path, name: str, **kw) -> list[dict]:
    msgs: list[dict] = []
    pull.pull(store, pull.PullRequest(model=str(src), name=name, **kw), msgs.append)
    return msgs


def test_pull_local_folder(tmp_path: Path, test_models: dict[str, Path]):
    store = ModelStore(tmp_path / "models")
    src = test_models["tiny-chat"]
    msgs = _pull(store, src, "my-chat", model_type="chat")
    assert msgs[-1] == {"status": "success"}
    xml = next(m for m in msgs if m.get("digest") == "openvino_model.xml"
               and m["completed"] == m["total"])
    assert xml["total"] == (src / "openvino_model.xml").stat().st_size
    entry = store.get("my-chat")
    assert entry.task == "text-generation" and entry.services == ("chat", "generate")
    m = entry.manifest
    assert m["model_type"] == "chat" and m["source"] == str(src)
    assert {f["path"] for f in m["files"]} >= {"openvino_model.xml", "openvino_tokenizer.xml"}
    assert pull.verify(entry) == []
    assert list((store.root / STAGING).iterdir()) == []  # nothing left in staging


def test_nothing_half_done_is_visible(tmp_path: Path, test_models: dict[str, Path]):
    store = ModelStore(tmp_path / "models")
    broken = tmp_path / "broken"
    shutil.copytree(test_models["tiny-chat"], broken)
    (broken / "openvino_detokenizer.xml").unlink()
    with pytest.raises(StoreError, match=r"openvino_detokenizer\.xml missing"):
        _pull(store, broken, "broken")
    assert store.list() == [] and list((store.root / STAGING).iterdir()) == []


def test_cancelled_pull_leaves_nothing(tmp_path: Path, test_models: dict[str, Path]):
    store = ModelStore(tmp_path / "models")
    cancel = threading.Event()

    def progress(msg: dict) -> None:
        if msg.get("completed"):
            cancel.set()

    with pytest.raises(pull.PullCancelled):
        pull.pull(store, pull.PullRequest(model=str(test_models["tiny-chat"]), name="c"),
                  progress, cancel)
    assert store.list() == [] and list((store.root / STAGING).iterdir()) == []


def test_model_type_mismatch_is_refused(tmp_path: Path, test_models: dict[str, Path]):
    store = ModelStore(tmp_path / "models")
    with pytest.raises(StoreError, match="text-generation model, but model_type 'embed'"):
        _pull(store, test_models["tiny-chat"], "x", model_type="embed")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreError, match="not a model this plugin can serve"):
        _pull(store, tmp_path / "empty", "x")
    with pytest.raises(StoreError, match="unknown model_type"):
        pull.PullRequest.from_json({"model": "/x", "model_type": "video"})


@pytest.mark.parametrize("name", ["../x", "/abs", "a/b/c", "a/../b", "", "x y", ".hidden",
                                  "a\\b", "a" * 200])
def test_names_never_escape_the_store(name: str):
    with pytest.raises(StoreError, match="invalid model name"):
        check_name(name)


def test_hf_style_names_are_folders(tmp_path: Path, test_models: dict[str, Path]):
    store = ModelStore(tmp_path / "models")
    _pull(store, test_models["tiny-chat"], "OpenVINO/tiny-chat-ov")
    assert (store.root / "OpenVINO--tiny-chat-ov").is_dir()
    assert [e.name for e in store.list()] == ["OpenVINO/tiny-chat-ov"]
    store.delete("OpenVINO/tiny-chat-ov")
    assert store.list() == []


def test_folder_copied_in_by_hand_is_listed(tmp_path: Path, test_models: dict[str, Path]):
    store = ModelStore(tmp_path / "models")
    shutil.copytree(test_models["tiny-chat"], store.root / "hand-made")
    (store.root / "not-a-model").mkdir()
    [entry] = store.list()
    assert entry.name == "hand-made" and entry.task == "text-generation"
    assert (entry.path / MANIFEST).is_file()
    aog = entry.to_aog()
    assert aog["details"]["quantization_level"] == "FP32"


def test_reinstall_replaces_atomically(tmp_path: Path, test_models: dict[str, Path]):
    store = ModelStore(tmp_path / "models")
    _pull(store, test_models["tiny-chat"], "m")
    first = json.loads((store.folder("m") / MANIFEST).read_text())["installed_at"]
    _pull(store, test_models["tiny-chat"], "m")
    assert len(store.list()) == 1 and store.get("m").manifest["installed_at"] >= first


@pytest.mark.parametrize("fail_on", [1, 2])
def test_a_model_whose_files_are_held_is_left_as_it_was(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail_on: int):
    """Windows will not move a folder whose files a loaded model's engine has open: the
    replace (failing at its first or second rename) and the delete say so, and the
    installed model stays whole."""
    import os

    from ovms_plugin.store import store as store_mod
    store = ModelStore(tmp_path / "models")
    for version in ("v1", "v2"):
        staged = store.staging_dir()
        (staged / "weights.bin").write_text(version)
        if version == "v1":
            store.install(staged, "m", {"source": version})
    real_rename, calls = os.rename, []

    def rename(src, dst):
        calls.append(src)
        if len(calls) == fail_on:
            raise PermissionError(32, "The process cannot access the file")
        return real_rename(src, dst)

    monkeypatch.setattr(store_mod.os, "rename", rename)
    with pytest.raises(StoreError, match=r"cannot be replaced now.*Unload it"):
        store.install(staged, "m", {"source": "v2"})
    assert (store.folder("m") / "weights.bin").read_text() == "v1"
    assert store.get("m").manifest["source"] == "v1"


def test_deleting_a_model_whose_files_are_held_says_so(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch):
    from ovms_plugin.store import store as store_mod
    store = ModelStore(tmp_path / "models")
    staged = store.staging_dir()
    (staged / "weights.bin").write_text("v1")
    store.install(staged, "m", {"source": "v1"})

    def held(src, dst):
        raise PermissionError(32, "The process cannot access the file")

    monkeypatch.setattr(store_mod.os, "rename", held)
    with pytest.raises(StoreError, match=r"cannot be deleted now.*Unload it"):
        store.delete("m")
    assert store.get("m").manifest["source"] == "v1"


def test_quantization_level_and_parameter_count(tmp_path: Path):
    xml = tmp_path / "m.xml"
    xml.write_text("""<?xml version="1.0"?><net><layers>
      <layer id="0" type="Const"><data element_type="u4" shape="64,128"/></layer>
      <layer id="1" type="Const"><data element_type="f16" shape="64,1"/></layer>
      <layer id="2" type="Parameter"><data element_type="f32" shape="1,8"/></layer>
    </layers></net>""")
    assert ir.weight_stats(xml) == ("INT4", 64 * 128 + 64)
    qwen_05b = {"model_type": "qwen2", "hidden_size": 896, "num_hidden_layers": 24,
                "intermediate_size": 4864, "vocab_size": 151936, "num_attention_heads": 14,
                "num_key_value_heads": 2, "tie_word_embeddings": True}
    assert ir.format_parameter_size(ir.parameter_count_from_config(qwen_05b)) == "494.03M"
