"""The data of a report, JSON-ready (the page embeds it; `report --json` prints it).

For each LoRA: the inspect summary (what ``loratools.inspect(path, hashes=True, metadata=True)`` returns), one row
per module with the numbers of ``inspect --stats`` (its own code: ``module_stats``) and the module's block, the
per-block strength map, spectra and retained-energy curves per module group, what `resize` would keep under a
few rules, and the flags (NaN/Inf, all-zero, metadata the tensors contradict). Modules are read one at a time and
dropped, so memory stays bounded by the largest module plus the spectra (at most rank values per module).
"""

from __future__ import annotations

import json
import math
import os

from loratools import summary
from loratools._version import __version__
from loratools.model import Lora
from loratools.ops.stats import module_stats
from loratools.ops.threads import small_matrix_threads
from loratools.visual.blocks import OTHER, Placer, component_order
from loratools.visual.groups import Measured, default_rules, group_summary, predict, resize_refusals, whole_curve

FORMAT_VERSION = 1


def inspect_summary(lora: Lora, hashes: bool = True) -> dict:
    """What ``loratools.inspect(path, hashes=hashes, metadata=True)`` returns, from the loaded LoRA."""
    info = summary.describe(lora)
    info["training"] = summary.training(lora)
    if hashes:
        info["hashes"] = summary.hashes(lora)
    return info


def _scaled(stats: dict, strength: float) -> dict:
    """`inspect --stats` numbers at a user strength (norms scale with |strength|; counts do not)."""
    k = abs(strength)
    if k == 1:
        return stats
    out = dict(stats)
    for name in ("norm", "top_singular_value", "total_norm", "max_norm", "mean_norm"):
        if isinstance(out.get(name), float):
            out[name] *= k
    return out


def lora_data(lora: Lora, *, strength: float = 1.0, ranks=None, dynamic=None, hashes: bool = True,
              label: str | None = None) -> dict:
    """The report's data for one loaded LoRA at ``strength`` (which multiplies every ‖ΔW‖)."""
    from loratools.catalogue import _contradictions  # the check `scan` makes of every file

    info = inspect_summary(lora, hashes)
    fam = lora.family
    decided = fam is not None and fam.decided
    placer = Placer(fam.id if decided else None, lora.format, lora.modules,
                    () if decided else getattr(fam, "candidates", ()))
    rows, measured, stacks, cells = [], [], {}, {}
    with small_matrix_threads():  # QRs of r-column matrices: more threads only slow them down on busy cores
        # the numbers of `inspect --stats`, by its own code, and each LoRA module's spectrum from the same SVD (the
        # factor-space one resize works on; None for adapters that are no low-rank product)
        spectra: list = []
        stats = module_stats(lora, spectra)
        for m, row, spectrum in zip(lora.modules, stats["modules"], spectra):
            row = _scaled(row, strength)
            s = spectrum if row["norm"] is not None else None
            place, stack = placer.place(m.component, m.name)
            group = f"{place.component} {place.stack if place.stack is not None else OTHER}"
            rows.append({**row, "block": place.block, "canonical": place.canonical, "rank": m.rank,
                         "alpha": m.alpha, "scale": m.scale})
            measured.append(Measured(m, group, s, abs(m.scale * strength), tuple(row["flags"])))
            if stack is not None:
                stacks.setdefault((place.component, stack.name), stack)
            key = (place.component, place.stack, place.index if place.stack else place.canonical)
            cell = cells.setdefault(key, {"component": place.component, "stack": place.stack,
                                          "index": place.index, "block": place.block, "energy": 0.0,
                                          "modules": 0, "flags": []})
            cell["modules"] += 1
            if row["norm"] is not None and math.isfinite(row["norm"]):
                cell["energy"] += row["norm"] ** 2
            cell["flags"] += [f for f in row["flags"] if f not in cell["flags"]]
    blocks = []
    for cell in cells.values():
        energy = cell.pop("energy")
        blocks.append({**cell, "norm": math.sqrt(energy)})
    by_group: dict[str, list[Measured]] = {}
    for it in measured:
        by_group.setdefault(it.group, []).append(it)
    order = _group_order(stacks)
    groups = [group_summary(name, by_group[name]) for name in sorted(by_group, key=order)]
    rules = default_rules(info["rank"]["max"], ranks, dynamic)
    flagged = {k: [r["name"] for r in rows if k in r["flags"]] for k in ("nan_or_inf", "all_zero", "needs_base")}
    return {
        "path": lora.path, "label": label or os.path.basename(os.path.normpath(lora.path)), "strength": strength,
        "inspect": info,
        "stats": _scaled(stats["summary"], strength),
        "modules": rows,
        "stacks": [{"component": c, "name": st.name, "order": list(st.order), "size": st.size,
                    "known": sorted(st.known)} for (c, _), st in stacks.items()],
        "blocks": blocks,
        "groups": groups,
        "retained_energy": whole_curve(groups),
        "resize": {"predictions": [predict(rule, measured) for rule in rules],
                   "refused": resize_refusals(measured, lora)},
        "flags": {**flagged, "contradictions": _contradictions(info), "warnings": list(info["warnings"])},
    }


def _group_order(stacks: dict):
    rank = {f"{c} {name}": (component_order(c), tuple(st.order)) for (c, name), st in stacks.items()}

    def key(group: str):
        component = group.split(" ", 1)[0]
        return rank.get(group, (component_order(component), (9,)))

    return key


def block_axis(loras: list[dict]) -> list[dict]:
    """The cells every LoRA's strength map is drawn on, in model order: per component, its stacks (every block the
    model has, when the data says how many; else every index up to the highest seen), then the other modules.
    Several LoRAs share one axis, so their maps line up."""
    stacks: dict[tuple[str, str], dict] = {}
    others: dict[str, list[str]] = {}
    seen: dict[tuple[str, str], set[int]] = {}
    for data in loras:
        for st in data["stacks"]:
            stacks.setdefault((st["component"], st["name"]), st)
        for cell in data["blocks"]:
            if cell["stack"] is None:
                names = others.setdefault(cell["component"], [])
                if cell["block"] not in names:
                    names.append(cell["block"])
            else:
                seen.setdefault((cell["component"], cell["stack"]), set()).add(cell["index"])
    components = sorted({c for c, _ in stacks} | set(others), key=component_order)
    axis = []
    for comp in components:
        cells = []
        for (c, name), st in sorted(stacks.items(), key=lambda kv: tuple(kv[1]["order"])):
            if c != comp:
                continue
            indices = set(st["known"]) | seen.get((c, name), set())
            if st["size"]:
                indices |= set(range(st["size"]))
            if not st["known"] and not st["size"]:
                indices |= set(range(max(indices) + 1))
            cells += [{"stack": name, "index": i, "block": f"{name} {i}"} for i in sorted(indices)]
        cells += [{"stack": None, "index": None, "block": b} for b in others.get(comp, [])]
        axis.append({"component": comp, "cells": cells})
    return axis


def to_json(report: dict, **kwargs) -> str:
    """The report as JSON; a NaN or Inf (an alpha of a broken file) becomes the string "nan"/"inf"/"-inf"."""
    return json.dumps(_finite_only(report), allow_nan=False, default=str, **kwargs)


def _finite_only(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)
    if isinstance(obj, dict):
        return {k: _finite_only(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_only(v) for v in obj]
    return obj


def report_data(loras: list[dict]) -> dict:
    """The whole report: its LoRAs and the block axis they share."""
    return {"format_version": FORMAT_VERSION, "generator": f"loratools {__version__}", "loras": loras,
            "axis": block_axis(loras)}
