"""Dense (or masked) training of a Flax linen classifier with optax, evaluation, orbax checkpoints.

    variables = model.init(jax.random.key(0), x[:1])
    variables = swapjax.train(model, variables, x, y, epochs=10, batch_size=128,
                              optimizer=optax.adam(1e-3), key=jax.random.key(1),
                              checkpoint_dir="runs/mlpnet")
    accuracy, loss = swapjax.evaluate(model, variables, x_test, y_test)

The model maps a batch of inputs to logits; the loss is the mean softmax
cross-entropy with integer labels. Collections other than ``params`` (BatchNorm
``batch_stats``) are updated in training (``mutable``) and used as they are in
evaluation. When the model's ``__call__`` accepts an argument named
``train_arg`` (default ``"train"``) it gets True in training and False in
evaluation. Dropout (which needs an rng per step) is not supported.

Epochs shuffle with ``jax.random.fold_in(key, epoch)`` (epoch counted from 0),
so a run is a deterministic function of its arguments, and a run resumed from a
checkpoint ends bit-identical to an uninterrupted one.
"""
from __future__ import annotations

import inspect
import os
import sys
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from . import checks
from .finetune import batch_indices, masked_optimizer
from .pytree import PyTree, apply_masks, path_name


def _mode_kwargs(model, train_arg: Optional[str]) -> Optional[str]:
    """The keyword to pass the train/inference flag under, or None if the model takes none."""
    if train_arg is None:
        return None
    try:
        params = inspect.signature(type(model).__call__).parameters
    except (TypeError, ValueError):
        return None
    if train_arg in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return train_arg
    return None


def _split_variables(variables: PyTree) -> tuple[PyTree, dict]:
    if "params" not in variables:
        raise ValueError(f"variables: expected a Flax variables dict with a 'params' entry, got keys {list(variables)}")
    return variables["params"], {k: v for k, v in variables.items() if k != "params"}


def _logits(model, params, extra, xb, flag_name, training: bool):
    kwargs = {flag_name: training} if flag_name else {}
    variables = {"params": params, **extra}
    if training and extra:
        logits, new_extra = model.apply(variables, xb, mutable=list(extra), **kwargs)
        return logits, {**extra, **new_extra}
    return model.apply(variables, xb, **kwargs), extra


def _check_model(model) -> None:
    if isinstance(model, type):
        raise ValueError(f"model: got the class {model.__name__}; pass an instance, e.g. {model.__name__}()")
    if not callable(getattr(model, "apply", None)):
        raise ValueError(f"model: expected a Flax linen module (with .apply), got {model!r}")


def _check_masks(masks: PyTree, params: PyTree) -> None:
    """masks: boolean arrays shaped like the params they cover, None elsewhere (prune's result.masks)."""
    checks.mask_tree("masks", masks)
    shapes = {path_name(p): np.shape(w) for p, w in jax.tree_util.tree_flatten_with_path(params)[0]}
    for p, m in jax.tree_util.tree_flatten_with_path(masks, is_leaf=lambda m: m is None)[0]:
        name = path_name(p)
        if name not in shapes:
            raise ValueError(f"masks: {name!r} is not a leaf of variables['params'] (leaves: {list(shapes)})")
        if m is not None and np.ndim(m) and np.shape(m) != shapes[name]:
            raise ValueError(f"masks: {name!r} has shape {np.shape(m)}, the parameter {shapes[name]}")


def _check_xy(x, y) -> int:
    if not hasattr(x, "shape") or not hasattr(y, "shape"):
        raise ValueError(f"x, y: expected arrays (NumPy or JAX), got {type(x).__name__} and {type(y).__name__}")
    if np.ndim(x) < 1:
        raise ValueError(f"x: expected inputs of shape (n, ...), got shape {np.shape(x)}")
    if np.ndim(y) != 1:
        raise ValueError(f"y: expected integer labels of shape (n,), got shape {np.shape(y)}")
    if np.shape(x)[0] != np.shape(y)[0]:
        raise ValueError(f"x, y: different numbers of examples, {np.shape(x)[0]} and {np.shape(y)[0]}")
    if np.shape(y)[0] == 0:
        raise ValueError("x, y: need at least one example")
    if not np.issubdtype(np.asarray(y).dtype, np.integer):
        raise ValueError(f"y: expected integer class labels, got dtype {np.asarray(y).dtype}")
    if np.issubdtype(np.asarray(x).dtype, np.inexact) and not np.all(np.isfinite(np.asarray(x))):
        rows = np.flatnonzero(~np.all(np.isfinite(np.asarray(x).reshape(len(x), -1)), axis=1))
        raise ValueError(f"x: NaN or inf in {rows.size} of {len(x)} examples (examples {rows[:10].tolist()})")
    return int(np.shape(y)[0])


