"""The command line: parse options, call loratools.api, render with loratools.terminal.

Errors the user can fix are one line on stderr (`loratools: error: <file>: <problem>`) and exit 2; anything else
is a bug, still one line (`loratools: internal error: …`) with exit 3. `--debug` shows the traceback of either.
docs/safety.md lists the exit codes.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import traceback

import click

from loratools import __version__
from loratools.errors import LoraToolsError, UsageError, one_line


INTERNAL_ERROR = 3  # exit code of a bug (an exception outside LoraToolsError); docs/safety.md lists the codes


def _fail(exc: LoraToolsError, debug: bool) -> None:
    if debug:  # the traceback, and still the error's own exit code (scripts tell refusals from bugs by it)
        traceback.print_exception(exc)
    click.echo(f"loratools: error: {one_line(str(exc))}", err=True)
    sys.exit(exc.exit_code)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="loratools")
@click.option("--debug", is_flag=True, help="Show full tracebacks for errors.")
@click.option("--sync", is_flag=True,
              help="Flush every new output file to disk before it is renamed into place (replaced files always are).")
@click.pass_context
def cli(ctx: click.Context, debug: bool, sync: bool) -> None:
    """Inspect, convert, merge, resize and bake LoRA files of image and video models."""
    ctx.obj = {"debug": debug, "sync": sync}


@cli.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document (a list, one object per path).")
@click.option("--layers", is_flag=True, help="Show a table of every module.")
@click.option("--stats", is_flag=True, help="Per-module ‖ΔW‖ (alpha-aware), effective rank, NaN/Inf/zero flags (uses torch).")
@click.option("--hash", "hashes", is_flag=True, help="sha256, AutoV2 and AutoV3/addnet hashes.")
@click.option("--metadata", is_flag=True, help="Training settings, tag frequencies and every ss_*/modelspec.* entry.")
@click.option("--family", default=None, help="Family id to assume instead of detecting it.")
@click.option("--allow-pickle", is_flag=True, help="Load .ckpt/.pt/.bin with torch.load(weights_only=True).")
@click.option("--top", default=20, show_default=True, help="How many tags to show with --metadata.")
@click.option("--plot", "plot_png", default=None, metavar="FILE.png",
              help="Also draw ‖ΔW‖ per block of every file (shared axes) into this PNG (uses torch, matplotlib).")
@click.option("--overwrite", is_flag=True, help="Replace an existing --plot file.")
@click.pass_context
def inspect(ctx, paths, as_json, layers, stats, hashes, metadata, family, allow_pickle, top, plot_png,
            overwrite) -> None:
    """Tell what LoRA files are: format, family (with evidence), adapters, ranks, alphas, sizes.

    PATHS are .safetensors files, PEFT adapter folders, or folders to search recursively.
    One bad file does not stop the others; the exit code is 1 at the end if any failed.

    Example:

        loratools inspect my_lora.safetensors --layers

        loratools inspect loras/ --json > report.json

        loratools inspect my_lora.safetensors --plot blocks.png
    """
    from loratools import api
    from loratools.io.sources import expand_paths

    debug = ctx.obj["debug"]
    if plot_png and os.path.lexists(plot_png) and not overwrite:  # said before the files are read, not after
        raise UsageError("output exists; pass --overwrite to replace it", plot_png)
    results, failed = [], 0
    files = expand_paths(paths)
    for path in files:
        try:
            info = api.inspect(path, layers=layers, stats=stats, hashes=hashes, metadata=metadata,
                               allow_pickle=allow_pickle, family=family)
        except LoraToolsError as exc:
            if debug:
                raise
            failed += 1
            click.echo(f"loratools: error: {one_line(str(exc))}", err=True)
            results.append({"path": path, "error": exc.message})
            continue
        results.append(info)
        if not as_json:
            from loratools import terminal as report  # rich only for people: --json output stays quick

            report.print_inspect(info, top=top)
    if as_json:
        click.echo(json.dumps(results, indent=2, default=str))
    good = [r["path"] for r in results if "error" not in r]
    if plot_png and good:
        from loratools.cli_ops import sync_requested
        from loratools.visual import plot

        written = plot(good, plot_png, family=family, allow_pickle=allow_pickle, overwrite=overwrite,
                       sync=sync_requested())
        click.echo(f"wrote {written}", err=True)
    if failed:
        sys.exit(2 if failed == len(files) else 1)


from loratools.cli_convert import convert, verify  # noqa: E402

cli.add_command(convert)
cli.add_command(verify)

from loratools.cli_ops import merge, resize  # noqa: E402

cli.add_command(resize)
cli.add_command(merge)

from loratools.cli_scan import scan  # noqa: E402

cli.add_command(scan)

from loratools.cli_bake import bake, extract  # noqa: E402

cli.add_command(bake)
cli.add_command(extract)

from loratools.cli_batch import batch  # noqa: E402

cli.add_command(batch)

from loratools.cli_report import report  # noqa: E402

cli.add_command(report)


def main() -> None:
    # numpy's OpenBLAS starts a thread per core that spins for a while after numpy is imported, in the middle of
    # a conversion; loratools does no BLAS in numpy (torch brings its own), so it gets none.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    # A command builds its model of a file once and keeps it to the end, so the collector's passes over those
    # thousands of objects find nothing to free: ~10% of a conversion's Python time. Collect far less often.
    gc.freeze()
    gc.set_threshold(100_000, 50, 100)
    try:
        cli.main(standalone_mode=False)
    except LoraToolsError as exc:
        _fail(exc, "--debug" in sys.argv)
    except (click.exceptions.Abort, KeyboardInterrupt):
        # outputs are written to a temporary file and renamed, so an interrupted run leaves nothing behind
        click.echo("loratools: error: interrupted; no output was written", err=True)
        sys.exit(2)
    except click.ClickException as exc:
        exc.show()
        sys.exit(2)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:  # a bug: still one line for the user, the traceback with --debug
        if "--debug" in sys.argv:
            traceback.print_exception(exc)
        first = one_line((str(exc).splitlines() or [""])[0][:300])
        click.echo(f"loratools: internal error: {type(exc).__name__}: {first} — please report it; --debug shows "
                   "the traceback", err=True)
        sys.exit(INTERNAL_ERROR)


if __name__ == "__main__":
    main()
