"""Pruning methods on a bare problem (X, w̄, k): ``w, info = method.solve(X, w_bar, k)``.

``LR`` (sparse linear regression, CHITA's formulation) and ``SWAP`` (entropic
Wasserstein regression) share one solver; they differ only in the targets:
LR keeps y = Xw̄, SWAP uses ỹ = N·πᵀy with π the entropic plan between y and
z = Xw_start, computed once at the start (docs/methods.md). The solver is
iterative hard thresholding, an exact ridge backsolve on the support, and a
swap search that exchanges kept and pruned weights while the objective falls
(with a score, also from the OBS support).

λ is measured in units of the Fisher's scale, λ_abs = λ·‖X‖²_F/(Np) (the mean
diagonal of XᵀX/N), so scaling X changes nothing. ``lam="auto"`` and
``epsilon="auto"`` (the defaults) choose λ and ε on held-out loss when
``solve`` is given a ``score`` (``swapjax.prune`` does that), along the path of
:func:`_regression_path`; explicit values are used exactly as given.
"""
from __future__ import annotations

import abc
import contextlib
import dataclasses
import math
import numbers
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from . import checks
from . import iht as iht_lib
from . import transport
from .selection import Selection, walk
from .constraints import Groups, as_groups, check_groups
from .contract import Method, Score
from .operators import Operator, as_operator, linear, matmul