def train(
    model,
    variables: PyTree,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    optimizer: optax.GradientTransformation,
    key: jax.Array,
    checkpoint_dir: Optional[str] = None,
    masks: Optional[PyTree] = None,
    train_arg: Optional[str] = "train",
    max_to_keep: Optional[int] = 2,
    progress: bool = True,
) -> PyTree:
    """Train ``model`` for ``epochs`` epochs of mini-batch optax steps; returns the new variables.

    x: (n, ...) inputs, y: (n,) integer labels (NumPy; batches are gathered on the
    host). Each epoch visits n // batch_size shuffled batches (the remainder is
    dropped; it changes with the shuffle). masks: optional prune masks over
    ``variables["params"]``; pruned weights are then kept exactly zero
    (``masked_optimizer``). checkpoint_dir: after every epoch the parameters,
    other collections and optimizer state are saved there with orbax (a
    checkpoint is written to a temporary directory and renamed when complete, so
    an interrupted save leaves the previous one intact); a later call with the
    same directory restores the latest finished epoch and trains only the epochs
    left (its batch_size, n and key must match the checkpoint's). progress=False
    silences the line per epoch written to stderr.

    Examples:
        >>> import jax, numpy as np, optax, flax.linen as nn, swapjax
        >>> rng = np.random.default_rng(0)
        >>> x = rng.normal(size=(256, 4)).astype("float32")
        >>> y = (x[:, 0] + x[:, 1] > 0).astype("int32")     # two classes
        >>> model = nn.Dense(2)                              # logits of a batch
        >>> variables = model.init(jax.random.key(0), x[:1])
        >>> variables = swapjax.train(model, variables, x, y, epochs=10, batch_size=32,
        ...                           optimizer=optax.adam(0.05), key=jax.random.key(1), progress=False)
        >>> swapjax.evaluate(model, variables, x, y)[0] > 0.9  # training accuracy
        True
    """
    _check_model(model)
    epochs = checks.integer("epochs", epochs, 0)
    n = _check_xy(x, y)
    batch_size = checks.integer("batch_size", batch_size, 1)
    checks.optimizer("optimizer", optimizer)
    checks.prng_key("key", key)
    if checkpoint_dir is not None:
        checks.path_like("checkpoint_dir", checkpoint_dir)
    checks.string_or_none("train_arg", train_arg, "the name of the model's train/inference flag")
    checks.integer("max_to_keep", max_to_keep, 1, allow_none=True)
    checks.boolean("progress", progress)
    params, extra = _split_variables(variables)
    checks.finite_leaves("variables", variables, hint="; the weights must be finite before training")
    if masks is not None:
        _check_masks(masks, params)
    flag = _mode_kwargs(model, train_arg)
    tx = optimizer if masks is None else masked_optimizer(optimizer, masks)
    if masks is not None:
        params = apply_masks(params, masks)
    state = {"params": params, "extra": extra, "opt_state": tx.init(params)}
    log = (lambda msg: print(f"[swapjax] {msg}", file=sys.stderr, flush=True)) if progress else (lambda msg: None)

    manager, start = None, 0
    if checkpoint_dir is not None:
        manager = _Checkpoints(checkpoint_dir, max_to_keep, dict(batch_size=batch_size, num_examples=n, key=_key_list(key)))
        state, start = manager.restore(state, epochs)
        if start:
            log(f"resumed from the epoch-{start} checkpoint in {manager.directory}")

    def loss_fn(params, extra, xb, yb):
        logits, new_extra = _logits(model, params, extra, xb, flag, True)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()
        return loss, (new_extra, jnp.sum(jnp.argmax(logits, -1) == yb))

    @jax.jit
    def step(state, xb, yb):
        (loss, (extra, correct)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state["params"], state["extra"], xb, yb
        )
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        return {"params": params, "extra": extra, "opt_state": opt_state}, loss, correct

    x_host, y_host = np.asarray(x), np.asarray(y)
    try:
        for epoch in range(start, epochs):
            t0 = time.perf_counter()
            losses, correct, seen = [], [], 0
            for idx in batch_indices(n, batch_size, jax.random.fold_in(key, epoch)):
                state, loss, right = step(state, x_host[idx], y_host[idx])
                losses.append(loss)
                correct.append(right)
                seen += len(idx)
            if manager is not None:
                manager.save(epoch + 1, state)
            mean_loss = float(np.mean(jax.device_get(losses)))
            accuracy = float(np.sum(jax.device_get(correct))) / seen
            log(
                f"epoch {epoch + 1}/{epochs}: train loss {mean_loss:.4f}, train accuracy {accuracy:.4f}, "
                f"{time.perf_counter() - t0:.2f}s" + (" (checkpoint saved)" if manager is not None else "")
            )
    finally:
        if manager is not None:
            manager.close()
    return {"params": state["params"], **state["extra"]}


