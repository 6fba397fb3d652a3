"""The model store: one folder per installed model, each with the OpenVINO files and a
manifest (ovms-manifest.json). Installs are staged in <store>/.staging and renamed into
place, so a half-copied model is never visible."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from xml.etree.ElementTree import ParseError

from ovms_plugin.osutil import windows_name_problem
from ovms_plugin.store import ir

log = logging.getLogger(__name__)

MANIFEST = "ovms-manifest.json"
STAGING = ".staging"
# Model names: Hugging Face style ids ("org/name") or plain names, nothing that could
# leave the store.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}(/[A-Za-z0-9][A-Za-z0-9._-]{0,127})?$")

class StoreError(Exception):
    """A store operation failed; the message says what to do."""


class ModelNotFound(StoreError):
    pass


def shown(value: object, limit: int = 80) -> str:
    """repr() of something from outside, cut to `limit` characters for messages and logs."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


MAX_NAME = 200  # the folder name stays well under file systems' 255


def name_problem(name: object) -> str | None:
    """Why `name` cannot name a model, or None. One name, one folder: `org/x` is stored as
    `org--x`, so '--' is kept for that and refused in names."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        return ("use letters, digits, '.', '_' and '-', optionally one 'org/' prefix (like a "
                "Hugging Face id)")
    if len(name) > MAX_NAME:
        return f"at most {MAX_NAME} characters"
    if ".." in name or "--" in name:
        return "no '..' and no '--' ('org--x' is how 'org/x' is stored: call it 'org/x')"
    for part in name.split("/"):  # device names, a trailing '.': Windows' rules, everywhere
        if (why := windows_name_problem(part)) is not None:
            return why
    return None


def check_name(name: str) -> str:
    if (why := name_problem(name)) is not None:
        raise StoreError(f"invalid model name {shown(name)}: {why}; no absolute paths")
    return name


def folder_name(name: str) -> str:
    return check_name(name).replace("/", "--")


def rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def task_from(files: set[str], config: dict[str, Any]) -> str | None:
    """The task of a model from its file names and config.json, for OpenVINO IR and
    Hugging Face formats alike (a local folder or a Hub repo's file list): the task of the
    kind whose recognition rule claims it most specifically."""
    from ovms_plugin.kinds import registry as kinds
    kind = kinds.recognise(files, config)
    return kind.task if kind else None


def is_openvino(files: set[str]) -> bool:
    """Files some kind's engine loads as they are: OpenVINO IR at the top of the folder (a
    diffusers pipeline keeps one IR per component folder). IR only in a subfolder beside
    other formats (sentence-transformers repos ship openvino/ and onnx/ exports of their
    own) does not count: those are converted."""
    from ovms_plugin.kinds import registry as kinds
    return kinds.is_native(files)


def relative_files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def detect_task(folder: Path) -> str | None:
    """The task of an OpenVINO model folder; None when it holds no OpenVINO model."""
    files = relative_files(folder)
    if not is_openvino(files):
        return None
    return task_from(files, read_json(folder / "config.json"))


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class ModelEntry:
    name: str
    path: Path
    manifest: dict[str, Any]

    @property
    def task(self) -> str:
        return self.manifest["task"]

    @property
    def services(self) -> tuple[str, ...]:
        """The services of its kind (none when no registered kind serves its task)."""
        from ovms_plugin.kinds import registry as kinds
        kind = kinds.for_task(self.task)
        return tuple(s.name for s in kind.services) if kind else ()

    @property
    def size(self) -> int:
        return sum(int(f["size"]) for f in self.manifest.get("files", []))

    @property
    def config(self) -> dict[str, Any]:
        return read_json(self.path / "config.json")

    def context_length(self) -> int | None:
        cfg = self.config
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
            if isinstance(cfg.get(key), int):
                return cfg[key]
        return None

    def to_aog(self) -> dict[str, Any]:
        """The ListModels entry AOG parses (modified_at must be RFC 3339)."""
        m = self.manifest
        family = m.get("family") or ""
        return {
            "name": self.name,
            "model": self.name,
            "modified_at": m.get("installed_at") or rfc3339(self.path.stat().st_mtime),
            "size": self.size,
            "digest": m.get("digest", ""),
            "details": {
                "format": "openvino",
                "family": family,
                "families": [family] if family else [],
                "parameter_size": m.get("parameter_size", ""),
                "quantization_level": m.get("quantization_level", ""),
                **({"context_length": ctx} if (ctx := self.context_length()) else {}),
            },
            **({"source": _source_of(m)} if m.get("source") else {}),
        }


def _source_of(manifest: dict[str, Any]) -> str:
    """Where a model came from, for a person: hf:org/name@revision (file.gguf, sha256 ...),
    or the name of a local file or folder (never the host path)."""
    source = manifest["source"]
    if not source.startswith(("hf:", "pypi:")):
        source = f"local:{Path(source).name}"
    if manifest.get("revision"):
        source += f"@{manifest['revision'][:12]}"
    if gguf := manifest.get("gguf"):
        source += f" ({gguf['file']}, sha256 {gguf['sha256'][:12]})"
    return source


def describe_folder(folder: Path, hashes: dict[str, str] | None = None,
                    **fields: Any) -> dict[str, Any]:
    """Builds a manifest for an OpenVINO model folder: files with sizes and hashes (taken
    from `hashes` by relative path when already known), task, family, parameter size,
    quantization level. `fields` adds source, revision, ..."""
    hashes = hashes or {}
    task = fields.pop("task", None) or detect_task(folder)
    if task is None:
        raise StoreError(f"{folder} holds no OpenVINO model (no openvino_model.xml and no "
                         "model_index.json); pull a folder of OpenVINO IR or a Hugging Face repo")
    files = []
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            rel = p.relative_to(folder).as_posix()
            files.append({"path": rel, "size": p.stat().st_size,
                          "sha256": hashes.get(rel) or sha256_file(p)})
    config = read_json(folder / "config.json")
    xml = folder / "openvino_model.xml"
    if not xml.is_file():
        xml = folder / "unet" / "openvino_model.xml"
    level, n_weights = ir.weight_stats(xml) if xml.is_file() else ("unknown", 0)
    params = ir.parameter_count_from_config(config) or n_weights
    digest = hashlib.sha256(json.dumps([(f["path"], f["sha256"]) for f in files])
                            .encode()).hexdigest()
    return {
        "format": "openvino", "task": task,
        "family": config.get("model_type", ""),
        "parameter_size": ir.format_parameter_size(params) if params else "",
        "quantization_level": level,
        "files": files, "digest": f"sha256:{digest}",
        "installed_at": rfc3339(time.time()),
        **fields,
    }


class ModelStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self._lock = threading.Lock()

    def _ensure(self) -> None:
        (self.root / STAGING).mkdir(parents=True, exist_ok=True)

    def folder(self, name: str) -> Path:
        return self.root / folder_name(name)

    def list(self) -> list[ModelEntry]:
        """Every valid model folder; a folder without a manifest (copied in by hand) gets one
        written on first sight."""
        if not self.root.is_dir():
            return []
        entries = []
        for folder in sorted(self.root.iterdir()):
            if folder.name.startswith(".") or not folder.is_dir():
                continue
            entry = self._entry(folder)
            if entry is not None:
                entries.append(entry)
        return entries

    def _entry(self, folder: Path) -> ModelEntry | None:
        manifest = read_json(folder / MANIFEST)
        if not manifest:
            if detect_task(folder) is None:
                return None
            try:
                manifest = describe_folder(folder, name=folder.name.replace("--", "/"),
                                           source=str(folder))
                _write_json(folder / MANIFEST, manifest)
            except (StoreError, OSError, ParseError) as e:
                log.warning("skipping %s: %s", folder, e)
                return None
        name = folder.name.replace("--", "/", 1)  # one folder, one name (the manifest's is a copy)
        return ModelEntry(name=name, path=folder, manifest=manifest)

    def find(self, name: str) -> ModelEntry | None:
        if name_problem(name) is None:
            folder = self.folder(name)
            if folder.is_dir():
                return self._entry(folder)
        return None

    def get(self, name: str) -> ModelEntry:
        if (entry := self.find(name)) is not None:
            return entry
        available = ", ".join(e.name for e in self.list()) or "none installed"
        raise ModelNotFound(f"model {name!r} is not in the model store; available: "
                            f"{available}. Pull it first (PullModel or "
                            f"'python -m ovms_plugin pull {name}').")

    def staging_dir(self) -> Path:
        """A new folder to build a model in, named after this process so that `gc` can tell
        a live pull's folder from a killed one's."""
        self._ensure()
        path = self.root / STAGING / _owned("new")
        path.mkdir()
        return path

    def gc(self) -> list[tuple[str, int]]:
        """Removes what killed or failed pulls left: staging folders of processes that no
        longer run, and downloads no pull is using (their repo@revision lock is free).
        Returns (what, bytes) for each removal."""
        from filelock import FileLock, Timeout

        from ovms_plugin.osutil import pid_alive
        freed = []
        staging = self.root / STAGING
        for item in sorted(staging.iterdir()) if staging.is_dir() else []:
            owner = item.name.split("-", 2)[1] if item.name.count("-") >= 2 else ""
            if owner.isdigit() and pid_alive(int(owner)):
                continue  # a pull (or an install) of a running process
            freed.append((f"staging folder {item.name}", _tree_size(item)))
            _remove(item)
        downloads = self.root / ".downloads"
        for item in sorted(downloads.iterdir()) if downloads.is_dir() else []:
            lock = FileLock(str(self.root / ".locks" / f"{item.name}.lock"), timeout=0)
            try:
                with lock:
                    freed.append((f"download {item.name}", _tree_size(item)))
                    _remove(item)
            except Timeout:
                continue  # a pull is using it
        for what, size in freed:
            log.info("gc: removed %s (%.1f MB)", what, size / 2**20)
        return freed

    def install(self, staged: Path, name: str, manifest: dict[str, Any]) -> ModelEntry:
        """Moves a validated staging folder into the store in one rename. An existing model
        of that name is replaced (its old folder is renamed away first, then removed)."""
        target = self.folder(name)
        manifest = {**manifest, "name": name}
        _write_json(staged / MANIFEST, manifest)
        with self._lock:
            old = None
            try:
                if target.exists():
                    old = self.root / STAGING / _owned("old")
                    os.rename(target, old)
                os.rename(staged, target)
            except PermissionError:
                if old is not None and not target.exists():
                    os.rename(old, target)  # the installed version stays as it was
                raise _in_use(name, "replaced") from None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        log.info("installed model %s at %s", name, target)
        return ModelEntry(name=name, path=target, manifest=manifest)

    def delete(self, name: str) -> None:
        entry = self.get(name)
        trash = self.root / STAGING / _owned("deleted")
        self._ensure()
        try:
            os.rename(entry.path, trash)
        except PermissionError:
            raise _in_use(name, "deleted") from None
        shutil.rmtree(trash, ignore_errors=True)


def _in_use(name: str, what: str) -> StoreError:
    """A model folder the system would not move: on Windows, one whose files a running
    engine has open (a loaded model), or an open file browser or scanner."""
    return StoreError(f"model {name!r} cannot be {what} now: another process has its files "
                      "open (on Windows, a loaded model's files cannot be moved). Unload it "
                      "(or close what holds it) and try again")


def _owned(kind: str) -> str:
    """A staging name that says which process made it: <kind>-<pid>-<random>."""
    return f"{kind}-{os.getpid()}-{uuid.uuid4().hex}"


def _tree_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)

