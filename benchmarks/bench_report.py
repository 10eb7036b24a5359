"""`loratools report` of a ~900 MB SDXL kohya LoRA (rank 128, real layout) against `inspect --stats` of the same file.

    python benchmarks/bench_report.py [--rank 128] [--repeat 1] [--keep DIR]

Both read every tensor and compute the factor-space SVD of every module; the report also computes the spectra
summaries, the resize predictions, the figures and the page (and, unless --no-hash, the file's hashes). Each
variant runs in a fresh process started from a small parent; the peak RSS is that process's own (wait4).
`inspect --stats` runs with torch's default threads and with one (OMP_NUM_THREADS=1, what the report uses for
its per-module loop), so the comparison is made at equal threading too.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import compile_bytecode, in_child, table, write_sdxl_kohya

PY = sys.executable


def measure(cmd: list[str], env: dict | None = None) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of one child process (its own ru_maxrss)."""
    os.sync()
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, **(env or {})})
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    if status != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr.read().decode(errors='replace')[-3000:]}")
    return wall, usage.ru_maxrss / 1024


def main() -> None:
    compile_bytecode()
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--keep", default=None, help="Keep the pages in this folder.")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = in_child(write_sdxl_kohya, Path(tmp) / "sdxl_rank.safetensors", rank=args.rank)
        size = path.stat().st_size / 2**20
        out = Path(args.keep or tmp)
        out.mkdir(parents=True, exist_ok=True)
        one = {"OMP_NUM_THREADS": "1"}
        variants = [
            ("loratools inspect --stats --json", [PY, "-m", "loratools", "inspect", "--stats", "--json", str(path)],
             None),
            ("loratools inspect --stats --json, OMP_NUM_THREADS=1",
             [PY, "-m", "loratools", "inspect", "--stats", "--json", str(path)], one),
            ("loratools report --no-hash", [PY, "-m", "loratools", "report", str(path), "--no-hash", "--overwrite",
                                            "-o", str(out / "nohash.html")], None),
            ("loratools report", [PY, "-m", "loratools", "report", str(path), "--overwrite", "-o",
                                  str(out / "report.html")], None),
        ]
        rows, times = [], {}
        for name, cmd, env in variants:
            best, peak = float("inf"), 0.0
            for _ in range(args.repeat):
                wall, rss = measure(cmd, env)
                best, peak = min(best, wall), max(peak, rss)
            times[name] = best
            rows.append([name, f"{best:.1f}", f"{peak:.0f}"])
        base = times["loratools inspect --stats --json, OMP_NUM_THREADS=1"]
        for row in rows:
            row.append(f"{times[row[0]] / base:.2f}x")
        page = (out / "report.html").stat().st_size / 2**20
        print(f"SDXL kohya LoRA, 986 modules, rank {args.rank}, fp16: {size:.0f} MiB; best of {args.repeat}, each in a "
              f"fresh process; the page is {page:.1f} MiB")
        print(table(rows, ["variant", "wall s", "peak RSS MB", "time vs inspect --stats (1 thread)"]))


if __name__ == "__main__":
    main()
