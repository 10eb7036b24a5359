"""The public Python API. Every CLI command is one function here with the same name and arguments."""

from __future__ import annotations

import os

from loratools.api_checkpoints import bake, extract
from loratools.errors import LoraToolsError
from loratools.families import ModuleEvidence, detect_family, get_family
from loratools.formats import read_modules
from loratools.formats.peft_config import AdapterConfig
from loratools.io.sources import bundle_component, open_lora, peft_bundle
from loratools.model import Lora, TensorRef

__all__ = ["load", "inspect", "convert", "verify", "save", "resize", "merge", "bake", "extract"]


def load(path: str | os.PathLike, allow_pickle: bool = False, family: str | None = None) -> Lora:
    """Read a LoRA file or PEFT folder into the canonical model (tensors stay lazy in the file).

    Args:
        path: a ``.safetensors`` file, a PEFT adapter folder, or a pickle (with ``allow_pickle``).
        allow_pickle: load ``.ckpt/.pt/.bin`` through ``torch.load(weights_only=True)``.
        family: a family id that overrides detection.

    Example:
        >>> lora = loratools.load("style.safetensors")
        >>> lora.format, lora.family.id, len(lora.modules)
    """
    bundle = peft_bundle(path)
    if bundle:
        return _load_bundle(path, bundle, allow_pickle, family)
    opened = open_lora(path, allow_pickle)
    src = opened.source
    try:
        tensors = {}
        for key in src.keys():
            info = src.info(key)
            tensors[key] = TensorRef(src, key, info.dtype, tuple(info.shape))
        metadata = dict(src.metadata or {})
        config = AdapterConfig.from_peft(opened.peft_config) if opened.peft_config is not None else None
        result = read_modules(tensors, metadata, opened.path, config)
    except LoraToolsError as exc:
        src.close()
        if exc.path is None:
            exc.path = opened.path  # every error names the file
        raise
    except BaseException:
        src.close()
        raise
    fmt = "peft" if opened.peft_config is not None and result.format in ("peft", "diffusers") else result.format
    lora = Lora(path=opened.path, format=fmt, modules=result.modules, metadata=metadata,
                unknown_keys=result.unknown_keys, extras=result.extras, warnings=result.warnings,
                conflicts=result.conflicts, rejected=result.rejected,
                tensors=tensors, size_bytes=opened.size_bytes, source=src,
                config=opened.peft_config)
    lora.family = _family(lora, family)
    _name_components(lora)
    return lora


def _load_bundle(path, bundle: dict, allow_pickle: bool, family: str | None) -> Lora:
    """A folder of PEFT adapters, one per component (what `convert --to peft` writes), as one LoRA."""
    parts = []
    try:
        for name, folder in bundle.items():
            part = load(folder, allow_pickle=allow_pickle, family="unknown")
            parts.append(part)
            component, prefix = bundle_component(name)
            for m in part.modules:
                m.component, m.name = component, prefix + m.name
    except BaseException:
        for p in parts:
            p.close()
        raise
    first = parts[0]
    lora = Lora(path=str(path), format="peft", modules=[m for p in parts for m in p.modules],
                metadata=first.metadata, unknown_keys=[k for p in parts for k in p.unknown_keys],
                warnings=[w for p in parts for w in p.warnings], conflicts=[c for p in parts for c in p.conflicts],
                rejected=[r for p in parts for r in p.rejected],
                tensors={f"{c}/{k}": r for c, p in zip(bundle, parts) for k, r in p.tensors.items()},
                size_bytes=sum(p.size_bytes for p in parts), source=_Sources([p.source for p in parts]))
    lora.family = _family(lora, family)
    _name_components(lora)
    return lora


class _Sources:
    def __init__(self, sources):
        self.sources = sources

    def close(self):
        for s in self.sources:
            s.close()


