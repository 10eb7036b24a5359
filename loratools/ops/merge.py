"""Merging LoRAs: exact concatenation along rank, or its optimal truncation — never a dense ΔW.

Σᵢ wᵢ·sᵢ·Bᵢ·Aᵢ = [w₁s₁B₁ | w₂s₂B₂ | …] · [A₁; A₂; …]: stacking the factors along rank *is* the
weighted sum, with no cross terms, no equal-rank requirement and each weight applied once. Each term's
weight·scale (and so its sign) goes on B; the merged alpha is the total rank, so the merged scale is 1.
The ``svd`` method then truncates that exact product in factor space (QR + small SVD), which is the best
approximation at the target rank (Eckart–Young).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from loratools.errors import ShapeMismatch, UsageError
from loratools.model import Lora, MemorySource, Module
from loratools.ops.align import align
from loratools.ops.validate import check_writable
from loratools.ops.batched import Job
from loratools.ops.factors import (Factors, factor_job, lora_module, module_factors, stored_factors,
                                   wrap_module)
from loratools.ops.lowrank import check_rank, resolve_device, svd_of, truncation
from loratools.ops.resize import (RankRule, check_before_svds, check_modules, checked_svds, cpu_threads, metadata_warnings,
                                  nonfinite_reported, output_lora, storage_dtype, summarize)

METHODS = ("concat", "svd")


@dataclass
class Term:
    """One module of one input, with that input's weight."""

    index: int
    lora: Lora
    module: Module
    weight: float


def default_key(m: Module) -> Hashable:
    """A module's identity across inputs: its base weight (and row slice) once resolved, else component + name."""
    return (m.target, m.part) if m.target else (m.component, m.name)


def merge(items: list[tuple[Lora, float]], *, method: str = "concat", rank: int | None = None, dynamic=None,
          max_rank: int | None = None, lossy_rank: int | None = None, device="auto",
          allow_mixed_families: bool = False, dtype=None,
          key: Callable[[Module], Hashable] | None = None, allow_nonfinite: bool = False) -> tuple[Lora, dict]:
    """Merge LoRAs with weights into one: ``concat`` (exact, rank = Σ ranks) or ``svd`` (truncated).

    Args:
        items: ``[(lora, weight), ...]``; modules match across inputs by ``key`` (default
            :func:`default_key`); a module present in only some inputs is merged from those.
        method: ``"concat"`` or ``"svd"`` (needs ``rank`` or ``dynamic``, optionally ``max_rank``).
        lossy_rank: rank at which LoHa, LoKr and full-diff modules become LoRA first (a dense SVD).
        allow_mixed_families: merge inputs whose detected families differ.
        dtype: storage dtype of the result (``None``: the first contributing module's).

    Returns:
        ``(Lora, report)`` with the first input's format and metadata.

    Example:
        >>> merged, report = merge([(load("a.safetensors"), 1.0), (load("b.safetensors"), 0.5)])
    """
    items = _check_items(items)
    if method not in METHODS:
        raise UsageError(f"unknown merge method {method!r}: use concat or svd")
    rule = RankRule.make(rank, dynamic, max_rank, required=method == "svd")
    if method == "concat" and rule is not None:
        raise UsageError("concat keeps every rank: pass --method svd to reduce it")
    lossy_rank = check_rank(lossy_rank, "lossy_rank")
    dev, out_dtype = resolve_device(device), storage_dtype(dtype)
    _check_families(items, allow_mixed_families)
    for lora, _ in items:
        if method == "svd":
            check_before_svds(lora, allow_nonfinite)
        else:
            check_writable(lora, allow_nonfinite)
        check_modules(lora, lossy_rank)
    mem = MemorySource()
    inputs = align(items, mem) if key is None else [lora.modules for lora, _ in items]
    groups = list(_group(items, inputs, key or default_key).values())
    _check_alignment(groups)
    jobs, modules, rows = [], [None] * len(groups), [None] * len(groups)
    loras = [lora for lora, _ in items]
    with cpu_threads(dev), nonfinite_reported(loras, allow_nonfinite or method != "svd"):
        for g, terms in enumerate(groups):
            path = items[terms[0].index][0].path
            with svd_of(terms[0].module.name, path):
                done = _merge_group(terms, rule, dev, lossy_rank, mem, out_dtype)
            if isinstance(done, Job):  # an SVD to come, batched with the other modules of its shape
                done.index, done.path, done.payload = len(jobs), path, (g, *done.payload)
                done.modules = tuple(t.module for t in terms)
                jobs.append(done)
            else:
                modules[g], rows[g] = done
        # concat's factors were tested by check_writable
        outs = checked_svds(loras, jobs, lambda job, s: rule.select(s), _stored(out_dtype), dev,
                            allow_nonfinite or method != "svd")
    for job, (k, up_t, down_t, retained, error) in zip(jobs, outs):
        g, first, merged, row = job.payload
        modules[g] = wrap_module(first, up_t, down_t, float(k), merged, mem, out_dtype)
        rows[g] = {**row, "action": "svd", "rank": k, "retained": retained, "error": error}
    summary = summarize(rows, [m for lora, _ in items for m in lora.modules], modules)
    ranks = [r["rank"] for r in rows if r.get("rank") is not None]
    summary.update(partial=sum(1 for r in rows if len(r["sources"]) < len(items)),
                   rank_min=min(ranks, default=None), rank_max=max(ranks, default=None))
    report = {"method": method, "rule": None if rule is None else rule.as_dict(), "lossy_rank": lossy_rank,
              "device": str(dev), "inputs": [_describe(lora, w) for lora, w in items], "modules": rows,
              "summary": summary, "warnings": metadata_warnings(items[0][0])}
    return output_lora(items[0][0], modules, mem), report


