"""Masked fine-tuning: optax transformations that keep pruned weights at exactly zero.

A mask pytree (as ``swapjax.prune`` returns it) holds a boolean array for every
prunable leaf (True = kept) and None (or True) for leaves that are not pruned.

    tx = swapjax.masked_optimizer(optax.adamw(1e-3, weight_decay=1e-4), masks)
    # same as optax.chain(optax.adamw(...), keep_pruned_at_zero(masks))

**Why the masking transformation must come LAST in the chain.** Optax adds
together everything the transformations before the last one produce: weight
decay adds λ·w, momentum and Adam add their running averages (which may hold
gradient history from before pruning, or from the pruned coordinates' non-zero
gradients), ``add_noise`` adds noise. Masking the *gradients* first
(``chain(masked_updates(masks), opt)``) therefore does not guarantee zero
updates: a momentum trace carried over from dense training, weight decay on a
weight that is not yet exactly zero, or added noise all leak through. Masking
the *final* update (``chain(opt, keep_pruned_at_zero(masks))``) is the only
place where "the update of a pruned coordinate is exactly what we say" holds for
every optimizer. (The optimizer's statistics for pruned coordinates keep
evolving; they are simply never used.)

``make_finetune_hook`` builds the ``finetune(params, masks, stage) -> params``
hook of ``swapjax.prune``: by default one epoch of SGD between stages, as the
published SWAP scripts do.
"""
from __future__ import annotations

import sys
import time
from typing import Callable, Iterator, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from . import checks
from .pytree import PyTree, apply_masks, path_name


def _is_none(m) -> bool:
    return m is None


def _keep(m, kept, pruned):
    """kept where the mask is True, pruned elsewhere; a None mask keeps the whole leaf."""
    if m is None:
        return kept
    return jnp.where(jnp.asarray(m).astype(bool), kept, pruned)


class MaskedState(NamedTuple):
    """No state: the masks are fixed when the transformation is built."""


def masked_updates(masks: PyTree) -> optax.GradientTransformation:
    """Zero the updates of pruned coordinates; leaves under a None mask pass through unchanged.

    Pruned weights that are already exactly zero stay exactly zero (w + 0 = w).
    Chain it LAST (see the module docstring); prefer ``keep_pruned_at_zero``,
    which also zeroes pruned weights that are not zero yet.

    Examples:
        >>> import jax.numpy as jnp, optax, swapjax
        >>> params = {"w": jnp.array([1.0, 0.0, 3.0])}
        >>> masks = {"w": jnp.array([True, False, True])}   # the middle weight is pruned (and already 0)
        >>> tx = optax.chain(optax.sgd(0.1), swapjax.masked_updates(masks))
        >>> updates, _ = tx.update({"w": jnp.ones(3)}, tx.init(params))
        >>> (updates["w"] == 0).tolist()
        [False, True, False]
    """
    checks.mask_tree("masks", masks)

    def update_fn(updates, state, params=None):
        del params
        new = jax.tree_util.tree_map(
            lambda m, u: _keep(m, u, jnp.zeros((), u.dtype)), masks, updates, is_leaf=_is_none
        )
        return new, state

    return optax.GradientTransformation(_checked_init(masks), update_fn)


def keep_pruned_at_zero(masks: PyTree) -> optax.GradientTransformation:
    """Set the update of every pruned coordinate to −w, so ``optax.apply_updates`` leaves it at 0.

    w + (−w) is exactly 0 in IEEE arithmetic, so after every step the pruned
    weights are exactly zero, whatever they were before and whatever the
    optimizer in front of this transformation produced (weight decay, momentum,
    noise). Kept coordinates and leaves under a None mask get the incoming update
    unchanged. Needs ``params`` in ``update``; chain it LAST.

    Examples:
        >>> import jax.numpy as jnp, optax, swapjax
        >>> params = {"w": jnp.array([1.0, 2.0, 3.0])}      # the middle weight is pruned but not yet 0
        >>> masks = {"w": jnp.array([True, False, True])}
        >>> tx = optax.chain(optax.adamw(0.1, weight_decay=0.1), swapjax.keep_pruned_at_zero(masks))
        >>> updates, _ = tx.update({"w": jnp.ones(3)}, tx.init(params), params)
        >>> (optax.apply_updates(params, updates)["w"] == 0).tolist()
        [False, True, False]
    """
    checks.mask_tree("masks", masks)

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("keep_pruned_at_zero: params are needed; call tx.update(updates, state, params)")
        new = jax.tree_util.tree_map(
            lambda m, u, w: _keep(m, u, -jnp.asarray(w).astype(u.dtype)),
            masks, updates, params, is_leaf=_is_none,
        )
        return new, state

    return optax.GradientTransformation(_checked_init(masks), update_fn)


