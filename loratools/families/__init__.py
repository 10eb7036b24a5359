"""Base-model families, described as data (``data/<id>.json``), and detection of a file's family.

``detect_family`` scores every family against the file's module names and shapes (see ``engine``), reports the
winner with its evidence, the runner-ups, and what the file's metadata claims. Metadata only breaks ties that the
keys cannot break; it never overrides them. When the evidence is not enough the answer is ``unknown`` with a reason.
"""

from __future__ import annotations

import difflib
import json
import math
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Mapping, Sequence

from ..errors import UnknownFamily
from .engine import TIE, Encoders, Family, _Context, _Eval, _te_stats, normalise

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


def _data_dir():
    return resources.files(__name__).joinpath("data")


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


def _why(e: _Eval, winner: _Eval) -> str:
    problems = e.problems()
    if problems:
        return problems[0]
    better = [r.complete for r, _ in winner.complete] + [r.says for r, _ in winner.dim_ok] + winner.te_text
    return f"fits the names, but {winner.fam.id} fits better" + (f" ({better[0]})" if better else "")


def _alternatives(winner: _Eval, others: list[_Eval], tied: list[_Eval], chooser: dict | None, conf: float,
                  limit: int = 5) -> list[dict]:
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
    ctx = _Context(modules)
    claims = _claims(metadata, families)
    if not ctx.model and not ctx.te:
        return FamilyResult("unknown", reason="no modules to examine", metadata_claims=claims)
    encoders = _encoders()
    te_stats = _te_stats(ctx, encoders) if ctx.te else {}
    evals = [e for f in families.values() if (e := _Eval(f, ctx, te_stats, encoders)).candidate]
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
    if not ctx.model:
        conf = min(conf, 0.4)

    reason = None
    if ctx.model and winner.fit < 0.5:
        reason = (f"no family explains most module names (closest: {winner.fam.id}, "
                  f"{max(winner.fit, 0.0):.0%} of the module kinds)")
    elif not ctx.model and len(tied) > 1 and chooser is None:
        reason = f"only text-encoder modules, which fit {', '.join(e.fam.id for e in tied)} alike"
    if reason:
        alts = [{"id": e.fam.id, "confidence": round(min(e.p * e.quality, 0.5), 3),
                 "why": "; ".join(e.problems()[:1] + e.evidence()[:1])} for e in evals[:5]]
        return FamilyResult("unknown", reason=reason, alternatives=alts, metadata_claims=claims)

    evidence, mismatches = winner.evidence(), winner.problems()
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
    return FamilyResult(
        id=winner.fam.id,
        variant=winner.variant(metadata),
        confidence=round(conf, 3),
        evidence=evidence,
        mismatches=mismatches,
        alternatives=_alternatives(winner, [e for e in evals if e is not winner], tied, chooser, conf),
        metadata_claims=claims,
        model_component=winner.fam.model_component,
    )
