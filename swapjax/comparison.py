"""Run several pruning methods on the same problem and report comparable numbers.

    results = swapjax.compare(X, w_bar, k, {"MP": Magnitude(), "WF": WoodFisher(),
                                           "LR": LR(), "SWAP": SWAP()})
    print(swapjax.format_table(results))

Every method gets the very same X and w̄ objects (one gradient computation,
shared). For each method the result holds the pruned weights, the local
objective ½‖Xw − Xw̄‖²/N (the quadratic model of the loss change,
docs/methods.md), the EWR objective (N/2)·Σ_ij π_ij (y_i − z_j)² between y = Xw̄ and
z = Xw, the wall time of ``solve`` and, given an evaluation function, the
accuracy and loss of the pruned model. A method that raises is reported
(its error text kept) and the others still run.

:func:`compare_sparsities` is the convenience over (loss_fn, params, batch),
like :func:`swapjax.prune` with one stage: X is computed once, at the dense
weights, and every method runs at every sparsity on it.
"""
from __future__ import annotations

import math
import time
import traceback
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from . import checks, layers, pytree, transport
from .gradients import DEFAULT_CHUNK, GradientNoise, LossFn, batch_size, per_sample_grads
from .methods import DEFAULT_EPSILON, check_problem
from .constraints import as_groups, kept_count
from .contract import Info, Problem
from .progress import reporter
from .pytree import PyTree, Select

#: Relative ε of the EWR objective's plan: the same scale (cost (y_i − z_j)²/Var(y))
#: and value as ``swapjax.SWAP``'s default.
EWR_EPSILON = DEFAULT_EPSILON


@dataclass(frozen=True)
class MethodResult:
    """One method's outcome on one problem (plain Python numbers; NaN where not available).

    w: the pruned flat weights (None if the method failed). kept: non-zeros of w.
    local_objective: ½‖Xw − Xw̄‖²/N. ewr_objective: (N/2)Σπ_ij(y_i − z_j)² on the
    unscaled squared distance, π the entropic plan between y = Xw̄ and z = Xw
    (ε relative, see :func:`ewr_objective`); ewr_converged: Sinkhorn's flag.
    seconds: wall time of ``method.solve`` (compilation included unless
    ``warmup=True``). accuracy, loss: from ``evaluate`` (None without one).
    info: the method's info (:class:`swapjax.contract.Info`). error: "Type: message" when the method (or
    the evaluation) failed, else None; traceback: its formatted traceback.

    Examples:
        >>> import numpy as np, swapjax
        >>> X = np.eye(4, dtype="float32")
        >>> r = swapjax.compare(X, np.array([3.0, -2.0, 1.0, 0.5], "float32"), 2,
        ...                     {"MP": swapjax.Magnitude()}, progress=False)["MP"]
        >>> r.ok, r.kept, r.w.tolist(), r.local_objective  # ½‖X(w − w̄)‖²/N = ½(1 + 0.25)/4
        (True, 2, [3.0, -2.0, 0.0, 0.0], 0.15625)
    """

    name: str
    w: Optional[jax.Array]
    kept: int
    local_objective: float
    ewr_objective: float
    ewr_converged: bool
    seconds: float
    accuracy: Optional[float] = None
    loss: Optional[float] = None
    info: Optional[Info] = None
    error: Optional[str] = None
    traceback: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.error is None


def local_objective(X, w, w_bar) -> float:
    """½‖Xw − Xw̄‖²/N = ½(w − w̄)ᵀ(XᵀX/N)(w − w̄), the local quadratic model of the loss change."""
    return float(_local_objective(jnp.asarray(X), jnp.asarray(w), jnp.asarray(w_bar)))


@jax.jit
def _local_objective(X, w, w_bar):
    dtype = jnp.promote_types(X.dtype, jnp.float32)  # no half-precision sums
    X, w, w_bar = X.astype(dtype), w.astype(dtype), w_bar.astype(dtype)
    r = X @ (w - w_bar)
    return 0.5 * (r @ r) / X.shape[0]


@jax.jit
def _project(X, w):
    """Xw in at least float32."""
    dtype = jnp.promote_types(X.dtype, jnp.float32)
    return X.astype(dtype) @ w.astype(dtype)


