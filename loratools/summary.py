"""What `inspect` reports about a loaded LoRA, as JSON-ready dicts (report.py renders them)."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import asdict, is_dataclass

from loratools.model import Lora


def _distribution(values: list) -> dict:
    present = [v for v in values if v is not None]
    counts = Counter(present)
    return {
        "min": min(present) if present else None,
        "max": max(present) if present else None,
        "common": counts.most_common(1)[0][0] if counts else None,
        "values": {_key(v): n for v, n in sorted(counts.items())},
    }


def _key(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _family_dict(lora: Lora) -> dict:
    fam = lora.family
    d = asdict(fam) if is_dataclass(fam) else dict(fam or {})
    d.pop("model_component", None)
    return d


def describe(lora: Lora) -> dict:
    """The summary every inspect prints (the DESIGN.md §6 JSON fields)."""
    mods = lora.modules
    alpha = _distribution([m.alpha for m in mods])
    alpha["missing"] = sum(1 for m in mods if m.alpha is None)
    types = Counter(m.adapter.label for m in mods)
    dora = sum(1 for m in mods if m.magnitude is not None)
    if dora:
        types["dora"] = dora
    axes = Counter(m.dora_axis for m in mods if m.magnitude is not None)
    refs = lora.tensors.values()
    warnings = list(lora.warnings) + list(lora.conflicts)
    # kohya's spelling carries an alpha per module; PEFT's (lora_A/lora_B, as ai-toolkit writes comfy files) never
    # does, by convention scale 1
    kohya_suffixes = any(".lora_down." in k for k in lora.tensors)
    if alpha["missing"] and lora.format in ("kohya", "lycoris", "comfy", "onetrainer") and kohya_suffixes:
        warnings.append(f"{alpha['missing']} modules have no alpha: scale 1 assumed (alpha = rank)")
    if lora.unknown_keys:
        warnings.append(f"{len(lora.unknown_keys)} keys not recognised (listed under unknown_keys)")
    return {
        "path": lora.path,
        "format": lora.format,
        "family": _family_dict(lora),
        "adapters": dict(types.most_common()),
        "dora_axis": dict(axes) if axes else None,
        "modules": len(mods),
        "components": dict(sorted(Counter(m.component for m in mods).items())),
        "rank": _distribution([m.rank for m in mods]),
        "alpha": alpha,
        "scale": _distribution([round(m.scale, 6) for m in mods]),
        "rslora": any(m.rslora for m in mods),
        "dtypes": dict(Counter(r.dtype for r in refs).most_common()),
        "tensors": len(lora.tensors),
        "parameters": sum(r.numel for r in refs),
        "size_bytes": lora.size_bytes,
        "metadata": dict(lora.metadata),
        "extras": {k: len(v) for k, v in lora.extras.items()},
        "unknown_keys": list(lora.unknown_keys),
        "warnings": warnings,
    }


def layers(lora: Lora) -> list[dict]:
    """One row per module, in file order."""
    rows = []
    for m in lora.modules:
        a = m.adapter
        rows.append({
            "name": m.name, "component": m.component, "type": a.label, "rank": m.rank,
            "alpha": m.alpha, "scale": round(m.scale, 6), "in": a.in_dim, "out": a.out_dim,
            "kernel": list(getattr(a, "kernel", None) or []) or None, "dora": m.dora_axis,
            "dtype": next(iter(a.tensors.values())).dtype, "parameters": a.parameters,
        })
    return rows


def training(lora: Lora) -> dict:
    from loratools.metadata import tag_frequencies, training_keys, training_summary

    return {
        "summary": training_summary(lora.metadata),
        "tags": [[t, n] for t, n in tag_frequencies(lora.metadata)],
        "keys": training_keys(lora.metadata),
    }


def _file_hashes(src, path) -> dict:
    """The hashes of the file ``src`` reads (AutoV3 from its data region when it is safetensors)."""
    from loratools.io.hashing import file_hashes

    header = getattr(src, "header", None)
    return file_hashes(str(getattr(src, "path", path)), header.data_start if header is not None else None)


def hashes(lora: Lora) -> dict:
    src = lora.source
    parts = getattr(src, "sources", None)
    if parts is not None:  # a folder of PEFT adapters, one per component: each weights file has its own hashes
        return {"files": {os.path.relpath(str(part.path), str(lora.path)): _file_hashes(part, part.path)
                          for part in parts}}
    out = _file_hashes(src, lora.path)
    embedded = lora.metadata.get("sshs_model_hash")
    if embedded and "addnet" in out:
        out["embedded_sshs_model_hash"] = embedded
        out["embedded_matches"] = embedded.lower().removeprefix("0x") == out["addnet"]
    return out