def _check_items(items) -> list[tuple[Lora, float]]:
    out = []
    for entry in items:
        lora, weight = entry
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise UsageError(f"a merge weight must be a finite number, got {weight!r}", lora.path)
        out.append((lora, float(weight)))
    if not out:
        raise UsageError("merge needs at least one LoRA")
    return out


def _check_families(items: list[tuple[Lora, float]], allow: bool) -> None:
    ids: list[str] = []
    for lora, _ in items:
        fid = getattr(lora.family, "id", None) or "unknown"
        if fid != "unknown" and fid not in ids:
            ids.append(fid)
    if len(ids) > 1 and not allow:
        raise UsageError(f"cannot merge LoRAs of different families ({', '.join(ids)}); "
                         "pass --allow-mixed-families to merge anyway")


def _group(items, inputs: list[list[Module]], key) -> dict[Hashable, list[Term]]:
    """Terms per module identity, in first-seen order (the first input's module order, then newcomers)."""
    groups: dict[Hashable, list[Term]] = {}
    for index, ((lora, weight), modules) in enumerate(zip(items, inputs)):
        for m in modules:
            groups.setdefault(key(m), []).append(Term(index, lora, m, weight))
    return groups


def _check_alignment(groups: list[list[Term]]) -> None:
    """Refuse what cannot line up: a fused weight adapted whole in one input and in parts in another when a custom
    ``key`` kept ``align`` out, and norm or bias-only deltas of a modulation whose row halves come in opposite
    orders (B rows of LoRA modules are brought to the first input's order, ``_flipped``)."""
    whole: dict[str, Term] = {}
    parts: dict[str, Term] = {}
    for terms in groups:
        first = terms[0]
        for t in terms:
            if t.module.target:
                (parts if t.module.part else whole).setdefault(t.module.target, t)
            if _flipped(t, first) and t.module.adapter.is_vector:
                _misaligned(first, t, "their row halves in opposite orders")
    for target, t in whole.items():
        if target in parts:
            _misaligned(t, parts[target], "one whole, the other in parts")


