"""Converting a LoRA between kohya, diffusers, PEFT and comfy naming with the same numerical effect."""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from loratools._version import __version__
from loratools.errors import FormatError, LoraToolsError, UnknownFamily, UsageError
from loratools.families import Family, get_family
from loratools.formats import WriteOptions, codec_for
from loratools.formats.writing import common_alpha
from loratools.io.writer import NonFinite
from loratools.model import Lora, OutModule
from loratools.ops.canonical import canonicalize, plan
from loratools.ops.validate import check_writable

STALE_KEYS = ("sshs_model_hash", "sshs_legacy_hash", "modelspec.hash_sha256")


@dataclass
class ConvertResult:
    path: str
    output: str
    source_format: str
    target: str
    family: str
    modules_in: int
    modules_out: int
    files: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _undecided(lora: Lora, why: str = "") -> UnknownFamily:
    """One line: why the family is open, and the candidates to pass with ``--family``."""
    fam = lora.family
    reason = getattr(fam, "reason", None)
    cands = list(getattr(fam, "candidates", None) or [])
    text = "cannot tell the base-model family" + (f": {reason}" if reason else "") + (f"; {why}" if why else "")
    text += f"; pass --family with one of: {', '.join(cands)}" if cands else "; pass --family"
    return UnknownFamily(text, lora.path)


def check_given(lora: Lora) -> None:
    """Refuse a family named with --family that the file's shapes contradict (they decide another family)."""
    conflict = getattr(lora.family, "contradiction", None)
    if conflict:
        raise UsageError(f"--family {lora.family.id}: {conflict}; the output would not load into that model",
                            lora.path)


def family_of(lora: Lora, override: str | None) -> str:
    """The family an operation may act on: given, or decided by the evidence; never a guess."""
    if override and override != "unknown":
        check_given(lora)
        return get_family(override).id
    fam = lora.family
    if fam is not None and fam.decided:
        return fam.id
    raise _undecided(lora)


def output_signature(mods: list[OutModule], family: Family, to: str) -> tuple:
    """What a plan writes, in the words of the target format: names, shapes, ranks, scales, and which stored rows
    (halves swapped or not) or source modules each tensor comes from, so that two families whose rules move the
    same names differently do not count as giving the same file."""
    codec = codec_for(to)

    def how(om: OutModule) -> tuple:
        if om.raw is None:
            return tuple(om.sources)
        return tuple((r.ref.key, r.lo, r.hi, r.swap) if r is not None else None for r in om.raw)

    return tuple((codec.stem(om, family), tuple(map(tuple, filter(None, om.shapes))), om.rank, om.scale, how(om))
                 for om in mods)


def choose_family(lora: Lora, override: str | None, build: Callable[[Family], list[OutModule]],
                  to: str) -> tuple[Family | None, list[OutModule]]:
    """The family to write ``lora`` for, and its plan. An undecided family is accepted only when every candidate
    gives the same output (text-encoder-only LoRAs in a naming that does not depend on the family); then the
    family is returned as None."""
    try:
        fid = family_of(lora, override)
    except UnknownFamily:
        cands = list(getattr(lora.family, "candidates", None) or [])
        signatures, plans, failed = set(), [], []
        for cid in cands:
            fam = get_family(cid)
            try:
                mods = build(fam)
                signatures.add(output_signature(mods, fam, to))
            except LoraToolsError:
                failed.append(cid)
                continue
            plans.append(mods)
        if failed:
            raise _undecided(lora, f"{', '.join(failed)} cannot name these modules in {to}") from None
        if len(signatures) == 1:
            return None, plans[0]
        raise _undecided(lora, f"the {to} file would differ between them" if signatures else "") from None
    fam = get_family(fid)
    return fam, build(fam)


def output_metadata(lora: Lora, family: Family | None, to: str, operation: str = "convert") -> dict:
    """The source's metadata without stale hashes, plus the architecture and our provenance."""
    meta = {k: v for k, v in lora.metadata.items() if k not in STALE_KEYS and k != "lora_adapter_metadata"}
    meta.pop("format", None)
    if family is not None and family.has_naming and family.naming.architecture:
        meta["modelspec.architecture"] = family.naming.architecture
    meta.update({"loratools.version": __version__, "loratools.operation": operation,
                 "loratools.source_format": lora.format, "loratools.target_format": to})
    if family is not None:
        meta["loratools.family"] = family.id
    return meta


# Formats whose files store one alpha per module (kohya-style ``.alpha``), where --uniform-alpha applies.
ALPHA_FORMATS = ("kohya", "comfy")


