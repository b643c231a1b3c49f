"""Shared fixtures for the swapjax tests: a tiny trained linen MLP on scikit-learn's digits.

Loss functions live at module level so that their identity is stable: swapjax
jit-compiles per (loss_fn, shapes), and reusing one function object across
tests (and test files) keeps the compile count, and the wall time, down.
"""
from __future__ import annotations

import os
import subprocess
import sys

# XLA's CPU compiler takes most of this suite's time: some 4,000 jit compilations of small problems,
# each run a few times. Two compile-time options, each added here unless XLA_FLAGS already sets it:
# - --xla_backend_optimization_level=0: LLVM's optimisation level 0 instead of XLA's default 3 cuts the
#   compile time about 3x; the programs (HLO, after XLA's own passes) are the same, only the machine
#   code is less optimised, which these small problems do not notice.
# - --xla_cpu_use_fusion_emitters=false: XLA's older (elemental) code generator for fused loops instead
#   of its MLIR fusion emitters halves it again (the suite's CPU time on 2 cores: 690 s -> 350 s); the
#   same computations, other machine code. A jaxlib that does not know the option aborts at start-up
#   on it, so it is added only once a subprocess has started the CPU backend with it (~1 s, once:
#   pytest-xdist's workers inherit the environment, with the option in it).
# Set before the CPU backend starts; inherited by subprocesses (the notebook's kernel, test_sharding).
# SWAPJAX_XLA_DEFAULTS=1 adds neither: the tests then compile with the options users get
# (`make test-default-xla`, run by CI on the solver, transport, gradient, sharding and prune tests).


def _with_xla_flag(flags: str, flag: str, probe: bool = False) -> str:
    """flags + flag, unless flags already set flag's option (or, with probe, this jaxlib rejects flag)."""
    if flag.split("=")[0] in flags:
        return flags
    candidate = (flags + " " + flag).strip()
    if probe:
        env = dict(os.environ, XLA_FLAGS=candidate, JAX_PLATFORMS="cpu")
        try:
            ok = subprocess.run([sys.executable, "-c", "import jax; jax.devices('cpu')"], env=env, timeout=120,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0
        except (OSError, subprocess.SubprocessError):
            ok = False
        if not ok:
            return flags
    return candidate


if os.environ.get("SWAPJAX_XLA_DEFAULTS", "") not in ("", "0"):
    pass  # XLA_FLAGS as the user's environment has it
else:
    _flags = _with_xla_flag(os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0")
    os.environ["XLA_FLAGS"] = _with_xla_flag(_flags, "--xla_cpu_use_fusion_emitters=false", probe=True)

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

N_PRUNE = 48  # examples of the Fisher in the end-to-end tests
HIDDEN = 12  # digits MLP 64-12-10 with biases: p = 64*12 + 12*10 = 888 kernel weights


class TinyMLP(nn.Module):
    """64-HIDDEN-10 tanh MLP with biases (tanh: no dead units, so no all-zero gradient columns)."""

    hidden: int = HIDDEN

    @nn.compact
    def __call__(self, x):
        x = jnp.tanh(nn.Dense(self.hidden)(x))
        return nn.Dense(10)(x)


MLP = TinyMLP()


def mlp_loss(params, example):
    """Cross-entropy of ONE example {"x": (64,), "y": ()} (the signature swapjax.prune expects)."""
    logits = MLP.apply({"params": params}, example["x"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, example["y"])


def _batched_loss(params, x, y):
    logits = MLP.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _memory_mappings() -> int:
    """The process's memory mappings (Linux; 0 elsewhere)."""
    try:
        with open("/proc/self/maps") as f:
            return sum(1 for _ in f)
    except OSError:
        return 0


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_code():
    """Every XLA executable holds a few memory mappings until its jit cache entry goes. The whole suite
    compiles some 20,000 programs in one process, past Linux's default vm.max_map_count (65,530), where
    the next compilation segfaults. After a test file, once the mappings pass half that, drop JAX's
    caches (later files recompile what they share with earlier ones; below the threshold they reuse it)."""
    yield
    if _memory_mappings() > 32_000:
        jax.clear_caches()


@pytest.fixture(scope="session")
def digits():
    """(x, y) float32 pixels in [0, 1] and int32 labels, in a fixed shuffled order."""
    from sklearn.datasets import load_digits

    data = load_digits()
    order = np.random.default_rng(0).permutation(len(data.target))
    x = (data.data / 16.0).astype(np.float32)[order]
    y = data.target.astype(np.int32)[order]
    return x, y


@pytest.fixture(scope="session")
def trained_mlp(digits):
    """Params of TinyMLP after 150 full-batch Adam steps on 1000 digits (~90% train accuracy)."""
    x, y = digits
    xt, yt = jnp.asarray(x[:1000]), jnp.asarray(y[:1000])
    params = MLP.init(jax.random.key(0), xt[:1])["params"]
    opt = optax.adam(3e-2)
    state = opt.init(params)

    @jax.jit
    def step(params, state):
        grads = jax.grad(_batched_loss)(params, xt, yt)
        updates, state = opt.update(grads, state)
        return optax.apply_updates(params, updates), state

    for _ in range(150):
        params, state = step(params, state)
    return params


@pytest.fixture(scope="session")
def prune_batch(digits):
    """The N_PRUNE examples of the Fisher (taken from the training split)."""
    x, y = digits
    return {"x": jnp.asarray(x[:N_PRUNE]), "y": jnp.asarray(y[:N_PRUNE])}


@pytest.fixture(scope="session")
def loss_fn():
    return mlp_loss


# The solver with fixed values and no search: the published absolute λ = 0.01, IHT run to its
# tolerance, no swap search (what the solver-level tests check against NumPy references).
FIXED = dict(lam=0.01, lam_scale="absolute", patience=None, swap_rounds=0)


def fixed_lr(**kw):
    import swapjax

    return swapjax.LR(**{**FIXED, **kw})


def fixed_swap(**kw):
    import swapjax

    return swapjax.SWAP(**{**FIXED, "epsilon": 0.3, **kw})
