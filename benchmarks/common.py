"""Shared pieces of the benchmarks: realistic synthetic inputs and measuring child processes."""

from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from loratools.io.writer import write_safetensors  # noqa: E402

KEYSPACE = ROOT / "fixtures" / "layouts" / "sdxl__kohya_keyspace__sdmecha.json"
# The modules sd-scripts' networks.lora trains on SDXL: transformer linears and both text encoders.
_TRAINED = re.compile(r"(attn[12]\.(to_q|to_k|to_v|to_out\.0)|proj_in|proj_out|ff\.net\.(0\.proj|2)"
                      r"|self_attn\.(q|k|v|out)_proj|mlp\.fc[12])$")
_PREFIX = {"unet": "lora_unet_", "te1": "lora_te1_", "te2": "lora_te2_"}


def sdxl_kohya_modules() -> list[tuple[str, list[int]]]:
    """(kohya stem, base weight shape) for the 986 modules of an SDXL kohya LoRA (real SGM layout)."""
    tensors = json.loads(KEYSPACE.read_text())["tensors"]
    out = []
    for key, t in tensors.items():
        head, _, path = key.partition(".")
        if head in _PREFIX and key.endswith(".weight") and _TRAINED.search(path[: -len(".weight")]):
            out.append((_PREFIX[head] + path[: -len(".weight")].replace(".", "_"), t["shape"]))
    return out


def write_sdxl_kohya(path: Path, rank: int = 128, dtype: str = "F16", seed: int = 0, alpha: float | None = None,
                     modules: list | None = None) -> Path:
    """An SDXL-shaped kohya LoRA (random factors), written one tensor at a time."""
    rng = np.random.default_rng(seed)
    np_dtype = {"F16": np.float16, "F32": np.float32}[dtype]
    items = []
    for stem, shape in modules or sdxl_kohya_modules():
        out_f, in_f = shape[0], int(np.prod(shape[1:]))
        r = min(rank, out_f, in_f)
        down_shape = [r, *shape[1:]]
        up_shape = [out_f, r] + [1] * (len(shape) - 2)

        def make(s=tuple(down_shape), scale=1 / np.sqrt(in_f)):
            return (rng.standard_normal(s, dtype=np.float32) * scale).astype(np_dtype)

        def make_up(s=tuple(up_shape), scale=1 / np.sqrt(r)):
            return (rng.standard_normal(s, dtype=np.float32) * scale * 0.1).astype(np_dtype)

        items += [(f"{stem}.lora_down.weight", dtype, down_shape, make),
                  (f"{stem}.lora_up.weight", dtype, up_shape, make_up),
                  (f"{stem}.alpha", dtype, [], np.array(alpha if alpha is not None else r / 2, dtype=np_dtype))]
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_base_model_version": "sdxl_base_v1-0"}
    write_safetensors(path, items, meta, overwrite=True)
    return path


def in_child(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` in a fresh interpreter. Build inputs this way: a child's peak RSS includes the
    memory of its parent at the moment it starts, so the measuring process must stay small."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args, kwargs)


def compile_bytecode() -> None:
    """Write the package's bytecode, as installing it does: an environment that sets PYTHONDONTWRITEBYTECODE
    would otherwise make every measured run compile loratools from source (~70 ms)."""
    import compileall

    compileall.compile_dir(str(ROOT / "loratools"), quiet=1)


def run(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of one child process, waited for alone (its own ru_maxrss).

    Dirty pages left by earlier steps are flushed first (os.sync), so that no variant pays for another's
    writeback; the child's stderr is shown only if it fails."""
    import os
    import tempfile

    os.sync()
    with tempfile.TemporaryFile() as err:
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t
        if status != 0:
            err.seek(0)
            sys.stderr.write(err.read().decode(errors="replace")[-4000:])
            raise SystemExit(f"failed: {' '.join(cmd)}")
    return wall, usage.ru_maxrss / 1024


def timed(cmd: list[str], repeat: int = 1) -> tuple[float, float]:
    """Best wall time (s) and peak RSS (MB) of a child process."""
    best, rss = float("inf"), 0.0
    for _ in range(repeat):
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        os.sync()
        t = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, cwd=ROOT)
        best = min(best, time.perf_counter() - t)
        rss = max(rss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, before) / 1024
    return best, rss


def table(rows: list[list], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows])


def export(rev: str, dest: Path) -> Path:
    """The package as it was at git revision ``rev``, extracted into ``dest`` (nothing in the checkout changes) and
    compiled, for a child process to import with ``dest`` first on its path."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "loratools"], check=True,
                             capture_output=True).stdout
    dest.mkdir(parents=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(dest / "loratools")], check=True)
    return dest


def run_child(script: str, args: dict) -> dict:
    """``python SCRIPT --child ARGS_JSON`` in a fresh process (with ``args["tree"]`` first on its path when given):
    the JSON its last stdout line holds, plus wall seconds, CPU seconds (user + system, all threads) and peak RSS
    (MB) from wait4."""
    import tempfile
    import time as _time

    env = {**os.environ, "PYTHONPATH": args["tree"]} if args.get("tree") else None
    os.sync()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t = _time.perf_counter()
        proc = subprocess.Popen([sys.executable, script, "--child", json.dumps(args)], stdout=out, stderr=err,
                                env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = _time.perf_counter() - t
        if os.waitstatus_to_exitcode(status):
            err.seek(0)
            sys.stderr.write(err.read()[-4000:])
            raise SystemExit(f"child {args['kind']} failed")
        out.seek(0)
        result = json.loads(out.read().strip().splitlines()[-1])
    result.update(wall=wall, cpu=usage.ru_utime + usage.ru_stime, rss_mb=usage.ru_maxrss / 1024)
    return result
