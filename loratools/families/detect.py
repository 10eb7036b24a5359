"""Which family a LoRA (or a base checkpoint) is for, decided from evidence only.

``detect_family`` scores every family against the file's module names and shapes (see ``engine``) and reports the
best with its evidence, the runner-ups and what the file's metadata claims. A family counts as *decided* only when
the evidence singles it out: a unique best score (metadata may break a tie, as a claim the keys do not contradict)
and a confidence of at least ``DECIDED``. Otherwise the answer is ``unknown``, with the families that fit as
``candidates``: no prior, no popularity, decides anything. Writing operations refuse an undecided family unless the
user names one (``--family``) or the result would be the same for every candidate.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field, fields, replace
from functools import lru_cache
from typing import Mapping, Sequence

from .engine import TIE, Context, Evaluation, text_encoder_stats

# The least confidence at which the evidence decides a family (docs/families.md explains the rule).
DECIDED = 0.5

# Metadata keys whose values claim a family, in the order they are reported. Keys that only some family files
# name are reported after these.
CLAIM_KEYS = ("ss_base_model_version", "modelspec.architecture", "ss_sd_model_name", "ss_v2")
# How many decisions are remembered: a collection holds few distinct layouts (names, shapes, claims).
REMEMBERED = 32


@dataclass(frozen=True)
class ModuleEvidence:
    """One adapted module of a file, as the format layer sees it."""

    component: str  # "model" (UNet / DiT), "te1", "te2", "te3" as the file numbers them, or "unknown"
    name: str  # module path without the file's prefix, dotted or kohya-flattened
    in_dim: int | None = None  # input features of the adapted weight (conv: in channels)
    out_dim: int | None = None


@dataclass
class FamilyResult:
    id: str  # a family id, or "unknown" when the evidence does not decide one
    variant: str | None = None
    confidence: float = 0.0
    evidence: list[str] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)
    alternatives: list[dict] = field(default_factory=list)
    metadata_claims: list[dict] = field(default_factory=list)
    reason: str | None = None
    model_component: str = "model"
    candidates: list[str] = field(default_factory=list)  # the families that fit when none is decided
    given: bool = False  # named by the user (--family), not detected
    contradiction: str | None = None  # a given family whose shapes the file contradicts, and the one they fit

    @property
    def decided(self) -> bool:
        return self.id != "unknown"


def _claims(metadata: Mapping[str, str], families: Mapping) -> list[dict]:
    extra = sorted({k for f in families.values() for k in f.metadata} - set(CLAIM_KEYS))
    out = []
    for key in (*CLAIM_KEYS, *extra):
        value = str(metadata.get(key) or "").strip()
        if value:
            claimed = [f.id for f in families.values() if f.claims(key, value)]
            out.append({"key": key, "value": value, "family": claimed[0] if len(claimed) == 1 else None,
                        "agrees": None})
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
    match = e.fam.module_rx.match if e.fam.module_rx else None
    for names in e.groups.values():
        for n in names:
            m = match(n) if match else None
            counts[e.fam.modules[int(m.lastgroup[1:])].says if m else "other names"] += 1
    out = [f"{says} ({_plural(k, 'module')})" for says, k in counts.most_common(5)]
    out += [r.complete_text(top) for r, top in e.complete]
    out += [f"{r.says}: {top + 1} of {top + 1}" if top + 1 in r.counts else
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
    better = [r.complete_text(top) for r, top in winner.complete] + [r.says for r, _ in winner.dim_ok] + winner.te_text
    return f"fits the names, but {winner.fam.id} fits better" + (f" ({better[0]})" if better else "")


def _alternatives(winner: Evaluation, others: list[Evaluation], tied: list[Evaluation], chooser: dict | None,
                  limit: int = 5) -> list[dict]:
    out = []
    for e in others:
        c = round(min(e.p * e.quality, 0.5), 3)
        if e in tied and chooser is None:
            why = f"same key evidence as {winner.fam.id}; what would separate them: {e.fam.tells}"
        elif e in tied:
            c = min(c, 0.3)
            why = f"same key evidence; metadata {chooser['key']}={chooser['value']} points to {winner.fam.id}"
        else:
            why = _why(e, winner)
        if e not in tied and out and (c < 0.005 or len(out) >= limit):
            continue  # every tied family is listed; the others only while they matter
        out.append({"id": e.fam.id, "confidence": c, "why": why})
    return out


def _metadata_read(families: Mapping) -> tuple[str, ...]:
    """The metadata keys detection reads: the claims, the families' own claim keys and their variants' keys."""
    keys = dict.fromkeys(CLAIM_KEYS)
    for f in families.values():
        keys.update(dict.fromkeys(f.metadata))
        for _, md, _ in f.variants:
            keys.update(dict.fromkeys(md))
    return tuple(keys)


@lru_cache(maxsize=1)
def _default_metadata_read() -> tuple[str, ...]:
    from . import load_families

    return _metadata_read(load_families())


def detect_family(modules: Sequence[ModuleEvidence], metadata: Mapping[str, str] | None = None,
                  families: Mapping | None = None) -> FamilyResult:
    """Score every family against the modules (names and shapes) and return the decided one, or ``unknown`` with
    the candidates.

    The decision reads nothing but each module's (component, name, in_dim, out_dim) and the metadata keys the
    families name: with the default families it is remembered under exactly those (files of one trainer
    configuration repeat them), and every caller gets its own copy of the result."""
    from . import load_families

    metadata = metadata or {}
    if families is not None:
        return _detect(modules, {k: metadata[k] for k in _metadata_read(families) if k in metadata}, families)
    evidence = tuple((m.component, m.name, m.in_dim, m.out_dim) for m in modules)
    claims = tuple((k, metadata[k]) for k in _default_metadata_read() if k in metadata)
    try:
        hash((evidence, claims))
    except TypeError:  # a value that cannot be a key: decided without remembering
        return _detect([ModuleEvidence(*e) for e in evidence], dict(claims), load_families())
    return _copy(_remembered(evidence, claims))


@lru_cache(maxsize=REMEMBERED)
def _remembered(evidence: tuple[tuple, ...], claims: tuple[tuple[str, str], ...]) -> FamilyResult:
    from . import load_families

    return _detect([ModuleEvidence(*e) for e in evidence], dict(claims), load_families())


def _copy(result: FamilyResult) -> FamilyResult:
    """A copy whose lists and the dicts in them are new (the rest of a result is immutable)."""
    return replace(result, **{f.name: [dict(x) if isinstance(x, dict) else x for x in value]
                              for f in fields(result) if isinstance(value := getattr(result, f.name), list)})


def _detect(modules: Sequence, metadata: dict, families: Mapping) -> FamilyResult:
    from . import encoders

    ctx = Context(modules)
    claims = _claims(metadata, families)
    if not ctx.model and not ctx.te:
        return FamilyResult("unknown", reason="no modules to examine", metadata_claims=claims)
    shared = encoders()
    te_stats = text_encoder_stats(ctx, shared) if ctx.te else {}
    evals = [e for f in families.values() if (e := Evaluation(f, ctx, te_stats, shared)).candidate]
    if not evals:
        return FamilyResult("unknown", reason="no family rule matched any module name", metadata_claims=claims)

    top = max(e.score for e in evals)
    weights = [math.exp(e.score - top) for e in evals]
    total = sum(weights)
    for e, w in zip(evals, weights):
        e.p = w / total
    evals.sort(key=lambda e: (-e.score, e.fam.id))
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
    for c in claims:
        if c["family"] is not None:
            c["agrees"] = c["family"] == winner.fam.id
    if any(c["agrees"] is False for c in claims):
        conf *= 0.9  # the keys win, but a file that says otherwise is a little suspect
    conf = round(conf, 3)

    reason = None
    if ctx.model and min(winner.fit, winner.n_explained / len(ctx.model)) < 0.5:
        reason = (f"no family explains most module names (closest: {winner.fam.id}, {winner.n_explained} of "
                  f"{len(ctx.model)} modules, {max(winner.fit, 0.0):.0%} of the module kinds)")
    elif len(tied) > 1 and chooser is None:
        reason = (f"the keys fit {', '.join(e.fam.id for e in tied)} equally well "
                  f"({'only text-encoder modules' if not ctx.model else 'names and shapes'} do not separate them)")
    elif conf < DECIDED:
        reason = f"the evidence is too weak to decide (best: {winner.fam.id}, confidence {conf:.2f})"
    if reason:
        close = [e for e in evals if e in tied or e.score >= top - 1.0][:max(5, len(tied))]
        alts = [{"id": e.fam.id, "confidence": round(min(e.p * e.quality, 0.5), 3),
                 "why": "; ".join(_problems(e)[:1] + _evidence(e)[:1])} for e in evals[:max(5, len(tied))]]
        # what the closest family matched and missed, so a reader sees what the file holds and why it is open
        components = {e.fam.model_component for e in close}
        return FamilyResult("unknown", reason=reason, alternatives=alts, metadata_claims=claims,
                            confidence=0.0, candidates=[e.fam.id for e in close],
                            evidence=_evidence(winner), mismatches=_problems(winner),
                            model_component=components.pop() if len(components) == 1 else "model")

    evidence, mismatches = _evidence(winner), _problems(winner)
    if chooser:
        rest = ", ".join(e.fam.id for e in tied if e is not winner)
        evidence.append(f"the keys fit {rest} equally well; metadata {chooser['key']}={chooser['value']} decides")
    for c in claims:
        if c["agrees"]:
            evidence.append(f"metadata {c['key']}={c['value']} agrees")
        elif c["agrees"] is False:
            mismatches.append(f"metadata {c['key']}={c['value']} claims {c['family']}; the keys say {winner.fam.id}")
    return FamilyResult(
        id=winner.fam.id,
        variant=_variant(winner, metadata),
        confidence=conf,
        evidence=evidence,
        mismatches=mismatches,
        alternatives=_alternatives(winner, [e for e in evals if e is not winner], tied, chooser),
        metadata_claims=claims,
        model_component=winner.fam.model_component,
    )


def contradiction(modules: Sequence[ModuleEvidence], metadata: Mapping[str, str] | None, fid: str) -> str | None:
    """Why a family named by the user is the wrong one: the evidence decides another family and the file's shapes
    (widths, block counts) contradict the named one. A named family whose names fit but whose widths do not (a tiny
    or pruned model) is no contradiction unless another family is decided by the evidence."""
    from . import encoders, load_families

    detected = detect_family(modules, metadata)
    if not detected.decided or detected.id == fid:
        return None
    families = load_families()
    ctx = Context(modules)
    e = Evaluation(families[fid], ctx, text_encoder_stats(ctx, encoders()) if ctx.te else {}, encoders())
    if not e.candidate:
        return None  # its names do not fit either: canonicalising says which modules it lacks
    shapes = [f"{r.says}: expected {r.expected()}, found {_fmt(d)} on {_plural(k, 'module')} (e.g. {ex})"
              for r, k, ex, d in e.dim_bad]
    shapes += [f"{r.says}: index {top}, but {e.fam.name} has {r.count}" for r, top in e.over]
    if not shapes:
        return None
    shown = detected.id + (f" ({detected.variant})" if detected.variant else "")
    return f"the file's shapes say {shown}, not {fid}: {shapes[0]}"