def _family(lora: Lora, override: str | None):
    from loratools.families import FamilyResult, get_family

    if override == "unknown":
        return FamilyResult(id="unknown", reason="not detected")
    if override:
        from loratools.families.detect import contradiction

        fam = get_family(override)
        evidence = [ModuleEvidence(m.component, m.name, m.adapter.in_dim, m.adapter.out_dim) for m in lora.modules]
        return FamilyResult(id=fam.id, confidence=1.0, evidence=["given with --family"],
                            model_component=fam.model_component, given=True,
                            contradiction=contradiction(evidence, lora.metadata, fam.id))
    if lora.format == "cloneofsimo":  # positional keys: no names to match, the encoder width tells
        from loratools.formats.special import cloneofsimo_family

        fid, why = cloneofsimo_family(lora.modules)
        return FamilyResult(id=fid or "unknown", confidence=0.8 if fid else 0.0, evidence=why if fid else [],
                            reason=None if fid else why[0], model_component="unet")
    evidence = [ModuleEvidence(m.component, m.name, m.adapter.in_dim, m.adapter.out_dim) for m in lora.modules]
    return detect_family(evidence, lora.metadata)


def _name_components(lora: Lora) -> None:
    """The diffusion model's component is 'unet' or 'transformer' as the family says."""
    name = getattr(lora.family, "model_component", None) or "model"
    if name == "model":
        name = "unet" if any(k.startswith(("lora_unet_", "unet.")) for k in lora.tensors) else "transformer"
    for m in lora.modules:
        if m.component == "model":
            m.component = name


def inspect(path: str | os.PathLike, *, layers: bool = False, stats: bool = False, hashes: bool = False,
            metadata: bool = False, allow_pickle: bool = False, family: str | None = None) -> dict:
    """Describe a LoRA file: format, family with evidence, adapters, ranks, alphas, sizes.

    Returns the JSON-ready dict that ``loratools inspect --json`` prints for one path.

    Example:
        >>> info = loratools.inspect("style.safetensors", hashes=True)
        >>> info["family"]["id"], info["rank"]["common"], info["hashes"]["autov2"]
    """
    from loratools import summary

    try:
        lora = load(path, allow_pickle=allow_pickle, family=family)
    except LoraToolsError as exc:
        if exc.message.startswith("not a LoRA: none of its"):  # a full model? say which (scan keeps the record)
            try:
                exc.checkpoint = checkpoint(path)
            except LoraToolsError:
                raise exc from None
            told = exc.checkpoint
            if told["candidates"]:
                which = (f"{get_family(told['family']).name} ({told['family']})" if told["family"]
                         else f"one of {', '.join(told['candidates'])}")
                exc.message += (f"; it is a base checkpoint of {which}, told by {told['told_by']} (scan catalogues "
                                "checkpoints, bake patches them)")
        raise
    with lora:
        report = summary.describe(lora)
        if layers:
            report["layers"] = summary.layers(lora)
        if metadata:
            report["training"] = summary.training(lora)
        if hashes:
            report["hashes"] = summary.hashes(lora)
        if stats:
            from loratools.ops.stats import module_stats

            report["stats"] = module_stats(lora)
        return report


def checkpoint(path: str | os.PathLike) -> dict:
    """A base checkpoint (a safetensors file or a diffusers model folder) as a scan record: ``family`` (None
    unless one fits), ``candidates``, ``told_by`` (its weights, ``model_index.json``), ``tensors`` and ``files``
    (each weights file's path in a folder, for hashing). Torch-free; ``LoraToolsError`` when it is not one."""
    from loratools.io.checkpoints import open_base
    from loratools.ops.placement import base_family

    with open_base(path) as base:
        fid, fits, how = base_family(base)
        return {"kind": "checkpoint", "family": fid, "candidates": list(fits), "told_by": how or None,
                "tensors": sum(len(f.header.tensors) for f in base.files),
                "files": {f.rel: f.sf.path for f in base.files} if base.is_folder else None}


