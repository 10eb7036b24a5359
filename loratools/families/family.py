"""One base-model family, compiled from its data file (``data/<id>.json``), and the shared text encoders.

A family file holds everything loratools knows about a family (``docs/families.md`` gives the schema):

- ``detect``: the rules that score a LoRA's module names and shapes against the family (see ``engine``);
- ``text_encoders``: which encoders (ids of ``encoders.json``) the family has, how each LoRA format numbers them,
  and where they live in single-file checkpoints;
- ``naming``: the family's modules in original-checkpoint ("native") names and in diffusers names, with the row
  slices of fused weights (``naming``);
- ``checkpoint``: what marks a single-file base checkpoint as this family.
"""

from __future__ import annotations

import functools
import re
from typing import Mapping

from .engine import group_regex, prefixes, to_regex
from .naming import NamingTable


def _ints(v) -> tuple[int, ...] | None:
    if v is None:
        return None
    return tuple(int(x) for x in v) if isinstance(v, (list, tuple)) else (int(v),)


class Pattern:
    """A detection pattern of a family file, with what a match says."""

    __slots__ = ("source", "pattern", "_rx", "says", "first")  # first: prefixes of the names it can match

    def __init__(self, spec: Mapping):
        self.source = spec["pattern"]
        self.pattern = to_regex(self.source)
        self._rx = None
        self.says = spec.get("says") or spec["pattern"]
        self.first = prefixes(self.pattern)

    @property
    def rx(self) -> re.Pattern:
        # compiled on first use: most patterns of most families never see a name they could match, and
        # compiling every pattern up front would cost more than inspecting a file
        if self._rx is None:
            self._rx = re.compile(self.pattern)
        return self._rx


class BlockCount(Pattern):
    """A block index rule: ``count`` blocks (or a list, one per variant: the largest bounds the index)."""

    __slots__ = ("count", "counts", "complete")

    def __init__(self, spec: Mapping):
        super().__init__(spec)
        self.counts = frozenset(_ints(spec["count"]))
        self.count = max(self.counts)
        self.complete = spec.get("complete")

    def completes(self, top: int) -> bool:
        """Whether a highest index ``top`` is the last block of one of the family's layouts."""
        return bool(self.complete) and top + 1 in self.counts

    def complete_text(self, top: int) -> str:
        return self.complete.replace("{n}", str(top + 1))


class Dims(Pattern):
    __slots__ = ("expect", "weight")

    def __init__(self, spec: Mapping):
        super().__init__(spec)
        alts = spec.get("expect") or [{"in": spec.get("in"), "out": spec.get("out")}]
        self.expect = [(_ints(a.get("in")), _ints(a.get("out")), a.get("variant")) for a in alts]
        self.weight = float(spec.get("weight", 1))

    def check(self, dims: tuple[int | None, int | None]) -> tuple[bool, str | None]:
        i, o = dims
        for ei, eo, variant in self.expect:
            if (ei is None or i is None or i in ei) and (eo is None or o is None or o in eo):
                return True, variant
        return False, None

    def expected(self) -> str:
        return " or ".join(
            " ".join(f"{k} {'/'.join(map(str, v))}" for k, v in (("in", ei), ("out", eo)) if v)
            for ei, eo, _ in self.expect)


# How each LoRA format's text-encoder slot names a file component (what the format codecs report).
SLOT_COMPONENTS = {"te": "te1", "te1": "te1", "te2": "te2", "te3": "te3", "te4": "te4", "text_encoder": "te1",
                   "text_encoder_2": "te2", "text_encoder_3": "te3", "text_encoder_4": "te4", "clip_l": "te1",
                   "clip_g": "te2", "clip_h": "te1", "t5xxl": "te3"}
# Formats that spell slots like another when the family file names no slot of their own.
_SLOT_FALLBACK = {"peft": "diffusers", "onetrainer": "kohya", "lycoris": "kohya"}


class TextEncoder:
    """One text encoder of a family: its shared id, how each format spells its slot, where checkpoints keep it."""

    def __init__(self, eid: str, spec: Mapping):
        self.id = eid
        self.spelling: dict[str, str] = {k: v for k, v in spec.items() if isinstance(v, str)}
        self.single_file: tuple[str, ...] = tuple(spec.get("single_file", ()))  # HF naming under these prefixes
        self.openclip: tuple[str, ...] = tuple(spec.get("openclip", ()))  # OpenCLIP layout under these prefixes
        given = spec.get("slots")
        self.slots = tuple(given) if given else tuple(sorted(
            {SLOT_COMPONENTS[s] for s in self.spelling.values() if s in SLOT_COMPONENTS}))

    def slot(self, fmt: str) -> str | None:
        """The slot as ``fmt`` spells it in keys (kohya ``te1``, diffusers ``text_encoder``...), None if unknown."""
        return self.spelling.get(fmt) or self.spelling.get(_SLOT_FALLBACK.get(fmt, ""))

    def checkpoint_prefixes(self) -> tuple[str, ...]:
        """Where single files keep this encoder in HF naming: the family's own prefixes, then a ComfyUI bundle's."""
        comfy = self.spelling.get("comfy")
        return self.single_file + ((f"text_encoders.{comfy}.transformer.",) if comfy else ())


