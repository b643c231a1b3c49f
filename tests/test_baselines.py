"""Tests of swapjax.baselines: magnitude pruning (global / per layer) and WoodFisher.

References: float64 NumPy throughout: a stable argsort of −|w| for the top-k
masks, integer arithmetic for the per-layer quotas, and numpy.linalg.inv of
the dense Fisher F = damp·I + XᵀX/N for WoodFisher's diagonal and OBS update.
"""
from __future__ import annotations

import os
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from swapjax import baselines as B
from swapjax.baselines import BaselineInfo

# ---------------------------------------------------------------------------
# references


def _np_topk_mask(v, k):
    """The k largest |v|, ties to the lower index (stable argsort of −|v|)."""
    order = np.argsort(-np.abs(np.asarray(v, np.float64)), kind="stable")
    mask = np.zeros(len(v), bool)
    mask[order[:k]] = True
    return mask


def _np_woodfisher(X, w, k, damp, update=True):
    """Dense float64 WoodFisher: (diag F⁻¹, pruned w, support) with F⁻¹ from numpy.linalg.inv."""
    X, w = np.asarray(X, np.float64), np.asarray(w, np.float64)
    n, p = X.shape
    F_inv = np.linalg.inv(damp * np.eye(p) + X.T @ X / n)
    diag = np.diag(F_inv).copy()
    keep = _np_topk_mask(w**2 / (2 * diag), k)
    if update:
        pruned = ~keep
        delta = -F_inv[:, pruned] @ (w[pruned] / diag[pruned])  # −F⁻¹ Σ_{q∈Q} e_q w_q/[F⁻¹]_qq
        w_new = np.where(keep, w + delta, 0.0)
    else:
        w_new = np.where(keep, w, 0.0)
    return diag, w_new, keep


def _np_f(X, w, w_bar):
    X, w, w_bar = (np.asarray(a, np.float64) for a in (X, w, w_bar))
    r = X @ (w - w_bar)
    return 0.5 * r @ r


