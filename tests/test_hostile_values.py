"""Hostile numbers and configs: every command ends with a result or one line and exit 2 (3 for a bug), never a
traceback, a hang or a file full of NaN; a negative scale is converted exactly."""

from __future__ import annotations

import gc
import json
import math
import signal
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import loratools
from loratools.cli import main
from loratools.errors import LoraToolsError

STEM = "lora_unet_down_blocks_0_attentions_0_proj_in"
META = {"ss_base_model_version": "sd_v1"}


def _kohya(path: Path, alpha=4.0, up=None, down=None, dtype=np.float16) -> Path:
    rng = np.random.default_rng(0)
    save_file({f"{STEM}.lora_down.weight": (rng.standard_normal((4, 320)) if down is None else down).astype(dtype),
               f"{STEM}.lora_up.weight": (rng.standard_normal((320, 4)) if up is None else up).astype(dtype),
               f"{STEM}.alpha": np.asarray(alpha, dtype=np.float32)}, str(path), META)
    return path


@pytest.fixture
def cli(capsys, monkeypatch):
    """The command as users run it: (exit code, the lines it printed)."""

    def run(*args):
        monkeypatch.setattr(sys, "argv", ["loratools", *map(str, args)])
        threshold = gc.get_threshold()
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code or 0
        finally:
            gc.unfreeze()
            gc.set_threshold(*threshold)
        out = capsys.readouterr()
        return code, [line for line in (out.out + out.err).splitlines() if line.strip()]

    return run


def _refused(result, *words):
    code, lines = result
    assert code == 2 and len(lines) == 1 and "Traceback" not in lines[0], lines
    assert all(w in lines[0] for w in words), lines[0]


@pytest.mark.parametrize("to", ["kohya", "diffusers", "peft", "comfy"])
def test_a_negative_scale_converts_exactly_to_every_target(tmp_path, to):
    src = _kohya(tmp_path / "neg.safetensors", alpha=-2.0)
    r = loratools.convert(src, to, tmp_path / f"out.{to}", family="sd1")
    assert loratools.verify(src, r.output, rtol=1e-6, family="sd1").equal
    if to in ("kohya", "comfy"):  # one alpha for all (the common 3): the other's ratio -2/3 goes into lora_up
        rng = np.random.default_rng(13)
        mixed = tmp_path / "mixed.safetensors"
        second = "lora_unet_down_blocks_0_attentions_1_proj_in"
        save_file({**{f"{stem}.lora_{kind}.weight": rng.standard_normal(shape).astype(np.float32)
                      for stem in (STEM, second) for kind, shape in (("down", (4, 320)), ("up", (320, 4)))},
                   f"{STEM}.alpha": np.asarray(-2.0, np.float32), f"{second}.alpha": np.asarray(3.0, np.float32)},
                  str(mixed), META)
        r = loratools.convert(mixed, to, tmp_path / f"u.{to}", family="sd1", uniform_alpha=True)
        assert loratools.verify(mixed, r.output, rtol=1e-6, family="sd1").equal
    # the writers that fold the scale into the factors, behind resize and merge too
    small, _ = loratools.resize(src, rank=4)
    merged, _ = loratools.merge([src])
    for n, result in enumerate((small, merged)):
        out = loratools.save(result, tmp_path / f"{n}.{to}", to=to, family="sd1").output
        assert loratools.verify(src, out, rtol=1e-6, family="sd1").equal


def test_random_alpha_bits_never_hang(tmp_path):
    """The alpha bytes of a kohya file replaced by random bits (negative, subnormal, huge, NaN...): converting to
    diffusers, which folds alpha/r into the factors, ends quickly with a file or one LoraToolsError."""
    rng = np.random.default_rng(12)
    patterns = [rng.bytes(4) for _ in range(40)] + [b"\x00\x00\x80\xbf", b"\x01\x00\x00\x80", b"\xff\xff\x7f\xff"]
    for n, bits in enumerate(patterns):
        src = _kohya(tmp_path / f"{n}.safetensors", alpha=np.frombuffer(bits, "<f4")[0])
        try:
            with deadline(20):
                out = loratools.convert(src, "diffusers", tmp_path / f"{n}.diffusers.safetensors", family="sd1").output
        except LoraToolsError:
            continue
        assert all(np.isfinite(v.astype(np.float64)).all() for v in load_file(out).values())


