"""convert a ~1 GB SDXL kohya LoRA (real layout, rank 128, fp16) to each target, next to `cp`.

    python benchmarks/bench_convert.py [--rank 128] [--repeat 1]

Each variant runs in its own process, writing a new file (each run removes the previous output first, and
dirty pages are flushed before every run); peak RSS is that process's maximum resident set (ru_maxrss of a
child that is waited for alone). ``--repeat N`` runs every variant once per round, N rounds, in an order that
rotates each round, so that a slow spell of the machine falls on all of them alike; the table gives the best
run and the median of each, and the ratios of the best runs. Targets from
the issue: wall time within 2x of cp, peak RSS < 500 MB. Like cp, loratools does not fsync a new file unless
asked (`loratools --sync`); the synced variants are compared with a copy followed by fsync.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from common import ROOT, compile_bytecode, in_child, run, table, write_sdxl_kohya


def main() -> None:
    compile_bytecode()
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=ROOT / "benchmarks") as tmp:
        tmp = Path(tmp)
        src = in_child(write_sdxl_kohya, tmp / "sdxl.safetensors", rank=args.rank)
        size = src.stat().st_size / 2**20
        rows = []
        copy2 = tmp / "copy2.safetensors"
        durable = (f"import os, shutil; shutil.copyfile({str(src)!r}, {str(copy2)!r}); "
                   f"fd = os.open({str(copy2)!r}, os.O_RDONLY); os.fsync(fd)")
        variants = [("cp (I/O floor)", ["cp", str(src), str(tmp / "copy.safetensors")], tmp / "copy.safetensors"),
                    ("copy + fsync (durable I/O floor)", [sys.executable, "-c", durable], copy2)]
        for to in ("kohya", "diffusers", "comfy", "peft"):
            out = tmp / f"out.{to}"
            variants.append((f"loratools convert --to {to}", [sys.executable, "-m", "loratools", "convert", str(src),
                                                             "--to", to, "-o", str(out)], out))
        out = tmp / "out.synced"
        variants.append(("loratools --sync convert --to kohya", [sys.executable, "-m", "loratools", "--sync",
                                                                 "convert", str(src), "--to", "kohya", "-o", str(out)],
                         out))
        runs: dict[str, list[tuple[float, float]]] = {name: [] for name, _, _ in variants}
        for k in range(args.repeat):
            for name, cmd, out in variants[k % len(variants):] + variants[: k % len(variants)]:
                shutil.rmtree(out) if out.is_dir() else out.unlink(missing_ok=True)
                runs[name].append(run(cmd))
        best = {name: min(r[0] for r in rs) for name, rs in runs.items()}
        floor, durable_floor = best["cp (I/O floor)"], best["copy + fsync (durable I/O floor)"]
        for name, rs in runs.items():
            wall, rss = best[name], max(r[1] for r in rs)
            rows.append([name, f"{wall:.2f}", f"{statistics.median(r[0] for r in rs):.2f}", f"{wall / floor:.2f}x",
                         f"{wall / durable_floor:.2f}x", f"{rss:.0f}"])
        print(f"SDXL kohya LoRA, 986 modules, rank {args.rank}, fp16: {size:.0f} MiB; best of {args.repeat}")
        print(table(rows, ["variant", "best s", "median s", "vs cp", "vs copy+fsync", "peak RSS MB"]))


if __name__ == "__main__":
    main()
