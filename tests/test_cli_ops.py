"""`loratools resize` / `merge` / `convert --lossy-rank` from the command line: outputs, reports, bad input."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from synth import synthesize

import loratools
from loratools.cli import cli
from loratools.cli_ops import parse_weighted
from loratools.errors import UsageError
from loratools.io.writer import write_safetensors


def cli_run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def process(*args):
    return subprocess.run([sys.executable, "-m", "loratools", *map(str, args)], capture_output=True, text=True,
                          timeout=180)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    d = tmp_path_factory.mktemp("sdxl")
    return synthesize("sdxl__kohya__invokeai-slider-keys-only.json", d / "s.safetensors", dtype="F32", rank=4)


def _dense(lora, names=None):
    """Canonical target -> s·ΔW (float64) for a sample of modules, whatever each file calls them."""
    from loratools.families import get_family
    from loratools.ops.canonical import canonicalize

    pairs = canonicalize(lora, get_family(lora.family.id))
    chosen = names if names is not None else sorted(c.native for _, c in pairs)[::14]  # 20 of 280
    return {c.native: m.adapter.delta().double() * m.scale for m, c in pairs if c.native in chosen}


def test_resize_keeps_scale_and_format(sdxl, tmp_path):
    res = cli_run("resize", sdxl, "--rank", "2", "-o", tmp_path / "r2.safetensors", "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["format"] == "kohya" and report["summary"]["modules"] == 280
    with loratools.load(tmp_path / "r2.safetensors") as small, loratools.load(sdxl) as big:
        assert {m.rank for m in small.modules} == {2}
        assert {m.scale for m in small.modules} == {m.scale for m in big.modules}  # alpha follows the rank
        ref, got = _dense(big), _dense(small)
        for name in list(ref)[:20]:  # the optimal rank-2 truncation of each module (Eckart–Young)
            u, s, vh = torch.linalg.svd(ref[name])
            best = u[:, :2] @ torch.diag(s[:2]) @ vh[:2]
            assert (got[name] - best).norm() / best.norm() < 1e-4  # float32 compute and storage


def test_merge_concat_is_the_weighted_sum(sdxl, tmp_path):
    res = cli_run("merge", f"{sdxl}:0.5", f"{sdxl}:-0.25", "-o", tmp_path / "m.safetensors", "--to", "diffusers")
    assert res.exit_code == 0, res.output
    with loratools.load(tmp_path / "m.safetensors") as merged, loratools.load(sdxl) as src:
        ref = _dense(src)
        got = _dense(merged, set(ref))
        assert merged.format == "diffusers" and {m.rank for m in merged.modules} == {8}
        assert set(got) == set(ref)
        for name, delta in ref.items():
            assert (got[name] - 0.25 * delta).norm() / delta.norm() < 1e-6


@pytest.mark.parametrize("text,expected", [("a.safetensors", ("a.safetensors", 1.0)), ("a.safetensors:0.7", ("a.safetensors", 0.7)),
                                           ("dir/a.safetensors:-1", ("dir/a.safetensors", -1.0))])
def test_parse_weighted(text, expected):
    assert parse_weighted(text) == expected


@pytest.mark.parametrize("args,message", [
    (("merge", "{src}", "{src}:abc", "-o", "{out}"), "weight 'abc' of"),
    (("resize", "{src}", "--rank", "0", "-o", "{out}"), "rank must be a positive integer, got 0"),
    (("resize", "{src}", "--dynamic", "sv_fro:1.5", "-o", "{out}"), "sv_fro needs a value in (0, 1], got 1.5"),
    (("resize", "{src}", "-o", "{out}"), "pass --rank N or --dynamic METHOD:VALUE"),
    (("merge", "{src}", "{flux}", "-o", "{out}"), "cannot merge LoRAs of different families"),
    (("resize", "{lokr}", "--rank", "2", "-o", "{out}"), "LoKr modules need --lossy-rank N"),
])
def test_bad_input_is_one_line_exit_2(args, message, sdxl, tmp_path, layout_file, monkeypatch, capsys):
    from loratools.cli import main

    subs = {"src": sdxl, "out": tmp_path / "o.safetensors", "flux": layout_file("flux1__kohya__invokeai-pokemon.json"),
            "lokr": layout_file("sd15__lycoris_lokr__lycoris-smartfalcon-f4.json")}
    monkeypatch.setattr(sys, "argv", ["loratools", *[a.format(**subs) for a in args]])
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and err.startswith("loratools: error: "), err
    assert message in err
    assert not (tmp_path / "o.safetensors").exists()


def test_errors_in_a_fresh_process_have_no_traceback(sdxl, tmp_path):
    r = process("merge", sdxl, f"{sdxl}:abc", "-o", tmp_path / "o.safetensors")
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.count("\n") == 1


def test_convert_lossy_rank_reports_the_error(tmp_path, layout_file):
    src = layout_file("flux1__lycoris_lokr__invokeai-fragment.json")
    res = cli_run("convert", src, "--to", "comfy", "--lossy-rank", "4", "-o", tmp_path / "x.safetensors", "--json",
                  "--family", "flux1")
    assert res.exit_code == 0, res.output
    [report] = json.loads(res.stdout)
    assert report["ok"] and any("lokr -> rank-4 LoRA, relative error" in w for w in report["warnings"])
    with loratools.load(tmp_path / "x.safetensors") as out:
        assert {m.adapter.kind for m in out.modules} == {"lora"} and max(m.rank for m in out.modules) <= 4


def test_weights_must_be_numbers_in_the_api():
    with pytest.raises(UsageError):
        parse_weighted("a.safetensors:nan")


def test_merge_inputs_in_different_formats_meet_by_target(sdxl, tmp_path):
    as_diffusers = loratools.convert(sdxl, "diffusers", tmp_path / "d.safetensors").output
    merged, report = loratools.merge([(sdxl, 0.5), (as_diffusers, 0.5)])
    assert len(merged.modules) == 280  # each module met its twin
    out = loratools.save(merged, tmp_path / "m.safetensors")
    assert loratools.verify(sdxl, out.output, rtol=1e-5).equal


def test_interrupted_command_exits_2_without_output(sdxl, tmp_path, monkeypatch, capsys):
    from loratools import api
    from loratools.cli import main

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(api, "resize", interrupted)
    monkeypatch.setattr(sys, "argv", ["loratools", "resize", str(sdxl), "--rank", "2", "-o", str(tmp_path / "o.safetensors")])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == "loratools: error: interrupted; no output was written"
    assert list(tmp_path.iterdir()) == []


def test_sync_flag_flushes_new_outputs(sdxl, tmp_path, monkeypatch):
    from loratools.io import atomic

    synced = []
    real = os.fsync
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: (synced.append(fd), real(fd)))
    assert cli_run("convert", sdxl, "--to", "comfy", "-o", tmp_path / "a.safetensors").exit_code == 0
    assert synced == []
    res = cli_run("--sync", "convert", sdxl, "--to", "comfy", "-o", tmp_path / "b.safetensors")
    assert res.exit_code == 0, res.output
    assert len(synced) == 2  # the file and its folder
    assert loratools.verify(sdxl, tmp_path / "b.safetensors").equal


def test_a_family_refusal_after_resize_or_merge_names_the_input(tmp_path):
    """The keys of a one-module SD UNet LoRA fit sd1, sd2 and sdxl alike: the refusal names the file the user gave."""
    stem = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    g = np.random.default_rng(0)
    path = tmp_path / "amb.safetensors"
    write_safetensors(path, [(f"{stem}.lora_up.weight", "F32", (640, 4), g.random((640, 4), np.float32)),
                             (f"{stem}.lora_down.weight", "F32", (4, 640), g.random((4, 640), np.float32)),
                             (f"{stem}.alpha", "F32", (), np.array(4, np.float32))])
    for args in (("resize", path, "--rank", 2), ("merge", path, path)):
        r = process(*args, "-o", tmp_path / "out.safetensors")
        assert r.returncode == 2, r.stderr
        assert r.stderr.startswith(f"loratools: error: {path}: cannot tell the base-model family"), r.stderr
        assert "<memory>" not in r.stderr and not (tmp_path / "out.safetensors").exists()
