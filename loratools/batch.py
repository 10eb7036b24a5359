"""Batch jobs: many operations from a manifest, each done once, resumable after a kill.

A job is one call of the Python API in its own terms, one JSON object per manifest line::

    {"op": "convert", "input": "a.safetensors", "to": "diffusers", "output": "out/"}
    {"op": "resize", "input": "a.safetensors", "rank": 16, "output": "a.r16.safetensors"}
    {"op": "merge", "items": [["a.safetensors", 0.7], "b.safetensors"], "output": "ab.safetensors"}
    {"op": "bake", "base": "sdxl.safetensors", "loras": [["a.safetensors", 0.8]], "output": "baked.safetensors"}
    {"op": "extract", "base": "base.safetensors", "tuned": "tuned.safetensors", "rank": 32, "output": "d.safetensors"}

Every other key is an argument of that API function (of ``loratools.save`` too for resize and merge).

Before a job writes its output it leaves a claim beside it (``.loratools-jobs/<output name>.json`` in the
output's folder, written atomically): the job, the size and mtime of each input, and what stood at the output
then. A job is done when its claim matches the job and its inputs and a new output stands there; then it is
skipped. Outputs appear whole or not at all, so a run killed at any point leaves each output either absent, as it
was, or complete, and a rerun finishes the rest. A claimed output may be replaced by a rerun (its job or inputs
changed); an output nobody claimed is never replaced unless the job says ``"overwrite": true``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from functools import lru_cache
from inspect import signature
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable

from loratools.errors import LoraToolsError, UnknownFamily, UsageError
from loratools.io.atomic import atomic_file

if TYPE_CHECKING:  # pragma: no cover
    from concurrent.futures import Executor

STATE_FOLDER = ".loratools-jobs"
OVERWRITE = 'give the job "overwrite": true to replace it'
SAVE_ARGS = ("to", "family", "dtype", "overwrite", "sync", "allow_nonfinite")  # resize and merge write with save


@lru_cache(maxsize=1)
def _ops() -> dict[str, tuple[Callable, set[str]]]:
    """op -> (API function, the arguments a job may give): read from the functions themselves."""
    from loratools import api

    def names(fn, *skip: str) -> set[str]:
        return {p for p in signature(fn).parameters if p not in skip}

    return {"convert": (api.convert, names(api.convert, "path", "many") | {"input"}),
            "resize": (api.resize, names(api.resize, "lora") | {"input", "output", *SAVE_ARGS}),
            "merge": (api.merge, names(api.merge) | {"output", *SAVE_ARGS}),
            "bake": (api.bake, names(api.bake)),
            "extract": (api.extract, names(api.extract))}


REQUIRED = {"convert": ("input", "to"), "resize": ("input", "output"), "merge": ("items", "output"),
            "bake": ("base", "loras", "output"), "extract": ("base", "tuned", "output")}


def check_job(job: object, where: str = "job") -> dict:
    """The job with its keys in order, or a UsageError that says what is wrong with it: its shape, and the values
    that can be judged without reading a file (target format, dtype, ranks, merge method)."""
    if not isinstance(job, dict):
        raise UsageError(f"{where}: a job is a JSON object, got {type(job).__name__}")
    op = job.get("op")
    if not isinstance(op, str) or op not in REQUIRED:
        raise UsageError(f"{where}: unknown op {op!r} (choose from {', '.join(REQUIRED)})")
    allowed = _ops()[op][1]
    unknown = sorted(set(job) - allowed - {"op"})
    if unknown:
        raise UsageError(f"{where}: {op} takes no argument {', '.join(map(repr, unknown))} (it takes "
                         f"{', '.join(sorted(allowed))})")
    missing = [k for k in REQUIRED[op] if job.get(k) in (None, "", [])]
    if missing:
        raise UsageError(f"{where}: {op} needs {', '.join(map(repr, missing))}")
    job = {k: _plain(v) for k, v in job.items()}
    for key in ("items", "loras"):
        if key in job and not (isinstance(job[key], list) and all(_weighted(x) for x in job[key])):
            raise UsageError(f"{where}: {key!r} is a list of paths or [path, weight] pairs")
    for key in ("input", "output", "base", "tuned"):
        if key in job and not isinstance(job[key], str):
            raise UsageError(f"{where}: {key!r} is a path (a string)")
    try:
        _check_values(job)
    except UsageError as exc:
        raise UsageError(f"{where}: {exc.message}") from None
    return {k: job[k] for k in sorted(job)}


def _check_values(job: dict) -> None:
    """What the API function would refuse before reading anything, refused here, before anything runs."""
    from loratools.api import check_family, check_format, dtype_code

    for key in ("to", "dtype", "family", "dynamic", "method"):
        if job.get(key) is not None and not isinstance(job[key], str):
            raise UsageError(f"{key!r} is a string")
    if job.get("to") is not None:
        check_format(job["to"])
    dtype_code(job.get("dtype"))
    if job.get("family") is not None:
        try:
            check_family(job["family"])
        except UnknownFamily as exc:
            raise UsageError(exc.message) from None
    for key in ("rank", "max_rank", "conv_rank", "lossy_rank"):
        value = job.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise UsageError(f"{key!r} is a whole number of at least 1, not {value!r}")
    op, rule = job["op"], job.get("rank") is not None or job.get("dynamic") is not None
    if op == "resize" and not rule or op == "extract" and not rule:
        raise UsageError(f"{op} needs 'rank' or 'dynamic'")
    if op == "resize" and job.get("rank") is not None and job.get("dynamic") is not None:
        raise UsageError("resize takes 'rank' or 'dynamic', not both")
    if op == "merge":
        method = job.get("method", "concat")
        if method not in ("concat", "svd"):
            raise UsageError(f"unknown merge method {method!r}: use concat or svd")
        if method == "svd" and not rule:
            raise UsageError("merge with method 'svd' needs 'rank' or 'dynamic'")
        if method == "concat" and rule:
            raise UsageError("concat keeps every rank: give 'method': 'svd' to reduce it")


def _plain(value: object) -> object:
    """What the value reads back as from JSON: paths as text, tuples as lists (jobs are compared as JSON)."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _weighted(item: object) -> bool:
    return isinstance(item, str) or (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)
                                     and isinstance(item[1], (int, float)) and not isinstance(item[1], bool))