@pytest.mark.parametrize("to", ["diffusers", "kohya-uniform"])
@pytest.mark.parametrize("alpha,words", [(3e38, "beyond F16's range (Inf)"), (1e-30, "below F16's range")])
def test_a_scale_folded_beyond_the_factor_dtype_is_refused_not_written_as_inf_or_zeros(tmp_path, cli, to, alpha, words):
    """Finite fp16 factors and a finite alpha, but alpha/r folded into the factors does not fit fp16: the
    output would be Inf (or all zeros). Formats that keep the scale beside the factors write it exactly."""
    rng = np.random.default_rng(10)
    src = tmp_path / "in.safetensors"
    other = "lora_unet_down_blocks_0_attentions_1_proj_in"
    save_file({**{f"{stem}.{kind}.weight": rng.standard_normal(shape).astype(np.float16)
                  for stem in (STEM, other) for kind, shape in (("lora_down", (4, 320)), ("lora_up", (320, 4)))},
               f"{STEM}.alpha": np.asarray(alpha, np.float32), f"{other}.alpha": np.asarray(4.0, np.float32)},
              str(src), META)
    out = tmp_path / "out.safetensors"
    args = ["--to", "diffusers"] if to == "diffusers" else ["--to", "kohya", "--uniform-alpha"]
    if to == "kohya-uniform":  # the common alpha is the larger one (a tie): the other's ratio shrinks lora_up
        words = "below F16's range"
    _refused(cli("convert", src, *args, "-o", out, "--family", "sd1"), "down_blocks", words, "--dtype")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.safetensors"]
    assert cli("convert", src, "--to", "diffusers", "--dtype", "fp32", "-o", out, "--family", "sd1")[0] == 0
    assert loratools.verify(src, out, family="sd1").equal
    assert cli("convert", src, "--to", "kohya", "-o", tmp_path / "k.safetensors", "--family", "sd1")[0] == 0


def test_a_merge_whose_result_leaves_the_storage_dtype_is_refused(tmp_path, cli):
    """concat folds each input's scale into lora_up: alpha/r = 2.5e5 on fp16 factors is beyond fp16."""
    src = _kohya(tmp_path / "loud.safetensors", alpha=1e6)
    out = tmp_path / "m.safetensors"
    _refused(cli("merge", src, src, "-o", out, "--family", "sd1"), "down_blocks_0_attentions_0_proj_in",
             "beyond float16's range", "--dtype")
    assert not out.exists()
    assert cli("merge", src, src, "-o", out, "--family", "sd1", "--dtype", "fp32")[0] == 0


def test_a_cast_to_a_narrower_dtype_that_overflows_is_refused(tmp_path, cli):
    up = np.random.default_rng(11).standard_normal((320, 4)) * 1e5
    src = _kohya(tmp_path / "big.safetensors", up=up, dtype=np.float32)
    _refused(cli("convert", src, "--to", "kohya", "--dtype", "fp16", "-o", tmp_path / "o.safetensors",
                 "--family", "sd1"), "down_blocks.0.attentions.0.proj_in", "its values lie beyond F16's range")
    assert cli("convert", src, "--to", "kohya", "--dtype", "bf16", "-o", tmp_path / "o.safetensors",
               "--family", "sd1")[0] == 0


