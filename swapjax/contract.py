"""The method contract: what both drivers (``swapjax.prune``, ``swapjax.prune_layerwise``) read of a method.

A method is a subclass of :class:`Method`. It declares what it needs (``needs``): ``"X"`` (the
per-sample gradients of the problem, an :class:`swapjax.operators.Operator`), ``"H"`` (one layer's
Gram H = AᵀA of its inputs and the layer's shape (d_in, d_out)), or ``"w"`` (w̄ and the constraint
alone). A driver fills a :class:`Problem` with what it has and calls ``method.solve_problem(problem)
-> (w, info)``; ``info`` has the fields of :class:`Info`.

- ``swapjax.prune`` supplies X (network-wide): a method that needs H is a ValueError there;
- ``swapjax.prune_layerwise`` supplies H and the shape, one layer at a time (:func:`solve_layer`);
  a method that needs X gets the layer's X = I ⊗ Lᵀ with LLᵀ = H + δI
  (:class:`swapjax.operators.LayerOperator`): ½‖X(w − w̄)‖² is the layer's reconstruction error.

So a method written once runs in both drivers where its needs can be met. What else a driver needs
to know is declared, as class attributes or properties of the base, never probed:

- ``matrix_free``: ``solve`` accepts an X that is not formed (an operator of products only);
  False means the driver forms X;
- ``selects``: ``solve`` chooses values of its own on held-out loss and needs a ``score``;
- ``needs_segments``: ``solve`` needs the layer offsets (``segments``);
- ``without_search()``: the cheaper variant for the stages before the last under
  ``prune(stages="auto")`` (the method itself by default).

The constraint has one currency, :class:`swapjax.Groups` (``problem.groups``): on one layer, the
groups of that layer's d_in·d_out weights, row-major (``groups.nm`` = (n, m) for N:M groups).
"""
from __future__ import annotations

import abc
import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Optional, Protocol, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from . import checks
from .constraints import Groups, as_groups
from .operators import PERCDAMP, LayerOperator, live

#: score(w): the held-out loss of the pruned network, a float or the vector of per-example losses
#: (lower is better).
Score = Callable[[jax.Array], Union[float, np.ndarray]]


class Info(Protocol):
    """What every method's info holds (arrays unless noted): ``support`` (p,) bool, the kept weights;
    ``objective`` f at the result and ``objective_trace`` (index 0: f at the start, H(w_start));
    ``duals``, the Sinkhorn potentials to warm-start the next stage (passed through by methods
    without a plan); ``held_out_loss`` (float): the held-out loss of the result where the method chose it
    on one, else NaN (the driver then scores the result itself); ``gradient_seconds`` (float): time spent
    computing gradients inside the solve (the blocked solve's; the driver moves it out of the solve's
    time), else 0. ``describe()``: the method's own diagnostics as a phrase for the progress line ("" for
    none); ``warnings(n)``: messages for the driver to warn. Everything else on it is the method's own:
    :class:`swapjax.StageInfo` keeps the info as ``method_info``."""

    support: jax.Array
    objective: jax.Array
    objective_trace: jax.Array
    duals: tuple
    held_out_loss: float
    gradient_seconds: float

    def describe(self) -> str: ...

    def warnings(self, n: int) -> tuple[str, ...]: ...


#: What a method may need (``Method.needs``): the per-sample gradients X, one layer's Gram H, or w̄ alone.
NEEDS = ("X", "H", "w")


