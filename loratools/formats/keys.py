"""Parsing one tensor key: suffix -> role (the adapters' suffix tables, then the codecs' own spellings), prefix ->
component and module name (the codecs' prefixes).

A key is split into ``stem`` (what names the module, prefix included) and ``role`` (which tensor of the adapter it
is). Roles are canonical: ``lora_down``/``lora_up`` whatever the file calls A/B.
"""

from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

from loratools.adapters.base import suffix_table
from loratools.formats.codec import Codec, KeyParts, codecs

# Module paths that name a text encoder even without a text-encoder prefix.
_TE_HEADS = ("text_model.", "text_model_", "encoder.block.", "encoder_block_")


@lru_cache(maxsize=1)
def _suffixes() -> tuple[dict, dict]:
    """(two-part suffixes, one-part suffixes) -> (role, spelling)."""
    table = suffix_table()
    return ({k: v for k, v in table.items() if len(k) == 2}, {k[0]: v for k, v in table.items() if len(k) == 1})


@lru_cache(maxsize=1)
def _parsers() -> tuple:
    return tuple(c for c in codecs() if type(c).parse is not Codec.parse)


def parse_key(key: str) -> KeyParts:
    """Split a tensor key into stem, role and suffix spelling."""
    parts = key.split(".")
    for codec in _parsers():
        hit = codec.parse(key, parts)
        if hit is not None:
            return hit
    two, one = _suffixes()
    n = len(parts)
    if n >= 3:
        hit = two.get((parts[-2], parts[-1]))
        if hit:
            return KeyParts(".".join(parts[:-2]), *hit)
    if n >= 2:
        hit = one.get(parts[-1])
        if hit:
            return KeyParts(".".join(parts[:-1]), *hit)
    return KeyParts(key, "unknown", "plain")


class StemParts(NamedTuple):
    component: str
    name: str
    naming: str  # the codec whose prefix the stem has, or "plain" for none


@lru_cache(maxsize=1)
def _prefixes() -> list[tuple[str, str, str]]:
    """(prefix, component, codec id), longest prefix first."""
    out = [(p, comp, c.id) for c in codecs() for p, comp in c.prefixes]
    return sorted(out, key=lambda x: -len(x[0]))


def split_stem(stem: str) -> StemParts:
    for prefix, component, naming in _prefixes():
        if stem.startswith(prefix):
            name = stem[len(prefix):]
            if naming == "cloneofsimo":
                name = stem
            elif component == "model" and name.startswith(_TE_HEADS) and naming in ("peft", "diffusers"):
                component = "te1"
            return StemParts(component, name, naming)
    component = "te1" if stem.startswith(_TE_HEADS) else "model"
    return StemParts(component, stem, "plain")
