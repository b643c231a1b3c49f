"""Argument checks shared by the public entry points: each raises a ValueError (TypeError for a
class passed where an instance is expected) naming the argument and saying what is expected, before
any computation. Booleans are not numbers here (``True`` is not k = 1), and NaN and inf are not
finite numbers."""
from __future__ import annotations

import math
import numbers
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def integer(name: str, value, minimum: Optional[int] = None, allow_none: bool = False) -> Optional[int]:
    """``value`` as an int: a Python or NumPy integer (not a bool, a float or a string), ≥ ``minimum``."""
    if value is None and allow_none:
        return None
    ok = isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))
    if not ok or (minimum is not None and value < minimum):
        bound = f" ≥ {minimum}" if minimum is not None else ""
        none = "None or " if allow_none else ""
        raise ValueError(f"{name}: must be {none}an integer{bound}, got {_show(value)}")
    return int(value)


def real(name: str, value, lo: float = -math.inf, hi: float = math.inf, lo_open: bool = False,
         hi_open: bool = False) -> float:
    """``value`` as a float: a finite real number (not a bool or a string) in the interval given."""
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
    ok = isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
    if not (ok and math.isfinite(value) and value >= 0):
        raise ValueError(f"{name}: {symbol} must be 'auto' or a finite number ≥ 0, got {_show(value)}")


def path(name: str, value) -> None:
    """A selection path: a non-empty tuple of finite numbers > 0."""
    ok = isinstance(value, tuple) and len(value) >= 1 and all(
        isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_)) and math.isfinite(v) and v > 0
        for v in value
    )
    if not ok:
        raise ValueError(f"{name}: must be a non-empty tuple of finite numbers > 0, got {_show(value)}")


def callable_or_none(name: str, value, what: str) -> None:
    if value is not None and not callable(value):
        raise ValueError(f"{name}: expected None or {what}, got {_show(value)}")


def method(value, name: str = "method") -> None:
    """A pruning method: an instance of a :class:`swapjax.contract.Method` subclass, not the class."""
    from .contract import Method

    if isinstance(value, type):
        raise TypeError(
            f"{name}: got the class {value.__name__}; pass an instance, e.g. swapjax.{value.__name__}()"
        )
    if not isinstance(value, Method):
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
    values = list(value) if ok else []
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
    from .pytree import path_name

    for p, m in jax.tree_util.tree_flatten_with_path(masks)[0]:
        if isinstance(m, (bool, np.bool_)):
            continue  # True / False for a whole leaf
        if not hasattr(m, "dtype") or jnp.result_type(m) != jnp.bool_:
            what = f"dtype {jnp.result_type(m)}" if hasattr(m, "dtype") else type(m).__name__
            raise ValueError(
                f"{name}: every mask must be a boolean array (True = kept) or None; "
                f"{path_name(p) or '<root>'} is {what}"
            )


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
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)) and 1 < value < 100:
        raise ValueError(f"{name}: must be the fraction of weights set to zero, in [0, 1), got {_show(value)}; "
                         f"for {value:g} % pass {value / 100:g}")
    return real(name, value, 0.0, 1.0, hi_open=True)


def stages(value) -> None:
    """"auto", an int T ≥ 1 (not a bool) or a sequence of numbers (not another string)."""
    if isinstance(value, str) and value == "auto":
        return
    if isinstance(value, (bool, np.bool_)) or isinstance(value, (str, bytes)):
        raise ValueError(f"stages: expected \"auto\", an integer ≥ 1 or a sequence of sparsities, got {_show(value)}")
    if isinstance(value, numbers.Integral):
        integer("stages", value, 1)
        return
    if isinstance(value, numbers.Number) or not hasattr(value, "__iter__"):
        raise ValueError(f"stages: expected \"auto\", an integer ≥ 1 or a sequence of sparsities, got {_show(value)}")
    for s in value:
        real("stages (each sparsity)", s, 0.0, 1.0, hi_open=True)


def finite_leaves(name: str, tree, leaves_with_names=None, hint: str = "") -> None:
    """ValueError naming the floating-point leaves of ``tree`` that hold NaN or inf."""
    from .pytree import path_name

    bad = []
    for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if x is None or not hasattr(x, "dtype") and not isinstance(x, (float, int)):
            continue
        if not jnp.issubdtype(jnp.result_type(x), jnp.inexact):
            continue
        if not bool(jnp.all(jnp.isfinite(jnp.asarray(x)))):
            count = int(np.size(x) - np.sum(np.isfinite(np.asarray(x))))
            bad.append(f"{path_name(p) or '<root>'} ({count} of {np.size(x)} entries)")
    if bad:
        raise ValueError(f"{name}: NaN or inf in {', '.join(bad[:10])}{'...' if len(bad) > 10 else ''}{hint}")


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