def _flipped(t: Term, first: Term) -> bool:
    """Whether ``t``'s B rows come in the other order of a swapped modulation than the first term's."""
    return t.module.halves_swapped != first.module.halves_swapped


def _swap_halves(x):
    """The two row halves of ``x`` traded (a view of new memory, so it may be copied back into ``x``)."""
    import torch

    half = x.shape[0] // 2
    return torch.cat([x[half:], x[:half]])


def _misaligned(a: Term, b: Term, how: str) -> None:
    raise UsageError(f"'{a.module.name}' ({a.lora.path}) and '{b.module.name}' ({b.lora.path}) adapt one weight, "
                     f"{how}: convert the inputs to one naming first (loratools convert --to FORMAT), then merge")


def _label(m: Module) -> str:
    if m.target:
        return m.target + (f" part {m.part.index}" if m.part else "")
    return f"{m.component}:{m.name}"


def _merge_group(terms: list[Term], rule: RankRule | None, dev, lossy_rank, mem, out_dtype):
    """``(Module, row)`` of a group merged here (norm and bias deltas, concat), or the Job of its SVD (payload
    ``(first module, merged Factors, row)``)."""
    import torch

    first = terms[0].module
    row = {"name": first.name, "component": first.component, "sources": [t.index for t in terms]}
    vectors = [t.module.adapter.is_vector for t in terms]
    if all(vectors):
        return _sum_vectors(terms, mem, out_dtype), {**row, "action": "summed", "rank": None,
                                                     "retained": 1.0, "error": 0.0}
    if any(vectors):
        other = next(t.module for t, v in zip(terms, vectors) if v != vectors[0])
        raise ShapeMismatch(f"{_label(first)}: cannot merge a {first.adapter.label} delta with a "
                            f"{other.adapter.label} delta")
    if rule is None:
        factors = [module_factors(t.module, dev, lossy_rank) for t in terms]
    else:  # plain LoRA factors are read later, by the job, straight into its batch (``fill`` swaps their rows)
        parts = [factor_job(0, t.module, dev, lossy_rank) for t in terms]
        factors = [f for f, _ in parts]
    for t, f in zip(terms, factors):
        if _flipped(t, terms[0]):
            f.biases = {role: _swap_halves(b) for role, b in f.biases.items()}
            if rule is None:
                f.up = _swap_halves(f.up)
    shape, up_ndim = _fit(terms, factors)
    row["ranks"] = [f.rank for f in factors]
    lossy = [{"input": t.index, "type": t.module.adapter.label, "error": f.lossy_error}
             for t, f in zip(terms, factors) if f.lossy_error is not None]
    if lossy:
        row["lossy"] = lossy
    rank = sum(f.rank for f in factors)
    merged = Factors(None, None, 1.0, shape, up_ndim, factors[0].dtype, biases=_sum_biases(terms, factors), rank=rank)
    if rule is None:  # alpha = total rank: the merged scale is 1, each term already carries its own
        cdt = torch.float64 if any(f.up.dtype == torch.float64 for f in factors) else torch.float32
        up = torch.cat([(t.weight * f.scale) * f.up.to(cdt) for t, f in zip(terms, factors)], dim=1)
        down = torch.cat([f.down.to(cdt) for f in factors], dim=0)
        new = lora_module(first, up, down, float(rank), merged, mem, out_dtype)
        return new, {**row, "action": "concat", "rank": rank, "retained": 1.0, "error": 0.0}
    jobs = [job for _, job in parts]

    def fill(up, down):  # Σ wᵢ·sᵢ·Bᵢ·Aᵢ = [w₁s₁B₁ | w₂s₂B₂ | …] · [A₁; A₂; …]
        at = 0
        for t, f, job in zip(terms, factors, jobs):
            cols = slice(at, at + f.rank)
            job.fill(up[:, cols], down[cols])
            if _flipped(t, terms[0]):
                up[:, cols] = _swap_halves(up[:, cols])
            up[:, cols] *= t.weight * f.scale
            at += f.rank

    cdt = torch.float64 if any(job.dtype == torch.float64 for job in jobs) else torch.float32
    return Job(0, first.name, jobs[0].rows, rank, jobs[0].cols, cdt, fill, payload=(first, merged, row))


