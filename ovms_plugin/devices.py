"""Intel devices: what OpenVINO sees, which device each service should run on, and the
compile properties the plugin passes for each.

Routing: each model kind (ovms_plugin.kinds) has a preference order over device classes (a
discrete GPU before an integrated one for chat, the NPU or CPU for embeddings and reranking,
any GPU before the CPU for images), overridden globally (`device:` in settings,
OVMS_PLUGIN_DEVICE) or per model (`models: {name: {device: GPU.1}}`). The result is an
ordered list of candidates; when compiling on one fails the next is tried, and the reasons
are kept for ListModels details.
Everything here takes a device description, so the decisions can be checked against
laptops this machine is not.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def routed_services() -> list[str]:
    """One service per registered kind (its first): what routing is decided for."""
    from ovms_plugin.kinds import registry as kinds
    return [k.services[0].name for k in kinds.all() if k.variant_of is None and k.services]


def _kind(service: str) -> Any:
    from ovms_plugin.kinds import registry as kinds
    kind = kinds.for_service(service)
    if kind is None:
        raise ValueError(f"no model kind serves {service!r}")
    return kind


@dataclass(frozen=True)
class Device:
    name: str  # CPU, GPU, GPU.0, GPU.1, NPU
    full_name: str = ""
    kind: str = ""  # "integrated" or "discrete" (GPUs); "" otherwise
    memory_bytes: int | None = None
    precisions: tuple[str, ...] = field(default_factory=tuple)

    @property
    def family(self) -> str:
        return self.name.split(".")[0]

    @property
    def device_class(self) -> str:
        return f"GPU.{self.kind}" if self.family == "GPU" and self.kind else self.family

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["precisions"] = list(self.precisions)
        out["services"] = [s for s in routed_services()
                           if self.family in _kind(s).devices_supported]
        return out


def discover(core: Any = None) -> list[Device]:
    """OpenVINO's devices, described. Properties a device does not report stay empty."""
    import openvino as ov
    core = core or ov.Core()
    devices = []
    for name in core.available_devices:
        def prop(key: str, default: Any = None, name: str = name) -> Any:
            try:
                return core.get_property(name, key)
            except Exception:  # not every device reports every property
                return default
        kind = str(prop("DEVICE_TYPE", "")).rsplit(".", 1)[-1].lower()
        memory = prop("GPU_DEVICE_TOTAL_MEM_SIZE")
        devices.append(Device(
            name=name, full_name=str(prop("FULL_DEVICE_NAME", name)),
            kind=kind if name.startswith("GPU") else "",
            memory_bytes=int(memory) if memory else None,
            precisions=tuple(str(p) for p in prop("OPTIMIZATION_CAPABILITIES", []))))
    return devices


def candidates(service: str, devices: list[Device], override: str | None = None
               ) -> list[str]:
    """The devices to try for a service, best first. An override names a device
    ("GPU.1"), a family ("GPU": its devices, discrete first) or AUTO (the service's own
    preference); the CPU is always the last resort."""
    present = {d.name: d for d in devices}
    order: list[str] = []
    wanted = (override or "AUTO").upper()
    if wanted != "AUTO":
        if wanted in present:
            order.append(wanted)
        else:
            family = [d for d in devices if d.family == wanted]
            family.sort(key=lambda d: d.kind != "discrete")
            order.extend(d.name for d in family)
        if not order:
            log.warning("device %s is not present (have %s); using the %s default",
                        override, ", ".join(present) or "none", service)
    kind = _kind(service)
    if not order or wanted == "AUTO":
        for cls in kind.device_preference:
            order.extend(d.name for d in devices if d.device_class == cls or
                         (cls == d.family and d.family != "GPU"))
    if "CPU" in present or not devices:
        order.append("CPU")
    seen: set[str] = set()
    return [d for d in order if not (d in seen or seen.add(d))
            and d.split(".")[0] in kind.devices_supported]


def compile_properties(device: str, task: str, cache_dir: Path | None,
                       options: dict[str, Any] | None = None,
                       cache_mode: str = "auto", model_bytes: int = 0) -> dict[str, Any]:
    """OpenVINO properties for compiling a model of `task` on `device`, before the model's
    own `properties` from settings (which win). `cache_mode`: "auto" caches compiled blobs
    on GPU and NPU (where compiling takes seconds to minutes), "always" on every device,
    "never" nowhere."""
    options = options or {}
    family = device.split(".")[0]
    props: dict[str, Any] = {}
    if cache_dir is not None and (cache_mode == "always" or
                                  (cache_mode == "auto" and family in ("GPU", "NPU"))):
        # Compiled blobs: the second load skips compilation.
        props["CACHE_DIR"] = str(cache_dir)
    from ovms_plugin.kinds import registry as kinds
    kind = kinds.for_task(task)
    if kind is not None:  # what the kind's engine needs on this device family
        props.update(kind.compile_properties(family, options, model_bytes))
    return props


def prune_cache(cache_dir: Path, max_bytes: int) -> list[Path]:
    """Keeps the compiled-blob cache under `max_bytes`, removing the least recently used
    files first; returns what it removed."""
    if not cache_dir.is_dir():
        return []
    files = [(f.stat().st_atime, f.stat().st_size, f) for f in cache_dir.rglob("*")
             if f.is_file()]
    total = sum(size for _, size, _ in files)
    removed = []
    for _, size, f in sorted(files, key=lambda x: x[0]):
        if total <= max_bytes:
            break
        f.unlink(missing_ok=True)
        total -= size
        removed.append(f)
    return removed
