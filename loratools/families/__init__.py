"""Base-model families, described as data (``data/<id>.json``), and detection of a file's family.

``detect_family`` scores every family against the file's module names and shapes (see ``engine``), reports the
winner with its evidence, the runner-ups, and what the file's metadata claims. Metadata only breaks ties that the
keys cannot break; it never overrides them. When the evidence is not enough the answer is ``unknown`` with a reason.
"""

from __future__ import annotations

import difflib
import functools
import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Mapping, Sequence

from ..errors import UnknownFamily
from .engine import TIE, Context, Evaluation, group_regex, normalise, prefixes, text_encoder_stats, to_regex

__all__ = [
    "FAMILY_IDS", "Family", "FamilyResult", "ModuleEvidence", "detect_family", "get_family", "load_families",
    "normalise",
]

# Metadata keys whose values claim a family, in the order they are reported. Keys that only some family files
# name are reported after these.
CLAIM_KEYS = ("ss_base_model_version", "modelspec.architecture", "ss_sd_model_name", "ss_v2")


@dataclass(frozen=True)
class ModuleEvidence:
    """One adapted module of a file, as the format layer sees it."""

    component: str  # "model" (UNet / DiT), "te1", "te2", "te3" as the file numbers them, or "unknown"
    name: str  # module path without the file's prefix, dotted or kohya-flattened
    in_dim: int | None = None  # input features of the adapted weight (conv: in channels)
    out_dim: int | None = None


@dataclass
class FamilyResult:
    id: str  # a family id or "unknown"
    variant: str | None = None
    confidence: float = 0.0
    evidence: list[str] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)
    alternatives: list[dict] = field(default_factory=list)
    metadata_claims: list[dict] = field(default_factory=list)
    reason: str | None = None
    model_component: str = "model"


# ------------------------------------------------------------------------------- the data files, compiled


def _ints(v) -> tuple[int, ...] | None:
    if v is None:
        return None
    return tuple(int(x) for x in v) if isinstance(v, (list, tuple)) else (int(v),)


class Rule:
    __slots__ = ("source", "pattern", "_rx", "says", "first")  # first: prefixes of the names it can match

    def __init__(self, spec: Mapping):
        self.source = spec["pattern"]
        self.pattern = to_regex(self.source)
        self._rx = None
        self.says = spec.get("says") or spec["pattern"]
        self.first = prefixes(self.pattern)

    @property
    def rx(self) -> re.Pattern:
        # compiled on first use: most rules of most families never see a name they could match, and
        # compiling every pattern up front would cost more than inspecting a file
        if self._rx is None:
            self._rx = re.compile(self.pattern)
        return self._rx


class BlockRule(Rule):
    __slots__ = ("count", "complete")

    def __init__(self, spec: Mapping):
        super().__init__(spec)
        self.count = int(spec["count"])
        self.complete = spec.get("complete")


class DimRule(Rule):
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


class Family:
    """One family's description, compiled for matching. ``data`` keeps the file's content."""

    def __init__(self, data: Mapping):
        self.data = data
        self.id: str = data["id"]
        self.name: str = data.get("name", self.id)
        self.model_component: str = data.get("model_component", "transformer")
        self.prior = float(data.get("prior", 0.5))
        self.tells: str = data.get("tells", "")
        self.modules = [Rule(s) for s in data.get("modules", [])]
        self.forbid = [Rule(s) for s in data.get("forbid", [])]
        self.blocks = [BlockRule(s) for s in data.get("blocks", [])]
        self.dims = [DimRule(s) for s in data.get("dims", [])]
        self.text_encoders: dict[str, list[str]] = {k: list(v) for k, v in data.get("text_encoders", {}).items()}
        self.metadata: dict[str, list[str]] = data.get("metadata", {})  # patterns, compiled when first needed
        # one regex for "does the family have this module", with a named group per rule (for the evidence);
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
                for v in self.data.get("variants", [])]

    @functools.cached_property
    def module_rx(self) -> re.Pattern | None:
        return re.compile(self.module_source) if self.module_source else None

    @functools.cached_property
    def key_rx(self) -> re.Pattern | None:
        return re.compile(self._key_src) if self._key_src else None

    def claims(self, key: str, value: str) -> bool:
        return any(re.search(p, value, re.I) for p in self.metadata.get(key, ()))  # re caches the compiled

    def __repr__(self) -> str:
        return f"Family({self.id!r})"


class Encoder:
    def __init__(self, eid: str, spec: Mapping):
        self.id = eid
        self.name = spec.get("name", eid)
        self.rx = re.compile(to_regex(spec["pattern"]))
        self.width = int(spec["width"])
        self.layers = int(spec["layers"])