def evaluate(
    model,
    variables: PyTree,
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int = 1024,
    *,
    train_arg: Optional[str] = "train",
) -> tuple[float, float]:
    """(accuracy, mean softmax cross-entropy) of ``model`` on (x, y), in inference mode.

    Batched so big test sets fit in memory: the last batch is padded to
    ``batch_size`` and its padding weighted out, so one compilation serves every
    batch; sums are accumulated in float32 per batch and in float64 across
    batches.

    Examples:
        >>> import jax, jax.numpy as jnp, numpy as np, flax.linen as nn, swapjax
        >>> model = nn.Dense(2)
        >>> variables = {"params": {"kernel": jnp.array([[1.0, -1.0]]), "bias": jnp.zeros(2)}}
        >>> x = np.array([[1.0], [-1.0], [2.0]], "float32")
        >>> y = np.array([0, 1, 1], "int32")                # the third example is misclassified
        >>> accuracy, loss = swapjax.evaluate(model, variables, x, y)
        >>> round(accuracy, 4), round(loss, 4)  # loss: (2·log(1 + e⁻²) + log(1 + e⁴)) / 3
        (0.6667, 1.424)
    """
    _check_model(model)
    n = _check_xy(x, y)
    batch_size = checks.integer("batch_size", batch_size, 1)
    checks.string_or_none("train_arg", train_arg, "the name of the model's train/inference flag")
    params, extra = _split_variables(variables)
    flag = _mode_kwargs(model, train_arg)
    batch_size = min(batch_size, n)
    x_host, y_host = np.asarray(x), np.asarray(y)
    correct, total = 0.0, 0.0
    for a in range(0, n, batch_size):
        xb, yb = x_host[a:a + batch_size], y_host[a:a + batch_size]
        m = len(yb)
        if m < batch_size:
            pad = batch_size - m
            xb = np.concatenate([xb, np.zeros((pad,) + xb.shape[1:], xb.dtype)])
            yb = np.concatenate([yb, np.zeros(pad, yb.dtype)])
        weight = (np.arange(batch_size) < m).astype(np.float32)
        c, s = _eval_sums(model, flag, params, extra, xb, yb, weight)
        correct += float(c)
        total += float(s)
    return correct / n, total / n


def _eval_batch(params, extra, xb, yb, weight, model, flag):
    logits, _ = _logits(model, params, extra, xb, flag, False)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), yb)
    right = (jnp.argmax(logits, -1) == yb).astype(jnp.float32)
    return jnp.sum(right * weight), jnp.sum(losses * weight)


_eval_batch_jit = jax.jit(_eval_batch, static_argnames=("model", "flag"))


def _eval_sums(model, flag, params, extra, xb, yb, weight):
    """Jitted once per (model, flag, shapes): linen modules hash by their fields."""
    try:
        hash(model)
    except TypeError:  # an unhashable module: compile per call
        return jax.jit(lambda *a: _eval_batch(*a, model, flag))(params, extra, xb, yb, weight)
    return _eval_batch_jit(params, extra, xb, yb, weight, model=model, flag=flag)


def _key_list(key: jax.Array) -> list[int]:
    return [int(v) for v in np.ravel(np.asarray(jax.random.key_data(key)))]


class _Checkpoints:
    """One orbax CheckpointManager per run: step = number of finished epochs."""

    def __init__(self, directory: str, max_to_keep: Optional[int], meta: dict[str, Any]):
        import orbax.checkpoint as ocp

        self.ocp = ocp
        self.directory = os.path.abspath(os.fspath(directory))
        self.meta = meta
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
        )

    def restore(self, state: PyTree, epochs: int) -> tuple[PyTree, int]:
        """(state, finished epochs) from the latest checkpoint ≤ epochs, or (state, 0) if none."""
        steps = sorted(self.manager.all_steps())
        if not steps:
            return state, 0
        if steps[-1] > epochs and epochs not in steps:
            raise ValueError(
                f"checkpoint_dir: {self.directory} holds a checkpoint after epoch {steps[-1]}, more than "
                f"epochs={epochs}, and none after epoch {epochs}; ask for ≥ {steps[-1]} epochs or use a new directory"
            )
        step = epochs if steps[-1] > epochs else steps[-1]
        ocp = self.ocp
        restored = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(state), meta=ocp.args.JsonRestore())
        )
        saved = restored.meta
        for name, value in self.meta.items():
            if saved.get(name) != value:
                raise ValueError(
                    f"checkpoint_dir: the checkpoint in {self.directory} was written with {name}={saved.get(name)!r}, "
                    f"this run has {name}={value!r}; resume with the same arguments or use a new directory"
                )
        return restored.state, step

    def save(self, step: int, state: PyTree) -> None:
        ocp = self.ocp
        self.manager.save(
            step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(self.meta))
        )

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
