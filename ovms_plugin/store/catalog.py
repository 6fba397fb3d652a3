"""The curated model catalog (models/catalog.yaml): short names for recommended models."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import yaml

from ovms_plugin import paths

CATALOG = paths.PACKAGE_DIR / "catalog.yaml"


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    repo: str
    services: tuple[str, ...]
    devices: tuple[str, ...] = ()
    weight_format: str | None = None
    size: str = ""
    description: str = ""


@cache
def entries() -> dict[str, CatalogEntry]:
    data = yaml.safe_load(CATALOG.read_text())["models"]
    out = {}
    for name, e in data.items():
        out[name] = CatalogEntry(name=name, repo=e["repo"], services=tuple(e["services"]),
                                 devices=tuple(e.get("devices", ())),
                                 weight_format=e.get("weight_format"), size=e.get("size", ""),
                                 description=e.get("description", ""))
    return out


def lookup(name: str) -> CatalogEntry | None:
    return entries().get(name)
