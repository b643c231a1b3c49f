"""Small models in the layouts of JAX language-model code, for tests/test_layers_by_use.py.

Each builder returns a :class:`Case`: params, a loss of ONE example, a batch, and the layers the
traced program holds, written out by hand (``Expect``: the leaf, its stacked slice, the axes its
product contracts), so that the tests check the library's layers against an independent account.

- ``gemma``: Gemma-style einsum attention and gated MLP (weights from ``self.param``: q (N, D, H),
  kv (2, K, D, H), o (N, H, D), gating (2, D, F), linear (F, D)) beside an ``nn.Dense`` input
  projection; an embedding table (gathered), a position embedding (added), an RMSNorm scale.
- ``scan0`` / ``scan1``: a linen ``nn.scan`` stack of 3 Dense blocks, layer axis first
  (kernels (L, in, out)) or in the middle (``variable_axes={"params": 1}``: (in, L, out)), between
  an input and an output Dense; ``unrolled``: the same weights as separate Dense modules.
- ``nnx_scan``: NNX scan-over-layers (blocks made with ``nnx.vmap``, run with ``nnx.scan``).
- ``ensemble``: an ``nn.vmap`` ensemble, each member on its own input slice (one layer per
  member); ``shared_ensemble``: every member on the same input (``in_axes=None``): the members'
  kernels are one product, one layer whose outputs are all members' outputs; ``nested``: an
  ``nn.vmap`` ensemble of ``nn.scan`` stacks (kernels (E, L, in, out): slice [e, l] a layer).
- ``out_in``: weights in (out, in) layout, used as ``einsum("j,kj->k", x, w)``, one of them named
  ``pos_embedding``, and a bias named ``kernel``.
- ``nnx_mha``: ``nnx.MultiHeadAttention`` on a sequence.
- ``tied``: a Dense applied twice and an embedding table that is also the output projection.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from swapjax.pytree import path_name

N_EX = 16  # examples in every batch
W = 8  # width of the hidden layers (a multiple of 4: 2:4 groups fit every contracted axis)
L = 3  # layers of the stacks
init = nn.initializers.normal(0.5)


@dataclasses.dataclass(frozen=True)
class Expect:
    """One layer as written: ``path`` of the leaf, ``stack`` {leaf axis: slice} for a stacked leaf
    (empty otherwise), ``input_axes`` (leaf axes the product contracts), the layer's ``kind``."""

    path: str
    input_axes: tuple
    stack: tuple = ()  # ((axis, i), ...)
    kind: str = "dense"

    @property
    def name(self) -> str:
        return self.path + ("[" + ", ".join(str(i) for _, i in self.stack) + "]" if self.stack else "")

    def index(self, shape: tuple) -> np.ndarray:
        """(d_in, d_out): the flat row-major positions in the leaf, row = input (row-major over the
        contracted axes in the leaf's order), column = output unit (row-major over the other axes)."""
        pos = np.arange(math.prod(shape)).reshape(shape)
        stacked = [a for a, _ in self.stack]
        sl = tuple(dict(self.stack).get(a, slice(None)) for a in range(len(shape)))
        pos = pos[sl]
        kept = [a for a in range(len(shape)) if a not in stacked]  # leaf axes left after slicing
        ins = [kept.index(a) for a in self.input_axes]
        outs = [i for i in range(len(kept)) if i not in ins]
        d_in = math.prod(pos.shape[i] for i in ins)
        return pos.transpose(ins + outs).reshape(d_in, -1)


@dataclasses.dataclass
class Case:
    params: object
    loss_fn: Callable
    batch: dict
    layers: tuple  # Expect, in forward order
    left_dense: tuple  # floating ndim >= 2 leaves that are not layers
    tied: tuple = ()  # of left_dense: those used as a layer more than once

    @property
    def leaves(self) -> dict:
        return {path_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(self.params)[0]}

    @property
    def layer_paths(self) -> set:
        return {e.path for e in self.layers}


def _rng(seed):
    return np.random.default_rng(seed)


def _mse(out, y):
    return 0.5 * jnp.sum((out - y) ** 2)