def _relerr(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


# ---------------------------------------------------------------------------
# WoodFisher against the dense float64 computation


@pytest.mark.parametrize(
    "n, p, damp",
    [(40, 150, 1e-5), (40, 150, 1e-2), (60, 25, 1e-5)],  # p > N (the use case) and p < N
)
def test_woodfisher_matches_dense_inverse_float64(n, p, damp):
    rng = np.random.default_rng(n + p)
    X = rng.normal(size=(n, p)) * rng.uniform(0.1, 2.0, size=p)  # columns of different scales
    w = rng.normal(size=p)
    k = p // 3
    diag_ref, w_ref, keep_ref = _np_woodfisher(X, w, k, damp)
    with jax.enable_x64(True):
        diag = np.asarray(B.inverse_fisher_diagonal(jnp.asarray(X), damp, block_size=64))
        w_wf, info = B.WoodFisher(damp=damp, block_size=64).solve(jnp.asarray(X), jnp.asarray(w), k)
        w_wf = np.asarray(w_wf)
    assert w_wf.dtype == np.float64
    np.testing.assert_allclose(diag, diag_ref, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(info.support), keep_ref)
    np.testing.assert_array_equal(w_wf != 0, keep_ref)
    assert _relerr(w_wf, w_ref) < 1e-5
    np.testing.assert_allclose(w_wf, w_ref, rtol=1e-5, atol=1e-5 * np.abs(w_ref).max())
    # the reported objective: f = ½‖Xw − Xw̄‖² at H_k(w̄), at the WF mask, after the update
    trace = np.asarray(info.objective_trace)
    np.testing.assert_allclose(
        trace,
        [_np_f(X, np.where(_np_topk_mask(w, k), w, 0), w), _np_f(X, np.where(keep_ref, w, 0), w), _np_f(X, w_ref, w)],
        rtol=1e-6,
    )
    assert float(info.objective) == pytest.approx(trace[-1])


def test_woodfisher_float32_agrees_with_float64_reference():
    """float32 at p ≫ N (the intended regime): diag and update within 1e-4 of the float64 reference."""
    rng = np.random.default_rng(3)
    n, p, k = 40, 1000, 200
    X = (rng.normal(size=(n, p)) * 0.05).astype(np.float32)
    w = rng.normal(size=p).astype(np.float32)
    diag_ref, w_ref, keep_ref = _np_woodfisher(X, w, k, 1e-5)
    diag = np.asarray(B.inverse_fisher_diagonal(X, 1e-5, block_size=256))
    w_wf, info = B.WoodFisher(block_size=256).solve(X, w, k)
    assert np.asarray(w_wf).dtype == np.float32
    assert np.max(np.abs(diag - diag_ref) / diag_ref) < 1e-4
    np.testing.assert_array_equal(np.asarray(info.support), keep_ref)
    assert _relerr(w_wf, w_ref) < 1e-4


def test_woodfisher_without_update_keeps_surviving_weights():
    rng = np.random.default_rng(4)
    X, w = rng.normal(size=(20, 80)), rng.normal(size=80)
    _, w_ref, keep = _np_woodfisher(X, w, 30, 1e-3, update=False)
    with jax.enable_x64(True):
        w_wf, info = B.WoodFisher(damp=1e-3, update=False).solve(jnp.asarray(X), jnp.asarray(w), 30)
    np.testing.assert_array_equal(np.asarray(w_wf), w_ref)
    assert np.asarray(info.objective_trace).shape == (2,)


def test_woodfisher_acts_on_w_start_and_keeps_exactly_k():
    """w_start (a previous stage's masked weights) is what WF prunes: its zeros stay pruned."""
    rng = np.random.default_rng(5)
    n, p = 30, 100
    X, w_bar = rng.normal(size=(n, p)).astype(np.float32), rng.normal(size=p).astype(np.float32)
    w_start = np.where(_np_topk_mask(w_bar, 50), w_bar, 0).astype(np.float32)
    w, info = B.WoodFisher(damp=1e-3).solve(X, w_bar, 20, w_start=w_start)
    w = np.asarray(w)
    assert np.count_nonzero(w) == 20 and int(np.asarray(info.support).sum()) == 20
    assert not np.any(w[w_start == 0])
    _, w_ref, _ = _np_woodfisher(X, w_start, 20, 1e-3)
    assert _relerr(w, w_ref) < 1e-4


def test_woodfisher_never_forms_a_p_by_p_matrix():
    """XLA's buffer plan: temporaries stay O(Np), far below the p×p = 1.6 GB a dense F would need."""
    n, p = 50, 20000
    X = jnp.zeros((n, p), jnp.float32)
    w = jnp.zeros(p, jnp.float32)
    stats = B._woodfisher.lower(1e-5, True, 4096, X, w, w, jnp.asarray(100)).compile().memory_analysis()
    if stats is None:
        pytest.skip("this backend gives no memory analysis")
    assert stats.temp_size_in_bytes < 2 * n * p * 4  # measured 0.65·Np on CPU
    assert stats.temp_size_in_bytes < p * p * 4 / 100


def test_woodfisher_buffer_plan_at_p_300k_n_1000():
    """WoodFisher at p = 300,000, N = 1,000, compiled but not run (no 1.2 GB X allocated): temporaries well under X's size."""
    n, p = 1000, 300_000
    X = jax.ShapeDtypeStruct((n, p), jnp.float32)
    w = jax.ShapeDtypeStruct((p,), jnp.float32)
    stats = B._woodfisher.lower(1e-5, True, B.WoodFisher().block_size, X, w, w, jnp.asarray(100)).compile().memory_analysis()
    if stats is None:
        pytest.skip("this backend gives no memory analysis")
    assert stats.temp_size_in_bytes < 0.5 * n * p * 4  # measured 0.15 GB, X itself is 1.2 GB


def test_solve_info_contract():
    """The fields prune.py reads, with the types it expects; duals pass through unchanged."""
    rng = np.random.default_rng(6)
    X, w = rng.normal(size=(12, 40)).astype(np.float32), rng.normal(size=40).astype(np.float32)
    duals = (jnp.arange(12.0), -jnp.arange(12.0))
    for method, kw in [(B.Magnitude(), {}), (B.Magnitude("layer"), {"segments": (0, 10, 40)}), (B.WoodFisher(), {})]:
        _, info = method.solve(X, w, 9, w_start=w, duals=duals, **kw)
        assert isinstance(info, BaselineInfo)
        assert info.duals is duals
        float(info.objective_trace[0]), float(info.objective)
        assert info.describe() == "" and info.warnings(12) == () and np.isnan(info.held_out_loss)
        assert info.gradient_seconds == 0.0
        assert info.support.shape == (40,) and int(info.support.sum()) == 9
        np.testing.assert_allclose(np.asarray(info.targets), X.astype(np.float64) @ w, rtol=1e-4, atol=1e-4)
        _, info = method.solve(X, w, 9, **kw)
        assert info.duals[0].shape == (12,)  # None → zero potentials, as LR does
        w16, _ = method.solve(X.astype(np.float16), w.astype(np.float16), 9, **kw)
        assert w16.dtype == jnp.float32  # half precision is solved in float32, as LR does


# ---------------------------------------------------------------------------
# Magnitude


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_magnitude_global_keeps_the_k_largest_ties_to_lower_index(dtype):
    rng = np.random.default_rng(0)
    p = 300
    w = rng.integers(-4, 5, size=p).astype(dtype)  # ~33 copies of each value: ties everywhere
    X = rng.normal(size=(8, p)).astype(dtype)
    with jax.enable_x64(True):
        for k in [1, 33, 100, 150, 299, 300]:
            w_mp, info = B.Magnitude().solve(X, w, k)
            mask = _np_topk_mask(w, k)
            np.testing.assert_array_equal(np.asarray(info.support), mask)
            np.testing.assert_array_equal(np.asarray(w_mp), np.where(mask, w, 0))
            np.testing.assert_allclose(float(info.objective), _np_f(X, np.where(mask, w, 0), w), rtol=1e-5)


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 40), min_size=1, max_size=6).filter(lambda s: sum(s) > 0),
    frac=st.floats(0, 1),
)
def test_layer_quotas_sum_to_k_and_round_each_layer(sizes, frac):
    p = sum(sizes)
    k = int(round(frac * p))
    q = B.layer_quotas(k, sizes)
    assert sum(q) == k
    for n, kl in zip(sizes, q):
        assert 0 <= kl <= n
        assert abs(kl - k * n / p) < 1  # each layer within one of its exact share
    assert q == B.layer_quotas(k, sizes)


