"""Scoring engine for base-model family detection.

Every family is described by one JSON file in ``data/`` (the file name is its id); text encoders that several
families share are described once in ``encoders.json``. The engine knows nothing about any family: it scores all of
them against the module names and shapes of a file and explains the result.

The ``detect`` keys of a family file (all optional):

- ``metadata``: ``{key: [regex, ...]}``; a header value matching one (case-insensitive) claims this family;
- ``modules``: ``[{pattern, says}]``; the module names the family has. A file's names that no pattern of a
  family matches count against that family;
- ``forbid``: ``[{pattern, says}]``; names the family never has;
- ``blocks``: ``[{pattern, count, says, complete?}]``; group 1 is a block index. ``count`` is an int or a list
  (one per variant); an index >= the largest contradicts the family; with ``complete`` (a text, ``{n}`` the
  count), seeing exactly one of the counts is evidence for it;
- ``dims``: ``[{pattern, in?, out?, expect?, weight?, says}]``; the shapes of matching modules (the first rule
  that matches a module checks it): ``in``/``out`` an int or a list of ints, or ``expect`` a list of
  ``{in?, out?, variant?}`` alternatives;
- ``variants``: ``[{pattern | metadata: {key: regex}, variant}]``.

Patterns are regular expressions searched in the normalised name: dots become underscores, runs of underscores
collapse, leading underscores go. ``#`` stands for a run of digits. A pattern should start with ``^`` and a literal
where it can: that lets the engine skip names that cannot match. Names that differ only in their block index (the
number after the last ``blocks_`` or ``layers_``) are checked together, so ``forbid`` and ``dims`` patterns must
not depend on that number (write it as ``#``).

Scoring, in points (the weights are below): a family loses points for every kind of module (name with its numbers
collapsed) it does not have, for every forbid rule that fires and every block index beyond its block count; it gains
points for a complete block count and, in proportion to their weights, for shape rules that agree minus those that
disagree (the same for text-encoder widths). A softmax over the candidates' scores, times a quality factor (the share
of module kinds explained, how well the shapes agree, whether any shape could be checked at all), is the confidence.
Exactly equal scores are ties; only metadata can pick among them (``detect`` says when a family is decided). Which
encoders may sit in a file's ``te1``, ``te2``, ... comes from the family's ``text_encoders``.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from typing import TYPE_CHECKING, Iterable, Mapping, Sequence

if TYPE_CHECKING:
    from .family import Encoders, Family, Pattern

# Score weights (points; one point is a factor e in the softmax that gives the confidence).
UNEXPLAINED = 3.0  # per kind of model module (digits collapsed) the family does not have
TE_UNEXPLAINED = 1.5  # same for a kind of text-encoder module
FORBIDDEN = 4.0  # per forbid rule that fires
BLOCK_OVER = 4.0  # per block rule whose index exceeds the family's block count
BLOCK_COMPLETE = 1.5  # per block rule whose count is exactly the family's
DIMS = 4.0  # times the weighted balance of agreeing and disagreeing shape rules, in [-1, 1]
TE_DIMS = 2.0  # same for text-encoder widths
TIE = 1e-9

_UNDERSCORES = re.compile(r"_{2,}")
_LONE_ANY = re.compile(r"(?<!\\)\.(?![*+])|\[\^")


def normalise(name: str) -> str:
    """The spelling rules match: dots as underscores, no doubled or leading underscores."""
    n = name.replace(".", "_")
    if "__" in n:
        n = _UNDERSCORES.sub("_", n)
    return n.strip("_") if n[:1] == "_" or n[-1:] == "_" else n


def to_regex(pattern: str) -> str:
    """A data-file pattern as a regular expression: '#' is a run of digits."""
    return pattern.replace("#", r"\d+")


def group_regex(pattern: str) -> str | None:
    """The pattern for a group key, where '#' stands for the block index of every name in the group; None when
    a match of the key would not prove a match of every name (a lone '.' or '[^' could take the '#')."""
    return None if _LONE_ANY.search(pattern) else pattern.replace("#", r"(?:\d+|#)")


def _split_alternatives(body: str) -> list[str]:
    parts, depth, start, i = [], 0, 0, 0
    while i < len(body):
        c = body[i]
        if c == "\\":
            i += 1
        elif c in "()":
            depth += 1 if c == "(" else -1
        elif c == "|" and depth == 0:
            parts.append(body[start:i])
            start = i + 1
        i += 1
    return parts + [body[start:]]


def _close(p: str) -> int:
    """Index of the parenthesis that closes the one at p[0], or -1."""
    depth, i = 0, 0
    while i < len(p):
        if p[i] == "\\":
            i += 1
        elif p[i] in "()":
            depth += 1 if p[i] == "(" else -1
            if depth == 0:
                return i
        i += 1
    return -1


def _prefixes(p: str, k: int) -> set[str]:
    """Strings of at most k characters, one of which starts every match of the regex fragment p."""
    if k == 0 or not p or not (p[0].isalnum() or p[0] in "_("):
        return {""}
    if p[0] != "(":
        return {p[0]} if p[1:2] == "+" else {""} if p[1:2] in ("?", "*", "{") else {
            p[0] + r for r in _prefixes(p[1:], k - 1)}
    i = _close(p)
    body, rest = p[1:i], p[i + 1:]
    if i < 0 or rest[:1] in ("*", "{") or (body.startswith("?") and not body.startswith("?:")):
        return {""}
    after = "" if rest[:1] == "+" else rest[1:] if rest[:1] == "?" else rest
    out = {s for alt in _split_alternatives(body[2:] if body.startswith("?:") else body)
           for s in _prefixes(alt + after, k)}
    return out | _prefixes(after, k) if rest[:1] == "?" else out


def prefixes(pattern: str, k: int = 3) -> tuple[str, ...] | None:
    """What every name a pattern matches starts with (for skipping names), or None when that can be anything."""
    found = _prefixes(pattern[1:], k) if pattern.startswith("^") else {""}
    return None if "" in found else tuple(sorted(found))


# --------------------------------------------------------------------------------------------------- detection


def _first_rule(rules: Sequence[Pattern], name: str) -> int:
    """Index of the first rule that matches the name, or -1."""
    for k, r in enumerate(rules):
        if (r.first is None or name.startswith(r.first)) and r.rx.search(name):
            return k
    return -1


def _dim(v) -> int | None:
    try:
        v = int(v)
    except (TypeError, ValueError):
        return None
    return v if v > 0 else None


_TO_HASH = str.maketrans("0123456789", "##########")


def _kind(name: str) -> str:
    """The name with every number written as '#'."""
    k = name.translate(_TO_HASH)
    while "##" in k:
        k = k.replace("##", "#")
    return k


def _kinds(names: Iterable[str]) -> dict[str, list[str]]:
    kinds: dict[str, list[str]] = defaultdict(list)
    for n in names:
        kinds[_kind(n)].append(n)
    return kinds


class Context:
    """The file's modules, grouped the way the rules need them."""

    def __init__(self, modules: Iterable):
        self.model: dict[str, tuple[int | None, int | None]] = {}
        self.te: dict[str, dict[str, tuple[int | None, int | None]]] = defaultdict(dict)
        model, none = self.model, (None, None)
        for m in modules:
            n = normalise(m.name) if type(m.name) is str else normalise(str(m.name or ""))
            if not n:
                continue
            i, o = m.in_dim, m.out_dim
            dims = (i if type(i) is int and i > 0 else _dim(i), o if type(o) is int and o > 0 else _dim(o))
            comp = m.component
            if comp == "model" or not (comp := str(comp or "").lower()).startswith("te"):
                target = model
            else:
                target = self.te["te1" if comp == "te" else comp]
            if target.get(n, none) == none:
                target[n] = dims
        # names that differ only in their block index form one group, keyed by the name with '#' for the index
        self.groups: dict[str, list[str]] = defaultdict(list)
        self.index: dict[str, tuple[int, int]] = {}
        index, groups = self.index, self.groups
        for n in model:
            a = max(n.rfind("blocks_"), n.rfind("layers_")) + 7
            b = a
            while a > 6 and b < len(n) and n[b].isdigit():
                b += 1
            if a < b < len(n) and n[b] == "_" and "#" not in n:
                index[n] = (a, int(n[a:b]))
                groups[n[:a] + "#" + n[b:]].append(n)
            else:
                groups[n].append(n)
        self.buckets: dict[str, list[str]] = defaultdict(list)  # first 3 characters -> group keys
        self.kinds: dict[str, list[str]] = defaultdict(list)  # name with every number as '#' -> group keys
        self.dims: dict[str, dict[tuple, list]] = {}  # group key -> shape -> [count, a name with it]
        self.top: dict[str, int] = {}  # group key -> highest block index in it
        for key, names in groups.items():
            self.buckets[key[:3]].append(key)
            self.kinds[_kind(key)].append(key)
            self.dims[key] = _shapes(names, model)
            if names[0] in index:
                self.top[key] = max(index[n][1] for n in names)
        self.n_kinds = len(self.kinds)
        self.cache: dict[str, dict[str, list[str]]] = {}  # module regex -> the groups it has
        self.memo: dict[str, dict[str, int]] = {}  # block regex -> name -> index
        self.te_kinds = {slot: _kinds(names) for slot, names in self.te.items()}

    def keys(self, first: tuple[str, ...] | None) -> Iterable[str]:
        """The group keys that can start with one of the prefixes (of at most 3 characters)."""
        if first is None:
            return self.groups
        return [k for b, keys in self.buckets.items() if b.startswith(first) for k in keys]


