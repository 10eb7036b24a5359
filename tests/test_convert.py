"""convert + verify: exact round trips over the real layouts, fusing/splitting, writer rules, bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from synth import layout, lora_layouts, synthesize, write_peft_folder

import loratools
from loratools.cli import cli
from loratools.errors import FormatError, LoraToolsError, UnknownFamily, UsageError
from loratools.io.reader import SafetensorsFile
from loratools.io.writer import write_safetensors

TARGETS = ("kohya", "diffusers", "peft", "comfy")
CONVERTIBLE = ("sd15", "sd2", "sdxl", "flux1")  # layout families with naming tables and shapes


def convertible(name: str) -> bool:
    lay = layout(name)
    keys = lay["tensors"]
    lora_only = all(not any(s in k for s in ("lokr_", "hada_", "dora_scale", ".diff", ".scale", "lora_B.bias"))
                    for k in keys)
    return lay["family"] in CONVERTIBLE and lora_only and lay["format"] not in ("cloneofsimo", "xlabs", "malformed")


ROUND_TRIPS = [n for n in lora_layouts() if convertible(n)]


@pytest.fixture(scope="module")
def f32_layout(tmp_path_factory):
    cache, folder = {}, tmp_path_factory.mktemp("f32")

    def make(name):
        if name not in cache:
            rank = 4 if layout(name)["family"] in ("sd15", "sd2") else 2  # sd1/sd2 configs say r=4
            cache[name] = synthesize(name, folder / (name[:-5] + ".safetensors"), dtype="F32", seed=3, rank=rank)
        return cache[name]

    return make


@pytest.mark.parametrize("name", ROUND_TRIPS)
@pytest.mark.parametrize("to", TARGETS)
def test_round_trip_is_exact(name, to, f32_layout, tmp_path):
    src = f32_layout(name)
    with loratools.load(src) as lora:
        source_format = "kohya" if lora.format in ("kohya", "lycoris", "onetrainer") else (
            "diffusers" if lora.format == "diffusers_legacy" else lora.format)
    out = loratools.convert(src, to, f"{tmp_path}/out/")
    assert loratools.verify(src, out.output, rtol=1e-6).equal
    back = loratools.convert(out.output, source_format, f"{tmp_path}/back/")
    v = loratools.verify(src, back.output, rtol=1e-6)
    assert v.equal and not v.only_in_a and not v.only_in_b and v.max_rel_error < 1e-6


def test_diffusers_folds_a_power_of_two_into_the_smaller_factor(tmp_path):
    """alpha = rank/2: the scale goes whole onto the factor with fewer values, bit-exactly (the stored bits with
    the exponent moved), and the other factor is the stored one. Any other scale is split as diffusers splits it."""
    rng = np.random.default_rng(0)
    r, stem = 8, "lora_unet_input_blocks_1_1_transformer_blocks_0_"
    shapes = {"ff_net_0_proj": (320, 2560), "ff_net_2": (1280, 320), "attn1_to_q": (320, 320)}  # (in, out)
    items = []
    for block, alpha in (("1_1", 4.0), ("2_1", 3.0)):  # scale 1/2, and 3/8 in a second block
        for name, (i, o) in shapes.items():
            key = f"lora_unet_input_blocks_{block}_transformer_blocks_0_{name}"
            items += [(f"{key}.alpha", "F16", (), np.array(alpha, np.float16)),
                      (f"{key}.lora_down.weight", "F16", (r, i), (rng.standard_normal((r, i)) * 0.02).astype(np.float16)),
                      (f"{key}.lora_up.weight", "F16", (o, r), (rng.standard_normal((o, r)) * 0.02).astype(np.float16))]
    write_safetensors(tmp_path / "k.safetensors", items, {"ss_base_model_version": "sd_v1"})
    out = loratools.convert(tmp_path / "k.safetensors", "diffusers", tmp_path / "d.safetensors", family="sd1").output
    src = {name: torch.from_numpy(np.asarray(data)) for name, _, _, data in items}
    with SafetensorsFile(out) as f:
        got = {k: f.torch(k) for k in f.keys()}
    names = {"ff_net_0_proj": "ff.net.0.proj", "ff_net_2": "ff.net.2", "attn1_to_q": "attn1.to_q"}
    for name, dotted in names.items():
        a = got[f"unet.down_blocks.0.attentions.0.transformer_blocks.0.{dotted}.lora_A.weight"]
        b = got[f"unet.down_blocks.0.attentions.0.transformer_blocks.0.{dotted}.lora_B.weight"]
        down, up = src[f"{stem}{name}.lora_down.weight"], src[f"{stem}{name}.lora_up.weight"]
        if down.numel() <= up.numel():
            assert torch.equal(a, down * 0.5) and torch.equal(b, up)
        else:
            assert torch.equal(a, down) and torch.equal(b, up * 0.5)
    assert loratools.verify(tmp_path / "k.safetensors", out, rtol=1e-3).equal  # 3/8 split in float: rounded


def _keys(path):
    with SafetensorsFile(path) as f:
        return set(f.keys()), dict(f.metadata)


def test_kohya_flux_to_diffusers_splits_fused_weights(f32_layout, tmp_path):
    src = f32_layout("flux1__kohya__invokeai-pokemon.json")
    out = loratools.convert(src, "diffusers", tmp_path / "x.safetensors")
    keys, meta = _keys(out.output)
    assert not any(k.endswith(".alpha") for k in keys)  # diffusers: alpha folded into the factors
    assert "transformer.single_transformer_blocks.0.proj_mlp.lora_B.weight" in keys
    assert "transformer.transformer_blocks.0.attn.add_k_proj.lora_A.weight" in keys
    with SafetensorsFile(src) as s, SafetensorsFile(out.output) as d:
        fused = s.torch("lora_unet_single_blocks_0_linear1.lora_up.weight")  # [21504, r]
        q = d.torch("transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight")
        mlp = d.torch("transformer.single_transformer_blocks.0.proj_mlp.lora_B.weight")
        scale = s.numpy("lora_unet_single_blocks_0_linear1.alpha").item() / fused.shape[1]
        _, up = _fold(scale)
        assert torch.equal(q, fused[:3072] * up) and torch.equal(mlp, fused[9216:] * up)
    assert meta["modelspec.architecture"] == "flux-1-dev/lora" and meta["loratools.source_format"] == "kohya"


def _fold(scale):
    down, up = scale, 1.0
    while down * 2 < up:
        down, up = down * 2, up / 2
    return down, up


def test_partial_parts_fuse_with_zero_rows(f32_layout, tmp_path):
    """A diffusers Flux LoRA without proj_mlp fuses into linear1 with zero MLP rows, exactly."""
    src = f32_layout("flux1__diffusers__invokeai-no-proj-mlp.json")
    out = loratools.convert(src, "kohya", tmp_path / "k.safetensors")
    with SafetensorsFile(out.output) as k:
        up = k.torch("lora_unet_single_blocks_0_linear1.lora_up.weight")
        assert up.shape[0] == 21504 and not up[9216:].any()
    assert loratools.verify(src, out.output, rtol=1e-6).equal


def test_norm_out_halves_are_swapped(f32_layout, tmp_path):
    src = f32_layout("flux1__diffusers__invokeai-hyper-norm-out.json")
    out = loratools.convert(src, "comfy", tmp_path / "c.safetensors")
    with SafetensorsFile(src) as s, SafetensorsFile(out.output) as c:
        b = s.torch("transformer.norm_out.linear.lora_B.weight")
        bfl = c.torch("diffusion_model.final_layer.adaLN_modulation.1.lora_up.weight")
        half = b.shape[0] // 2
        assert torch.equal(bfl, torch.cat([b[half:], b[:half]]))
    assert loratools.verify(src, out.output, rtol=1e-6).equal


def test_peft_folder_config_has_patterns_for_mixed_ranks(tmp_path):
    rng = np.random.default_rng(0)
    items = []
    for stem, r, alpha in (("lora_unet_down_blocks_0_attentions_0_proj_in", 4, 2.0),
                           ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", 8, 8.0),
                           ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k", 4, 2.0)):
        conv = "proj_in" in stem
        items += [(f"{stem}.lora_down.weight", "F32", (r, 320, 1, 1) if conv else (r, 320),
                   rng.standard_normal((r, 320, 1, 1) if conv else (r, 320)).astype(np.float32)),
                  (f"{stem}.lora_up.weight", "F32", (320, r, 1, 1) if conv else (320, r),
                   rng.standard_normal((320, r, 1, 1) if conv else (320, r)).astype(np.float32)),
                  (f"{stem}.alpha", "F32", (), np.array(alpha, np.float32))]
    src = tmp_path / "mixed.safetensors"
    write_safetensors(src, items)
    out = loratools.convert(src, "peft", tmp_path / "mixed.peft", family="sd1")
    cfg = json.loads((tmp_path / "mixed.peft" / "unet" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 2.0
    assert cfg["rank_pattern"] == {"^down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": 8}
    assert cfg["alpha_pattern"] == {"^down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": 8.0}
    assert "down_blocks.0.attentions.0.proj_in" in cfg["target_modules"]
    with SafetensorsFile(tmp_path / "mixed.peft" / "unet" / "adapter_model.safetensors") as f:
        assert f.info("base_model.model.down_blocks.0.attentions.0.proj_in.lora_A.weight").shape == (4, 320, 1, 1)
    assert loratools.verify(src, out.output, rtol=1e-6, family="sd1").equal


def _sd3_kohya(path, hidden=64, blocks=2, rank=4):
    """A tiny SD3 kohya LoRA (SAI names, fused qkv): real names, dims of a tiny test model."""
    rng = np.random.default_rng(1)
    items = []

    def mod(stem, out_f, in_f):
        items.extend([(f"lora_unet_{stem}.lora_down.weight", "F32", (rank, in_f),
                       rng.standard_normal((rank, in_f)).astype(np.float32)),
                      (f"lora_unet_{stem}.lora_up.weight", "F32", (out_f, rank),
                       rng.standard_normal((out_f, rank)).astype(np.float32)),
                      (f"lora_unet_{stem}.alpha", "F32", (), np.array(2.0, np.float32))])

    for i in range(blocks):
        for side in ("x_block", "context_block"):
            mod(f"joint_blocks_{i}_{side}_attn_qkv", 3 * hidden, hidden)
            mod(f"joint_blocks_{i}_{side}_attn_proj", hidden, hidden)
            last = side == "context_block" and i == blocks - 1
            mod(f"joint_blocks_{i}_{side}_adaLN_modulation_1", (2 if last else 6) * hidden, hidden)
    mod("final_layer_adaLN_modulation_1", 2 * hidden, hidden)
    write_safetensors(path, items)
    return path


@pytest.mark.parametrize("to", TARGETS)
def test_sd3_tiny_dims_convert_exactly(to, tmp_path):
    src = _sd3_kohya(tmp_path / "sd3.safetensors")
    out = loratools.convert(src, to, f"{tmp_path}/o/", family="sd3")
    assert loratools.verify(src, out.output, rtol=1e-6, family="sd3").equal
    back = loratools.convert(out.output, "kohya", f"{tmp_path}/b/", family="sd3")
    assert loratools.verify(src, back.output, rtol=1e-6, family="sd3").equal
    if to == "diffusers":
        keys, _ = _keys(out.output)
        assert "transformer.transformer_blocks.1.norm1_context.linear.lora_B.weight" in keys
        assert "transformer.transformer_blocks.0.attn.add_v_proj.lora_A.weight" in keys


def test_fused_parts_with_different_alphas_fuse_block_diagonally(tmp_path):
    rng = np.random.default_rng(2)
    items, h = [], 32
    for k, (part, r) in enumerate((("to_q", 2), ("to_k", 3), ("to_v", 4))):
        items += [(f"transformer.transformer_blocks.0.attn.{part}.lora_A.weight", "F32", (r, h),
                   rng.standard_normal((r, h)).astype(np.float32)),
                  (f"transformer.transformer_blocks.0.attn.{part}.lora_B.weight", "F32", (h, r),
                   rng.standard_normal((h, r)).astype(np.float32))]
    src = tmp_path / "d.safetensors"
    write_safetensors(src, items)
    out = loratools.convert(src, "kohya", tmp_path / "k.safetensors", family="flux1")
    with SafetensorsFile(out.output) as f:
        assert f.info("lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight").shape == (3 * h, 9)
        assert f.numpy("lora_unet_double_blocks_0_img_attn_qkv.alpha").item() == 9.0
    assert loratools.verify(src, out.output, rtol=1e-6, family="flux1").equal


def test_metadata_kept_and_stale_hashes_dropped(tmp_path):
    src = synthesize("sdxl__kohya__invokeai-slider-keys-only.json", tmp_path / "s.safetensors",
                     metadata={"ss_network_dim": "4", "sshs_model_hash": "abc", "modelspec.title": "t"})
    out = loratools.convert(src, "comfy", tmp_path / "c.safetensors")
    _, meta = _keys(out.output)
    assert meta["ss_network_dim"] == "4" and meta["modelspec.title"] == "t" and "sshs_model_hash" not in meta
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["loratools.operation"] == "convert" and meta["loratools.family"] == "sdxl"


def test_existing_output_is_refused_and_overwrite_replaces(tmp_path, f32_layout):
    src = f32_layout("sd15__kohya__safetensorsutil-keys-only.json")
    dest = tmp_path / "o.safetensors"
    dest.write_bytes(b"keep me")
    with pytest.raises(LoraToolsError, match="output exists; pass --overwrite"):
        loratools.convert(src, "diffusers", dest)
    assert dest.read_bytes() == b"keep me"
    loratools.convert(src, "diffusers", dest, overwrite=True)
    assert loratools.verify(src, dest).equal


def test_interrupted_conversion_leaves_nothing(tmp_path, f32_layout, monkeypatch):
    from loratools.io import writer

    src = f32_layout("flux1__kohya__invokeai-pokemon.json")
    calls = {"n": 0}
    real = writer._Output.write

    def flaky(self, data):
        calls["n"] += 1
        if calls["n"] > 50:
            raise KeyboardInterrupt
        return real(self, data)

    monkeypatch.setattr(writer._Output, "write", flaky)
    for target in ("diffusers", "kohya"):
        calls["n"] = 0
        with pytest.raises(KeyboardInterrupt):
            loratools.convert(src, target, tmp_path / "out" / "x.safetensors")
        assert not (tmp_path / "out").exists()  # not even the folder -o asked for


def test_wrong_family_lists_unmatched_modules(tmp_path, f32_layout):
    src = f32_layout("sdxl__kohya__invokeai-slider-keys-only.json")
    with pytest.raises(FormatError, match=r"280 modules are not in the flux1 tables: .*is the family right"):
        loratools.convert(src, "diffusers", tmp_path / "x.safetensors", family="flux1")
    with pytest.raises(UnknownFamily, match="did you mean 'sdxl'"):
        loratools.convert(src, "diffusers", tmp_path / "x.safetensors", family="sdxll")
    assert not (tmp_path / "x.safetensors").exists()


def test_unsupported_adapter_types_are_refused(tmp_path, layout_file):
    with pytest.raises(FormatError, match="cannot convert lokr modules exactly"):
        loratools.convert(layout_file("sd15__lycoris_lokr__lycoris-smartfalcon-f4.json"), "kohya", tmp_path / "x")


def test_conflicting_duplicate_keys(tmp_path):
    """The same module twice, once kohya-named and once diffusers-named: refused, not silently merged."""
    a, b = np.ones((2, 320), np.float32), np.ones((320, 2), np.float32)
    kohya = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    dotted = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    write_safetensors(tmp_path / "dup.safetensors", [
        (f"{kohya}.lora_down.weight", "F32", a.shape, a), (f"{kohya}.lora_up.weight", "F32", b.shape, b),
        (f"{dotted}.lora_A.weight", "F32", a.shape, a), (f"{dotted}.lora_B.weight", "F32", b.shape, b)])
    with pytest.raises(FormatError, match="both adapt input_blocks.1.1.transformer_blocks.0.attn1.to_q"):
        loratools.convert(tmp_path / "dup.safetensors", "kohya", tmp_path / "x.safetensors", family="sd1")
    assert not (tmp_path / "x.safetensors").exists()


def test_peft_config_that_disagrees_with_tensors(tmp_path):
    folder = write_peft_folder("sd15__peft__faithsang.json", tmp_path / "adapter", rank=2)  # config says r=4
    r = subprocess.run([sys.executable, "-m", "loratools", "convert", str(folder), "--to", "kohya"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "contradicts itself" in r.stderr and "says rank 4, the tensors have rank 2" in r.stderr
    assert not (tmp_path / "adapter.kohya.safetensors").exists()


def test_cli_batch_with_a_bad_file(tmp_path, f32_layout):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in ("sd15__kohya__safetensorsutil-keys-only.json", "sdxl__kohya__invokeai-slider-keys-only.json"):
        synthesize(name, inputs / (name[:4] + ".safetensors"))
    (inputs / "broken.safetensors").write_bytes(b"\x00" * 3)
    res = CliRunner().invoke(cli, ["convert", str(inputs), "--to", "diffusers", "-o", str(tmp_path / "out"),
                                   "--json", "--jobs", "2"])
    assert res.exit_code == 1
    report = json.loads(res.stdout)
    assert sorted(r["ok"] for r in report) == [False, True, True]
    assert sorted(os.listdir(tmp_path / "out")) == ["sd15.diffusers.safetensors", "sdxl.diffusers.safetensors"]


def test_a_folder_converts_into_the_same_subfolders_and_colliding_outputs_are_refused(tmp_path):
    """Files of one name in different subfolders keep apart under -o; two inputs that would still meet at one
    output are refused before anything is written."""
    tree = tmp_path / "tree"
    for sub, seed in (("a", 1), ("b", 2)):
        (tree / sub).mkdir(parents=True)
        synthesize("sd15__kohya__safetensorsutil-keys-only.json", tree / sub / "x.safetensors", seed=seed)
    synthesize("sdxl__kohya__invokeai-slider-keys-only.json", tree / "top.safetensors")
    res = CliRunner().invoke(cli, ["convert", str(tree), "--to", "comfy", "-o", str(tmp_path / "out"), "--json"])
    assert res.exit_code == 0, res.output
    got = sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*.safetensors"))
    assert got == [os.path.join("a", "x.comfy.safetensors"), os.path.join("b", "x.comfy.safetensors"),
                   "top.comfy.safetensors"]
    for sub in ("a", "b"):  # each output is its own input's conversion
        assert loratools.verify(tree / sub / "x.safetensors", tmp_path / "out" / sub / "x.comfy.safetensors").equal
    res = CliRunner().invoke(cli, ["convert", str(tree / "a" / "x.safetensors"), str(tree / "b" / "x.safetensors"),
                                   "--to", "comfy", "-o", str(tmp_path / "flat")])
    assert isinstance(res.exception, UsageError) and "would both be written to" in str(res.exception)  # exit 2
    assert not (tmp_path / "flat").exists()


def test_cli_reports_one_file_in_a_line_and_many_in_a_table(tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in ("sd15__kohya__safetensorsutil-keys-only.json", "sdxl__kohya__invokeai-slider-keys-only.json"):
        synthesize(name, inputs / (name[:4] + ".safetensors"))
    one = CliRunner().invoke(cli, ["convert", str(inputs / "sd15.safetensors"), "--to", "comfy"])
    assert one.exit_code == 0
    assert one.stdout.count("\n") == 1
    assert one.stdout.startswith(f"{inputs / 'sd15.safetensors'} -> {inputs / 'sd15.comfy.safetensors'} (sd1, "
                                 "kohya -> comfy, ")
    many = CliRunner().invoke(cli, ["convert", str(inputs / "sd15.safetensors"), str(inputs / "sdxl.safetensors"),
                                    "--to", "peft", "-o", str(tmp_path / "out")])
    assert many.exit_code == 0
    assert "2 converted, 0 failed" in many.stdout and "sdxl" in many.stdout


def test_cli_verify_exit_codes(tmp_path, f32_layout):
    a = f32_layout("sd15__kohya__safetensorsutil-keys-only.json")
    b = synthesize("sd15__kohya__safetensorsutil-keys-only.json", tmp_path / "other.safetensors", dtype="F32", seed=9)
    runner = CliRunner()
    same = runner.invoke(cli, ["verify", str(a), str(a), "--json"])
    assert same.exit_code == 0 and json.loads(same.stdout)["equal"] is True
    diff = runner.invoke(cli, ["verify", str(a), str(b)])
    assert diff.exit_code == 1 and "DIFFERENT" in diff.stdout


# --- NaN, Inf and zero: the bit tests of the checks and writers ---------------------------------------------

_TORCH_OF = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
             "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


@pytest.mark.parametrize("dtype", list(_TORCH_OF))
def test_the_finite_and_zero_tests_agree_with_the_values_on_every_bit_pattern(dtype):
    """Every 8- and 16-bit pattern, and for the wider dtypes every exponent-all-ones pattern class plus random
    ones: finite values pass together, and each non-finite one is found wherever it sits among finite ones; only
    the two zeros count as zero."""
    from loratools.io.arrays import all_finite, any_nonzero

    width = torch.tensor([], dtype=_TORCH_OF[dtype]).element_size()
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[width]
    rng = np.random.default_rng(5)
    if width <= 2:
        patterns = np.arange(2 ** (8 * width), dtype=np.uint64)
    else:  # random patterns, and the all-ones exponent with random mantissas and both signs
        mant = 52 if width == 8 else 23
        top = ((1 << (8 * width - 1 - mant)) - 1) << mant
        tail = rng.integers(0, 1 << mant, 2000, dtype=np.uint64)
        tail[:2] = 0  # the infinities
        specials = np.concatenate([tail | np.uint64(top), tail | np.uint64(top | (1 << (8 * width - 1)))])
        zeros = np.array([0, 1 << (8 * width - 1)], dtype=np.uint64)
        patterns = np.concatenate([rng.integers(1, 2 ** 63, 200_000, dtype=np.uint64), specials, zeros])
    values = torch.from_numpy(patterns.astype(f"<u{width}").view(np.dtype(f"<i{width}") if width > 1 else np.uint8))
    typed = values.view(ints).view(_TORCH_OF[dtype])
    finite = torch.isfinite(typed.float() if width == 1 else typed).numpy()  # float8: no isfinite of its own
    raw = patterns.astype(f"<u{width}")
    assert all_finite(raw[finite].tobytes(), dtype)
    bad = raw[~finite]
    assert bad.size > 0
    clean = raw[finite][:64]
    for k, pattern in enumerate(bad):
        buf = clean.copy()
        buf[k % clean.size] = pattern
        assert not all_finite(buf.tobytes(), dtype), hex(int(pattern))
    # and the zero test the writers use on scaled factors: only +0 and -0 are zero
    zero = ((typed.float() if width == 1 else typed) == 0).numpy()
    assert not any_nonzero(raw[zero].tobytes(), dtype) and zero.sum() == 2
    for pattern in raw[~zero][:: max(1, int((~zero).sum()) // 3000)]:
        assert any_nonzero(np.concatenate([raw[zero], [pattern], raw[zero]]).tobytes(), dtype), hex(int(pattern))


# --- NaN and Inf in a conversion: the writer tests each tensor's bytes on their way out ---------------------


@pytest.mark.parametrize("whole", [32 << 20, 0], ids=["assembled", "streamed"])
def test_the_writer_refuses_nan_wherever_it_lies_and_publishes_nothing(tmp_path, monkeypatch, whole):
    """A copied tensor is tested piece by piece as it is read (the NaN sits past the first piece); a computed one
    as it is; in a small file assembled in memory, the tensor named is the one that holds it, among tensors of
    one dtype tested together; a clean file is the same bytes with or without the test; nothing is left behind
    on refusal."""
    from loratools.io import writer as writer_mod
    from loratools.io.writer import NonFinite

    monkeypatch.setattr(writer_mod, "_WHOLE", whole)

    big = np.zeros(700_000, np.float16)  # 1.4 MB: more than one piece
    big[650_000] = np.nan
    write_safetensors(tmp_path / "src.safetensors", [("big", "F16", big.shape, big),
                                                      ("ok", "F16", (3,), np.ones(3, np.float16))])
    with SafetensorsFile(tmp_path / "src.safetensors") as f:
        spans = f.spans("big", [(0, big.nbytes)])
        ones = [(f"ones{i}", "F16", (3,), np.ones(3, np.float16)) for i in range(3)]
        for items in ([("copied", "F16", big.shape, spans)],
                      [("computed", "F32", (2,), np.array([1.0, np.inf], np.float32))],
                      [ones[0], ("copied", "F16", big.shape, spans), *ones[1:]]):
            with pytest.raises(NonFinite) as err:
                write_safetensors(tmp_path / "out.safetensors", items, finite=True)
            assert err.value.tensor == next(it[0] for it in items if it[0] in ("copied", "computed"))
            assert os.listdir(tmp_path) == ["src.safetensors"]
        write_safetensors(tmp_path / "raw.safetensors", [("copied", "F16", big.shape, spans)])
        with SafetensorsFile(tmp_path / "raw.safetensors") as raw:
            assert np.isnan(raw.numpy("copied")[650_000])
        ok = [("a", "F16", (3,), f.spans("ok", [(0, 6)])), ("b", "F32", (1,), np.ones(1, np.float32))]
        write_safetensors(tmp_path / "tested.safetensors", ok, finite=True)
        write_safetensors(tmp_path / "plain.safetensors", ok)
    assert (tmp_path / "tested.safetensors").read_bytes() == (tmp_path / "plain.safetensors").read_bytes()


def _sd1_kohya(path, up_dtype=np.float16, **values):
    """Two sd1 modules; ``values`` sets single entries of their factors (``down0=np.nan``: module 0's lora_down)."""
    rng = np.random.default_rng(0)
    items = []
    for i, stem in enumerate(("lora_unet_down_blocks_0_attentions_0_proj_in",
                              "lora_unet_down_blocks_0_attentions_0_proj_out")):
        down = rng.standard_normal((4, 320)).astype(np.float16)
        up = rng.standard_normal((320, 4)).astype(up_dtype)
        if f"down{i}" in values:
            down[1, 7] = values[f"down{i}"]
        if f"up{i}" in values:
            up[5, 2] = values[f"up{i}"]
        items += [(f"{stem}.alpha", "F16", (), np.array(2.0, np.float16)),
                  (f"{stem}.lora_down.weight", "F16", down.shape, down),
                  (f"{stem}.lora_up.weight", "F16" if up_dtype == np.float16 else "F32", up.shape, up)]
    write_safetensors(path, items, {"ss_base_model_version": "sd_v1"})
    return path


@pytest.mark.parametrize("to", TARGETS)
def test_nan_and_inf_are_refused_by_every_target_without_a_trace(tmp_path, to):
    """Copied (kohya, comfy), scaled (diffusers) and re-laid-out (PEFT) factors alike: one line naming the modules,
    no output, and not even the folders -o asked for; --allow-nonfinite writes the values unchanged."""
    src = _sd1_kohya(tmp_path / "bad.safetensors", down0=np.nan, up1=-np.inf)
    with pytest.raises(FormatError, match=r"2 modules hold NaN or Inf: .*proj_in.*proj_out.*--allow-nonfinite"):
        loratools.convert(src, to, f"{tmp_path}/new/sub/")
    assert not (tmp_path / "new").exists()
    out = loratools.convert(src, to, f"{tmp_path}/new/sub/", allow_nonfinite=True).output
    files = [out] if os.path.isfile(out) else sorted(str(p) for p in Path(out).rglob("*.safetensors"))
    with SafetensorsFile(files[0]) as f:
        values = np.concatenate([f.numpy(k).astype(np.float64).ravel() for k in f.keys()])
    assert np.isnan(values).sum() == 1 and np.isneginf(values).sum() == 1


def test_convert_prints_its_warnings(tmp_path):
    """A mixed-alpha kohya file is written with a warning: on stderr, not only in --json."""
    src = synthesize("sd15__kohya__safetensorsutil-keys-only.json", tmp_path / "r16.safetensors", rank=16)
    with loratools.load(src) as lora:
        small, _ = loratools.resize(lora, dynamic="sv_fro:0.9")
        loratools.save(small, tmp_path / "mixed.safetensors")
    with loratools.load(tmp_path / "mixed.safetensors") as lora:
        assert len({m.alpha for m in lora.modules}) > 1
    r = subprocess.run([sys.executable, "-m", "loratools", "convert", str(tmp_path / "mixed.safetensors"), "--to",
                        "kohya", "-o", str(tmp_path / "k.safetensors")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stderr.startswith(f"loratools: warning: {tmp_path / 'mixed.safetensors'}: modules have different alphas")
    assert "--uniform-alpha" in r.stderr and r.stdout.count("\n") == 1


def test_the_alpha_warning_only_for_files_that_store_alphas(tmp_path):
    """FLUX.2's comfy files fold every scale into lora_A/lora_B (no .alpha): nothing for a loader to misread there;
    its kohya files keep one alpha per module, and the fused qkv's differs from the rest."""
    from safetensors.torch import save_file

    g, h = torch.Generator().manual_seed(1), 64
    d = {}
    for name, out_dim in [(f"transformer_blocks.0.attn.to_{p}", h) for p in "qkv"] + [("norm_out.linear", 2 * h)]:
        d[f"transformer.{name}.lora_A.weight"] = torch.randn(4, h, generator=g) * 0.1
        d[f"transformer.{name}.lora_B.weight"] = torch.randn(out_dim, 4, generator=g) * 0.1
        d[f"transformer.{name}.alpha"] = torch.tensor(3.0)
    save_file(d, tmp_path / "y.safetensors")
    comfy = loratools.convert(tmp_path / "y.safetensors", to="comfy", family="flux2", output=tmp_path / "c.safetensors")
    assert not any("different alphas" in w for w in comfy.warnings)
    assert not any(k.endswith(".alpha") for k in SafetensorsFile(comfy.output).keys())
    kohya = loratools.convert(tmp_path / "y.safetensors", to="kohya", family="flux2", output=tmp_path / "k.safetensors")
    assert any("different alphas" in w for w in kohya.warnings)
