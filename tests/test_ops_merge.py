"""merge: exact concatenation and optimal SVD truncation, against dense float64 weighted sums."""

import pytest
import torch

import loratools
from loratools.adapters import LoRA, Norm
from loratools.errors import ShapeMismatch, UsageError
from loratools.model import MemorySource
from loratools.ops.merge import merge
from synth import synthesize
from test_ops_resize import (DEVICES, F64, assert_rows_match, dense, loha, lora_of, make_module, mixed_modules, one_per_shape,  # noqa: F401
                             optimal_error, rand_lora, small_batches, svdvals)  # (small_batches: a fixture)


def weighted_sum(pairs):
    return sum(w * dense(m) for m, w in pairs)


@pytest.mark.parametrize("kernel", [(), (3, 3)])
def test_concat_is_the_exact_weighted_sum(kernel):
    a = rand_lora(24, 10, 4, kernel, alpha=2.0, seed=1)
    b = rand_lora(24, 10, 16, kernel, alpha=16.0, rslora=True, seed=2)
    c = rand_lora(24, 10, 1, kernel, seed=3)  # no alpha: scale 1
    items = [(lora_of(a), 0.7), (lora_of(b), -1.3), (lora_of(c), 2.0)]
    out, report = merge(items)
    m = out.modules[0]
    assert isinstance(m.adapter, LoRA) and m.rank == 21 and m.alpha == 21 and m.scale == 1.0
    assert m.adapter.down.shape == (21, 10, *kernel) and m.adapter.up.dtype == "F64"
    ref = weighted_sum([(a, 0.7), (b, -1.3), (c, 2.0)])
    torch.testing.assert_close(dense(m), ref, rtol=1e-6, atol=1e-9 * float(ref.abs().max()))
    row = report["modules"][0]
    assert row["action"] == "concat" and row["ranks"] == [4, 16, 1] and row["sources"] == [0, 1, 2]
    assert (row["rank"], row["retained"], row["error"]) == (21, 1.0, 0.0)


@pytest.mark.parametrize("k", [1, 5, 12])
def test_svd_merge_is_the_optimal_truncation_of_the_sum(k):
    a, b = rand_lora(40, 30, 8, alpha=4.0, seed=4), rand_lora(40, 30, 8, alpha=8.0, seed=5)
    out, report = merge([(lora_of(a), 1.0), (lora_of(b), 0.5)], method="svd", rank=k)
    m, row = out.modules[0], report["modules"][0]
    ref = weighted_sum([(a, 1.0), (b, 0.5)])
    assert m.rank == k and m.alpha == k and m.scale == 1.0
    s_ref = svdvals(ref)
    torch.testing.assert_close(svdvals(dense(m))[:k], s_ref[:k], rtol=1e-6, atol=1e-9)
    assert float((ref - dense(m)).norm()) == pytest.approx(optimal_error(ref, k), rel=1e-6)
    assert row["error"] == pytest.approx(optimal_error(ref, k) / float(ref.norm()), rel=1e-6)
    assert row["retained"] == pytest.approx(float(s_ref[:k].pow(2).sum() / s_ref.pow(2).sum()), rel=1e-9)


def test_svd_merge_dynamic_and_cap():
    a, b = rand_lora(40, 30, 8, seed=6), rand_lora(40, 30, 8, seed=7)
    items = [(lora_of(a), 1.0), (lora_of(b), 1.0)]
    s = svdvals(weighted_sum([(a, 1.0), (b, 1.0)]))
    energy = (s.pow(2).cumsum(0) / s.pow(2).sum()).tolist()
    want = next(i + 1 for i, e in enumerate(energy) if e >= 0.8)
    assert merge(items, method="svd", dynamic="sv_fro:0.8")[0].modules[0].rank == want
    assert merge(items, method="svd", dynamic="sv_fro:0.8", max_rank=2)[0].modules[0].rank == min(2, want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kwargs", [{"rank": 5}, {"dynamic": "sv_fro:0.8"}])
def test_a_batched_svd_merge_gives_each_module_what_it_gets_alone(small_batches, kwargs, device):
    kwargs = {**kwargs, "device": device}
    a = mixed_modules()
    b = mixed_modules(torch.float16)[::-1]  # other values, other storage, other order; matched by name
    c = [rand_lora(40, 24, 4, seed=30 + n, name=f"m{n}", alpha=2.0) for n in (0, 1, 2)]  # rank 4: other batches
    items = [(lora_of(*a), 0.7), (lora_of(*b), -1.2), (lora_of(*c), 0.5)]
    out, report = merge(items, method="svd", lossy_rank=6, **kwargs)
    assert [m.name for m in out.modules] == [m.name for m in a]
    for got, row in zip(out.modules, report["modules"]):
        alone_items = [(lora_of(*[m for m in lora.modules if m.name == got.name]), w) for lora, w in items]
        alone, alone_report = merge([it for it in alone_items if it[0].modules], method="svd", lossy_rank=6, **kwargs)
        want = alone.modules[0]
        assert_rows_match(row, {**alone_report["modules"][0], "sources": row["sources"]}, rel=1e-6)
        for role, ref in want.adapter.tensors.items():
            x, y = got.adapter.t(role).torch().double(), ref.torch().double()
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6 * float(y.abs().max()))