@pytest.mark.parametrize("case", ["nan alpha", "inf alpha", "huge alpha", "inf factor", "nan factor"])
def test_non_finite_numbers_are_refused_by_every_writer_and_flagged_by_inspect(tmp_path, cli, case):
    rng = np.random.default_rng(1)
    up = rng.standard_normal((320, 4))
    alpha = {"nan alpha": math.nan, "inf alpha": math.inf, "huge alpha": 1e39}.get(case, 4.0)
    if case == "inf factor":
        up[3, 1] = np.inf
    if case == "nan factor":
        up[0, 0] = np.nan
    src = _kohya(tmp_path / "bad.safetensors", alpha=alpha, up=up, dtype=np.float32 if "alpha" in case else np.float16)
    out = tmp_path / "out"
    for args in (["convert", src, "--to", "diffusers", "-o", f"{out}/", "--family", "sd1"],
                 ["resize", src, "--rank", "2", "-o", out / "r.safetensors", "--family", "sd1"],
                 ["merge", src, src, "-o", out / "m.safetensors", "--family", "sd1"]):
        _refused(cli(*args), "NaN or Inf", "down_blocks_0_attentions_0_proj_in", "--allow-nonfinite")
    assert not out.exists()
    code, lines = cli("inspect", "--stats", "--json", src)
    assert code == 0
    stats = json.loads("\n".join(lines))[0]["stats"]
    assert stats["summary"]["nan_or_inf"] == 1
    assert loratools.inspect(src, stats=True)["stats"]["summary"]["nan_or_inf"] == 1  # the API never raises either
    if case != "huge alpha":  # passed through on request, for forensics: the values arrive unchanged
        assert cli("convert", src, "--to", "kohya", "-o", out / "k.safetensors", "--family", "sd1",
                   "--allow-nonfinite")[0] == 0
        got = load_file(str(out / "k.safetensors"))
        assert not np.isfinite(np.concatenate([v.astype(np.float64).ravel() for v in got.values()])).all()


def test_verify_never_calls_a_file_holding_nan_equal(tmp_path):
    src = _kohya(tmp_path / "ok.safetensors", dtype=np.float32)
    up = np.random.default_rng(0).standard_normal((320, 4))
    up[1, 1] = np.nan
    bad = _kohya(tmp_path / "bad.safetensors", up=up, dtype=np.float32)
    for a, b in ((src, bad), (bad, src), (bad, bad)):
        result = loratools.verify(a, b, family="sd1")
        assert not result.equal and result.max_rel_error == math.inf


@pytest.mark.parametrize("alpha,count", [(np.array([1.0, 2.0]), 2), (np.zeros((0,)), 0)])
def test_an_alpha_that_is_not_one_number_names_the_module(tmp_path, cli, alpha, count):
    src = _kohya(tmp_path / "a.safetensors", alpha=alpha)
    for args in (["inspect", src], ["convert", src, "--to", "diffusers", "-o", tmp_path / "o.safetensors"]):
        _refused(cli(*args), "down_blocks_0_attentions_0_proj_in", f"holds {count} values")


def test_factors_that_do_not_fit_name_the_module_and_both_shapes(tmp_path, cli):
    rng = np.random.default_rng(2)
    src = _kohya(tmp_path / "m.safetensors", up=rng.standard_normal((320, 8)), down=rng.standard_normal((4, 320)))
    _refused(cli("convert", src, "--to", "diffusers", "-o", tmp_path / "o.safetensors"),
             "down_blocks_0_attentions_0_proj_in", "lora_down [4, 320]", "lora_up [320, 8]")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_operations_that_need_an_svd_refuse_nan_even_when_allowed(tmp_path, cli, bad):
    """--allow-nonfinite passes NaN/Inf through where values are copied or rescaled; an SVD of them is not
    defined, so resize, merge --method svd and a lossy conversion name the module instead."""
    up = np.random.default_rng(6).standard_normal((320, 4))
    up[5, 2] = bad
    src = _kohya(tmp_path / "bad.safetensors", up=up, dtype=np.float32)
    for args in (["resize", src, "--rank", "2"], ["merge", src, src, "--method", "svd", "--rank", "2"]):
        _refused(cli(*args, "-o", tmp_path / "o.safetensors", "--family", "sd1", "--allow-nonfinite"),
                 "bad.safetensors", "down_blocks_0_attentions_0_proj_in", "NaN or Inf", "no SVD")
    with pytest.raises(LoraToolsError, match="no SVD"):
        loratools.resize(src, rank=2, allow_nonfinite=True)
    assert not (tmp_path / "o.safetensors").exists()
    assert cli("merge", src, src, "-o", tmp_path / "c.safetensors", "--family", "sd1", "--allow-nonfinite")[0] == 0


