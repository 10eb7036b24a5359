"""How a family names its modules: native (original checkpoint) names and diffusers names, as data, plus lookup.

A module's canonical identity is ``(space, native path, part)``: ``space`` is ``"model"`` (UNet or DiT) or a
text-encoder id (``clip_l``, ``t5_xxl``...); the native path is the module's name in the original checkpoint (LDM/SGM
for UNets, BFL for Flux, SAI for SD3; transformers names for encoders); ``part`` says which row slice of a fused
native weight a diffusers module is (Flux ``to_q`` is part 0 of ``img_attn.qkv``). Kohya names are looked up in the
same tables with dots turned into underscores: they are matched against known names, never split on ``_``.

A family file's ``naming`` holds ``rules`` (one native template, one or several diffusers templates, ``{i}`` for a
block index) and, for UNets, ``blocks`` (native block prefix -> diffusers prefix and the kind of block) with the
``inner`` rules of each kind of block: the rules are the blocks' prefixes joined to their kind's inner rules.
"""

from __future__ import annotations

from collections import defaultdict
from functools import lru_cache
from typing import Mapping, NamedTuple

NATIVE, DIFFUSERS = "native", "diffusers"
# How many names each table remembers the answer for (per lookup): a family's modules in its spellings, many
# times over.
REMEMBERED = 16384


class Part(NamedTuple):
    """Row slice ``index`` of a fused weight whose parts have relative sizes ``sizes`` (see ``NameRule.sizes``)."""

    index: int
    sizes: tuple[int | None, ...]


class Canon(NamedTuple):
    space: str
    native: str
    part: Part | None
    naming: str  # which spelling matched: native or diffusers


class NameRule(NamedTuple):
    """One native module and its diffusers name(s). A fused native weight lists its parts in row order; ``sizes``
    gives each part's rows as a multiple of the in-features, or None for parts that share equally what the sized
    parts leave (grouped-query attention: q is 1 × in-features, k and v split the rest). Without None, the last part
    takes the rest."""

    native: str
    diffusers: tuple[str, ...]  # "component/path" for a module of another diffusers component than the model's
    sizes: tuple[int | None, ...] | None = None
    swap_halves: str | None = None  # "always" | "when_out_is_2x_in": B's two row halves trade places
    aliases: tuple[str, ...] = ()  # other spellings of the native name in circulation: read, never written

    @property
    def fused(self) -> bool:
        return len(self.diffusers) > 1

    def spellings(self):
        """(naming, part index or None, template) of every name the rule gives a module."""
        yield NATIVE, None, self.native
        for alias in self.aliases:
            yield NATIVE, None, alias
        for k, d in enumerate(self.diffusers):
            yield DIFFUSERS, (k if self.fused else None), d
            if "/" in d:  # as a diffusers single file spells it: the component joined with a dot
                yield DIFFUSERS, (k if self.fused else None), d.replace("/", ".", 1)

    def _sizes(self) -> tuple[int | None, ...]:
        return self.sizes or (1,) * len(self.diffusers)

    def bounds(self, in_dim: int, out_dim: int, name: str) -> list[tuple[int, int]]:
        """Row ranges of the parts in a fused weight of ``out_dim`` rows."""
        from ..errors import FormatError

        sizes = self._sizes()
        shared = sizes.count(None)
        fixed = sum(s * in_dim for s in sizes if s is not None)
        if shared:
            rest, odd = divmod(out_dim - fixed, shared)
            rows = [rest if s is None else s * in_dim for s in sizes]
        else:
            odd = 0
            rows = [s * in_dim for s in sizes[:-1]]
            rows.append(out_dim - sum(rows))
        if odd or min(rows) <= 0:
            shown = ["rest" if s is None else s for s in sizes]
            raise FormatError(f"{name}: {out_dim} rows do not split into parts of {shown} × {in_dim}")
        return [(sum(rows[:k]), sum(rows[:k + 1])) for k in range(len(rows))]

    def part_rows(self, in_dim: int, seen: dict[int, int]) -> list[int | None]:
        """Every part's row count from the parts ``seen`` (index -> rows) and the sizes; None where a shared part's
        rows cannot be known without the fused weight (no part of its group was seen)."""
        sizes = self._sizes()
        shared = next((seen[k] for k, s in enumerate(sizes) if s is None and k in seen), None)
        return [seen[k] if k in seen else (s * in_dim if s is not None else shared) for k, s in enumerate(sizes)]

    def swaps(self, canon_naming: str, target_naming: str, out_dim: int, in_dim: int) -> bool:
        """Whether B's row halves trade places between the naming a module was found in and ``target_naming``."""
        if self.swap_halves is None or canon_naming == target_naming:
            return False
        return self.swap_halves == "always" or out_dim == 2 * in_dim


def split_component(name: str, default: str) -> tuple[str, str]:
    """(diffusers component, path in it) of a model module's diffusers name: ``component/path`` names a component of
    its own (Anima's LLM adapter in ``text_conditioner``), any other name lives in ``default``."""
    component, sep, path = name.partition("/")
    return (component, path) if sep else (default, name)


def _match_template(pieces: tuple[str, ...], name: str) -> tuple[str, ...] | None:
    """The block numbers of ``name`` if it is the template ``"{i}".join(pieces)`` with a run of digits for each
    ``{i}``, else None. A plain scan: compiling a regex per template cost more than the lookups (hundreds of
    templates per UNet family). The pieces after an ``{i}`` never start with a digit (checked when built)."""
    first = pieces[0]
    if not name.startswith(first):
        return None
    pos, numbers, end = len(first), [], len(name)
    for piece in pieces[1:]:
        start = pos
        while pos < end and name[pos].isdigit():
            pos += 1
        if pos == start or not name.startswith(piece, pos):
            return None
        numbers.append(name[start:pos])
        pos += len(piece)
    return tuple(numbers) if pos == end else None


