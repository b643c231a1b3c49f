"""Prunable coordinates of a parameter pytree: selection, flat vector w ∈ R^p, masks.

The flat order is fixed and documented: the prunable leaves in the order of
``jax.tree_util.tree_flatten_with_path`` (sorted dict keys for dicts, Flax
linen and NNX states alike), each raveled in row-major (C) order.

Which leaves are prunable, by role (:func:`default_rule`): the weight matrices of
linear maps. In a Flax tree (any leaf named ``kernel``) those are the ``kernel``
leaves: Dense, DenseGeneral, Conv, ConvTranspose, Einsum and the attention
projections of linen and NNX; class tokens, position embeddings, embedding
tables, biases of any rank and norm scales stay dense. In a tree without
``kernel`` names (a plain dict), the floating arrays with ``ndim >= 2`` whose
name does not say bias, embedding, position, token, class token, scale, norm or
table. A Flax model's own ``self.param("w", ...)`` is not a ``kernel``: it stays
dense unless a ``select`` (with :func:`allow_vectors`) asks for it, and the
progress line of :func:`swapjax.prune` lists it among the leaves left dense.

A ``select(path, leaf) -> bool`` only *narrows* that rule: returning True for a
leaf that the rule leaves dense is a ValueError naming the leaf, so a ``select``
such as ``lambda path, leaf: "fc" in path`` cannot silently prune biases. To prune such leaves, say so:
``select=allow_vectors(fn)``. To prune what the rule prunes but some layers: ``select=exclude("head")``.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from . import checks

PyTree = Any
Select = Callable[[str, Any], bool]


path_name = checks.path_name


def leaf_name(path) -> str:
    """The leaf's own name, the last key of its path: 'kernel' for 'Dense_0/kernel' and for NNX's
    'query/kernel/value' (the Variable's ``.value`` is skipped)."""
    return _own_name(path_name(path))


# Words that name a leaf that is not the weight matrix of a linear map. A word of the leaf's own name
# (split at '_', '.', '-', digits and camelCase: 'pos_embedding', 'clsToken', 'ln1_scale') that starts
# or ends with one of them marks it: 'positions', 'layernorm', 'qbias'; not 'transposed'.
_NOT_A_WEIGHT = ("bias", "embed", "pos", "token", "cls", "scale", "norm", "table")


def _role_word(name: str) -> bool:
    words = re.split(r"[^a-z]+", re.sub(r"(?<=[a-z])(?=[A-Z])", "_", name).lower())
    return any(w.startswith(_NOT_A_WEIGHT) or w.endswith(_NOT_A_WEIGHT) for w in words if w)


def _kernel_rule(path, leaf) -> bool:
    return jnp.ndim(leaf) >= 2 and leaf_name(path) == "kernel"


def _matrix_rule(path, leaf) -> bool:
    return jnp.ndim(leaf) >= 2 and not _role_word(leaf_name(path))


def default_rule(params: PyTree) -> Callable[[Any, Any], bool]:
    """The default prunable leaves of ``params``, as a rule ``(key_path, leaf) -> bool``.

    A tree with a leaf named ``kernel`` (Flax linen or NNX): its ``kernel`` leaves with ndim ≥ 2.
    Otherwise: the arrays with ndim ≥ 2 whose own name has no word that starts or ends with bias,
    embed, pos, token, cls, scale, norm or table ('pos_embedding', 'cls_token', 'layernorm' stay
    dense; 'w1', 'transposed' are pruned).
    """
    paths = (p for p, _ in jax.tree_util.tree_flatten_with_path(params)[0])
    return _kernel_rule if any(leaf_name(p) == "kernel" for p in paths) else _matrix_rule


@dataclass(frozen=True)
class _WithVectors:
    select: Select

    def __call__(self, path: str, leaf) -> bool:
        return self.select(path, leaf)


def allow_vectors(select: Select) -> Select:
    """Let ``select`` choose leaves with ndim < 2 (biases, norm scales, scalars) too.

    Without it, a ``select`` that returns True for such a leaf, or for any leaf
    that the default rule leaves dense (a token, a position embedding, a table,
    a 2-D attention bias), is a ValueError: a custom ``select`` only narrows the
    default rule (:func:`default_rule`). With it, ``select`` alone decides, for
    leaves of every rank and role.

    Examples:
        >>> import numpy as np, swapjax
        >>> params = {"fc": {"kernel": np.ones((3, 2), "float32"), "bias": np.ones(2, "float32")},
        ...           "out": {"kernel": np.ones((2, 2), "float32")}}
        >>> in_fc = lambda path, leaf: path.startswith("fc")
        >>> swapjax.pytree.layout(params, in_fc)
        Traceback (most recent call last):
        ValueError: select: chose fc/bias (2,), with ndim < 2 (biases, norm scales or scalars); ...
        >>> swapjax.pytree.layout(params, swapjax.allow_vectors(in_fc)).names  # fc kernel AND bias
        ('fc/bias', 'fc/kernel')

        In ``swapjax.prune(loss_fn, params, batch, select=swapjax.allow_vectors(in_fc))``
        the same leaves are pruned.
    """
    if not callable(select):
        raise ValueError(f"select: expected a function select(path, leaf) -> bool, got {select!r}")
    return _WithVectors(select)


@dataclass(frozen=True)
class _Exclude:
    paths: tuple[str, ...]

    def __call__(self, path: str, leaf) -> bool:
        return not any(_under(path, prefix) for prefix in self.paths)

    def check(self, prunable: list[str]) -> None:
        unknown = [prefix for prefix in self.paths if not any(_under(name, prefix) for name in prunable)]
        if unknown:
            raise ValueError(f"select: exclude({', '.join(map(repr, unknown))}) matches none of the prunable "
                             f"leaves ({', '.join(prunable)}); give a leaf's path or a module's, e.g. 'head' or 'head/kernel'")


def _under(path: str, prefix: str) -> bool:
    """``path`` is the leaf ``prefix`` or lies in the module ``prefix`` ('head' holds 'head/kernel', not 'header/kernel')."""
    prefix = prefix.rstrip("/")
    return path == prefix or path.startswith(prefix + "/")


def exclude(*paths: str) -> Select:
    """A ``select`` that prunes what the default rule prunes except the leaves under ``paths``.

    Each path names a leaf (``"head/kernel"``) or a module (``"head"``, ``"blocks_0/attn"``), as in
    the progress line; one that matches no prunable leaf is a ValueError (a typo would otherwise keep a
    layer pruned). The usual "first and last layers dense":

        >>> import numpy as np, swapjax
        >>> params = {"patch": {"kernel": np.ones((4, 3), "float32")}, "fc": {"kernel": np.ones((3, 3), "float32"),
        ...           "bias": np.ones(3, "float32")}, "head": {"kernel": np.ones((3, 2), "float32")}}
        >>> swapjax.pytree.layout(params, swapjax.exclude("patch", "head")).names
        ('fc/kernel',)
    """
    if not paths or not all(isinstance(path, str) and path.strip("/") for path in paths):
        raise ValueError(f"exclude: expected one or more leaf or module paths like 'head', got {paths!r}")
    return _Exclude(tuple(paths))


def _check_narrows(chosen, prunable: set, why: dict) -> None:
    """ValueError naming every chosen leaf that the rule leaves dense (one message for all); ``why``: the
    reasons of the layers found by use."""
    vectors = [f"{name} {tuple(jnp.shape(x))}" for name, x in chosen if jnp.ndim(x) < 2 and name not in prunable]
    roles = [f"{name} {tuple(jnp.shape(x))}" + (f" ({why[name]})" if name in why else "")
             for name, x in chosen if jnp.ndim(x) >= 2 and name not in prunable]
    if not vectors and not roles:
        return
    parts = []
    if vectors:
        parts.append(f"{', '.join(vectors)}, with ndim < 2 (biases, norm scales or scalars)")
    if roles:
        parts.append(f"{', '.join(roles)}, which " + (
            "are not layers' weights" if why else "the default rule leaves dense (not a `kernel` of a Flax layer, "
            "or named as a token, position embedding, table, bias or norm scale)"))
    raise ValueError(
        f"select: chose {'; and '.join(parts)}; a custom select only narrows the default rule: return False "
        "for these leaves (in a Flax model, e.g. `lambda path, leaf: path.endswith('kernel') and ...`), use "
        "select=swapjax.exclude('head', ...) to prune every default leaf but some, or pass "
        "select=swapjax.allow_vectors(your_select) to prune them"
    )


@dataclass(frozen=True)
class Layout:
    """Where each prunable leaf lives in the flat vector w ∈ R^p."""

    treedef: Any
    selected: tuple[bool, ...]  # per leaf of the whole tree
    names: tuple[str, ...]  # per prunable leaf
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[Any, ...]
    offsets: tuple[int, ...]  # start of each prunable leaf in w; offsets[-1] == p
    left_dense: tuple[str, ...] = ()  # the leaves with ndim ≥ 2 that are not pruned
    #: the layers of the prunable leaves (:class:`swapjax.Layer`; every weight in exactly one), in forward order
    #: where found by use; not part of the layout's identity (hash, ==), which is the leaves'
    layers: tuple = field(default=(), compare=False)
    why: dict = field(default_factory=dict, compare=False)  # {leaf left dense: the reason} where found by use
    left_out: tuple = field(default=(), compare=False)  # the leaves the rule prunes that ``select`` left out

    def positions(self, layer) -> np.ndarray:
        """The positions in w of ``layer``'s weights W, (d_in, d_out)."""
        return self.offsets[self.names.index(layer.path)] + layer.index

    @property
    def size(self) -> int:
        """p, the number of prunable coordinates."""
        return self.offsets[-1]

    @property
    def input_axes(self) -> dict[str, tuple[int, ...]]:
        """{leaf path: the axes its products contract} for the prunable leaves whose layers say (what
        ``swapjax.to_nm(..., axes=)`` takes)."""
        axes = {}
        for layer in self.layers:
            if layer.input_axes is not None:
                axes.setdefault(layer.path, layer.input_axes)
        return axes

    @property
    def dtype(self):
        """The common dtype of w (promotion of the prunable leaves' dtypes)."""
        return jnp.result_type(*self.dtypes)

    def describe(self) -> str:
        """'12 kernels (69,312 weights); left dense: cls, pos_embedding, 6 biases', or with stacked leaves
        '15 layers in 5 kernels (7,168 weights); ...'."""
        noun = "kernel" if {_own_name(name) for name in self.names} == {"kernel"} else "leaf"
        text = f"{len(self.names)} {_plural(noun, len(self.names))} ({self.size:,} weights)"
        if len(self.layers) > len(self.names):  # slices of stacked leaves, or several products of one leaf
            text = f"{len(self.layers)} layers in " + text
        if self.left_dense:
            text += "; left dense: " + _grouped(self.left_dense)
        return text


def check_select(params: PyTree, select: Optional[Select]) -> None:
    """ValueError unless ``select`` is None or a function that returns a bool for every leaf of ``params``."""
    if select is None or isinstance(select, _Exclude):
        return
    if not callable(select):
        raise ValueError(f"select: expected None or a function select(path, leaf) -> bool, got {select!r}")
    for p, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        _selected(select, path_name(p), x)


def layout(params: PyTree, select: Optional[Select] = None, found=None) -> Layout:
    """Choose the prunable leaves of ``params``.

    select: None (the layers, or where ``found`` is None :func:`default_rule`), or
    ``select(path, leaf) -> bool`` with ``path`` like ``"Dense_0/kernel"``, narrowing that rule;
    wrap it in :func:`allow_vectors` to let it choose any leaf. found: the model's layers
    (:func:`swapjax.find_layers`): the leaves holding them are the rule, and the layout carries them.
    ValueError if nothing is selected, a selected leaf is not floating point, or a leaf the rule
    leaves dense is selected without :func:`allow_vectors`.
    """
    vectors_ok = isinstance(select, _WithVectors)
    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
    if select is not None and not callable(select):
        raise ValueError(f"select: expected None or a function select(path, leaf) -> bool, got {select!r}")
    if found is None:
        rule = default_rule(params)
    else:
        holding = set(found.paths)
        rule = lambda p, x: path_name(p) in holding  # noqa: E731
    if select is None:
        selected = tuple(bool(rule(p, x)) for p, x in leaves_with_path)
    elif isinstance(select, _Exclude):
        selected = tuple(bool(rule(p, x)) and select(path_name(p), x) for p, x in leaves_with_path)
        select.check([path_name(p) for p, x in leaves_with_path if rule(p, x)])
    else:
        selected = tuple(_selected(select, path_name(p), x) for p, x in leaves_with_path)
    chosen = [(path_name(p), x) for (p, x), s in zip(leaves_with_path, selected) if s]
    if not vectors_ok:
        _check_narrows(chosen, {path_name(p) for p, x in leaves_with_path if rule(p, x)},
                       {} if found is None else found.left_dense)
    if not chosen:
        raise ValueError(
            "select: no prunable leaf was selected; `select(path, leaf)` must return "
            f"True for at least one of {[path_name(p) for p, _ in leaves_with_path]}"
        )
    for name, x in chosen:
        if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
            raise ValueError(f"select: prunable leaf {name!r} has non-float dtype {jnp.result_type(x)}")
    sizes = [int(np.prod(jnp.shape(x))) for _, x in chosen]
    names = tuple(n for n, _ in chosen)
    shapes = tuple(tuple(jnp.shape(x)) for _, x in chosen)
    left_dense = tuple(path_name(p) for (p, x), s in zip(leaves_with_path, selected)
                       if not s and jnp.ndim(x) >= 2 and jnp.issubdtype(jnp.result_type(x), jnp.floating))
    why = {} if found is None else {name: found.left_dense[name] for name in left_dense if name in found.left_dense}
    left_out = tuple(path_name(p) for (p, x), s in zip(leaves_with_path, selected) if not s and rule(p, x))
    return Layout(
        treedef=treedef,
        selected=selected,
        names=names,
        shapes=shapes,
        dtypes=tuple(jnp.result_type(x) for _, x in chosen),
        offsets=tuple(np.cumsum([0] + sizes).tolist()),
        left_dense=left_dense,
        layers=_layers_of(names, shapes, found),
        why=why,
        left_out=left_out,
    )


def _layers_of(names, shapes, found) -> tuple:
    """The layers of the prunable leaves: as found, else (no trace, or a leaf chosen by ``allow_vectors``
    that is no layer) the leaf as one layer along its name-rule input axes."""
    by_leaf = {}
    for layer in () if found is None else found.layers:
        by_leaf.setdefault(layer.path, []).append(layer)
    out = []
    for name, shape in zip(names, shapes):
        if name in by_leaf:
            out.extend(by_leaf[name])
        else:
            out.append(Layer.whole(name, shape, reduction_axes(name, shape) if len(shape) >= 2 else None))
    return tuple(out)


def _own_name(name: str) -> str:
    """The last component of a path name ('kernel' of 'query/kernel/value')."""
    return name.removesuffix("/value").rsplit("/", 1)[-1]


def _plural(word: str, count: int) -> str:
    if count == 1:
        return word
    return word[:-1] + "ves" if word.endswith("f") else word + ("es" if word.endswith("s") else "s")


def _grouped(names) -> str:
    """Paths named one by one where their own name is unique, else counted: 'cls, 6 biases'."""
    names = [name.removesuffix("/value") for name in names]
    own = [_own_name(name) for name in names]
    counts = Counter(own)
    parts, seen = [], set()
    for name, leaf in zip(names, own):
        if counts[leaf] == 1:
            parts.append(name)
        elif leaf not in seen:
            seen.add(leaf)
            parts.append(f"{counts[leaf]} {_plural(leaf, counts[leaf])}")
    return ", ".join(parts)


def _selected(select: Select, name: str, leaf) -> bool:
    answer = select(name, leaf)
    if not isinstance(answer, (bool, np.bool_)):
        raise ValueError(
            f"select: must return True or False, got {answer!r} (type {type(answer).__name__}) for leaf {name!r}"
        )
    return bool(answer)


#: Leaf names of attention input projections: their kernels are (in, heads, head_dim), reduced over axis 0.
_INPUT_PROJECTIONS = ("query", "key", "value", "q", "k", "v", "qkv", "q_proj", "k_proj", "v_proj")


def reduction_axes(path: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The axes a kernel's matrix product sums over (Flax layouts), along which N:M groups run.

    Dense (in, out): (0,). Conv (h, w, in, out): (0, 1, 2), the patch h·w·in, row-major, so the
    groups run along the input channels. Attention q/k/v (in, heads, head_dim), a leaf under a
    module named query/key/value (or q/k/v, qkv, *_proj): (0,). Any other 3-D kernel, such as the
    attention output (heads, head_dim, out): (0, 1). Pass ``NM(axes=...)`` for other layouts.
    """
    if len(shape) == 2:
        return (0,)
    if len(shape) == 3:
        module = path.split("/")[-2] if "/" in path else ""
        return (0,) if module.lower() in _INPUT_PROJECTIONS else (0, 1)
    if len(shape) >= 4:
        return tuple(range(len(shape) - 1))
    raise ValueError(f"NM: {path} has shape {shape}; N:M needs a kernel with ndim ≥ 2")


@dataclass(frozen=True, eq=False)
class Layer:
    """One linear layer: the weights W = leaf.ravel()[index] (d_in × d_out) of the leaf at ``path``.

    name: the leaf's path, with ``[i]`` for slice i of a stacked leaf (``[i, j]`` nested);
    shape: the kernel as its product sees it (one slice of a stack); input_axes: the leaf's axes the
    product contracts, row-major in that order (None where a reshape mixes them with others);
    order: its product's position in the forward pass; kind: "dense", "conv", "grouped conv" (one
    product per feature group: not solved layer by layer) or "vector" (a leaf with ndim < 2 chosen with
    ``allow_vectors``, no product found: one input per entry).

    Examples:
        Slice 1 of a stacked kernel (L = 2, in = 3, out = 2), as ``scan`` uses it:

        >>> import jax, jax.numpy as jnp, numpy as np, swapjax
        >>> stack = np.arange(12, dtype="float32").reshape(2, 3, 2)
        >>> def loss_fn(params, ex):  # two steps, each x_l @ W_l with its own slice W_l
        ...     ys = jax.lax.scan(lambda _, xw: (None, xw[0] @ xw[1]), None, (ex["x"], params["w"]))[1]
        ...     return jnp.sum(ys ** 2)
        >>> found = swapjax.find_layers(loss_fn, {"w": stack}, {"x": np.ones((4, 2, 3), "float32")})
        >>> layer = found.layers[1]
        >>> layer.name, layer.d_in, layer.d_out, layer.input_axes
        ('w[1]', 3, 2, (1,))
        >>> bool(np.array_equal(stack.ravel()[layer.index], stack[1]))   # W = leaf.ravel()[index]
        True
    """

    name: str
    path: str
    index: np.ndarray
    shape: tuple
    input_axes: Optional[tuple] = None
    kind: str = "dense"
    order: int = -1  # the position of its product in the traced program (forward order); -1 by the name rule

    d_in = property(lambda self: self.index.shape[0])
    d_out = property(lambda self: self.index.shape[1])
    size = property(lambda self: self.index.size)

    def __repr__(self) -> str:
        return f"Layer({self.name!r}, {self.d_in}×{self.d_out}, inputs {self.input_axes}, {self.kind})"

    @classmethod
    def whole(cls, path: str, shape: tuple, input_axes: Optional[tuple]) -> "Layer":
        """The leaf as one layer whose inputs are ``input_axes`` (None: a vector or scalar, one input per entry)."""
        positions = np.arange(math.prod(shape)).reshape(shape)
        if input_axes is None:
            return cls(path, path, positions.reshape(-1, 1), tuple(shape), None, "vector")
        others = tuple(a for a in range(len(shape)) if a not in input_axes)
        matrix = positions.transpose(tuple(input_axes) + others)
        d_in = math.prod(shape[a] for a in input_axes)
        return cls(path, path, matrix.reshape(d_in, -1), tuple(shape), tuple(input_axes))


@dataclass(frozen=True)
class Layers:
    """The layers of a model in forward order, and why the other floating leaves with ndim ≥ 2 are not.

    Examples:
        >>> import jax.numpy as jnp, numpy as np, swapjax
        >>> params = {"table": np.ones((10, 4), "float32"), "w": np.ones((4, 3), "float32"),
        ...           "scale": np.ones(4, "float32")}
        >>> loss_fn = lambda p, ex: jnp.sum((p["table"][ex["t"]] * p["scale"]) @ p["w"])
        >>> found = swapjax.find_layers(loss_fn, params, {"t": np.zeros(8, "int32")})
        >>> found.paths, list(found.left_dense)
        (('w',), ['table'])
    """

    layers: tuple[Layer, ...]
    left_dense: dict = field(default_factory=dict)

    @property
    def paths(self) -> tuple[str, ...]:
        """The leaves holding layers, in the order of their first layer."""
        return tuple(dict.fromkeys(layer.path for layer in self.layers))


def flatten(params: PyTree, lay: Layout) -> jax.Array:
    """w ∈ R^p: the prunable leaves of ``params`` raveled and concatenated."""
    leaves = jax.tree_util.tree_leaves(params)
    parts = [jnp.ravel(x) for x, s in zip(leaves, lay.selected) if s]
    return jnp.concatenate(parts).astype(lay.dtype)


@partial(jax.jit, static_argnums=(1, 2))
def _split(w: jax.Array, lay: Layout, cast: bool = True):
    """The prunable leaves in w (one compiled program per layout)."""
    return [
        w[a:b].reshape(shape).astype(dtype if cast else w.dtype)
        for a, b, shape, dtype in zip(lay.offsets[:-1], lay.offsets[1:], lay.shapes, lay.dtypes)
    ]


def unflatten(w: jax.Array, params: PyTree, lay: Layout) -> PyTree:
    """A new tree like ``params`` whose prunable leaves are taken from w (dtypes kept)."""
    leaves = jax.tree_util.tree_leaves(params)
    parts = iter(_split(w, lay))
    return jax.tree_util.tree_unflatten(
        lay.treedef, [next(parts) if s else x for x, s in zip(leaves, lay.selected)]
    )


def mask_tree(mask: jax.Array, lay: Layout) -> PyTree:
    """Boolean mask pytree from a flat mask (p,): arrays for prunable leaves, None elsewhere."""
    parts = iter(_split(jnp.asarray(mask, bool), lay, cast=False))
    return jax.tree_util.tree_unflatten(lay.treedef, [next(parts) if s else None for s in lay.selected])


def apply_masks(params: PyTree, masks: PyTree) -> PyTree:
    """Zero the pruned weights: leaf * mask where the mask is an array; leaves under None untouched.

    Examples:
        >>> import numpy as np, swapjax
        >>> params = {"w": np.array([[1.0, 2.0], [3.0, 4.0]], "float32"), "b": np.ones(2, "float32")}
        >>> masks = {"w": np.array([[True, False], [False, True]]), "b": None}
        >>> out = swapjax.apply_masks(params, masks)
        >>> np.asarray(out["w"]).tolist(), out["b"] is params["b"]
        ([[1.0, 0.0], [0.0, 4.0]], True)
    """
    checks.mask_tree("masks", masks)
    return jax.tree_util.tree_map(
        lambda m, x: x if m is None else jnp.where(m, x, jnp.zeros((), x.dtype)),
        masks, params, is_leaf=lambda m: m is None,
    )


def sparsity_summary(masks: PyTree) -> dict[str, dict[str, float]]:
    """Per prunable leaf: kept and total counts and sparsity, plus a 'total' row.

    Examples:
        >>> import numpy as np, swapjax
        >>> masks = {"Dense_0": {"kernel": np.array([[True, False], [False, False]]), "bias": None},
        ...          "Dense_1": {"kernel": np.ones((2, 2), bool), "bias": None}}
        >>> swapjax.sparsity_summary(masks)
        {'Dense_0/kernel': {'kept': 1, 'total': 4, 'sparsity': 0.75}, 'Dense_1/kernel': {'kept': 4, 'total': 4, 'sparsity': 0.0}, 'total': {'kept': 5, 'total': 8, 'sparsity': 0.375}}
    """
    checks.mask_tree("masks", masks)
    rows = {}
    for path, m in jax.tree_util.tree_flatten_with_path(masks)[0]:
        kept, total = int(np.sum(m)), int(np.size(m))
        rows[path_name(path)] = dict(kept=kept, total=total, sparsity=1 - kept / total)
    kept = sum(r["kept"] for r in rows.values())
    total = sum(r["total"] for r in rows.values())
    rows["total"] = dict(kept=kept, total=total, sparsity=1 - kept / max(total, 1))
    return rows