class Encoders:
    def __init__(self, data: Mapping):
        self.width_in = re.compile(data["width_in"])
        self.width_out = re.compile(data["width_out"])
        self.by_id = {k: Encoder(k, v) for k, v in data["encoders"].items()}


def _data_dir():
    return Path(__file__).parent / "data"


def _family_files() -> dict:
    return {p.name[:-5]: p for p in _data_dir().iterdir() if p.name.endswith(".json") and not p.name.startswith("_")}


FAMILY_IDS: tuple[str, ...] = tuple(sorted(_family_files()))


@lru_cache(maxsize=None)
def _load(fid: str) -> Family:
    data = json.loads(_data_dir().joinpath(f"{fid}.json").read_text(encoding="utf-8"))
    if data.get("id") != fid:
        raise ValueError(f"family file {fid}.json declares id {data.get('id')!r}")
    return Family(data)


@lru_cache(maxsize=1)
def load_families() -> dict[str, Family]:
    """Every family, parsed once."""
    return {fid: _load(fid) for fid in FAMILY_IDS}


@lru_cache(maxsize=1)
def _encoders() -> Encoders:
    return Encoders(json.loads(_data_dir().joinpath("_text_encoders.json").read_text(encoding="utf-8")))


def get_family(fid: str) -> Family:
    if fid not in FAMILY_IDS:
        best = difflib.get_close_matches(str(fid), FAMILY_IDS, n=1, cutoff=0.0)
        raise UnknownFamily(f"unknown family '{fid}'; did you mean '{best[0]}'?")
    return _load(fid)


def _claims(metadata: Mapping[str, str], families: Mapping[str, Family]) -> list[dict]:
    extra = sorted({k for f in families.values() for k in f.metadata} - set(CLAIM_KEYS))
    ordered = sorted(families.values(), key=lambda f: (-f.prior, f.id))
    out = []
    for key in (*CLAIM_KEYS, *extra):
        value = str(metadata.get(key) or "").strip()
        if value:
            fam = next((f.id for f in ordered if f.claims(key, value)), None)
            out.append({"key": key, "value": value, "family": fam, "agrees": None})
    return out


def _plural(k: int, word: str) -> str:
    return f"{k} {word}{'s' * (k != 1)}"


def _fmt(dims: tuple[int | None, int | None]) -> str:
    return ", ".join(f"{k} {v}" for k, v in (("in", dims[0]), ("out", dims[1])) if v is not None)


def _variant(e: Evaluation, metadata: Mapping[str, str]) -> str | None:
    """The shape rules' majority variant, then pattern and metadata variants, joined by '-'."""
    parts = [e.votes.most_common(1)[0][0]] if e.votes else []
    for rx, md, variant in e.fam.variants:
        hit = (rx is not None and any(rx.search(names[0]) for names in e.groups.values())) or (
            bool(md) and all(k in metadata and p.search(str(metadata[k])) for k, p in md.items()))
        if hit and variant not in parts:
            parts.append(variant)
    return "-".join(parts) or None


def _evidence(e: Evaluation) -> list[str]:
    counts: Counter = Counter()
    match = e.fam.module_rx.match
    for names in e.groups.values():
        for n in names:
            m = match(n)
            counts[e.fam.modules[int(m.lastgroup[1:])].says if m else "other names"] += 1
    out = [f"{says} ({_plural(k, 'module')})" for says, k in counts.most_common(5)]
    out += [r.complete for r, _ in e.complete]
    out += [f"{r.says}: {r.count} of {r.count}" if top == r.count - 1 else
            f"{r.says}: indices up to {top} (the model has {r.count})" for r, top in e.partial]
    out += [f"{r.says} ({_plural(k, 'module')})" for r, k in e.dim_ok]
    return out + e.te_text


def _problems(e: Evaluation) -> list[str]:
    out = [f"{_plural(e.n_missing, 'module name')} not in {e.fam.name} (e.g. {e.missing})"] if e.n_missing else []
    out += [f"{r.says} (e.g. {ex})" for r, ex in e.forbidden]
    out += [f"{r.says}: index {top}, but {e.fam.name} has {r.count}" for r, top in e.over]
    out += [f"{r.says}: expected {r.expected()}, found {_fmt(d)} on {_plural(k, 'module')} (e.g. {ex})"
            for r, k, ex, d in e.dim_bad]
    return out + e.te_bad


def _why(e: Evaluation, winner: Evaluation) -> str:
    problems = _problems(e)
    if problems:
        return problems[0]
    better = [r.complete for r, _ in winner.complete] + [r.says for r, _ in winner.dim_ok] + winner.te_text
    return f"fits the names, but {winner.fam.id} fits better" + (f" ({better[0]})" if better else "")


