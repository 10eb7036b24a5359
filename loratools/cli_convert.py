"""`loratools convert` and `loratools verify` (registered on the main group by cli.py)."""

from __future__ import annotations

import json
import os
import sys
import traceback
from dataclasses import asdict

import click

from loratools.cli_ops import sync_requested

from loratools.errors import LoraToolsError, one_line

FORMATS = click.Choice(["kohya", "diffusers", "peft", "comfy"])


def _one(args: tuple) -> dict:
    """Convert one path (runs in a worker process with --jobs)."""
    from loratools import api

    path, to, output, family, dtype, overwrite, allow_pickle, many, lossy_rank, sync, uniform_alpha, names, nonfinite = args
    try:
        r = api.convert(path, to, output, family=family, dtype=dtype, overwrite=overwrite,
                        allow_pickle=allow_pickle, many=many, lossy_rank=lossy_rank, sync=sync,
                        uniform_alpha=uniform_alpha, kohya_names=names, allow_nonfinite=nonfinite)
        return {"ok": True, **asdict(r)}
    except LoraToolsError as exc:  # a problem with another file (the output, a base) names that file too
        return {"ok": False, "path": path, "error": exc.message if exc.path in (None, path) else str(exc),
                "traceback": traceback.format_exc()}  # shown with --debug, never in the JSON


@click.command()
@click.argument("paths", nargs=-1, required=False, type=click.Path())
@click.option("--to", "to", required=True, type=FORMATS, help="Target naming.")
@click.option("-o", "--output", default=None, help="Output file, or folder (existing, ending in '/', or with several inputs).")
@click.option("--family", default=None, help="Family id to assume instead of detecting it.")
@click.option("--dtype", default="keep", type=click.Choice(["keep", "fp16", "bf16", "fp32"]), show_default=True,
              help="Storage dtype of the written factors.")
@click.option("--jobs", "-j", default=1, show_default=True, help="Worker processes for many files.")
@click.option("--overwrite", is_flag=True, help="Replace existing outputs (otherwise they are refused).")
@click.option("--allow-pickle", is_flag=True, help="Load .ckpt/.pt/.bin with torch.load(weights_only=True).")
@click.option("--lossy-rank", type=int, default=None,
              help="Turn LoHa/LoKr/full-diff modules into rank-N LoRA (a lossy SVD; the error is reported).")
@click.option("--uniform-alpha", is_flag=True,
              help="kohya/comfy: one alpha for every module, each module's own ratio folded into lora_up (for "
                   "diffusers' kohya reader, which applies one alpha to all modules).")
@click.option("--kohya-names", type=click.Choice(["native", "diffusers"]), default=None,
              help="kohya: flatten original (native) or diffusers module names instead of the family's usual "
                   "spelling (SDXL: native like sd-scripts; diffusers for LyCORIS on a diffusers UNet).")
@click.option("--allow-nonfinite", is_flag=True, help="Pass NaN/Inf factors and alphas through (forensics).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON report on stdout.")
@click.option("--from-catalogue", "catalogue", default=None, type=click.Path(),
              help="Convert the LoRAs a `loratools scan -o` catalogue lists, as a resumable batch (docs/batch.md); "
                   "--family and --format then select records, and outputs mirror the inputs' folders under -o.")
@click.option("--format", "source_format", default=None, help="With --from-catalogue: only files in this format.")
@click.option("--dask", "dask_address", default=None, metavar="ADDRESS|local",
              help="With --from-catalogue: run on a Dask cluster (see loratools batch --help).")