def _checked_init(masks):
    """``init(params)`` of a masking transformation: checks that ``masks`` fit ``params``; no state."""
    def init_fn(params):
        _check_masks_fit(masks, params)
        return MaskedState()
    return init_fn


def _check_masks_fit(masks, params) -> None:
    """ValueError unless ``masks`` has the structure of ``params`` and each array mask its leaf's shape."""
    mask_leaves, mask_def = jax.tree_util.tree_flatten_with_path(masks, is_leaf=_is_none)
    param_leaves, param_def = jax.tree_util.tree_flatten(params)
    if mask_def != param_def:
        raise ValueError(f"masks: expected the pytree structure of params, {param_def}; got {mask_def}. "
                         "Use the masks that swapjax.prune returned for these params (result.masks)")
    for (path, m), w in zip(mask_leaves, param_leaves):
        if m is not None and not isinstance(m, (bool, np.bool_)) and jnp.shape(m) != jnp.shape(w):
            raise ValueError(f"masks: the mask of {path_name(path)} has shape {jnp.shape(m)}, "
                             f"its parameter {jnp.shape(w)}")


def masked_optimizer(optimizer: optax.GradientTransformation, masks: PyTree) -> optax.GradientTransformation:
    """``optax.chain(optimizer, keep_pruned_at_zero(masks))``: the masked optimizer, masking last.

    Examples:
        >>> import jax.numpy as jnp, optax, swapjax
        >>> params = {"w": jnp.array([1.0, 2.0, 3.0]), "b": jnp.array([0.5])}
        >>> masks = {"w": jnp.array([True, False, True]), "b": None}  # b is not pruned
        >>> tx = swapjax.masked_optimizer(optax.sgd(0.1, momentum=0.9), masks)
        >>> state = tx.init(params)
        >>> for _ in range(3):
        ...     updates, state = tx.update({"w": jnp.ones(3), "b": jnp.ones(1)}, state, params)
        ...     params = optax.apply_updates(params, updates)
        >>> params["w"][1].item(), params["b"][0].item() < 0.5
        (0.0, True)
    """
    checks.optimizer("optimizer", optimizer)
    return optax.chain(optimizer, keep_pruned_at_zero(masks))


