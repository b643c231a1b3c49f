"""swapjax.finetune: masked optax transformations (exact zeros) and the finetune hook of swapjax.prune."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import fixed_lr, mlp_loss

import swapjax
from swapjax import pytree
from swapjax.finetune import (
    MaskedState, batched_loss, keep_pruned_at_zero, make_finetune_hook, masked_optimizer, masked_updates,
)

D, H, C, N = 10, 16, 3, 256


def _problem():
    """Tiny tanh MLP (no dead units: every gradient coordinate is non-zero), random masks, data."""
    r = np.random.default_rng(0)
    params = {
        "w1": jnp.asarray(r.normal(size=(D, H)) / np.sqrt(D), jnp.float32),
        "b1": jnp.asarray(r.normal(size=(H,)) * 0.1, jnp.float32),
        "w2": jnp.asarray(r.normal(size=(H, C)) / np.sqrt(H), jnp.float32),
        "b2": jnp.zeros((C,), jnp.float32),
    }
    masks = {
        "w1": jnp.asarray(r.random((D, H)) < 0.5),
        "b1": None,
        "w2": jnp.asarray(r.random((H, C)) < 0.5),
        "b2": None,
    }
    x = r.normal(size=(N, D)).astype(np.float32)
    y = (x[:, :C].argmax(1)).astype(np.int32)
    return params, masks, {"x": jnp.asarray(x), "y": jnp.asarray(y)}


def _loss(params, batch):
    h = jnp.tanh(batch["x"] @ params["w1"] + params["b1"])
    logits = h @ params["w2"] + params["b2"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()


def _run(tx, params, data, steps, state=None):
    state = tx.init(params) if state is None else state

    @jax.jit
    def step(params, state):
        grads = jax.grad(_loss)(params, data)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for _ in range(steps):
        params, state = step(params, state)
    return params, state


OPTIMIZERS = {
    "adamw": optax.adamw(1e-2, b1=0.9, weight_decay=0.1),
    "sgd-momentum-decay": optax.chain(optax.add_decayed_weights(0.05), optax.sgd(0.1, momentum=0.9, nesterov=True)),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_pruned_weights_exactly_zero_after_200_steps(name):
    params, masks, data = _problem()
    start = pytree.apply_masks(params, masks)
    out, _ = _run(masked_optimizer(OPTIMIZERS[name], masks), start, data, 200)
    for leaf in ("w1", "w2"):
        w, w0, m = np.asarray(out[leaf]), np.asarray(start[leaf]), np.asarray(masks[leaf])
        assert 0 < m.sum() < m.size
        assert np.all(w[~m] == 0), f"{leaf}: pruned weights moved off exactly 0"
        assert np.all(w[m] != w0[m]), f"{leaf}: every kept weight should have moved"
    for leaf in ("b1", "b2"):  # not pruned: trained freely
        assert np.all(np.asarray(out[leaf]) != np.asarray(start[leaf]))
    assert float(_loss(out, data)) < 0.5 * float(_loss(start, data))


def test_keep_pruned_at_zero_single_update_exact():
    """Kept coordinates and None leaves get the optimizer's update unchanged; pruned get −w."""
    params, masks, data = _problem()  # unmasked params: pruned coordinates are not zero yet
    grads = jax.grad(_loss)(params, data)
    inner = optax.adamw(1e-2, weight_decay=0.1)
    ref, _ = inner.update(grads, inner.init(params), params)
    tx = masked_optimizer(inner, masks)
    upd, state = tx.update(grads, tx.init(params), params)
    assert isinstance(state[1], MaskedState)
    # both run optax's update op by op on the same inputs, and the mask only selects: exact
    for leaf in ("b1", "b2"):
        np.testing.assert_array_equal(upd[leaf], ref[leaf])
    for leaf in ("w1", "w2"):
        m = np.asarray(masks[leaf])
        np.testing.assert_array_equal(np.asarray(upd[leaf])[m], np.asarray(ref[leaf])[m])
        np.testing.assert_array_equal(np.asarray(upd[leaf])[~m], -np.asarray(params[leaf])[~m])
    new = optax.apply_updates(params, upd)
    assert all(np.all(np.asarray(new[leaf])[~np.asarray(masks[leaf])] == 0) for leaf in ("w1", "w2"))
    with pytest.raises(ValueError, match="params are needed"):
        keep_pruned_at_zero(masks).update(grads, MaskedState())


def test_masked_updates_zeroes_only_pruned_updates():
    params, masks, data = _problem()
    grads = jax.grad(_loss)(params, data)
    upd, _ = masked_updates(masks).update(grads, MaskedState())
    for leaf in ("b1", "b2"):
        np.testing.assert_array_equal(upd[leaf], grads[leaf])
    for leaf in ("w1", "w2"):
        m = np.asarray(masks[leaf])
        assert np.all(np.asarray(upd[leaf])[~m] == 0)
        np.testing.assert_array_equal(np.asarray(upd[leaf])[m], np.asarray(grads[leaf])[m])
    # True (instead of None) for a leaf that is not pruned also leaves it untouched
    upd2, _ = masked_updates({**masks, "b1": True}).update(grads, MaskedState())
    np.testing.assert_array_equal(upd2["b1"], grads["b1"])