# 1. Gemma-style -------------------------------------------------------------------------------------

V, T, D, NH, KH, HD, F = 12, 4, 8, 2, 2, 4, 16  # vocabulary, tokens, model width, heads, kv heads, head dim, MLP


class GemmaAttn(nn.Module):
    @nn.compact
    def __call__(self, x):  # (T, D)
        q = jnp.einsum("TD,NDH->TNH", x, self.param("q_w", init, (NH, D, HD)))
        k, v = jnp.einsum("SD,CKDH->CSKH", x, self.param("kv_w", init, (2, KH, D, HD)))
        probs = jax.nn.softmax(jnp.einsum("TNH,SNH->NTS", q, k) / np.sqrt(HD), axis=-1)
        enc = jnp.einsum("NTS,SNH->TNH", probs, v)
        return jnp.einsum("TNH,NHD->TD", enc, self.param("o_w", init, (NH, HD, D)))


class GemmaMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        gate = jnp.einsum("TD,CDF->CTF", x, self.param("gating_w", init, (2, D, F)))
        return jnp.einsum("TF,FD->TD", jax.nn.gelu(gate[0]) * gate[1], self.param("linear_w", init, (F, D)))


class Gemma(nn.Module):
    @nn.compact
    def __call__(self, tokens):  # (T,) int
        x = self.param("input_embedding", init, (V, D))[tokens] + self.param("pos_w", init, (T, D))
        x = nn.Dense(D, name="proj")(x)
        scale = self.param("scale", nn.initializers.zeros, (D,))
        y = x * jax.lax.rsqrt(jnp.mean(x ** 2, axis=-1, keepdims=True) + 1e-6) * (1 + scale)
        x = x + GemmaAttn(name="Attn_0")(y)
        return x + GemmaMLP(name="Mlp_0")(x)


def gemma() -> Case:
    model, r = Gemma(), _rng(1)
    tokens = jnp.asarray(r.integers(0, V, size=(N_EX, T)), jnp.int32)
    params = model.init(jax.random.key(1), tokens[0])["params"]
    batch = {"x": tokens, "y": jnp.asarray(r.normal(size=(N_EX, T, D)), jnp.float32)}
    layers = (Expect("proj/kernel", (0,)), Expect("Attn_0/q_w", (1,)), Expect("Attn_0/kv_w", (2,)),
              Expect("Attn_0/o_w", (0, 1)), Expect("Mlp_0/gating_w", (1,)), Expect("Mlp_0/linear_w", (0,)))
    return Case(params, lambda p, ex: _mse(model.apply({"params": p}, ex["x"]), ex["y"]), batch, layers,
                left_dense=("input_embedding", "pos_w"))


# 2, 3. Linen nn.scan stacks (layer axis first or in the middle), and their unrolled twin ------------

IN, OUT = 12, 4


class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return jnp.tanh(nn.Dense(W)(x)), None


class Scanned(nn.Module):
    axis: int = 0

    @nn.compact
    def __call__(self, x):
        x = jnp.tanh(nn.Dense(W, name="inp")(x))
        stack = nn.scan(Block, variable_axes={"params": self.axis}, split_rngs={"params": True}, length=L)
        x, _ = stack(name="ScanBlock_0")(x, None)
        return nn.Dense(OUT, name="out")(x)


