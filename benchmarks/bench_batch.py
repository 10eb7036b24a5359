"""A batch conversion of many LoRA files to diffusers against `cp -r` of the same files, in one run.

    python benchmarks/bench_batch.py [--files 1000] [--keep DIR] [--jobs 2] [--before REV]

The files: whole real layouts (real module names and dimensions) that convert to diffusers, at ranks 2, 4 and 8,
from tens of kB to tens of MB. Variants, each in a fresh process after os.sync() over a warm page cache:
`cp -r` of the folder (the I/O floor), the floor of any writer that tests what it writes (each file read whole into
memory, tested for NaN/Inf with the writer's own bit test, written to a temporary file and renamed; in --jobs
processes and in one; no conversion at all), `loratools batch` of one convert job per file (in one process, and with
--jobs worker processes), the same batch rerun (every job skipped), a plain loop of `loratools.convert` in one
process (what the batch adds: its claims and checks), and `loratools convert` started once per file (the start-up
the batch amortises; timed on the first 5% of the files and scaled). CPU is user + system of the variant's
processes (not of --jobs workers, which the forkserver starts). With --before, the loratools variants also run on
that git revision (exported with `git archive`), each variant alternating between the two trees.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, compile_bytecode, export, table

sys.path.insert(0, str(ROOT / "tests"))

from synth import synthesize  # noqa: E402

PY = sys.executable
LAYOUTS = ["sdxl__kohya__invokeai-slider-keys-only.json", "sd15__kohya__safetensorsutil-keys-only.json",
           "sd15__peft__faithsang.json", "sd2__diffusers_lora_linear__justinjiang.json",
           "flux1__diffusers_lora_linear__invokeai-cctv.json", "flux1__peft__invokeai-base-model.json",
           "wan21__diffusion_model_peft__issue-fragment.json", "wan22__comfy_lora__invokeai-lightx2v-fragment.json"]
# Read, test and write every file as the assembling writer does, converting nothing: what testing every byte costs
# before any conversion work (argv: manifest, processes).
FLOOR = """
import json, os, sys
from multiprocessing import Pool
from loratools.io.arrays import all_finite

def one(job):
    src, dst = job["input"], job["output"] + os.path.basename(job["input"])
    fd = os.open(src, os.O_RDONLY)
    buf = bytearray(os.fstat(fd).st_size)
    os.preadv(fd, [buf], 0)
    os.close(fd)
    finite = all_finite(memoryview(buf)[: len(buf) // 2 * 2], "F16")
    os.makedirs(job["output"], exist_ok=True)
    fd = os.open(dst + ".part", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    os.pwrite(fd, buf, 0)
    os.close(fd)
    os.rename(dst + ".part", dst)
    return finite

if __name__ == "__main__":
    jobs = [json.loads(line) for line in open(sys.argv[1])]
    with Pool(int(sys.argv[2])) as pool:
        pool.map(one, jobs, chunksize=16)
"""
LOOP = """
import json, sys, loratools
for job in map(json.loads, open(sys.argv[1])):
    loratools.convert(job["input"], job["to"], job["output"])
"""


def make(folder: Path, count: int) -> None:
    rng = random.Random(0)
    for i in range(count):
        name, rank = rng.choice(LAYOUTS), rng.choice((2, 4, 8))
        sub = folder / f"{i // 250:02d}"
        sub.mkdir(exist_ok=True)
        synthesize(name, sub / f"l{i:04d}.safetensors", seed=i, rank=rank)


def timed(cmd: list[str], ok: tuple[int, ...] = (0,), tree: Path = ROOT) -> tuple[float, float]:
    """Wall and CPU seconds (user + system of the whole process tree) of ``cmd`` run with ``tree``'s loratools."""
    os.sync()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    code = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tree,
                          env={**os.environ, "PYTHONPATH": str(tree)}).returncode
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if code not in ok:
        raise SystemExit(f"failed ({code}): {' '.join(cmd)}")
    return seconds, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=1000)
    ap.add_argument("--keep", default=None, help="Build the inputs here once and reuse them on later runs.")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--before", default=None, help="git revision whose loratools runs too, in the same run")
    args = ap.parse_args()
    compile_bytecode()
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(args.keep or tmp) / f"batch-inputs-{args.files}"
        built = src.with_name(src.name + ".built")
        if not built.exists():
            src.mkdir(parents=True, exist_ok=True)
            make(src, args.files)
            built.write_text("")
        files = sorted(src.rglob("*.safetensors"))
        size = sum(p.stat().st_size for p in files) / 2**20
        work = Path(tmp) / "work"

        def manifest(out: Path, subset: list[Path] = files) -> str:
            path = Path(tmp) / f"{out.name}.jsonl"
            path.write_text("".join(json.dumps({"op": "convert", "input": str(p), "to": "diffusers",
                                                "output": f"{out}/{p.parent.name}/"}) + "\n" for p in subset))
            return str(path)

        def fresh(name: str) -> Path:
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir()
            return work / name

        timed(["cp", "-r", str(src), str(fresh("warm"))])  # warm the page cache
        trees = {"": ROOT} if not args.before else {f" [{args.before}]": export(args.before, Path(tmp) / "before"),
                                                    " [this tree]": ROOT}
        cli = [PY, "-m", "loratools"]
        rows = [["cp -r", *timed(["cp", "-r", str(src), str(fresh("copy"))])]]
        for n in dict.fromkeys((args.jobs, 1)):
            seconds, _ = timed([PY, "-c", FLOOR, manifest(fresh("floor")), str(n)])
            rows.append([f"floor: read + NaN/Inf test + write, {n} process{'es' if n > 1 else ''}", seconds, None])
        for label, tree in trees.items():
            batch_out = fresh("batch1")
            rows.append([f"loratools batch (one process){label}",
                         *timed(cli + ["batch", manifest(batch_out)], ok=(0, 1), tree=tree)])
            rows.append([f"loratools batch, rerun (all skipped){label}",
                         *timed(cli + ["batch", manifest(batch_out)], ok=(0, 1), tree=tree)])
        for label, tree in trees.items():
            seconds, _ = timed(cli + ["batch", manifest(fresh("batchN")), "--jobs", str(args.jobs)], ok=(0, 1),
                               tree=tree)
            rows.append([f"loratools batch --jobs {args.jobs}{label}", seconds, None])  # workers: not our children
        for label, tree in trees.items():
            rows.append([f"loop of loratools.convert (one process){label}",
                         *timed([PY, "-c", LOOP, manifest(fresh("loop"))], tree=tree)])
        sample = files[:: 20]
        single = fresh("single")
        wall = cpu = 0.0
        for p in sample:
            w, c = timed(cli + ["convert", str(p), "--to", "diffusers", "-o", f"{single}/{p.parent.name}/"])
            wall, cpu = wall + w, cpu + c
        scale = len(files) / len(sample)
        rows.append([f"loratools convert per file (x{scale:.0f} of {len(sample)} files)", wall * scale, cpu * scale])
        rows.append(["cp -r, again at the end (how far the floor moved)",
                     *timed(["cp", "-r", str(src), str(fresh("copy"))])])
        shutil.rmtree(work, ignore_errors=True)
    floor = rows[0][1]
    print(f"{len(files)} LoRA files ({size:.0f} MB) to diffusers, {os.cpu_count()} cores")
    print(table([[label, f"{s:.2f}", "-" if c is None else f"{c:.2f}", f"{len(files) / s:.0f}", f"{s / floor:.1f}x"]
                 for label, s, c in rows], ["variant", "seconds", "CPU s", "files/s", "vs cp -r"]))


if __name__ == "__main__":
    main()
