"""The method contract: what ``swapjax.prune`` (and ``swapjax.compare``) read of a pruning method.

A method is a subclass of :class:`Method`: ``solve`` on a bare problem
(X, w̄, constraint) returns the pruned weights and an info object with the
fields of :class:`Info`; what the driver needs to know about the method is
declared, as class attributes or properties of the base, never probed:

- ``matrix_free``: ``solve`` accepts an X that is not formed (an operator of
  products only); False means the driver forms X;
- ``selects``: ``solve`` chooses values of its own on held-out loss and needs a ``score``;
- ``needs_segments``: ``solve`` needs the layer offsets (``segments=``);
- ``without_search()``: the cheaper variant for the stages before the last
  under ``prune(stages="auto")`` (the method itself by default).
"""
from __future__ import annotations

import abc
from typing import Callable, ClassVar, Optional, Protocol, Sequence, Union

import jax
import numpy as np

#: score(w): the held-out loss of the pruned network, a float or the vector of per-example losses
#: (lower is better).
Score = Callable[[jax.Array], Union[float, np.ndarray]]


class Info(Protocol):
    """What every method's info holds (arrays): ``support`` (p,) bool, the kept weights;
    ``objective`` f at the result and ``objective_trace`` (index 0: f at the start, H(w_start));
    ``duals``, the Sinkhorn potentials to warm-start the next stage (passed through by methods
    without a plan). ``stage_fields()``: the method's own diagnostics as plain Python values, named as
    the fields of :class:`swapjax.prune.StageInfo` (a solve that computes gradients itself, as the blocked
    mode's does, reports their ``gradient_seconds``: the driver moves them out of the solve's time);
    ``warnings(n)``: messages for the driver to warn."""

    support: jax.Array
    objective: jax.Array
    objective_trace: jax.Array
    duals: tuple

    def stage_fields(self) -> dict: ...

    def warnings(self, n: int) -> tuple[str, ...]: ...


class Method(abc.ABC):
    """A pruning method on a bare problem: ``w, info = method.solve(X, w_bar, k, ...)``.

    ``k``: an int (the global top-k) or a :class:`swapjax.constraints.Groups`
    (the constraint resolved on the layout); ``X``: a matrix or a
    :class:`swapjax.operators.Operator`. ``w_start``: the weights where the
    stage starts (default w̄); ``duals``: the previous stage's Sinkhorn
    potentials or None; ``score``: given only where ``selects``; ``segments``:
    given only where ``needs_segments``. The result must be feasible for the
    constraint, zero off ``info.support``, and leave the inputs unchanged.

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

    @abc.abstractmethod
    def solve(self, X, w_bar, k, w_start=None, duals=None, *, score: Optional[Score] = None,
              segments: Optional[Sequence[int]] = None) -> tuple[jax.Array, Info]:
        """The pruned weights w ∈ R^p and the info of the solve."""


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
