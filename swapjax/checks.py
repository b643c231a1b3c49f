"""Argument checks shared by the public entry points: each raises a ValueError (TypeError for a
class passed where an instance is expected) naming the argument and saying what is expected, before
any computation. Booleans are not numbers here (``True`` is not k = 1), and NaN and inf are not
finite numbers. A 0-d array (``jnp.asarray(0.75)``, ``np.float32(0.75)``, ``np.int64(3)``) is the
number it holds."""
from __future__ import annotations

import math
import numbers
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np


def path_name(path) -> str:
    """'Dense_0/kernel' for a key path (NNX ``.value`` included as ``/value``)."""
    return jax.tree_util.keystr(path, simple=True, separator="/")


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


#: The most stages ``swapjax.prune`` runs: each is at least one gradient pass and one solve.
MAX_STAGES = 1000


def scalar(value):
    """A 0-d array or NumPy scalar as the Python number (or bool) it holds; anything else unchanged. A
    float of fewer than 64 bits is read as the shortest decimal that rounds to it (``jnp.asarray(0.9)``
    is 0.9, not 0.8999999761581421), so that k = round((1 − s)·p) is the count the user wrote."""
    if isinstance(value, (np.ndarray, np.generic, jax.Array)) and np.ndim(value) == 0:
        try:
            value = np.asarray(value)[()]
        except Exception:  # a tracer: not a concrete number
            return value
        if isinstance(value, np.floating) and value.dtype.itemsize < 8 and np.isfinite(value):
            return float(str(value))
        return value.item() if hasattr(value, "item") else value
    return value


def integer(name: str, value, minimum: Optional[int] = None, allow_none: bool = False) -> Optional[int]:
    """``value`` as an int: a Python or NumPy integer (not a bool, a float or a string), ≥ ``minimum``."""
    if value is None and allow_none:
        return None
    value = scalar(value)
    ok = isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))
    if not ok or (minimum is not None and value < minimum):
        bound = f" ≥ {minimum}" if minimum is not None else ""
        none = "None or " if allow_none else ""
        raise ValueError(f"{name}: must be {none}an integer{bound}, got {_show(value)}")
    return int(value)


def real(name: str, value, lo: float = -math.inf, hi: float = math.inf, lo_open: bool = False,
         hi_open: bool = False) -> float:
    """``value`` as a float: a finite real number (not a bool or a string) in the interval given."""
    value = scalar(value)
    ok = isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
    ok = ok and math.isfinite(value)
    ok = ok and (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        if math.isfinite(lo) and math.isfinite(hi):
            where = f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        elif math.isfinite(lo):
            where = f"{'>' if lo_open else '≥'} {lo:g}"
        elif math.isfinite(hi):
            where = f"{'<' if hi_open else '≤'} {hi:g}"
        else:
            where = "a number"
        raise ValueError(f"{name}: must be {where}, got {_show(value)} (a finite number, not a bool or a string)")
    return float(value)


def boolean(name: str, value) -> bool:
    value = scalar(value)
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name}: must be True or False, got {_show(value)}")
    return bool(value)


def choice(name: str, value, options: tuple) -> Any:
    if not isinstance(value, str) or value not in options:
        names = [repr(o) for o in options]
        listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]
        raise ValueError(f"{name}: must be {listed}, got {_show(value)}")
    return value


def number_or_auto(name: str, value, symbol: str) -> None:
    """λ or ε: "auto" or a finite number ≥ 0."""
    if isinstance(value, str) and value == "auto":
        return
    value = scalar(value)
    ok = isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
    if not (ok and math.isfinite(value) and value >= 0):
        raise ValueError(f"{name}: {symbol} must be 'auto' or a finite number ≥ 0, got {_show(value)}")


def path(name: str, value) -> None:
    """A selection path: a non-empty tuple of finite numbers > 0."""
    ok = isinstance(value, tuple) and len(value) >= 1 and all(
        isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_)) and math.isfinite(v) and v > 0
        for v in map(scalar, value)
    )
    if not ok:
        raise ValueError(f"{name}: must be a non-empty tuple of finite numbers > 0, got {_show(value)}")


