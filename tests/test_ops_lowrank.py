"""Factor-space SVD, dense/randomised SVD, rank selection and option parsing against float64 references."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from test_ops_resize import DEVICES

from loratools.errors import UsageError
from loratools.ops.lowrank import (FactorSVD, NoSVD, dense_svd, factor_svd, parse_dynamic, resolve_device,
                                   select_rank, split_factors, truncation)


def gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("m,n,r", [(7, 5, 1), (64, 40, 8), (40, 64, 16), (33, 320 * 9, 64), (6, 5, 8), (128, 96, 64)])
def test_factor_svd_matches_dense(m, n, r):
    g = gen(m * n + r)
    up = torch.randn(m, r, generator=g, dtype=torch.float64)
    down = torch.randn(r, n, generator=g, dtype=torch.float64)
    dense = up @ down
    u, s, vh = factor_svd(up, down)
    ref = torch.linalg.svdvals(dense)[: s.shape[0]]
    assert s.shape[0] == min(m, n, r)
    torch.testing.assert_close(s, ref, rtol=1e-6, atol=1e-6 * float(ref[0]))
    torch.testing.assert_close(u * s @ vh, dense, rtol=1e-9, atol=1e-9 * float(ref[0]))
    torch.testing.assert_close(u.T @ u, torch.eye(s.shape[0], dtype=torch.float64), atol=1e-10, rtol=0)


def test_factor_svd_computes_float32_for_half_storage():
    up, down = torch.randn(20, 4).half(), torch.randn(4, 30).half()
    s = factor_svd(up, down, compute_uv=False)
    assert s.dtype == torch.float32
    ref = torch.linalg.svdvals(up.double() @ down.double())[:4]
    torch.testing.assert_close(s.double(), ref, rtol=1e-5, atol=1e-5)


def factor_batch(n, m, r, cols, dtype, seed, scales=None):
    """``n`` random modules of one shape, stacked; ``scales`` multiplies each module's up (its magnitude)."""
    g = gen(seed)
    up = torch.randn(n, m, r, generator=g, dtype=torch.float64)
    down = torch.randn(n, r, cols, generator=g, dtype=torch.float64) / math.sqrt(cols)
    if scales is not None:
        up = up * torch.tensor(scales, dtype=torch.float64)[:, None, None]
    return up.to(dtype), down.to(dtype)


# odd shapes: fewer rows or columns than the rank (the core is then not square), a kernel-sized n, one module
@pytest.mark.parametrize("n,m,r,cols,k", [(5, 40, 8, 24, 3), (4, 6, 8, 5, 4), (3, 5, 8, 30, 5), (6, 33, 64, 2880, 16),
                                          (1, 20, 4, 12, 2)])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("device", DEVICES)
def test_a_batch_gives_each_module_its_own_svd(n, m, r, cols, k, dtype, tol, device):
    """The stacked modules come out as each would alone, and as the float64 dense SVD says; modules of very
    different magnitudes (1e-20 ... 1e20: each gets its own power-of-two scale) do not disturb each other."""
    scales = [1.0, 1e-20, 1e20, 3.0, 1e-3, 7.0][:n]
    up, down = factor_batch(n, m, r, cols, dtype, seed=m + r + cols, scales=scales)
    up, down = up.to(device), down.to(device)
    batch = FactorSVD(up, down)
    left, right = batch.top(k)
    assert batch.s.shape == (n, min(m, r, cols)) and left.shape == (n, m, k) and right.shape == (n, k, cols)
    for i in range(n):
        one = FactorSVD(up[i], down[i])
        ref = torch.linalg.svdvals(up[i].double() @ down[i].double())[: min(m, r, cols)].to(batch.s.device)
        torch.testing.assert_close(batch.s[i], one.s, rtol=tol, atol=tol * float(ref[0]))
        torch.testing.assert_close(batch.s[i].double(), ref, rtol=10 * tol, atol=10 * tol * float(ref[0]))
        one_left, one_right = one.top(k)
        got = left[i].double() @ right[i].double()
        torch.testing.assert_close(got, one_left.double() @ one_right.double(), rtol=tol, atol=tol * float(ref[0]))
        dense = (up[i].double() @ down[i].double()).to(got.device)  # the top k terms: the optimal rank-k cut
        best = float(ref[k:].pow(2).sum().sqrt()) if k < ref.shape[0] else 0.0
        assert float((dense - got).norm()) == pytest.approx(best, rel=10 * tol, abs=10 * tol * float(ref[0]))
        torch.testing.assert_close(left[i].norm(dim=0), right[i].norm(dim=1), rtol=10 * tol, atol=0)  # balanced


