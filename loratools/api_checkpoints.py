"""bake and extract: the public operations on checkpoints (the LoRA-file operations are in ``loratools.api``,
which exports these too)."""

from __future__ import annotations

import math
import os

from loratools.model import Lora


FLOAT32_MAX = 3.4028234663852886e38  # strengths scale float32 products: a larger one is Inf there


def lora_spec(spec) -> tuple[str, float]:
    """``path``, ``(path, strength)`` or ``"path:strength"`` (the suffix counts only when it is a number and
    the whole text is not an existing path); a strength that is not a finite float32 number is refused."""
    from loratools.errors import UsageError

    if isinstance(spec, (tuple, list)):
        path, strength = spec
        path, text = os.fspath(path), f"{os.fspath(path)}:{strength}"
    else:
        text = os.fspath(spec)
        head, sep, strength = text.rpartition(":")
        if not (sep and head and not os.path.exists(text)):
            return text, 1.0
        path = head
    try:
        value = float(strength)
    except (TypeError, ValueError):
        raise UsageError(f"strength must be a number in PATH:STRENGTH, got {strength!r}", text) from None
    if not math.isfinite(value) or abs(value) > FLOAT32_MAX:
        raise UsageError(f"strength {strength!r} is not a finite (float32) number", path)
    return path, value


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

    from loratools.api import dtype_code, load
    from loratools.io.checkpoints import open_base
    from loratools.ops.bake import bake_loras
    from loratools.ops.placement import base_family
    from loratools.ops.validate import check_writable

    specs = [lora_spec(s) for s in ([loras] if isinstance(loras, (str, os.PathLike)) else loras)]
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
        return bake_loras(base_model, items, dest, dtype=dtype_code(dtype), device=device,
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
        from loratools.ops.convert import check_given

        check_given(lora)
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