def ewr_objective(
    y, z, epsilon: float = EWR_EPSILON, threshold: float = 1e-3, max_iterations: int = 5000
) -> tuple[float, transport.PlanInfo]:
    """(N/2)·Σ_ij π_ij (y_i − z_j)², π the entropic plan between the 1-D samples y and z.

    π = :func:`swapjax.transport.sinkhorn_plan` (uniform marginals 1/N; ε relative to
    the cost (y_i − z_j)²/Var(y)); the sum is taken on the unscaled (y_i − z_j)² and
    without the entropy term. Returns (value, Sinkhorn's report).
    """
    y, z = jnp.asarray(y), jnp.asarray(z)
    value, info = _ewr(y, z, epsilon, threshold, max_iterations)
    return float(value), info


@partial(jax.jit, static_argnums=(3, 4))
def _ewr(y, z, epsilon, threshold, max_iterations):
    plan, _, info = transport.sinkhorn_plan(y, z, epsilon, threshold, max_iterations)
    cost = (y[:, None] - z[None, :]) ** 2
    return 0.5 * y.shape[0] * jnp.sum(plan * cost), info


def _error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def compare(
    X,
    w_bar,
    k: int,
    methods: Mapping[str, Any],
    *,
    w_start=None,
    segments: Optional[Sequence[int]] = None,
    evaluate: Optional[Callable[[Any], tuple[float, float]]] = None,
    unflatten: Optional[Callable[[jax.Array], Any]] = None,
    epsilon: float = EWR_EPSILON,
    sinkhorn_threshold: float = 1e-3,
    sinkhorn_max_iters: int = 5000,
    warmup: bool = False,
    progress: bool = True,
) -> dict[str, MethodResult]:
    """Run each of ``methods`` on the same problem (X ∈ R^{N×p}, w̄ ∈ R^p, k); {name: MethodResult}.

    Every method is called as ``method.solve_problem(Problem(w_bar, k, X=X, w_start=w_start))``
    (:mod:`swapjax.contract`) with the same X and w̄ objects, plus ``segments`` (the layer offsets)
    for methods whose ``needs_segments`` is true (``Magnitude(scope="layer")``); a method that needs
    a layer's Gram fails there, and its error is recorded.
    evaluate(model) -> (accuracy, loss), with model = unflatten(w) when
    ``unflatten`` is given, else the flat w. epsilon, sinkhorn_threshold,
    sinkhorn_max_iters: the plan of the EWR objective (:func:`ewr_objective`).
    warmup: run each method once untimed first, so ``seconds`` excludes
    compilation. progress: one line per method on stderr, False: none, or a callable
    ``report(message)`` that receives them (:mod:`swapjax.progress`).

    Invalid X, w̄ or k raise ValueError at once; a method that raises, returns a
    malformed w, or whose evaluation raises is reported in its result's ``error``.

    Examples:
        >>> import numpy as np, swapjax
        >>> rng = np.random.default_rng(0)
        >>> X = rng.normal(size=(32, 8)).astype("float32")  # N = 32, p = 8
        >>> w_bar = rng.normal(size=8).astype("float32")
        >>> results = swapjax.compare(X, w_bar, 4, {"MP": swapjax.Magnitude(), "WF": swapjax.WoodFisher()},
        ...                           progress=False)
        >>> [(name, r.kept, r.ok) for name, r in results.items()]
        [('MP', 4, True), ('WF', 4, True)]
        >>> results["WF"].local_objective < results["MP"].local_objective
        True
    """
    checks.methods(methods)
    count = int(check_problem(X, w_bar, k)[1].k)  # k may be an int or a swapjax.constraints.Groups
    X = jnp.asarray(X)
    w_bar = jnp.asarray(w_bar, X.dtype)
    n, p = X.shape
    if w_start is not None:
        w_start = jnp.asarray(w_start, X.dtype)
        if w_start.shape != (p,):
            raise ValueError(f"w_start: expected shape ({p},), got {w_start.shape}")
        if not bool(jnp.all(jnp.isfinite(w_start))):
            raise ValueError("w_start: the starting weights contain NaN or inf")
    segments = checks.segments(segments, p, optional=True)
    _check_options(evaluate, epsilon, sinkhorn_threshold, sinkhorn_max_iters, warmup, progress)
    checks.callable_or_none("unflatten", unflatten, "a function unflatten(w) -> model")
    log = reporter(progress, prefix="[swapjax.compare] ")
    log(f"N={n}, p={p}, k={count} (sparsity {1 - count / p:.4f}), {len(methods)} method(s)")
    y = _project(X, w_bar)

    results = {}
    for name, method in methods.items():
        name = str(name)
        try:
            r = _run_one(name, method, X, w_bar, k, count, y, w_start, segments, evaluate, unflatten,
                         epsilon, sinkhorn_threshold, sinkhorn_max_iters, warmup)
        except Exception as e:  # noqa: BLE001 — one failing method must not stop the others
            r = MethodResult(name, None, 0, math.nan, math.nan, False, math.nan,
                             error=_error_text(e), traceback=traceback.format_exc())
        results[name] = r
        if r.w is None:
            log(f"{name}: FAILED {r.error}")
        else:
            log(
                f"{name}: {r.seconds:.2f}s, kept {r.kept}, local {r.local_objective:.4g}, EWR {r.ewr_objective:.4g}"
                + ("" if r.ewr_converged else " (Sinkhorn not converged)")
                + (f", accuracy {r.accuracy:.4f}, loss {r.loss:.4g}" if r.accuracy is not None else "")
                + (f" — {r.error}" if r.error else "")
            )
    return results


