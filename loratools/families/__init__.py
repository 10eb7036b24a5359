"""Base-model families: one data file per family (``data/<id>.json``) and the text encoders they share
(``encoders.json``), read as package data; see ``docs/families.md`` for the schema and the recipe for adding one.
"""

from __future__ import annotations

import difflib
import json
from functools import lru_cache
from importlib import resources

from ..errors import UnknownFamily
from .detect import DECIDED, FamilyResult, ModuleEvidence, detect_family
from .engine import normalise
from .family import Encoders, Family

__all__ = [
    "DECIDED", "FAMILY_IDS", "Family", "FamilyResult", "ModuleEvidence", "data_files", "detect_family", "encoders",
    "get_family", "load_families", "normalise",
]


def _package():
    return resources.files(__name__)


def data_files() -> list[str]:
    """The package data the families are read from, relative to this package."""
    names = sorted(p.name for p in (_package() / "data").iterdir() if p.name.endswith(".json"))
    return [f"data/{n}" for n in names] + ["encoders.json"]


FAMILY_IDS: tuple[str, ...] = tuple(sorted(n[len("data/"):-len(".json")] for n in data_files() if n.startswith("data/")))


def _read(rel: str) -> dict:
    return json.loads((_package() / rel).read_text(encoding="utf-8"))


@lru_cache(maxsize=None)
def _load(fid: str) -> Family:
    data = _read(f"data/{fid}.json")
    if data.get("id") != fid:
        raise ValueError(f"family file {fid}.json declares id {data.get('id')!r}")
    return Family(data)


@lru_cache(maxsize=1)
def load_families() -> dict[str, Family]:
    """Every family, parsed once."""
    return {fid: _load(fid) for fid in FAMILY_IDS}


@lru_cache(maxsize=1)
def encoders() -> Encoders:
    """The shared text-encoder vocabulary."""
    return Encoders(_read("encoders.json"))


def get_family(fid: str) -> Family:
    if fid not in FAMILY_IDS:
        best = difflib.get_close_matches(str(fid), FAMILY_IDS, n=1, cutoff=0.0)
        raise UnknownFamily(f"unknown family '{fid}'; did you mean '{best[0]}'?")
    return _load(fid)
