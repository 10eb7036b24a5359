"""Where each module sits in the base model: its component, its block stack and block index, in model order.

A module's canonical name is its native (original checkpoint) path when the family's naming tables resolve it,
else the name the file spells when that is dotted; kohya-flattened names are never split on '_'. Its block is then
found, in this order, from data only:

1. the family file's block patterns (``detect.blocks``: Flux double/single blocks, Wan blocks, SD3 joint blocks,
   ...), matched on the normalised name; they also give the stack's size and its place in the model;
2. the naming tables' block stacks: a UNet's ``blocks`` map (``input_blocks``, ``middle_block``,
   ``output_blocks``) and every ``{i}`` template; for text encoders, the encoder layout's ``{i}`` templates
   (CLIP ``text_model.encoder.layers``, T5 ``encoder.block``);
3. the generic rule for a dotted name the tables do not know: the path up to its first all-digit segment
   (``blocks.12``, ``layers.3``).

Anything else (embedders, heads, norms outside the blocks) is "other", after the stacks of its component.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from loratools.families import encoders, get_family, normalise
from loratools.families.naming import NameRule, Templates

MODEL_COMPONENTS = ("unet", "transformer", "model")
OTHER = "other"
# stack sources, in the order their stacks are shown within a component
_PATTERN, _TABLE, _GENERIC = 0, 1, 2


@dataclass(frozen=True)
class Place:
    """A module's place: ``stack`` None means outside the block stacks ("other")."""

    component: str
    canonical: str
    stack: str | None = None
    index: int | None = None

    @property
    def block(self) -> str:
        return f"{self.stack} {self.index}" if self.stack is not None else self.canonical


@dataclass
class Stack:
    """A run of numbered blocks; ``order`` places it in its component, ``size`` is the model's block count when
    the data says it (else the cells shown run up to the highest index seen)."""

    name: str
    order: tuple
    size: int | None = None
    known: frozenset[int] = frozenset()


def _split(path: str) -> tuple[str, str] | None:
    """(prefix, index) at the first all-digit (or ``{i}``) segment of a dotted path, or None."""
    parts = path.split(".")
    for k, p in enumerate(parts):
        if k and (p.isdigit() or p == "{i}"):
            return ".".join(parts[:k]), p
    return None


@lru_cache(maxsize=None)
def _family_stacks(fid: str) -> tuple[list, dict[str, Stack]]:
    """A family's block patterns (regex, Stack) and its naming-table stacks by prefix, both in model order."""
    fam = get_family(fid)
    patterns = []
    for k, b in enumerate(fam.blocks):
        if b.source.startswith("^"):  # unanchored patterns (UNet inner transformer blocks) are not model stacks
            patterns.append((b.rx, Stack(b.says, (_PATTERN, k), b.count, frozenset(range(b.count)))))
    naming = fam.data.get("naming", {})
    found: dict[str, set[int] | None] = {}
    for native in naming.get("blocks", {}):  # literal UNet blocks: every index the model has
        cut = _split(native)
        if cut:
            found.setdefault(cut[0], set()).add(int(cut[1]))
    for rule in naming.get("rules", []):
        cut = _split(rule["native"])
        if cut and cut[1] == "{i}":
            found.setdefault(cut[0], set())
        elif cut and cut[0] in found:  # input_blocks.0.0 (conv_in) is block 0 of the input stack
            found[cut[0]].add(int(cut[1]))
    table = {prefix: Stack(prefix, (_TABLE, k), None, frozenset(idx or ())) for k, (prefix, idx) in
             enumerate(found.items())}
    return patterns, table


@lru_cache(maxsize=None)
def _encoder_templates() -> tuple[Templates, dict[str, Stack]]:
    """Every known text-encoder layout's module paths (to resolve flattened names when the family does not say
    which encoder a slot holds), and their ``{i}`` stacks."""
    paths, stacks = [], {}
    for enc in encoders().by_id.values():
        for p in enc.module_paths:
            if p not in paths:
                paths.append(p)
            cut = _split(p)
            if cut and cut[1] == "{i}":
                stacks.setdefault(cut[0], Stack(cut[0], (_TABLE, len(stacks))))
    return Templates([NameRule(p, (p,)) for p in paths]), stacks


