"""How each family names its modules in every LoRA format: data tables plus one small lookup engine.

A module's canonical identity is ``(space, native path, part)``: ``space`` is ``"model"`` (UNet or DiT) or a
text-encoder kind (``clip_l``, ``clip_g``, ``openclip_h``, ``t5``); the native path is the module's name in
the original checkpoint (LDM/SGM for UNets, BFL for Flux, SAI for SD3; transformers names for encoders);
``part`` says which row slice of a fused native weight a diffusers module is (Flux ``to_q`` is part 0 of
``img_attn.qkv``). Kohya names are looked up in the same tables with dots turned into underscores: they are
matched against known names, never split on ``_``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

from loratools.errors import UnknownFamily

NATIVE, DIFFUSERS = "native", "diffusers"


class Part(NamedTuple):
    """Row slice ``index`` of a fused weight whose parts have relative sizes ``sizes`` (× in-features)."""

    index: int
    sizes: tuple[int, ...]


class Canon(NamedTuple):
    space: str
    native: str
    part: Part | None
    naming: str  # which spelling matched: native or diffusers


@dataclass(frozen=True)
class Rule:
    native: str
    diffusers: tuple[str, ...]
    sizes: tuple[int, ...] | None = None
    swap_halves: str | None = None  # "always" | "when_out_is_2x_in": B's two row halves trade places

    @property
    def fused(self) -> bool:
        return len(self.diffusers) > 1


def _pattern(template: str, flat: bool) -> str:
    pieces = template.split("{i}")
    if flat:
        pieces = [p.replace(".", "_") for p in pieces]
    return "^" + r"(\d+)".join(re.escape(p) for p in pieces) + "$"


def _fill(template: str, numbers: tuple[str, ...]) -> str:
    for n in numbers:
        template = template.replace("{i}", n, 1)
    return template


class _Templates:
    """Rules with ``{i}`` block indices, matched by regex on the dotted or the flattened spelling."""

    def __init__(self, rules: list[Rule]):
        self.rules = rules
        self.patterns = []  # (regex source, flat, naming, part, rule)
        self._compiled: dict[int, re.Pattern] = {}  # index -> compiled, on first use (most are never tried)
        for rule in rules:
            names = [(NATIVE, None, rule.native)] + [(DIFFUSERS, k if rule.fused else None, d)
                                                    for k, d in enumerate(rule.diffusers)]
            for naming, part, template in names:
                if "{i}" in template:
                    for flat in (False, True):
                        self.patterns.append((_pattern(template, flat), flat, naming, part, rule))
        self.exact: dict[tuple[bool, str], tuple] = {}
        for rule in rules:
            for naming, part, template in [(NATIVE, None, rule.native)] + [
                    (DIFFUSERS, k if rule.fused else None, d) for k, d in enumerate(rule.diffusers)]:
                if "{i}" not in template:
                    self.exact[(False, template)] = (naming, part, rule, ())
                    self.exact.setdefault((True, template.replace(".", "_")), (naming, part, rule, ()))

    def match(self, name: str, flat: bool):
        hit = self.exact.get((flat, name))
        if hit:
            return hit
        for k, (pattern, is_flat, naming, part, rule) in enumerate(self.patterns):
            if is_flat == flat:
                rx = self._compiled.get(k)
                if rx is None:
                    rx = self._compiled[k] = re.compile(pattern)
                m = rx.match(name)
                if m:
                    return naming, part, rule, m.groups()
        return None


class NamingTable:
    """One family's module spellings (data from ``naming/<family>.json``)."""

    def __init__(self, data: dict, unet_pairs: list | None, encoders: dict):
        self.family = data["family"]
        self.kohya_model = data.get("kohya_model", NATIVE)
        self.architecture = data.get("architecture")
        self.encoders: dict[str, dict[str, str]] = data.get("encoders", {})
        rules = [Rule(r["native"], tuple(r["diffusers"]) if isinstance(r["diffusers"], list) else (r["diffusers"],),
                      tuple(r["sizes"]) if "sizes" in r else None, r.get("swap_halves"))
                 for r in data.get("rules", [])]
        rules += [Rule(n, (d,)) for n, d in unet_pairs or []]
        self.model = _Templates(rules)
        self._by_native = {r.native: r for r in rules}
        self._encoder_kinds = encoders["kinds"]
        self._encoder_rules = {layout: _Templates([Rule(p, (p,)) for p in _expand(specs)])
                               for layout, specs in encoders["layouts"].items()}

    def _space(self, space: str) -> _Templates | None:
        if space == "model":
            return self.model
        kind = self._encoder_kinds.get(space)
        return self._encoder_rules.get(kind["layout"]) if kind else None

    def resolve(self, space: str, name: str, flat: bool) -> Canon | None:
        """The canonical identity of a module name (dotted, or kohya-flattened when ``flat``)."""
        templates = self._space(space)
        hit = templates.match(name, flat) if templates else None
        if hit is None:
            return None
        naming, part, rule, numbers = hit
        native = _fill(rule.native, numbers)
        return Canon(space, native, Part(part, rule.sizes) if part is not None else None, naming)

    def rule(self, space: str, native: str) -> Rule:
        """The rule of a native path (block indices generalised)."""
        if space != "model":
            return Rule(native, (native,))
        rule = self._by_native.get(native)
        if rule is not None:
            return rule
        hit = self.model.match(native, False)
        naming, _, rule, numbers = hit
        return Rule(native, tuple(_fill(d, numbers) for d in rule.diffusers), rule.sizes, rule.swap_halves)

    def spell(self, space: str, native: str, naming: str) -> list[str]:
        """Names of a native module in ``naming``: one, or the parts of a fused weight."""
        if space != "model" or naming == NATIVE:
            return [native]
        return list(self.rule(space, native).diffusers)

    def encoder_kinds(self, fmt: str, modules) -> dict[str, str]:
        """Which encoder each of a file's ``te1``/``te2``/``te3`` is: by the format's numbering, unless the
        attention width says otherwise. ``modules`` is an iterable of (component, name, in_dim)."""
        widths: dict[str, set] = {}
        for component, name, in_dim in modules:
            if component.startswith("te") and in_dim and ("self_attn" in name or "SelfAttention" in name):
                widths.setdefault(component, set()).add(in_dim)
        out = {}
        for kind in self.encoders:
            out.setdefault(_COMPONENT.get(self.encoder_slot(kind, fmt), "te1"), kind)
        for component, seen in widths.items():
            fits = [k for k in self.encoders if self._encoder_kinds[k]["width"] in seen]
            if len(fits) == 1:
                out[component] = fits[0]
        return out

    def encoder_slot(self, kind: str, fmt: str) -> str:
        spell = self.encoders[kind]
        return spell.get(fmt) or spell["diffusers" if fmt == "peft" else "kohya"]


