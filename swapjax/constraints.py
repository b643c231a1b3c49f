"""Sparsity constraints: which supports a pruned w ∈ R^p may have.

A constraint is a *spec* chosen by the user (:class:`TopK`, :class:`LayerBudgets`, :class:`NM`)
whose ``resolve(layout, s, w, col_sq)`` turns it, at each stage's sparsity s, into :class:`Groups`: a partition of the p
prunable coordinates into G groups with a count c_g of weights to keep in each. Every method works
with the Groups alone:

- ``project(v)``: the feasible support nearest v, the c_g largest |v_i| of each group g, ties to the
  lower index (IHT's hard threshold H(v), the magnitude mask, a ranking by any score);
- ``feasible(mask)``: every group holds exactly its count;
- ``group_max(values)``: per coordinate, the largest value in its group (IHT's support-change step);
- ``pairs(gain, cost, most)``: the exchanges a swap search may make, pruned for kept *within a group*.

One group holding k = round((1 − s)·p) is the global top-k of the papers (``TopK``); one group per
layer is a per-layer budget; the groups of M consecutive weights along a kernel's reduction axis,
each keeping N, are N:M sparsity.
"""
from __future__ import annotations

import abc
import math
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from . import checks
from .pytree import reduction_axes  # noqa: F401 (the name rule's N:M axes, re-exported)


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Groups:
    """A resolved constraint: coordinate i belongs to group ``ids[i]``, which keeps ``counts[g]``.

    ids: int32 (p,), or None for one group (the global top-k). counts: int32 (G,).
    ``label``: how the constraint reads in messages and summaries (e.g. "2:4", "per-layer ERK").
    ``nm``: (n, m) for the N:M groups of one layer (see the field), else None.
    Every method's ``solve(X, w_bar, k)`` takes Groups in place of the int k.

    Examples:
        >>> import jax.numpy as jnp, swapjax
        >>> g = swapjax.Groups(jnp.array([1, 2]), jnp.array([0, 0, 1, 1, 1]))  # keep 1 of 2, then 2 of 3
        >>> g.project(jnp.array([0.1, -3.0, 2.0, 0.5, -1.0])).tolist()
        [False, True, True, False, True]
        >>> int(g.k), bool(g.feasible(jnp.array([True, True, False, False, False])))
        (3, False)
    """

    counts: jax.Array
    ids: Optional[jax.Array] = None
    label: str = field(default="global top-k", metadata=dict(static=True))
    #: (n, m) where the groups are N:M on ONE layer's (d_in, d_out) weights, row-major: group j·d_in/m + g
    #: holds inputs g·m … g·m + m − 1 of output unit j and keeps n (what a layer method such as SparseGPT
    #: reads to choose its masks group by group); None otherwise.
    nm: Optional[tuple] = field(default=None, metadata=dict(static=True))

    @classmethod
    def top_k(cls, k) -> "Groups":
        """One group of all p coordinates keeping k."""
        return cls(jnp.asarray(k, jnp.int32).reshape(1))

    @property
    def num_groups(self) -> int:
        return self.counts.shape[0]

    @property
    def k(self) -> jax.Array:
        """The number of weights kept, Σ_g c_g."""
        return jnp.sum(self.counts)

    def project(self, v: jax.Array) -> jax.Array:
        """Bool mask of the c_g largest |v_i| in every group g (exactly Σ c_g True); ties to the lower index."""
        if self.ids is None:
            return hard_threshold_mask(v, self.counts[0])
        return _grouped_top(jnp.abs(v), self.ids, self.counts)

    def feasible(self, mask: jax.Array) -> jax.Array:
        """True where every group keeps exactly its count."""
        if self.ids is None:
            return jnp.sum(mask) == self.counts[0]
        kept = jax.ops.segment_sum(mask.astype(jnp.int32), self.ids, self.num_groups)
        return jnp.all(kept == self.counts)

    def group_max(self, values: jax.Array) -> jax.Array:
        """max_{j in group(i)} values_j for every i (one value broadcast for one group)."""
        if self.ids is None:
            return jnp.max(values)
        return jax.ops.segment_max(values, self.ids, self.num_groups)[self.ids]

    def pairs(self, gain: jax.Array, cost: jax.Array, most: int):
        """The ``most`` (static) best exchanges: (into, out, net), net = gain[into] − cost[out], descending.

        ``gain`` is −inf on kept coordinates, ``cost`` +inf on pruned ones. Within each group the
        r-th largest gain is paired with the r-th smallest cost, so every exchange keeps the group's
        count; across groups the pairs are ranked by net.
        """
        if self.ids is None:
            best_gain, into = jax.lax.top_k(gain, most)
            least_cost, out = jax.lax.top_k(-cost, most)
            return into, out, best_gain + least_cost
        index = jnp.arange(gain.shape[0])
        by_gain = jnp.lexsort((index, -gain, self.ids))  # group-major, then gain descending
        by_cost = jnp.lexsort((index, cost, self.ids))  # group-major, then cost ascending
        # both orders are group-major, so each group occupies the same positions in both: position r pairs
        # the group's r-th best addition with its r-th cheapest removal
        net = gain[by_gain] - cost[by_cost]
        net = jnp.where(jnp.isnan(net), -jnp.inf, net)
        best, at = jax.lax.top_k(net, most)
        return by_gain[at], by_cost[at], best

    def restrict(self, positions, name: str = "the layer") -> "Groups":
        """The groups of one layer: ``positions`` (d_in, d_out), its weights' coordinates, become coordinates
        0 … d_in·d_out − 1 (row-major) with their groups and counts; ``nm`` kept where the layer's groups are
        N:M along its inputs. ValueError where a group reaches outside the layer (the global top-k: weights
        ranked across layers)."""
        flat = np.asarray(positions).ravel()
        if self.ids is None:
            raise ValueError(f"constraint: {self.label} ranks weights across layers, so {name} has no budget of "
                             "its own; give a budget per layer (LayerBudgets) or N:M")
        ids = np.asarray(self.ids)
        groups, local = np.unique(ids[flat], return_inverse=True)
        inside = np.bincount(local, minlength=groups.size)
        if np.any(inside != np.bincount(ids, minlength=self.num_groups)[groups]):
            raise ValueError(f"constraint: {self.label} has groups that reach outside {name}, so it has no "
                             "budget of its own; give a budget per layer (LayerBudgets) or N:M")
        counts = np.asarray(self.counts)[groups]
        d_in, d_out = np.shape(positions)
        nm = None
        if self.nm is not None and d_in % self.nm[1] == 0:
            canonical = np.arange(d_out)[None, :] * (d_in // self.nm[1]) + np.arange(d_in)[:, None] // self.nm[1]
            nm = self.nm if np.array_equal(local, canonical.ravel()) and np.all(counts == self.nm[0]) else None
        return Groups(jnp.asarray(counts, jnp.int32), jnp.asarray(local, jnp.int32), self.label, nm)


def check_groups(groups: Groups, p: int) -> Groups:
    """ValueError unless ``groups`` partitions p coordinates with counts in [0, group size] and 1 ≤ k ≤ p."""
    counts = np.asarray(groups.counts)
    if counts.ndim != 1 or counts.size == 0 or not np.issubdtype(counts.dtype, np.integer):
        raise ValueError(f"k: Groups.counts must be a non-empty 1-D integer array, got {counts.dtype}{counts.shape}")
    if groups.ids is None:
        sizes = np.array([p])
        if counts.size != 1:
            raise ValueError(f"k: Groups without ids hold one group; got {counts.size} counts")
    else:
        ids = np.asarray(groups.ids)
        if ids.shape != (p,) or not np.issubdtype(ids.dtype, np.integer) or ids.min() < 0 or ids.max() >= counts.size:
            raise ValueError(f"k: Groups.ids must be integers in [0, {counts.size}) of shape ({p},), "
                             f"got {ids.dtype}{ids.shape}")
        sizes = np.bincount(ids, minlength=counts.size)
    if np.any(counts < 0) or np.any(counts > sizes) or not 1 <= counts.sum() <= p:
        raise ValueError(f"k: every group's count must lie in [0, its size] and k = Σ counts in [1, {p}]; "
                         f"got k = {counts.sum()} ({groups.label})")
    return groups


def as_groups(k) -> Groups:
    """``k`` as Groups: Groups as they are, an int (or integer array) k as the global top-k."""
    return k if isinstance(k, Groups) else Groups.top_k(k)


@jax.jit
def hard_threshold_mask(v: jax.Array, k) -> jax.Array:
    """Boolean mask of the k largest |v_i|, exactly k True; ties go to the lower index.

    k is traced (one compilation per shape of v). The k-th largest |v| is found by a radix select on the
    float's bit pattern (monotone for non-negative floats): one O(p) count per
    bit instead of an O(p log p) sort.
    """
    a = jnp.abs(v)
    int_type = {4: jnp.int32, 8: jnp.int64, 2: jnp.int16}[a.dtype.itemsize]
    bits = jax.lax.bitcast_convert_type(a, int_type)
    width = 8 * a.dtype.itemsize - 1  # the sign bit is 0

    def set_bit_if_k_remain(i, kth):
        trial = kth | (jnp.ones((), int_type) << jnp.asarray(width - 1 - i, int_type))
        return jnp.where(jnp.sum(bits >= trial) >= k, trial, kth)

    kth = jax.lax.fori_loop(0, width, set_bit_if_k_remain, jnp.zeros((), int_type))
    above, ties = bits > kth, bits == kth
    return above | (ties & (jnp.cumsum(ties) <= k - jnp.sum(above)))


@jax.jit
def _grouped_top(a, ids, counts):
    """Mask of the counts[g] largest a_i of each group g; ties to the lower index. O(p log p)."""
    p = a.shape[0]
    index = jnp.arange(p)
    order = jnp.lexsort((index, -a, ids))
    sizes = jax.ops.segment_sum(jnp.ones(p, jnp.int32), ids, counts.shape[0])
    starts = jnp.cumsum(sizes) - sizes
    rank = index - starts[ids[order]]  # position of order[j] within its group
    return jnp.zeros(p, bool).at[order].set(rank < counts[ids[order]])


def kept_count(sparsity: float, p: int) -> int:
    """k = round((1 − sparsity)·p), the number of weights kept."""
    return int(round((1 - sparsity) * p))


def layer_quotas(k: int, sizes: Sequence[int]) -> list[int]:
    """Per-layer kept counts k_l ≈ k·n_l/p that sum exactly to k (largest remainder).

    Each layer gets ⌊k·n_l/p⌋; the k − Σ⌊·⌋ leftover weights go one each to the
    layers with the largest remainders k·n_l mod p, ties to the lower layer
    index. Exact integer arithmetic, so the result is deterministic; k_l ≤ n_l.
    """
    sizes = [int(n) for n in sizes]
    if any(n < 0 for n in sizes):
        raise ValueError(f"segments: layer sizes must be ≥ 0, got {sizes}")
    p = sum(sizes)
    k = int(k)
    if not 0 <= k <= p:
        raise ValueError(f"k: must be in [0, p] = [0, {p}], got {k}")
    if p == 0:
        return [0] * len(sizes)
    quotas = [k * n // p for n in sizes]
    remainders = [k * n % p for n in sizes]
    leftover = k - sum(quotas)
    for i in sorted(range(len(sizes)), key=lambda i: (-remainders[i], i))[:leftover]:
        quotas[i] += 1
    return quotas



class Constraint(abc.ABC):
    """A sparsity constraint: ``resolve`` turns it into the :class:`Groups` of one stage.

    ``resolve(lay, sparsity, w, col_sq)`` gets the layout of the prunable leaves
    (:class:`swapjax.pytree.Layout`), the stage's sparsity s, the stage's starting
    weights w and, where ``needs_fisher``, diag(XᵀX); it returns Groups whose counts
    sum to the weights kept. ``label`` names it in progress lines and summaries.
    A subclass is all a new constraint needs: every method honours it through the Groups.

    Examples:
        A new constraint in one class: the first row of every kernel stays dense, the
        rest is one group keeping what is left of the budget.

        >>> import jax.numpy as jnp, numpy as np, swapjax
        >>> class DenseFirstRow(swapjax.Constraint):
        ...     label = "first rows dense"
        ...     def resolve(self, lay, sparsity, w=None, col_sq=None):
        ...         ids = np.ones(lay.size, np.int32)
        ...         for start, shape in zip(lay.offsets, lay.shapes):
        ...             ids[start:start + int(np.prod(shape[1:]))] = 0          # row 0, row-major
        ...         dense = int((ids == 0).sum())
        ...         rest = max(swapjax.kept_count(sparsity, lay.size) - dense, 0)
        ...         return swapjax.Groups(jnp.array([dense, rest], jnp.int32), jnp.asarray(ids), self.label)
        >>> params = {"w": np.arange(1.0, 13.0, dtype="float32").reshape(4, 3)}
        >>> lay = swapjax.pytree.layout(params)
        >>> mask = DenseFirstRow().resolve(lay, 0.5).project(swapjax.pytree.flatten(params, lay))
        >>> mask.reshape(4, 3).astype(int).tolist()    # 6 kept: row 0, then the 3 largest of the rest
        [[1, 1, 1], [0, 0, 0], [0, 0, 0], [1, 1, 1]]
    """

    label: ClassVar[str] = "constraint"
    needs_fisher: ClassVar[bool] = False  # resolve takes diag(XᵀX)
    ragged: ClassVar[str] = "dense"  # what a layer the constraint cannot group becomes: "dense" or "error"

    def ragged_leaves(self, lay) -> list[str]:
        """The layers (or leaves) the constraint leaves dense because it cannot group them (N:M's ragged ones)."""
        return []

    @abc.abstractmethod
    def resolve(self, lay, sparsity: float, w=None, col_sq=None) -> Groups:
        """The groups and their counts at sparsity s."""

    def check(self, lay, sparsity: Optional[float], w=None) -> float:
        """The final sparsity s, once checked from the layout alone (before any gradient) that the
        constraint can be met there: ValueError where its groups at s do not partition the p prunable
        weights, keep none, or keep all p where round((1 − s)·p) < p (the constraint would prune
        nothing). ``sparsity`` None: the constraint's own (a :class:`LayerBudgets` mapping's mean). A
        constraint that ``needs_fisher`` is resolved at each stage only: a subclass checks here what the
        layout decides."""
        sparsity = checks.sparsity(sparsity)
        if not self.needs_fisher:
            groups = check_groups(self.resolve(lay, sparsity, w), lay.size)
            if int(groups.k) == lay.size and kept_count(sparsity, lay.size) < lay.size:
                raise ValueError(f"constraint: {self.label} keeps all p = {lay.size} prunable weights at sparsity "
                                 f"{sparsity:g}: nothing would be pruned; raise the sparsity or change the constraint")
        return sparsity


def as_constraint(value) -> Constraint:
    """``value`` as a Constraint: None is :class:`TopK`; anything but a Constraint instance is an error."""
    if value is None:
        return TopK()
    if isinstance(value, type) and issubclass(value, Constraint):
        raise TypeError(f"constraint: got the class {value.__name__}; pass an instance, e.g. swapjax.{value.__name__}()")
    if not isinstance(value, Constraint):
        raise ValueError(f"constraint: expected None, swapjax.TopK(), LayerBudgets(...), NM(n, m) or an instance of "
                         f"a subclass of swapjax.Constraint, got {value!r}")
    return value


@dataclass(frozen=True)
class TopK(Constraint):
    """The k = round((1 − s)·p) largest weights over all prunable leaves together (the papers' default).

    Examples:
        >>> import numpy as np, swapjax
        >>> lay = swapjax.pytree.layout({"w": np.ones((4, 5), "float32")})
        >>> groups = swapjax.TopK().resolve(lay, 0.75)   # one group of p = 20 keeping 5
        >>> int(groups.k), groups.ids is None
        (5, True)
    """

    label = "global top-k"

    def resolve(self, lay, sparsity: float, w=None, col_sq=None) -> Groups:
        return Groups.top_k(kept_count(sparsity, lay.size))

    def check(self, lay, sparsity, w=None) -> float:
        sparsity = checks.sparsity(sparsity)
        if kept_count(sparsity, lay.size) < 1:
            raise ValueError(f"sparsity: {sparsity:g} keeps round((1 - sparsity) * p) = 0 of p = {lay.size} prunable "
                             f"weights; use sparsity ≤ {1 - 1 / lay.size:.6g}")
        return super().check(lay, sparsity, w)


@dataclass(frozen=True)
class LayerBudgets(Constraint):
    """A budget per layer, the counts summing to round((1 − s)·p).

    The layers are those of the layout (:func:`swapjax.find_layers` where ``prune`` traced the loss:
    every slice of a scanned or vmapped stack is a layer with its own budget; one per leaf by the name
    rule). rule: how the density d_l = 1 − s_l of layer l is set, with Σ_l d_l·p_l = (1 − s)·p:

    - ``"uniform"``: d_l = 1 − s in every layer;
    - ``"erk"`` (Erdős–Rényi kernel, RigL): d_l ∝ (Σ of the kernel's dimensions)/(their product), so
      small layers keep more; a layer that would pass density 1 is dense and the rest rescaled;
    - ``"owl"`` (outlier-weighted, in the spirit of OWL): layer l's outlier share D_l is the
      fraction of its saliencies ρ_i = w_i²·(XᵀX)_ii above ``owl_threshold`` × the layer's mean;
      d_l = 1 − s + ``owl_spread``·(2(D_l − min D)/(max D − min D) − 1), shifted to the total:
      more outliers, more weights kept, all within about s ± ``owl_spread``.
      :func:`swapjax.prune_layerwise` scores each weight as published (OWL: Wanda's score
      S_ij = |W_ij|·‖A_:,i‖₂, ‖A_:,i‖₂² = H_ii, from the dense network) in place of ρ, through
      ``resolve(..., scores=)``. ``owl_group(layer name) -> key``: the layers with one key pool
      their scores into one D (OWL's "layer" is a decoder block: e.g. ``lambda name:
      name.split("/")[0]``), so they get one sparsity; None: each layer its own;
    - a mapping {layer name or leaf path: sparsity} covering every layer (e.g. ``{"Dense_0/kernel": 0.5,
      ...}``; a leaf's path gives all its slices, ``"blocks/kernel[2]"`` one slice): the final
      sparsities, taken as given (layer l keeps round((1 − s_l)·p_l), never rescaled). The overall
      sparsity is their size-weighted mean s̄ = Σ_l s_l·p_l/p; a ``sparsity`` passed with it must be s̄
      within the rounding of the counts (L/(2p) for L layers), else a ValueError gives both. The
      stages before the last scale every s_l by s_t/s̄.

    max_sparsity: a cap on every layer's sparsity (densities ≥ 1 − cap), the excess moved to the
    others; with a mapping, a given s_l above it is a ValueError. min_sparsity: a floor on every
    layer's sparsity (densities ≤ 1 − floor), likewise; a floor above the overall sparsity, or a
    floor above the cap, is a ValueError. Counts are rounded by largest remainder so that they sum
    exactly to the total.

    A layer that would keep 0 weights (a small layer at a high sparsity: the network's output would
    no longer depend on its input) is a ValueError naming it, from ``resolve`` and so, through
    ``check``, before any gradient (OWL's counts depend on the Fisher: checked at each stage).

    Examples:
        >>> import numpy as np, swapjax
        >>> lay = swapjax.pytree.layout({"a": {"kernel": np.ones((100, 50), "float32")},
        ...                              "b": {"kernel": np.ones((10, 10), "float32")}})
        >>> swapjax.LayerBudgets().resolve(lay, 0.9).counts.tolist()        # 10 % of each leaf
        [500, 10]
        >>> swapjax.LayerBudgets("erk").resolve(lay, 0.9).counts.tolist()   # the small leaf keeps more
        [450, 60]
        >>> given = swapjax.LayerBudgets({"a/kernel": 0.5, "b/kernel": 0.25})
        >>> given.resolve(lay, None).counts.tolist(), round(given.check(lay, None), 4)   # as given; s̄
        ([2500, 75], 0.4951)
    """

    rule: Union[str, Mapping[str, float]] = "uniform"
    max_sparsity: Optional[float] = None
    owl_threshold: float = 5.0
    owl_spread: float = 0.08
    min_sparsity: Optional[float] = None
    owl_group: Optional[Callable[[str], object]] = None

    def __post_init__(self):
        if isinstance(self.rule, Mapping):
            given = {}
            for name, value in self.rule.items():
                if not isinstance(name, str):
                    raise ValueError(f"rule: the mapping's keys must be leaf paths such as 'Dense_0/kernel', "
                                     f"got {name!r}")
                given[name] = checks.real(f"rule[{name!r}] (a leaf's sparsity)", value, 0.0, 1.0, hi_open=True)
            if not given:
                raise ValueError("rule: the mapping is empty; give the sparsity of every prunable leaf")
            object.__setattr__(self, "rule", given)  # a copy: the caller's mapping is never changed
        else:
            checks.choice("rule", self.rule, ("uniform", "erk", "owl"))
        if self.max_sparsity is not None:
            cap = checks.real("max_sparsity", self.max_sparsity, 0.0, 1.0)
            object.__setattr__(self, "max_sparsity", cap)
            over = [f"{name} ({s:g})" for name, s in self.rule.items() if s > cap] if self.given else []
            if over:
                raise ValueError(f"max_sparsity: {cap:g} is below the sparsity given for {', '.join(over)}; "
                                 f"raise the cap or leave it out (a mapping is taken as given)")
        if self.min_sparsity is not None:
            floor = checks.real("min_sparsity", self.min_sparsity, 0.0, 1.0, hi_open=True)
            object.__setattr__(self, "min_sparsity", floor)
            if self.max_sparsity is not None and floor > self.max_sparsity:
                raise ValueError(f"min_sparsity: {floor:g} is above max_sparsity {self.max_sparsity:g}; "
                                 "the floor on every layer's sparsity must not exceed the cap")
            under = [f"{name} ({s:g})" for name, s in self.rule.items() if s < floor] if self.given else []
            if under:
                raise ValueError(f"min_sparsity: {floor:g} is above the sparsity given for {', '.join(under)}; "
                                 f"lower the floor or leave it out (a mapping is taken as given)")
        object.__setattr__(self, "owl_threshold",
                           checks.real("owl_threshold", self.owl_threshold, 0.0, lo_open=True))
        object.__setattr__(self, "owl_spread", checks.real("owl_spread", self.owl_spread, 0.0, 0.5))
        if self.owl_group is not None and not callable(self.owl_group):
            raise ValueError(f"owl_group: expected None or a function owl_group(layer name) -> key, "
                             f"got {self.owl_group!r}")

    @property
    def label(self) -> str:
        rule = "given" if isinstance(self.rule, Mapping) else {"uniform": "uniform", "erk": "ERK", "owl": "OWL"}[self.rule]
        cap = f", cap {self.max_sparsity:g}" if self.max_sparsity is not None else ""
        floor = f", floor {self.min_sparsity:g}" if self.min_sparsity is not None else ""
        return f"per-layer {rule}{cap}{floor}"

    @property
    def needs_fisher(self) -> bool:
        return self.rule == "owl"

    @property
    def given(self) -> bool:
        """True where the rule is a mapping {leaf path: sparsity}."""
        return isinstance(self.rule, Mapping)

    def given_sparsity(self, lay) -> float:
        """A mapping's overall sparsity s̄ = Σ_l s_l·p_l/p on the layout (ValueError for a missing or an
        unknown path)."""
        sizes = _sizes(lay).astype(np.float64)
        return float(self._given_per_layer(lay) @ sizes / sizes.sum())

    def _given_per_layer(self, lay) -> np.ndarray:
        """s_l of every layer: given by its name (a slice: 'blocks/kernel[2]'), else by its leaf's path."""
        names = {layer.name for layer in lay.layers} | {layer.path for layer in lay.layers}
        missing = [layer.name for layer in lay.layers if layer.name not in self.rule and layer.path not in self.rule]
        extra = [name for name in self.rule if name not in names]
        if missing or extra:
            raise ValueError(f"rule: the mapping must give a sparsity for every prunable layer (by its name or its "
                             f"leaf's path) and no other; missing {missing}, unknown {extra} (the prunable layers: "
                             f"{[layer.name for layer in lay.layers]})")
        return np.array([self.rule.get(layer.name, self.rule.get(layer.path)) for layer in lay.layers], np.float64)

    def check(self, lay, sparsity, w=None) -> float:
        if self.given:
            final = self.given_sparsity(lay)
            if sparsity is None:
                sparsity = final
            else:
                sparsity = checks.sparsity(sparsity)
                if abs(sparsity - final) > _rounding(lay):
                    raise ValueError(
                        f"sparsity: {sparsity:g} disagrees with the mapping's size-weighted mean {final:.6g} "
                        f"(Σ_l s_l·p_l/p over the leaves' sparsities); a mapping is taken as given: leave "
                        f"sparsity out, pass {final:.6g}, or change the mapping")
        else:
            sparsity = checks.sparsity(sparsity)
            self._check_cap(lay, sparsity)
        return super().check(lay, sparsity, w)

    def densities(self, lay, sparsity: Optional[float], w=None, col_sq=None, scores=None) -> np.ndarray:
        """d_l per leaf (float64) with Σ d_l·p_l = (1 − s)·p, within [1 − cap, 1 − floor] (a mapping: 1 − s_l
        as given at its mean s̄ or at ``sparsity`` None, × s/s̄ below it). ``scores`` (OWL): the score of
        each of the p weights from which D_l is taken, in place of ρ = w²·col_sq (NaN: a weight not scored)."""
        if self.given:
            return 1 - self._given(lay, sparsity)
        sizes = _sizes(lay).astype(np.float64)
        target = (1 - sparsity) * sizes.sum()
        if self.rule == "uniform":
            raw = np.full(len(sizes), 1 - sparsity)
        elif self.rule == "erk":
            raw = np.array([sum(layer.shape) / math.prod(layer.shape) for layer in lay.layers])
        else:
            if scores is None:
                scores = np.asarray(w).astype(np.float64) ** 2 * np.asarray(col_sq).astype(np.float64)
            raw = 1 - sparsity + self.owl_shift(lay, scores)
        self._check_cap(lay, sparsity)
        low = np.zeros(len(sizes)) if self.max_sparsity is None else np.full(len(sizes), 1 - self.max_sparsity)
        high = np.ones(len(sizes)) if self.min_sparsity is None else np.full(len(sizes), 1 - self.min_sparsity)
        return _fit_total(raw, sizes, target, low, self.rule == "owl", high)

    def resolve(self, lay, sparsity: Optional[float], w=None, col_sq=None, scores=None) -> Groups:
        sizes = _sizes(lay)
        if self.given:  # each layer's count as given, round((1 − s_l)·p_l)
            counts = np.array([kept_count(s, n) for s, n in zip(self._given(lay, sparsity), sizes)], np.int64)
        elif (self.rule == "uniform" and (self.max_sparsity is None or self.max_sparsity >= sparsity)
              and (self.min_sparsity is None or self.min_sparsity <= sparsity)):
            # k·p_l/p each, exactly as Magnitude(scope="layer") splits k
            counts = np.asarray(layer_quotas(kept_count(sparsity, lay.size), sizes))
        else:
            counts = _round_counts(self.densities(lay, sparsity, w, col_sq, scores) * sizes, sizes,
                                   kept_count(sparsity, lay.size))
        empty = [f"{layer.name} {layer.shape}" for layer, count, n in zip(lay.layers, counts, sizes)
                 if count == 0 and n > 0]
        if empty:
            at = "the mapping's sparsities" if self.given else f"sparsity {sparsity:g}"
            raise ValueError(
                f"LayerBudgets: at {at} ({self.label}), {', '.join(empty[:5])}{'...' if len(empty) > 5 else ''} "
                f"would keep 0 weights (the network's output would no longer depend on its input); lower the "
                f"sparsity, cap every leaf's (LayerBudgets(..., max_sparsity=...)), use 'erk', or leave the leaf "
                f"out with select")
        return Groups(jnp.asarray(counts, jnp.int32), jnp.asarray(_layer_ids(lay)), self.label)

    def _check_cap(self, lay, sparsity):
        """ValueError where every leaf at most ``max_sparsity`` (at least ``min_sparsity``) sparse cannot reach
        ``sparsity``."""
        if self.max_sparsity is not None and sparsity > self.max_sparsity + 1e-12:
            raise ValueError(f"max_sparsity: every leaf at most {self.max_sparsity:g} sparse cannot reach "
                             f"sparsity {sparsity:g}; raise max_sparsity or lower the sparsity")
        if self.min_sparsity is not None and sparsity < self.min_sparsity - 1e-12:
            raise ValueError(f"min_sparsity: every leaf at least {self.min_sparsity:g} sparse cannot reach "
                             f"sparsity {sparsity:g}; lower min_sparsity or raise the sparsity")

    def _given(self, lay, sparsity):
        """The leaves' sparsities at stage sparsity s: as given at the mapping's mean s̄ (or s None),
        each × s/s̄ below it; ValueError above it."""
        final = self.given_sparsity(lay)
        given = self._given_per_layer(lay)
        if sparsity is None or abs(float(sparsity) - final) <= _rounding(lay):
            return given
        if sparsity > final:
            raise ValueError(f"sparsity: {sparsity:g} is above the mapping's size-weighted mean {final:.6g}; "
                             f"a mapping is taken as given: leave sparsity out or pass {final:.6g}")
        return given * (sparsity / final)

    def outlier_ratios(self, lay, scores) -> np.ndarray:
        """OWL's D_l per layer (float64, NaN for a layer none of whose weights is scored): the share of the
        scores S of layer l (of its ``owl_group``, pooled) above ``owl_threshold`` × their mean. ``scores``:
        one per coordinate of w (p,); NaN entries are left out."""
        scores = np.asarray(scores, np.float64)
        keys = [layer.name if self.owl_group is None else self.owl_group(layer.name) for layer in lay.layers]
        pooled = {}
        for key, layer in zip(keys, lay.layers):
            s = scores[lay.positions(layer).ravel()]
            pooled.setdefault(key, []).append(s[~np.isnan(s)])
        share = {}
        for key, parts in pooled.items():
            s = np.concatenate(parts)
            share[key] = float(np.mean(s > self.owl_threshold * s.mean())) if s.size else math.nan
        return np.array([share[key] for key in keys])

    def owl_shift(self, lay, scores) -> np.ndarray:
        """Λ·(2(D_l − min D)/(max D − min D) − 1) per layer (Λ = ``owl_spread``; 0 for every layer where all D
        are equal, and for a layer with no D), D = :meth:`outlier_ratios`."""
        share = self.outlier_ratios(lay, scores)
        scored = ~np.isnan(share)
        shift = np.zeros(len(share))
        if not scored.any():
            return shift
        low, spread = share[scored].min(), share[scored].max() - share[scored].min()
        if spread > 0:
            shift[scored] = self.owl_spread * (2 * (share[scored] - low) / spread - 1)
        return shift


def _rounding(lay) -> float:
    """How far a mapping's kept fraction may lie from its mean: L/(2p), half a weight per layer."""
    return 0.5 * len(lay.layers) / max(lay.size, 1) + 1e-12


def _sizes(lay) -> np.ndarray:
    """p_l, the weights of each layer of the layout."""
    return np.array([layer.size for layer in lay.layers], np.int64)


def _layer_ids(lay) -> np.ndarray:
    """The layer of each coordinate of w (int32, (p,))."""
    ids = np.empty(lay.size, np.int32)
    for n, layer in enumerate(lay.layers):
        ids[lay.positions(layer).ravel()] = n
    return ids


def _fit_total(raw, sizes, target, low, additive: bool, high=1.0):
    """Densities from ``raw`` rescaled (×c, or + c where ``additive``) to Σ d·sizes = target, clipped to
    [low, high] with the excess moved to the leaves still free (bisection on c; monotone in c)."""
    def total(c):
        return np.clip(raw + c if additive else raw * c, low, high) @ sizes

    lo, hi = (-2.0, 2.0) if additive else (0.0, 1.0)
    while not additive and total(hi) < target and hi < 1e30:
        hi *= 2
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if total(mid) < target else (lo, mid)
    return np.clip(raw + hi if additive else raw * hi, low, high)


def _round_counts(exact, sizes, k: int) -> np.ndarray:
    """Integer counts ≤ sizes near ``exact`` summing to k: floors, then largest remainders (ties: lower index)."""
    counts = np.minimum(np.floor(exact + 1e-9).astype(np.int64), sizes)
    leftover = k - int(counts.sum())
    order = sorted(range(len(sizes)), key=lambda i: (-(exact[i] - counts[i]), i))
    step = 1 if leftover > 0 else -1
    while leftover != 0:
        moved = False
        for i in order if step > 0 else order[::-1]:
            if leftover == 0:
                break
            if 0 <= counts[i] + step <= sizes[i]:
                counts[i] += step
                leftover -= step
                moved = True
        if not moved:
            raise ValueError(f"k: {k} cannot be split over leaves of sizes {list(sizes)}")
    return counts


@dataclass(frozen=True)
class NM(Constraint):
    """N:M sparsity: in every group of M consecutive weights along a kernel's reduction axis, keep N.

    The groups run along :func:`reduction_axes` (Dense: the input axis; Conv: the input channels
    of the flattened patch; attention q/k/v: the input axis, output projection: (heads, head_dim)),
    along ``axes`` given as a tuple (the same axes of every prunable leaf, e.g. ``(0,)``), or along
    ``axes(path, shape) -> axes``, a function of the leaf. The axes of each leaf must be distinct and
    in [−ndim, ndim) (negative ones count from the end): any other is a ValueError naming the leaf,
    raised by ``check`` from the layout, before any gradient. A leaf whose reduction size is not a multiple of M (a ViT's
    7×7×1 patch conv: 49 inputs) is left dense where ``ragged="dense"`` (default; ``prune`` names
    it) or is a ValueError naming it where ``ragged="error"``. The stages of a schedule keep
    max(N, round(M·(1 − s_t))) per group, so the last stage is exactly N:M; the sparsity is then
    (1 − N/M) of the grouped weights. A prune where every prunable leaf is ragged (nothing would be
    pruned) is a ValueError before any gradient.

    Examples:
        >>> import jax.numpy as jnp, numpy as np, swapjax
        >>> params = {"Dense_0": {"kernel": np.arange(16, dtype="float32").reshape(8, 2)}}  # (in, out)
        >>> lay = swapjax.pytree.layout(params)
        >>> groups = swapjax.NM(2, 4).resolve(lay, 0.5)
        >>> mask = groups.project(swapjax.pytree.flatten(params, lay)).reshape(8, 2)
        >>> mask[:, 0].astype(int).tolist()   # in each 4 consecutive inputs, the 2 largest
        [0, 0, 1, 1, 0, 0, 1, 1]
        >>> swapjax.NM(2, 4).sparsity
        0.5
    """

    n: int = 2
    m: int = 4
    axes: Union[None, Sequence[int], Callable[[str, tuple], Sequence[int]]] = None
    ragged: str = "dense"

    label = property(lambda self: f"{self.n}:{self.m}")
    needs_fisher = False

    def __post_init__(self):
        object.__setattr__(self, "m", checks.integer("m", self.m, 1))
        object.__setattr__(self, "n", checks.integer("n", self.n, 1))
        if self.n > self.m:
            raise ValueError(f"n: N:M keeps n of every m weights, so n ≤ m; got {self.n}:{self.m}")
        if isinstance(self.axes, (tuple, list, np.ndarray)):
            axes = tuple(checks.integer(f"axes[{i}]", a) for i, a in enumerate(np.asarray(self.axes).tolist()
                                                                               if isinstance(self.axes, np.ndarray)
                                                                               else self.axes))
            if not axes or len(set(axes)) < len(axes):
                raise ValueError(f"axes: expected distinct axes such as (0,), got {self.axes!r}")
            object.__setattr__(self, "axes", axes)
        elif self.axes is not None and not callable(self.axes):
            raise ValueError(f"axes: expected None, a tuple of axes such as (0,), or a function "
                             f"axes(path, shape) -> axes, got {self.axes!r}")
        checks.choice("ragged", self.ragged, ("dense", "error"))

    @property
    def sparsity(self) -> float:
        return 1 - self.n / self.m

    def ragged_leaves(self, lay) -> list[str]:
        """The prunable layers (leaves, where ``axes`` is given) whose inputs are not a multiple of M."""
        return [name for name, _, ids, _, _ in self._units(lay) if ids is None]

    def leaf_axes(self, name: str, shape: tuple) -> tuple[int, ...]:
        """The axes of leaf ``name`` along which its groups run, each in [0, ndim); ValueError naming the
        leaf for none, a repeated one, or one outside [−ndim, ndim)."""
        shape = tuple(shape)
        ndim = len(shape)
        if self.axes is None:
            raw = reduction_axes(name, shape)
        elif isinstance(self.axes, tuple):
            raw = self.axes
        else:
            raw = self.axes(name, shape)
        values = [checks.scalar(a) for a in raw] if hasattr(raw, "__iter__") and not isinstance(raw, str) else None
        ok = values is not None and len(values) > 0 and all(
            isinstance(a, (int, np.integer)) and not isinstance(a, bool) and -ndim <= a < ndim for a in values)
        if ok:
            values = [int(a) % ndim for a in values]
            ok = len(set(values)) == len(values)
        if not ok:
            source = "axes" if isinstance(self.axes, tuple) else f"axes({name!r}, {shape})"
            raise ValueError(f"NM: {name} {shape} has {ndim} axes; {source} = {raw!r} must be distinct integers "
                             f"in [-{ndim}, {ndim}), at least one")
        return tuple(values)

    def check(self, lay, sparsity, w=None) -> float:
        units = self._units(lay)  # every leaf's axes checked
        ragged = [(name, why, inputs) for name, _, ids, why, inputs in units if ids is None]
        if ragged and self.ragged == "error":
            raise ValueError(ragged[0][1])
        if ragged and len(ragged) == len(units) and self.sparsity > 0:
            inputs = [f"{name} {count} inputs" for name, _, count in ragged[:5]]
            raise ValueError(f"constraint: {self.label} leaves every prunable layer dense, none sums over a "
                             f"multiple of m = {self.m} inputs ({', '.join(inputs)}{', ...' if len(ragged) > 5 else ''}"
                             f"): nothing would be pruned; pick an m that divides their inputs, or pass axes=")
        return super().check(lay, self.sparsity if sparsity is None else sparsity, w)

    def resolve(self, lay, sparsity: float, w=None, col_sq=None) -> Groups:
        keep = max(self.n, min(self.m, int(round(self.m * (1 - sparsity)))))
        ids = np.empty(lay.size, np.int32)
        counts, groups = [], 0
        for name, positions, grouping, why, _ in self._units(lay):
            if grouping is None:
                if self.ragged == "error":
                    raise ValueError(why)
                ids[positions] = groups
                counts.append(positions.size)
                groups += 1
            else:
                ids[positions] = grouping + groups
                count = positions.size // self.m
                counts.extend([keep] * count)
                groups += count
        return Groups(jnp.asarray(np.asarray(counts, np.int32)), jnp.asarray(ids), self.label, (keep, self.m))

    def _units(self, lay) -> list:
        """[(name, positions in w (flat), group of each position within the unit or None where ragged, why
        ragged, the inputs grouped)] per layer: groups of M consecutive inputs of each output unit (j·d_in/M + g); with ``axes``
        given, per leaf along those axes."""
        if self.axes is not None:
            units = []
            for name, shape, start in zip(lay.names, lay.shapes, lay.offsets):
                grouping = self._grouping(name, shape)
                units.append((name, start + np.arange(math.prod(shape)), grouping,
                              None if grouping is not None else self._ragged_message(name, shape),
                              math.prod(shape[a] for a in self.leaf_axes(name, shape))))
            return units
        units = []
        for layer in lay.layers:
            if layer.kind == "vector":
                raise ValueError(f"NM: {layer.name} has shape {layer.shape}; N:M needs a kernel with ndim ≥ 2")
            positions = lay.positions(layer)
            d_in, d_out = positions.shape
            if d_in % self.m:
                axes = "" if layer.input_axes is None else f" (axes {layer.input_axes})"
                units.append((layer.name, positions.ravel(), None,
                              f"NM: {layer.name} {layer.shape} sums over {d_in} inputs{axes}, not a multiple of "
                              f"m = {self.m}; leave it dense (NM(..., ragged='dense')) or exclude it with select", d_in))
            else:
                grouping = np.arange(d_out)[None, :] * (d_in // self.m) + np.arange(d_in)[:, None] // self.m
                units.append((layer.name, positions.ravel(), grouping.ravel().astype(np.int32), None, d_in))
        return units

    def _grouping(self, name, shape) -> Optional[np.ndarray]:
        """Group index (0-based, within the leaf) of each of its coordinates in row-major order, or None."""
        axes = self.leaf_axes(name, shape)
        reduce = math.prod(shape[a] for a in axes)
        if reduce % self.m:
            return None
        others = tuple(a for a in range(len(shape)) if a not in axes)
        position = np.arange(math.prod(shape)).reshape(shape).transpose(others + axes).reshape(-1, reduce)
        group = np.arange(position.size, dtype=np.int64).reshape(position.shape) // self.m
        ids = np.empty(position.size, np.int32)
        ids[position.reshape(-1)] = group.reshape(-1)
        return ids

    def _ragged_message(self, name, shape) -> str:
        axes = self.leaf_axes(name, shape)
        reduce = math.prod(shape[a] for a in axes)
        return (f"NM: {name} {shape} sums over {reduce} inputs (axes {axes}), not a multiple of m = {self.m}; "
                f"leave it dense (NM(..., ragged='dense')) or exclude it with select")


def final_sparsity(sparsity, constraint, default: float = 0.9) -> Optional[float]:
    """The final sparsity: as given (``default`` if None), or N:M's 1 − N/M (a different one given is a
    ValueError). For a :class:`LayerBudgets` mapping, as given or None: the mapping's mean, known once the
    layout is (``constraint.check(lay, None)`` gives it, ``resolve(lay, None)`` the counts as given)."""
    if sparsity is not None:
        sparsity = checks.sparsity(sparsity)
    if isinstance(constraint, LayerBudgets) and constraint.given:
        return sparsity
    if isinstance(constraint, NM):
        if sparsity is not None and abs(sparsity - constraint.sparsity) > 1e-9:
            raise ValueError(f"sparsity: {constraint.label} prunes 1 - {constraint.n}/{constraint.m} = "
                             f"{constraint.sparsity:g} of the grouped weights; leave sparsity out or pass that")
        return constraint.sparsity
    return checks.sparsity(default if sparsity is None else sparsity)