@dataclass(frozen=True)
class Problem:
    """One pruning problem, as a driver fills it: w̄ ∈ R^p, the constraint ``groups`` on its p weights, and
    what the driver has of the curvature: ``X`` (the per-sample gradients, an operator; network-wide, or a
    layer's :class:`~swapjax.operators.LayerOperator`) and/or ``H`` (one layer's Gram, d_in × d_in) with
    ``shape`` = (d_in, d_out) (w̄ is that layer's kernel flattened row-major). ``w_start``: where the stage
    starts (None: w̄); ``duals``: the previous stage's Sinkhorn potentials or None; ``score``: the held-out
    loss, given only to a method that ``selects``; ``segments``: the layer offsets, given only where
    ``needs_segments``; ``name``: the layer's name (layer by layer), for messages.

    Examples:
        >>> import numpy as np, swapjax
        >>> X, w_bar = np.eye(4, dtype="float32"), np.array([3.0, -2.0, 1.0, 0.5], "float32")
        >>> w, info = swapjax.Magnitude().solve_problem(swapjax.Problem(w_bar, swapjax.Groups.top_k(2), X=X))
        >>> w.tolist()                    # the same solve as Magnitude().solve(X, w_bar, 2)
        [3.0, -2.0, 0.0, 0.0]
    """

    w_bar: Any
    groups: Groups
    X: Any = None
    H: Any = None
    shape: Optional[tuple] = None
    w_start: Any = None
    duals: Optional[tuple] = None
    score: Optional[Score] = None
    segments: Optional[Sequence[int]] = None
    name: str = ""

    def replace(self, **changes) -> "Problem":
        return dataclasses.replace(self, **changes)


@checks.method_base
class Method(abc.ABC):
    """A pruning method: ``w, info = method.solve_problem(problem)`` on a :class:`Problem`.

    ``needs``: ``"X"`` (default), ``"H"`` or ``"w"`` (module notes). A method implements either
    ``solve_problem(problem)`` (any method; an H method must) or, for a method on X, the bare form
    ``solve(X, w_bar, k, w_start=None, duals=None, *, score=None, segments=None)``; each of the two
    defaults calls the other, so both work on every method. ``k`` there: an int (the global top-k)
    or a :class:`swapjax.Groups`; ``X``: a matrix or a :class:`swapjax.operators.Operator`. The
    result must be feasible for the constraint, zero off ``info.support``, and leave the inputs
    unchanged.

    Examples:
        A new method in one class: keep the largest |w_j|·‖x_j‖ (the weight times its
        column norm of X) under whatever constraint ``prune`` passes.

        >>> import jax.numpy as jnp, numpy as np, swapjax
        >>> from swapjax.baselines import BaselineInfo
        >>> from swapjax.constraints import as_groups
        >>> from swapjax.operators import as_operator
        >>> class ScaledMagnitude(swapjax.Method):
        ...     matrix_free = True                       # products and diag(XᵀX) suffice
        ...     def solve(self, X, w_bar, k, w_start=None, duals=None, *, score=None, segments=None):
        ...         X, groups = as_operator(X), as_groups(k)
        ...         support = groups.project(jnp.abs(w_bar) * jnp.sqrt(X.col_sq))
        ...         w = jnp.where(support, w_bar, 0)
        ...         r = X.products().mv(w - w_bar)             # f = ½‖X(w − w̄)‖²
        ...         f = 0.5 * r @ r
        ...         return w, BaselineInfo(f, f[None], support, r, duals)
        >>> X = np.diag([1.0, 4.0, 1.0, 1.0]).astype("float32")
        >>> w, info = ScaledMagnitude().solve(X, np.array([3.0, 1.0, 2.0, 0.5], "float32"), 2)
        >>> w.tolist()                                   # |w|·‖x‖ = 3, 4, 2, 0.5
        [3.0, 1.0, 0.0, 0.0]
        >>> rng = np.random.default_rng(0)
        >>> params = {"w": rng.normal(size=(8, 4)).astype("float32")}
        >>> batch = {"x": rng.normal(size=(16, 8)).astype("float32")}
        >>> loss_fn = lambda params, ex: jnp.sum(jnp.tanh(ex["x"] @ params["w"]) ** 2)
        >>> swapjax.prune(loss_fn, params, batch, method=ScaledMagnitude(), constraint=swapjax.NM(2, 4),
        ...               progress=False).summary()["total"]
        {'kept': 16, 'total': 32, 'sparsity': 0.5, 'constraint': '2:4'}
    """

    #: What ``solve_problem`` reads of the problem besides w̄ and the groups: "X", "H" or "w" (nothing more).
    needs: ClassVar[str] = "X"

    #: ``solve`` accepts an operator that is not formed (products Xv, Xᵀu and diag(XᵀX) only).
    matrix_free: ClassVar[bool] = False

    @property
    def selects(self) -> bool:
        """True when ``solve`` chooses values on held-out loss: the driver then passes ``score``."""
        return False

    @property
    def needs_segments(self) -> bool:
        """True when ``solve`` needs the layer offsets (``segments=``)."""
        return False

    def without_search(self) -> "Method":
        """The variant for the stages before the last under ``prune(stages="auto")``."""
        return self

    def solve_problem(self, problem: Problem) -> tuple[jax.Array, "Info"]:
        """The pruned weights w ∈ R^p and the info of the solve. By default the bare form ``solve`` on
        the problem's X (a method that needs H overrides this)."""
        if type(self).solve is Method.solve:
            raise TypeError(f"{type(self).__name__} implements neither solve_problem(problem) nor "
                            "solve(X, w_bar, k, ...)")
        declared = {}
        if problem.score is not None:
            declared["score"] = problem.score
        if problem.segments is not None:
            declared["segments"] = problem.segments
        return self.solve(problem.X, problem.w_bar, problem.groups, problem.w_start, problem.duals, **declared)

    def solve(self, X, w_bar, k, w_start=None, duals=None, *, score: Optional[Score] = None,
              segments: Optional[Sequence[int]] = None) -> tuple[jax.Array, "Info"]:
        """The bare form on X: ``solve_problem`` on Problem(w̄, k as Groups, X, w_start, duals, score, segments)."""
        if type(self).solve_problem is Method.solve_problem:
            raise TypeError(f"{type(self).__name__} implements neither solve_problem(problem) nor "
                            "solve(X, w_bar, k, ...)")
        return self.solve_problem(Problem(w_bar, as_groups(k), X=X, w_start=w_start, duals=duals, score=score,
                                          segments=segments))