def test_top_of_a_rank_deficient_product_is_exact_and_finite():
    """k above the product's rank: the terms the core cannot tell from zero come out as zero columns (no 0/0), and
    the product is still the matrix itself; a zero module gives zeros."""
    g = gen(11)
    b = torch.randn(30, 3, generator=g, dtype=torch.float64)
    rank3 = torch.cat([b, b[:, :2] * 2, b[:, :1] - b[:, 1:2], b[:, 2:] * 0.5, torch.zeros(30, 1, dtype=torch.float64)], 1)
    up = torch.stack([rank3, torch.zeros(30, 8, dtype=torch.float64)])  # rank 3 of 8, and a zero module
    down = torch.randn(2, 8, 20, generator=g, dtype=torch.float64)
    for dtype in (torch.float64, torch.float32):
        svd = FactorSVD(up.to(dtype), down.to(dtype))
        left, right = svd.top(6)
        assert bool(torch.isfinite(left).all() and torch.isfinite(right).all())
        full = up[0] @ down[0]
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        torch.testing.assert_close(left[0].double() @ right[0].double(), full, rtol=tol, atol=tol * float(full.norm()))
        assert not bool(left[1].any() or right[1].any()) and float(svd.s[1].max()) == 0.0


def test_a_batch_names_the_first_module_without_an_svd():
    up, down = factor_batch(5, 12, 4, 9, torch.float32, seed=2)
    up[3, 2, 1] = float("nan")
    down[1, 0, 5] = float("-inf")
    with pytest.raises(NoSVD, match="NaN or Inf") as e:
        FactorSVD(up, down)
    assert e.value.index == 1
    up, down = factor_batch(3, 12, 4, 9, torch.float32, seed=3, scales=[1.0, 1.0, 1e30])
    down = down * torch.tensor([1.0, 1.0, 1e30])[:, None, None]  # finite factors whose product is not
    with pytest.raises(NoSVD, match="exceed the range of float32") as e:
        FactorSVD(up, down)
    assert e.value.index == 2


def tuned_like(m, n, seed, terms=64, scale=1.0):
    """A fine-tune's ΔW as a checkpoint stores it: a decaying spectrum (σᵢ = 0.05·e^(−i/12)) added to random fp16
    weights, minus those weights, both in fp16; the rounding leaves a flat tail of noise below the terms."""
    g = gen(seed)
    u = torch.linalg.qr(torch.randn(m, terms, generator=g))[0]
    v = torch.linalg.qr(torch.randn(n, terms, generator=g))[0]
    w = torch.randn(m, n, generator=g) * 0.02
    delta = (u * 0.05 * torch.exp(-torch.arange(terms) / 12.0)) @ v.T
    return ((w + delta).half().float() - w.half().float()) * scale


@pytest.mark.parametrize("k,randomised", [(None, False), (30, True), (8, True), (500, False)])
@pytest.mark.parametrize("device", DEVICES)
def test_a_batch_of_dense_svds_gives_each_matrix_its_own(k, randomised, device):
    from loratools.ops.randomized import randomised as takes_range_finder
    from loratools.ops.randomized import top_svd

    mats = torch.stack([tuned_like(1100, 1060, seed=i, scale=c) for i, c in enumerate((1.0, 1e-25, 1e25))]).to(device)
    assert takes_range_finder(mats.shape, k) == randomised
    u, s, vh = top_svd(mats, k)
    kk = k or 1060
    assert u.shape == (3, 1100, kk) and s.shape == (3, kk) and vh.shape == (3, kk, 1060)
    for i in range(3):
        ui, si, vhi = top_svd(mats[i: i + 1], k)
        torch.testing.assert_close(s[i], si[0], rtol=1e-6, atol=1e-6 * float(si[0, 0]))
        torch.testing.assert_close(u[i, :, :8] * s[i, :8] @ vh[i, :8], ui[0, :, :8] * si[0, :8] @ vhi[0, :8],
                                   rtol=1e-5, atol=1e-6 * float(si[0, 0]))