def test_modules_in_only_some_inputs_are_merged_with_what_exists():
    a1, a2 = rand_lora(12, 8, 2, name="x", seed=1, alpha=1.0), rand_lora(12, 8, 3, name="x", seed=2)
    only_b = rand_lora(6, 8, 2, name="y", component="te1", seed=3, alpha=4.0)
    out, report = merge([(lora_of(a1), 1.0), (lora_of(a2, only_b), -0.5)])
    assert [(m.component, m.name) for m in out.modules] == [("unet", "x"), ("te1", "y")]
    torch.testing.assert_close(dense(out.modules[1]), -0.5 * dense(only_b))
    torch.testing.assert_close(dense(out.modules[0]), weighted_sum([(a1, 1.0), (a2, -0.5)]))
    assert report["summary"]["partial"] == 1 and report["modules"][1]["sources"] == [1]


def test_key_hook_matches_differently_named_modules():
    a, b = rand_lora(12, 8, 2, name="to_q", seed=1), rand_lora(12, 8, 2, name="attn_q", seed=2)
    a.target = b.target = "blocks.0.attn.q.weight"
    out, _ = merge([(lora_of(a), 1.0), (lora_of(b), 1.0)])
    assert len(out.modules) == 1 and out.modules[0].target == "blocks.0.attn.q.weight"
    out, _ = merge([(lora_of(a), 1.0), (lora_of(b), 1.0)], key=lambda m: (m.component, m.name))
    assert len(out.modules) == 2


def test_tucker_and_plain_conv_concat_exactly():
    g = torch.Generator().manual_seed(8)
    tucker = make_module(lora_up=torch.randn(16, 4, 1, 1, generator=g, dtype=F64),
                         lora_mid=torch.randn(4, 4, 3, 3, generator=g, dtype=F64),
                         lora_down=torch.randn(4, 10, 1, 1, generator=g, dtype=F64), alpha=2.0)
    plain = rand_lora(16, 10, 6, (3, 3), alpha=3.0, seed=9)
    out, _ = merge([(lora_of(tucker), 1.0), (lora_of(plain), 0.25)])
    m = out.modules[0]
    assert not m.adapter.has("lora_mid") and m.adapter.down.shape == (10, 10, 3, 3)
    torch.testing.assert_close(dense(m), weighted_sum([(tucker, 1.0), (plain, 0.25)]))


def test_lossy_inputs_need_lossy_rank():
    lo, lr = loha(out=20, inp=12), rand_lora(20, 12, 4, seed=2, alpha=2.0)
    items = [(lora_of(lr), 1.0), (lora_of(lo), 0.5)]
    with pytest.raises(UsageError) as e:
        merge(items)
    assert e.value.message == "LoHa modules need --lossy-rank N to become LoRA (a lossy SVD)"
    out, report = merge(items, lossy_rank=12)  # LoHa ΔW of 20×12 has rank ≤ 12: exact
    torch.testing.assert_close(dense(out.modules[0]), weighted_sum([(lr, 1.0), (lo, 0.5)]), rtol=1e-4,
                               atol=1e-5)
    out, report = merge(items, lossy_rank=3)
    lossy = report["modules"][0]["lossy"]
    assert lossy[0]["input"] == 1 and lossy[0]["type"] == "loha"
    ref = dense(lo)
    assert lossy[0]["error"] == pytest.approx(optimal_error(ref, 3) / float(ref.norm()), rel=1e-4)