def callable_or_none(name: str, value, what: str) -> None:
    if value is not None and not callable(value):
        raise ValueError(f"{name}: expected None or {what}, got {_show(value)}")


#: The base of the pruning methods, :class:`swapjax.contract.Method`, which registers itself
#: (:func:`method_base`), so that this check imports nothing (contract imports checks).
_METHOD_BASE: list = []


def method_base(cls):
    """Register ``cls`` as the base class :func:`method` checks for (``swapjax.contract.Method``)."""
    _METHOD_BASE[:] = [cls]
    return cls


def method(value, name: str = "method") -> None:
    """A pruning method: an instance of a :class:`swapjax.contract.Method` subclass, not the class."""
    if isinstance(value, type):
        raise TypeError(
            f"{name}: got the class {value.__name__}; pass an instance, e.g. swapjax.{value.__name__}()"
        )
    if not isinstance(value, tuple(_METHOD_BASE)):
        raise ValueError(
            f"{name}: expected a swapjax method (swapjax.SWAP(), LR(), Magnitude(), WoodFisher(), or an "
            f"instance of your own subclass of swapjax.Method), got {_show(value)}"
        )


def segments(value, p: int, optional: bool = False):
    """Layer offsets 0 = o_0 ≤ o_1 ≤ … ≤ o_L = p (integers; ``swapjax.pytree.Layout.offsets``) as a
    tuple, or None where ``optional`` and none are given."""
    if value is None and optional:
        return None
    ok = not isinstance(value, (str, bytes)) and hasattr(value, "__iter__")
    values = [scalar(v) for v in value] if ok else []
    ok = ok and len(values) >= 2 and all(
        isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_)) for v in values)
    ok = ok and values[0] == 0 and values[-1] == p and all(a <= b for a, b in zip(values, values[1:]))
    if not ok:
        raise ValueError(
            f"segments: expected {'None or ' if optional else ''}the layer offsets, non-decreasing integers from 0 "
            f"to p = {p} (e.g. swapjax.pytree.layout(params).offsets), got {_show(value)}"
        )
    return tuple(int(v) for v in values)


def methods(value) -> None:
    """A non-empty mapping name -> method instance."""
    from collections.abc import Mapping

    if not isinstance(value, Mapping) or not value:
        raise ValueError(f"methods: expected a non-empty mapping name -> method, got {_show(value)}")
    for key, m in value.items():
        method(m, f"methods[{key!r}]")


def optimizer(name: str, value) -> None:
    """An optax GradientTransformation (anything with callable ``init`` and ``update``), not a factory."""
    if not (callable(getattr(value, "init", None)) and callable(getattr(value, "update", None))):
        hint = " (call it first, e.g. optax.adam(1e-3))" if callable(value) else ""
        raise ValueError(f"{name}: expected an optax GradientTransformation such as optax.adam(1e-3){hint}, "
                         f"got {_show(value)}")


def path_like(name: str, value) -> str:
    """A file-system path: a str or an os.PathLike (not bytes, not empty)."""
    import os

    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value) or isinstance(os.fspath(value), bytes):
        raise ValueError(f"{name}: expected a directory path (str or os.PathLike), got {_show(value)}")
    return os.fspath(value)


def string_or_none(name: str, value, what: str) -> None:
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{name}: expected None or {what}, got {_show(value)}")


