"""`scan` on a generated collection of 500+ small LoRAs of mixed families and formats (real module names and
dimensions), with duplicates, broken files and metadata contradictions planted: every record matches what
`inspect` says of the file, every planted problem is found, and reruns re-read only what changed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from synth import layout, synthesize

import loratools
from loratools.catalogue import RECORD_VERSION, walk

# (layout, how many tensors of it to keep): small files, real names and shapes
TEMPLATES = [
    ("sdxl__kohya__invokeai-slider-keys-only.json", 60),
    ("flux1__kohya__invokeai-pokemon.json", 60),
    ("flux1__diffusers__invokeai-hands.json", 60),
    ("sd15__diffusers_peft__faithsang.json", 60),
    ("sd15__lycoris_lokr__lycoris-smartfalcon-f8.json", 60),
    ("wan21__diffusion_model_peft__issue-fragment.json", 60),
    ("qwen_image__diffusers__invokeai-fragment.json", 60),
    ("sd3__kohya_diffusers__issue-fragment.json", 60),
]
COPIES = 64  # per template: 8 × 64 = 512 distinct files


def _subset(name: str, keep: int) -> dict:
    lay = dict(layout(name))
    keys = sorted(lay["tensors"])[:keep]
    lay["tensors"] = {k: lay["tensors"][k] for k in keys}
    return lay


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    root = tmp_path_factory.mktemp("collection")
    planted = {"duplicates": [], "broken": [], "contradictions": []}
    expected: dict[str, tuple] = {}
    for t, (name, keep) in enumerate(TEMPLATES):
        lay = _subset(name, keep)
        folder = root / name.split("__", 1)[0] / f"t{t}"
        folder.mkdir(parents=True)
        first = synthesize(name, folder / "c000.safetensors", seed=0, layout_data=lay)
        info = loratools.inspect(first)
        want = (info["format"], info["family"]["id"], info["modules"])
        for i in range(COPIES):
            path = folder / f"c{i:03d}.safetensors"
            if i:
                synthesize(name, path, seed=i, layout_data=lay)
            expected[str(path)] = want
    # duplicates: a re-saved copy with other metadata has the same tensor bytes (AutoV3)
    src = root / "sdxl" / "t0" / "c001.safetensors"
    dup = root / "dups" / "renamed.safetensors"
    dup.parent.mkdir()
    synthesize(TEMPLATES[0][0], dup, seed=1, layout_data=_subset(*TEMPLATES[0]), metadata={"ss_output_name": "x"})
    expected[str(dup)] = expected[str(src)]
    planted["duplicates"].append(sorted([str(src), str(dup)]))
    # broken files
    for n, content in enumerate([b"", b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\":1}",
                                 (root / "sdxl" / "t0" / "c002.safetensors").read_bytes()[:5000]]):
        bad = root / "broken" / f"bad{n}.safetensors"
        bad.parent.mkdir(exist_ok=True)
        bad.write_bytes(content)
        planted["broken"].append(str(bad))
    # metadata that contradicts the tensors
    liar = root / "liars" / "dim.safetensors"
    liar.parent.mkdir()
    synthesize(TEMPLATES[0][0], liar, seed=99, layout_data=_subset(*TEMPLATES[0]),
               metadata={"ss_network_dim": "128", "ss_network_alpha": "64", "ss_base_model_version": "sd_v1"})
    planted["contradictions"].append(str(liar))
    # a symlink loop and a second link to the same folder: walked once
    os.symlink(root, root / "dups" / "loop")
    os.symlink(root / "sdxl", root / "also_sdxl")
    return root, expected, planted


def test_every_record_is_right_and_every_planted_problem_found(collection, tmp_path):
    root, expected, planted = collection
    cat = tmp_path / "catalogue.jsonl"
    records = loratools.scan([root], cat, hashes=True)
    by_path = {r["path"]: r for r in records}
    assert len(records) == len(set(os.path.realpath(r["path"]) for r in records))  # each file once
    loras = [r for r in records if r["kind"] == "lora"]
    assert len(loras) >= 500
    for path, (fmt, family, modules) in expected.items():
        r = by_path.get(path) or by_path[next(p for p in by_path if os.path.realpath(p) == os.path.realpath(path))]
        info = r["info"]
        assert (info["format"], info["family"]["id"], info["modules"]) == (fmt, family, modules), path
        assert r["size"] == os.path.getsize(path) and r["hashes"]["sha256"]
    summary = loratools.summarize_catalogue(records)
    real = [sorted(map(os.path.realpath, group)) for group in summary["duplicates"]]
    assert sorted(map(os.path.realpath, planted["duplicates"][0])) in real
    assert all(len(set(group)) == len(group) for group in summary["duplicates"])
    assert {os.path.realpath(b["path"]) for b in summary["broken"]} == set(planted["broken"])
    assert all(b["error"] for b in summary["broken"])
    liars = {os.path.realpath(x["path"]): x["problems"] for x in summary["contradictions"]}
    assert planted["contradictions"][0] in liars
    problems = " ".join(liars[planted["contradictions"][0]])
    assert "ss_network_dim 128" in problems and "ss_network_alpha 64" in problems and "claims sd1" in problems
    # the catalogue on disk holds the same records
    lines = [json.loads(line) for line in cat.read_text().splitlines()]
    assert [x["path"] for x in lines] == [r["path"] for r in records]
    assert all(x["version"] == RECORD_VERSION for x in lines)


def test_a_rerun_reads_only_what_changed(collection, tmp_path):
    root, _, _ = collection
    work = tmp_path / "c"
    shutil.copytree(root / "flux1", work)
    cat = tmp_path / "catalogue.jsonl"
    first = loratools.scan([work], cat)
    assert not any(r.get("reused") for r in first)
    again = loratools.scan([work], cat)
    assert all(r.get("reused") for r in again) and [r["path"] for r in again] == [r["path"] for r in first]
    victim = Path(first[3]["path"])
    victim.write_bytes(b"\x00" * 16)  # now broken: size changed
    (work / "t1" / "c005.safetensors").unlink()
    third = loratools.scan([work], cat)
    changed = [r for r in third if not r.get("reused")]
    assert [r["path"] for r in changed] == [str(victim)] and changed[0]["kind"] == "broken"
    assert len(third) == len(first) - 1
    # asking for hashes now re-reads the records that have none
    assert not any(r.get("reused") for r in loratools.scan([work], cat, hashes=True) if r["kind"] == "lora")


def test_parallel_scan_gives_the_same_records(collection):
    root, _, _ = collection
    one = loratools.scan([root / "wan21", root / "broken"])
    two = loratools.scan([root / "wan21", root / "broken"], jobs=2)
    strip = lambda rs: [{k: v for k, v in r.items() if k != "mtime_ns"} for r in rs]  # noqa: E731
    assert strip(one) == strip(two)


def test_checkpoints_and_pickles_are_recorded_without_torch(tmp_path):
    from safetensors.numpy import save_file
    import numpy as np

    save_file({"model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight":
               np.zeros((640, 2048), np.float16)}, str(tmp_path / "sdxl_base.safetensors"))
    (tmp_path / "old.ckpt").write_bytes(b"\x80\x02}q\x00.")
    code = ("import sys, loratools; rs = loratools.scan([sys.argv[1]]); "
            "assert 'torch' not in sys.modules, 'torch imported'; "
            "print(sorted((r['kind'], r.get('family')) for r in rs))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[('checkpoint', 'sdxl'), ('pickle', None)]"


def test_walk_skips_loops(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.safetensors").write_bytes(b"")
    os.symlink(tmp_path, tmp_path / "a" / "up")
    assert list(walk([tmp_path])) == [str(tmp_path / "a" / "x.safetensors")]


def test_cli_summary(collection, tmp_path):
    root, _, planted = collection
    out = subprocess.run([sys.executable, "-c", "from loratools.cli import main; main()", "scan", str(root / "broken"),
                          str(root / "liars"), "-o", str(tmp_path / "c.jsonl"), "--json"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["files"] == 4 and len(summary["broken"]) == 3 and summary["contradictions"]
