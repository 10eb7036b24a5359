"""`loratools bake` and `loratools extract` (registered on the main group by cli.py)."""

from __future__ import annotations

import json
from dataclasses import asdict

import click

from loratools.cli_ops import sync_requested
from loratools.errors import one_line

DTYPES = click.Choice(["keep", "fp16", "bf16", "fp32"])
DEVICES = click.Choice(["auto", "cpu", "cuda"])


def _console():
    from rich.console import Console

    return Console(stderr=False)


def _warn(warnings: list[str]) -> None:
    for w in warnings[:20]:
        click.echo(one_line(f"loratools: warning: {w}"), err=True)
    if len(warnings) > 20:
        click.echo(f"loratools: warning: and {len(warnings) - 20} more", err=True)


@click.command()
@click.argument("base", type=click.Path())
@click.argument("loras", nargs=-1, required=True)
@click.option("-o", "--output", required=True, help="Output checkpoint (a folder when BASE is a diffusers folder).")
@click.option("--dtype", default="keep", type=DTYPES, show_default=True,
              help="Storage dtype of floating tensors in the output.")
@click.option("--device", default="auto", type=DEVICES, show_default=True,
              help="Where ΔW is computed (auto: CUDA when torch sees one).")
@click.option("--family", default=None, help="Family id to assume for the LoRAs instead of detecting it.")
@click.option("--allow-unmatched", is_flag=True, help="Skip LoRA modules the base has no weight for.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
@click.option("--allow-pickle", is_flag=True, help="Load .ckpt/.pt/.bin LoRAs with torch.load(weights_only=True).")
@click.option("--allow-nonfinite", is_flag=True, help="Bake NaN/Inf factors and alphas anyway (forensics).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON report on stdout.")
def bake(base, loras, output, dtype, device, family, allow_unmatched, overwrite, allow_pickle, allow_nonfinite,
         as_json) -> None:
    """Merge LoRAs into a base checkpoint: W' = W + Σ strength·s·ΔW.

    BASE is a single-file checkpoint (LDM/SGM, SD3, Flux BFL or ComfyUI bundle) or a diffusers model
    folder. Each LORA may carry a strength as PATH:STRENGTH. Every other tensor is copied byte for byte;
    tensors stream one at a time, so memory stays bounded whatever the checkpoint's size. Every LoRA module
    must find its weight in the base, unless --allow-unmatched.

    Example:

        loratools bake sdxl_base.safetensors style.safetensors:0.8 detail.safetensors -o merged.safetensors

        loratools bake flux-dev/ my_flux_lora.safetensors -o flux-dev-merged/ --dtype bf16
    """
    from loratools import api

    r = api.bake(base, list(loras), output, dtype=dtype, device=device, allow_unmatched=allow_unmatched,
                 overwrite=overwrite, family=family, allow_pickle=allow_pickle, sync=sync_requested(),
                 allow_nonfinite=allow_nonfinite)
    _warn(r.warnings + [f"skipped (no weight in the base): {u}" for u in r.unmatched])
    if as_json:
        click.echo(json.dumps(asdict(r), indent=2))
        return
    from rich.table import Table

    t = Table(title=f"bake -> {r.output}", title_justify="left")
    for col in ("lora", "strength", "family", "modules", "matched", "unmatched"):
        t.add_column(col)
    for x in r.loras:
        t.add_row(x["file"], f"{x['strength']:g}", x["family"], str(x["modules"]), str(x["matched"]),
                  str(x["unmatched"]))
    c = _console()
    c.print(t)
    c.print(f"{r.patched_tensors} tensors patched, {r.copied_tensors} copied, {r.bytes_written / 1e9:.2f} GB in "
            f"{r.seconds:.1f} s on {r.device}; peak memory {r.peak_rss_mb:.0f} MiB")


@click.command()
@click.argument("base", type=click.Path())
@click.argument("tuned", type=click.Path())
@click.option("-o", "--output", required=True, help="Output LoRA file (a folder for --to peft).")
@click.option("--rank", type=int, default=None, help="Rank of every extracted module (caps --dynamic).")
@click.option("--dynamic", default=None, help="Rank per module by rule: sv_fro:V, sv_ratio:V or sv_cumulative:V.")
@click.option("--conv-rank", type=int, default=None, help="Rank of k×k convolutions (skipped without it).")
@click.option("--text-encoders", is_flag=True, help="Extract the text encoders too.")
@click.option("--to", "to", default="kohya", type=click.Choice(["kohya", "diffusers", "peft", "comfy"]),
              show_default=True, help="Output naming.")
@click.option("--device", default="auto", type=DEVICES, show_default=True, help="Where the SVDs run.")
@click.option("--family", default=None, help="Family id (needed when the checkpoints' keys do not tell).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON report on stdout.")
def extract(base, tuned, output, rank, dynamic, conv_rank, text_encoders, to, device, family, overwrite,
            as_json) -> None:
    """Extract a LoRA from the difference of two checkpoints of the same family.

    Reads the two checkpoints one weight pair at a time; every module the family tables know is factored
    by SVD (randomised for large matrices) to --rank terms, or to what a --dynamic rule keeps. The report
    gives each module's rank and retained energy (the share of ‖ΔW‖² kept).

    Example:

        loratools extract sdxl_base.safetensors my_finetune.safetensors -o diff.safetensors --rank 64

        loratools extract base.safetensors tuned.safetensors -o diff/ --dynamic sv_fro:0.9 --rank 128 --to peft
    """
    from loratools import api

    r = api.extract(base, tuned, output, rank=rank, dynamic=dynamic, conv_rank=conv_rank,
                    text_encoders=text_encoders, to=to, device=device, family=family, overwrite=overwrite,
                    sync=sync_requested())
    _warn([f"skipped {s}" for s in r.skipped])
    if as_json:
        click.echo(json.dumps(asdict(r), indent=2))
        return
    ranks = [m["rank"] for m in r.modules]
    energy = [m["retained_energy"] for m in r.modules]
    c = _console()
    c.print(f"{len(r.modules)} modules extracted ({r.family}, {r.target}) -> {r.output}; rank {min(ranks)}–"
            f"{max(ranks)}, retained energy min {min(energy):.4f}; {r.unchanged} unchanged; {r.seconds:.1f} s")