def convert(path: str | os.PathLike, to: str, output: str | os.PathLike | None = None, *, family: str | None = None,
            dtype: str | None = None, overwrite: bool = False, allow_pickle: bool = False, many: bool = False,
            lossy_rank: int | None = None, device: str = "auto", sync: bool = False, uniform_alpha: bool = False,
            kohya_names: str | None = None, allow_nonfinite: bool = False):
    """Rewrite one LoRA in another naming (``kohya``, ``diffusers``, ``peft``, ``comfy``) with the same effect.

    Returns a ``ConvertResult``; nothing is written when it raises. ``output`` follows the CLI's ``-o``
    rules (a folder when it exists or ends with '/'; a PEFT target is always a folder). ``uniform_alpha``
    (kohya, comfy) gives every module one alpha, each module's own ratio folded into its lora_up, for loaders
    that apply one alpha to all modules (diffusers' kohya reader). ``kohya_names`` (``native`` | ``diffusers``)
    picks which module names a kohya file flattens (docs/convert.md says which loaders read which).

    Example:
        >>> r = loratools.convert("style.safetensors", to="diffusers")
        >>> r.output
        'style.diffusers.safetensors'
    """
    from loratools.ops.convert import convert_lora, output_path

    dest = output_path(str(path), to, None if output is None else str(output), many)
    with load(path, allow_pickle=allow_pickle, family=family) as lora:
        notes: list[str] = []
        if lossy_rank is not None:
            from loratools.ops.resize import to_lora

            lora, notes = to_lora(lora, lossy_rank, device)
        result = convert_lora(lora, to, dest, family=family, dtype=dtype_code(dtype), overwrite=overwrite,
                              sync=sync, uniform_alpha=uniform_alpha, kohya_names=kohya_names,
                              allow_nonfinite=allow_nonfinite)
        result.warnings += notes
        return result


def verify(a: str | os.PathLike, b: str | os.PathLike, *, rtol: float = 1e-5, family: str | None = None,
           allow_pickle: bool = False):
    """Compare the effective ΔW of every adapted weight in two LoRA files of any formats.

    Example:
        >>> loratools.verify("style.safetensors", "style.diffusers.safetensors").equal
        True
    """
    from loratools.ops.verify import verify as _verify

    with load(a, allow_pickle=allow_pickle, family=family) as la, load(b, allow_pickle=allow_pickle) as lb:
        return _verify(la, lb, rtol=rtol, family=family)


def save(lora: Lora, path: str | os.PathLike, *, to: str | None = None, family: str | None = None,
         dtype: str | None = None, overwrite: bool = False, operation: str = "save", sync: bool = False,
         allow_nonfinite: bool = False):
    """Write a LoRA (e.g. the result of ``resize`` or ``merge``) in format ``to`` (default: its own).

    Example:
        >>> small, report = loratools.resize(loratools.load("style.safetensors"), rank=16)
        >>> loratools.save(small, "style.r16.safetensors")
    """
    from pathlib import Path

    from loratools.ops.convert import SAME_FORMAT, convert_lora

    target = to or SAME_FORMAT.get(lora.format, "kohya")
    return convert_lora(lora, target, Path(path), family=family, dtype=dtype_code(dtype), overwrite=overwrite,
                        operation=operation, sync=sync, allow_nonfinite=allow_nonfinite)


_DTYPES = {"keep": None, None: None, "fp16": "F16", "float16": "F16", "bf16": "BF16", "bfloat16": "BF16",
           "fp32": "F32", "float32": "F32"}


def convert_destination(path: str | os.PathLike, to: str, output: str | os.PathLike | None = None,
                        many: bool = False) -> str:
    """Where ``convert`` writes the conversion of ``path`` (``-o`` as the CLI reads it; ``many``: several inputs)."""
    from loratools.ops.convert import output_path

    return str(output_path(str(path), to, None if output is None else str(output), many))


def check_format(to: str) -> None:
    """Raise ``UsageError`` (naming the choices) when ``to`` is not a format loratools writes."""
    from loratools.formats import codec_for

    codec_for(to)


def check_family(fid: str) -> None:
    """Raise ``UnknownFamily`` (naming the closest id) when ``fid`` is not a family id loratools knows."""
    from loratools.families import get_family

    if fid != "unknown":  # --family unknown: take no family (text-encoder-only files, inspect)
        get_family(fid)


def dtype_code(name: str | None) -> str | None:
    """The safetensors dtype a ``dtype`` argument names (``"fp16"`` -> ``"F16"``; None or ``"keep"``: None)."""
    from loratools.errors import UsageError

    if name not in _DTYPES:
        raise UsageError(f"unknown dtype '{name}' (keep, fp16, bf16, fp32)")
    return _DTYPES[name]