def test_families_must_agree():
    a, b = rand_lora(8, 6, 2), rand_lora(8, 6, 2, seed=1)
    items = [(lora_of(a, family="sdxl"), 1.0), (lora_of(b, family="flux1"), 1.0)]
    with pytest.raises(UsageError) as e:
        merge(items)
    assert e.value.message == ("cannot merge LoRAs of different families (sdxl, flux1); "
                               "pass --allow-mixed-families to merge anyway")
    assert len(merge(items, allow_mixed_families=True)[0].modules) == 1
    assert merge([(lora_of(a, family="unknown"), 1.0), (lora_of(b), 1.0)])[1]["inputs"][0]["family"] == "unknown"


def test_shapes_must_fit():
    a, b = rand_lora(8, 6, 2), rand_lora(8, 7, 2, seed=1, )
    with pytest.raises(ShapeMismatch) as e:
        merge([(lora_of(a, path="a.safetensors"), 1.0), (lora_of(b, path="b.safetensors"), 1.0)])
    assert e.value.message == "unet:m: shapes do not fit: [8, 6] in a.safetensors vs [8, 7] in b.safetensors"
    c, d = rand_lora(8, 2, 2, (3, 3)), rand_lora(8, 2, 2, (1, 9), seed=1)
    with pytest.raises(ShapeMismatch, match=r"shapes do not fit: \[8, 2, 3, 3\] in .* vs \[8, 2, 1, 9\]"):
        merge([(lora_of(c), 1.0), (lora_of(d), 1.0)])


@pytest.mark.parametrize("kwargs,message", [
    ({"rank": 4}, "concat keeps every rank: pass --method svd to reduce it"),
    ({"method": "svd"}, "pass --rank N or --dynamic METHOD:VALUE"),
    ({"method": "svd", "rank": 0}, "rank must be a positive integer, got 0"),
    ({"method": "svd", "dynamic": "sv_ratio:0.5"},
     "sv_ratio needs a value above 1 (largest/smallest kept singular value), got 0.5"),
    ({"method": "ties"}, "unknown merge method 'ties': use concat or svd"),
    ({"device": "cuda:0" if not torch.cuda.is_available() else "npu"}, None),
])
def test_bad_options(kwargs, message):
    with pytest.raises(UsageError) as e:
        merge([(lora_of(rand_lora(8, 6, 2)), 1.0)], **kwargs)
    if message:
        assert e.value.message == message


def test_bad_weights_and_no_inputs():
    with pytest.raises(UsageError, match="merge needs at least one LoRA"):
        merge([])
    with pytest.raises(UsageError, match="a merge weight must be a finite number, got nan"):
        merge([(lora_of(rand_lora(8, 6, 2)), float("nan"))])


def test_biases_and_norms_add_up():
    a, b = rand_lora(10, 6, 2, alpha=4.0), rand_lora(10, 6, 2, seed=1)
    ba, bb = torch.randn(10, dtype=F64), torch.randn(10, dtype=F64)
    a.adapter.tensors["lora_up_bias"] = MemorySource().add("x", ba)
    b.adapter.tensors["diff_b"] = MemorySource().add("y", bb)
    na = make_module(Norm, name="n", w_norm=torch.ones(4, dtype=F64))
    nb = make_module(Norm, name="n", w_norm=torch.full((4,), 2.0, dtype=F64))
    out, report = merge([(lora_of(a, na), 0.5), (lora_of(b, nb), 2.0)])
    m, n = out.modules
    torch.testing.assert_close(m.adapter.t("lora_up_bias").torch(), 0.5 * a.scale * ba)  # scaled like PEFT's
    torch.testing.assert_close(m.adapter.t("diff_b").torch(), 2.0 * bb)
    torch.testing.assert_close(n.adapter.t("w_norm").torch(), torch.full((4,), 4.5, dtype=F64))
    assert report["modules"][1]["action"] == "summed"


def test_half_storage_keeps_dtype():
    a = rand_lora(64, 32, 8, dtype=torch.bfloat16, alpha=4.0)
    b = rand_lora(64, 32, 8, dtype=torch.bfloat16, seed=1)
    out, _ = merge([(lora_of(a), 1.0), (lora_of(b), 1.0)])
    assert out.modules[0].adapter.up.dtype == "BF16"
    ref = weighted_sum([(a, 1.0), (b, 1.0)])
    assert float((dense(out.modules[0]) - ref).norm() / ref.norm()) < 1e-2
    out, _ = merge([(lora_of(a), 1.0), (lora_of(b), 1.0)], dtype="fp32")
    assert out.modules[0].adapter.up.dtype == "F32"
    torch.testing.assert_close(dense(out.modules[0]), ref, rtol=1e-5, atol=1e-6)