@pytest.mark.parametrize("magnitude", [1e19, 1e30])
def test_finite_factors_whose_product_overflows_are_flagged_or_refused_not_a_crash(tmp_path, cli, magnitude):
    rng = np.random.default_rng(7)
    src = _kohya(tmp_path / "huge.safetensors", up=rng.standard_normal((320, 4)) * magnitude,
                 down=rng.standard_normal((4, 320)) * magnitude, dtype=np.float32)
    stats = loratools.inspect(src, stats=True)["stats"]
    assert stats["summary"]["nan_or_inf"] == 1 and stats["modules"][0]["norm"] is None
    _refused(cli("resize", src, "--rank", "2", "-o", tmp_path / "o.safetensors", "--family", "sd1"),
             "down_blocks_0_attentions_0_proj_in", "exceed the range of float32")


def test_large_but_representable_factors_resize_exactly(tmp_path):
    """Factors near float32's limits whose product is an ordinary ΔW: the QR of lora_up alone would overflow, so
    each factor is scaled into range first (by a power of two: exact) and the result is the true SVD."""
    rng = np.random.default_rng(8)
    up, down = rng.standard_normal((320, 4)) * 5e37, rng.standard_normal((4, 320)) * 1e-37
    src = _kohya(tmp_path / "big.safetensors", up=up, down=down, alpha=4.0, dtype=np.float32)
    small, _ = loratools.resize(src, rank=4 - 1)
    m = small.modules[0]
    got = m.adapter.t("lora_up").torch().double() @ m.adapter.t("lora_down").torch().double() * m.scale
    want = up.astype(np.float32).astype(np.float64) @ down.astype(np.float32).astype(np.float64)
    u, s, vh = np.linalg.svd(want)
    best = (u[:, :3] * s[:3]) @ vh[:3]
    assert np.allclose(got.numpy(), best, rtol=1e-4, atol=1e-4 * s[0])


def test_a_nan_dora_magnitude_is_flagged_by_stats(tmp_path):
    rng = np.random.default_rng(9)
    src = tmp_path / "dora.safetensors"
    magnitude = np.ones((320, 1), np.float32)
    magnitude[3] = np.nan
    save_file({f"{STEM}.lora_down.weight": rng.standard_normal((4, 320)).astype(np.float32),
               f"{STEM}.lora_up.weight": rng.standard_normal((320, 4)).astype(np.float32),
               f"{STEM}.alpha": np.asarray(4.0, np.float32), f"{STEM}.dora_scale": magnitude}, str(src), META)
    assert loratools.inspect(src, stats=True)["stats"]["modules"][0]["flags"] == ["nan_or_inf"]