def _as_lora(item, allow_pickle: bool = False, family: str | None = None) -> Lora:
    return item if isinstance(item, Lora) else load(item, allow_pickle=allow_pickle, family=family)


def resize(lora, *, rank: int | None = None, dynamic: str | None = None, max_rank: int | None = None,
           lossy_rank: int | None = None, device: str = "auto", dtype: str | None = None,
           allow_nonfinite: bool = False):
    """Reduce every module to its best rank-k approximation, in factor space (a Lora or a path).

    Returns ``(Lora, report)``; write the result with ``loratools.save``.

    Example:
        >>> small, report = loratools.resize("style.safetensors", rank=16)
        >>> loratools.save(small, "style.r16.safetensors")
    """
    from loratools.ops.resize import resize as _resize

    return _resize(_as_lora(lora), rank=rank, dynamic=dynamic, max_rank=max_rank, lossy_rank=lossy_rank,
                   device=device, dtype=dtype, allow_nonfinite=allow_nonfinite)


def merge(items, *, method: str = "concat", rank: int | None = None, dynamic: str | None = None,
          max_rank: int | None = None, lossy_rank: int | None = None, device: str = "auto",
          allow_mixed_families: bool = False, dtype: str | None = None, allow_nonfinite: bool = False):
    """Combine LoRAs with weights: ``items`` is a list of ``(lora_or_path, weight)`` (or bare LoRAs, weight 1).

    ``method="concat"`` is exact (factors stacked along rank); ``"svd"`` then truncates optimally to
    ``rank``/``dynamic``. Returns ``(Lora, report)``.

    Example:
        >>> merged, report = loratools.merge([("a.safetensors", 0.7), ("b.safetensors", 0.3)])
        >>> loratools.save(merged, "ab.safetensors")
    """
    from loratools.ops.merge import merge as _merge

    pairs = [(it, 1.0) if not isinstance(it, tuple) else it for it in items]
    loaded = [(_as_lora(x), w) for x, w in pairs]
    for lora, _ in loaded:
        _canonical_targets(lora)
    return _merge(loaded, method=method, rank=rank, dynamic=dynamic, max_rank=max_rank, lossy_rank=lossy_rank,
                  device=device, allow_mixed_families=allow_mixed_families, dtype=dtype,
                  allow_nonfinite=allow_nonfinite)


def _canonical_targets(lora: Lora) -> None:
    """Give each module its canonical target (native path + part), so inputs in different namings meet."""
    from loratools.errors import LoraToolsError
    from loratools.families import get_family
    from loratools.ops.canonical import canonicalize

    if lora.family is None or not lora.family.decided:
        return  # modules match by (component, name)
    try:
        canonicalize(lora, get_family(lora.family.id), lora_only=False)
    except LoraToolsError:
        pass  # no table for the family, or names outside it: modules match by (component, name)


def scan(paths, catalogue: str | os.PathLike | None = None, *, hashes: bool = False, jobs: int = 1) -> list[dict]:
    """Inventory LoRAs, adapter folders and checkpoints under ``paths`` (torch-free): one record per file.

    Records name files by absolute path. With ``catalogue`` (a ``.jsonl`` or ``.parquet`` path) unchanged files
    (same size and mtime) keep their old records and the catalogue is rewritten with the result; a path that does
    not exist, or a ``catalogue`` file that is not a scan catalogue, is refused (``LoraToolsError``). Summarise with
    ``summarize_catalogue``.

    Example:
        >>> records = loratools.scan(["loras/"], "catalogue.jsonl", hashes=True)
        >>> loratools.summarize_catalogue(records)["duplicates"]
    """
    from loratools import catalogue as cat

    return cat.scan([paths] if isinstance(paths, (str, os.PathLike)) else paths, catalogue, hashes=hashes,
                    jobs=jobs)


def summarize_catalogue(records: list[dict]) -> dict:
    """Files per family and format, adapter types, size, duplicates, broken and contradictory files."""
    from loratools.catalogue import summarize

    return summarize(records)