class Manifest(list):
    """The checked jobs of a manifest file (a list of job dicts), with the file and each job's line number, so
    that every message about a job can name its line."""

    def __init__(self, jobs: list[dict], path: str, lines: list[int]):
        super().__init__(jobs)
        self.path, self.lines = path, lines


def read_manifest(path: str | os.PathLike) -> Manifest:
    """The jobs of a JSON-lines manifest (blank lines and lines starting with '#' are skipped)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise LoraToolsError(f"cannot read the manifest ({getattr(exc, 'strerror', None) or exc})", path) from None
    jobs, numbers = [], []
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            job = json.loads(line)
        except ValueError as exc:
            raise UsageError(f"line {number}: not JSON ({exc})", path) from None
        try:
            jobs.append(check_job(job, f"line {number}"))
        except UsageError as exc:
            raise UsageError(exc.message, path) from None
        numbers.append(number)
    return Manifest(jobs, os.fspath(path), numbers)


def _pairs(items: list) -> list[tuple[str, float]]:
    return [(x, 1.0) if isinstance(x, str) else (x[0], float(x[1])) for x in items]


def input_paths(job: dict) -> list[str]:
    op = job["op"]
    if op in ("convert", "resize"):
        return [job["input"]]
    if op == "merge":
        return [p for p, _ in _pairs(job["items"])]
    if op == "bake":
        return [job["base"]] + [p for p, _ in _pairs(job["loras"])]
    return [job["base"], job["tuned"]]


def destination(job: dict) -> Path:
    """Where the job's output goes, by the rules its API function follows."""
    op, output = job["op"], job.get("output")
    if op == "convert":
        from loratools.ops.convert import output_path

        return output_path(job["input"], job["to"], output, False)
    if op == "bake" and not os.path.isdir(job["base"]) and (output.endswith(("/", os.sep)) or os.path.isdir(output)):
        return Path(output) / os.path.basename(job["base"])  # -o names a folder: the base's name in it
    return Path(output)


def _fingerprint(path: str | os.PathLike) -> list[int] | None:
    """[size, mtime in ns, inode] of a file, or of a folder (total size, newest entry); None when absent."""
    from loratools.catalogue import file_stat

    try:
        size, mtime = file_stat(os.fspath(path))
        return [size, mtime, os.stat(path).st_ino]
    except FileNotFoundError:
        return None