def _peft_folder(path: Path, config: dict) -> Path:
    path.mkdir()
    rng = np.random.default_rng(3)
    save_file({"base_model.model.down_blocks.0.attentions.0.proj_in.lora_A.weight": rng.standard_normal((4, 320))
               .astype(np.float32),
               "base_model.model.down_blocks.0.attentions.0.proj_in.lora_B.weight": rng.standard_normal((320, 4))
               .astype(np.float32)}, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    return path


@pytest.mark.parametrize("config,words", [
    ({"r": 4, "lora_alpha": 1e308}, ["lora_alpha", "float32"]),
    ('{"r": 4, "lora_alpha": 1' + "0" * 400 + "}", ["lora_alpha", "float32"]),  # an integer beyond float64
    ({"r": 4, "lora_alpha": "eight"}, ["lora_alpha", "must be a number"]),
    ('{"r": 4, "lora_alpha": NaN}', ["lora_alpha", "finite"]),
    ({"r": 4, "lora_alpha": 8, "alpha_pattern": {"proj_in": "big"}}, ["alpha_pattern", "proj_in"]),
    ({"r": 4, "lora_alpha": 8, "rank_pattern": ["proj_in", 4]}, ["rank_pattern", "list"]),
    ({"r": 0, "lora_alpha": 8}, ["r must be an integer"]),
    ({"r": 4.5, "lora_alpha": 8}, ["r must be an integer"]),
    ({"r": 4, "lora_alpha": 8, "use_dora": "yes"}, ["use_dora", "true or false"]),
    ({"r": 4, "lora_alpha": 8, "target_modules": [1, 2]}, ["target_modules"]),
    ('{"r": 4, "x": ' + "[" * 100_000 + "]" * 100_000 + "}", ["nested too deeply"]),
    ('{"r": 4, "pad": "' + "x" * (1 << 20) + '"}', ["larger than 1048576 bytes"]),
])
def test_peft_configs_are_checked_as_peft_types_them(tmp_path, cli, config, words):
    folder = _peft_folder(tmp_path / "adapter", config)
    _refused(cli("inspect", folder), "adapter_config.json", *words)


def test_a_backtracking_pattern_key_is_refused_in_bounded_time(tmp_path, cli, monkeypatch):
    """Pattern keys are regular expressions: '(a+)+b' against a name of 40 'a's backtracks for longer than anyone
    waits with re; matching stops at the config's budget and says which key."""
    from loratools.formats import peft_config

    monkeypatch.setattr(peft_config, "MATCH_BUDGET_S", 0.5)
    folder = tmp_path / "adapter"
    folder.mkdir()
    name = "a" * 40
    save_file({f"base_model.model.{name}.lora_A.weight": np.ones((2, 8), np.float32),
               f"base_model.model.{name}.lora_B.weight": np.ones((8, 2), np.float32)},
              str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 4,
                                                            "alpha_pattern": {"(a|aa)+(a+)+b": 8}}))
    with deadline(20):
        _refused(cli("inspect", folder), "alpha_pattern", "(a|aa)+(a+)+b", "too long")


def test_pattern_keys_match_as_peft_matches_them():
    from peft.utils.other import get_pattern_key

    from loratools.formats.peft_config import LoraConfig

    patterns = {"proj_in": 8, "^unet\\.mid.*": 2, "attn[12]\\.to_(k|v)": 4, "(": 1}
    cfg = LoraConfig.from_dict({"r": 4, "lora_alpha": 16, "alpha_pattern": patterns})
    for name in ["down_blocks.0.attentions.0.proj_in", "unet.mid_block.proj_out", "x.attn2.to_v", "x.attn2.to_q",
                 "proj_in_extra", "("]:
        peft = patterns.get(get_pattern_key([k for k in patterns if k != "("], name), 16)
        assert cfg.alpha_for(name) == (1 if name == "(" else peft), name  # an invalid expression names itself


def test_a_bug_is_one_line_with_its_own_exit_code(tmp_path, cli, monkeypatch):
    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(loratools.api, "inspect", broken)
    code, lines = cli("inspect", _kohya(tmp_path / "ok.safetensors"))
    assert code == 3 and len(lines) == 1 and lines[0].startswith("loratools: internal error: ZeroDivisionError")
    assert "--debug" in lines[0]
    code, lines = cli("--debug", "inspect", tmp_path / "ok.safetensors")  # the traceback, the same exit code
    assert code == 3 and lines[0].startswith("Traceback") and "ZeroDivisionError: a bug" in lines
    assert lines[-1].startswith("loratools: internal error: ZeroDivisionError")


def test_debug_shows_the_traceback_of_a_refusal_and_keeps_its_exit_code(tmp_path, cli):
    (tmp_path / "bad.safetensors").write_bytes(b"\0" * 4)
    for args in (("inspect",), ("convert", "--to", "diffusers")):
        code, lines = cli("--debug", *args, tmp_path / "bad.safetensors")
        assert code == 2 and lines[0].startswith("Traceback"), lines
        assert lines[-1].startswith("loratools: error: ") and "bad.safetensors" in lines[-1]


