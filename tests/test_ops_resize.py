"""resize: optimal truncation in factor space, against dense float64 references."""

import math

import pytest

from loratools.families.naming import Part
import torch

import loratools
from loratools.adapters import IA3, LoHa, LoKr, LoRA, Full, Norm
from loratools.errors import FormatError, UsageError
from loratools.families import FamilyResult
from loratools.model import Lora, MemorySource, Module
from loratools.ops.resize import resize
from synth import synthesize

F64 = torch.float64


# --- helpers shared with test_ops_merge.py ---------------------------------------------------------------------

def make_module(adapter_cls=LoRA, name="m", component="unet", alpha=None, rslora=False, magnitude=None,
                **tensors):
    src = MemorySource()
    refs = {role: src.add(role, t) for role, t in tensors.items()}
    mag = None if magnitude is None else src.add("magnitude", magnitude)
    return Module(name, component, adapter_cls(refs), alpha=alpha, rslora=rslora, magnitude=mag)


def lora_of(*modules, family="sdxl", path="in.safetensors", metadata=None):
    return Lora(path=path, format="kohya", modules=list(modules), metadata=dict(metadata or {}),
                family=FamilyResult(id=family))


def rand_lora(out, inp, r, kernel=(), dtype=F64, seed=0, **kw):
    """A LoRA/LoCon module with random factors (conv: the kernel on down, up 1x1)."""
    g = torch.Generator().manual_seed(seed)
    down = torch.randn(r, inp, *kernel, generator=g, dtype=F64) / math.sqrt(inp)
    up = torch.randn(out, r, *([1] * len(kernel)), generator=g, dtype=F64)
    return make_module(lora_up=up.to(dtype), lora_down=down.to(dtype), **kw)


def spectral_lora(sigmas, m=12, n=9, seed=0, **kw):
    """A float64 LoRA whose ΔW has exactly the given singular values."""
    g = torch.Generator().manual_seed(seed)
    k = len(sigmas)
    u = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=F64))[0]
    v = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=F64))[0]
    return make_module(lora_up=u * torch.tensor(sigmas, dtype=F64), lora_down=v.T.contiguous(), **kw)


def dense(m: Module) -> torch.Tensor:
    """s·ΔW in float64 straight from the stored tensors (conv flattened to [out, in·k·k])."""
    a = m.adapter
    if a.kind != "lora":
        return a.delta().double().flatten(1) * m.scale
    up, down = a.up.torch().double().flatten(1), a.down.torch().double()
    if a.has("lora_mid"):
        mid = a.t("lora_mid").torch().double()
        return torch.einsum("mnkl,om,ni->oikl", mid, up, down.flatten(1)).flatten(1) * m.scale
    return up @ down.flatten(1) * m.scale


def svdvals(mat: torch.Tensor) -> torch.Tensor:
    """Singular values of a dense float64 matrix; large ones (of rank ≤ 24 here) through an exact range basis."""
    if min(mat.shape) <= 1024:
        return torch.linalg.svdvals(mat)
    g = torch.Generator().manual_seed(0)
    q = torch.linalg.qr(mat @ torch.randn(mat.shape[1], 24, generator=g, dtype=mat.dtype))[0]
    return torch.linalg.svdvals(q.T @ mat)


def optimal_error(mat: torch.Tensor, k: int) -> float:
    return float(svdvals(mat)[k:].pow(2).sum().sqrt())


def assert_optimal(before: Module, after: Module, k: int, rtol=1e-6):
    ref, got = dense(before), dense(after)
    s_ref = svdvals(ref)
    torch.testing.assert_close(svdvals(got)[:k], s_ref[:k], rtol=rtol, atol=rtol * float(s_ref[0]))
    assert float((ref - got).norm()) == pytest.approx(optimal_error(ref, k), rel=rtol, abs=rtol * float(s_ref[0]))