@click.pass_context
def convert(ctx, paths, to, output, family, dtype, jobs, overwrite, allow_pickle, lossy_rank, uniform_alpha,
            kohya_names, allow_nonfinite, as_json, catalogue, source_format, dask_address) -> None:
    """Rewrite LoRAs between kohya, diffusers, PEFT and comfy naming with the same numerical effect.

    PATHS are files, PEFT folders, globs expanded by the shell, or folders (searched recursively).
    Outputs keep the input's stem and name the target (x.safetensors -> x.diffusers.safetensors; a PEFT
    target is a folder with one adapter per component). One bad file does not stop the batch: the exit
    code is 1 at the end, with the list of failures.

    Example:

        loratools convert my_lora.safetensors --to diffusers

        loratools convert loras/ --to comfy -o converted/ --jobs 2

        loratools convert --from-catalogue catalogue.jsonl --family wan21 --to comfy -o comfy/
    """
    from loratools.errors import UsageError
    from loratools.io.sources import expand_paths

    if catalogue is not None or source_format or dask_address:
        if paths or catalogue is None:
            raise UsageError("give PATHS, or --from-catalogue (with --format and --dask), not both")
        from loratools.cli_batch import convert_from_catalogue

        options = {"dtype": dtype, "overwrite": overwrite, "allow_pickle": allow_pickle, "lossy_rank": lossy_rank,
                   "uniform_alpha": uniform_alpha, "kohya_names": kohya_names, "allow_nonfinite": allow_nonfinite}
        return convert_from_catalogue(catalogue, to, output, family, source_format, options, jobs, dask_address,
                                      as_json)
    if not paths:
        raise UsageError("give the LoRA files or folders to convert (PATHS), or --from-catalogue")

    found = [(f, _mirrored(output, p, f)) for p in paths for f in expand_paths([p])]
    many = len(found) > 1
    _check_distinct(found, to, many)
    work = [(f, to, out, family, dtype, overwrite, allow_pickle, many, lossy_rank, sync_requested(),
             uniform_alpha, kohya_names, allow_nonfinite) for f, out in found]
    results = _run(work, jobs, show=not as_json and sys.stderr.isatty())
    failed = [r for r in results if not r["ok"]]
    for r in results:
        trace = r.pop("traceback", None)
        if trace and ctx.obj["debug"]:
            click.echo(trace, err=True, nl=False)
    for r in failed:
        click.echo(one_line(f"loratools: error: {r['path']}: {r['error']}"), err=True)
    if not as_json:  # in JSON they are each result's "warnings"
        for r in results:
            for w in r.get("warnings") or ():
                click.echo(one_line(f"loratools: warning: {r['path']}: {w}"), err=True)
    if as_json:
        click.echo(json.dumps(results, indent=2))
    elif len(results) == 1:
        if results[0]["ok"]:  # one file: one line, like cp -v (a failure was reported above)
            click.echo(_one_line(results[0]))
    else:
        from loratools import terminal as report

        report.print_convert(results)
    if failed:
        sys.exit(2 if len(failed) == len(results) else 1)


def _mirrored(output: str | None, given: str, found: str) -> str | None:
    """``-o`` for a file found inside the folder ``given``: the same subfolder under it, so files of one name in
    different folders do not meet at one output."""
    if output is None or found == given or not os.path.isdir(given):
        return output
    sub = os.path.relpath(os.path.dirname(found), given)
    return output if sub == os.curdir else os.path.join(output, sub) + os.sep


def _check_distinct(found: list[tuple[str, str | None]], to: str, many: bool) -> None:
    """Refuse, before anything is written, two inputs whose outputs would have the same path."""
    from loratools.api import convert_destination
    from loratools.errors import UsageError

    seen: dict[str, str] = {}
    for f, out in found:
        dest = os.path.abspath(convert_destination(f, to, out, many))
        if dest in seen:
            raise UsageError(f"{seen[dest]} and {f} would both be written to {dest}; convert them separately or "
                             "into different folders")
        seen[dest] = f


def _one_line(r: dict) -> str:
    return (f"{r['path']} -> {r['output']} ({r['family']}, {r['source_format']} -> {r['target']}, "
            f"{r['modules_out']} modules, {r['seconds']:.2f} s)")


def _run(work: list[tuple], jobs: int, show: bool) -> list[dict]:
    if not show or len(work) == 1:  # no bar to show: skip importing rich.progress
        return _run_plain(work, jobs)
    from rich.progress import Progress

    results: list[dict] = []
    with Progress(transient=True, console=_stderr()) as bar:
        task = bar.add_task("converting", total=len(work))
        if jobs > 1 and len(work) > 1:
            from loratools.executors import local_executor

            with local_executor(jobs) as pool:
                for r in pool.map(_one, work):
                    results.append(r)
                    bar.advance(task)
        else:
            for w in work:
                results.append(_one(w))
                bar.advance(task)
    return results


def _run_plain(work: list[tuple], jobs: int) -> list[dict]:
    if jobs > 1 and len(work) > 1:
        from loratools.executors import local_executor  # workers started clean, never forked from our threads

        with local_executor(jobs) as pool:
            return list(pool.map(_one, work))
    return [_one(w) for w in work]


def _stderr():
    from rich.console import Console

    return Console(stderr=True)


@click.command()
@click.argument("a", type=click.Path())
@click.argument("b", type=click.Path())
@click.option("--rtol", default=1e-5, show_default=True, help="Largest relative error per module that counts as equal.")
@click.option("--family", default=None, help="Family id to assume instead of detecting it.")
@click.option("--allow-pickle", is_flag=True, help="Load .ckpt/.pt/.bin with torch.load(weights_only=True).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON report on stdout.")
def verify(a, b, rtol, family, allow_pickle, as_json) -> None:
    """Check that two LoRA files (any formats) have the same effect on every adapted weight.

    Compares ΔW = s·B·A module by module in factor space and reports the largest relative error, and the
    modules present in only one file. Exit 0 when equal within --rtol, 1 when they differ.

    Example:

        loratools verify my_lora.safetensors my_lora.diffusers.safetensors
    """
    from loratools import api

    r = api.verify(a, b, rtol=rtol, family=family, allow_pickle=allow_pickle)
    if as_json:
        click.echo(json.dumps(asdict(r), indent=2))
    else:
        from loratools import terminal as report

        report.print_verify(asdict(r))
    sys.exit(0 if r.equal else 1)
