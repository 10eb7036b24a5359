"""convert a ~1 GB SDXL kohya LoRA (real layout, rank 128, fp16) to each target, next to `cp`.

    python benchmarks/bench_convert.py [--rank 128] [--repeat 1]

Each variant runs in its own process, writing a new file (each repeat removes the previous output first);
peak RSS is that process's maximum resident set (ru_maxrss of a child that is waited for alone). Targets from
the issue: wall time within 2x of cp, peak RSS < 500 MB. Like cp, loratools does not fsync a new file unless
asked (`loratools --sync`); the synced variants are compared with a copy followed by fsync.
"""

from __future__ import annotations

import argparse
import shutil
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
        results = {}
        for name, cmd, out in variants:
            times = []
            for _ in range(args.repeat):
                shutil.rmtree(out) if out.is_dir() else out.unlink(missing_ok=True)
                times.append(run(cmd))
            results[name] = min(times, key=lambda r: r[0])
        floor = results["cp (I/O floor)"][0]
        durable_floor = results["copy + fsync (durable I/O floor)"][0]
        for name, (wall, rss) in results.items():
            rows.append([name, f"{wall:.2f}", f"{wall / floor:.2f}x", f"{wall / durable_floor:.2f}x", f"{rss:.0f}"])
        print(f"SDXL kohya LoRA, 986 modules, rank {args.rank}, fp16: {size:.0f} MiB")
        print(table(rows, ["variant", "wall s", "vs cp", "vs copy+fsync", "peak RSS MB"]))


if __name__ == "__main__":
    main()
