"""swapjax.training (swapjax.train, swapjax.evaluate): dense training, evaluate() against NumPy, orbax resume equivalence, BatchNorm, masks."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import swapjax.training as train_mod
from swapjax.training import evaluate, train

C = 3


class Blobs(nn.Module):
    """8-16-3 tanh MLP without a train argument (the flag is then never passed)."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(C)(jnp.tanh(nn.Dense(16)(x)))


class BNNet(nn.Module):
    """Dense -> BatchNorm -> relu -> Dense, with the usual ``train`` flag."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Dense(16)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        return nn.Dense(C)(nn.relu(x))


@pytest.fixture(scope="module")
def blobs():
    """Three well-separated Gaussian blobs in 8-D (separable), 300 train and 150 test points."""
    r = np.random.default_rng(0)
    means = r.normal(size=(C, 8)) * 3 + 1.0

    def draw(n):
        y = r.integers(0, C, size=n).astype(np.int32)
        return (means[y] + r.normal(size=(n, 8))).astype(np.float32), y

    return draw(300), draw(150)


def _numpy_metrics(model, variables, x, y):
    logits = np.asarray(model.apply(variables, jnp.asarray(x)), np.float64)
    z = logits - logits.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    return float(np.mean(logits.argmax(1) == y)), float(-np.mean(logp[np.arange(len(y)), y]))


def _leaves_equal(a, b):
    """Bit-identity: a resumed run restores its state exactly and runs the same compiled step."""
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    return all(np.array_equal(np.asarray(u), np.asarray(v)) for u, v in zip(la, lb))


def test_training_reduces_loss_and_evaluate_matches_numpy(blobs, capsys):
    (x, y), (xt, yt) = blobs
    model = Blobs()
    v0 = model.init(jax.random.key(0), x[:1])
    acc0, loss0 = evaluate(model, v0, xt, yt, batch_size=64)
    v = train(model, v0, x, y, epochs=4, batch_size=32, optimizer=optax.adam(1e-2), key=jax.random.key(1))
    err = capsys.readouterr().err
    assert "epoch 1/4" in err and "epoch 4/4" in err
    acc, loss = evaluate(model, v, xt, yt, batch_size=64)  # 150 = 2×64 + 22: a padded last batch
    assert loss < 0.25 * loss0 and acc > 0.95
    for variables, (a, l) in ((v0, (acc0, loss0)), (v, (acc, loss))):
        na, nl = _numpy_metrics(model, variables, xt, yt)
        assert a == pytest.approx(na, abs=1e-12)
        assert l == pytest.approx(nl, rel=1e-5, abs=1e-6)
    # the batch size does not change the result (beyond float rounding)
    a1, l1 = evaluate(model, v, xt, yt, batch_size=1000)
    assert a1 == acc and l1 == pytest.approx(loss, rel=1e-5)
    # progress=False is silent; v0 is not mutated
    train(model, v0, x, y, epochs=1, batch_size=32, optimizer=optax.adam(1e-2), key=jax.random.key(1), progress=False)
    assert capsys.readouterr().err == ""


def test_batchnorm_trains_and_batch_stats_change(blobs):
    (x, y), (xt, yt) = blobs
    model = BNNet()
    v0 = model.init(jax.random.key(0), x[:2])
    assert set(v0) == {"params", "batch_stats"}
    _, loss0 = evaluate(model, v0, xt, yt)
    v = train(model, v0, x, y, epochs=3, batch_size=32, optimizer=optax.adam(1e-2), key=jax.random.key(1),
              progress=False)
    assert set(v) == {"params", "batch_stats"}
    stats, stats0 = v["batch_stats"]["BatchNorm_0"], v0["batch_stats"]["BatchNorm_0"]
    assert np.all(np.asarray(stats["mean"]) != np.asarray(stats0["mean"]))  # init: zeros
    assert np.all(np.asarray(stats["var"]) != np.asarray(stats0["var"]))  # init: ones
    acc, loss = evaluate(model, v, xt, yt)  # inference mode: running averages
    assert acc > 0.95 and loss < 0.25 * loss0
    # evaluate really uses the running statistics: corrupting them changes the result
    bad = {"params": v["params"], "batch_stats": jax.tree_util.tree_map(lambda s: s * 0 + 5.0, v["batch_stats"])}
    assert evaluate(model, bad, xt, yt)[1] != pytest.approx(loss)


def _bn_run(x, y, **kw):
    model = BNNet()
    v0 = model.init(jax.random.key(0), x[:2])
    args = dict(batch_size=32, optimizer=optax.adam(1e-2), key=jax.random.key(7))
    args.update(kw)
    return train(model, v0, x, y, **args)


def test_resume_after_one_epoch_equals_uninterrupted(blobs, tmp_path, capsys):
    (x, y), _ = blobs
    full = _bn_run(x, y, epochs=3, progress=False)
    ck = tmp_path / "ck"
    _bn_run(x, y, epochs=1, checkpoint_dir=str(ck))
    capsys.readouterr()
    resumed = _bn_run(x, y, epochs=3, checkpoint_dir=str(ck))
    err = capsys.readouterr().err
    assert "resumed from the epoch-1 checkpoint" in err
    assert "epoch 1/3" not in err and "epoch 2/3" in err and "epoch 3/3" in err
    assert _leaves_equal(full, resumed)
    assert sorted(int(p.name) for p in ck.iterdir() if p.name.isdigit()) == [2, 3]  # max_to_keep=2
    # a finished run restores without training
    again = _bn_run(x, y, epochs=3, checkpoint_dir=str(ck))
    err = capsys.readouterr().err
    assert "resumed from the epoch-3 checkpoint" in err and "/3:" not in err
    assert _leaves_equal(full, again)
    # an earlier epoch still on disk is restored exactly; one no longer kept is an error
    two = _bn_run(x, y, epochs=2, checkpoint_dir=str(ck), progress=False)
    assert _leaves_equal(two, _bn_run(x, y, epochs=2, progress=False))
    with pytest.raises(ValueError, match="after epoch 3"):
        _bn_run(x, y, epochs=1, checkpoint_dir=str(ck), progress=False)
    # different arguments than the checkpoint's: refused, not silently mixed
    with pytest.raises(ValueError, match="batch_size=32"):
        _bn_run(x, y, epochs=4, batch_size=16, checkpoint_dir=str(ck), progress=False)
    with pytest.raises(ValueError, match="key="):
        _bn_run(x, y, epochs=4, key=jax.random.key(8), checkpoint_dir=str(ck), progress=False)


def test_resume_after_a_crash_mid_epoch(blobs, tmp_path, monkeypatch):
    """An exception in the middle of epoch 2 leaves the epoch-1 checkpoint; the rerun matches."""
    (x, y), _ = blobs
    full = _bn_run(x, y, epochs=3, progress=False)
    real = train_mod.batch_indices
    calls = []

    def crashing(n, batch_size, key):
        calls.append(1)
        for i, idx in enumerate(real(n, batch_size, key)):
            if len(calls) == 2 and i == 3:
                raise KeyboardInterrupt
            yield idx

    monkeypatch.setattr(train_mod, "batch_indices", crashing)
    ck = tmp_path / "ck"
    with pytest.raises(KeyboardInterrupt):
        _bn_run(x, y, epochs=3, checkpoint_dir=str(ck), progress=False)
    monkeypatch.setattr(train_mod, "batch_indices", real)
    assert sorted(int(p.name) for p in ck.iterdir() if p.name.isdigit()) == [1]
    resumed = _bn_run(x, y, epochs=3, checkpoint_dir=str(ck), progress=False)
    assert _leaves_equal(full, resumed)


def test_train_with_masks_keeps_pruned_weights_zero(blobs):
    (x, y), (xt, yt) = blobs
    model = Blobs()
    v0 = model.init(jax.random.key(0), x[:1])
    r = np.random.default_rng(1)
    masks = jax.tree_util.tree_map(lambda w: jnp.asarray(r.random(w.shape) < 0.3) if w.ndim >= 2 else None,
                                   v0["params"])
    v = train(model, v0, x, y, epochs=3, batch_size=32, optimizer=optax.adamw(1e-2, weight_decay=0.1),
              key=jax.random.key(1), masks=masks, progress=False)
    for name in ("Dense_0", "Dense_1"):
        m, w = np.asarray(masks[name]["kernel"]), np.asarray(v["params"][name]["kernel"])
        assert np.all(w[~m] == 0) and np.all(w[m] != np.asarray(v0["params"][name]["kernel"])[m])
    assert evaluate(model, v, xt, yt)[0] > 0.9


def test_argument_errors(blobs):
    (x, y), _ = blobs
    model = Blobs()
    v0 = model.init(jax.random.key(0), x[:1])
    kw = dict(epochs=1, batch_size=8, optimizer=optax.sgd(0.1), key=jax.random.key(0))
    with pytest.raises(ValueError, match="different numbers"):
        train(model, v0, x, y[:-1], **kw)
    with pytest.raises(ValueError, match="integer class labels"):
        evaluate(model, v0, x, y.astype(np.float32))
    with pytest.raises(ValueError, match="'params'"):
        evaluate(model, v0["params"], x, y)