def test_chaining_order_matters_with_momentum_from_dense_training():
    """Masking the gradients first lets a momentum trace from before pruning move pruned weights;
    masking the final update (masked_optimizer) keeps them at exactly 0."""
    params, masks, data = _problem()
    opt = optax.sgd(0.1, momentum=0.9)
    dense, dense_state = _run(opt, params, data, 20)
    pruned = pytree.apply_masks(dense, masks)

    wrong = optax.chain(masked_updates(masks), opt)
    out_wrong, _ = _run(wrong, pruned, data, 5, state=(MaskedState(), dense_state))
    assert np.any(np.asarray(out_wrong["w1"])[~np.asarray(masks["w1"])] != 0)

    right = masked_optimizer(opt, masks)
    out_right, _ = _run(right, pruned, data, 5, state=(dense_state, MaskedState()))
    for leaf in ("w1", "w2"):
        assert np.all(np.asarray(out_right[leaf])[~np.asarray(masks[leaf])] == 0)


def test_hook_steps_determinism_and_progress(capsys):
    params, masks, data = _problem()
    hook = make_finetune_hook(_loss, data, optax.sgd(0.1), key=jax.random.key(3), steps=11, batch_size=32)
    a = hook(params, masks, 1)  # unmasked input: the hook masks it first
    err = capsys.readouterr().err
    assert "finetune after stage 1: 11 steps" in err
    quiet = make_finetune_hook(_loss, data, optax.sgd(0.1), key=jax.random.key(3), steps=11, batch_size=32,
                               progress=False)
    b = quiet(params, masks, 1)
    assert capsys.readouterr().err == ""
    for leaf in params:
        np.testing.assert_array_equal(a[leaf], b[leaf])  # same key and stage: identical
    c = quiet(params, masks, 2)  # another stage shuffles differently
    assert not np.array_equal(np.asarray(c["w1"]), np.asarray(a["w1"]))
    for leaf in ("w1", "w2"):
        assert np.all(np.asarray(a[leaf])[~np.asarray(masks[leaf])] == 0)
    # default: one epoch = N // batch_size steps
    make_finetune_hook(_loss, data, key=jax.random.key(0), batch_size=64)(params, masks, 4)
    assert f"{N // 64} steps" in capsys.readouterr().err


def test_hook_inside_prune_three_stages(trained_mlp, prune_batch, digits):
    """With λ fixed (no held-out λ walk or one-shot comparison per stage); the slow test uses LR()."""
    _hook_inside_prune(trained_mlp, prune_batch, digits, fixed_lr())


@pytest.mark.slow
def test_hook_inside_prune_three_stages_with_selection(trained_mlp, prune_batch, digits):
    _hook_inside_prune(trained_mlp, prune_batch, digits, swapjax.LR())


def _hook_inside_prune(trained_mlp, prune_batch, digits, method):
    x, y = digits
    data = {"x": jnp.asarray(x[:512]), "y": jnp.asarray(y[:512])}
    loss = batched_loss(mlp_loss)
    hook = make_finetune_hook(loss, data, optax.sgd(0.05, momentum=0.9), key=jax.random.key(0),
                              batch_size=64, progress=False)
    calls = []

    def recording(params, masks, stage):
        out = hook(params, masks, stage)
        calls.append((stage, params, masks, out))
        return out

    res = swapjax.prune(mlp_loss, trained_mlp, prune_batch, sparsity=0.8, method=method,
                        stages=[0.5, 0.7, 0.8], finetune=recording, progress=False)
    assert [c[0] for c in calls] == [1, 2]  # between stages, not after the last
    for stage, before, masks, after in calls:
        for name in ("Dense_0", "Dense_1"):
            m = np.asarray(masks[name]["kernel"])
            w, w0 = np.asarray(after[name]["kernel"]), np.asarray(before[name]["kernel"])
            assert m.dtype == bool and masks[name]["bias"] is None
            assert np.all(w[~m] == 0), f"stage {stage}: hook output not zero off the mask"
            assert np.all(w0[~m] == 0)
            assert np.mean(w[m] != w0[m]) > 0.9, "fine-tuning should move the kept weights"
        kept = sum(int(np.sum(masks[n]["kernel"])) for n in ("Dense_0", "Dense_1"))
        assert kept == swapjax.kept_count([0.5, 0.7][stage - 1], 64 * 12 + 12 * 10)
        assert float(loss(after, data)) < float(loss(before, data)), "one epoch of SGD should lower the loss"
    for name in ("Dense_0", "Dense_1"):
        m = np.asarray(res.masks[name]["kernel"])
        assert np.all(np.asarray(res.params[name]["kernel"])[~m] == 0)
    assert res.summary()["total"]["kept"] == swapjax.kept_count(0.8, 64 * 12 + 12 * 10)