# How each format's text-encoder slot names a file component (what formats.keys.split_stem reports).
_COMPONENT = {"te": "te1", "te1": "te1", "te2": "te2", "te3": "te3", "text_encoder": "te1", "text_encoder_2": "te2",
              "text_encoder_3": "te3", "clip_l": "te1", "clip_g": "te2", "clip_h": "te1", "t5xxl": "te3"}


def _expand(specs: list[dict]) -> list[str]:
    out = []
    for spec in specs:
        choices = spec.get("x")
        out += [spec["path"].replace("{x}", x) for x in choices] if choices else [spec["path"]]
    return out


def _dir():
    return Path(__file__).parent / "naming"


@lru_cache(maxsize=None)
def naming_table(family: str) -> NamingTable:
    """The naming table of a family; UnknownFamily when the family has none (no conversion tables yet)."""
    path = _dir().joinpath(f"{family}.json")
    if not path.is_file():
        have = ", ".join(sorted(p.name[:-5] for p in _dir().iterdir()
                                if p.name.endswith(".json") and not p.name.startswith("_") and ".unet" not in p.name))
        raise UnknownFamily(f"no naming tables for family '{family}' (tables exist for {have})")
    data = json.loads(path.read_text(encoding="utf-8"))
    pairs = None
    if "unet_pairs" in data:
        pairs = json.loads(_dir().joinpath(data["unet_pairs"]).read_text(encoding="utf-8"))["pairs"]
    encoders = json.loads(_dir().joinpath("_encoders.json").read_text(encoding="utf-8"))
    return NamingTable(data, pairs, encoders)