def _shapes(names: Iterable[str], dims: Mapping[str, tuple]) -> dict[tuple, list]:
    """Shape -> [how many of the names have it, one of them]."""
    out: dict[tuple, list] = {}
    for n in names:
        if (d := dims[n]) != (None, None):
            out.setdefault(d, [0, n])[0] += 1
    return out


def text_encoder_stats(ctx: Context, encoders: Encoders) -> dict:
    """For every text-encoder slot and encoder: the names it has, how many widths were checked, what failed."""
    stats = {}
    for slot, names in ctx.te.items():
        rules = (encoders.width_in, encoders.width_out)  # which of in/out features is the encoder's width
        widths = {n: [d for d, rx in zip(dims, rules) if d is not None and rx.search(n)] for n, dims in names.items()}
        by_pattern: dict[str, dict[str, int | None]] = {}
        for enc in encoders.by_id.values():
            matched = by_pattern.get(enc.rx.pattern)
            if matched is None:
                matched = by_pattern[enc.rx.pattern] = {}
                for n in names:
                    if m := enc.rx.search(n):
                        matched[n] = int(m.group(1)) if m.groups() and m.group(1) else None
            checked, bad = 0, []
            for n, layer in matched.items():
                if layer is not None and layer >= enc.layers:
                    bad.append(f"layer {layer}, but {enc.name} has {enc.layers}")
                for dim in widths[n]:
                    checked += 1
                    if dim != enc.width:
                        bad.append(f"width {dim}, but {enc.name} is {enc.width} wide")
            stats[slot, enc.id] = (set(matched), checked, bad)
    return stats