def _check_options(evaluate, epsilon, sinkhorn_threshold, sinkhorn_max_iters, warmup, progress) -> None:
    """The keyword arguments shared by :func:`compare` and :func:`compare_sparsities`."""
    checks.callable_or_none("evaluate", evaluate, "a function evaluate(model) -> (accuracy, loss)")
    checks.real("epsilon (the EWR objective's ε)", epsilon, 0.0, lo_open=True)
    checks.real("sinkhorn_threshold", sinkhorn_threshold, 0.0, lo_open=True)
    checks.integer("sinkhorn_max_iters", sinkhorn_max_iters, 1)
    checks.boolean("warmup", warmup)
    reporter(progress)


def _run_one(name, method, X, w_bar, k, count, y, w_start, segments, evaluate, unflatten,
             epsilon, threshold, max_iters, warmup) -> MethodResult:
    """Solve, time, check and measure one method (what raises is recorded by :func:`compare`)."""
    p = X.shape[1]
    problem = Problem(w_bar, as_groups(k), X=X, w_start=w_start, segments=segments if method.needs_segments else None)
    if warmup:
        jax.block_until_ready(method.solve_problem(problem))
    t0 = time.perf_counter()
    w, info = method.solve_problem(problem)
    w = jax.block_until_ready(jnp.asarray(w))
    seconds = time.perf_counter() - t0
    nan = math.nan
    if w.shape != (p,) or not bool(jnp.all(jnp.isfinite(w))):
        error = f"ValueError: solve returned weights of shape {w.shape} (expected ({p},)) or non-finite values"
        return MethodResult(name, None, 0, nan, nan, False, seconds, info=info, error=error)
    error = tb = None
    kept = int(jnp.count_nonzero(w))
    if kept > count:
        error = f"ValueError: solve returned {kept} non-zeros, more than k = {count}"
    local = local_objective(X, w, w_bar)
    ewr, plan = ewr_objective(y, _project(X, w), epsilon, threshold, max_iters)
    accuracy = loss = None
    if evaluate is not None:
        try:
            accuracy, loss = evaluate(unflatten(w) if unflatten is not None else w)
            accuracy, loss = float(accuracy), float(loss)
        except Exception as e:  # noqa: BLE001
            accuracy = loss = None
            error = f"evaluate: {_error_text(e)}"
            tb = traceback.format_exc()
    return MethodResult(name, w, kept, local, ewr, bool(plan.converged), seconds, accuracy, loss, info, error, tb)


