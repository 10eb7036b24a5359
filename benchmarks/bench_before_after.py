"""inspect, convert, resize and bake of this tree against an earlier revision, alternating, in one run.

    python benchmarks/bench_before_after.py --before REV [--rank 64] [--fraction 0.25] [--repeat 3]
                                            [--only inspect convert ...]

The earlier revision is exported with `git archive` into a temporary folder (nothing in the checkout changes);
each command runs as `python -m loratools …` in a fresh process with that tree first on the path, the two trees
taking turns so that drift in the machine's load hits both alike. Every run writes a new output, removed once it
is measured: replacing an output would make every run after the first flush the file to disk (loratools syncs a
file it replaces) and free the old one, which times the disk rather than the command. Inputs: an SDXL-shaped
kohya LoRA (real SGM module list, random factors) and a slice of the SDXL checkpoint (every 1/fraction-th tensor
of the real layout). Prints best and median wall seconds, the median CPU seconds (user + system, all threads:
steadier than wall time on a shared machine) and the peak RSS per command and tree.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_bake import write_base
from common import ROOT, export, in_child, table, write_sdxl_kohya

PY = sys.executable


def run(tree: Path, args: list[str]) -> tuple[float, float, float]:
    """Wall seconds, CPU seconds and peak RSS (MB) of `python -m loratools ARGS` with ``tree`` first on the path."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    os.sync()
    with tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen([PY, "-m", "loratools", *args], cwd=tree, env=env, stdout=subprocess.DEVNULL,
                                stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        if status != 0:
            err.seek(0)
            raise SystemExit(f"{tree.name}: loratools {' '.join(args)} failed:\n"
                             + err.read().decode(errors="replace")[-2000:])
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--before", required=True, help="git revision to compare against")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--fraction", type=float, default=0.25, help="share of the SDXL checkpoint's tensors")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--only", nargs="*", default=None, help="commands to run (first words: inspect convert ...)")
    args = ap.parse_args()
    subprocess.run([PY, "-m", "compileall", "-q", str(ROOT / "loratools")], check=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        trees = {"before": export(args.before, tmp / "before"), "after": ROOT}
        lora = in_child(write_sdxl_kohya, tmp / "lora.safetensors", rank=args.rank)
        base = tmp / "base.safetensors"
        if not args.only or "bake" in args.only:
            in_child(write_base, base, args.fraction)
        out = tmp / "out"
        out.mkdir()
        dest = out / "o.safetensors"
        commands = {
            "inspect": ["inspect", str(lora)],
            "convert --to diffusers": ["convert", str(lora), "--to", "diffusers", "-o", str(dest)],
            "convert --to kohya": ["convert", str(lora), "--to", "kohya", "-o", str(dest)],
            "resize --rank 16": ["resize", str(lora), "--rank", "16", "-o", str(dest)],
            "bake": ["bake", str(base), str(lora), "-o", str(dest), "--allow-unmatched"],
        }
        rows = []
        for name, cmd in commands.items():
            if args.only and name.split()[0] not in args.only:
                continue
            walls, cpus = {k: [] for k in trees}, {k: [] for k in trees}
            rss = {k: 0.0 for k in trees}
            for _ in range(args.repeat):
                for label, tree in trees.items():
                    wall, cpu, peak = run(tree, cmd)
                    walls[label].append(wall)
                    cpus[label].append(cpu)
                    rss[label] = max(rss[label], peak)
                    if dest.exists():
                        os.unlink(dest) if dest.is_file() else shutil.rmtree(dest)
            for label in trees:
                rows.append([name, label, f"{min(walls[label]):.2f}", f"{statistics.median(walls[label]):.2f}",
                             f"{statistics.median(cpus[label]):.2f}", f"{rss[label]:.0f}"])
        mb = lora.stat().st_size / 2**20
        size = f", base slice {base.stat().st_size / 2**30:.2f} GB" if base.exists() else ""
        print(f"SDXL kohya LoRA rank {args.rank} ({mb:.0f} MB){size}; before = {args.before}, after = this tree; "
              f"{args.repeat} runs each, alternating")
        print(table(rows, ["command", "tree", "best s", "median s", "median CPU s", "peak RSS MB"]))


if __name__ == "__main__":
    main()