def alpha_warning(mods: list[OutModule], codec, family: Family, uniform: bool) -> str | None:
    """Why a kohya-style file with several alphas may act differently in diffusers, or None."""
    if uniform or not codec.stores_alpha(family) or len({om.scale * om.rank for om in mods}) <= 1:
        return None
    return ("modules have different alphas; diffusers' kohya reader applies one alpha to every module, so it "
            "would scale some of them wrongly: --uniform-alpha writes a file every loader reads the same")


def _write(lora: Lora, codec, to: str, dest: Path, family: str | None, operation: str, kohya_names: str | None,
           options: WriteOptions):
    """Plan ``lora`` for ``to`` and write it: (files, family, planned modules, warnings). A failed write leaves no
    trace, not even the folders ``dest`` asked for."""

    def build(fam: Family) -> list[OutModule]:
        return plan(canonicalize(lora, fam), fam, kohya_names or codec.model_naming(fam))

    fam, mods = choose_family(lora, family, build, to)
    writer_family = fam or get_family(lora.family.candidates[0])  # identical output for every candidate
    meta = output_metadata(lora, fam, to, operation)
    warnings = list(lora.warnings)
    if options.uniform_alpha and codec.stores_alpha(writer_family) and len({om.scale * om.rank for om in mods}) > 1:
        meta["loratools.uniform_alpha"] = f"{common_alpha(mods):g}"  # provenance: scales were folded into lora_up
    elif (note := alpha_warning(mods, codec, writer_family, options.uniform_alpha)) is not None:
        warnings.append(note)
    made = [p for p in (dest.parent, *dest.parent.parents) if not p.exists()]
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        return codec.write(mods, writer_family, dest, meta, options), fam, mods, warnings
    except BaseException:
        for folder in made:
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


def convert_lora(lora: Lora, to: str, dest: Path, *, family: str | None = None, dtype: str | None = None,
                 overwrite: bool = False, operation: str = "convert", sync: bool = False,
                 uniform_alpha: bool = False, kohya_names: str | None = None,
                 allow_nonfinite: bool = False) -> ConvertResult:
    """Write ``lora`` as format ``to`` at ``dest``. Raises LoraToolsError (nothing written) on bad input.

    ``uniform_alpha`` (kohya and comfy targets): every module gets the most common alpha and its own scale ratio
    is multiplied into lora_up, for loaders that apply one alpha to all modules. ``kohya_names`` (kohya target):
    flatten the denoiser's ``native`` (original checkpoint) or ``diffusers`` module names instead of the family's
    usual kohya spelling (loaders that match names against a diffusers model, as LyCORIS does, need ``diffusers``
    for SDXL)."""
    codec = codec_for(to)
    if kohya_names is not None and (to != "kohya" or kohya_names not in ("native", "diffusers")):
        raise UsageError("--kohya-names is native or diffusers, for kohya outputs")
    if uniform_alpha and to not in ALPHA_FORMATS:
        raise UsageError(f"--uniform-alpha applies to {' and '.join(ALPHA_FORMATS)} outputs; {to} files "
                         "carry each module's scale already")
    start = time.perf_counter()
    # what needs no reading first; the writer tests the factors' bytes as it writes them, and when it finds NaN or
    # Inf, the whole check says which modules
    check_writable(lora, allow_nonfinite, tensors=False)
    try:
        files, fam, mods, warnings = _write(lora, codec, to, dest, family, operation, kohya_names,
                                            WriteOptions(dtype, overwrite, sync, uniform_alpha, not allow_nonfinite))
    except NonFinite as exc:
        check_writable(lora)
        raise FormatError(f"{exc.tensor} would hold NaN or Inf (a value beyond its dtype's range); "
                          "--allow-nonfinite writes it", lora.path) from None
    return ConvertResult(lora.path, str(dest), lora.format, to, fam.id if fam else "unknown", len(lora.modules),
                         len(mods), [str(f) for f in files], warnings, time.perf_counter() - start)


# The writable format that keeps a source's naming.
SAME_FORMAT = {"kohya": "kohya", "lycoris": "kohya", "onetrainer": "kohya", "diffusers": "diffusers",
               "diffusers_legacy": "diffusers", "peft": "peft", "comfy": "comfy"}


def output_path(src: str, to: str, output: str | None, many: bool) -> Path:
    """Where a conversion of ``src`` goes (DESIGN §6: -o is a folder when it exists, ends with '/', or when
    several inputs are given; without -o the output goes beside the input)."""
    stem = Path(src).name
    for ext in (".safetensors", ".ckpt", ".pt", ".pth", ".bin"):
        if stem.endswith(ext):
            stem = stem[: -len(ext)]
            break
    name = stem + codec_for(to).suffix
    if output is None:
        return Path(src).parent / name
    out = Path(output)
    if many or output.endswith(("/", os.sep)) or out.is_dir():
        return out / name
    return out