def compare_sparsities(
    loss_fn: LossFn,
    params: PyTree,
    batch: PyTree,
    sparsities: Sequence[float],
    methods: Mapping[str, Any],
    *,
    evaluate: Optional[Callable[[PyTree], tuple[float, float]]] = None,
    select: Optional[Select] = None,
    noise: Optional[GradientNoise] = None,
    key: Optional[jax.Array] = None,
    chunk_size: int = DEFAULT_CHUNK,
    epsilon: float = EWR_EPSILON,
    sinkhorn_threshold: float = 1e-3,
    sinkhorn_max_iters: int = 5000,
    warmup: bool = False,
    progress: bool = True,
) -> dict[float, dict[str, MethodResult]]:
    """One-shot comparison over (loss_fn, params, batch): {sparsity: {name: MethodResult}}.

    X = per-sample gradients at the dense ``params`` (plus ``noise``, which needs
    ``key``), computed once and shared by every method and sparsity; w̄ = the
    dense prunable weights; k = round((1 − s)·p) for each s. evaluate(params)
    -> (accuracy, loss) receives the pruned parameter pytree. Layer offsets are
    passed to methods that need them. Other arguments as in :func:`compare`.

    Examples:
        >>> import jax.numpy as jnp, numpy as np, swapjax
        >>> rng = np.random.default_rng(0)
        >>> params = {"w": rng.normal(size=(8, 4)).astype("float32"), "b": np.zeros(4, "float32")}
        >>> batch = {"x": rng.normal(size=(24, 8)).astype("float32"), "y": rng.normal(size=(24, 4)).astype("float32")}
        >>> def loss_fn(params, example):  # ONE example, as for swapjax.prune
        ...     return jnp.sum((example["x"] @ params["w"] + params["b"] - example["y"]) ** 2)
        >>> table = swapjax.compare_sparsities(loss_fn, params, batch, [0.5, 0.75],
        ...                                    {"MP": swapjax.Magnitude(), "WF": swapjax.WoodFisher()}, progress=False)
        >>> {s: {name: r.kept for name, r in by_method.items()} for s, by_method in table.items()}
        {0.5: {'MP': 16, 'WF': 16}, 0.75: {'MP': 8, 'WF': 8}}
    """
    sparsities = list(checks.sparsities("sparsities", sparsities))
    checks.methods(methods)
    checks.noise_and_key(noise, key)
    checks.integer("chunk_size", chunk_size, 1)
    _check_options(evaluate, epsilon, sinkhorn_threshold, sinkhorn_max_iters, warmup, progress)
    batch_size(batch)
    checks.finite_leaves("params", params, hint="; the weights must be finite before pruning")
    lay = layers.prunable(loss_fn, params, batch, select)  # the layers loss_fn uses, as prune takes them
    loss_fn = layers.staged(loss_fn, params, batch)  # its program, run from its jaxpr under every transform
    p = lay.size
    for s in sparsities:
        if kept_count(s, p) < 1:
            raise ValueError(f"sparsities: {s} keeps 0 of p = {p} prunable weights")
    t0 = time.perf_counter()
    X = jax.block_until_ready(per_sample_grads(loss_fn, params, batch, select, chunk_size))
    if noise is not None:
        X = noise(X, key)
    reporter(progress, prefix="[swapjax.compare] ")(f"per-sample gradients X {X.shape} in "
                                                    f"{time.perf_counter() - t0:.2f}s")
    w_bar = pytree.flatten(params, lay)
    unflatten = lambda w: pytree.unflatten(w, params, lay)  # noqa: E731
    return {
        s: compare(
            X, w_bar, kept_count(s, p), methods, segments=lay.offsets, evaluate=evaluate,
            unflatten=unflatten, epsilon=epsilon, sinkhorn_threshold=sinkhorn_threshold,
            sinkhorn_max_iters=sinkhorn_max_iters, warmup=warmup, progress=progress,
        )
        for s in sparsities
    }


def format_table(results) -> str:
    """A plain-text table of :func:`compare` ({name: result}) or :func:`compare_sparsities` output.

    An EWR value marked * comes from a Sinkhorn run that did not converge.

    Examples:
        >>> import numpy as np, swapjax
        >>> X = np.eye(4, dtype="float32")
        >>> results = swapjax.compare(X, np.array([3.0, -2.0, 1.0, 0.5], "float32"), 2,
        ...                           {"MP": swapjax.Magnitude()}, progress=False)
        >>> print(swapjax.format_table(results))  # EWR: see compare; seconds vary
        sparsity  method  local    EWR      seconds  accuracy  loss  error
        --------  ------  -------  -------  -------  --------  ----  -----
                  MP      0.15625  ...
    """
    if results and all(isinstance(v, MethodResult) for v in results.values()):
        results = {None: results}
    header = ["sparsity", "method", "local", "EWR", "seconds", "accuracy", "loss", "error"]
    rows = []
    fmt = lambda x, spec: "" if x is None else format(x, spec)  # noqa: E731
    for s, by_method in results.items():
        for r in by_method.values():
            rows.append([
                fmt(s, ".4f"), r.name, fmt(r.local_objective, ".5g"),
                fmt(r.ewr_objective, ".5g") + ("" if r.ewr_converged or r.w is None else "*"),
                fmt(r.seconds, ".2f"), fmt(r.accuracy, ".4f"), fmt(r.loss, ".4g"), r.error or "",
            ])
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])
