"""`loratools batch`, `convert --from-catalogue` and `loratools.run_batch`: jobs from a manifest done once each; a
batch killed part-way (SIGKILL of its process group) and rerun ends with exactly the outputs of an uninterrupted
run and no partial or temporary file; a Dask LocalCluster gives the same bytes as local worker processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from synth import synthesize

import loratools
from loratools.batch import STATE_FOLDER, run_batch
from loratools.cli import cli
from loratools.executors import local_executor
from loratools.io.reader import read_header

# real layouts whose synthetic files convert in a few ms each
LAYOUTS = ["wan21__diffusion_model_peft__issue-fragment.json", "wan21__kohya_mixed__issue-fragment.json",
           "wan22__comfy_lora__invokeai-lightx2v-fragment.json", "sd15__peft__faithsang.json",
           "sd2__diffusers_lora_linear__vfph55-bf16.json"]
COPIES = 8


@pytest.fixture(scope="module")
def loras(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("loras")
    out = []
    for name in LAYOUTS:
        folder = root / name.split("__")[0] / name.split("__")[1]
        folder.mkdir(parents=True)
        out += [synthesize(name, folder / f"l{i}.safetensors", seed=i) for i in range(COPIES)]
    return out


def _manifest(path: Path, jobs: list[dict]) -> Path:
    path.write_text("".join(json.dumps(j) + "\n" for j in jobs))
    return path


def _convert_jobs(loras: list[Path], out: Path) -> list[dict]:
    return [{"op": "convert", "input": str(p), "to": to, "output": f"{out}/{p.parent.parent.name}_{p.parent.name}/"}
            for to in ("diffusers", "comfy") for p in loras]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from loratools.cli import main; main()", *args],
                          capture_output=True, text=True)


def _run(*args: str):
    """The command in this process (quicker than a new interpreter); exit_code, stdout and stderr."""
    return CliRunner().invoke(cli, list(args))


def _outputs(folder: Path) -> dict[str, bytes]:
    """Every output file under ``folder`` (job claims aside) by relative path."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and STATE_FOLDER not in p.parts}


def _temporary(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if "loratools-tmp" in p.name]