def check_result(method: Method, w, info, k, p: int, dtype) -> jax.Array:
    """``w`` as a JAX array, once checked against the contract; ValueError naming the method where w is
    not a finite (p,) array of a real floating dtype (``dtype``: w̄'s, for the message), ``info.support`` not a (p,) boolean mask that keeps
    exactly the constraint's counts (``k``: an int or :class:`swapjax.Groups`), or w is non-zero off it."""
    import jax.numpy as jnp

    from .constraints import as_groups

    name = f"method: {type(method).__name__}.solve"
    if not hasattr(w, "shape") or not hasattr(w, "dtype"):
        raise ValueError(f"{name} returned w of type {type(w).__name__}; expected an array of shape ({p},)")
    if tuple(w.shape) != (p,):
        raise ValueError(f"{name} returned w of shape {tuple(w.shape)}; expected ({p},), one weight per prunable "
                         f"coordinate")
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise ValueError(f"{name} returned w of dtype {w.dtype}; expected a real floating dtype (w̄'s is {dtype})")
    w = jnp.asarray(w)
    finite = jnp.isfinite(w)
    if not bool(jnp.all(finite)):
        raise ValueError(f"{name} returned NaN or inf in {int(jnp.sum(~finite))} of {p} weights")
    support = getattr(info, "support", None)
    kind = getattr(support, "dtype", None)
    if kind is None or tuple(np.shape(support)) != (p,) or kind != np.bool_:
        what = "no support array" if kind is None else f"{kind}{tuple(np.shape(support))}"
        raise ValueError(f"{name} returned info.support {what}; expected a ({p},) boolean mask (True = kept)")
    support = jnp.asarray(support)
    groups = as_groups(k)
    kept = int(jnp.sum(support))
    if not bool(groups.feasible(support)):
        detail = ""
        if groups.ids is not None:
            counts = jax.ops.segment_sum(support.astype(jnp.int32), groups.ids, groups.num_groups)
            detail = f", {int(jnp.sum(counts != groups.counts))} of {groups.num_groups} groups off their count"
        raise ValueError(f"{name} returned a support that keeps {kept} weights where the constraint "
                         f"({groups.label}) keeps {int(groups.k)}{detail}")
    off = int(jnp.sum((w != 0) & ~support))
    if off:
        raise ValueError(f"{name} returned {off} non-zero weights outside info.support (which keeps {kept}); "
                         f"the pruned weights must be exactly 0")
    return w