class Stuck(BaseException):
    """A call that did not return in time (a BaseException: no handler in the code under test may take it)."""


@contextmanager
def deadline(seconds: int):
    """No case may hang: SIGALRM turns a stuck call into a failure."""
    def stuck(*_):
        raise Stuck(f"no result within {seconds} s")

    old = signal.signal(signal.SIGALRM, stuck)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_a_rank_zero_module_is_refused(tmp_path, cli):
    src = tmp_path / "r0.safetensors"
    save_file({f"{STEM}.lora_down.weight": np.zeros((0, 320), np.float16),
               f"{STEM}.lora_up.weight": np.zeros((320, 0), np.float16)}, str(src), META)
    _refused(cli("convert", src, "--to", "diffusers", "-o", tmp_path / "o.safetensors"), "rank 0")


def _sd1_base(path: Path) -> Path:
    rng = np.random.default_rng(4)
    save_file({"model.diffusion_model.input_blocks.1.1.proj_in.weight": rng.standard_normal((320, 320, 1, 1))
               .astype(np.float16),
               "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight":
               rng.standard_normal((320, 768)).astype(np.float16)}, str(path))
    return path


@pytest.mark.parametrize("damage", ["truncated", "header byte", "length field", "not safetensors"])
def test_hostile_base_checkpoints_for_bake_and_extract(tmp_path, cli, damage):
    base = _sd1_base(tmp_path / "base.safetensors")
    good = tmp_path / "good.safetensors"
    good.write_bytes(base.read_bytes())
    raw = bytearray(base.read_bytes())
    if damage == "truncated":
        raw = raw[: len(raw) - 1000]
    elif damage == "header byte":
        raw[20] = ord("{")
    elif damage == "length field":
        raw[:8] = (2**62).to_bytes(8, "little")
    else:
        raw = b"PK\x03\x04" + bytes(raw[4:])
    base.write_bytes(bytes(raw))
    lora = _kohya(tmp_path / "l.safetensors")
    _refused(cli("bake", base, lora, "-o", tmp_path / "o.safetensors", "--family", "sd1"), "base.safetensors")
    _refused(cli("extract", good, base, "-o", tmp_path / "x.safetensors", "--rank", "2", "--family", "sd1"),
             "base.safetensors")
    assert not (tmp_path / "o.safetensors").exists() and not (tmp_path / "x.safetensors").exists()


def test_a_bake_that_overflows_the_base_dtype_is_refused(tmp_path, cli):
    """fp16 base weights near 6e4 plus a ΔW of 1e4 do not fit fp16: the checkpoint would hold Inf."""
    base = _sd1_base(tmp_path / "base.safetensors")
    weights = load_file(str(base))
    weights["model.diffusion_model.input_blocks.1.1.proj_in.weight"][:] = 6e4
    save_file(weights, str(base))
    lora = _kohya(tmp_path / "l.safetensors", up=np.full((320, 4), 2500.0), down=np.ones((4, 320)))
    out = tmp_path / "o.safetensors"
    _refused(cli("bake", base, lora, "-o", out, "--family", "sd1"), "base.safetensors",
             "down_blocks_0_attentions_0_proj_in", "beyond float16's range", "--dtype")
    assert not out.exists()
    assert cli("bake", base, lora, "-o", out, "--family", "sd1", "--dtype", "fp32")[0] == 0


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("name", ["base.safetensors", "base.ckpt", "base.bin"])
def test_a_pickle_given_as_a_base_is_refused_as_a_pickle_and_never_runs(tmp_path, cli, name):
    """Not 'header too large (578712552184433488 bytes)': bases are read as safetensors only, and a pickle says so."""
    import pickle

    marker = tmp_path / "ran"
    base = tmp_path / name
    base.write_bytes(pickle.dumps({"state_dict": _Exploit(marker)}, protocol=4))
    good = _sd1_base(tmp_path / "good.safetensors")
    lora = _kohya(tmp_path / "l.safetensors")
    for args in (["bake", base, lora, "-o", tmp_path / "o.safetensors"],
                 ["extract", base, good, "-o", tmp_path / "x.safetensors", "--rank", "2"],
                 ["extract", good, base, "-o", tmp_path / "x.safetensors", "--rank", "2"]):
        _refused(cli(*args, "--family", "sd1"), name, "pickled checkpoint")
    assert not marker.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name, "good.safetensors", "l.safetensors"])