def test_randomised_top_terms_against_the_dense_svd():
    """The tolerance the range finder keeps on a fine-tune-like ΔW (1100 x 1060, 64 decaying terms over fp16
    noise): where the spectrum still falls at k (k = 32), its top k values are the float64 dense SVD's to float32
    rounding; where k reaches the noise floor (k = 64), the smallest kept values come out low, but the energy kept
    stays within 1e-4 of the optimum (and never above it: it is a projection)."""
    from loratools.ops.randomized import top_svd

    mat = tuned_like(1100, 1060, seed=7)
    exact = torch.linalg.svdvals(mat.double())
    total = float(exact.pow(2).sum())
    for k, tol in ((32, 2e-6), (64, None)):
        _, s, _ = top_svd(mat[None], k)
        s = s[0].double()
        kept, best = float(s.pow(2).sum()) / total, float(exact[:k].pow(2).sum()) / total
        assert kept <= best * (1 + 1e-6)
        if tol is not None:
            torch.testing.assert_close(s, exact[:k], rtol=0, atol=tol * float(exact[0]))
            assert kept == pytest.approx(best, abs=1e-6)
        else:
            assert best - kept < 1e-4


def test_split_factors_are_balanced_and_optimal():
    g = gen(3)
    mat = torch.randn(30, 20, generator=g, dtype=torch.float64)
    u, s, vh = torch.linalg.svd(mat, full_matrices=False)
    b, a = split_factors(u, s, vh, 5)
    torch.testing.assert_close(b.norm(dim=0), a.norm(dim=1))  # √S on each side
    err = (mat - b @ a).norm() / mat.norm()
    assert truncation(s, 5)[1] == pytest.approx(float(err), rel=1e-9)


def test_dense_svd_randomised_path_is_an_optimal_projection():
    g = gen(5)
    m, n, k = 1300, 1100, 6
    spectrum = torch.tensor([50.0, 30, 20, 10, 5, 3] + [0.01] * 20, dtype=torch.float64)
    u = torch.linalg.qr(torch.randn(m, 26, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(n, 26, generator=g, dtype=torch.float64))[0]
    mat = u * spectrum @ v.T
    ur, sr, vhr = dense_svd(mat, k)
    assert ur.shape == (m, k) and vhr.shape == (k, n)
    torch.testing.assert_close(sr, spectrum[:k], rtol=1e-6, atol=0)
    total = float(mat.pow(2).sum())
    retained, _ = truncation(sr, k, total)
    direct = float((mat - ur * sr @ vhr).norm() / mat.norm())
    assert direct == pytest.approx(math.sqrt(1 - retained), rel=1e-6)  # an orthogonal projection
    assert direct == pytest.approx(math.sqrt(20 * 0.01**2 / total), rel=1e-6)
    residual = direct**2 * total
    assert truncation(sr, k - 2, total, residual)[1] ** 2 == pytest.approx(
        (residual + float(sr[k - 2:].pow(2).sum())) / total, rel=1e-9)  # errors add in squares


def test_dense_svd_full_path():
    mat = torch.randn(40, 30, generator=gen(1), dtype=torch.float64)
    u, s, vh = dense_svd(mat)
    torch.testing.assert_close(u * s @ vh, mat)
    assert dense_svd(mat, 3)[1].shape == (3,)


def test_truncation_of_zero_matrix():
    assert truncation(torch.zeros(4), 1) == (1.0, 0.0)


S = torch.tensor


@pytest.mark.parametrize("spectrum,dynamic,k", [
    # sd-scripts keeps one more than each rule says (its index helpers and rank_resize both add 1)
    ([10.0, 1.0], ("sv_ratio", 5.0), 1),
    ([10.0, 1.0], ("sv_ratio", 10.0), 2),  # σ₂ = σ₁/V exactly: kept (≥)
    ([10.0, 1.0], ("sv_ratio", 9.99), 1),
    ([4.0, 2.0, 1.0], ("sv_ratio", 2.0), 2),
    ([3.0, 1.0], ("sv_fro", 0.9), 1),  # 9/10 of Σσ² exactly; sd-scripts compares with p² and adds one
    ([3.0, 1.0], ("sv_fro", 0.91), 2),
    ([2.0, 1.0, 1.0], ("sv_fro", 5 / 6), 2),
    ([2.0, 1.0, 1.0], ("sv_fro", 1.0), 3),
    ([3.0, 1.0], ("sv_cumulative", 0.75), 1),  # 3/4 of Σσ exactly
    ([3.0, 1.0], ("sv_cumulative", 0.76), 2),
    ([5.0, 3.0, 2.0], ("sv_cumulative", 0.8), 2),
    ([5.0, 3.0, 2.0, 0.0, 0.0], ("sv_cumulative", 1.0), 3),  # zero singular values are never needed
    ([1.0, 1.0, 1.0, 1.0], ("sv_cumulative", 0.5), 2),
    ([0.0, 0.0], ("sv_fro", 0.5), 1),  # a zero ΔW keeps one term
])
def test_dynamic_rules_keep_exactly_what_they_define(spectrum, dynamic, k):
    assert select_rank(S(spectrum, dtype=torch.float64), dynamic=dynamic) == k


def test_fixed_rank_and_caps():
    s = S([5.0, 4, 3, 2, 1])
    assert select_rank(s, rank=3) == 3
    assert select_rank(s, rank=9) == 5
    assert select_rank(s, dynamic=("sv_ratio", 100.0), max_rank=2) == 2
    assert select_rank(s, rank=3, max_rank=2) == 2


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.just(0.0), st.floats(1e-6, 1e3)), min_size=1, max_size=40),
       st.sampled_from(["sv_fro", "sv_cumulative", "sv_ratio"]), st.floats(0.01, 1.0))