def _fill(template: str, numbers: tuple[str, ...]) -> str:
    for n in numbers:
        template = template.replace("{i}", n, 1)
    return template


class Templates:
    """Rules looked up by name, dotted or flattened. Names without a block index are a dict lookup; templates with
    ``{i}`` are indexed by the literal text before their first index, so a lookup tries only the few whose head the
    name starts with."""

    def __init__(self, rules: list[NameRule]):
        self.rules = rules
        self.exact: dict[tuple[bool, str], tuple] = {}
        self.by_head: dict[tuple[bool, str], list] = defaultdict(list)
        for rule in rules:
            for naming, part, template in rule.spellings():
                for flat in (False, True):
                    text = template.replace(".", "_") if flat else template
                    if "{i}" not in text:
                        self.exact.setdefault((flat, text), (naming, part, rule, ()))
                    else:
                        pieces = tuple(text.split("{i}"))
                        if any(p[:1].isdigit() for p in pieces[1:]):
                            raise ValueError(f"naming template {template!r}: a digit right after {{i}}")
                        self.by_head[(flat, pieces[0])].append((pieces, naming, part, rule))
        lengths: dict[bool, set] = {False: set(), True: set()}
        for flat, head in self.by_head:
            lengths[flat].add(len(head))
        self.head_lengths = {flat: sorted(n, reverse=True) for flat, n in lengths.items()}  # most specific first

    def match(self, name: str, flat: bool):
        hit = self.exact.get((flat, name))
        if hit:
            return hit
        for n in self.head_lengths[flat]:
            for pieces, naming, part, rule in self.by_head.get((flat, name[:n]), ()):
                numbers = _match_template(pieces, name)
                if numbers is not None:
                    return naming, part, rule, numbers
        return None


def _rules(data: Mapping) -> list[NameRule]:
    """The family file's ``rules``, then its UNet ``blocks`` joined with their kind's ``inner`` rules."""
    out = []
    for r in data.get("rules", []):
        d = r["diffusers"]
        out.append(NameRule(r["native"], tuple(d) if isinstance(d, list) else (d,),
                            tuple(r["sizes"]) if "sizes" in r else None, r.get("swap_halves"),
                            tuple(r.get("aliases", ()))))
    inner = {kind: [(x, x) if isinstance(x, str) else tuple(x) for x in rules]
             for kind, rules in data.get("inner", {}).items()}
    for native_prefix, (diffusers_prefix, kind) in data.get("blocks", {}).items():
        out += [NameRule(f"{native_prefix}.{n}", (f"{diffusers_prefix}.{d}",)) for n, d in inner[kind]]
    return out


class NamingTable:
    """One family's module spellings, and its text encoders' (the same in every format)."""

    def __init__(self, family: str, data: Mapping, family_encoders: Mapping, shared):
        self.family = family
        self.kohya_model = data.get("kohya", NATIVE)  # the naming kohya-style files spell the model in
        # the factor spelling of the family's `diffusion_model.` files: kohya's lora_down/lora_up + .alpha, or
        # PEFT's lora_A/lora_B with the scale folded in (what ai-toolkit and diffusion-pipe write, and what
        # diffusers' converters for the newer families read)
        self.comfy_factors = data.get("comfy_factors", "lora_down")
        self.architecture = data.get("architecture")
        rules = _rules(data)
        self.model = Templates(rules)
        self._by_native = {r.native: r for r in rules}
        self._encoders: dict[str, Templates] = {}
        for eid in family_encoders:
            enc = shared.by_id.get(eid)
            if enc is not None:
                self._encoders[eid] = Templates([NameRule(p, (p,)) for p in enc.module_paths])
        # both lookups are pure functions of the table (built above, never changed) and their answers are immutable;
        # files of one collection ask for the same names again and again
        self.resolve = lru_cache(maxsize=REMEMBERED)(self._resolve)
        self.rule = lru_cache(maxsize=REMEMBERED)(self._rule)

    def _space(self, space: str) -> Templates | None:
        return self.model if space == "model" else self._encoders.get(space)

    def _resolve(self, space: str, name: str, flat: bool) -> Canon | None:
        """The canonical identity of a module name (dotted, or kohya-flattened when ``flat``)."""
        templates = self._space(space)
        hit = templates.match(name, flat) if templates else None
        if hit is None:
            return None
        naming, part, rule, numbers = hit
        return Canon(space, _fill(rule.native, numbers), Part(part, rule.sizes) if part is not None else None, naming)

    def _rule(self, space: str, native: str) -> NameRule:
        """The rule of a native path, with its block indices filled in."""
        if space != "model":
            return NameRule(native, (native,))
        rule = self._by_native.get(native)
        if rule is not None:
            return rule
        _, _, rule, numbers = self.model.match(native, False)
        return NameRule(native, tuple(_fill(d, numbers) for d in rule.diffusers), rule.sizes, rule.swap_halves,
                        tuple(_fill(a, numbers) for a in rule.aliases))

    def spell(self, space: str, native: str, naming: str) -> list[str]:
        """Names of a native module in ``naming``: one, or the parts of a fused weight."""
        if space != "model" or naming == NATIVE:
            return [native]
        return list(self.rule(space, native).diffusers)
