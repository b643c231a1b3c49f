"""Tests of swapjax.comparison (swapjax.compare): the shared problem, failure isolation, and the reported numbers.

References: float64 NumPy for the local objective ½‖Xw − Xw̄‖²/N and a float64
log-domain Sinkhorn (a max-shifted logsumexp) for the EWR objective (N/2)Σπ_ij(y_i − z_j)².
"""
from __future__ import annotations

import hashlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import swapjax
from swapjax import comparison as C
from swapjax.baselines import Magnitude, WoodFisher, layer_quotas
from swapjax.pytree import layout

from conftest import MLP, fixed_lr, fixed_swap

# ---------------------------------------------------------------------------
# references and problems


def _np_local(X, w, w_bar):
    X, w, w_bar = (np.asarray(a, np.float64) for a in (X, w, w_bar))
    r = X @ (w - w_bar)
    return 0.5 * r @ r / X.shape[0]


def _logsumexp(a, axis):
    """log Σ exp(a) along axis, float64, shifted by the max (scipy's logsumexp costs ~10x more per call on
    these 40 × 40 arrays, and the reference below takes thousands of iterations)."""
    m = np.max(a, axis=axis, keepdims=True)
    return np.squeeze(m, axis) + np.log(np.sum(np.exp(a - m), axis=axis))


def _np_ewr(y, z, epsilon, tol=1e-12, max_iters=100_000):
    """(N/2)Σπ_ij(y_i − z_j)², π the entropic plan on (y_i − z_j)²/Var(y), uniform marginals (float64)."""
    y, z = np.asarray(y, np.float64), np.asarray(z, np.float64)
    n = len(y)
    cost = (y[:, None] - z[None, :]) ** 2
    scaled = cost / max(np.var(y), np.finfo(np.float64).tiny)
    log_a = np.full(n, -np.log(n))
    f, g = np.zeros(n), np.zeros(n)
    for _ in range(max_iters):
        f = -epsilon * _logsumexp((g[None, :] - scaled) / epsilon + log_a[None, :], axis=1)
        g = -epsilon * _logsumexp((f[:, None] - scaled) / epsilon + log_a[:, None], axis=0)
        plan = np.exp((f[:, None] + g[None, :] - scaled) / epsilon + log_a[:, None] + log_a[None, :])
        if np.abs(plan.sum(axis=1) - 1 / n).sum() < tol:
            break
    return 0.5 * n * np.sum(plan * cost)


def _planted(seed, n=80, p=200, k=20, rho=0.6):
    """Sparse regression with a planted support: k large weights, p − k small ones, correlated columns.

    Columns share a common factor (correlation ρ), so the small weights' share of
    y = Xw̄ can be re-fitted by the kept ones: the problem LR's backsolve is for.
    """
    rng = np.random.default_rng(seed)
    common = rng.normal(size=(n, 1))
    X = np.sqrt(1 - rho) * rng.normal(size=(n, p)) + np.sqrt(rho) * common
    w = 0.3 * rng.normal(size=p)
    support = rng.choice(p, k, replace=False)
    w[support] = rng.choice([-1, 1], k) * rng.uniform(1, 2, k)
    return X.astype(np.float32), w.astype(np.float32), k


def _methods():
    return {"MP": Magnitude(), "WF": WoodFisher(), "LR": fixed_lr(), "SWAP": fixed_swap()}


class _Spy(swapjax.Method):
    """A method that records the X and w̄ it was given, then delegates."""

    def __init__(self, inner, seen):
        self.inner, self.seen = inner, seen

    def solve(self, X, w_bar, k, w_start=None, duals=None):
        self.seen.append((X, hashlib.sha256(np.asarray(X).tobytes()).hexdigest(), w_bar))
        return self.inner.solve(X, w_bar, k, w_start=w_start, duals=duals)


class _Boom(swapjax.Method):
    def solve(self, X, w_bar, k, w_start=None, duals=None):
        raise RuntimeError("planned failure 42")


class _TooDense(swapjax.Method):
    def solve(self, X, w_bar, k, w_start=None, duals=None):
        return jnp.asarray(w_bar), None


