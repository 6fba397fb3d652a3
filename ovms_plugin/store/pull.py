"""Pulling a model into the store. Every pull is staged in <store>/.staging and installed
with one rename after validation, so a failed or cancelled pull leaves nothing behind.

Progress messages follow the contract: {"status", "digest"?, "total"?, "completed"?},
then {"status": "success"}.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ovms_plugin.store.store import (
    MANIFEST,
    ModelEntry,
    ModelStore,
    StoreError,
    check_name,
    describe_folder,
    detect_task,
    sha256_file,
)

log = logging.getLogger(__name__)

# AOG service name (model_type) -> the task its model must have.
SERVICE_TASKS = {"chat": "text-generation", "generate": "text-generation",
                 "embed": "feature-extraction", "rerank": "text-classification",
                 "text-to-image": "text-to-image"}
# Files an installed model of each task must hold.
REQUIRED_FILES = {
    "text-generation": ["openvino_model.xml", "openvino_model.bin", "openvino_tokenizer.xml",
                        "openvino_detokenizer.xml"],
    "feature-extraction": ["openvino_model.xml", "openvino_model.bin",
                           "openvino_tokenizer.xml"],
    "text-classification": ["openvino_model.xml", "openvino_model.bin",
                            "openvino_tokenizer.xml"],
    "text-to-image": ["model_index.json"],
}

Progress = Callable[[dict[str, Any]], None]


class PullCancelled(StoreError):
    pass


@dataclass
class PullRequest:
    model: str
    name: str | None = None
    model_type: str | None = None

    @classmethod
    def from_json(cls, body: Any) -> PullRequest:
        if not isinstance(body, dict) or not isinstance(body.get("model"), str) \
                or not body["model"]:
            raise StoreError("the pull request needs 'model': a local folder of OpenVINO IR "
                             "or a model name")
        model_type = body.get("model_type") or None
        if model_type is not None and model_type not in SERVICE_TASKS:
            raise StoreError(f"unknown model_type {model_type!r}; use one of "
                             f"{sorted(SERVICE_TASKS)}")
        name = body.get("name") or None
        return cls(model=body["model"], name=name, model_type=model_type)


def pull(store: ModelStore, req: PullRequest, progress: Progress,
         cancel: threading.Event | None = None) -> ModelEntry:
    """Pulls synchronously (run it in a thread); raises StoreError with a clear reason."""
    cancel = cancel or threading.Event()
    src = Path(req.model).expanduser()
    if src.is_absolute() or req.model.startswith("."):
        if not src.is_dir():
            raise StoreError(f"{req.model} is not a folder; give a folder that holds an "
                             "OpenVINO model (openvino_model.xml, tokenizer IR)")
        name = check_name(req.name or src.resolve().name)
        return _pull_local(store, src, name, req.model_type, progress, cancel)
    check_name(req.name or req.model)
    raise StoreError(f"model {req.model!r} is not installed and pulling from Hugging Face is "
                     "not supported by this version; pull a local folder of OpenVINO IR "
                     "(an absolute path) instead")


def _check_task(task: str | None, model_type: str | None, where: str) -> str:
    if task is None:
        raise StoreError(f"{where} holds no OpenVINO model: expected openvino_model.xml (or "
                         "model_index.json for an image pipeline)")
    if model_type and SERVICE_TASKS[model_type] != task:
        raise StoreError(f"{where} is a {task} model, but model_type {model_type!r} needs a "
                         f"{SERVICE_TASKS[model_type]} model; pull it with a matching "
                         "model_type or none")
    return task


def _pull_local(store: ModelStore, src: Path, name: str, model_type: str | None,
                progress: Progress, cancel: threading.Event) -> ModelEntry:
    task = _check_task(detect_task(src), model_type, str(src))
    files = sorted(p for p in src.rglob("*") if p.is_file() and p.name != MANIFEST)
    need = sum(p.stat().st_size for p in files)
    free = shutil.disk_usage(store.root if store.root.exists() else
                             _existing_parent(store.root)).free
    if need > free:
        raise StoreError(f"not enough disk space for {name}: needs {need} bytes, "
                         f"{free} available in {store.root}")
    staged = store.staging_dir()
    try:
        hashes = {}
        for p in files:
            rel = p.relative_to(src).as_posix()
            size = p.stat().st_size
            done = 0
            dst = staged / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            h = hashlib.sha256()
            with open(p, "rb") as fin, open(dst, "wb") as fout:
                while chunk := fin.read(4 << 20):
                    if cancel.is_set():
                        raise PullCancelled(f"pull of {name} was cancelled")
                    fout.write(chunk)
                    h.update(chunk)
                    done += len(chunk)
                    progress({"status": f"copying {rel}", "digest": rel,
                              "total": size, "completed": done})
            if size == 0:
                progress({"status": f"copying {rel}", "total": 0, "completed": 0})
            hashes[rel] = h.hexdigest()
        progress({"status": "verifying"})
        _validate(staged, task)
        manifest = describe_folder(staged, task=task, source=str(src.resolve()),
                                   model_type=model_type, hashes=hashes)
        progress({"status": "writing manifest"})
        entry = store.install(staged, name, manifest)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    progress({"status": "success"})
    return entry


def _validate(folder: Path, task: str) -> None:
    missing = [f for f in REQUIRED_FILES[task] if not (folder / f).is_file()]
    if missing:
        raise StoreError(f"the model is incomplete: {', '.join(missing)} missing (a "
                         f"{task} model needs {', '.join(REQUIRED_FILES[task])})")


def _existing_parent(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def verify(entry: ModelEntry) -> list[str]:
    """Files of an installed model whose size or hash differs from its manifest."""
    bad = []
    for f in entry.manifest.get("files", []):
        p = entry.path / f["path"]
        if not p.is_file() or p.stat().st_size != f["size"] or sha256_file(p) != f["sha256"]:
            bad.append(f["path"])
    return bad