def state_path(dest: Path) -> Path:
    return dest.parent / STATE_FOLDER / f"{dest.name}.json"


def _read_state(path: Path) -> dict | None:
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def _write_state(path: Path, state: dict, sync: bool) -> None:
    data = json.dumps(state, indent=1).encode("utf-8")
    with atomic_file(path, overwrite=True, sync=sync) as fd:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]


def _call(job: dict, overwrite: bool, sync: bool) -> tuple[str, list[str]]:
    """Run the job's API function as the command line does; (the output it wrote, its warnings)."""
    from loratools import api

    op, fn = job["op"], _ops()[job["op"]][0]
    args = {k: v for k, v in job.items() if k not in ("op", "input", "output", "overwrite", "sync")}
    if args.get("dtype") == "keep":
        args["dtype"] = None
    if op == "convert":
        r = fn(job["input"], output=job.get("output"), overwrite=overwrite, sync=sync, **args)
        return r.output, r.warnings
    if op in ("resize", "merge"):  # load (with the family given), compute, save: as `loratools resize/merge` do
        save = {k: args.pop(k) for k in ("to", "family", "dtype") if k in args}
        sources = [(job["input"], 1.0)] if op == "resize" else _pairs(args.pop("items"))
        loaded = []
        try:
            for path, weight in sources:
                loaded.append((api.load(path, family=save.get("family")), weight))
            if op == "resize":
                result, _ = fn(loaded[0][0], **args)
            else:
                result, _ = fn(loaded, **args)
            saved = api.save(result, job["output"], overwrite=overwrite, sync=sync, operation=op,
                             allow_nonfinite=bool(args.get("allow_nonfinite")), **save)
        finally:
            for lora, _ in loaded:
                lora.close()
        return saved.output, list(saved.warnings)
    if op == "bake":
        args["loras"] = _pairs(args["loras"])
    r = fn(output=job["output"], overwrite=overwrite, sync=sync, **args)
    return r.output, list(getattr(r, "warnings", None) or [])


def run_job(job: dict, sync: bool = False) -> dict:
    """Do one checked job unless it is done already. Never raises for a problem with the job's files: the result
    says ``done``, ``skipped`` or ``failed`` (with the one-line ``error``)."""
    start = time.perf_counter()
    result = {"op": job["op"], "inputs": input_paths(job), "output": None, "status": "failed", "error": None,
              "warnings": [], "seconds": 0.0}
    try:
        dest = destination(job)
        result["output"] = str(dest)
        inputs = {p: _fingerprint(p) for p in result["inputs"]}
        gone = [p for p, fp in inputs.items() if fp is None]
        if gone:
            raise LoraToolsError("no such file or folder", gone[0])
        state_file = state_path(dest)
        state, now = _read_state(state_file), _fingerprint(dest)
        claim = {"job": job, "inputs": inputs}
        if state is not None and {k: state.get(k) for k in claim} == claim and now is not None \
                and now != state.get("before"):
            result.update(status="skipped", seconds=time.perf_counter() - start)
            return result
        if now is not None and state is None and not job.get("overwrite"):
            raise LoraToolsError(f"output exists and no batch job wrote it; {OVERWRITE}", dest)
        _write_state(state_file, {**claim, "before": now}, sync)
        try:
            output, warnings = _call(job, overwrite=now is not None or bool(job.get("overwrite")),
                                     sync=sync or bool(job.get("sync")))
        except BaseException:
            if now is None and _fingerprint(dest) is None:  # nothing there before or now: nothing to claim
                state_file.unlink(missing_ok=True)
            raise
        result.update(status="done", output=output, warnings=warnings)
    except LoraToolsError as exc:  # a writer's advice is for the command line: a job says it in its own terms
        result["error"] = str(exc).replace("pass --overwrite to replace it", OVERWRITE)
    except OSError as exc:  # the storage failed under the job (disk full, a folder that vanished)
        result["error"] = f"{exc.filename}: {(exc.strerror or str(exc)).lower()}" if exc.filename else str(exc)
    except Exception as exc:  # noqa: BLE001  a bug: this job fails, the batch goes on
        first = (str(exc).splitlines() or [""])[0][:300]
        result["error"] = f"internal error: {type(exc).__name__}: {first} (please report it)"
    result["seconds"] = time.perf_counter() - start
    return result


