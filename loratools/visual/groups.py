"""Spectra per module group, retained-energy curves, and what `resize` would keep.

Everything here works on the singular values ``s`` of each module's unscaled ΔW — the values `inspect --stats`
and `resize` compute (factor-space SVD, ops/lowrank.py) — and the module's effective scale. The predictions use
resize's own rules (``RankRule.select``, ``truncation``, which modules it copies or carries), so the numbers
agree with a real `resize` run: retained energy per module, its mean and minimum, parameters and bytes after.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from loratools.io.reader import DTYPE_SIZES
from loratools.model import Module
from loratools.ops.lowrank import truncation
from loratools.ops.resize import BIAS_ROLES, RankRule

QUANTILES = (0.1, 0.5, 0.9)
DEFAULT_DYNAMIC = ("sv_fro:0.99", "sv_fro:0.9", "sv_ratio:10")


@dataclass
class Measured:
    """One module after its pass: the unscaled spectrum (torch, descending) or None, and |scale · strength|."""

    module: Module
    group: str
    spectrum: object
    scale: float
    flags: tuple[str, ...] = ()


def _round(x: float, digits: int = 6) -> float:
    return float(f"{x:.{digits}g}") if math.isfinite(x) else x


def group_summary(name: str, items: list[Measured]) -> dict:
    """Normalised spectra (σᵢ/σ₁ quantiles over the group's modules), effective ranks, and the group's
    retained-energy curve: the fraction of Σ‖s·ΔW‖² the top k singular values of every module keep."""
    from loratools.ops.lowrank import effective_rank

    spectra = [it for it in items if it.spectrum is not None and it.spectrum.numel() and float(it.spectrum[0]) > 0]
    width = max((it.spectrum.numel() for it in spectra), default=0)
    norm = np.full((len(spectra), width), np.nan)
    energy = np.zeros(width)
    for row, it in enumerate(spectra):
        s = it.spectrum.double().cpu().numpy()
        norm[row, : s.size] = s / s[0]
        sq = (s * it.scale) ** 2
        energy[: s.size] += sq
    total = float(energy.sum())
    curve = np.cumsum(energy) / total if total > 0 else np.ones(width)
    bands = np.nanquantile(norm, QUANTILES, axis=0) if len(spectra) else np.zeros((len(QUANTILES), 0))
    ranks = [round(effective_rank(it.spectrum), 3) for it in spectra]
    return {
        "group": name, "modules": len(items), "with_spectrum": len(spectra), "energy": total,
        "spectrum_quantiles": {f"q{int(q * 100)}": [_round(v) for v in bands[k]] for k, q in enumerate(QUANTILES)},
        "effective_ranks": ranks,
        "retained_energy": [_round(float(v), 8) for v in curve],
    }


def whole_curve(groups: list[dict]) -> list[float]:
    """The retained-energy curve of the whole LoRA from its groups' curves (each weighted by its energy)."""
    width = max((len(g["retained_energy"]) for g in groups), default=0)
    total = sum(g["energy"] for g in groups)
    if total <= 0:
        return [1.0] * width
    out = np.zeros(width)
    for g in groups:
        curve = np.ones(width)
        curve[: len(g["retained_energy"])] = g["retained_energy"]
        out += curve * g["energy"]
    return [_round(float(v), 8) for v in out / total]


def default_rules(max_rank: int | None, ranks=None, dynamic=None) -> list[RankRule]:
    """The rules a report shows: the ranks asked for (default: r/2, r/4, r/8 of the largest rank) and the dynamic
    rules asked for (default: sv_fro 0.99 and 0.9, sv_ratio 10)."""
    if ranks is None:
        ranks = sorted({max_rank // d for d in (2, 4, 8) if max_rank and max_rank // d >= 1}, reverse=True)
    if dynamic is None:
        dynamic = DEFAULT_DYNAMIC
    return [RankRule.make(rank=k) for k in ranks] + [RankRule.make(dynamic=d) for d in dynamic]


def rule_label(rule: RankRule) -> str:
    if rule.dynamic is not None:
        text = f"--dynamic {rule.dynamic[0]}:{rule.dynamic[1]:g}"
    else:
        text = f"--rank {rule.rank}"
    return text + (f" --max-rank {rule.max_rank}" if rule.max_rank is not None else "")


def _size(m: Module) -> tuple[int, int]:
    params = nbytes = 0
    for ref in m.adapter.tensors.values():
        params += ref.numel
        nbytes += ref.numel * DTYPE_SIZES.get(ref.dtype, 4)
    return params, nbytes


def _truncated_size(m: Module, k: int) -> tuple[int, int]:
    """Parameters and bytes of the rank-k LoRA resize writes: factors in the down factor's dtype (a Tucker mid
    folded into down, its kernel kept), bias deltas as stored."""
    a = m.adapter
    down, up = a.down, a.up
    per_down = math.prod(down.shape[1:])
    if a.has("lora_mid"):
        per_down = down.shape[1] * math.prod(a.t("lora_mid").shape[2:])
    params = k * (per_down + up.shape[0])
    nbytes = params * DTYPE_SIZES.get(down.dtype, 4)
    for role in BIAS_ROLES:
        if a.has(role):
            ref = a.t(role)
            params += ref.numel
            nbytes += ref.numel * DTYPE_SIZES.get(ref.dtype, 4)
    return params, nbytes


def _fixed_target(rule: RankRule) -> int | None:
    given = [r for r in (rule.rank, rule.max_rank) if r is not None]
    return min(given) if given and rule.dynamic is None else None


def resize_refusals(items: list[Measured], lora) -> list[str]:
    """Why `resize` (with no --lossy-rank) would refuse the file; empty when it would run."""
    out = [f"the file contradicts itself: {c}" for c in lora.conflicts]
    out += [f"rejected module {r}" for r in lora.rejected]
    for it in items:
        m = it.module
        if "nan_or_inf" in it.flags:
            out.append(f"{m.name}: NaN/Inf values (resize refuses them)")
        elif m.magnitude is not None:
            out.append(f"{m.name}: DoRA needs the base weights")
        elif not (m.adapter.exact_lora or m.adapter.is_vector):
            what = m.adapter.lossy_name
            out.append(f"{m.name}: {what} needs --lossy-rank" if what else f"{m.name}: {m.adapter.label} depends on "
                       "the base weights")
    return out


def predict(rule: RankRule, items: list[Measured]) -> dict:
    """What `resize` with ``rule`` keeps: per-module ranks and retained energy, their mean and minimum (as resize's
    summary), the energy kept over the whole LoRA (weighted by each module's ‖s·ΔW‖²), parameters and bytes after.
    LoRA modules are predicted; vectors are carried (retained 1); other kinds stay outside the prediction."""
    retained, ks, actions = [], [], {"kept": 0, "copied": 0, "truncated": 0}
    p0 = b0 = p1 = b1 = 0
    kept_energy = total_energy = 0.0
    target = _fixed_target(rule)
    for it in items:
        m = it.module
        p, b = _size(m)
        if m.adapter.is_vector:
            actions["kept"] += 1
            retained.append(1.0)
            p0, b0, p1, b1 = p0 + p, b0 + b, p1 + p, b1 + b
            continue
        if not m.adapter.exact_lora or it.spectrum is None:
            continue
        p0, b0 = p0 + p, b0 + b
        s = it.spectrum
        sq_total = float((s.double() * it.scale).pow(2).sum())
        total_energy += sq_total
        k = m.rank if target is not None and m.rank <= target else rule.select(s)
        if k >= m.rank:
            actions["copied"] += 1
            retained.append(1.0)
            ks.append(m.rank)
            p1, b1 = p1 + p, b1 + b
            kept_energy += sq_total
            continue
        kept, _ = truncation(s, k)
        actions["truncated"] += 1
        retained.append(kept)
        ks.append(k)
        kept_energy += kept * sq_total
        p, b = _truncated_size(m, k)
        p1, b1 = p1 + p, b1 + b
    return {
        "rule": rule.as_dict(), "label": rule_label(rule), "actions": actions,
        "retained_mean": sum(retained) / len(retained) if retained else None,
        "retained_min": min(retained, default=None),
        "energy_retained": kept_energy / total_energy if total_energy > 0 else None,
        "rank_min": min(ks, default=None), "rank_max": max(ks, default=None),
        "rank_mean": sum(ks) / len(ks) if ks else None,
        "parameters_before": p0, "parameters_after": p1, "bytes_before": b0, "bytes_after": b1,
    }