def test_batch_runs_each_job_once_and_redoes_what_changed(loras, tmp_path):
    jobs = _convert_jobs(loras[:: COPIES // 2], tmp_path / "out")
    manifest = _manifest(tmp_path / "jobs.jsonl", jobs)
    first = _cli("batch", str(manifest), "--json")
    assert first.returncode == 0, first.stderr
    report = json.loads(first.stdout)
    assert report["totals"] == {"done": len(jobs), "skipped": 0, "failed": 0, "jobs": len(jobs),
                                "seconds": report["totals"]["seconds"]}
    for r in report["jobs"]:
        assert Path(r["output"]).is_file() and read_header(r["output"]).tensors
    for r in report["jobs"][:: len(jobs) // 2]:
        assert loratools.verify(r["inputs"][0], r["output"]).equal
    again = json.loads(_run("batch", str(manifest), "--json").stdout)
    assert {r["status"] for r in again["jobs"]} == {"skipped"}
    # an input that changed, an output that is gone: those jobs run again, the rest stay skipped
    touched = Path(jobs[0]["input"])
    os.utime(touched, ns=(time.time_ns(), time.time_ns()))
    Path(report["jobs"][3]["output"]).unlink()
    third = json.loads(_run("batch", str(manifest), "--json").stdout)
    redone = sorted(r["index"] for r in third["jobs"] if r["status"] == "done")
    assert redone == sorted({3} | {i for i, j in enumerate(jobs) if j["input"] == str(touched)})
    # a changed job (another dtype) replaces the output it wrote before
    changed = [dict(jobs[1], dtype="fp32")] + jobs[2:]
    fourth = json.loads(_run("batch", str(_manifest(tmp_path / "j2.jsonl", changed)), "--json").stdout)
    assert fourth["jobs"][0]["status"] == "done" and read_header(fourth["jobs"][0]["output"]).tensors
    assert {r["status"] for r in fourth["jobs"][1:]} == {"skipped"}


def test_failures_are_one_line_each_and_exit_1(loras, tmp_path):
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\":1}")
    jobs = [{"op": "convert", "input": str(loras[0]), "to": "comfy", "output": str(tmp_path / "o") + "/"},
            {"op": "convert", "input": str(broken), "to": "comfy", "output": str(tmp_path / "o") + "/"},
            {"op": "resize", "input": str(tmp_path / "missing.safetensors"), "rank": 1,
             "output": str(tmp_path / "o" / "r.safetensors")}]
    out = _run("batch", str(_manifest(tmp_path / "jobs.jsonl", jobs)))
    assert out.exit_code == 1
    errors = out.stderr.strip().splitlines()
    assert len(errors) == 2 and all(e.startswith("loratools: error: ") for e in errors)
    assert str(broken) in errors[0] + errors[1] and "missing.safetensors: no such file" in out.stderr
    assert out.stdout.startswith("done") and "1 │" in out.stdout  # one line per job and the table
    # nothing is claimed for a job that wrote nothing over nothing
    assert not (tmp_path / "o" / STATE_FOLDER / "broken.comfy.safetensors.json").exists()


@pytest.mark.parametrize("line, says", [
    ('{"op": "copy", "input": "a"}', "unknown op 'copy'"),
    ('{"op": "convert", "input": "a", "to": "comfy", "rnak": 3}', "convert takes no argument 'rnak'"),
    ('{"op": "merge", "items": [["a", "x"]], "output": "m.safetensors"}', "'items' is a list of paths"),
    ('{"op": "resize", "input": "a"}', "resize needs 'output'"),
    ("not json", "line 2: not JSON"),
])
def test_a_bad_manifest_is_refused_before_anything_runs(loras, tmp_path, line, says):
    good = {"op": "convert", "input": str(loras[0]), "to": "comfy", "output": str(tmp_path / "o") + "/"}
    manifest = tmp_path / "jobs.jsonl"
    manifest.write_text(json.dumps(good) + "\n" + line + "\n")
    out = CliRunner().invoke(cli, ["batch", str(manifest)])
    assert isinstance(out.exception, loratools.errors.UsageError) and says in str(out.exception), out.output
    assert str(manifest) in str(out.exception) and not (tmp_path / "o").exists()
    if "copy" in line:  # as the command line says it: one line, exit 2
        run = _cli("batch", str(manifest))
        assert run.returncode == 2 and run.stderr.count("\n") == 1 and "loratools: error: " in run.stderr


def test_an_output_no_job_wrote_is_kept_unless_the_job_says_overwrite(loras, tmp_path):
    target = tmp_path / "mine.safetensors"
    target.write_bytes(b"not ours")
    job = {"op": "convert", "input": str(loras[0]), "to": "comfy", "output": str(target)}
    r = run_batch([job]).results[0]
    assert r["status"] == "failed" and "no batch job wrote it" in r["error"] and target.read_bytes() == b"not ours"
    r = run_batch([dict(job, overwrite=True)]).results[0]
    assert r["status"] == "done" and read_header(target).tensors
    with pytest.raises(loratools.errors.UsageError, match="job 2: writes the same output as job 1"):
        run_batch([job, dict(job, to="comfy", dtype="fp16")])


def test_every_op_runs_from_a_manifest(tmp_path):
    """extract, then bake, resize and merge of its output, through run_batch (jobs are independent: a job that
    reads another's output goes in a later batch)."""
    from test_bake import write_base
    from test_extract import FLUX, _delta, tuned_copy

    import torch

    base = tmp_path / "base.safetensors"
    tensors = write_base(base, FLUX, dtype=torch.float32)
    tuned_copy(tensors, tmp_path / "tuned.safetensors", {"double_blocks.0.img_attn.qkv.weight":
                                                         _delta(FLUX["double_blocks.0.img_attn.qkv.weight"], 4)})
    lora = tmp_path / "d.safetensors"
    first = run_batch([{"op": "extract", "base": str(base), "tuned": str(tmp_path / "tuned.safetensors"),
                        "rank": 4, "output": str(lora)}])
    assert first.results[0]["status"] == "done", first.results[0]["error"]
    second = run_batch([
        {"op": "bake", "base": str(base), "loras": [[str(lora), 0.5]], "output": f"{tmp_path}/baked/"},
        {"op": "resize", "input": str(lora), "rank": 2, "to": "diffusers", "family": "flux1",
         "output": str(tmp_path / "r2.safetensors")},
        {"op": "merge", "items": [[str(lora), 0.5], str(lora)], "family": "flux1", "dtype": "fp16",
         "output": str(tmp_path / "m.safetensors")},
    ])
    assert [r["status"] for r in second.results] == ["done"] * 3, [r["error"] for r in second.results]
    assert second.results[0]["output"] == str(tmp_path / "baked" / "base.safetensors")
    assert loratools.inspect(tmp_path / "r2.safetensors")["rank"]["max"] == 2
    merged = loratools.inspect(tmp_path / "m.safetensors")
    assert merged["rank"]["max"] == 8 and merged["dtypes"].get("F16") == 2  # the factors; the alpha stays F32
    again = run_batch([{"op": "bake", "base": str(base), "loras": [[str(lora), 0.5]],
                        "output": f"{tmp_path}/baked/"}])
    assert again.results[0]["status"] == "skipped"


def test_a_killed_batch_rerun_gives_the_outputs_of_an_uninterrupted_one(loras, tmp_path):
    reference = tmp_path / "ref"
    ref = _cli("batch", str(_manifest(tmp_path / "ref.jsonl", _convert_jobs(loras, reference))), "--jobs", "2")
    assert ref.returncode == 0, ref.stderr
    want = _outputs(reference)
    assert len(want) == 2 * len(loras)

    out = tmp_path / "out"
    manifest = _manifest(tmp_path / "jobs.jsonl", _convert_jobs(loras, out))
    cmd = [sys.executable, "-c", "from loratools.cli import main; main()", "batch", str(manifest), "--jobs", "2"]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(list(out.rglob("*.safetensors"))) < 4 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)  # the runner, the forkserver and every worker
    proc.wait()
    partial = _outputs(out)
    assert 4 <= len(partial) < len(want), "the batch was not killed part-way"
    for name, data in partial.items():  # what exists is complete: the whole output of its job
        assert data == want[name], name

    rerun = _cli("batch", str(manifest), "--jobs", "2", "--json")
    assert rerun.returncode == 0, rerun.stderr
    statuses = [r["status"] for r in json.loads(rerun.stdout)["jobs"]]
    assert statuses.count("skipped") == len(partial) and "failed" not in statuses  # each claimed before written
    assert _outputs(out) == want and not _temporary(out)


def test_dask_local_cluster_gives_the_bytes_of_local_workers(loras, tmp_path):
    pytest.importorskip("distributed")
    from loratools.executors import dask_executor

    jobs = lambda out: _convert_jobs(loras[::2], out)  # noqa: E731
    with local_executor(2) as pool:
        local = run_batch(jobs(tmp_path / "local"), pool)
    with dask_executor("local", 2, processes=False) as executor:
        dask = run_batch(jobs(tmp_path / "dask"), executor)
    assert local.count("done") == dask.count("done") == len(jobs(tmp_path))
    assert _outputs(tmp_path / "local") == _outputs(tmp_path / "dask")
    with dask_executor("local", 2, processes=False) as executor:
        assert run_batch(jobs(tmp_path / "dask"), executor).count("skipped") == len(jobs(tmp_path))


def test_convert_from_catalogue(loras, tmp_path):
    root = loras[0].parents[2]
    catalogue = tmp_path / "catalogue.jsonl"
    loratools.scan([root], catalogue)
    out = tmp_path / "comfy"
    args = ["convert", "--from-catalogue", str(catalogue), "--family", "sd1", "--to", "comfy", "-o", f"{out}/",
            "--json"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    sd1 = [p for p in loras if loratools.inspect(p)["family"]["id"] == "sd1"]
    assert sd1 and sorted(_outputs(out)) == sorted(p.stem + ".comfy.safetensors" for p in sd1)
    again = json.loads(CliRunner().invoke(cli, args).output)
    assert again["totals"]["skipped"] == len(sd1)
    # files of one format in several folders: outputs in the same folders, relative to the one they share
    comfy = [p for p in loras if loratools.inspect(p)["format"] == "comfy"]
    args = ["convert", "--from-catalogue", str(catalogue), "--format", "comfy", "--to", "kohya", "-o", f"{out}2/"]
    assert CliRunner().invoke(cli, args).exit_code == 0
    assert len({p.parent for p in comfy}) > 1 and sorted(_outputs(tmp_path / "comfy2")) == sorted(
        str(p.relative_to(root).with_name(p.stem + ".kohya.safetensors")) for p in comfy)
    nothing = CliRunner().invoke(cli, ["convert", "--from-catalogue", str(catalogue), "--format", "kohya",
                                       "--family", "sd2", "--to", "comfy", "-o", f"{out}3/"])
    assert "no LoRA in the catalogue matches --family sd2 --format kohya" in str(nothing.exception)
