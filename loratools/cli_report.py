"""`loratools report` (registered on the main group by cli.py)."""

from __future__ import annotations

import click


@click.command()
@click.argument("paths", nargs=-1, required=True)
@click.option("-o", "--output", default=None,
              help="The HTML page (default: beside the first input, <stem>.report.html); a folder puts it there.")
@click.option("--rank", "ranks", type=int, multiple=True,
              help="A resize --rank to predict (repeatable; default r/2, r/4 and r/8 of the largest rank).")
@click.option("--dynamic", multiple=True, metavar="METHOD:VALUE",
              help="A resize --dynamic rule to predict (repeatable; default sv_fro:0.99, sv_fro:0.9, sv_ratio:10).")
@click.option("--no-hash", "no_hash", is_flag=True, help="Skip sha256/AutoV2/AutoV3 (saves one read of each file).")
@click.option("--title", default=None, help="The page's title.")
@click.option("--family", default=None, help="Family id to assume instead of detecting it.")
@click.option("--allow-pickle", is_flag=True, help="Load .ckpt/.pt/.bin with torch.load(weights_only=True).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
@click.option("--json", "as_json", is_flag=True, help="Also print the page's data as one JSON document on stdout.")
def report(paths, output, ranks, dynamic, no_hash, title, family, allow_pickle, overwrite, as_json) -> None:
    """Write a self-contained HTML page that shows where LoRAs act: PATH[:STRENGTH]...

    Per file: ‖ΔW‖ per block of the base model (UNet down/mid/up, DiT double/single blocks, video blocks,
    text-encoder layers), singular-value spectra and effective ranks per module group, what resize --rank /
    --dynamic would keep, the inspect summary (family evidence, training metadata, tags, hashes) and flags
    (NaN/Inf or all-zero modules, metadata that contradicts the tensors). Several files give a comparison
    page on shared axes. No network is needed to view it: CSS, figures (SVG) and data (JSON) are inline.

    Example:

        loratools report style.safetensors -o style.html

        loratools report style.safetensors style.r32.safetensors -o compare.html
    """
    from loratools.cli_ops import sync_requested
    from loratools.visual import report as make_report
    from loratools.visual.data import to_json

    result = make_report(list(paths), output, ranks=list(ranks) or None, dynamic=list(dynamic) or None,
                         family=family, allow_pickle=allow_pickle, overwrite=overwrite, hashes=not no_hash,
                         title=title, sync=sync_requested())
    if as_json:
        click.echo(to_json({"output": result.output, **result.data}, indent=1))
    else:
        click.echo(f"wrote {result.output}")