def test_real_layout_concat_and_svd(tmp_path):
    name = "sdxl__kohya__invokeai-slider-keys-only.json"
    pa = synthesize(name, tmp_path / "a.safetensors", rank=8, dtype="F64", seed=1)
    pb = synthesize(name, tmp_path / "b.safetensors", rank=4, dtype="F64", seed=2)
    with loratools.load(pa) as a, loratools.load(pb) as b:
        items = [(a, 0.8), (b, -0.6)]
        cat, report = merge(items)
        svd, svd_report = merge(items, method="svd", rank=6)
        assert len(cat.modules) == len(a.modules) and report["summary"]["rank_max"] == 12
        assert cat.format == "kohya" and cat.family.id == "sdxl"
        checked = {id(m) for m in one_per_shape(a.modules)}
        for ma, mb, mc, ms in zip(a.modules, b.modules, cat.modules, svd.modules):
            assert (mc.name, ms.name) == (ma.name, ma.name)
            if id(ma) in checked:
                ref = weighted_sum([(ma, 0.8), (mb, -0.6)])
                torch.testing.assert_close(dense(mc), ref, rtol=1e-6, atol=1e-9)
                assert float((ref - dense(ms)).norm()) == pytest.approx(optimal_error(ref, 6), rel=1e-6)
        assert svd_report["summary"]["actions"] == {"svd": len(a.modules)}


def _flux2_pair(tmp_path):
    """FLUX.2 LoRAs in its two namings: native (fused qkv, final_layer) and diffusers (q/k/v parts, norm_out, whose
    shift/scale halves are in the other order)."""
    from safetensors.torch import save_file

    g, h = torch.Generator().manual_seed(1), 64

    def add(d, key, out_dim):
        d[f"{key}.lora_A.weight"] = torch.randn(4, h, generator=g) * 0.1
        d[f"{key}.lora_B.weight"] = torch.randn(out_dim, 4, generator=g) * 0.1

    native, diffusers = {}, {}
    add(native, "diffusion_model.double_blocks.0.img_attn.qkv", 3 * h)
    add(native, "diffusion_model.final_layer.adaLN_modulation.1", 2 * h)
    for p in "qkv":
        add(diffusers, f"transformer.transformer_blocks.0.attn.to_{p}", h)
    add(diffusers, "transformer.norm_out.linear", 2 * h)
    save_file(native, tmp_path / "native.safetensors")
    save_file(diffusers, tmp_path / "diffusers.safetensors")
    return tmp_path / "native.safetensors", tmp_path / "diffusers.safetensors"


def _subset(path, tag: str, *words: str, extra: dict | None = None):
    """A copy of ``path`` with only the tensors whose keys hold one of ``words`` (and ``extra`` tensors)."""
    from safetensors.torch import load_file, save_file

    out = path.with_name(f"{tag}_{path.name}")
    save_file({**{k: v for k, v in load_file(path).items() if any(w in k for w in words)}, **(extra or {})}, out)
    return out


