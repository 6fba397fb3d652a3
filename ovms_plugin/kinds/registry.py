"""The registry of model kinds: functions only, no kind module imported, so a kind module
can ask it (kinds/__init__.py registers the built-in kinds and re-exports this)."""

from __future__ import annotations

from typing import Any

from ovms_plugin.kinds.base import Kind, Service

_KINDS: dict[str, Kind] = {}


def register(kind: Kind) -> Kind:
    """Adds a kind; a kind of the same name is replaced. Its services and task must not be
    another kind's."""
    for other in _KINDS.values():
        if other.name == kind.name:
            continue
        taken = {s.name for s in other.services} & {s.name for s in kind.services}
        if taken:
            raise ValueError(f"kind {kind.name!r}: service(s) {sorted(taken)} are kind "
                             f"{other.name!r}'s")
        if kind.variant_of is None and other.variant_of is None and other.task == kind.task:
            raise ValueError(f"kind {kind.name!r}: task {kind.task!r} is kind "
                             f"{other.name!r}'s")
    _KINDS[kind.name] = kind
    return kind


def unregister(name: str) -> None:
    _KINDS.pop(name, None)


def all() -> list[Kind]:
    """Every registered kind, engine variants included, in registration order."""
    return list(_KINDS.values())


def _primary() -> list[Kind]:
    return [k for k in _KINDS.values() if k.variant_of is None]


def get(name: str) -> Kind:
    try:
        return _KINDS[name]
    except KeyError:
        raise KeyError(f"unknown model kind {name!r}; known: {', '.join(_KINDS)}") from None


def for_task(task: str) -> Kind | None:
    """The kind of the store's models of `task` (None: no kind serves it)."""
    return next((k for k in _primary() if k.task == task), None)


def for_service(service: str) -> Kind | None:
    return next((k for k in _primary() if any(s.name == service for s in k.services)), None)


def service(name: str) -> Service | None:
    kind = for_service(name)
    return next(s for s in kind.services if s.name == name) if kind else None


def services() -> list[str]:
    """Every service name, in registration order."""
    return [s.name for k in _primary() for s in k.services]


def recognise(files: set[str], config: dict[str, Any]) -> Kind | None:
    """The kind a folder's (or a Hub repo's) files and config.json say it is: the one whose
    rule is the most specific."""
    ranked = [(rank, i, k) for i, k in enumerate(_primary())
              if (rank := k.recognise(files, config)) is not None]
    return min(ranked, key=lambda r: (r[0], r[1]))[2] if ranked else None


def is_native(files: set[str]) -> bool:
    """The files are a model some kind's engine loads as they are (OpenVINO IR, ...)."""
    return any(k.is_native(files) for k in _primary())