# --- exactness ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("out,inp,r,kernel,k", [
    (40, 24, 8, (), 3), (24, 40, 64, (), 16), (16, 20, 2, (), 1), (96, 50, 64, (), 32),
    (32, 16, 12, (3, 3), 4), (24, 20, 8, (1, 1), 5), (20, 6, 16, (3,), 2),
])
def test_truncation_is_optimal_and_keeps_scale(out, inp, r, kernel, k):
    m = rand_lora(out, inp, r, kernel, alpha=r / 2)
    small, report = resize(lora_of(m), rank=k)
    new = small.modules[0]
    assert isinstance(new.adapter, LoRA) and new.rank == k
    assert new.adapter.down.shape == (k, inp, *kernel)
    assert new.adapter.up.shape == (out, k, *([1] * len(kernel)))
    assert new.scale == pytest.approx(m.scale) and new.alpha == pytest.approx(m.scale * k)
    assert_optimal(m, new, k)
    row = report["modules"][0]
    ref = dense(m)
    assert row["action"] == "truncated" and (row["old_rank"], row["new_rank"]) == (r, k)
    assert row["error"] == pytest.approx(optimal_error(ref, k) / float(ref.norm()), rel=1e-6)
    s2 = svdvals(ref).pow(2)
    assert row["retained"] == pytest.approx(float(s2[:k].sum() / s2.sum()), rel=1e-9)


def test_rslora_alpha_rule():
    m = rand_lora(30, 20, 16, alpha=8.0, rslora=True)
    new = resize(lora_of(m), rank=4)[0].modules[0]
    assert new.rslora and new.alpha == pytest.approx(m.scale * 2)  # s·√k
    assert new.scale == pytest.approx(m.scale)
    assert_optimal(m, new, 4)


def test_missing_alpha_means_scale_one():
    m = rand_lora(30, 20, 16)
    new = resize(lora_of(m), rank=5)[0].modules[0]
    assert new.alpha == 5 and new.scale == 1.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("alpha", [None, 3.0])
def test_small_modules_are_copied_bit_exactly(dtype, alpha):
    m = rand_lora(20, 12, 4, (3, 3), dtype=dtype, alpha=alpha)
    small, report = resize(lora_of(m), rank=4)
    new = small.modules[0]
    assert new.alpha == alpha and report["modules"][0]["action"] == "copied"
    for role in ("lora_up", "lora_down"):
        a, b = m.adapter.t(role).torch(), new.adapter.t(role).torch()
        assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 3e-3), (torch.bfloat16, 2e-2)])
def test_half_storage_computes_in_float32_and_casts_back(dtype, tol):
    m = rand_lora(64, 48, 32, dtype=dtype, alpha=16.0)
    small, report = resize(lora_of(m), rank=8)
    new = small.modules[0]
    assert new.adapter.up.dtype == m.adapter.up.dtype  # storage dtype kept
    ref = dense(m)
    direct = float((ref - dense(new)).norm() / ref.norm())
    assert direct == pytest.approx(report["modules"][0]["error"], abs=tol)
    wide = resize(lora_of(m), rank=8, dtype="fp32")[0].modules[0]
    assert wide.adapter.up.dtype == "F32"
    assert_optimal(m, wide, 8, rtol=1e-5)


# --- dynamic rank selection --------------------------------------------------------------------------------------

@pytest.mark.parametrize("dynamic,k", [
    ("sv_ratio:10", 2), ("sv_ratio:5", 1),  # sd-scripts keeps 2 for sv_ratio:5 on [10, 1, ...]
    ("sv_fro:0.99", 2), ("sv_fro:0.5", 1),
    ("sv_cumulative:0.9", 2), ("sv_cumulative:0.8", 1),
])
def test_dynamic_picks_the_defined_rank(dynamic, k):
    # σ = [10, 1, 0.5, 0.1]: Σσ² = 101.26, Σσ = 11.6
    m = spectral_lora([10.0, 1.0, 0.5, 0.1], alpha=4.0)
    small, report = resize(lora_of(m), dynamic=dynamic)
    assert small.modules[0].rank == k == report["modules"][0]["new_rank"]
    assert_optimal(m, small.modules[0], k)
    assert small.modules[0].scale == pytest.approx(m.scale)


def test_dynamic_boundaries_and_cap():
    m = spectral_lora([3.0, 1.0])
    assert resize(lora_of(m), dynamic="sv_fro:0.9")[0].modules[0].rank == 1  # 9/10 exactly
    assert resize(lora_of(m), dynamic="sv_cumulative:0.75")[0].modules[0].rank == 1  # 3/4 exactly
    assert resize(lora_of(m), dynamic="sv_ratio:3")[0].modules[0].rank == 2  # 1 = 3/3 exactly
    assert resize(lora_of(m), dynamic="sv_ratio:1000", max_rank=2)[0].modules[0].rank == 2


def test_dynamic_keeping_everything_copies():
    m = spectral_lora([3.0, 2.0, 1.0])
    small, report = resize(lora_of(m), dynamic="sv_fro:1")
    assert report["modules"][0]["action"] == "copied"
    assert torch.equal(small.modules[0].adapter.up.torch(), m.adapter.up.torch())