def test_a_pickle_inside_a_base_folder_is_named_as_a_pickle(tmp_path, cli):
    """Not 'header too large (578712552184433488 bytes)': the first bytes of a torch.save file say what it is."""
    import torch

    folder = tmp_path / "base" / "unet"
    folder.mkdir(parents=True)
    torch.save({"input_blocks.1.1.proj_in.weight": torch.zeros(320, 320, 1, 1)},
               str(folder / "diffusion_pytorch_model.safetensors"))
    good = _sd1_base(tmp_path / "good.safetensors")
    lora = _kohya(tmp_path / "l.safetensors")
    _refused(cli("bake", tmp_path / "base", lora, "-o", tmp_path / "o", "--family", "sd1"),
             "diffusion_pytorch_model.safetensors", "pickled checkpoint")
    _refused(cli("extract", good, tmp_path / "base", "-o", tmp_path / "x.safetensors", "--rank", "2",
                 "--family", "sd1"), "diffusion_pytorch_model.safetensors", "pickled checkpoint")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "good.safetensors", "l.safetensors"]


def test_a_nan_in_a_checkpoint_given_to_extract_is_one_line(tmp_path, cli):
    base = _sd1_base(tmp_path / "base.safetensors")
    tuned = tmp_path / "tuned.safetensors"
    weights = load_file(str(base))
    key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    weights[key] = weights[key] + np.float16(0.5)
    weights[key][7, 7] = np.nan
    save_file(weights, str(tuned))
    _refused(cli("extract", base, tuned, "-o", tmp_path / "x.safetensors", "--rank", "2", "--family", "sd1"),
             "tuned.safetensors", "attn2.to_k", "NaN or Inf")
    assert not (tmp_path / "x.safetensors").exists()


def test_hostile_lycoris_factors_name_the_module(tmp_path, cli):
    rng = np.random.default_rng(5)
    stem = "lora_unet_down_blocks_0_attentions_0_proj_in"
    src = tmp_path / "loha.safetensors"
    save_file({f"{stem}.hada_w1_a": rng.standard_normal((320, 4)).astype(np.float16),
               f"{stem}.hada_w1_b": rng.standard_normal((4, 320)).astype(np.float16),
               f"{stem}.hada_w2_a": rng.standard_normal((320, 8)).astype(np.float16),
               f"{stem}.hada_w2_b": rng.standard_normal((4, 320)).astype(np.float16),  # rank 8 vs 4
               f"{stem}.alpha": np.asarray(4.0, np.float32)}, str(src), META)
    _refused(cli("resize", src, "--rank", "2", "--lossy-rank", "4", "-o", tmp_path / "o.safetensors"),
             "down_blocks_0_attentions_0_proj_in")


def test_a_bad_file_in_a_parallel_batch_fails_alone(tmp_path, cli):
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(3):
        _kohya(folder / f"ok{i}.safetensors")
    (folder / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    _kohya(folder / "nan.safetensors", alpha=math.nan)
    _kohya(folder / "two_alphas.safetensors", alpha=np.array([1.0, 2.0]))
    _kohya(folder / "huge_fold.safetensors", alpha=3e38)  # alpha/r folded into fp16 factors: Inf
    code, lines = cli("convert", folder, "--to", "diffusers", "-o", f"{tmp_path}/out/", "--jobs", "2")
    assert code == 1, lines
    for bad in ("broken", "nan", "two_alphas", "huge_fold"):
        assert len([line for line in lines if f"{bad}.safetensors" in line and "error" in line.lower()]) == 1, lines
    assert "Traceback" not in "\n".join(lines)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [f"ok{i}.diffusers.safetensors" for i in range(3)], lines