class Family:
    """One family's description, compiled for matching and naming. ``data`` keeps the file's content."""

    def __init__(self, data: Mapping):
        self.data = data
        self.id: str = data["id"]
        self.name: str = data.get("name", self.id)
        self.model_component: str = data.get("model_component", "transformer")
        self.tells: str = data.get("tells", "")
        det = data.get("detect", {})
        self.modules = [Pattern(s) for s in det.get("modules", [])]
        self.forbid = [Pattern(s) for s in det.get("forbid", [])]
        self.blocks = [BlockCount(s) for s in det.get("blocks", [])]
        self.dims = [Dims(s) for s in det.get("dims", [])]
        self.metadata: dict[str, list[str]] = det.get("metadata", {})  # patterns, compiled when first needed
        self.encoders = {eid: TextEncoder(eid, spec) for eid, spec in data.get("text_encoders", {}).items()}
        self.text_encoders: dict[str, list[str]] = {}  # file slot -> encoder ids that may sit there
        for enc in self.encoders.values():
            for slot in enc.slots:
                self.text_encoders.setdefault(slot, []).append(enc.id)
        checkpoint = data.get("checkpoint", {})
        # alternatives, each one {"key", "shape"?} or a list of them that must all hold
        self.signature: tuple = tuple(checkpoint.get("signature", ()))
        self.pipelines: tuple[str, ...] = tuple(checkpoint.get("pipelines", ()))
        # where the family's own single files keep the native names (Anima's `net.`), tried before the usual ones
        self.native_prefixes: tuple[str, ...] = tuple(checkpoint.get("prefixes", ()))
        # one regex for "does the family have this module", with a named group per pattern (for the evidence);
        # a second one for a whole group of names at once, with the block index written as '#'
        anchored = [r.pattern if r.pattern.startswith("^") else f".*?(?:{r.pattern})" for r in self.modules]
        self.module_source = "|".join(f"(?P<m{k}>{p})" for k, p in enumerate(anchored)) if anchored else None
        keyed = [k for r in self.modules if (k := group_regex(r.source))]
        self._key_src = "|".join(f"(?:{p if p.startswith('^') else '.*?' + p})" for p in keyed) if keyed else None
        firsts = [r.first for r in self.modules]
        self.module_first = None if any(f is None for f in firsts) else tuple(sorted({p for f in firsts for p in f}))

    @functools.cached_property
    def variants(self) -> list[tuple[re.Pattern | None, dict[str, re.Pattern], str]]:
        return [(re.compile(to_regex(v["pattern"])) if "pattern" in v else None,
                 {k: re.compile(p, re.I) for k, p in v.get("metadata", {}).items()}, v["variant"])
                for v in self.data.get("detect", {}).get("variants", [])]

    @functools.cached_property
    def module_rx(self) -> re.Pattern | None:
        return re.compile(self.module_source) if self.module_source else None

    @functools.cached_property
    def key_rx(self) -> re.Pattern | None:
        return re.compile(self._key_src) if self._key_src else None

    @property
    def has_naming(self) -> bool:
        return "naming" in self.data

    @functools.cached_property
    def naming(self) -> NamingTable:
        """The family's naming table (compiled on first use); ``has_naming`` says whether the file has one."""
        from . import encoders

        return NamingTable(self.id, self.data.get("naming", {}), self.encoders, encoders())

    def claims(self, key: str, value: str) -> bool:
        return any(re.search(p, value, re.I) for p in self.metadata.get(key, ()))  # re caches the compiled

    def encoder_slot(self, eid: str, fmt: str) -> str:
        """The slot ``fmt`` writes encoder ``eid`` in (kohya ``te1``, diffusers ``text_encoder``, comfy ``clip_l``)."""
        slot = self.encoders[eid].slot(fmt)
        if slot is None:
            from ..errors import UsageError

            raise UsageError(f"{self.name} files have no {fmt} spelling for the {eid} text encoder")
        return slot

    def encoder_spaces(self, fmt: str, modules) -> dict[str, str]:
        """Which encoder each of a file's ``te1``/``te2``/... components is: by the format's numbering, unless the
        attention width says otherwise. ``modules``: (component, name, in_dim) of the file's modules."""
        from . import encoders

        widths: dict[str, set] = {}
        for component, name, in_dim in modules:
            if component.startswith("te") and in_dim and ("self_attn" in name or "SelfAttention" in name):
                widths.setdefault(component, set()).add(in_dim)
        out: dict[str, str] = {}
        for enc in self.encoders.values():
            slot = enc.slot(fmt)
            if slot in SLOT_COMPONENTS:
                out.setdefault(SLOT_COMPONENTS[slot], enc.id)
        for enc in self.encoders.values():  # a format without slots of its own: the encoder's first slot
            for slot in enc.slots[:1]:
                out.setdefault(slot, enc.id)
        known = encoders().by_id
        for component, seen in widths.items():
            fits = [e for e in self.encoders if e in known and known[e].width in seen]
            if len(fits) == 1:
                out[component] = fits[0]
        return out

    def __repr__(self) -> str:
        return f"Family({self.id!r})"


class Encoder:
    """One text encoder of ``encoders.json``: its width and depth, and its layout's module paths and pattern."""

    def __init__(self, eid: str, spec: Mapping, layout: Mapping):
        self.id = eid
        self.name = spec.get("name", eid)
        self.layout = spec["layout"]
        self.rx = re.compile(to_regex(layout["pattern"]))
        self.width = int(spec["width"])
        self.layers = int(spec["layers"])
        self.module_paths = _expand(layout["modules"])


def _expand(specs: list[dict]) -> list[str]:
    out = []
    for spec in specs:
        choices = spec.get("x")
        out += [spec["path"].replace("{x}", x) for x in choices] if choices else [spec["path"]]
    return out


class Encoders:
    def __init__(self, data: Mapping):
        self.width_in = re.compile(data["width_in"])
        self.width_out = re.compile(data["width_out"])
        layouts = data["layouts"]
        self.by_id = {k: Encoder(k, v, layouts[v["layout"]]) for k, v in data["encoders"].items()}
