"""`loratools resize` and `loratools merge` (registered on the main group by cli.py)."""

from __future__ import annotations

import json
import math

import click

from loratools.errors import UsageError

TARGETS = click.Choice(["kohya", "diffusers", "peft", "comfy"])
DEVICES = click.Choice(["auto", "cpu", "cuda"])


def sync_requested() -> bool:
    """Whether ``loratools --sync`` asked to flush new files to disk."""
    ctx = click.get_current_context(silent=True)
    return bool(ctx and (ctx.find_root().obj or {}).get("sync"))


def _rank_options(f):
    for opt in reversed([
        click.option("--rank", type=int, default=None, help="Keep this many singular values per module."),
        click.option("--dynamic", default=None, metavar="METHOD:VALUE",
                     help="Per-module rank: sv_ratio:V (σᵢ ≥ σ₁/V), sv_fro:V (Frobenius energy ≥ V), "
                          "sv_cumulative:V (Σσ fraction ≥ V)."),
        click.option("--max-rank", type=int, default=None, help="Cap for --dynamic."),
        click.option("--lossy-rank", type=int, default=None,
                     help="Rank at which LoHa/LoKr/full-diff modules become LoRA (a lossy SVD, reported)."),
        click.option("-o", "--output", required=True, help="Output file (a folder for --to peft)."),
        click.option("--to", "to", type=TARGETS, default=None, help="Output format (default: the input's)."),
        click.option("--family", default=None, help="Family id to assume instead of detecting it."),
        click.option("--device", type=DEVICES, default="auto", show_default=True),
        click.option("--dtype", type=click.Choice(["keep", "fp16", "bf16", "fp32"]), default="keep", show_default=True),
        click.option("--overwrite", is_flag=True, help="Replace an existing output."),
        click.option("--allow-nonfinite", is_flag=True, help="Pass NaN/Inf factors and alphas through (forensics)."),
        click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout."),
    ]):
        f = opt(f)
    return f


def _finish(result, report: dict, output: str, to, family, dtype, overwrite, as_json, operation: str,
            allow_nonfinite: bool = False) -> None:
    from loratools import api

    saved = api.save(result, output, to=to, family=family, dtype=None if dtype == "keep" else dtype,
                     overwrite=overwrite, operation=operation, sync=sync_requested(), allow_nonfinite=allow_nonfinite)
    report["output"] = saved.output
    report["format"] = saved.target
    if as_json:
        click.echo(json.dumps(report, indent=2, default=str))
    else:
        from loratools import terminal as render

        render.print_lowrank(report, operation)


@click.command()
@click.argument("path", type=click.Path())
@_rank_options
def resize(path, rank, dynamic, max_rank, lossy_rank, output, to, family, device, dtype, overwrite, allow_nonfinite,
           as_json):
    """Reduce a LoRA's rank by exact factor-space SVD (fixed rank or per-module dynamic rank).

    Each module is truncated to its best rank-k approximation; alpha is chosen so the effective scale is
    unchanged; modules already at or below the target are copied exactly. Reports per module the old and
    new rank and the retained Frobenius energy.

    Example:

        loratools resize style.safetensors --rank 32 -o style.r32.safetensors

        loratools resize style.safetensors --dynamic sv_fro:0.95 --max-rank 64 -o small.safetensors
    """
    from loratools import api

    with api.load(path, family=family) as lora:
        result, report = api.resize(lora, rank=rank, dynamic=dynamic, max_rank=max_rank, lossy_rank=lossy_rank,
                                    device=device, dtype=None if dtype == "keep" else dtype,
                                    allow_nonfinite=allow_nonfinite)
        _finish(result, report, output, to, family, dtype, overwrite, as_json, "resize", allow_nonfinite)


def parse_weighted(text: str) -> tuple[str, float]:
    """'path' or 'path:WEIGHT' (the weight after the last colon must be a number)."""
    path, sep, weight = text.rpartition(":")
    if not sep or "/" in weight or weight.endswith(".safetensors"):
        return text, 1.0
    try:
        value = float(weight)
    except ValueError:
        raise UsageError(f"weight '{weight}' of '{path}' is not a number") from None
    if not math.isfinite(value):
        raise UsageError(f"weight '{weight}' of '{path}' is not a finite number")
    return path, value


@click.command()
@click.argument("paths", nargs=-1, required=True)
@click.option("--method", type=click.Choice(["concat", "svd"]), default=None,
              help="concat (exact, default without a rank) or svd (concat, then optimal truncation).")
@click.option("--allow-mixed-families", is_flag=True, help="Merge LoRAs of different families anyway.")
@_rank_options
def merge(paths, method, allow_mixed_families, rank, dynamic, max_rank, lossy_rank, output, to, family, device,
          dtype, overwrite, allow_nonfinite, as_json):
    """Combine LoRAs with weights: PATH[:WEIGHT]... (weight 1 when omitted; negative weights subtract).

    concat stacks every input's factors along rank, each carrying its own weight·alpha/rank — exact, with no
    cross terms and no equal-rank requirement. svd truncates that exact sum to --rank/--dynamic optimally.
    Inputs may come in different namings (kohya, diffusers, comfy): modules meet by the base weight they adapt,
    in the first input's layout (a fused qkv against to_q/to_k/to_v is split or fused exactly).

    Example:

        loratools merge a.safetensors:0.7 b.safetensors:0.3 -o ab.safetensors

        loratools merge a.safetensors b.safetensors:-0.5 --method svd --rank 32 -o ab32.safetensors
    """
    from loratools import api

    items = [parse_weighted(p) for p in paths]
    method = method or ("svd" if rank is not None or dynamic is not None else "concat")
    loaded = []
    try:
        for path, weight in items:
            loaded.append((api.load(path, family=family), weight))
        result, report = api.merge(loaded, method=method, rank=rank, dynamic=dynamic, max_rank=max_rank,
                                   lossy_rank=lossy_rank, device=device, allow_mixed_families=allow_mixed_families,
                                   dtype=None if dtype == "keep" else dtype, allow_nonfinite=allow_nonfinite)
        _finish(result, report, output, to, family, dtype, overwrite, as_json, "merge", allow_nonfinite)
    finally:
        for lora, _ in loaded:
            lora.close()