def batch_indices(n: int, batch_size: int, key: jax.Array) -> Iterator[np.ndarray]:
    """Indices of the batches of one epoch over n examples, shuffled by ``key`` (deterministic).

    The last incomplete batch is dropped (every step has the same shape, so one
    compilation; with BatchNorm a tiny last batch would also give degenerate
    statistics); ``batch_size`` larger than n is clipped to n.
    """
    if n < 1:
        raise ValueError(f"n: need at least one example, got {n}")
    if batch_size < 1:
        raise ValueError(f"batch_size: must be ≥ 1, got {batch_size}")
    batch_size = min(batch_size, n)
    order = np.asarray(jax.random.permutation(key, n))
    for b in range(n // batch_size):
        yield order[b * batch_size:(b + 1) * batch_size]


def batched_loss(per_example_loss: Callable[[PyTree, PyTree], jax.Array]) -> Callable[[PyTree, PyTree], jax.Array]:
    """Turn ``swapjax.prune``'s loss_fn(params, example) into loss(params, batch) = mean over the batch.

    Examples:
        >>> import jax.numpy as jnp, swapjax
        >>> def per_example(params, example):  # ONE example, as swapjax.prune wants it
        ...     return (example["x"] @ params["w"] - example["y"]) ** 2
        >>> loss = swapjax.batched_loss(per_example)
        >>> loss({"w": jnp.array([1.0, 0.0])}, {"x": jnp.eye(2), "y": jnp.zeros(2)}).item()  # mean of 1 and 0
        0.5
    """
    if not callable(per_example_loss):
        raise ValueError(f"per_example_loss: expected a function loss_fn(params, example) -> scalar, "
                         f"got {per_example_loss!r}")

    def loss(params, batch):
        return jnp.mean(jax.vmap(per_example_loss, in_axes=(None, 0))(params, batch))

    return loss


def _num_examples(data: PyTree) -> int:
    leaves = jax.tree_util.tree_leaves(data)
    if not leaves or any(np.ndim(a) < 1 for a in leaves):
        raise ValueError(f"data: expected a pytree of arrays with a leading axis (the examples), got "
                         f"{[np.shape(a) for a in leaves]}")
    sizes = {int(np.shape(a)[0]) for a in leaves}
    if len(sizes) != 1:
        raise ValueError(f"data: every leaf needs the same leading axis (the examples), got sizes {sorted(sizes)}")
    if 0 in sizes:
        raise ValueError("data: no examples (leading axis 0)")
    return sizes.pop()


def make_finetune_hook(
    loss_fn: Callable[[PyTree, PyTree], jax.Array],
    data: PyTree,
    optimizer: Optional[optax.GradientTransformation] = None,
    *,
    key: jax.Array,
    epochs: int = 1,
    steps: Optional[int] = None,
    batch_size: int = 128,
    progress: bool = True,
) -> Callable[[PyTree, PyTree, int], PyTree]:
    """The ``finetune(params, masks, stage) -> params`` hook of ``swapjax.prune``.

    loss_fn(params, batch) -> scalar mean loss over a batch (``batched_loss``
    converts prune's per-example loss); data: pytree of arrays whose leading axis
    indexes the examples (e.g. ``{"x": x, "y": y}``, NumPy or JAX). optimizer:
    any optax transformation (default ``optax.sgd(0.01, momentum=0.9)``); it is
    chained with ``keep_pruned_at_zero(masks)`` and freshly initialised at every
    stage. Each call runs ``epochs`` epochs (or exactly ``steps`` steps when
    given, cycling through epochs) of mini-batches of ``batch_size``, shuffled
    by ``jax.random.fold_in(key, stage)``, so a run is deterministic. The
    returned params are exactly zero off the masks. Models with BatchNorm: close
    loss_fn over fixed ``batch_stats`` (inference mode). progress=False silences
    the one line per stage written to stderr, as does ``swapjax.prune(..., progress=False)``.

    Examples:
        >>> import jax, jax.numpy as jnp, numpy as np, optax, swapjax
        >>> rng = np.random.default_rng(0)
        >>> params = {"w": rng.normal(size=(8, 4)).astype("float32")}
        >>> data = {"x": rng.normal(size=(64, 8)).astype("float32"), "y": rng.normal(size=(64, 4)).astype("float32")}
        >>> def loss_fn(params, example):
        ...     return jnp.sum((example["x"] @ params["w"] - example["y"]) ** 2)
        >>> hook = swapjax.make_finetune_hook(swapjax.batched_loss(loss_fn), data, optax.sgd(0.01),
        ...                                   key=jax.random.key(0), batch_size=16, progress=False)
        >>> result = swapjax.prune(loss_fn, params, data, sparsity=0.75, stages=(0.5, 0.75),
        ...                        method=swapjax.Magnitude(), finetune=hook, progress=False)  # tuned after stage 1
        >>> w, kept = np.asarray(result.params["w"]), np.asarray(result.masks["w"])
        >>> int(kept.sum()), bool(np.all(w[~kept] == 0))
        (8, True)
    """
    if not callable(loss_fn):
        raise ValueError(f"loss_fn: expected a function loss_fn(params, batch) -> scalar, got {loss_fn!r}")
    if optimizer is None:
        optimizer = optax.sgd(0.01, momentum=0.9)
    checks.optimizer("optimizer", optimizer)
    checks.prng_key("key", key)
    epochs = checks.integer("epochs", epochs, 0)
    steps = checks.integer("steps", steps, 0, allow_none=True)
    batch_size = checks.integer("batch_size", batch_size, 1)
    progress = checks.boolean("progress", progress)
    n = _num_examples(data)
    per_epoch = n // min(batch_size, n)
    total = steps if steps is not None else epochs * per_epoch

    @jax.jit
    def step(params, opt_state, masks, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = masked_optimizer(optimizer, masks).update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    def hook(params: PyTree, masks: PyTree, stage: int, progress: bool = True) -> PyTree:
        """``progress=False`` (``swapjax.prune(..., progress=False)`` passes it) silences this call."""
        t0 = time.perf_counter()
        params = apply_masks(params, masks)
        opt_state = masked_optimizer(optimizer, masks).init(params)
        stage_key = jax.random.fold_in(key, stage)
        losses = []
        done, epoch = 0, 0
        while done < total:
            for idx in batch_indices(n, batch_size, jax.random.fold_in(stage_key, epoch)):
                if done == total:
                    break
                batch = jax.tree_util.tree_map(lambda a: a[idx], data)
                params, opt_state, loss = step(params, opt_state, masks, batch)
                losses.append(loss)
                done += 1
            epoch += 1
        params = apply_masks(params, masks)
        if progress and hook_progress:
            first = float(losses[0]) if losses else float("nan")
            last = float(np.mean(jax.device_get(losses[-per_epoch:]))) if losses else float("nan")
            print(
                f"[swapjax] finetune after stage {stage}: {done} steps, batch loss {first:.4g} -> "
                f"{last:.4g} (mean of the last epoch), {time.perf_counter() - t0:.2f}s",
                file=sys.stderr, flush=True,
            )
        return params

    hook_progress = progress
    hook.accepts_progress = True  # swapjax.prune passes its own progress flag
    return hook


#: How ``swapjax.prune`` calls a fine-tuning hook, for messages.
HOOK_CALL = "finetune(params, masks, stage) -> params"


def check_hook(finetune, params: PyTree) -> None:
    """ValueError naming the hook, before any gradient, where ``finetune`` is not a function that
    ``swapjax.prune`` can call as ``finetune(params, masks, stage)`` (plus ``progress=`` for a hook
    marked ``accepts_progress``), read from its signature."""
    checks.callable_or_none("finetune", finetune, f"a function {HOOK_CALL}")
    if finetune is not None:
        extra = {"progress": True} if getattr(finetune, "accepts_progress", False) else {}
        checks.signature_accepts("finetune", finetune, (params, params, 1), extra, HOOK_CALL)


def run_hook(finetune, params: PyTree, masks: PyTree, stage: int, progress: bool) -> PyTree:
    """finetune(params, masks, stage), checked: it must return params of the same structure, the
    same leaf shapes, finite values; ValueError naming the hook otherwise.

    A hook built by :func:`make_finetune_hook` is silenced by ``progress=False``."""
    name = checks.callable_name(finetune)
    if getattr(finetune, "accepts_progress", False):
        out = finetune(params, masks, stage, progress=progress)
    else:
        out = finetune(params, masks, stage)
    if out is None:
        raise ValueError(f"finetune: the hook {name!r} returned None after stage {stage}; it must return the params")
    if jax.tree_util.tree_structure(out) != jax.tree_util.tree_structure(params):
        raise ValueError(
            f"finetune: the hook {name!r} returned a tree of another structure after stage {stage}: "
            f"expected {jax.tree_util.tree_structure(params)}, got {jax.tree_util.tree_structure(out)}"
        )
    for (where, new), old in zip(jax.tree_util.tree_flatten_with_path(out)[0], jax.tree_util.tree_leaves(params)):
        if np.shape(new) != np.shape(old):
            raise ValueError(f"finetune: the hook {name!r} returned {path_name(where) or '<root>'} of shape "
                             f"{np.shape(new)} after stage {stage}, expected {np.shape(old)}")
    checks.finite_leaves(f"finetune: the params returned by the hook {name!r} after stage {stage}", out,
                         hint="; lower its learning rate or check its loss")
    return out