def _encoder_sizes(eid: str | None) -> int | None:
    enc = encoders().by_id.get(eid) if eid else None
    return enc.layers if enc is not None else None


def _shared_patterns(candidates) -> list:
    """The block patterns of undecided families when every candidate has the same ones (Wan 2.1 and 2.2 differ
    in metadata only): then they place blocks without deciding the family; else none."""
    found = [_family_stacks(fid)[0] for fid in candidates or ()]
    if not found or any([(rx.pattern, st.name, st.size) for rx, st in f] !=
                        [(rx.pattern, st.name, st.size) for rx, st in found[0]] for f in found):
        return []
    return found[0]


class Placer:
    """Places the modules of one LoRA; ``family`` is a decided family id or None (then the block patterns of the
    ``candidates`` serve when they all agree)."""

    def __init__(self, family: str | None, fmt: str, modules, candidates=()):
        self.family = get_family(family) if family else None
        self.table = self.family.naming if self.family is not None and self.family.has_naming else None
        self.patterns, self.stacks = _family_stacks(family) if family else (_shared_patterns(candidates), {})
        self.spaces: dict[str, str] = {}
        if self.family is not None:
            self.spaces = self.family.encoder_spaces(fmt, ((m.component, m.name, m.adapter.in_dim) for m in modules))
        self._generic: dict[tuple[str, str], Stack] = {}

    def canonical(self, component: str, name: str) -> tuple[str | None, bool]:
        """(native path, True) when a table resolves the name, else (the dotted name as spelled, False), else
        (None, False) for a flattened name no table knows."""
        if component in MODEL_COMPONENTS:
            if self.table is not None:
                canon = self.table.resolve("model", name, "." not in name) or (
                    self.table.resolve("model", name.replace(".", "_"), True) if "." in name else None)
                if canon is not None:
                    return canon.native, True
        else:
            templates = _encoder_templates()[0]
            hit = templates.match(name, False) or templates.match(name.replace(".", "_"), True)
            if hit is not None:
                _, _, rule, numbers = hit
                native = rule.native
                for n in numbers:
                    native = native.replace("{i}", n, 1)
                return native, True
        return (name, False) if "." in name else (None, False)

    def place(self, component: str, name: str) -> tuple[Place, Stack | None]:
        canon, from_table = self.canonical(component, name)
        shown = canon or name
        cut = _split(canon) if canon else None
        if component in MODEL_COMPONENTS:
            flat = normalise(shown)
            for rx, stack in self.patterns:
                m = rx.match(flat)
                if m and m.groups():
                    return Place(component, shown, stack.name, int(m.group(1))), stack
            if cut and cut[0] in self.stacks:
                stack = self.stacks[cut[0]]
                return Place(component, shown, stack.name, int(cut[1])), stack
        elif cut and cut[0] in _encoder_templates()[1]:
            base = _encoder_templates()[1][cut[0]]
            size = _encoder_sizes(self.spaces.get(component))
            known = frozenset(range(size)) if size else frozenset()
            return Place(component, shown, base.name, int(cut[1])), Stack(base.name, base.order, size, known)
        if cut and not from_table and cut[1].isdigit():  # the generic rule, for dotted names no table knows
            stack = self._generic.setdefault((component, cut[0]), Stack(cut[0], (_GENERIC, len(self._generic))))
            return Place(component, shown, stack.name, int(cut[1])), stack
        return Place(component, shown), None


def component_order(component: str) -> tuple:
    """The denoiser first, then text encoders by number, then anything else."""
    if component in MODEL_COMPONENTS:
        return (0, 0, component)
    m = re.fullmatch(r"te(\d+)", component)
    return (1, int(m[1]), component) if m else (2, 0, component)