@dataclass
class BatchResult:
    results: list[dict] = field(default_factory=list)  # one per job, in the manifest's order
    seconds: float = 0.0

    def count(self, status: str) -> int:
        return sum(1 for r in self.results if r["status"] == status)

    @property
    def failed(self) -> list[dict]:
        return [r for r in self.results if r["status"] == "failed"]


def run_batch(jobs: Iterable[dict] | str | os.PathLike, executor: Executor | None = None, *, sync: bool = False,
              on_result: Callable[[dict], None] | None = None) -> BatchResult:
    """Run every job that is not done yet; return one result per job (``status``: done, skipped or failed).

    ``jobs`` is a list of job dicts (see the module's docstring), the path of a JSON-lines manifest or what
    ``read_manifest`` returns: then a bad job is named by its line (UsageError), and so is each failed job
    (its result's ``error`` starts with ``<manifest>: line N:``, and ``line`` is N). Two jobs that write one file
    (even by other names) are refused before anything runs.
    ``executor`` is any ``concurrent.futures.Executor``: None runs the jobs here one by one; a
    ``ProcessPoolExecutor`` (see ``loratools.executors.local_executor``) or a Dask client's executor
    (``loratools.executors.dask_executor``) runs them in parallel. ``on_result`` is called with each result as it
    comes in (in completion order).

    Example:
        >>> jobs = [{"op": "convert", "input": p, "to": "diffusers", "output": "out/"} for p in paths]
        >>> with loratools.executors.local_executor(4) as pool:
        ...     report = loratools.run_batch(jobs, executor=pool)
        >>> report.count("failed")
        0

    As with any process pool, a script that passes one runs it under ``if __name__ == "__main__":``.
    """
    start = time.perf_counter()
    if isinstance(jobs, (str, os.PathLike)):
        jobs = read_manifest(jobs)
    manifest, lines = (jobs.path, jobs.lines) if isinstance(jobs, Manifest) else (None, None)
    jobs = list(jobs)
    where = [f"line {n}" for n in lines] if lines else [f"job {i + 1}" for i in range(len(jobs))]
    try:
        checked = [check_job(j, w) for j, w in zip(jobs, where)]
        _no_shared_outputs(checked, where)
    except UsageError as exc:
        raise UsageError(exc.message, manifest) from None
    results: list[dict | None] = [None] * len(checked)

    def finish(i: int, r: dict) -> None:
        r["index"] = i
        if lines:
            r["line"] = lines[i]
            if r["status"] == "failed":
                r["error"] = f"{manifest}: {where[i]}: {r['error']}"
        results[i] = r
        if on_result is not None:
            on_result(r)

    if executor is None:
        for i, job in enumerate(checked):
            finish(i, run_job(job, sync))
    else:
        from concurrent.futures import as_completed  # not at import: it costs `import loratools` 30 ms

        futures = {executor.submit(run_job, job, sync): i for i, job in enumerate(checked)}
        try:
            for future in as_completed(futures):
                i = futures[future]
                try:
                    r = future.result()
                except Exception as exc:  # noqa: BLE001  the worker died under the job (killed, out of memory)
                    r = {"op": checked[i]["op"], "inputs": input_paths(checked[i]), "output": None,
                         "status": "failed", "error": f"its worker stopped ({type(exc).__name__}: {exc})",
                         "warnings": [], "seconds": 0.0}
                finish(i, r)
        finally:
            for future in futures:
                future.cancel()
    return BatchResult(results, time.perf_counter() - start)  # type: ignore[arg-type]


def _no_shared_outputs(jobs: list[dict], where: list[str]) -> None:
    """Refuse two jobs that would write one file, by whatever names (a symlinked folder, a link, ``a/../b``)."""
    seen: dict[str, int] = {}
    for i, job in enumerate(jobs):
        try:
            key = os.path.realpath(destination(job))
        except LoraToolsError:
            continue  # the job will fail with its own message
        if key in seen:
            raise UsageError(f"{where[i]}: writes the same output as {where[seen[key]]} ({key})")
        seen[key] = i