def test_layer_quotas_largest_remainder_and_ties():
    # k·n/p = 1.75, 0, 2.45, 2.8 → floors 1, 0, 2, 2; two leftovers to the largest remainders (.8, .75)
    assert B.layer_quotas(7, [5, 0, 7, 8]) == [2, 0, 2, 3]
    # three equal layers, one leftover: the lowest index wins the tie
    assert B.layer_quotas(4, [3, 3, 3]) == [2, 1, 1]
    assert B.layer_quotas(5, [3, 3, 3]) == [2, 2, 1]


def test_magnitude_layer_keeps_the_same_fraction_per_layer():
    rng = np.random.default_rng(1)
    segments = (0, 50, 50, 170, 200, 400)
    p = segments[-1]
    w = rng.integers(-3, 4, size=p).astype(np.float32)  # ties inside each layer
    w[50:170] *= 10  # a layer of large weights: global MP would keep mostly these
    X = rng.normal(size=(6, p)).astype(np.float32)
    for k in [1, 40, 137, 200, 399]:
        w_mp, info = B.Magnitude(scope="layer").solve(X, w, k, segments=segments)
        w_mp, support = np.asarray(w_mp), np.asarray(info.support)
        quotas = B.layer_quotas(k, np.diff(segments))
        assert support.sum() == k
        for (a, b), kl in zip(zip(segments, segments[1:]), quotas):
            np.testing.assert_array_equal(support[a:b], _np_topk_mask(w[a:b], kl))
        np.testing.assert_array_equal(w_mp, np.where(support, w, 0))
        assert float(info.objective) == pytest.approx(_np_f(X, w_mp, w), rel=1e-4)
    # the scopes differ where the layers differ in scale
    w_g, _ = B.Magnitude().solve(X, w, 100)
    w_l, _ = B.Magnitude("layer").solve(X, w, 100, segments=segments)
    assert np.count_nonzero(np.asarray(w_g)[50:170]) > np.count_nonzero(np.asarray(w_l)[50:170])