# --- other adapter types -----------------------------------------------------------------------------------------

def test_tucker_becomes_plain_conv_and_copies_when_small():
    g = torch.Generator().manual_seed(4)
    m = make_module(lora_up=torch.randn(16, 6, 1, 1, generator=g, dtype=F64),
                    lora_mid=torch.randn(6, 6, 3, 3, generator=g, dtype=F64),
                    lora_down=torch.randn(6, 10, 1, 1, generator=g, dtype=F64), alpha=3.0)
    new = resize(lora_of(m), rank=2)[0].modules[0]
    assert not new.adapter.has("lora_mid") and new.adapter.down.shape == (2, 10, 3, 3)
    assert_optimal(m, new, 2)
    same = resize(lora_of(m), rank=6)[0].modules[0]
    assert same.adapter.has("lora_mid") and torch.equal(same.adapter.t("lora_mid").torch(),
                                                        m.adapter.t("lora_mid").torch())


def loha(seed=0, out=24, inp=18, r=4, alpha=2.0):
    g = torch.Generator().manual_seed(seed)
    t = {f"hada_w{i}_{s}": torch.randn(*(out, r) if s == "a" else (r, inp), generator=g) for i in (1, 2)
         for s in "ab"}
    return make_module(LoHa, alpha=alpha, **t)


@pytest.mark.parametrize("make,label", [
    (loha, "LoHa"),
    (lambda: make_module(LoKr, alpha=None, lokr_w1=torch.randn(4, 3), lokr_w2=torch.randn(6, 5)), "LoKr"),
    # decomposed factors, ΔW of rank 2·4 = 8: the Kronecker SVD path must still cut optimally
    (lambda: make_module(LoKr, alpha=4.0, lokr_w1_a=torch.randn(4, 2), lokr_w1_b=torch.randn(2, 3),
                         lokr_w2_a=torch.randn(16, 4), lokr_w2_b=torch.randn(4, 12)), "LoKr"),
    (lambda: make_module(LoKr, alpha=None, lokr_w1=torch.randn(2, 2), lokr_w2=torch.randn(5, 4, 3, 3)), "LoKr"),
    (lambda: make_module(Full, diff=torch.randn(20, 12), diff_b=torch.randn(20)), "full-diff"),
])
def test_lossy_types_need_lossy_rank_then_are_optimal(make, label):
    m = make()
    with pytest.raises(UsageError) as e:
        resize(lora_of(m), rank=2)
    assert e.value.message == f"{label} modules need --lossy-rank N to become LoRA (a lossy SVD)"
    small, report = resize(lora_of(m), rank=6, lossy_rank=6)
    new, row = small.modules[0], report["modules"][0]
    assert isinstance(new.adapter, LoRA) and new.rank == 6 and row["action"] == "lossy"
    ref = dense(m)
    got = dense(new)
    assert float((ref - got).norm()) == pytest.approx(optimal_error(ref, 6), rel=1e-4)
    assert row["lossy_error"] == pytest.approx(optimal_error(ref, 6) / float(ref.norm()), rel=1e-4)
    if m.adapter.has("diff_b"):
        assert torch.equal(new.adapter.t("diff_b").torch(), m.adapter.t("diff_b").torch())


def test_kronecker_svd_matches_the_dense_one():
    from loratools.ops.resize import kron_svd

    g = torch.Generator().manual_seed(3)
    w1, w2 = torch.randn(3, 5, generator=g, dtype=F64), torch.randn(7, 4, generator=g, dtype=F64)
    full = torch.kron(w1, w2)
    u, s, vh, total, residual = kron_svd(w1, w2, 6)
    want = torch.linalg.svdvals(full)
    assert torch.allclose(s, want[:6], rtol=1e-12)
    assert torch.allclose(u.T @ u, torch.eye(6, dtype=F64), atol=1e-12)  # orthonormal, as an SVD's
    assert total == pytest.approx(float(full.norm()) ** 2, rel=1e-12)
    assert residual == pytest.approx(float((full - u @ torch.diag(s) @ vh).norm()) ** 2, rel=1e-9)


def test_lossy_then_smaller_rank():
    m = loha()
    new = resize(lora_of(m), rank=3, lossy_rank=8)[0].modules[0]
    ref = dense(m)
    assert new.rank == 3
    assert float((ref - dense(new)).norm()) == pytest.approx(optimal_error(ref, 3), rel=1e-4)