class Unrolled(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = jnp.tanh(nn.Dense(W, name="inp")(x))
        for i in range(L):
            x = jnp.tanh(nn.Dense(W, name=f"Dense_{i}")(x))
        return nn.Dense(OUT, name="out")(x)


def _mlp_batch(seed, shape_x=(IN,)):
    r = _rng(seed)
    return {"x": jnp.asarray(r.normal(size=(N_EX, *shape_x)), jnp.float32),
            "y": jnp.asarray(r.normal(size=(N_EX, OUT)), jnp.float32)}


def _scan(axis: int) -> Case:
    """Both stacks hold the same weights (``scan1``'s are ``scan0``'s with the layer axis moved), so
    both are twins of ``unrolled(scan0())``."""
    model = Scanned(axis)
    batch = _mlp_batch(2)
    params = Scanned(0).init(jax.random.key(2), batch["x"][0])["params"]
    if axis == 1:
        stack = params["ScanBlock_0"]["Dense_0"]
        params = {**params, "ScanBlock_0": {"Dense_0": {"kernel": jnp.moveaxis(stack["kernel"], 0, 1),
                                                        "bias": stack["bias"].T}}}
    k = "ScanBlock_0/Dense_0/kernel"
    ins = (1,) if axis == 0 else (0,)  # (L, in, out) or (in, L, out)
    layers = (Expect("inp/kernel", (0,)), *(Expect(k, ins, ((axis, i),)) for i in range(L)), Expect("out/kernel", (0,)))
    # the stacked biases, (L, out) or (out, L), are ndim 2: added, not a layer
    return Case(params, lambda p, ex: _mse(model.apply({"params": p}, ex["x"]), ex["y"]), batch, layers,
                ("ScanBlock_0/Dense_0/bias",))


def scan0() -> Case:
    return _scan(0)


def scan1() -> Case:
    return _scan(1)


def unrolled(scanned: Case) -> Case:
    """The twin of ``scan0()``: the same weights, slice i of the stack as the module ``Dense_i``."""
    model, p = Unrolled(), scanned.params
    params = {"inp": p["inp"], "out": p["out"],
              **{f"Dense_{i}": {"kernel": p["ScanBlock_0"]["Dense_0"]["kernel"][i],
                                "bias": p["ScanBlock_0"]["Dense_0"]["bias"][i]} for i in range(L)}}
    layers = (Expect("inp/kernel", (0,)), *(Expect(f"Dense_{i}/kernel", (0,)) for i in range(L)),
              Expect("out/kernel", (0,)))
    return Case(params, lambda q, ex: _mse(model.apply({"params": q}, ex["x"]), ex["y"]), scanned.batch, layers, ())


# 4. NNX scan over layers ----------------------------------------------------------------------------

class NnxBlock(nnx.Module):
    def __init__(self, rngs):
        self.linear = nnx.Linear(W, W, rngs=rngs)

    def __call__(self, x):
        return jnp.tanh(self.linear(x))


class NnxStack(nnx.Module):
    def __init__(self, rngs):
        self.inp = nnx.Linear(IN, W, rngs=rngs)

        @nnx.split_rngs(splits=L)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def blocks(rngs):
            return NnxBlock(rngs)

        self.blocks = blocks(rngs)
        self.out = nnx.Linear(W, OUT, rngs=rngs)

    def __call__(self, x):
        # graph_updates=False: the forward pass updates no state, and the loss runs under jax.vmap too;
        # with graph updates (NnxStackGraphUpdates) NNX refuses jax.vmap of the Python loss ("Cannot
        # extract graph node from different trace level"): the drivers run its traced program instead
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry, graph_updates=False)
        def step(x, block):
            return block(x)

        return self.out(step(jnp.tanh(self.inp(x)), self.blocks))


class NnxStackGraphUpdates(NnxStack):
    """The same stack run by ``nnx.scan`` as NNX's guide writes it (graph updates on)."""

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def step(x, block):
            return block(x)

        return self.out(step(jnp.tanh(self.inp(x)), self.blocks))


def nnx_scan(graph_updates: bool = False) -> Case:
    model = (NnxStackGraphUpdates if graph_updates else NnxStack)(nnx.Rngs(3))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    batch = _mlp_batch(3)
    k = "blocks/linear/kernel/value"
    layers = (Expect("inp/kernel/value", (0,)), *(Expect(k, (1,), ((0, i),)) for i in range(L)),
              Expect("out/kernel/value", (0,)))
    return Case(params, lambda p, ex: _mse(nnx.merge(graphdef, p, rest)(ex["x"]), ex["y"]), batch, layers,
                ("blocks/linear/bias/value",))  # the stacked biases (L, W)


# 5. nn.vmap ensembles -------------------------------------------------------------------------------

E = 3  # members