def test_dynamic_rules_against_their_definition(values, method, frac):
    vals = sorted(values, reverse=True)
    value = 1 + 99 * frac if method == "sv_ratio" else frac
    k = select_rank(S(vals, dtype=torch.float64), dynamic=(method, value))
    assert 1 <= k <= len(vals)
    if vals[0] == 0:
        assert k == 1
        return
    if method == "sv_ratio":
        kept = [v for v in vals if v >= vals[0] / value]
        assert k in (len(kept), len([v for v in vals if v * value >= vals[0] * (1 - 1e-12)]))
        return
    terms = [v * v for v in vals] if method == "sv_fro" else vals
    total = math.fsum(terms)

    def frac_at(j):
        return math.fsum(terms[:j]) / total

    assert frac_at(k) >= value * (1 - 1e-9)  # the rule holds at k ...
    assert k == 1 or frac_at(k - 1) < value * (1 + 1e-9)  # ... and not one earlier


@pytest.mark.parametrize("text,expected", [("sv_fro:0.9", ("sv_fro", 0.9)), ("sv_ratio:4", ("sv_ratio", 4.0)),
                                           ("sv_cumulative:1", ("sv_cumulative", 1.0)),
                                           (("sv_fro", 0.5), ("sv_fro", 0.5))])
def test_parse_dynamic(text, expected):
    assert parse_dynamic(text) == expected


@pytest.mark.parametrize("text,message", [
    ("sv_fro", "dynamic rank must be METHOD:VALUE (sv_ratio, sv_fro or sv_cumulative), got 'sv_fro'"),
    ("sv_energy:0.9", "unknown dynamic method 'sv_energy': use sv_ratio, sv_fro or sv_cumulative"),
    ("sv_fro:abc", "sv_fro needs a number, got 'abc'"),
    ("sv_fro:1.5", "sv_fro needs a value in (0, 1], got 1.5"),
    ("sv_cumulative:0", "sv_cumulative needs a value in (0, 1], got 0"),
    ("sv_fro:nan", "sv_fro needs a value in (0, 1], got nan"),
    ("sv_ratio:1", "sv_ratio needs a value above 1 (largest/smallest kept singular value), got 1"),
    ("sv_ratio:inf", "sv_ratio needs a value above 1 (largest/smallest kept singular value), got inf"),
])
def test_parse_dynamic_errors(text, message):
    with pytest.raises(UsageError) as e:
        parse_dynamic(text)
    assert e.value.message == message


def test_devices(monkeypatch):
    assert resolve_device("cpu").type == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto").type == "cpu"
    with pytest.raises(UsageError) as e:
        resolve_device("cuda")
    assert e.value.message == "CUDA was requested but torch sees no CUDA device"
    with pytest.raises(UsageError, match="unknown device 'tpu': use auto, cpu or cuda"):
        resolve_device("tpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_factor_svd_on_cuda_matches_cpu():
    up, down = torch.randn(300, 16, dtype=torch.float64), torch.randn(16, 200, dtype=torch.float64)
    s_gpu = factor_svd(up.cuda(), down.cuda(), compute_uv=False).cpu()
    torch.testing.assert_close(s_gpu, factor_svd(up, down, compute_uv=False), rtol=1e-9, atol=1e-9)