def test_dora_and_base_dependent_modules_are_refused():
    m = rand_lora(8, 6, 2, magnitude=torch.ones(8, 1))
    with pytest.raises(UsageError) as e:
        resize(lora_of(m), rank=1)
    msg = ("DoRA modules need the base weights, so they cannot be resized or merged as LoRA; bake them into the base "
           "instead (loratools bake)")
    assert e.value.message == msg and str(e.value) == f"in.safetensors: {msg}"
    ia3 = make_module(IA3, plain_weight=torch.ones(8), on_input=torch.zeros(1))
    with pytest.raises(UsageError) as e:
        resize(lora_of(ia3), rank=1)
    assert e.value.message == "ia3 modules depend on the base weights and cannot become LoRA"


def test_norm_and_bias_deltas_are_carried():
    norm = make_module(Norm, name="n", w_norm=torch.randn(8), b_norm=torch.randn(8))
    bias = rand_lora(10, 6, 4, name="b", alpha=2.0)
    bias.adapter.tensors["lora_up_bias"] = MemorySource().add("x", torch.randn(10, dtype=F64))
    small, report = resize(lora_of(norm, bias), rank=2)
    assert [r["action"] for r in report["modules"]] == ["kept", "truncated"]
    assert torch.equal(small.modules[0].adapter.t("w_norm").torch(), norm.adapter.t("w_norm").torch())
    assert torch.equal(small.modules[1].adapter.t("lora_up_bias").torch(),
                       bias.adapter.t("lora_up_bias").torch())


# --- options and output --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,message", [
    ({"rank": 0}, "rank must be a positive integer, got 0"),
    ({"rank": -3}, "rank must be a positive integer, got -3"),
    ({"rank": 2.5}, "rank must be a positive integer, got 2.5"),
    ({"rank": 4, "max_rank": 0}, "max_rank must be a positive integer, got 0"),
    ({"rank": 4, "lossy_rank": 0}, "lossy_rank must be a positive integer, got 0"),
    ({}, "pass --rank N or --dynamic METHOD:VALUE"),
    ({"rank": 4, "dynamic": "sv_fro:0.9"}, "pass either --rank or --dynamic, not both"),
    ({"dynamic": "fro:0.9"}, "unknown dynamic method 'fro': use sv_ratio, sv_fro or sv_cumulative"),
    ({"dynamic": "sv_fro:2"}, "sv_fro needs a value in (0, 1], got 2"),
    ({"rank": 4, "dtype": "fp8"}, "unknown dtype 'fp8': use fp16, bf16 or fp32"),
])
def test_bad_options(kwargs, message):
    with pytest.raises(UsageError) as e:
        resize(lora_of(rand_lora(8, 6, 4)), **kwargs)
    assert e.value.message == message


def test_output_is_a_normal_lora_with_a_report():
    a = rand_lora(40, 30, 16, name="a", component="te1", alpha=8.0, dtype=torch.float16)
    b = rand_lora(40, 30, 2, name="b", seed=1)
    a.target, a.part = "model.x.weight", Part(0, (1, 1))
    src = lora_of(a, b, metadata={"ss_network_dim": "16", "sshs_model_hash": "abc"})
    out, report = resize(src, rank=4)
    assert isinstance(out, Lora) and out.format == "kohya" and out.family.id == "sdxl"
    assert out.metadata == {"ss_network_dim": "16"}
    assert report["warnings"] == ["dropped stale metadata hashes: sshs_model_hash"]
    new = out.modules[0]
    assert (new.name, new.component, new.target, new.part, new.keys) == ("a", "te1", "model.x.weight", Part(0, (1, 1)), [])
    assert isinstance(new.adapter.up.source, MemorySource)
    s = report["summary"]
    assert s["modules"] == 2 and s["actions"] == {"truncated": 1, "copied": 1}
    assert s["parameters_before"] == 16 * 70 + 2 * 70 and s["parameters_after"] == 4 * 70 + 2 * 70
    assert s["bytes_before"] == 16 * 70 * 2 + 2 * 70 * 8 and s["bytes_after"] == 4 * 70 * 2 + 2 * 70 * 8
    assert s["retained_min"] == report["modules"][0]["retained"] < 1 == report["modules"][1]["retained"]
    assert s["error_max"] == report["modules"][0]["error"]
    assert report["rule"] == {"rank": 4, "dynamic": None, "max_rank": None, "lossy_rank": None}
    assert out.size_bytes == s["bytes_after"]


