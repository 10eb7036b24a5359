"""`loratools batch`: what the manifest check refuses before anything runs (one line naming the manifest and the
line, exit 2), how a failed job is named, and the options that are not an address."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from synth import synthesize

import loratools
from loratools.batch import run_batch
from loratools.cli import cli

LAYOUT = "sd15__peft__faithsang.json"


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from loratools.cli import main; main()", *args],
                          capture_output=True, text=True, cwd=cwd)


@pytest.fixture()
def two(tmp_path) -> tuple[Path, Path]:
    """Two LoRAs of one name in two folders."""
    out = []
    for i, folder in enumerate(("x", "y")):
        (tmp_path / folder).mkdir()
        out.append(synthesize(LAYOUT, tmp_path / folder / "a.safetensors", seed=i))
    return out[0], out[1]


def _manifest(path: Path, *lines: object) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def test_two_jobs_writing_one_file_through_a_symlinked_folder_are_refused(two, tmp_path, monkeypatch):
    (tmp_path / "o1").mkdir()
    os.symlink("o1", tmp_path / "o2")
    manifest = _manifest(tmp_path / "jobs.jsonl", "# two names for one folder",
                         {"op": "convert", "input": "x/a.safetensors", "to": "comfy", "output": "o1/"},
                         {"op": "convert", "input": "y/a.safetensors", "to": "comfy", "output": "o2/"})
    run = _cli("batch", "jobs.jsonl", cwd=tmp_path)
    assert run.returncode == 2 and run.stdout == "", run.stderr
    assert run.stderr.count("\n") == 1
    assert run.stderr.startswith("loratools: error: jobs.jsonl: line 3: writes the same output as line 2 ")
    assert str(tmp_path / "o1" / "a.comfy.safetensors") in run.stderr
    assert os.listdir(tmp_path / "o1") == []  # nothing ran
    monkeypatch.chdir(tmp_path)
    with pytest.raises(loratools.errors.UsageError, match="job 2: writes the same output as job 1"):
        run_batch([json.loads(line) for line in manifest.read_text().splitlines()[1:]])


@pytest.mark.parametrize("job, says", [
    ({"op": ["convert"]}, "unknown op ['convert']"),
    ({"op": {"a": 1}}, "unknown op {'a': 1}"),
    ({"op": "resize", "input": "a", "output": "r.safetensors"}, "resize needs 'rank' or 'dynamic'"),
    ({"op": "resize", "input": "a", "output": "r.safetensors", "rank": 4, "dynamic": "sv_fro:0.9"},
     "not both"),
    ({"op": "resize", "input": "a", "output": "r.safetensors", "rank": "16"}, "'rank' is a whole number"),
    ({"op": "extract", "base": "b", "tuned": "t", "output": "d.safetensors"}, "extract needs 'rank' or 'dynamic'"),
    ({"op": "merge", "items": ["a"], "method": "svd", "output": "m.safetensors"}, "needs 'rank' or 'dynamic'"),
    ({"op": "merge", "items": ["a"], "method": "mean", "output": "m.safetensors"}, "unknown merge method"),
    ({"op": "convert", "input": "a", "to": "5"}, "unknown target format '5'"),
    ({"op": "convert", "input": "a", "to": ["comfy"]}, "'to' is a string"),
    ({"op": "convert", "input": "a", "to": "comfy", "dtype": "fp8"}, "unknown dtype 'fp8'"),
    ({"op": "convert", "input": "a", "to": "comfy", "family": 5}, "'family' is a string"),
    ({"op": "convert", "input": "a", "to": "comfy", "family": "wan2.1"}, "unknown family 'wan2.1'; did you mean"),
])
def test_a_bad_job_is_refused_at_the_manifest_check_naming_its_line(two, tmp_path, job, says):
    good = {"op": "convert", "input": str(two[0]), "to": "comfy", "output": f"{tmp_path}/o/"}
    manifest = _manifest(tmp_path / "jobs.jsonl", good, job)
    out = CliRunner().invoke(cli, ["batch", str(manifest)])
    assert isinstance(out.exception, loratools.errors.UsageError), out.output
    assert str(out.exception).startswith(f"{manifest}: line 2: ") and says in str(out.exception)
    assert not (tmp_path / "o").exists()


def test_an_unhashable_op_is_one_line_and_exit_2(tmp_path):
    _manifest(tmp_path / "jobs.jsonl", {"op": ["convert"]})
    run = _cli("batch", "jobs.jsonl", cwd=tmp_path)
    assert run.returncode == 2 and run.stderr.count("\n") == 1, run.stderr
    assert run.stderr.startswith("loratools: error: jobs.jsonl: line 1: unknown op")


def test_a_failed_job_is_named_by_its_manifest_line(two, tmp_path):
    _manifest(tmp_path / "jobs.jsonl",
              {"op": "convert", "input": "x/a.safetensors", "to": "comfy", "output": "o/"}, "",
              {"op": "convert", "input": "x/missing.safetensors", "to": "comfy", "output": "o/"})
    run = _cli("batch", "jobs.jsonl", "--json", cwd=tmp_path)
    assert run.returncode == 1
    assert run.stderr == "loratools: error: jobs.jsonl: line 3: x/missing.safetensors: no such file or folder\n"
    report = json.loads(run.stdout)
    assert [(r["line"], r["status"]) for r in report["jobs"]] == [(1, "done"), (3, "failed")]
    assert report["jobs"][1]["error"].startswith("jobs.jsonl: line 3: ")


def test_the_advice_to_replace_an_output_is_the_jobs_own(two, tmp_path):
    """A dangling link at the output is something that exists: kept, and the message says how a job replaces it
    (batch has no --overwrite option); with "overwrite": true it is replaced."""
    link = tmp_path / "out.safetensors"
    os.symlink(tmp_path / "nowhere", link)
    job = {"op": "convert", "input": str(two[0]), "to": "comfy", "output": str(link)}
    r = run_batch([job]).results[0]
    assert r["status"] == "failed" and '"overwrite": true' in r["error"] and "--overwrite" not in r["error"]
    assert os.path.islink(link)
    r = run_batch([dict(job, overwrite=True)]).results[0]
    assert r["status"] == "done", r["error"]
    assert not os.path.islink(link) and loratools.inspect(link)["modules"]


@pytest.mark.parametrize("address", ["not an address", "ftp://host:1", "a:b:c"])
def test_a_dask_address_that_is_not_one_is_a_usage_error(two, tmp_path, address):
    pytest.importorskip("distributed")
    _manifest(tmp_path / "jobs.jsonl", {"op": "convert", "input": "x/a.safetensors", "to": "comfy", "output": "o/"})
    run = _cli("batch", "jobs.jsonl", "--dask", address, cwd=tmp_path)
    assert run.returncode == 2 and run.stderr.count("\n") == 1, run.stderr
    assert run.stderr.startswith(f"loratools: error: --dask {address!r}: ") and "internal" not in run.stderr
    assert not (tmp_path / "o").exists()