def _stored(out_dtype):
    def finish(job, s, k, up, down):
        _, first, merged, _ = job.payload
        return (k, *stored_factors(first.name, up, down, merged, out_dtype), *truncation(s, k))

    return finish


def _fit(terms: list[Term], factors: list[Factors]) -> tuple[tuple[int, ...], int]:
    """The merged ΔW shape: equal (out, in·kernel) everywhere, equal kernels where stated; most specific wins."""
    ref = max(range(len(factors)), key=lambda i: len(factors[i].shape))
    want = factors[ref].shape
    for t, f in zip(terms, factors):
        flat_ok = (f.shape[0], math.prod(f.shape[1:])) == (want[0], math.prod(want[1:]))
        if not flat_ok or (len(f.shape) > 2 and f.shape != want):
            raise ShapeMismatch(f"{_label(t.module)}: shapes do not fit: {list(want)} in {terms[ref].lora.path} "
                                f"vs {list(f.shape)} in {t.lora.path}")
    return want, factors[ref].up_ndim


def _sum_biases(terms: list[Term], factors: list[Factors]) -> dict:
    """Σ weight·(scale for lora_up_bias, which PEFT scales with the module; 1 for diff_b)·bias, on the host."""
    import torch

    sums: dict = {}
    for t, f in zip(terms, factors):
        for role, b in f.biases.items():
            c = t.weight * (f.scale if role == "lora_up_bias" else 1.0)
            prev = sums.get(role)
            if prev is not None and prev[0].shape != b.shape:
                raise ShapeMismatch(f"{_label(t.module)}: {role} shapes do not fit: {list(prev[0].shape)} "
                                    f"vs {list(b.shape)} in {t.lora.path}")
            acc = c * b.to(torch.float64)
            sums[role] = (acc if prev is None else prev[0] + acc, b.dtype if prev is None else prev[1])
    return {role: acc.to(dt) for role, (acc, dt) in sums.items()}


def _sum_vectors(terms: list[Term], mem: MemorySource, out_dtype) -> Module:
    """Norm and bias-only deltas add up directly (they are not low-rank): Σ weight·delta per tensor."""
    import torch

    first = terms[0].module
    kinds = {t.module.adapter.kind for t in terms}
    if len(kinds) > 1:
        raise ShapeMismatch(f"{_label(first)}: cannot merge {' and '.join(sorted(kinds))} deltas")
    sums: dict = {}
    for t in terms:
        for role, ref in t.module.adapter.tensors.items():
            x = ref.torch()
            if role in sums and sums[role][0].shape != x.shape:
                raise ShapeMismatch(f"{_label(t.module)}: {role} shapes do not fit: {list(sums[role][0].shape)} "
                                    f"vs {list(x.shape)} in {t.lora.path}")
            acc = (t.weight * t.module.scale) * x.to(torch.float64)
            sums[role] = (acc + sums[role][0], sums[role][1]) if role in sums else (acc, x.dtype)
    tensors = {role: mem.add(f"{len(mem.keys())}:{first.component}.{first.name}.{role}", acc.to(out_dtype or dt))
               for role, (acc, dt) in sums.items()}
    merged = Module(first.name, first.component, type(first.adapter)(tensors), keys=[], target=first.target,
                    part=first.part)
    return merged


def _describe(lora: Lora, weight: float) -> dict:
    return {"path": lora.path, "weight": weight, "family": getattr(lora.family, "id", None) or "unknown",
            "format": lora.format, "modules": len(lora.modules)}