def one_per_shape(modules):
    seen, out = set(), []
    for m in modules:
        shape = (m.adapter.up.shape, m.adapter.down.shape)
        if shape not in seen:
            seen.add(shape)
            out.append(m)
    return out


@pytest.mark.parametrize("layout,sample", [("sdxl__kohya__invokeai-slider-keys-only.json", False),
                                           ("flux1__kohya__invokeai-pokemon.json", True)])
def test_real_layouts(tmp_path, layout, sample):
    path = synthesize(layout, tmp_path / "in.safetensors", rank=8, dtype="F64")
    with loratools.load(path) as lora:
        if sample:  # Flux: one module of each shape keeps the dense references affordable
            lora.modules = one_per_shape(lora.modules)
        out, report = resize(lora, rank=3)
        assert len(out.modules) == len(lora.modules) == report["summary"]["modules"]
        assert report["summary"]["actions"] == {"truncated": len(lora.modules)}
        checked = one_per_shape(lora.modules)
        for before, after in zip(lora.modules, out.modules):
            assert (after.name, after.component) == (before.name, before.component)
            assert after.scale == pytest.approx(before.scale)
            if before in checked and before.adapter.up.shape[0] * before.adapter.down.shape[1] <= 3072 * 3072:
                assert_optimal(before, after, 3)
        dyn, _ = resize(lora, dynamic="sv_fro:0.6", max_rank=6)
        assert {m.rank for m in dyn.modules} <= set(range(1, 7))


def mixed_modules(dtype=torch.float32):
    """Modules of one file as a batch sees them: shapes repeated and not, mixed ranks, linear and conv (1x1, 3x3,
    1-D), rows or columns fewer than the rank, float64 beside half storage, a Tucker conv, a LoHa and a norm."""
    specs = [(40, 24, 8, ()), (40, 24, 8, ()), (40, 24, 12, ()), (40, 24, 8, ()), (6, 5, 8, ()), (6, 5, 8, ()),
             (32, 16, 12, (3, 3)), (32, 16, 12, (3, 3)), (24, 20, 8, (1, 1)), (20, 6, 16, (3,)), (40, 24, 8, ())]
    mods = [rand_lora(o, i, r, kernel, dtype=dtype, seed=n, name=f"m{n}", alpha=r / 2)
            for n, (o, i, r, kernel) in enumerate(specs)]
    mods[3] = rand_lora(40, 24, 8, dtype=F64, seed=3, name="m3", alpha=4.0)  # same shape, float64: its own batch
    mods[10].adapter.tensors["lora_up"] = MemorySource().add("u", mods[10].adapter.up.torch() * 1e-12)  # tiny
    g = torch.Generator().manual_seed(40)
    tucker = make_module(lora_up=torch.randn(16, 6, 1, 1, generator=g).to(dtype),
                         lora_mid=torch.randn(6, 6, 3, 3, generator=g).to(dtype),
                         lora_down=torch.randn(6, 10, 1, 1, generator=g).to(dtype), name="tucker", alpha=3.0)
    norm = make_module(Norm, name="n", w_norm=torch.randn(8))
    return mods[:5] + [tucker] + mods[5:8] + [loha(seed=5), norm] + mods[8:]


# The GPU runs of a test are the CPU test itself, on the other device (pytest -m gpu selects them).
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                                  reason="needs CUDA")])]


@pytest.fixture(params=[1, 2], ids=["one worker", "two workers"])
def small_batches(request, monkeypatch):
    """Batches of one to three modules, run in turn or by a pool of two threads."""
    import loratools.ops.batched as batched

    for device in ("cpu", "cuda"):
        monkeypatch.setitem(batched.BATCH_BYTES, device, 4 << 10)
    monkeypatch.setattr(batched, "worker_count", lambda device: request.param)
    return request.param