# ---------------------------------------------------------------------------
# one layer: what prune_layerwise calls


def for_layer(method: Method, problem: Problem, percdamp: Optional[float] = None) -> Problem:
    """``problem`` (a layer's: H and shape) with what ``method`` needs added: for a method on X, the layer's
    X = I ⊗ Lᵀ with LLᵀ = H + δI (:class:`~swapjax.operators.LayerOperator`, δ = percdamp·mean diag H,
    default ``operators.PERCDAMP``), and the layer as one segment where it needs segments."""
    if method.needs == "X" and problem.X is None:
        if not method.matrix_free:
            raise ValueError(f"method: {type(method).__name__} needs X formed (its columns), and layer by layer X is the "
                             "layer's operator I ⊗ Lᵀ (never formed); use it network-wide with swapjax.prune")
        problem = problem.replace(X=LayerOperator.from_gram(problem.H, problem.shape[1],
                                                            PERCDAMP if percdamp is None else percdamp))
    if method.needs_segments and problem.segments is None:
        problem = problem.replace(segments=(0, int(np.prod(problem.shape))))
    return problem


def solve_layer(method: Method, name: str, W_bar, H, groups: Groups) -> tuple[jax.Array, np.ndarray]:
    """``method`` on one layer: (W, kept mask), both (d_in, d_out), W in float32 (or wider), checked.

    ``W_bar``: the dense kernel as (d_in, d_out); ``H``: the Gram AᵀA of its inputs (d_in × d_in, float32);
    ``groups``: the constraint on its d_in·d_out weights, row-major. An input that never fires (H_ii = 0)
    is treated as SparseGPT treats it, for every method: W̄_i = 0 and H_ii = 1 before the solve
    (:func:`swapjax.operators.live`), so it is pruned first and any of its weights still kept is 0. A
    layer that keeps nothing is W = 0. The result is checked (:func:`check_layer_result`): a ValueError
    names the method and the layer otherwise.

    Examples:
        >>> import numpy as np, swapjax
        >>> rng = np.random.default_rng(0)
        >>> A, W = rng.normal(size=(64, 8)).astype("float32"), rng.normal(size=(8, 3)).astype("float32")
        >>> w, mask = solve_layer(swapjax.Wanda(), "dense", W, A.T @ A, swapjax.Groups.top_k(12))
        >>> mask.astype(int).sum(axis=0).tolist()          # 12 of 24 kept: 4 per output unit
        [4, 4, 4]
        >>> w, mask = solve_layer(swapjax.LR(), "dense", W, A.T @ A, swapjax.Groups.top_k(12))
        >>> int(mask.sum()), bool(np.all(np.asarray(w)[~mask] == 0))
        (12, True)
    """
    W_bar = jnp.asarray(W_bar)
    if W_bar.ndim != 2:
        raise ValueError(f"W_bar: expected a 2-D kernel (d_in, d_out), got shape {W_bar.shape}")
    d_in, d_out = W_bar.shape
    if jnp.shape(H) != (d_in, d_in):
        raise ValueError(f"H: expected the Gram AᵀA of the layer's inputs, shape ({d_in}, {d_in}), got {jnp.shape(H)}")
    if int(groups.k) == 0:  # nothing kept: no solve (the solvers need k ≥ 1)
        return jnp.zeros(W_bar.shape, jnp.promote_types(W_bar.dtype, jnp.float32)), np.zeros((d_in, d_out), bool)
    w_live, H_live = _live_problem(W_bar, H)
    problem = for_layer(method, Problem(w_live, groups, H=H_live, shape=(d_in, d_out), name=name))
    out = method.solve_problem(problem)
    return check_layer_result(method, name, groups, (d_in, d_out), out)


