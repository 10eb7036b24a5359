"""inspect on a ~1 GB SDXL kohya LoRA versus loading it with safetensors.torch.load_file.

    python benchmarks/bench_inspect.py [--rank 128] [--keep]

`inspect` reads only the header (and the alpha scalars through mmap) and never imports torch;
torch-based inspectors load every tensor. RSS of a child process: resource.getrusage maxima, so each
variant runs in a fresh process and the table shows the largest value seen so far (run order is
from the lightest to the heaviest).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from common import compile_bytecode, in_child, table, timed, write_sdxl_kohya

PY = sys.executable


def main() -> None:
    compile_bytecode()
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = in_child(write_sdxl_kohya, Path(tmp) / "sdxl_rank.safetensors", rank=args.rank)
        size = path.stat().st_size / 2**20
        variants = [
            ("python startup, no work", [PY, "-c", "pass"]),
            ("python: read header only (json)", [PY, "-c", "import json,struct,sys; f=open(sys.argv[1],'rb'); "
                                                 "n=struct.unpack('<Q',f.read(8))[0]; json.loads(f.read(n))", str(path)]),
            ("loratools inspect", [PY, "-m", "loratools", "inspect", str(path)]),
            ("loratools inspect --json", [PY, "-m", "loratools", "inspect", "--json", str(path)]),
            ("import torch + safetensors.torch.load_file", [PY, "-c", "import sys,torch; from safetensors.torch "
                                                            "import load_file; load_file(sys.argv[1])", str(path)]),
        ]
        rows, times = [], {}
        for name, cmd in variants:
            wall, rss = timed(cmd, args.repeat)
            times[name] = wall
            rows.append([name, f"{wall:.3f}", f"{rss:.0f}"])
        base = times["import torch + safetensors.torch.load_file"]
        for row in rows:
            row.append(f"{base / times[row[0]]:.1f}x")
        print(f"SDXL kohya LoRA, 986 modules, rank {args.rank}, fp16: {size:.0f} MiB; best of {args.repeat}")
        print(table(rows, ["variant", "wall s", "peak RSS MB (running max)", "faster than load_file"]))


if __name__ == "__main__":
    main()