def sparsities(name: str, value) -> tuple[float, ...]:
    """A non-empty sequence (not a string) of sparsities in [0, 1)."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__") or hasattr(value, "keys"):
        raise ValueError(f"{name}: expected a sequence of sparsities in [0, 1), got {_show(value)}")
    out = tuple(sparsity(s, f"{name} (each)") for s in value)
    if not out:
        raise ValueError(f"{name}: expected at least one sparsity, got {_show(value)}")
    return out


def mask_tree(name: str, masks) -> None:
    """A mask pytree as ``swapjax.prune`` returns it: boolean arrays (True = kept) and None."""
    if masks is None:
        raise ValueError(f"{name}: expected a pytree of boolean masks (swapjax.prune's result.masks), got None")
    for p, m in jax.tree_util.tree_flatten_with_path(masks)[0]:
        if isinstance(m, (bool, np.bool_)):
            continue  # True / False for a whole leaf
        if not hasattr(m, "dtype") or jnp.result_type(m) != jnp.bool_:
            what = f"dtype {jnp.result_type(m)}" if hasattr(m, "dtype") else type(m).__name__
            raise ValueError(
                f"{name}: every mask must be a boolean array (True = kept) or None; "
                f"{path_name(p) or '<root>'} is {what}"
            )


def noise_and_key(noise, key) -> None:
    """``noise``: None or a callable (a ``swapjax.GradientNoise``); a JAX PRNG ``key`` given where it is."""
    if noise is not None and not callable(noise):
        raise ValueError(f"noise: expected None or a swapjax.GradientNoise, got {noise!r}")
    if noise is not None and key is None:
        raise ValueError("key: a jax.random key is needed when noise is given")
    if key is not None:
        prng_key("key", key)


def prng_key(name: str, value) -> None:
    """A JAX PRNG key: ``jax.random.key(seed)`` (typed) or ``jax.random.PRNGKey(seed)`` (uint32, shape (2,))."""
    if isinstance(value, jax.Array) or isinstance(value, np.ndarray):
        dtype = value.dtype
        if jnp.issubdtype(dtype, jax.dtypes.prng_key) and value.ndim == 0:
            return
        if dtype == np.uint32 and value.shape == (2,):
            return
    raise ValueError(f"{name}: expected a JAX PRNG key such as jax.random.key(0), got {_show(value)}")


def sparsity(value, name: str = "sparsity") -> float:
    """A fraction in [0, 1); a percentage such as 90 is refused with the fraction it meant."""
    value = scalar(value)
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)) and 1 < value < 100:
        raise ValueError(f"{name}: must be the fraction of weights set to zero, in [0, 1), got {_show(value)}; "
                         f"for {value:g} % pass {value / 100:g}")
    return real(name, value, 0.0, 1.0, hi_open=True)


def stages(value):
    """"auto", an int 1 ≤ T ≤ ``MAX_STAGES`` (not a bool) or a sequence of at most ``MAX_STAGES``
    sparsities in [0, 1) (not another string), returned as "auto", an int or a tuple of floats."""
    expected = f"\"auto\", an integer in [1, {MAX_STAGES}] or a sequence of sparsities"
    if isinstance(value, str) and value == "auto":
        return value
    value = scalar(value)
    if isinstance(value, (bool, np.bool_)) or isinstance(value, (str, bytes)):
        raise ValueError(f"stages: expected {expected}, got {_show(value)}")
    if isinstance(value, numbers.Integral):
        if value > MAX_STAGES:
            raise ValueError(f"stages: at most {MAX_STAGES} (each stage is a gradient pass and a solve), "
                             f"got {value}; the cubic schedule gains little past 10 to 20 stages")
        return integer("stages", value, 1)
    if isinstance(value, numbers.Number) or not hasattr(value, "__iter__") or hasattr(value, "keys"):
        raise ValueError(f"stages: expected {expected}, got {_show(value)}")
    levels = tuple(real("stages (each sparsity)", s, 0.0, 1.0, hi_open=True) for s in value)
    if len(levels) > MAX_STAGES:
        raise ValueError(f"stages: at most {MAX_STAGES} sparsities (each stage is a gradient pass and a solve), "
                         f"got {len(levels)}")
    return levels


def finite_leaves(name: str, tree, hint: str = "", examples: bool = False) -> None:
    """ValueError naming the floating-point leaves of ``tree`` that hold NaN or inf (one compiled count
    per set of leaf shapes, one transfer); ``examples``: the leading axis indexes examples, named too."""

    named = [(path_name(p) or "<root>", x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
             if x is not None and (hasattr(x, "dtype") or isinstance(x, (float, int)))
             and jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    if not named:
        return
    counts = np.asarray(_nonfinite_counts([x for _, x in named]))
    bad = [f"{where} ({count} of {np.size(x)} entries{_bad_rows(x) if examples else ''})"
           for (where, x), count in zip(named, counts) if count]
    if bad:
        raise ValueError(f"{name}: NaN or inf in {', '.join(bad[:10])}{'...' if len(bad) > 10 else ''}{hint}")


def _bad_rows(x) -> str:
    """', examples [1, 3]': the first indices along axis 0 holding NaN or inf."""
    x = np.asarray(x)
    rows = np.flatnonzero(~np.isfinite(x.reshape(len(x), -1)).all(axis=1)) if x.ndim else np.zeros(0, int)
    return f", examples {rows[:10].tolist()}{'...' if len(rows) > 10 else ''}" if rows.size else ""


@jax.jit
def _nonfinite_counts(leaves) -> jax.Array:
    return jnp.stack([jnp.sum(~jnp.isfinite(x), dtype=jnp.int32) for x in leaves])


def same_structure(name: str, value, reference, reference_name: str) -> None:
    """``value`` has the pytree structure of ``reference`` and the same per-example shapes and dtypes."""
    s1, s2 = jax.tree_util.tree_structure(value), jax.tree_util.tree_structure(reference)
    if s1 != s2:
        raise ValueError(f"{name}: expected the pytree structure of {reference_name}, {s2}; got {s1}")
    for a, b in zip(jax.tree_util.tree_leaves(value), jax.tree_util.tree_leaves(reference)):
        if jnp.shape(a)[1:] != jnp.shape(b)[1:] or jnp.result_type(a) != jnp.result_type(b):
            raise ValueError(
                f"{name}: each example must look like {reference_name}'s: got a leaf of shape "
                f"{jnp.shape(a)} {jnp.result_type(a)} where {reference_name} has {jnp.shape(b)} "
                f"{jnp.result_type(b)} (the leading axis may differ)"
            )


def finite_losses(losses, name: str = "loss_fn") -> None:
    """ValueError naming the examples whose loss value is NaN or inf."""
    losses = np.asarray(losses)
    bad = np.flatnonzero(~np.isfinite(losses))
    if bad.size:
        raise ValueError(
            f"{name}: the loss is NaN or inf for {bad.size} of {losses.size} examples "
            f"(examples {bad[:10].tolist()}{'...' if bad.size > 10 else ''}, values "
            f"{losses[bad[:3]].tolist()}); check the loss function and those examples"
        )


def callable_name(fn) -> str:
    """How a user's function reads in a message: its ``__name__`` (a lambda: '<lambda>'), else its type's name."""
    return getattr(fn, "__name__", None) or type(fn).__name__


def signature_accepts(name: str, fn, args: tuple, kwargs: dict, expected: str) -> None:
    """ValueError naming ``name`` where ``fn`` cannot be called with ``args`` and ``kwargs``, read from
    ``inspect.signature`` without calling it (a function without a readable signature passes)."""
    import inspect

    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return
    try:
        signature.bind(*args, **kwargs)
    except TypeError as error:
        raise ValueError(f"{name}: {callable_name(fn)!r} cannot be called as {expected}: {error}") from None


def array_output(name: str, out, shape: tuple, what: str) -> None:
    """ValueError naming ``name`` unless ``out`` is an array of ``shape`` with finite entries (``what``: how
    it was called, for the message)."""
    if not hasattr(out, "shape") or not hasattr(out, "dtype"):
        raise ValueError(f"{name}: {what} returned {type(out).__name__}, expected an array of shape {shape}")
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"{name}: {what} returned shape {tuple(out.shape)}, expected {tuple(shape)}")
    if jnp.issubdtype(out.dtype, jnp.inexact) and not bool(jnp.all(jnp.isfinite(out))):
        count = int(jnp.sum(~jnp.isfinite(out)))
        raise ValueError(f"{name}: {what} returned NaN or inf in {count} of {int(np.prod(shape))} entries")