class Evaluation:
    """One family scored against one file."""

    def __init__(self, fam: Family, ctx: Context, te_stats: Mapping, encoders: Encoders):
        self.fam, self.p = fam, 0.0
        src = fam.module_source
        self.groups = ctx.cache.get(src) if src is not None else {}
        if self.groups is None:  # the names the family has, by group (families with the same rules share it)
            self.groups = ctx.cache[src] = {}
            keys = ctx.keys(fam.module_first)  # no name with the family's prefixes: nothing to compile
            match = fam.module_rx.match if keys else None
            key_match = fam.key_rx.match if keys and fam.key_rx else None
            for key in keys:
                names = ctx.groups[key]
                if len(names) > 1 and key_match and key_match(key):
                    self.groups[key] = names
                elif hit := [n for n in names if match(n)]:
                    self.groups[key] = hit
        self.n_explained = sum(len(v) for v in self.groups.values())
        self.candidate = self.n_explained > 0
        if ctx.model and not self.candidate:
            return  # a family that has none of the model's modules is not a candidate at all
        self.unexplained, self.n_missing, self.missing = 0.0, 0, None
        for keys in ctx.kinds.values():
            total = have = 0
            for key in keys:
                total += len(ctx.groups[key])
                have += len(self.groups.get(key, ()))
            if have < total:
                self.unexplained += 1 - have / total
                self.n_missing += total - have
                if self.missing is None:
                    key = next(k for k in keys if len(self.groups.get(k, ())) < len(ctx.groups[k]))
                    got = set(self.groups.get(key, ()))
                    self.missing = next(n for n in ctx.groups[key] if n not in got)
        self.forbidden = []
        for r in fam.forbid:
            ex = next((names[0] for names in ctx.groups.values() if r.rx.search(names[0])), None)
            if ex:
                self.forbidden.append((r, ex))
        self._blocks(ctx)
        self._dims(ctx)
        self._text_encoders(ctx, te_stats, encoders)
        n_kinds = ctx.n_kinds + 0.5 * sum(len(k) for k in ctx.te_kinds.values())
        self.fit = 1 - (self.unexplained + 0.5 * self.te_unexplained) / n_kinds if n_kinds else 0.0
        self.score = (
            -UNEXPLAINED * self.unexplained - TE_UNEXPLAINED * self.te_unexplained
            - FORBIDDEN * len(self.forbidden) - BLOCK_OVER * len(self.over)
            + BLOCK_COMPLETE * len(self.complete) + DIMS * self.balance + TE_DIMS * self.te_balance)
        quality = max(self.fit, 0.0) * self.dims_factor * (0.85 if self.te_balance < 0 else 1.0)
        if not self.dims_checked and not self.te_checked:
            quality *= 0.85  # names only: nothing could contradict them
        if 0 < len(ctx.model) < 3:
            quality *= 0.8
        self.quality = quality
        self.candidate = self.n_explained > 0 or self.te_explained > 0

    def _blocks(self, ctx: Context) -> None:
        self.over, self.complete, self.partial = [], [], []
        for r in self.fam.blocks:
            top = -1
            for key, names in self.groups.items():
                m = r.rx.search(names[0])
                if not m:
                    continue
                idx = ctx.index.get(names[0])
                if idx and m.start(1) == idx[0]:  # the rule reads the group's block index
                    top = max(top, ctx.top[key] if names is ctx.groups[key] else max(ctx.index[n][1] for n in names))
                else:
                    memo = ctx.memo.setdefault(r.pattern, {})  # families that share the rule share the work
                    for n in names:
                        if n not in memo:
                            mm = r.rx.search(n)
                            memo[n] = int(mm.group(1)) if mm else -1
                        top = max(top, memo[n])
            if top >= r.count:
                self.over.append((r, top))
            elif top >= 0:
                (self.complete if r.completes(top) else self.partial).append((r, top))

    def _dims(self, ctx: Context) -> None:
        self.dim_ok, self.dim_bad, self.votes = [], [], Counter()
        per_rule: dict[int, list] = {}
        for key, names in self.groups.items():
            shapes = ctx.dims[key] if names is ctx.groups[key] else _shapes(names, ctx.model)
            k = _first_rule(self.fam.dims, names[0]) if shapes else -1
            if k < 0:
                continue
            r = self.fam.dims[k]
            rec = per_rule.setdefault(k, [0, 0, None, None])
            for dims, (count, n) in shapes.items():
                ok, variant = r.check(dims)
                rec[0 if ok else 1] += count
                if ok and variant:
                    self.votes[variant] += r.weight * count
                elif not ok and rec[2] is None:
                    rec[2], rec[3] = n, dims
        good = bad = 0.0
        per_rule = {k: v for k, v in per_rule.items() if v[0] + v[1]}
        for k, (n_ok, n_bad, ex, dims) in sorted(per_rule.items()):
            r = self.fam.dims[k]
            good += r.weight * n_ok / (n_ok + n_bad)
            bad += r.weight * n_bad / (n_ok + n_bad)
            if n_ok:
                self.dim_ok.append((r, n_ok))
            if n_bad:
                self.dim_bad.append((r, n_bad, ex, dims))
        self.dims_checked = bool(per_rule)
        self.balance = (good - bad) / (good + bad) if per_rule else 0.0
        self.dims_factor = 1.0 if bad == 0 else 0.6 + 0.3 * good / (good + bad)

    def _text_encoders(self, ctx: Context, te_stats: Mapping, encoders: Encoders) -> None:
        self.te_unexplained, self.te_explained, self.te_text, self.te_bad = 0.0, 0, [], []
        good = bad = 0  # slots whose widths fit / do not fit
        for slot, kinds in ctx.te_kinds.items():
            seen, best = set(), None
            for eid in self.fam.text_encoders.get(slot, ()):
                if (slot, eid) not in te_stats:
                    continue
                matched, checked, errs = te_stats[slot, eid]
                seen |= matched
                rank = (len(matched), not errs, checked)
                if matched and (best is None or rank > best[0]):
                    best = (rank, encoders.by_id[eid], checked, errs)
            self.te_explained += len(seen)
            missing = [n for names in kinds.values() for n in names if n not in seen]
            self.te_unexplained += sum(sum(n not in seen for n in names) / len(names) for names in kinds.values())
            if missing:
                self.te_bad.append(f"{slot}: {len(missing)} module name{'s' * (len(missing) != 1)} fit no text "
                                   f"encoder of {self.fam.name} (e.g. {missing[0]})")
            if best is None:
                continue
            _, enc, checked, errs = best
            if errs:
                bad += 1
                self.te_bad.append(f"{slot}: {len(errs)} checks do not fit {enc.name} ({errs[0]})")
            else:
                good += checked > 0
                self.te_text.append(f"{slot}: {enc.name}" + (f" (width {enc.width})" if checked else " names"))
        self.te_checked = good + bad > 0
        self.te_balance = (good - bad) / (good + bad) if good + bad else 0.0