@pytest.mark.parametrize("method", ["concat", "svd"])
@pytest.mark.parametrize("first", ["native", "diffusers"])
def test_modulation_rows_in_opposite_orders_are_merged_in_the_first_inputs_order(tmp_path, method, first):
    """The adaLN modulation's shift/scale halves come in opposite orders in the native and diffusers namings: the
    other input's B rows are swapped to the first input's order, so the merge is the weighted sum of the ΔWs."""
    native, diffusers = _flux2_pair(tmp_path)
    paths = {p: _subset(p, "mod", "final", "norm_out") for p in (native, diffusers)}  # the modulation alone
    order = [(native, 0.6), (diffusers, -2.0)][:: 1 if first == "native" else -1]
    items = [(loratools.load(paths[p], family="flux2"), w) for p, w in order]
    out, _ = loratools.merge(items, method=method, rank=8 if method == "svd" else None)
    (m,) = out.modules
    assert m.name == items[0][0].modules[0].name
    swapped = lambda d: torch.cat([d[d.shape[0] // 2:], d[: d.shape[0] // 2]])  # noqa: E731
    want = items[0][1] * dense(items[0][0].modules[0]) + items[1][1] * swapped(dense(items[1][0].modules[0]))
    torch.testing.assert_close(dense(m), want, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(dense(m), want - items[1][1] * (swapped(dense(items[1][0].modules[0]))
                                                              - dense(items[1][0].modules[0])), atol=1e-3)


@pytest.mark.parametrize("method", ["concat", "svd"])
@pytest.mark.parametrize("first", ["whole", "parts"])
def test_a_fused_weight_whole_in_one_input_and_in_parts_in_another_is_merged_exactly(tmp_path, method, first):
    """FLUX.2's qkv, fused in the native naming and as to_q/to_k/to_v in diffusers': the other input is split (A
    shared, B's rows) or made whole (A stacked, B block-diagonal) into the first's layout, and every merged
    module is the weighted sum of the ΔWs of the rows it covers."""
    native, diffusers = _flux2_pair(tmp_path)
    paths = {p: _subset(p, "qkv", "attn") for p in (native, diffusers)}  # the attention alone
    order = [(native, 0.6), (diffusers, -2.0)][:: 1 if first == "whole" else -1]
    items = [(loratools.load(paths[p], family="flux2"), w) for p, w in order]
    out, report = loratools.merge(items, method=method, rank=16 if method == "svd" else None)
    whole = next(lora for lora, _ in items if len(lora.modules) == 1).modules[0]
    parts = sorted(next(lora for lora, _ in items if len(lora.modules) == 3).modules, key=lambda m: m.part.index)
    assert [m.name[-1] for m in parts] == ["q", "k", "v"]
    w_whole, w_parts = (0.6, -2.0)
    fused_parts = torch.cat([dense(m) for m in parts])  # q, k, v rows in the fused weight's order
    if first == "whole":
        (m,) = out.modules
        assert m.part is None and m.name == whole.name
        torch.testing.assert_close(dense(m), w_whole * dense(whole) + w_parts * fused_parts, rtol=1e-4, atol=1e-5)
    else:
        merged = sorted(out.modules, key=lambda m: m.part.index)
        assert [m.part.index for m in merged] == [0, 1, 2]
        rows = dense(whole).shape[0] // 3
        for m, own in zip(merged, parts):
            k = m.part.index
            want = w_parts * dense(own) + w_whole * dense(whole)[k * rows: (k + 1) * rows]
            torch.testing.assert_close(dense(m), want, rtol=1e-4, atol=1e-5)
    assert all(len(row["sources"]) == 2 for row in report["modules"])


def test_a_fused_weight_that_cannot_be_split_or_fused_is_refused(tmp_path):
    """A module with a bias in the other layout is refused (where each part's bias would go is not this
    operation's to decide), naming the way out; a custom key keeps modules apart by that key, and a whole and a
    part of one weight are refused then."""
    from loratools.api import _canonical_targets

    native, diffusers = _flux2_pair(tmp_path)
    bias = loratools.load(_subset(native, "bias", "attn", extra={
        "diffusion_model.double_blocks.0.img_attn.qkv.lora_B.bias": torch.ones(3 * 64)}), family="flux2")
    parts = loratools.load(_subset(diffusers, "qkv", "attn"), family="flux2")
    with pytest.raises(UsageError, match=r"adapts double_blocks.0.img_attn.qkv whole, the first input that adapts "
                                         r"it in parts; only plain LoRA modules \(no bias, no DoRA\) are split or "
                                         "fused: convert the inputs to one naming first"):
        loratools.merge([(parts, 1.0), (bias, 1.0)])
    plain = loratools.load(_subset(native, "qkv", "attn"), family="flux2")
    for lora in (plain, parts):
        _canonical_targets(lora)
    with pytest.raises(UsageError, match="one whole, the other in parts"):
        merge([(plain, 1.0), (parts, 1.0)], key=lambda m: (m.target, m.part.index if m.part else None))


def test_after_converting_to_one_naming_the_merge_is_the_weighted_sum(tmp_path):
    native, diffusers = _flux2_pair(tmp_path)
    comfy = loratools.convert(diffusers, to="comfy", output=tmp_path / "d.comfy.safetensors", family="flux2").output
    a, b = loratools.load(native, family="flux2"), loratools.load(comfy, family="flux2")
    out, _ = loratools.merge([(a, 0.6), (b, -2.0)])
    for m in out.modules:
        want = sum(w * dense(next(x for x in lora.modules if x.target == m.target))
                   for lora, w in ((a, 0.6), (b, -2.0)))
        torch.testing.assert_close(dense(m), want, rtol=1e-5, atol=1e-6)