class Member(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(OUT, name="head")(jnp.tanh(nn.Dense(W, name="hidden")(x)))


class Ensemble(nn.Module):
    shared_input: bool = False

    @nn.compact
    def __call__(self, x):  # (E, IN), or (IN,) read by every member
        members = nn.vmap(Member, variable_axes={"params": 0}, split_rngs={"params": True},
                          in_axes=None if self.shared_input else 0, out_axes=0, axis_size=E)
        return members(name="Ens_0")(x).mean(0)


def ensemble() -> Case:
    model, batch = Ensemble(), _mlp_batch(4, (E, IN))
    params = model.init(jax.random.key(4), batch["x"][0])["params"]
    layers = tuple(Expect(f"Ens_0/{m}/kernel", (1,), ((0, i),)) for m in ("hidden", "head") for i in range(E))
    # forward order: a vmapped product runs every member at once, so the order is by product, then member
    return Case(params, lambda p, ex: _mse(model.apply({"params": p}, ex["x"]), ex["y"]), batch, layers,
                ("Ens_0/head/bias", "Ens_0/hidden/bias"))


def shared_ensemble() -> Case:
    """Every member reads the same x: the hidden kernels (E, IN, W) are one product x·K, contracting
    axis 1, whose outputs are all members' (E·W): one layer. The heads read each member's own hidden
    units: one layer per member."""
    model, batch = Ensemble(shared_input=True), _mlp_batch(5)
    params = model.init(jax.random.key(5), batch["x"][0])["params"]
    layers = (Expect("Ens_0/hidden/kernel", (1,)), *(Expect("Ens_0/head/kernel", (1,), ((0, i),)) for i in range(E)))
    return Case(params, lambda p, ex: _mse(model.apply({"params": p}, ex["x"]), ex["y"]), batch, layers,
                ("Ens_0/head/bias", "Ens_0/hidden/bias"))


# 5b. Nested stacks: an nn.vmap ensemble of nn.scan stacks -------------------------------------------

L2 = 2  # layers of each member's stack


class Stack(nn.Module):
    @nn.compact
    def __call__(self, x):
        stack = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=L2)
        return stack(name="ScanBlock_0")(x, None)[0]


class EnsembleOfStacks(nn.Module):
    @nn.compact
    def __call__(self, x):  # (E, W): member e's stack reads x[e]
        members = nn.vmap(Stack, variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=0, out_axes=0,
                          axis_size=E)
        return nn.Dense(OUT, name="out")(members(name="Ens_0")(x).mean(0))


def nested() -> Case:
    """Kernels (E, L2, W, W): slice [e, l] (member e's layer l, named in the leaf's axis order) is a
    layer; in forward order, layer l of every member before layer l + 1."""
    model, batch = EnsembleOfStacks(), _mlp_batch(9, (E, W))
    params = model.init(jax.random.key(9), batch["x"][0])["params"]
    k = "Ens_0/ScanBlock_0/Dense_0/kernel"
    layers = (*(Expect(k, (2,), ((0, e), (1, l))) for l in range(L2) for e in range(E)), Expect("out/kernel", (0,)))
    return Case(params, lambda p, ex: _mse(model.apply({"params": p}, ex["x"]), ex["y"]), batch, layers,
                ("Ens_0/ScanBlock_0/Dense_0/bias",))


# 6. (out, in) layout --------------------------------------------------------------------------------

def out_in() -> Case:
    """Names that mislead a name rule: the output weight is called ``pos_embedding`` (a layer: used
    as a product's weight) and a (1, W) leaf added like a bias is called ``kernel`` (not a layer)."""
    r = _rng(6)
    params = {"w": jnp.asarray(r.normal(size=(W, IN)) / 3, jnp.float32),  # (out, in)
              "b": jnp.zeros((W,), jnp.float32),
              "kernel": jnp.asarray(r.normal(size=(1, W)) / 3, jnp.float32),
              "pos_embedding": jnp.asarray(r.normal(size=(OUT, W)) / 3, jnp.float32)}

    def loss_fn(p, ex):
        h = jnp.tanh(jnp.einsum("j,kj->k", ex["x"], p["w"]) + p["b"] + p["kernel"][0])
        return _mse(jnp.einsum("j,kj->k", h, p["pos_embedding"]), ex["y"])

    return Case(params, loss_fn, _mlp_batch(6), (Expect("w", (1,)), Expect("pos_embedding", (1,))), ("kernel",))