# ---------------------------------------------------------------------------
# the shared problem and failure isolation


def test_every_method_sees_the_same_X_and_a_failure_stops_nothing(capsys):
    X, w_bar, k = _planted(0)
    X = jnp.asarray(X)
    digest = hashlib.sha256(np.asarray(X).tobytes()).hexdigest()
    seen = []
    methods = {
        "MP": _Spy(Magnitude(), seen),
        "boom": _Boom(),
        "WF": _Spy(WoodFisher(), seen),
        "dense": _TooDense(),
        "LR": _Spy(fixed_lr(), seen),
    }
    results = C.compare(X, w_bar, k, methods, progress=True)
    assert list(results) == list(methods)
    assert len(seen) == 3
    assert all(x is X for x, _, _ in seen)  # the very object passed in, not a copy
    assert all(h == digest for _, h, _ in seen)
    assert all(wb is seen[0][2] for _, _, wb in seen)
    for name in ["MP", "WF", "LR"]:
        r = results[name]
        assert r.ok and r.w is not None and r.kept <= k and np.isfinite(r.local_objective)
    assert not results["boom"].ok and "RuntimeError: planned failure 42" in results["boom"].error
    assert "planned failure 42" in results["boom"].traceback and results["boom"].w is None
    with pytest.raises(ValueError, match=r"methods\['no-solve'\]: expected a swapjax method"):
        C.compare(X, w_bar, k, dict(methods, **{"no-solve": object()}), progress=False)  # a wrong type: at once
    assert len(seen) == 3
    assert "more than k" in results["dense"].error  # reported, and its numbers still measured
    err = capsys.readouterr().err
    assert "boom: FAILED" in err and "LR:" in err


def test_progress_is_silenceable_and_evaluate_failures_are_reported(capsys):
    X, w_bar, k = _planted(1)

    def evaluate(w):
        if np.count_nonzero(np.asarray(w)) < k:
            raise ValueError("too sparse for this evaluator")
        return 0.5, 1.5

    results = C.compare(X, w_bar, k, {"MP": Magnitude(), "WF": WoodFisher()}, evaluate=evaluate, progress=False)
    assert capsys.readouterr().err == ""
    for r in results.values():
        assert r.w is not None
        if r.error is None:
            assert (r.accuracy, r.loss) == (0.5, 1.5)
        else:
            assert r.error.startswith("evaluate: ValueError") and r.accuracy is None


def test_invalid_problem_raises_before_any_method_runs():
    X, w_bar, k = _planted(0)
    seen = []
    with pytest.raises(ValueError, match="k"):
        C.compare(X, w_bar, 0, {"MP": _Spy(Magnitude(), seen)}, progress=False)
    with pytest.raises(ValueError, match="methods"):
        C.compare(X, w_bar, k, {}, progress=False)
    with pytest.raises(ValueError, match="epsilon"):
        C.compare(X, w_bar, k, {"MP": Magnitude()}, epsilon=0, progress=False)
    assert seen == []


# ---------------------------------------------------------------------------
# the numbers


@pytest.mark.parametrize("seed", [0, 2, 3])
def test_planted_problem_lr_with_backsolve_is_no_worse_than_mp_and_wf(seed):
    X, w_bar, k = _planted(seed)
    results = C.compare(X, w_bar, k, {"MP": Magnitude(), "WF": WoodFisher(), "LR": fixed_lr()}, progress=False)
    lr = results["LR"]
    assert bool(lr.info.backsolved)
    for name in ["MP", "WF"]:
        assert lr.local_objective <= results[name].local_objective
    for r in results.values():
        assert r.kept == k
        assert r.local_objective == pytest.approx(_np_local(X, r.w, w_bar), rel=1e-4)