def assert_rows_match(row: dict, want: dict, rel: float) -> None:
    """Report rows equal: the same keys, numbers within ``rel``, everything else (names, actions) exactly
    (pytest.approx compares numbers only, from pytest 9.1 on)."""
    assert row.keys() == want.keys()
    for key, value in want.items():
        if isinstance(value, float):
            assert row[key] == pytest.approx(value, rel=rel), key
        else:
            assert row[key] == value, key


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kwargs", [{"rank": 4}, {"dynamic": "sv_fro:0.7"}, {"dynamic": "sv_ratio:3", "max_rank": 5}])
def test_a_batched_resize_gives_each_module_what_it_gets_alone(small_batches, kwargs, device):
    mods = mixed_modules()
    kwargs = {**kwargs, "device": device}
    out, report = resize(lora_of(*mods), lossy_rank=6, **kwargs)
    assert [m.name for m in out.modules] == [m.name for m in mods]
    assert len({r["new_rank"] for r in report["modules"] if r["action"] == "truncated"}) > 1 or "rank" in kwargs
    for m, got, row in zip(mods, out.modules, report["modules"]):
        alone, alone_report = resize(lora_of(m), lossy_rank=6, **kwargs)
        want, want_row = alone.modules[0], alone_report["modules"][0]
        assert_rows_match(row, want_row, rel=1e-6)
        assert report["device"] == alone_report["device"] == device
        assert got.alpha == want.alpha and set(got.adapter.tensors) == set(want.adapter.tensors)
        for role, ref in want.adapter.tensors.items():
            a, b = got.adapter.t(role).torch(), ref.torch()
            assert a.dtype == b.dtype and a.shape == b.shape
            torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-6 * float(b.double().abs().max()))
        if row["action"] == "truncated" and m.adapter.up.dtype == "F64":
            assert_optimal(m, got, row["new_rank"])


def test_a_nan_in_a_batch_names_its_module(small_batches):
    mods = mixed_modules()
    for n in (7, 2):  # both plain LoRAs of batches; module 2 comes first in the file
        up = mods[n].adapter.up.torch().clone()
        up.view(-1)[5] = float("nan")
        mods[n].adapter.tensors["lora_up"] = MemorySource().add("bad", up)
    with pytest.raises(FormatError) as e:
        resize(lora_of(*mods), rank=4, lossy_rank=6, allow_nonfinite=True)
    assert str(e.value) == "in.safetensors: module m2: its values hold NaN or Inf, which have no SVD"


@pytest.mark.parametrize("bad", [("m2", "lora_up"), ("m7", "lora_down"), ("tucker", "lora_mid"), ("m0", "lora_up_bias"),
                                 ("m1", None)])
def test_nan_without_allow_nonfinite_is_refused_as_every_writer_refuses_it(small_batches, bad):
    """The batches test the factors they decompose (no second pass over them); whatever else holds a NaN is tested
    before: the refusal is check_writable's either way, naming every such module."""
    name, role = bad
    mods = mixed_modules()
    m = next(m for m in mods if m.name == name)
    if role is None:  # an alpha
        m.alpha = float("inf")
        role, why = "alpha", "alpha inf"
    else:
        t = m.adapter.t(role).torch().clone() if m.adapter.has(role) else torch.zeros(m.adapter.up.shape[0])
        t.view(-1)[3] = float("nan")
        m.adapter.tensors[role] = MemorySource().add("bad", t)
        why = f"NaN/Inf in {role}"
    want = (f"in.safetensors: 1 module holds NaN or Inf: {name} ({why}); "
            "--allow-nonfinite writes them unchanged")
    refused(mods, want)
    ten = next(m for m in mods if m.name == "m10")  # and an Inf in a module of a batch
    ten.adapter.tensors["lora_down"] = MemorySource().add("inf", ten.adapter.down.torch() * float("inf"))
    refused(mods, f"in.safetensors: 2 modules hold NaN or Inf: {name} ({why}), m10 (NaN/Inf in lora_down); "
                  "--allow-nonfinite writes them unchanged")


def refused(mods, message):
    from loratools.ops.merge import merge

    with pytest.raises(FormatError) as e:
        resize(lora_of(*mods), rank=4, lossy_rank=6)
    assert str(e.value) == message
    with pytest.raises(FormatError) as e:
        merge([(lora_of(*mixed_modules()), 1.0), (lora_of(*mods), 0.5)], method="svd", rank=4, lossy_rank=6)
    assert str(e.value) == message


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    m = rand_lora(300, 200, 32, alpha=16.0, dtype=torch.float16)
    cpu = resize(lora_of(m), rank=8, device="cpu", dtype="fp32")[0].modules[0]
    gpu = resize(lora_of(m), rank=8, device="cuda", dtype="fp32")[0].modules[0]
    assert gpu.adapter.up.torch().device.type == "cpu"  # results come back to the host
    torch.testing.assert_close(dense(gpu), dense(cpu), rtol=1e-4, atol=1e-5)
