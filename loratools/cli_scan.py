"""`loratools scan` (registered on the main group by cli.py)."""

from __future__ import annotations

import json

import click


@click.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("-o", "--output", "catalogue", default=None,
              help="Catalogue file (.jsonl, or .parquet with pyarrow): written atomically, absolute paths; a rerun "
                   "re-reads only files whose size or mtime changed. An existing file must be a scan catalogue.")
@click.option("--hash", "hashes", is_flag=True, help="sha256 and AutoV3 content hashes (finds re-saved duplicates).")
@click.option("--jobs", "-j", default=1, show_default=True, help="Worker processes.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
def scan(paths, catalogue, hashes, jobs, as_json) -> None:
    """Inventory a collection: every LoRA, adapter folder and checkpoint under PATHS, without torch.

    One record per file (what `inspect --json` says, with size, mtime, hashes with --hash, and its problems);
    a summary of files per family and format, adapter types, total size, duplicates by content hash, broken
    files, pickles (listed, never read) and metadata that contradicts the tensors. A PATH that does not exist is
    an error; a folder that cannot be read is listed as broken. -o refuses an existing file that is not a
    catalogue scan wrote.

    Example:

        loratools scan loras/ -o catalogue.jsonl --hash

        loratools scan /models --jobs 2 --json > summary.json
    """
    from loratools import api
    from loratools.catalogue import catalogue_path

    records = api.scan(list(paths), catalogue_path(catalogue) if catalogue else None, hashes=hashes, jobs=jobs)
    summary = api.summarize_catalogue(records)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    _print(summary, catalogue)


def _print(s: dict, catalogue) -> None:
    from rich.console import Console
    from rich.table import Table

    c = Console()
    t = Table(title=f"{s['files']} files, {s['size_bytes'] / 2**20:.1f} MB"
                    + (f" ({s['reused']} unchanged since the last scan)" if s["reused"] else ""), title_justify="left")
    t.add_column("family / format")
    t.add_column("files", justify="right")
    for key, n in s["family_format"].items():
        t.add_row(key, str(n))
    for kind, n in sorted(s["kinds"].items()):
        if kind != "lora":
            t.add_row(f"[dim]{kind}[/dim]", str(n))
    c.print(t)
    if s["adapters"]:
        c.print("adapters: " + ", ".join(f"{k} ×{n}" for k, n in s["adapters"].items()))
    for group in s["duplicates"][:20]:
        c.print(f"[yellow]duplicates[/yellow] ({len(group)}): " + ", ".join(group))
    for b in s["broken"][:50]:
        c.print(f"[red]broken[/red] {b['path']}: {b['error']}")
    for p in s["pickles"][:50]:
        c.print(f"[dim]pickle[/dim] {p}: not read (convert it to safetensors, or inspect it with --allow-pickle)")
    for x in s["contradictions"][:50]:
        c.print(f"[yellow]metadata[/yellow] {x['path']}: {'; '.join(x['problems'])}")
    if catalogue:
        c.print(f"catalogue: {catalogue}")