def test_magnitude_acts_on_w_start():
    rng = np.random.default_rng(2)
    X, w_bar, w_start = rng.normal(size=(5, 30)), rng.normal(size=30), rng.normal(size=30)
    w, _ = B.Magnitude().solve(X.astype(np.float32), w_bar.astype(np.float32), 7, w_start=w_start.astype(np.float32))
    mask = _np_topk_mask(w_start.astype(np.float32), 7)
    np.testing.assert_array_equal(np.asarray(w), np.where(mask, w_start, 0).astype(np.float32))


# ---------------------------------------------------------------------------
# errors


@pytest.mark.parametrize("damp", [0, 0.0, -1e-5, float("nan"), float("inf"), "1e-5", True])
def test_woodfisher_rejects_bad_damp(damp):
    with pytest.raises(ValueError, match="damp"):
        B.WoodFisher(damp=damp)


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="scope"):
        B.Magnitude(scope="x")
    with pytest.raises(ValueError, match="update"):
        B.WoodFisher(update="yes")
    with pytest.raises(ValueError, match="block_size"):
        B.WoodFisher(block_size=0)
    with pytest.raises(ValueError, match="damp"):
        B.inverse_fisher_diagonal(np.ones((2, 3), np.float32), damp=0)
    X, w = np.ones((4, 10), np.float32), np.arange(10, dtype=np.float32)
    with pytest.raises(ValueError, match="segments"):
        B.Magnitude(scope="layer").solve(X, w, 3)
    for bad in [(0, 5), (1, 10), (0, 6, 4, 10), "abc", 5]:
        with pytest.raises(ValueError, match="segments"):
            B.Magnitude(scope="layer").solve(X, w, 3, segments=bad)
    for method in [B.Magnitude(), B.WoodFisher()]:
        with pytest.raises(ValueError, match="k"):
            method.solve(X, w, 0)
        with pytest.raises(ValueError, match="w_bar"):
            method.solve(X, w[:5], 3)
        with pytest.raises(ValueError, match="w_start"):
            method.solve(X, w, 3, w_start=w[:5])
        with pytest.raises(ValueError, match="X|gradients"):
            method.solve(np.full((4, 10), np.nan, np.float32), w, 3)


# ---------------------------------------------------------------------------
# a large problem: p = 300,000, N = 1,000, float32 (X alone is 1.2 GB)


def _peak_rss_gb(reset=False):
    """The process's peak resident memory in GB (Linux: VmHWM, resettable; else ru_maxrss)."""
    try:
        if reset:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 2**20
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("SWAPJAX_BIG_TESTS"), reason="set SWAPJAX_BIG_TESTS=1 (needs ~4 GB RAM, ~30 s)")
def test_woodfisher_at_p_300k_n_1000():
    n, p, k = 1000, 300_000, 30_000
    keys = jax.random.split(jax.random.key(0), 10)
    X = jnp.concatenate([0.01 * jax.random.normal(key, (n // 10, p), jnp.float32) for key in keys])
    w = jax.random.normal(jax.random.key(1), (p,), jnp.float32)
    X.block_until_ready()
    at_rest = _peak_rss_gb(reset=True)
    t0 = time.perf_counter()
    w_wf, info = B.WoodFisher().solve(X, w, k)
    w_wf.block_until_ready()
    seconds = time.perf_counter() - t0
    peak = _peak_rss_gb()
    print(f"WoodFisher p={p} N={n}: {seconds:.1f}s (compile included), peak RSS {peak:.2f} GB "
          f"({at_rest:.2f} GB before the solve, X = {X.nbytes / 2**30:.2f} GB)")
    assert int(jnp.count_nonzero(w_wf)) == k
    assert bool(jnp.all(jnp.isfinite(w_wf)))
    assert peak < 20  # GB: well inside a 24 GB machine
