"""The public Python API. Every CLI command is one function here with the same name and arguments."""

from __future__ import annotations

import os

from loratools.errors import LoraToolsError
from loratools.families import ModuleEvidence, detect_family
from loratools.formats import read_modules
from loratools.formats.peft_config import AdapterConfig
from loratools.io.sources import open_lora, peft_bundle
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
        for component, folder in bundle.items():
            part = load(folder, allow_pickle=allow_pickle, family="unknown")
            parts.append(part)
            for m in part.modules:
                m.component = component
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
        fam = get_family(override)
        return FamilyResult(id=fam.id, confidence=1.0, evidence=["given with --family"],
                            model_component=fam.model_component, given=True)
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

    with load(path, allow_pickle=allow_pickle, family=family) as lora:
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
        result = convert_lora(lora, to, dest, family=family, dtype=_dtype(dtype), overwrite=overwrite, sync=sync,
                              uniform_alpha=uniform_alpha, kohya_names=kohya_names,
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
    return convert_lora(lora, target, Path(path), family=family, dtype=_dtype(dtype), overwrite=overwrite,
                        operation=operation, sync=sync, allow_nonfinite=allow_nonfinite)


_DTYPES = {"keep": None, None: None, "fp16": "F16", "float16": "F16", "bf16": "BF16", "bfloat16": "BF16",
           "fp32": "F32", "float32": "F32"}


def _dtype(name: str | None) -> str | None:
    from loratools.errors import UsageError

    if name not in _DTYPES:
        raise UsageError(f"unknown dtype '{name}' (keep, fp16, bf16, fp32)")
    return _DTYPES[name]


def _lora_spec(spec) -> tuple[str, float]:
    """``path``, ``(path, strength)`` or ``"path:strength"`` (the suffix counts only when it is a number and
    the whole text is not an existing path)."""
    from loratools.errors import UsageError

    if isinstance(spec, (tuple, list)):
        path, strength = spec
        return os.fspath(path), float(strength)
    text = os.fspath(spec)
    head, sep, tail = text.rpartition(":")
    if sep and head and not os.path.exists(text):
        try:
            return head, float(tail)
        except ValueError:
            raise UsageError(f"strength must be a number in PATH:STRENGTH, got {tail!r}", text) from None
    return text, 1.0


def _sha256(path: str) -> str | None:
    from loratools.io.hashing import file_hashes

    if os.path.isdir(path):
        path = os.path.join(path, "adapter_model.safetensors")
    return file_hashes(path, None)["sha256"] if os.path.isfile(path) else None


def bake(base: str | os.PathLike, loras, output: str | os.PathLike, *, dtype: str | None = None,
         device: str = "auto", allow_unmatched: bool = False, overwrite: bool = False, family: str | None = None,
         allow_pickle: bool = False, sync: bool = False, allow_nonfinite: bool = False):
    """Write ``base`` with LoRAs merged in: W' = W + Σ strength·s·ΔW for every adapted weight.

    ``loras`` is a list of paths, ``(path, strength)`` pairs or ``"path:strength"`` strings. ``base`` is a
    single-file checkpoint or a diffusers model folder; ``output`` has the same shape (file or folder).
    Every other tensor is copied byte for byte (unless ``dtype`` casts floats). Returns a ``BakeResult``.

    Example:
        >>> r = loratools.bake("sdxl_base.safetensors", ["style.safetensors:0.8"], "sdxl_style.safetensors")
        >>> r.loras[0]["unmatched"]
        0
    """
    from contextlib import ExitStack

    from loratools.io.checkpoints import open_base
    from loratools.ops.bake import bake_loras
    from loratools.ops.placement import base_family
    from loratools.ops.validate import check_writable

    specs = [_lora_spec(s) for s in ([loras] if isinstance(loras, (str, os.PathLike)) else loras)]
    with ExitStack() as stack:
        base_model = stack.enter_context(open_base(base))
        told = base_family(base_model)
        items, provenance = [], []
        for path, strength in specs:
            lora = stack.enter_context(load(path, allow_pickle=allow_pickle, family=family))
            check_writable(lora, allow_nonfinite)
            items.append((lora, strength, _bake_family(lora, family, told, base_model)))
            provenance.append({"file": os.path.basename(os.path.normpath(path)), "sha256": _sha256(path),
                               "strength": strength})
        dest = os.fspath(output)
        if not base_model.is_folder and (dest.endswith(("/", os.sep)) or os.path.isdir(dest)):
            dest = os.path.join(dest, os.path.basename(base_model.path))  # -o names a folder: keep the base's name
        return bake_loras(base_model, items, dest, dtype=_dtype(dtype), device=device,
                          allow_unmatched=allow_unmatched, overwrite=overwrite, provenance=provenance, sync=sync)


def extract(base: str | os.PathLike, tuned: str | os.PathLike, output: str | os.PathLike, *, rank: int | None = None,
            dynamic=None, conv_rank: int | None = None, text_encoders: bool = False, to: str = "kohya",
            device: str = "auto", family: str | None = None, overwrite: bool = False, sync: bool = False):
    """Extract a LoRA from two checkpoints of the same family (ΔW = tuned − base, per module by SVD).

    Give ``rank`` (kept terms per module; with ``dynamic`` it caps the rule) or ``dynamic``
    (``"sv_fro:0.95"``, ``"sv_ratio:20"``, ``"sv_cumulative:0.9"``). k×k convs are extracted only with
    ``conv_rank``, text encoders only with ``text_encoders=True``. Returns an ``ExtractResult`` whose
    ``modules`` list each module's rank and retained energy.

    Example:
        >>> r = loratools.extract("sdxl_base.safetensors", "finetune.safetensors", "diff.safetensors", rank=32)
        >>> r.modules[0]["retained_energy"] > 0.5
        True
    """
    from pathlib import Path

    from loratools.errors import UnknownFamily
    from loratools.io.checkpoints import open_base
    from loratools.ops.extract import extract_lora
    from loratools.ops.placement import base_family

    with open_base(base) as b, open_base(tuned) as t:
        fid, fits, _ = (family, [], "") if family else base_family(b)
        if fid is None:
            which = f" (it fits {', '.join(fits)})" if fits else ""
            raise UnknownFamily(f"cannot tell the base-model family from the checkpoint{which}; pass --family", base)
        return extract_lora(b, t, Path(output), family=fid, to=to, rank=rank, dynamic=dynamic, conv_rank=conv_rank,
                            text_encoders=text_encoders, device=device, overwrite=overwrite, sync=sync)


def _bake_family(lora: Lora, family: str | None, told: tuple, base):
    """The family to bake ``lora`` as: given with --family, else the base's, checked against the LoRA's evidence;
    else, when the base fits several families, the one the LoRA decided, or any of those the LoRA and the base
    both fit when each would patch the same tensors the same way (never a guess)."""
    from loratools.errors import UnknownFamily
    from loratools.families import get_family

    if family:
        return get_family(family)
    base_fid, fits, how = told
    found = lora.family
    decided = found is not None and found.decided
    if base_fid is not None:
        if decided and found.id != base_fid:
            raise UnknownFamily(f"the LoRA is {found.id} but the base is {base_fid} (told by {how}); pass --family "
                                "to bake it anyway", lora.path)
        if found is not None and not decided and found.candidates and base_fid not in found.candidates:
            raise UnknownFamily(f"the base is {base_fid} (told by {how}) but the LoRA fits only "
                                f"{', '.join(found.candidates)}", lora.path)
        return get_family(base_fid)
    if decided:
        if fits and found.id not in fits:
            raise UnknownFamily(f"the LoRA is {found.id} but the base fits only {', '.join(fits)}; pass --family "
                                "to bake it anyway", lora.path)
        return get_family(found.id)
    mine = list(found.candidates) if found is not None else []
    pool = [f for f in mine if f in fits] if fits else mine
    if pool and _same_patches(lora, base, pool):
        return get_family(pool[0])
    shown = ", ".join(pool or mine)
    which = f" (it fits {', '.join(fits)})" if fits else ""
    raise UnknownFamily(f"cannot tell the base-model family: neither the LoRA nor the base{which} decides one, and "
                        f"the families that fit both would bake it differently; pass --family with one of: {shown}",
                        lora.path)


def _same_patches(lora: Lora, base, families: list[str]) -> bool:
    """Whether every family in ``families`` puts each of the LoRA's modules on the same base rows the same way."""
    from loratools.errors import LoraToolsError
    from loratools.families import get_family
    from loratools.ops.bake import plan_patches

    seen = set()
    for fid in families:
        try:
            patches, unmatched, _ = plan_patches(base, [(lora, 1.0, get_family(fid))], allow_unmatched=False)
        except LoraToolsError:
            return False
        if unmatched:
            return False
        seen.add(tuple(sorted((key, p.module.name, p.where.rows, p.where.src, p.where.transpose, p.swap, p.bias)
                              for key, ps in patches.items() for p in ps)))
    return len(seen) == 1


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

    With ``catalogue`` (a ``.jsonl`` path) unchanged files (same size and mtime) keep their old records and the
    catalogue is rewritten with the result. Summarise with ``summarize_catalogue``.

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