@jax.jit
def _live_problem(W_bar, H):
    """(w̄ raveled, H) in float32 or wider with the dead inputs revived (:func:`swapjax.operators.live`): one
    compiled call per layer shape."""
    W_bar = W_bar.astype(jnp.promote_types(W_bar.dtype, jnp.float32))
    W_live, H_live = live(W_bar, H.astype(W_bar.dtype))
    return jnp.ravel(W_live), H_live


def check_layer_result(method: Method, name: str, groups: Groups, shape: tuple, out) -> tuple[jax.Array, np.ndarray]:
    """``method``'s (w, info) on the layer ``name`` as (W, mask) of ``shape`` (d_in, d_out), checked: w with
    d_in·d_out entries, ``info.support`` a boolean mask of as many, W finite and exactly 0 off the mask, every
    group of ``groups`` keeping its count exactly. ValueError naming the method and the layer otherwise."""
    who = f"method: {type(method).__name__} on layer {name}"
    size = int(np.prod(shape))
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise ValueError(f"{who} must return (w, info), got {checks._show(out)}")
    w, info = out
    support = getattr(info, "support", None)
    if support is None or not hasattr(w, "shape"):
        raise ValueError(f"{who} returned w of type {type(w).__name__} and info.support "
                         f"{type(support).__name__}; expected arrays of {size} entries (the layer {tuple(shape)})")
    if int(np.size(w)) != size or int(np.size(support)) != size:
        raise ValueError(f"{who} returned w of shape {tuple(np.shape(w))} and info.support of shape "
                         f"{tuple(np.shape(support))}; expected {size} entries each, the layer {tuple(shape)} row-major")
    values = np.asarray(w).reshape(shape)  # checked on the host: no compilation per layer shape
    if not jnp.issubdtype(values.dtype, jnp.floating):
        raise ValueError(f"{who} returned w of dtype {values.dtype}; expected floating-point weights")
    mask = np.asarray(support).reshape(shape)
    if mask.dtype != np.bool_:
        raise ValueError(f"{who} returned a mask of dtype {mask.dtype}; expected booleans (True = kept)")
    values = values.astype(jnp.promote_types(values.dtype, jnp.float32))
    W = jnp.asarray(values)
    if not np.all(np.isfinite(values)):
        raise ValueError(f"{who} returned {int(np.sum(~np.isfinite(values)))} NaN or inf weights of {values.size}")
    nonzero = int(np.count_nonzero(values[~mask]))
    if nonzero:
        raise ValueError(f"{who} returned {nonzero} non-zero weights where its mask prunes; pruned weights must be "
                         "exactly 0")
    counts = np.asarray(groups.counts)
    if groups.ids is None:
        if int(mask.sum()) != int(counts.sum()):
            raise ValueError(f"{who} kept {int(mask.sum())} weights; the layer's budget is exactly {int(counts.sum())}")
        return W, mask
    kept = np.bincount(np.asarray(groups.ids), weights=mask.ravel(), minlength=counts.size)
    wrong = int(np.sum(kept != counts))
    if wrong:
        if groups.nm is not None:
            n, m = groups.nm
            raise ValueError(f"{who} keeps {groups.label} in {counts.size - wrong} of its {counts.size} groups of "
                             f"{m} inputs; every group must keep exactly {n}")
        raise ValueError(f"{who} keeps {int(mask.sum())} weights with {wrong} of its {counts.size} groups off their "
                         f"counts ({groups.label}); every group must keep exactly its count")
    return W, mask