#: λ candidates of ``lam="auto"`` (relative to the Fisher's scale, half-decade steps), and the value
#: used without a score, where the selection's walk along the path starts.
LAM_PATH = (1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
DEFAULT_LAM = 0.03
#: ε candidates of ``epsilon="auto"`` (besides LR's targets, the ε → 0 end), and the value used without a score.
EPSILON_PATH = (0.1, 0.3, 1.0)
DEFAULT_EPSILON = 0.3


class Candidate(NamedTuple):
    """One point of the selection path: λ (as configured), ε (None: LR's targets y), the search
    ("iht": IHT and the backsolve; "ridge": the backsolve alone, on the first candidate's support;
    "swap": IHT, the backsolve and the swap search; "obs": the backsolve on the OBS support and the
    swap search), its held-out score (the loss of the pruned
    network on examples not fitted) and its objective f."""

    lam: float  # λ as configured: the unit of LR(lam=...), relative to the Fisher's scale by default
    epsilon: Optional[float]
    support: str
    score: float
    objective: float
    lam_absolute: float = math.nan  # the λ of f (λ·‖X‖²_F/(Np) under lam_scale="fisher")

    def describe(self) -> str:
        return f"λ={self.lam:g} [absolute {self.lam_absolute:.3g}], ε={self.epsilon}, {self.support} candidate"


class SolveInfo(NamedTuple):
    """Diagnostics of one solve (arrays unless noted)."""

    objective: jax.Array  # f(w) at the returned w, f = ½‖Xw − t‖² + (Nλ/2)‖w − w̄‖², λ = lam_absolute
    objective_trace: jax.Array  # f after each IHT iteration (index 0 = start), NaN-padded
    iht_iterations: jax.Array
    backsolved: jax.Array  # the backsolve was run and lowered f
    support: jax.Array  # (p,) bool, exactly k True
    targets: jax.Array  # t: y for LR, ỹ for SWAP
    plan: transport.PlanInfo  # Sinkhorn report (zeros for LR and ε = 0)
    duals: tuple  # Sinkhorn potentials (f, g), for warm starts
    lam: Optional[jax.Array] = None  # λ as configured (LR and SWAP; relative to the Fisher's scale by default)
    lam_absolute: Optional[jax.Array] = None  # the λ of f (λ·‖X‖²_F/(Np) under lam_scale="fisher")
    epsilon: Optional[float] = None  # SWAP's ε, None where the targets are y
    objective_magnitude: Optional[jax.Array] = None  # f of the backsolve on the magnitude support H_k(w_start)
    swapped: Optional[jax.Array] = None  # weights exchanged by the swap search
    candidates: tuple = ()  # Candidate per point tried by the selection (empty without one)
    chosen: Optional[int] = None  # the index of the returned candidate in ``candidates``

    #: No gradients are computed inside the solve.
    gradient_seconds = 0.0

    @property
    def held_out_loss(self) -> float:
        """The held-out loss of the returned candidate (NaN without a selection)."""
        return self.candidates[self.chosen].score if self.candidates else math.nan

    def describe(self) -> str:
        """IHT's iterations, Sinkhorn's (where a plan was computed), the chosen candidate or λ."""
        text = f"{int(self.iht_iterations)} IHT its"
        if int(self.plan.iterations):
            text += f", Sinkhorn {int(self.plan.iterations)} its"
        if self.candidates:
            return text + f" ({self.candidates[self.chosen].describe()})"
        if self.lam is not None:
            text += f" (λ={float(self.lam):g} [absolute {float(self.lam_absolute):.3g}])"
        return text

    def warnings(self, n: int) -> tuple[str, ...]:
        """A degenerate plan (no spread in y) or a Sinkhorn run that did not converge, in words."""
        if bool(self.plan.degenerate):
            return (f"the projections y = X·w_bar have no spread (Var(y) is 0, at rounding level or not finite: "
                    f"N = {n}, identical examples?), so there is nothing to transport: SWAP's targets are y, "
                    "as LR's (info.plan.degenerate)",)
        if not bool(self.plan.converged):
            return (f"Sinkhorn did not converge in {int(self.plan.iterations)} iterations (marginal error "
                    f"{float(self.plan.error):.2e}); raise sinkhorn_max_iters or epsilon",)
        return ()


def check_problem(X, w_bar, k, finite_x: bool = True) -> tuple[Operator, Groups]:
    """Validate a bare problem: (X as an :class:`swapjax.operators.Operator`, the constraint as
    :class:`swapjax.constraints.Groups`; an integer k is the global top-k). X: a matrix or an operator
    (one not formed is checked finite when built). ``finite_x=False`` leaves X's finiteness to the caller."""
    X = as_operator(X)
    n, p = X.shape
    if n == 0:
        raise ValueError("X: N = 0 rows; at least one per-sample gradient is needed")
    if jnp.shape(w_bar) != (p,):
        raise ValueError(f"w_bar: expected shape ({p},) to match X's columns, got {jnp.shape(w_bar)}")
    if isinstance(k, Groups):
        groups = check_groups(k, p)
    else:
        ok = isinstance(k, numbers.Integral) and not isinstance(k, (bool, np.bool_))
        if isinstance(k, (jax.Array, np.ndarray)) and k.ndim == 0 and jnp.issubdtype(k.dtype, jnp.integer):
            ok = True
        if not ok or not 1 <= k <= p:
            raise ValueError(f"k: must be an integer in [1, p] = [1, {p}] or a swapjax.constraints.Groups, got {k!r}")
        groups = Groups.top_k(int(k))
    if finite_x:
        X.check_finite("X")
    if not bool(_all_finite(w_bar)):
        raise ValueError("w_bar: the dense weights contain NaN or inf")
    return X, groups


@jax.jit
def _all_finite(*arrays) -> jax.Array:
    """True where every entry of every array is finite (one program per shapes, not an op-by-op compilation each)."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(a)) for a in arrays]))


def prepare_problem(X, w_bar, k, w_start=None, duals=None, finite_x: bool = True):
    """Validate and convert a problem for a method's solve: (X, w̄, w_start, k, duals).

    Arrays become at least float32 (there is no float16 linear algebra on CPU);
    w_start defaults to w̄; duals to zero potentials (a cold Sinkhorn start).
    """
    X, k = check_problem(X, w_bar, k, finite_x)
    w_bar = jnp.asarray(w_bar, X.dtype)
    w_start = w_bar if w_start is None else jnp.asarray(w_start, X.dtype)
    if jnp.shape(w_start) != w_bar.shape:
        raise ValueError(f"w_start: expected shape {w_bar.shape}, got {jnp.shape(w_start)}")
    if not bool(_all_finite(w_start)):
        raise ValueError("w_start: the starting weights contain NaN or inf")
    n = X.shape[0]
    if duals is None:
        duals = (jnp.zeros(n, X.dtype),) * 2
    elif not (isinstance(duals, (tuple, list)) and len(duals) == 2
              and all(jnp.shape(d) == (n,) for d in duals)):
        shapes = [jnp.shape(d) for d in duals] if isinstance(duals, (tuple, list)) else type(duals).__name__
        raise ValueError(f"duals: expected None or two Sinkhorn potentials (f, g) of shape ({n},), got {shapes}")
    else:
        if not bool(_all_finite(*duals)):
            raise ValueError("duals: the Sinkhorn potentials contain NaN or inf")
    return X, w_bar, w_start, k, duals


@dataclass(frozen=True)
class _Regression(Method, abc.ABC):
    """The regression LR and SWAP share: min ½‖t − Xw‖² + (Nλ/2)‖w − w̄‖² under the constraint, one solver
    (IHT, the backsolve, the swap search, the λ/ε path) with the fields of ``LR``; they differ in the target
    rule t alone (:meth:`_rule`: LR's y = Xw̄, SWAP's transport targets ỹ)."""

    lam: Union[float, str] = "auto"
    lam_scale: str = "fisher"
    lam_path: tuple = LAM_PATH
    max_iters: int = 100
    tol: float = 1e-5
    growth: float = 2.0
    backsolve: bool = True
    patience: Optional[int] = 3
    swap_rounds: int = 20
    obs_sparsity: Optional[float] = 0.75
    cg_iters: int = iht_lib.CG_ITERS
    active_set: Optional[float] = None

    #: ``solve`` also takes an X that is not formed (backsolves by CG).
    matrix_free = True

    def __post_init__(self):
        checks.number_or_auto("lam", self.lam, "λ")
        checks.choice("lam_scale", self.lam_scale, ("fisher", "absolute"))
        checks.path("lam_path", self.lam_path)
        checks.integer("max_iters", self.max_iters, 0)
        checks.real("tol", self.tol, 0.0)
        checks.real("growth", self.growth, 1.0, lo_open=True)
        checks.boolean("backsolve", self.backsolve)
        checks.integer("patience", self.patience, 1, allow_none=True)
        checks.integer("swap_rounds", self.swap_rounds, 0)
        if self.obs_sparsity is not None:
            checks.real("obs_sparsity", self.obs_sparsity, 0.0, 1.0)
        checks.integer("cg_iters", self.cg_iters, 1)
        if self.active_set is not None:
            checks.real("active_set (the active set's size as a multiple of k)", self.active_set, 1.0)

    @property
    def selects(self) -> bool:
        """True when some value is "auto": ``solve`` then needs a ``score`` to choose it."""
        return self.lam == "auto" or self._rule().selects

    @abc.abstractmethod
    def _rule(self) -> "TargetRule":
        """The target rule: LR's y, or SWAP's transport targets."""

    def without_search(self) -> "LR":
        """This method with its λ selection alone: LR's targets y where ε is "auto", no swap search
        and no OBS start. The fit of the stages before the last under ``prune(stages="auto")``: on the
        presets' MLPNet and ViT, dropping them there kept the final accuracy and saved their time."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(_Regression)}
        fields.update(swap_rounds=0, obs_sparsity=None)
        if self._rule().first is None:
            return LR(**fields)
        return dataclasses.replace(self, **fields)

    def solve(self, X, w_bar, k, w_start=None, duals=None, *, score: Optional[Score] = None, segments=None):
        """k-sparse w for the problem (X ∈ R^{N×p}, w̄ ∈ R^p, k) → (w, SolveInfo).

        w_start: the weights where the stage starts (default w̄); IHT starts
        from H_k(w_start), and SWAP's plan is computed at z = X·w_start.
        duals: Sinkhorn potentials from an earlier solve, for a warm start.
        score(w): a held-out loss (lower is better), a float or the vector of
        per-example losses; with it, "auto" values are chosen along the path:
        the first candidate runs IHT and the backsolve, the others are ridge
        fits on its support, and IHT with the swap search runs once more at
        the best values, then (``obs_sparsity``) the search from the OBS support;
        ``info.candidates`` lists every point tried, ``info.chosen`` the one
        returned. With per-example losses, SWAP takes transport targets ỹ
        (ε > 0) only where they beat the best so far by more than one
        standard error of the paired difference: LR's y is the default, and
        a lower mean that is within the held-out noise does not displace it.
        ``segments`` is not used (the constraint ``k`` carries any per-layer budget).
        """
        X, w_bar, w_start, groups, duals = prepare_problem(X, w_bar, k, w_start, duals, finite_x=False)
        checks.callable_or_none("score", score, "a function score(w) -> float")
        col_sq = X.col_sq
        if not bool(_all_finite(col_sq)):  # X's finiteness from diag(XᵀX): no pass of its own
            X.check_finite("X")  # names the rows; if X is finite, ‖X‖²_F overflows (below)
        y, z, scale = _projections(X, w_bar, w_start, col_sq)
        if not bool(_all_finite(scale, y, z)):
            raise ValueError(
                f"X: y = X·w_bar, z = X·w_start or ‖X‖²_F overflow {X.dtype} (largest column norm "
                f"{float(jnp.sqrt(jnp.max(col_sq))):.3g}, "
                f"max |w_bar| = {float(jnp.max(jnp.abs(w_bar))):.3g}); rescale the loss or use float64 (jax_enable_x64)"
            )
        if self.lam_scale == "absolute":
            scale = jnp.ones_like(scale)
        reference = None
        if self.backsolve:
            reference = (col_sq,) + _magnitude_reference(_width("magnitude", X, groups), X, w_start, groups)
        problem = (X, w_bar, groups, y, z, scale, reference)
        if score is None or not self.selects:
            return self._fit(problem, DEFAULT_LAM if self.lam == "auto" else self.lam, self._rule().value, w_start,
                             duals)
        return _regression_path(self, problem, w_start, duals, score)

    def _fit(self, problem, lam, eps, init, duals, rounds=None):
        """One solve at (λ, ε): targets, IHT from H_k(init), backsolve, ``rounds`` of swap search."""
        X, w_bar, groups, y, z, scale, reference = problem
        lam_abs = lam * scale
        t, duals, plan = self._rule().targets(y, z, eps, duals)
        w, info = _solve(self._config(eps), X, t, y, w_bar, init, groups, lam_abs, duals, plan)
        info = info._replace(lam=jnp.asarray(lam, lam_abs.dtype))
        if self.backsolve:
            rounds = self.swap_rounds if rounds is None else rounds
            w, obj, backsolved, support, obj_mag, swapped = _refine(
                self.cg_iters, rounds, X, w_bar, w, info.targets, info.lam_absolute, info.support, info.objective,
                *reference, groups)
            info = info._replace(objective=obj, backsolved=backsolved, support=support, objective_magnitude=obj_mag,
                                 swapped=swapped)
        return w, info._replace(epsilon=eps)

    def _fit_on(self, problem, lam, eps, init, support, gram, x_anchor, duals):
        """The backsolve alone at (λ, ε) on a given support: with its Gram G_S and X·w̄_S, or by CG from ``init``.
        (``objective_trace`` holds f alone.)"""
        X, w_bar, _, y, z, scale, _ = problem
        lam_abs = lam * scale
        t, duals, plan = self._rule().targets(y, z, eps, duals)
        w, f = _ridge(self.cg_iters, X, t, w_bar, support, lam_abs, gram, init, x_anchor)
        info = SolveInfo(f, f[None], jnp.array(0), jnp.array(True), support, t, plan, duals,
                         lam=jnp.asarray(lam, lam_abs.dtype), lam_absolute=lam_abs,
                         epsilon=eps, swapped=jnp.array(0))
        return w, info

    def _fit_obs(self, problem, at, w_start):
        """The backsolve on the OBS support of w_start and the swap search, at the λ and targets of the
        solve ``at`` (a SolveInfo). (``objective_trace`` holds f alone.)"""
        X, w_bar, groups, _, _, _, reference = problem
        w, support, f, swapped = _obs_fit(self.cg_iters, self.swap_rounds, X, w_bar, w_start, at.targets, groups,
                                          at.lam_absolute, reference[0])
        return w, at._replace(objective=f, objective_trace=f[None], iht_iterations=jnp.array(0), support=support,
                              swapped=swapped, objective_magnitude=None)

    def _incumbent(self, problem, support):
        """(support, G_S, X·w̄_S) of a first solve, for the ridge fits of the other candidates on its support
        (G_S updated from the magnitude support's Gram; None, None where X is not formed)."""
        X, w_bar, groups, _, _, _, reference = problem
        return (support,) + _incumbent(X, w_bar, support, *reference[1:], groups)

    def _with_reference_objectives(self, problem, info, w_start):
        """``info`` of a ridge or OBS fit with f at H_k(w_start) and f of the magnitude backsolve, at its λ and t."""
        X, w_bar, _, _, _, _, reference = problem
        start, magnitude = _reference_objectives(self.cg_iters, X, info.targets, w_bar, w_start, info.lam_absolute,
                                                 *reference[1:])
        return info._replace(objective_trace=jnp.stack([start, info.objective]), objective_magnitude=magnitude)

    def _config(self, eps) -> "_Config":
        return _Config(self.max_iters, self.tol, self.growth, self.patience if self.backsolve else None,
                       self.active_set, self._rule().retarget(eps))


class TargetRule(NamedTuple):
    """The targets t of the regression at an ε: None is LR's y = Xw̄, a number SWAP's ỹ = N·πᵀy, π the
    entropic plan between y and z = X·w_start at that ε (Sinkhorn's ``threshold`` and ``max_iters``).
    ``value``: the ε used without a selection; ``first``: the ε of the λ walk; ``path``: the ε tried
    after it; ``plan_update``: "stage" (π once) or "iteration" (before every IHT step); ``selects``:
    ε is chosen on held-out loss."""

    value: Optional[float] = None
    first: Optional[float] = None
    path: tuple = ()
    threshold: float = 1e-3
    max_iters: int = 5000
    plan_update: str = "stage"
    selects: bool = False

    def targets(self, y, z, eps, duals):
        """(t, duals, plan report) at ε (None: y, no plan, the duals passed through)."""
        if eps is None:
            return y, duals, _NO_PLAN
        t, new_duals, info = transport.transport_targets(y, z, eps, self.threshold, self.max_iters, duals)
        return t, duals if new_duals is None else new_duals, info

    def retarget(self, eps) -> Optional[tuple]:
        """(ε, threshold, max_iters) where the plan is re-estimated before every IHT step, else None."""
        if self.plan_update == "iteration" and eps is not None:
            return (float(eps), self.threshold, self.max_iters)
        return None


#: LR's rule: the targets are y.
_Y = TargetRule()


@dataclass(frozen=True)
class LR(_Regression):
    """Sparse linear regression (CHITA): min ½‖y − Xw‖² + (Nλ/2)‖w − w̄‖², ‖w‖₀ ≤ k.

    lam: λ ≥ 0, or "auto" (default): with a held-out score
    (``solve(..., score=)``; ``swapjax.prune`` builds it from the loss on
    examples it does not fit), the value of ``lam_path`` found by walking
    downhill from ``DEFAULT_LAM`` (a local minimum of the score along the
    path); without a score, ``DEFAULT_LAM``. lam_scale: "fisher" (default)
    measures λ in units of the Fisher's scale ‖X‖²_F/(Np), so a value means the
    same on every network and scaling X does not change the solution; "absolute" takes λ as is (the published
    λ = 0.01; docs/methods.md relates the two).
    max_iters, tol: IHT stops after max_iters steps or when a step lowers f by
    ≤ tol·f. growth: factor of the geometric step growth. backsolve: the exact
    ridge solve on the support. patience: with the backsolve on, also stop IHT
    once the support has not changed for this many steps (None: run to tol).
    swap_rounds: rounds of the swap search after the backsolve (0: none; see
    :func:`swapjax.iht.swap_search`). obs_sparsity: from this sparsity
    1 − k/p on (None: never), the selection also starts the backsolve and
    swap search from the k weights of largest OBS saliency
    (:func:`swapjax.iht.obs_support`, O(N²k)) at the chosen λ and targets,
    and keeps that where its held-out loss is lower. cg_iters: conjugate-gradient steps of
    each backsolve where X is not formed (an operator of products only, such as
    :class:`swapjax.operators.GradientOperator`; each step costs Xv and Xᵀu). active_set: None, or CHITA's active-set
    phase with ⌈active_set·k⌉ weights (:func:`swapjax.iht.active_set_iht`).
    """


    def _rule(self) -> TargetRule:
        return _Y


@dataclass(frozen=True)
class SWAP(_Regression):
    """Entropic Wasserstein regression: LR with targets ỹ = N·πᵀy (docs/methods.md).

    epsilon: ε ≥ 0 on the cost (y_i − z_j)²/Var(y) (see :mod:`swapjax.transport`;
    0 = exact sorted matching), or "auto" (default): with a score, the targets
    are chosen among LR's y (the ε → 0 end in one-shot pruning, where z = y)
    and ỹ for each ε of ``epsilon_path``, at the λ chosen first on y; without
    one, ``DEFAULT_EPSILON``. sinkhorn_threshold, sinkhorn_max_iters:
    Sinkhorn's stopping rule. plan_update: "stage" computes π once at
    z = X·w_start (the published algorithm, default); "iteration" re-estimates
    it before every IHT step (a study option, which degenerates to a rank
    matching once z is far from y).
    """

    epsilon: Union[float, str] = "auto"
    epsilon_path: tuple = EPSILON_PATH
    sinkhorn_threshold: float = 1e-3
    sinkhorn_max_iters: int = 5000
    plan_update: str = "stage"

    def __post_init__(self):
        super().__post_init__()
        checks.number_or_auto("epsilon", self.epsilon, "ε")
        checks.path("epsilon_path", self.epsilon_path)
        checks.real("sinkhorn_threshold", self.sinkhorn_threshold, 0.0, lo_open=True)
        checks.integer("sinkhorn_max_iters", self.sinkhorn_max_iters, 1)
        checks.choice("plan_update", self.plan_update, ("stage", "iteration"))

    def _rule(self) -> TargetRule:
        """ỹ at ε; with ε "auto", y first (the ε → 0 end), then each ε of ``epsilon_path``."""
        auto = self.epsilon == "auto"
        return TargetRule(DEFAULT_EPSILON if auto else float(self.epsilon), None if auto else float(self.epsilon),
                          self.epsilon_path if auto else (), self.sinkhorn_threshold, self.sinkhorn_max_iters,
                          self.plan_update, auto)


def _regression_path(method, problem, w_start, duals, score: Score):
    """The λ/ε path of LR and SWAP (``method``, with "auto" values) on a prepared ``problem``.

    The first candidate runs IHT and the backsolve at the first λ; the others
    are ridge fits on its support (its Gram updated, no new IHT): λ walked
    downhill along ``lam_path`` from ``DEFAULT_LAM``, then each ε of the
    method's path at the chosen λ (transport targets must beat the best by one
    standard error). IHT with the swap search runs once more at the best
    values, then (``obs_sparsity``, X formed) the search from the OBS support.
    Returns (w, SolveInfo) of the best with ``candidates`` and ``chosen``.
    """
    X, groups = problem[0], problem[2]
    selection = Selection(score)
    incumbent = None  # (support, G_S, X·w̄_S) of the first solve: the other candidates are ridge fits on it

    def attempt(lam, eps, init, duals, kind="iht"):
        nonlocal incumbent
        if kind == "obs":
            w, info = method._fit_obs(problem, selection.best[1], w_start)
        elif kind == "swap" or incumbent is None:
            rounds = method.swap_rounds if kind == "swap" else 0
            w, info = method._fit(problem, lam, eps, init, duals, rounds)
            kind = "swap" if rounds else "iht"
            if incumbent is None and method.backsolve:
                incumbent = method._incumbent(problem, info.support)
        else:
            w, info = method._fit_on(problem, lam, eps, init, *incumbent, duals)
            kind = "ridge"
        challenger = eps is not None and selection.best is not None and eps != selection.winner.epsilon
        selection.offer(w, info, Candidate(float(lam), eps, kind, math.nan, float(info.objective),
                                           float(info.lam_absolute)), challenger)
        return info

    rule = method._rule()
    info = None
    if method.lam == "auto":
        for lam in walk(sorted(method.lam_path), DEFAULT_LAM, selection.last_score):
            best = selection.best
            info = attempt(lam, rule.first, best[0] if best else w_start, duals)
    else:
        info = attempt(method.lam, rule.first, w_start, duals)
    for eps in rule.path:
        info = attempt(selection.winner.lam, eps, selection.best[0], info.duals)
    if incumbent is not None and (method.swap_rounds or selection.winner.support == "ridge"):
        attempt(selection.winner.lam, selection.winner.epsilon, selection.best[0], selection.best[1].duals, kind="swap")
    if (method.obs_sparsity is not None and 1 - int(groups.k) / X.shape[1] >= method.obs_sparsity
            and incumbent is not None and X.formed and float(selection.best[1].lam_absolute) > 0):
        attempt(selection.winner.lam, selection.winner.epsilon, None, None, kind="obs")
    w, info, _ = selection.best
    if selection.winner.support in ("ridge", "obs"):  # f at H_k(w_start) and of the magnitude backsolve
        info = method._with_reference_objectives(problem, info, w_start)
    return w, info._replace(candidates=tuple(selection.tried), chosen=selection.chosen)


_NO_PLAN = transport.PlanInfo(jnp.array(0), jnp.array(True), jnp.array(0.0), jnp.array(False))


class _Config(NamedTuple):
    """The static part of one IHT solve (hashable: one compilation per config)."""

    max_iters: int
    tol: float
    growth: float
    patience: Optional[int]
    active_set: Optional[float]
    retarget: Optional[tuple]  # (ε, threshold, max_iters): re-plan before every step


@jax.jit
def _projections(X, w_bar, w_start, col_sq):
    """y = Xw̄, z = X·w_start and the Fisher's scale ‖X‖²_F/(Np) = mean diag(XᵀX)/N (col_sq = diag(XᵀX))."""
    A = linear(X)
    return A.mv(w_bar), A.mv(w_start), jnp.sum(col_sq) / (float(A.n) * A.p)


def _retarget(cfg: _Config, y):
    if cfg.retarget is None:
        return None
    eps, threshold, max_iters = cfg.retarget

    def retarget(z, aux):
        duals, total = aux
        t, new_duals, info = transport.transport_targets(y, z, eps, threshold, max_iters, duals)
        duals = duals if new_duals is None else new_duals
        seen = transport.PlanInfo(total.iterations + info.iterations, total.converged & info.converged, info.error,
                                  jnp.asarray(total.degenerate) | info.degenerate)
        return t, (duals, seen)

    return retarget


@partial(jax.jit, static_argnums=0)
def _solve(cfg: _Config, X, t, y, w_bar, init, k, lam, duals, plan):
    plan = jax.tree_util.tree_map(jnp.asarray, plan)
    iht_args = dict(max_iters=cfg.max_iters, tol=cfg.tol, growth=cfg.growth, patience=cfg.patience,
                    retarget=_retarget(cfg, y), aux=(duals, plan))
    if cfg.active_set is None:
        result, (duals, plan) = iht_lib.iht(X, t, w_bar, init, k, lam, **iht_args)
    else:
        result, (duals, plan), _ = iht_lib.active_set_iht(X, t, w_bar, init, k, lam, cfg.active_set, **iht_args)
    info = SolveInfo(result.objective, result.trace, result.iterations, jnp.array(False),
                     result.support, result.targets, plan, duals, lam_absolute=lam)
    return result.w, info


#: Programs whose static widths (the Gram's, the exchanges') follow k: while a program has met one width on a
#: shape, it is compiled for that width alone (compiles fastest); from a second width on (the stages of a gradual
#: prune, column blocks), the program that chooses among every width at run time (lax.switch; one compilation for
#: every k, the same values). (program, shape) → the width met, or _ANY.
_WIDTHS: dict = {}
_ANY = object()
_SHARED = [0]


@contextlib.contextmanager
def shared_widths(on: bool = True):
    """Inside (where ``on``), every solve takes the programs that choose their widths at run time from the
    first call: one compilation per shape whatever k (``blocks.solve`` runs its blocks so)."""
    _SHARED[0] += bool(on)
    try:
        yield
    finally:
        _SHARED[0] -= bool(on)


def _width(program: str, X, groups) -> Optional[int]:
    """The static width of ``program`` on X at the constraint's k (bucket(k, p)), or None: widths chosen at
    run time (the second width met on this shape, or inside :func:`shared_widths`)."""
    width = iht_lib.bucket(int(groups.k), X.shape[1])
    key = (program, type(X), tuple(X.shape), str(X.dtype))
    seen = _WIDTHS.get(key)
    if _SHARED[0] or seen is _ANY or (seen is not None and seen != width):
        _WIDTHS[key] = _ANY
        return None
    _WIDTHS[key] = width
    return width


@partial(jax.jit, static_argnums=0)
def _magnitude_reference(width, X, w_start, k):
    """The magnitude support M = H_k(w_start) and its Gram X_M X_Mᵀ, shared by every candidate's backsolves
    (None where X is not formed). ``width``: static, or None (chosen at run time, :func:`_width`)."""
    magnitude = as_groups(k).project(w_start)
    if not X.formed:
        return magnitude, None
    if width is None:
        return magnitude, iht_lib.bucketed_gram(X.matrix, magnitude)
    return magnitude, iht_lib.support_gram(X.matrix, magnitude, width)


def _incumbent(X, w_bar, support, magnitude, magnitude_gram, groups):
    """(X_S X_Sᵀ, X·w̄_S) for the support S, the Gram updated from the magnitude support's;
    (None, None) where X is not formed."""
    if not X.formed:
        return None, None
    gram = _nearby_gram(_width("nearby", X, groups), X.matrix, support, magnitude, magnitude_gram)
    return gram, _anchor(X.matrix, w_bar, support)


@partial(jax.jit, static_argnums=0)
def _nearby_gram(width, M, support, magnitude, magnitude_gram):
    """X_S X_Sᵀ from the magnitude support's Gram (:func:`swapjax.iht.nearby_gram`), at a static
    ``width`` or (None) the width of |S| chosen at run time."""
    if width is None:
        return iht_lib.nearby_gram(M, support, magnitude, magnitude_gram)
    return iht_lib.nearby_gram(M, support, magnitude, magnitude_gram, width, iht_lib.exchange_width(width))


@jax.jit
def _anchor(M, w_bar, support):
    """X·w̄_S."""
    return matmul(M, jnp.where(support, w_bar, 0))


@partial(jax.jit, static_argnums=0)
def _ridge(cg_iters, X, t, w_bar, support, lam, gram, init, x_anchor=None):
    """The ridge solution on S and its f (:func:`swapjax.iht.ridge_fit`): one pass over X with the Gram
    ``gram`` (and X·w̄_S, ``x_anchor``, if known), else CG from ``init``. Every backsolve of a solve
    outside the swap search is this one program."""
    w, f, _ = iht_lib.ridge_fit(X, t, w_bar, support, lam, gram, init, cg_iters, x_anchor)
    return w, f


def _obs_fit(cg_iters, rounds, X, w_bar, w_start, t, k, lam, col_sq):
    """The backsolve on the OBS support of w_start (:func:`swapjax.iht.obs_support`, active set of the
    2·bucket(k) largest |w_start|) and ``rounds`` of swap search from it: (w, support, f, weights exchanged)."""
    support, gram = _obs_support(_width("obs", X, k), X.matrix, w_start, k, lam)
    w, _ = _ridge(cg_iters, X, t, w_bar, support, lam, gram, w_bar)
    return _swap(cg_iters, _width("swap", X, k), rounds, X, w_bar, w, t, lam, support, gram, col_sq, k)


@partial(jax.jit, static_argnums=0)
def _obs_support(width, M, w_start, k, lam):
    """The OBS support of w_start (active set: the 2·bucket(k) largest |w_start|) and its Gram; ``width``
    = bucket(k), static, or None (chosen at run time)."""
    p = M.shape[1]
    if width is not None:
        support = iht_lib.obs_support(M, w_start, k, lam, min(p, 2 * width))
        return support, iht_lib.support_gram(M, support, width)
    support = iht_lib.obs_support(M, w_start, k, lam, jnp.minimum(p, 2 * iht_lib.bucket(as_groups(k).k, p)))
    return support, iht_lib.bucketed_gram(M, support)


@partial(jax.jit, static_argnums=(0, 1))
def _swap(cg_iters, width, rounds, X, w_bar, w, t, lam, support, gram, col_sq, groups):
    """``rounds`` (traced) of :func:`swapjax.iht.swap_search` from the ridge solution w on ``support``:
    (w, support, f, weights exchanged). ``width`` = bucket(k), static, or None: the exchange widths chosen at
    run time (one compilation for every k and round count)."""
    most = None if width is None else iht_lib.exchange_width(width)
    return iht_lib.swap_search(X, t, w_bar, w, support, lam, rounds, gram, most, cg_iters, col_sq, groups)


def _reference_objectives(cg_iters, X, t, w_bar, w_start, lam, magnitude, magnitude_gram):
    """f at H_k(w_start) = w_start on the magnitude support M, and f of the backsolve on M."""
    _, f_mag = _ridge(cg_iters, X, t, w_bar, magnitude, lam, magnitude_gram, w_bar)
    return _objective_at_magnitude(X, t, w_bar, w_start, lam, magnitude), f_mag


@jax.jit
def _objective_at_magnitude(X, t, w_bar, w_start, lam, magnitude):
    """f at H_k(w_start) = w_start on the magnitude support."""
    return iht_lib.objective(X, jnp.where(magnitude, w_start, 0), t, w_bar, lam)


def _rounding_of_f(f, t):
    """4·√N·eps·(f + ½‖t‖²): how far two evaluations of f at (near) the same w may differ in t's dtype.
    f is a sum of N squared residuals r = Xw − t that cancel against t (the backsolve evaluates it
    in its dual form), so its rounding scales with ½‖t‖², not with f alone."""
    eps = jnp.finfo(t.dtype).eps
    return 4 * jnp.sqrt(t.shape[0]) * eps * (jnp.abs(f) + 0.5 * t @ t)


def _refine(cg_iters, rounds, X, w_bar, w, t, lam, support, objective, col_sq, magnitude, magnitude_gram, groups):
    """Backsolve on IHT's support and on the magnitude support H_k(w_start); swap search from the better.

    The backsolve replaces IHT's w unless its f is not finite or higher beyond rounding (it
    should not be: it is the exact minimiser on the support, and CG descends from IHT's w).
    ``magnitude_gram`` = X_M X_Mᵀ for the magnitude support M; the Gram of IHT's support, which rarely
    strays far from M, is updated from it. Where X is not formed (``magnitude_gram`` None), the
    backsolves run by conjugate gradients from IHT's w and from w̄ on M. Takes IHT's (w, support, f) at
    the targets t and λ; returns (w, f, backsolved, support, f on M, weights swapped). Each step is a
    program of its own (the nearby Gram, the backsolves, the choice, the swap search), shared with the
    selection's other candidates; their widths follow k (:func:`_width`), and the swap search runs (and
    compiles) only where ``rounds`` > 0.
    """
    gram = _nearby_gram(_width("nearby", X, groups), X.matrix, support, magnitude, magnitude_gram) if X.formed else None
    w_bs, obj_bs = _ridge(cg_iters, X, t, w_bar, support, lam, gram, w)
    w_mag, obj_mag = _ridge(cg_iters, X, t, w_bar, magnitude, lam, magnitude_gram, w_bar)
    w, obj, backsolved, support, gram = _pick(w, objective, t, support, gram, w_bs, obj_bs, w_mag, obj_mag, magnitude,
                                              magnitude_gram)
    if rounds <= 0:
        return w, obj, backsolved, support, obj_mag, jnp.zeros((), int)
    w, support, obj, swapped = _swap(cg_iters, _width("swap", X, groups), rounds, X, w_bar, w, t, lam, support, gram,
                                     col_sq, groups)
    return w, obj, backsolved, support, obj_mag, swapped


@jax.jit
def _pick(w, objective, t, support, gram, w_bs, obj_bs, w_mag, obj_mag, magnitude, magnitude_gram):
    """:func:`_refine`'s choice: the backsolve on IHT's support (w_bs) replaces IHT's w unless its f is
    not finite or higher beyond rounding; the backsolve on the magnitude support replaces that where its
    f is lower. (w, f, backsolved, support, the Gram of the support kept)."""
    backsolved = jnp.isfinite(obj_bs) & (obj_bs <= objective + _rounding_of_f(objective, t))
    w, obj = jnp.where(backsolved, w_bs, w), jnp.where(backsolved, obj_bs, objective)
    from_mag = jnp.isfinite(obj_mag) & (obj_mag < obj)
    w, support = jnp.where(from_mag, w_mag, w), jnp.where(from_mag, magnitude, support)
    obj = jnp.where(from_mag, obj_mag, obj)
    gram = jax.tree_util.tree_map(lambda a, b: jnp.where(from_mag, a, b), magnitude_gram, gram)
    return w, obj, backsolved, support, gram