def _alternatives(winner: Evaluation, others: list[Evaluation], tied: list[Evaluation], chooser: dict | None,
                  conf: float, limit: int = 5) -> list[dict]:
    out = []
    for e in others:
        if e in tied and chooser is None:
            c, why = conf, f"same key evidence as {winner.fam.id}; what would separate them: {e.fam.tells}"
        elif e in tied:
            c = min(e.p * e.quality, 0.3)
            why = f"same key evidence; metadata {chooser['key']}={chooser['value']} points to {winner.fam.id}"
        else:
            c, why = min(e.p * e.quality, 0.5), _why(e, winner)
        if e not in tied and out and (c < 0.005 or len(out) >= limit):
            continue  # every tied family is listed; the others only while they matter
        out.append({"id": e.fam.id, "confidence": round(c, 3), "why": why})
    return out


def detect_family(modules: Sequence[ModuleEvidence], metadata: Mapping[str, str] | None = None) -> FamilyResult:
    """Score every family against the modules (names and shapes) and return the best, explained."""
    families = load_families()
    metadata = dict(metadata or {})
    ctx = Context(modules)
    claims = _claims(metadata, families)
    if not ctx.model and not ctx.te:
        return FamilyResult("unknown", reason="no modules to examine", metadata_claims=claims)
    encoders = _encoders()
    te_stats = text_encoder_stats(ctx, encoders) if ctx.te else {}
    evals = [e for f in families.values() if (e := Evaluation(f, ctx, te_stats, encoders)).candidate]
    if not evals:
        return FamilyResult("unknown", reason="no family rule matched any module name", metadata_claims=claims)

    top = max(e.score for e in evals)
    weights = [math.exp(e.score - top) for e in evals]
    total = sum(weights)
    for e, w in zip(evals, weights):
        e.p = w / total
    evals.sort(key=lambda e: (-e.score, -e.fam.prior, e.fam.id))
    tied = [e for e in evals if e.score >= top - TIE]
    winner, chooser = tied[0], None
    if len(tied) > 1:
        claimed = {c["family"] for c in claims}
        picks = [e for e in tied if e.fam.id in claimed]
        if len(picks) == 1:
            winner = picks[0]
            chooser = next(c for c in claims if c["family"] == winner.fam.id)
    if len(tied) == 1:
        conf = winner.p * winner.quality
    elif chooser:
        conf = min(0.7, sum(e.p for e in tied) * winner.quality)
    else:
        conf = min(0.5, winner.p * winner.quality)
    conf = min(conf, 0.4 if not ctx.model else 0.99)  # text encoders alone say little; nothing is certain

    reason = None
    if ctx.model and min(winner.fit, winner.n_explained / len(ctx.model)) < 0.5:
        reason = (f"no family explains most module names (closest: {winner.fam.id}, {winner.n_explained} of "
                  f"{len(ctx.model)} modules, {max(winner.fit, 0.0):.0%} of the module kinds)")
    elif not ctx.model and len(tied) > 1 and chooser is None:
        reason = f"only text-encoder modules, which fit {', '.join(e.fam.id for e in tied)} alike"
    if reason:
        alts = [{"id": e.fam.id, "confidence": round(min(e.p * e.quality, 0.5), 3),
                 "why": "; ".join(_problems(e)[:1] + _evidence(e)[:1])} for e in evals[:max(5, len(tied))]]
        return FamilyResult("unknown", reason=reason, alternatives=alts, metadata_claims=claims)

    evidence, mismatches = _evidence(winner), _problems(winner)
    if len(tied) > 1:
        rest = ", ".join(e.fam.id for e in tied if e is not winner)
        evidence.append(f"the keys fit {rest} equally well; " + (
            f"metadata {chooser['key']}={chooser['value']} decides" if chooser
            else f"{winner.fam.id} chosen as the more common family"))
    for c in claims:
        if c["family"] is None:
            continue
        c["agrees"] = c["family"] == winner.fam.id
        if c["agrees"]:
            evidence.append(f"metadata {c['key']}={c['value']} agrees")
        else:
            mismatches.append(f"metadata {c['key']}={c['value']} claims {c['family']}; the keys say {winner.fam.id}")
    if any(c["agrees"] is False for c in claims):
        conf *= 0.9  # the keys win, but a file that says otherwise is a little suspect
    return FamilyResult(
        id=winner.fam.id,
        variant=_variant(winner, metadata),
        confidence=round(conf, 3),
        evidence=evidence,
        mismatches=mismatches,
        alternatives=_alternatives(winner, [e for e in evals if e is not winner], tied, chooser, conf),
        metadata_claims=claims,
        model_component=winner.fam.model_component,
    )