def test_noisy_feature_problem_reports_the_objectives_honestly():
    """One feature's gradient is pure noise (large, unrelated to everything else).

    No winner is asserted: the table is printed (pytest -s) and every reported
    objective is checked against a float64 NumPy recomputation.
    """
    X, w_bar, k = _planted(4)
    rng = np.random.default_rng(40)
    X[:, 7] = 5 * np.std(X) * rng.normal(size=X.shape[0])  # the noise column
    w_bar[7] = 0.8  # a mid-sized weight on it: MP's choice depends on |w̄| only
    results = C.compare(X, w_bar, k, _methods(), sinkhorn_threshold=1e-6, progress=False)
    print("\nnoisy-feature problem (N=80, p=200, k=20; column 7 is noise):\n" + C.format_table(results))
    y = X.astype(np.float64) @ w_bar.astype(np.float64)
    for name, r in results.items():
        assert r.ok, (name, r.error)
        assert r.kept <= k
        assert r.local_objective == pytest.approx(_np_local(X, r.w, w_bar), rel=1e-4)
        z = X.astype(np.float64) @ np.asarray(r.w, np.float64)
        assert r.ewr_converged
        assert r.ewr_objective == pytest.approx(_np_ewr(y, z, C.EWR_EPSILON), rel=2e-3)


def test_ewr_objective_matches_numpy_sinkhorn():
    """(N/2)Σπ_ij(y_i − z_j)² against the float64 reference: z = y, a shifted permutation, a shrunk shift."""
    rng = np.random.default_rng(7)
    y = rng.normal(size=40)
    for z, eps in [(y, 0.1), (y[rng.permutation(40)] + 0.3, 0.1), (0.5 * y + 1, 0.05)]:
        value, info = C.ewr_objective(jnp.asarray(y, jnp.float32), jnp.asarray(z, jnp.float32), eps, 1e-6)
        assert bool(info.converged)
        assert value == pytest.approx(_np_ewr(y, z, eps), rel=2e-3)


# ---------------------------------------------------------------------------
# the convenience over (loss_fn, params, batch)


def test_compare_sparsities_computes_X_once(monkeypatch, trained_mlp, prune_batch, loss_fn, digits, capsys):
    calls = []
    real = C.per_sample_grads

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(C, "per_sample_grads", counting)
    x, y = digits
    xe, ye = jnp.asarray(x[1000:1400]), jnp.asarray(y[1000:1400])

    def evaluate(params):
        logits = MLP.apply({"params": params}, xe)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, ye).mean()
        return float(jnp.mean(jnp.argmax(logits, -1) == ye)), float(loss)

    seen = []
    methods = {"MP": _Spy(Magnitude(), seen), "MP-layer": Magnitude(scope="layer"), "WF": WoodFisher()}
    out = C.compare_sparsities(loss_fn, trained_mlp, prune_batch, [0.5, 0.9], methods, evaluate=evaluate)
    assert len(calls) == 1
    assert seen[0][0] is seen[1][0]  # the same X object at both sparsities
    lay = layout(trained_mlp)
    dense_acc, _ = evaluate(trained_mlp)
    for s, by_method in out.items():
        k = swapjax.kept_count(s, lay.size)
        for name, r in by_method.items():
            assert r.ok, (name, r.error)
            assert r.kept == k and 0 <= r.accuracy <= 1 and np.isfinite(r.loss)
        # per-layer MP keeps the per-layer quotas of the layout's offsets
        w = np.asarray(by_method["MP-layer"].w)
        counts = [np.count_nonzero(w[a:b]) for a, b in zip(lay.offsets, lay.offsets[1:])]
        assert counts == layer_quotas(k, np.diff(lay.offsets))
    assert out[0.5]["WF"].accuracy > 0.5 * dense_acc  # a pruned model that still works
    table = C.format_table(out)
    assert "MP-layer" in table and "0.9000" in table
    assert "per-sample gradients" in capsys.readouterr().err


def test_compare_sparsities_rejects_bad_arguments(trained_mlp, prune_batch, loss_fn):
    with pytest.raises(ValueError, match="sparsities"):
        C.compare_sparsities(loss_fn, trained_mlp, prune_batch, [1.0], {"MP": Magnitude()}, progress=False)
    with pytest.raises(ValueError, match="key"):
        C.compare_sparsities(loss_fn, trained_mlp, prune_batch, [0.5], {"MP": Magnitude()},
                             noise=swapjax.GradientNoise(), progress=False)