# 7. NNX MultiHeadAttention ---------------------------------------------------------------------------

SEQ, HEADS = 4, 2


class NnxAttn(nnx.Module):
    def __init__(self, rngs):
        self.attn = nnx.MultiHeadAttention(num_heads=HEADS, in_features=W, qkv_features=W, out_features=W,
                                           decode=False, rngs=rngs)

    def __call__(self, x):  # (SEQ, W)
        return self.attn(x)


def nnx_mha() -> Case:
    graphdef, params, rest = nnx.split(NnxAttn(nnx.Rngs(7)), nnx.Param, ...)
    r = _rng(7)
    batch = {"x": jnp.asarray(r.normal(size=(N_EX, SEQ, W)), jnp.float32),
             "y": jnp.asarray(r.normal(size=(N_EX, SEQ, W)), jnp.float32)}
    a = "attn/{}/kernel/value"
    layers = (Expect(a.format("query"), (0,)), Expect(a.format("key"), (0,)), Expect(a.format("value"), (0,)),
              Expect(a.format("out"), (0, 1)))
    biases = tuple(f"attn/{n}/bias/value" for n in ("query", "key", "value"))  # (heads, head_dim): added
    return Case(params, lambda p, ex: _mse(nnx.merge(graphdef, p, rest)(ex["x"]), ex["y"]), batch, layers, biases)


# 7b. A plain-JAX lax.scan over a (2, 6, 6) stack ----------------------------------------------------

def plain_scan() -> Case:
    """params {"inp": (8, 6), "stack": (2, 6, 6), "out": (6, 4)} run with ``jax.lax.scan``: each slice
    has 6 inputs (N:M with M = 4 is ragged there, M = 2 fits; the leaf's first two axes hold 12)."""
    r = _rng(10)
    params = {"inp": jnp.asarray(r.normal(size=(8, 6)) / 2, jnp.float32),
              "stack": jnp.asarray(r.normal(size=(2, 6, 6)) / 2, jnp.float32),
              "out": jnp.asarray(r.normal(size=(6, OUT)) / 2, jnp.float32)}

    def loss_fn(p, ex):
        h, _ = jax.lax.scan(lambda h, k: (jnp.tanh(h @ k), None), jnp.tanh(ex["x"] @ p["inp"]), p["stack"])
        return _mse(h @ p["out"], ex["y"])

    layers = (Expect("inp", (0,)), *(Expect("stack", (1,), ((0, l),)) for l in range(2)), Expect("out", (0,)))
    return Case(params, loss_fn, _mlp_batch(10, (8,)), layers, ())


# 8. Tied weights ------------------------------------------------------------------------------------

class Tied(nn.Module):
    @nn.compact
    def __call__(self, tokens):  # (T,) int
        table = self.param("table", init, (V, W))
        x = nn.Dense(W, name="first")(table[tokens])
        shared = nn.Dense(W, name="shared")
        x = shared(jnp.tanh(shared(jnp.tanh(x))))
        return jnp.tanh(x) @ table.T  # (T, V) logits from the embedding table


def tied() -> Case:
    model, r = Tied(), _rng(8)
    tokens = jnp.asarray(r.integers(0, V, size=(N_EX, T)), jnp.int32)
    params = model.init(jax.random.key(8), tokens[0])["params"]
    batch = {"x": tokens, "y": jnp.asarray(r.normal(size=(N_EX, T, V)), jnp.float32)}
    return Case(params, lambda p, ex: _mse(model.apply({"params": p}, ex["x"]), ex["y"]), batch,
                (Expect("first/kernel", (0,)),), left_dense=("shared/kernel", "table"),
                tied=("shared/kernel", "table"))


BUILDERS = {"gemma": gemma, "scan0": scan0, "scan1": scan1, "nnx_scan": nnx_scan, "ensemble": ensemble,
            "shared_ensemble": shared_ensemble, "nested": nested, "out_in": out_in, "nnx_mha": nnx_mha, "tied": tied}
