"""`loratools batch`, and the runner `convert --from-catalogue` shares (registered on the main group by cli.py)."""

from __future__ import annotations

import json
import os
import sys
import time

import click

from loratools.cli_ops import sync_requested
from loratools.errors import one_line

JOBS_HELP = "Worker processes (with --dask local: Dask workers; 1 runs the jobs in this process)."
DASK_HELP = ("Run the jobs on a Dask distributed cluster: its scheduler's address (tcp://host:8786), or 'local' "
             "for a LocalCluster of --jobs workers. Workers read and write the same paths (shared storage). Needs "
             "pip install 'loratools[dask]'.")


@click.command()
@click.argument("manifest", type=click.Path())
@click.option("--jobs", "-j", "workers", default=1, show_default=True, help=JOBS_HELP)
@click.option("--dask", "dask_address", default=None, metavar="ADDRESS|local", help=DASK_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the report (one object per job and the totals) as JSON.")
def batch(manifest, workers, dask_address, as_json) -> None:
    """Run the jobs of a manifest, each once: a rerun skips what is done and finishes the rest.

    MANIFEST has one job per line, a call of the Python API in its own terms: {"op": "convert", "input":
    "a.safetensors", "to": "diffusers", "output": "out/"}; also resize, merge, bake and extract with their
    arguments (docs/batch.md). A job is skipped when its output exists and was written for the same job and the
    same inputs (size and mtime); a killed run leaves no partial output. One line per job, a table at the end;
    each failure is one line on stderr, and the exit code is 1 when any job failed.

    Example:

        loratools batch jobs.jsonl --jobs 4

        loratools batch jobs.jsonl --dask tcp://scheduler:8786 --json > report.json
    """
    from loratools.batch import read_manifest

    run_jobs(read_manifest(manifest), workers, dask_address, as_json)


def run_jobs(jobs: list[dict], workers: int, dask_address: str | None, as_json: bool) -> None:
    """Run checked jobs with a progress bar (stderr, when it is a terminal), report them, exit 1 on failures."""
    from loratools.batch import run_batch
    from loratools.executors import dask_executor, local_executor

    show = not as_json and sys.stderr.isatty() and len(jobs) > 1
    place = dask_executor(dask_address, workers if workers > 1 else None) if dask_address else local_executor(workers)
    with place as executor, _Progress(len(jobs), show) as progress:
        def report(r: dict) -> None:
            progress.advance()
            if r["status"] == "failed":
                click.echo(one_line(f"loratools: error: {r['error']}"), err=True)
            elif not as_json:
                click.echo(_line(r))

        result = run_batch(jobs, executor, sync=sync_requested(), on_result=report)
    totals = {s: result.count(s) for s in ("done", "skipped", "failed")}
    if as_json:
        click.echo(json.dumps({"jobs": result.results, "totals": {**totals, "jobs": len(jobs),
                                                                   "seconds": round(result.seconds, 3)}}, indent=2))
    else:
        _table(result.results, result.seconds)
    if totals["failed"]:
        sys.exit(1)


def _line(r: dict) -> str:
    source = r["inputs"][0] + (f" (+{len(r['inputs']) - 1})" if len(r["inputs"]) > 1 else "")
    return f"{r['status']:<8} {r['op']} {source} -> {r['output']} ({r['seconds']:.2f} s)"


def _table(results: list[dict], seconds: float) -> None:
    from collections import Counter

    from rich.console import Console
    from rich.table import Table

    counts = Counter((r["op"], r["status"]) for r in results)
    t = Table(title=f"{len(results)} jobs in {seconds:.1f} s", title_justify="left")
    for col in ("op", "done", "skipped", "failed"):
        t.add_column(col, justify="left" if col == "op" else "right")
    for op in sorted({op for op, _ in counts}):
        t.add_row(op, *(str(counts[op, s]) for s in ("done", "skipped", "failed")))
    Console().print(t)


class _Progress:
    """A rich progress bar with throughput and ETA on stderr, or nothing."""

    def __init__(self, total: int, show: bool):
        self.total, self.show, self.bar, self.task, self.start = total, show, None, None, time.perf_counter()

    def __enter__(self) -> _Progress:
        if self.show:
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            self.bar = Progress(TextColumn("jobs"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"),
                                TimeRemainingColumn(), console=Console(stderr=True), transient=True)
            self.bar.__enter__()
            self.task = self.bar.add_task("jobs", total=self.total, rate="")
        return self

    def advance(self) -> None:
        if self.bar is not None:
            done = self.bar.tasks[0].completed + 1
            self.bar.update(self.task, advance=1, rate=f"{done / max(time.perf_counter() - self.start, 1e-9):.1f}/s")

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)


def convert_from_catalogue(catalogue: str, to: str, output: str | None, family: str | None, source_format: str | None,
                           options: dict, workers: int, dask_address: str | None, as_json: bool) -> None:
    """`convert --from-catalogue`: a job per selected record, run as a batch."""
    from loratools.errors import UsageError

    if not output:
        raise UsageError("--from-catalogue needs -o OUT/ (outputs mirror the inputs' folders under it)")
    jobs = catalogue_jobs(catalogue, to, output, family=family, source_format=source_format, **options)
    if not jobs:
        raise UsageError("no LoRA in the catalogue matches" + (f" --family {family}" if family else "")
                         + (f" --format {source_format}" if source_format else ""), catalogue)
    run_jobs(jobs, workers, dask_address, as_json)


def catalogue_jobs(catalogue: str | os.PathLike, to: str, output: str | os.PathLike, *, family: str | None = None,
                   source_format: str | None = None, **convert_args) -> list[dict]:
    """Convert jobs for the LoRAs a scan catalogue lists (of ``family`` and in ``source_format`` when given), their
    outputs under ``output`` in the inputs' folders relative to the folder they all share. A record's relative
    path is taken from the catalogue's folder (scan writes absolute ones); a missing catalogue, or a record that
    is not what scan writes, is refused naming its line."""
    from loratools.batch import check_job
    from loratools.catalogue import read_catalogue

    records = [r for r in read_catalogue(catalogue, strict=True, missing_ok=False).values()
               if r.get("kind") == "lora" and (family is None or r["info"]["family"]["id"] == family)
               and (source_format is None or r["info"]["format"] == source_format)]
    if not records:
        return []
    paths = [r["path"] for r in records]
    root = os.path.commonpath([os.path.dirname(p) for p in paths])
    args = {k: v for k, v in convert_args.items() if v not in (None, False, "keep")}
    jobs = []
    for path in paths:
        folder = os.path.relpath(os.path.dirname(path), root)
        out = os.path.join(os.fspath(output), folder) if folder != "." else os.fspath(output)
        jobs.append(check_job({"op": "convert", "input": path, "to": to, "output": out.rstrip(os.sep) + os.sep,
                               **args}, "convert --from-catalogue"))
    return jobs
