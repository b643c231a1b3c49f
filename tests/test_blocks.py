"""The blocked mode: X in column blocks, the budget shared between blocks, each block solved on its columns."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import swapjax
from compiles import counted
from conftest import fixed_lr, mlp_loss
from swapjax import blocks, memory, pytree
from swapjax.constraints import Groups
from swapjax.gradients import per_sample_grads


@given(p=st.integers(1, 500), width=st.integers(1, 600))
def test_block_ranges_cover_p_in_about_equal_contiguous_blocks(p, width):
    ranges = blocks.block_ranges(p, width)
    sizes = [e - a for a, e in ranges]
    assert ranges[0][0] == 0 and ranges[-1][1] == p
    assert all(ranges[i][1] == ranges[i + 1][0] for i in range(len(ranges) - 1))
    assert len(ranges) == -(-p // min(width, p)) and max(sizes) <= width and max(sizes) - min(sizes) <= 1


def _reference_shares(ids, counts, saliency, ranges):
    """{(block, group): kept}: per group, the counts[g] largest saliencies (ties to the lower index), counted per block."""
    shares = {}
    for g, count in enumerate(counts):
        members = np.flatnonzero(ids == g)
        kept = members[np.lexsort((members, -saliency[members]))][:count]
        for b, (a, e) in enumerate(ranges):
            shares[b, g] = int(((kept >= a) & (kept < e)).sum())
    return shares


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), p=st.integers(4, 80), groups=st.integers(1, 6), width=st.integers(1, 40),
       top_k=st.booleans())
def test_split_budget_shares_each_group_as_its_saliency_ranking_does(seed, p, groups, width, top_k):
    rng = np.random.default_rng(seed)
    ids = np.zeros(p, np.int32) if top_k else rng.integers(0, groups, p).astype(np.int32)
    ids = np.unique(ids, return_inverse=True)[1].astype(np.int32)  # every group non-empty
    sizes = np.bincount(ids)
    counts = np.array([rng.integers(0, size + 1) for size in sizes], np.int32)
    counts[0] = max(counts[0], 1)
    saliency = np.round(rng.exponential(size=p), 1).astype(np.float32)  # ties on purpose
    spec = Groups.top_k(int(counts[0])) if top_k else Groups(jnp.asarray(counts), jnp.asarray(ids))
    ranges = blocks.block_ranges(p, width)
    parts = blocks.split_budget(spec, jnp.asarray(saliency), ranges)
    reference = _reference_shares(ids, counts, saliency, ranges)
    for b, ((a, e), part) in enumerate(zip(ranges, parts)):
        local = np.zeros(e - a, np.int32) if part.ids is None else np.asarray(part.ids)
        for lg, g in enumerate(np.unique(ids[a:e])):  # local group lg is original group g, in order
            assert np.array_equal(local == lg, ids[a:e] == g)
            assert int(part.counts[lg]) == reference[b, g]
    assert sum(int(part.k) for part in parts) == counts.sum()


@pytest.fixture(scope="module")
def formed(trained_mlp, prune_batch):
    return np.asarray(per_sample_grads(mlp_loss, trained_mlp, prune_batch, progress=False), np.float64)


def test_column_blocks_are_the_columns_of_X(trained_mlp, prune_batch, formed):
    lay = pytree.layout(trained_mlp)
    X = blocks.ColumnBlocks(mlp_loss, trained_mlp, prune_batch, lay, blocks.block_ranges(lay.size, 300), chunk_size=20,
                            progress=False)
    scale = np.abs(formed).max()
    for b, (a, e) in enumerate(X.ranges):  # 888 columns in blocks of 296; chunks of 20 rows overlap at the end
        np.testing.assert_allclose(X.block(b).matrix, formed[:, a:e], rtol=1e-5, atol=1e-6 * scale)
    np.testing.assert_allclose(X.col_sq, (formed ** 2).sum(0), rtol=1e-4, atol=1e-6 * (formed ** 2).sum(0).max())


@pytest.mark.parametrize("budget", blocks.BUDGETS)
def test_blocked_prune_solves_each_block_on_its_columns_with_its_share(trained_mlp, prune_batch, formed, budget):
    """Against an independent computation: the shares from a NumPy ranking of |w| (or |w|·‖x_i‖), each block
    solved by LR on the columns of the formed X."""
    lay = pytree.layout(trained_mlp)
    w_bar = np.asarray(pytree.flatten(trained_mlp, lay))
    k = swapjax.kept_count(0.8, lay.size)
    res = swapjax.prune(mlp_loss, trained_mlp, prune_batch, sparsity=0.8, method=fixed_lr(), stages=1,
                        mode=swapjax.Blocked(width=300, budget=budget), progress=False)
    w = np.asarray(pytree.flatten(res.params, lay))
    saliency = np.abs(w_bar) * (np.sqrt((formed ** 2).sum(0)) if budget == "fisher" else 1)
    kept = np.argsort(-saliency, kind="stable")[:k]
    assert res.mode == "blocked" and len(res.info[0].method_info.blocks) == 3 and np.count_nonzero(w) == k
    for a, e in blocks.block_ranges(lay.size, 300):
        share = int(((kept >= a) & (kept < e)).sum())
        w_b, info = fixed_lr().solve(formed[:, a:e].astype(np.float32), w_bar[a:e], share)
        assert np.count_nonzero(w[a:e]) == share
        np.testing.assert_array_equal(w[a:e] != 0, np.asarray(info.support))
        np.testing.assert_allclose(w[a:e], w_b, rtol=1e-4, atol=1e-5 * np.abs(w_bar).max())


def test_one_block_is_the_in_memory_prune(trained_mlp, prune_batch):
    kwargs = dict(sparsity=0.7, method=swapjax.SWAP(lam=0.01, epsilon=0.3), stages=[0.4, 0.7], progress=False)
    whole = swapjax.prune(mlp_loss, trained_mlp, prune_batch, **kwargs)
    one = swapjax.prune(mlp_loss, trained_mlp, prune_batch, mode=swapjax.Blocked(width=10**6), **kwargs)
    assert [len(s.method_info.blocks) for s in one.info] == [1, 1]
    assert [type(s.method_info).__name__ for s in whole.info] == ["SolveInfo", "SolveInfo"]  # X held whole
    for a, b in zip(jax.tree_util.tree_leaves(whole.masks), jax.tree_util.tree_leaves(one.masks)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree_util.tree_leaves(whole.params), jax.tree_util.tree_leaves(one.params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert [int(s.method_info.blocks[0].plan.iterations) > 0 for s in one.info] == [True, True]  # the plan per block, warm-started


class _RecordingScore(swapjax.Method):
    """Magnitude on each block, after scoring its start: records (w_b given to score, held-out loss)."""

    matrix_free = True
    selects = property(lambda self: True)

    def __init__(self):
        self.seen = []

    def solve(self, X, w_bar, k, w_start=None, duals=None, *, score=None, segments=None):
        w, info = swapjax.Magnitude().solve(X, w_bar, k, w_start, duals)
        self.seen.append(float(np.mean(score(w))))
        return w, info


def test_each_block_is_scored_in_the_network_with_the_others_at_their_best_known_weights(trained_mlp, prune_batch):
    """Block b's candidates are scored with blocks < b at their results and blocks > b at the budget's
    magnitude support: here every block's result is that support, so every score is the whole result's."""
    method = _RecordingScore()
    val = jax.tree_util.tree_map(lambda a: a[:16], prune_batch)
    res = swapjax.prune(mlp_loss, trained_mlp, prune_batch, sparsity=0.8, method=method, stages=1, val_batch=val,
                        mode=swapjax.Blocked(width=300, budget="magnitude"), progress=False)
    expected = np.mean([mlp_loss(res.params, jax.tree_util.tree_map(lambda a: a[i], val)) for i in range(16)])
    np.testing.assert_allclose(method.seen, [expected] * 3, rtol=1e-5)
    np.testing.assert_allclose(res.info[0].held_out_loss, expected, rtol=1e-5)


def test_blocks_report_progress_and_are_silenced(trained_mlp, prune_batch, capsys):
    swapjax.prune(mlp_loss, trained_mlp, prune_batch, sparsity=0.8, method=fixed_lr(), stages=1,
                  mode=swapjax.Blocked(width=300))
    err = capsys.readouterr().err
    assert "X blocked (3 blocks of ≤ 296 columns, budget: fisher)" in err
    assert all(f"block {b}/3 (columns" in err for b in (1, 2, 3))
    swapjax.prune(mlp_loss, trained_mlp, prune_batch, sparsity=0.8, method=fixed_lr(), stages=1,
                  mode=swapjax.Blocked(width=300), progress=False)
    assert capsys.readouterr().err == ""


def test_auto_mode_takes_blocks_before_matrix_free(trained_mlp, prune_batch, monkeypatch, capsys):
    lay = pytree.layout(trained_mlp)
    monkeypatch.setattr(memory, "MIN_BLOCK_WIDTH", 200)
    est = memory.estimate(mlp_loss, trained_mlp, prune_batch, lay, 128)
    x_bytes = memory.CPU_IN_MEMORY_FACTOR * prune_batch["x"].shape[0] * 4  # per column of X
    fixed = est.in_memory - x_bytes * lay.size
    available = int((fixed + 400 * x_bytes) / memory.MEMORY_FRACTION)  # room for 400 columns of X within the margin
    monkeypatch.setattr(memory, "available_bytes", lambda device=None: available)
    est = memory.estimate(mlp_loss, trained_mlp, prune_batch, lay, 128)
    assert est.block_width == 296 and est.in_memory > est.budget  # 888 columns: 3 blocks of ≤ 400 → 296
    assert abs(est.blocked - (fixed + 296 * x_bytes)) <= 1
    res = swapjax.prune(mlp_loss, trained_mlp, prune_batch, sparsity=0.8, method=fixed_lr(), stages=1)
    assert res.mode == "blocked" and len(res.info[0].method_info.blocks) == 3
    assert "does not fit in memory" in capsys.readouterr().err
    monkeypatch.setattr(memory, "MIN_BLOCK_WIDTH", 500)  # no block of the minimum width fits: matrix-free
    assert swapjax.prune(mlp_loss, trained_mlp, prune_batch, sparsity=0.8, method=fixed_lr(), stages=1,
                         progress=False).mode == "matrix-free"
    with pytest.raises(ValueError, match=r"the blocked prune does not fit: .*options: mode='matrix-free', "
                                         r"narrower blocks \(mode=swapjax.Blocked\(width=...\)\)"):
        swapjax.prune(mlp_loss, trained_mlp, prune_batch, method=fixed_lr(), mode="blocked", progress=False)


@pytest.mark.parametrize("kwargs, message", [
    (dict(mode="blocks"), r"mode: must be 'auto', 'in-memory', 'blocked', 'matrix-free' or a swapjax.Blocked"),
    (dict(mode="blocked", noise=swapjax.GradientNoise(), key=jax.random.key(0)),
     r"'blocked' is not available here: gradient noise needs X formed whole"),
    (dict(mode="blocked", method=swapjax.Magnitude(scope="layer")),
     r"'blocked' is not available here: Magnitude needs whole layers .*LayerBudgets"),
    (dict(mode="blocked", devices=1), r"'blocked' is not available here: the blocked mode runs on one device"),
])
def test_blocked_mode_refusals_name_the_reason(trained_mlp, prune_batch, kwargs, message):
    kwargs = dict(dict(method=fixed_lr()), **kwargs)
    with pytest.raises(ValueError, match=message):
        swapjax.prune(mlp_loss, trained_mlp, prune_batch, sparsity=0.5, progress=False, **kwargs)


@pytest.mark.parametrize("kwargs, message", [(dict(width=0), r"width \(columns per block\)"),
                                             (dict(width=2.5), r"width \(columns per block\)"),
                                             (dict(budget="hessian"), r"budget: must be 'fisher' or 'magnitude'")])
def test_blocked_spec_is_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        swapjax.Blocked(**kwargs)


SOLVER_PROGRAMS = {"_projections", "_magnitude_reference", "_solve", "_nearby_gram", "_backsolves", "_swap",
                   "_anchor", "_ridge_fit", "_obs_start", "_reference_objectives", "_fill_block_chunk"}


def test_blocks_of_one_width_share_every_compiled_program(trained_mlp, prune_batch):
    """Blocks of equal width share one compilation of each program, whatever their share of the budget (the
    Gram and exchange widths follow each block's k at run time): LR with the swap search on 3 blocks of 296
    columns compiles each solver program at most once, and a second prune whose blocks keep counts in other
    power-of-two buckets (k ≈ 30 → ≈ 150 per block) compiles nothing. (tests/test_methods.py counts the
    selection's programs the same way.)"""
    kwargs = dict(method=fixed_lr(swap_rounds=5), stages=1, mode=swapjax.Blocked(width=300), progress=False)
    with counted() as first:
        res = swapjax.prune(mlp_loss, trained_mlp, prune_batch, sparsity=0.9, **kwargs)
    assert len(res.info[0].method_info.blocks) == 3
    solver = {name: count for name, count in first.items() if name.removeprefix("jit(").rstrip(")") in SOLVER_PROGRAMS}
    assert all(count == 1 for count in solver.values()), solver
    with counted() as second:
        res = swapjax.prune(mlp_loss, trained_mlp, prune_batch, sparsity=0.5, **kwargs)
    assert len(res.info[0].method_info.blocks) == 3 and res.summary()["total"]["kept"] == swapjax.kept_count(0.5, 888)
    assert not second, f"compiled again for other block counts: {dict(second)}"


def test_blocked_wraps_any_method_and_equals_the_blocked_mode(trained_mlp, prune_batch, capsys):
    """method=Blocked(LR, width) is mode=Blocked(width) with that method: the same weights and blocks; a
    Blocked method with another mode, or a mode Blocked with a method of its own, is a ValueError."""
    kwargs = dict(sparsity=0.8, stages=1, progress=False)
    wrapped = swapjax.prune(mlp_loss, trained_mlp, prune_batch, method=swapjax.Blocked(fixed_lr(), width=300), **kwargs)
    as_mode = swapjax.prune(mlp_loss, trained_mlp, prune_batch, method=fixed_lr(), mode=swapjax.Blocked(width=300),
                            **kwargs)
    assert wrapped.mode == as_mode.mode == "blocked"
    assert len(wrapped.info[0].method_info.blocks) == len(as_mode.info[0].method_info.blocks) == 3
    lay = pytree.layout(trained_mlp)
    np.testing.assert_array_equal(np.asarray(pytree.flatten(wrapped.params, lay)),
                                  np.asarray(pytree.flatten(as_mode.params, lay)))
    with pytest.raises(ValueError, match=r"mode: 'in-memory' with method=Blocked\(\.\.\.\), which holds X in column "
                                         r"blocks; leave mode as 'auto' or 'blocked'"):
        swapjax.prune(mlp_loss, trained_mlp, prune_batch, method=swapjax.Blocked(fixed_lr()), mode="in-memory",
                      **kwargs)
    with pytest.raises(ValueError, match=r"mode: a Blocked with a method of its own; pass it as "
                                         r"method=Blocked\(method, \.\.\.\)"):
        swapjax.prune(mlp_loss, trained_mlp, prune_batch, mode=swapjax.Blocked(fixed_lr()), **kwargs)
    assert repr(swapjax.Blocked(width=3)) == "Blocked(width=3, budget='fisher')"
    assert swapjax.Blocked(300, "magnitude") == swapjax.Blocked(width=300, budget="magnitude")  # the earlier form


def test_blocked_on_a_formed_x_solves_its_column_ranges():
    """Blocked(Magnitude(), width, budget="magnitude") on a formed X: each block keeps its share of the global
    top-k by |w̄|, so the result is the global magnitude mask (NumPy); the info has one entry per block."""
    rng = np.random.default_rng(0)
    X, w_bar = rng.normal(size=(6, 10)).astype(np.float32), rng.normal(size=10).astype(np.float32)
    w, info = swapjax.Blocked(swapjax.Magnitude(), width=4, budget="magnitude").solve(X, w_bar, 4)
    expected = np.zeros(10, bool)
    expected[np.argsort(-np.abs(w_bar), kind="stable")[:4]] = True
    np.testing.assert_array_equal(np.asarray(info.support), expected)
    np.testing.assert_array_equal(np.asarray(w), np.where(expected, w_bar, 0))
    assert len(info.blocks) == 3 and info.describe().startswith("3 blocks")
    with pytest.raises(ValueError, match=r"method: Blocked\(\) has no method to solve each block with"):
        swapjax.Blocked(width=4).solve(X, w_bar, 4)
