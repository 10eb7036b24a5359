"""Converting a LoRA between kohya, diffusers, PEFT and comfy naming with the same numerical effect."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from loratools import __version__
from loratools.errors import LoraToolsError, UnknownFamily
from loratools.families.naming import DIFFUSERS, NATIVE, naming_table
from loratools.formats.writers import TARGETS, write_target
from loratools.model import Lora
from loratools.ops.canonical import canonicalize, plan

STALE_KEYS = ("sshs_model_hash", "sshs_legacy_hash", "modelspec.hash_sha256")
SUFFIX = {"kohya": ".kohya.safetensors", "diffusers": ".diffusers.safetensors", "comfy": ".comfy.safetensors",
          "peft": ".peft"}


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


def family_of(lora: Lora, override: str | None) -> str:
    fid = override or (lora.family.id if lora.family else "unknown")
    if fid == "unknown":
        reason = getattr(lora.family, "reason", None)
        raise UnknownFamily("cannot tell the base-model family" + (f" ({reason})" if reason else "")
                            + "; pass --family", lora.path)
    return fid


def target_naming(table, fmt: str) -> str:
    if fmt == "kohya":
        return table.kohya_model
    return NATIVE if fmt == "comfy" else DIFFUSERS


def model_prefix(family: str) -> str:
    from loratools.families import get_family

    return get_family(family).model_component if family else "transformer"


def output_metadata(lora: Lora, family: str, table, to: str, operation: str = "convert") -> dict:
    """The source's metadata without stale hashes, plus the architecture and our provenance."""
    meta = {k: v for k, v in lora.metadata.items() if k not in STALE_KEYS and k != "lora_adapter_metadata"}
    meta.pop("format", None)
    if table.architecture:
        meta["modelspec.architecture"] = table.architecture
    meta.update({"loratools.version": __version__, "loratools.operation": operation,
                 "loratools.source_format": lora.format, "loratools.target_format": to,
                 "loratools.family": family})
    return meta


def convert_lora(lora: Lora, to: str, dest: Path, *, family: str | None = None, dtype: str | None = None,
                 overwrite: bool = False, operation: str = "convert") -> ConvertResult:
    """Write ``lora`` as format ``to`` at ``dest``. Raises LoraToolsError (nothing written) on bad input."""
    if to not in TARGETS:
        raise LoraToolsError(f"unknown target format '{to}' (choose from {', '.join(TARGETS)})")
    start = time.perf_counter()
    if lora.conflicts:
        more = f" (and {len(lora.conflicts) - 1} more)" if len(lora.conflicts) > 1 else ""
        raise LoraToolsError(f"the file contradicts itself: {lora.conflicts[0]}{more}", lora.path)
    fid = family_of(lora, family)
    table = naming_table(fid)
    pairs = canonicalize(lora, table)
    mods = plan(pairs, table, target_naming(table, to))
    meta = output_metadata(lora, fid, table, to, operation)
    dest.parent.mkdir(parents=True, exist_ok=True)
    files = write_target(mods, table, to, dest, meta, dtype=dtype, overwrite=overwrite,
                         model_prefix=model_prefix(fid))
    return ConvertResult(lora.path, str(dest), lora.format, to, fid, len(lora.modules), len(mods),
                         [str(f) for f in files], list(lora.warnings), time.perf_counter() - start)


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
    name = stem + SUFFIX[to]
    if output is None:
        return Path(src).parent / name
    out = Path(output)
    if many or output.endswith(("/", os.sep)) or out.is_dir():
        return out / name
    return out
