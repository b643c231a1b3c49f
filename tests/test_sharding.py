"""X sharded over the examples of 4 (forced host) devices against the single-device X and solves; the
layer-wise Grams and prune with the calibration batch sharded the same way.

XLA_FLAGS must be set before jax is imported, so the checks run in a subprocess."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

_SCRIPT = r'''
import sys; sys.path.insert(0, TESTS_DIR)  # tests/floats.py
import jax, jax.numpy as jnp, numpy as np, swapjax
from jax.sharding import NamedSharding, PartitionSpec as P
from swapjax import pytree
from swapjax.gradients import per_sample_losses_and_grads

assert jax.device_count() == 4, jax.devices()
rng = np.random.default_rng(0)
params = {"l1": {"w": 0.3 * rng.normal(size=(20, 16)).astype("float32"), "b": np.zeros(16, "float32")},
          "l2": {"w": 0.3 * rng.normal(size=(16, 5)).astype("float32")}}
N = 64
batch = {"x": rng.normal(size=(N, 20)).astype("float32"), "y": rng.integers(0, 5, N).astype("int32")}

def loss_fn(p, ex):
    logits = jnp.tanh(ex["x"] @ p["l1"]["w"] + p["l1"]["b"]) @ p["l2"]["w"]
    return jax.nn.logsumexp(logits) - logits[ex["y"]]

# chunk_size 5 against 16 examples per device: 4 chunks, the last overlapping the one before
l1, X1 = per_sample_losses_and_grads(loss_fn, params, batch, chunk_size=5, progress=False)
l4, X4 = per_sample_losses_and_grads(loss_fn, params, batch, chunk_size=5, progress=False, devices="all")
np.testing.assert_allclose(np.asarray(X4), np.asarray(X1), rtol=1e-5, atol=1e-6)
np.testing.assert_allclose(np.asarray(l4), np.asarray(l1), rtol=1e-5, atol=1e-6)
assert isinstance(X1.sharding, jax.sharding.SingleDeviceSharding), X1.sharding

# X is sharded over its rows: device j holds rows 16j ... 16j + 15, every column
mesh = X4.sharding.mesh
assert mesh.axis_names == ("examples",) and mesh.devices.size == 4, mesh
assert X4.sharding.is_equivalent_to(NamedSharding(mesh, P("examples", None)), 2), X4.sharding
shards = sorted(X4.addressable_shards, key=lambda s: s.index[0].start)
assert len({s.device for s in shards}) == 4
for j, s in enumerate(shards):
    assert s.data.shape == (16, X4.shape[1]) and s.index[0] == slice(16 * j, 16 * (j + 1)), (j, s.index)
    np.testing.assert_allclose(np.asarray(s.data), np.asarray(X1)[16 * j:16 * (j + 1)], rtol=1e-5, atol=1e-6)

# diag(XᵀX) without gathering X (for the swap search's curvature)
from swapjax.gradients import sharded_column_sq_norms, row_sharding
assert row_sharding(X1) is None and row_sharding(X4)[1] == P("examples", None)
np.testing.assert_allclose(np.asarray(sharded_column_sq_norms(X4)), (np.asarray(X1, np.float64) ** 2).sum(0), rtol=1e-5)

# the same gradients from 2 of the devices, and the errors
_, X2 = per_sample_losses_and_grads(loss_fn, params, batch, progress=False, devices=jax.devices()[:2])
assert len(X2.sharding.device_set) == 2
np.testing.assert_allclose(np.asarray(X2), np.asarray(X1), rtol=1e-5, atol=1e-6)
for bad, match in [(3, "N = 64 examples do not split evenly over 3 devices"), (5, "5 devices asked for, 4 available"),
                   ("some", "devices: expected None"), ([0, 1], "devices: expected a non-empty sequence of jax devices"),
                   ([jax.devices()[0]] * 2, "each device may appear once")]:
    try:
        per_sample_losses_and_grads(loss_fn, params, batch, progress=False, devices=bad)
    except ValueError as e:
        assert match in str(e), (bad, str(e))
    else:
        raise AssertionError(f"devices={bad!r}: no ValueError")

# whole solves on the sharded X (jit with sharded inputs) against the single-device X
lay = pytree.layout(params)
w_bar, k = pytree.flatten(params, lay), lay.size // 5
for method in (swapjax.LR(lam=0.01), swapjax.SWAP(lam=0.01, epsilon=0.3)):
    w1, info1 = method.solve(X1, w_bar, k)
    w4, info4 = method.solve(X4, w_bar, k)
    name = type(method).__name__
    assert int(info4.support.sum()) == k and np.array_equal(np.asarray(info4.support), np.asarray(info1.support)), name
    assert abs(float(info4.objective) - float(info1.objective)) <= 1e-5 * abs(float(info1.objective)), (
        name, float(info4.objective), float(info1.objective))
    np.testing.assert_allclose(np.asarray(w4), np.asarray(w1), rtol=1e-4, atol=1e-5, err_msg=name)

# a constraint on the sharded X (2:4 along the inputs; per-layer ERK): the same feasible support
for spec, s in ((swapjax.NM(2, 4), 0.5), (swapjax.LayerBudgets("erk"), 0.8)):
    groups = spec.resolve(lay, s)
    _, info1 = swapjax.LR(lam=0.01).solve(X1, w_bar, groups)
    _, info4 = swapjax.LR(lam=0.01).solve(X4, w_bar, groups)
    assert bool(groups.feasible(info4.support)), spec
    assert np.array_equal(np.asarray(info4.support), np.asarray(info1.support)), spec

# the gradient noise of a sharded X, shard by shard and still sharded, against one device (docs/scale.md):
# the same hit pattern bit for bit; the values to σ's float32 rounding (σ sums the N·p entries per
# shard, then over the shards, so its last bits follow the sharding: they differ on Intel AVX-512)
from floats import assert_same_noise, noise_sigma_rtol
from swapjax.gradients import _noise_std_fn
noise = swapjax.GradientNoise(2.0, 0.25)
X0 = jax.device_put(X4, jax.devices()[0])
Xn1 = noise(X0, jax.random.key(3))
Xn4 = noise(X4, jax.random.key(3), chunk_size=3)
rtol = noise_sigma_rtol(*X4.shape)
assert_same_noise(Xn4, Xn1, X0, rtol)
assert Xn4.sharding.is_equivalent_to(X4.sharding, 2) and not X4.is_deleted()
sigma64 = 2.0 * np.asarray(X0, np.float64).std()
for sigma in (_noise_std_fn(None)(X0, 2.0), _noise_std_fn(row_sharding(X4))(X4, 2.0)):
    assert abs(float(sigma) - sigma64) <= rtol / 2 * sigma64, (float(sigma), sigma64)
# the check is tight enough to fail: a σ off by 3x the bound (a sum wrong beyond rounding) is caught
off = swapjax.GradientNoise(2.0 * (1 + 3 * rtol), 0.25)(X0, jax.random.key(3))
try:
    assert_same_noise(off, Xn1, X0, rtol)
except AssertionError:
    pass
else:
    raise AssertionError("a sigma off by 3x the float32 bound passed the noise check")

# layer by layer: each device walks its 16 examples (chunks of 6: the last overlapping) and forms its part of
# every H; one psum adds them. The sharded H equals the single-device H and the float64 one.
G1 = swapjax.layer_grams(loss_fn, params, batch, chunk_size=6)
G4 = swapjax.layer_grams(loss_fn, params, batch, chunk_size=6, devices="all")
assert sorted(G4) == ["l1/w", "l2/w"] and all(G4[name][1] == G1[name][1] == N for name in G4)
x64 = batch["x"].astype(np.float64)
for name, A in (("l1/w", x64), ("l2/w", np.tanh(x64 @ params["l1"]["w"] + params["l1"]["b"]))):
    H1, H4 = np.asarray(G1[name][0]), np.asarray(G4[name][0])
    np.testing.assert_allclose(H4, H1, rtol=1e-5, atol=1e-5 * np.abs(H1).max(), err_msg=name)
    np.testing.assert_allclose(H4, A.T @ A, rtol=1e-4, atol=1e-4 * np.abs(A.T @ A).max(), err_msg=name)
p1 = swapjax.prune_layerwise(loss_fn, params, batch, method=swapjax.SparseGPT(), chunk_size=6, progress=False)
p4 = swapjax.prune_layerwise(loss_fn, params, batch, method=swapjax.SparseGPT(), chunk_size=6, progress=False,
                             devices="all")
for a, b in zip(jax.tree_util.tree_leaves(p4.masks), jax.tree_util.tree_leaves(p1.masks)):
    assert np.array_equal(np.asarray(a), np.asarray(b))
for a, b in zip(jax.tree_util.tree_leaves(p4.params), jax.tree_util.tree_leaves(p1.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
try:
    swapjax.prune_layerwise(loss_fn, params, {k: v[:63] for k, v in batch.items()}, devices="all", progress=False)
except ValueError as e:
    assert "N = 63 examples do not split evenly over 4 devices" in str(e), str(e)
else:
    raise AssertionError("63 examples over 4 devices: no ValueError")
print("ok")
'''


def _doc_blocks() -> list[str]:
    page = (Path(__file__).resolve().parent.parent / "docs" / "scale.md").read_text()
    return re.findall(r"^```python\n(.*?)^```", page, re.S | re.M)


def test_four_devices_match_one_device():
    # the suite's XLA_FLAGS (conftest.py: its compile-time options) plus 4 host devices
    flags = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    # then the examples of docs/scale.md, as written, in the same process
    script = _SCRIPT.replace("TESTS_DIR", repr(str(Path(__file__).resolve().parent))) + "\n".join(f"exec(compile({b!r}, 'docs/scale.md[{i}]', 'exec'), {{'__name__': '__docs__'}})"
                                  for i, b in enumerate(_doc_blocks())) + "\nprint('ok')\n"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stdout + out.stderr[-4000:]
