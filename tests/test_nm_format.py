"""swapjax.nm_format: to_nm / from_nm refuse what they cannot export or rebuild, with errors that name it."""
from __future__ import annotations

import re

import jax.numpy as jnp
import numpy as np
import pytest

import swapjax
from swapjax.nm_format import NMKernel


def _two_four(shape=(8, 3), seed=0):
    """A kernel (in, out) and a 2:4 mask along the input axis (random kept pairs)."""
    rng = np.random.default_rng(seed)
    kernel = rng.standard_normal(shape).astype(np.float32)
    mask = np.zeros(shape, bool)
    for g in range(shape[0] // 4):
        for o in range(shape[1]):
            mask[4 * g + rng.choice(4, 2, replace=False), o] = True
    return {"k": kernel, "b": np.ones(shape[1], np.float32)}, {"k": mask, "b": None}


def test_round_trip_with_0d_arrays_for_n_and_m():
    params, masks = _two_four()
    packed = swapjax.to_nm(params, masks, n=jnp.asarray(2), m=np.int64(4))
    rebuilt = swapjax.from_nm(packed, params)
    np.testing.assert_array_equal(rebuilt["k"], np.where(masks["k"], params["k"], 0))
    assert rebuilt["b"] is params["b"]
    # groups along the last axis of the transposed kernel, named from the end: the same values and indices
    along_1 = swapjax.to_nm({"k": params["k"].T}, {"k": masks["k"].T}, axes=(-1,))
    assert along_1["k"].axes == (1,)
    np.testing.assert_array_equal(along_1["k"].values, packed["k"].values)
    np.testing.assert_array_equal(along_1["k"].indices, packed["k"].indices)
    np.testing.assert_array_equal(swapjax.from_nm(along_1, {"k": params["k"].T})["k"], rebuilt["k"].T)


@pytest.mark.parametrize("n, m, message", [
    (2, 0, "m: must be an integer ≥ 2, got 0"),              # was ZeroDivisionError
    (2, 2.0, "m: must be an integer ≥ 2, got 2.0"),
    (0, 4, "n: must be an integer ≥ 1, got 0"),
    (4, 4, "n: must be below m = 4 (keep n of every m weights), got 4"),
    (True, 4, "n: must be an integer ≥ 1, got True"),
    (jnp.asarray(2.0), 4, "n: must be an integer ≥ 1"),
    (2, 512, "m: must be at most 256 (the in-group indices are uint8), got 512"),
])
def test_to_nm_checks_n_and_m(n, m, message):
    params, masks = _two_four()
    with pytest.raises(ValueError, match=re.escape(message)):
        swapjax.to_nm(params, masks, n=n, m=m)


@pytest.mark.parametrize("axes, message", [
    (lambda path, shape: (5,), "axes: k of shape (8, 3) got axes (5,)"),   # was wrapped to axis 1
    (lambda path, shape: (2,), "axes: k of shape (8, 3) got axes (2,)"),
    (lambda path, shape: (0, -2), "axes: k of shape (8, 3) got axes (0, -2)"),
    (lambda path, shape: (), "axes: k of shape (8, 3) got axes ()"),
    (lambda path, shape: (0.0,), "axes: k of shape (8, 3) got axes (0.0,)"),
])
def test_to_nm_checks_axes(axes, message):
    params, masks = _two_four()
    with pytest.raises(ValueError, match=re.escape(message) + r"; expected distinct axes in \[-2, 2\)"):
        swapjax.to_nm(params, masks, axes=axes)
    with pytest.raises(ValueError, match=re.escape("axes: k of shape (8, 3) got axes (0, 0)")):
        swapjax.to_nm(params, masks, axes=(0, 0))
    with pytest.raises(ValueError, match=r"axes: expected None, the axes of every kernel such as \(0,\), a mapping "
                                         r"\{path: axes\} \(a prune's result.input_axes\) or a function "
                                         r"axes\(path, shape\) -> axes, got 'in'"):
        swapjax.to_nm(params, masks, axes="in")
    # as NM takes them: a tuple for every kernel, a function of the leaf (an int is one axis); negative
    # axes in range count from the end
    for ok in ((0,), [-2], lambda path, shape: (-2,), lambda path, shape: 0, lambda path, shape: (jnp.asarray(0),),
               np.array([0]), lambda path, shape: np.array([-2])):
        assert swapjax.to_nm(params, masks, axes=ok)["k"].axes == (0,)


def test_to_nm_refuses_empty_kernels_and_an_empty_export():
    with pytest.raises(ValueError, match=re.escape("params: k has shape (0, 4), an axis of size 0: no weights")):
        swapjax.to_nm({"k": np.ones((0, 4), np.float32)}, {"k": np.ones((0, 4), bool)})   # was ZeroDivisionError
    with pytest.raises(ValueError, match=re.escape("params: k has shape (4, 0), an axis of size 0")):
        swapjax.to_nm({"k": np.ones((4, 0), np.float32)}, {"k": np.ones((4, 0), bool)})
    params, masks = _two_four()
    with pytest.raises(ValueError, match=re.escape("m: no masked kernel has a reduction size that is a multiple of "
                                                   "m = 3 (sizes: {'k': 8}); nothing to export")):
        swapjax.to_nm(params, masks, n=1, m=3)   # was {} without a word


def test_from_nm_checks_packed_and_params():
    params, masks = _two_four()
    packed = swapjax.to_nm(params, masks)
    with pytest.raises(ValueError, match=r"packed: expected the dict \{path: NMKernel\} that swapjax.to_nm returns, got None"):
        swapjax.from_nm(None, params)   # was TypeError: argument of type 'NoneType' is not iterable
    with pytest.raises(ValueError, match=r"packed: expected the dict .* got \{'k': \(1, 2\)\}"):
        swapjax.from_nm({"k": (1, 2)}, params)
    with pytest.raises(ValueError, match="params: expected the pytree of parameters that to_nm was given, got None"):
        swapjax.from_nm(packed, None)
    with pytest.raises(ValueError, match=re.escape("packed: ['k'] are not in params (leaves: ['Dense_0/kernel'])")):
        swapjax.from_nm(packed, {"Dense_0": {"kernel": params["k"]}})   # was returned unchanged
    with pytest.raises(ValueError, match=re.escape("packed['k']: shape (8, 3), the parameter in params has (3, 8)")):
        swapjax.from_nm(packed, {"k": params["k"].T})


def test_from_nm_refuses_tampered_kernels():
    params, masks = _two_four()
    good = swapjax.to_nm(params, masks)["k"]    # values, indices (3, 4): 3 outputs, 2 groups of 2 kept

    def rebuild(**changes):
        return swapjax.from_nm({"k": good._replace(**changes)}, params)

    out_of_range = good.indices.copy()
    out_of_range[1, 3] = 4
    with pytest.raises(ValueError, match=re.escape("packed['k'].indices: expected integers in [0, 4), got uint8 in [0, 4]")):
        rebuild(indices=out_of_range)
    repeated = good.indices.copy()
    repeated[2, 2:] = [3, 3]
    with pytest.raises(ValueError, match=re.escape("packed['k'].indices: group 5 repeats an index ([3, 3])")):
        rebuild(indices=repeated)   # was a silent overwrite: one weight lost
    with pytest.raises(ValueError, match=re.escape("packed['k'].indices: expected integers in [0, 4), got float32")):
        rebuild(indices=good.indices.astype(np.float32))
    fit = r"packed\['k'\]: values .* and indices .* do not fit shape \(8, 3\) \(rows O = 3, K = 8 along axes \(0,\)\)"
    for changes in (dict(values=good.values[:, :3]),                                # one value short
                    dict(values=good.values[:, :3], indices=good.indices[:, :3]),   # wrong count: n = 1.5
                    dict(values=good.values[:2], indices=good.indices[:2]),         # a row missing
                    dict(values=good.values.ravel(), indices=good.indices.ravel()),
                    dict(values=np.tile(good.values, 2), indices=np.tile(good.indices, 2))):  # n = 4 = m
        with pytest.raises(ValueError, match=fit):
            rebuild(**changes)
    with pytest.raises(ValueError, match=re.escape("packed['k'].axes: k of shape (8, 3) got axes (3,)")):
        rebuild(axes=(3,))
    with pytest.raises(ValueError, match=re.escape("packed['k'].m: must be an integer ≥ 2, got 0")):
        rebuild(m=0)
    with pytest.raises(ValueError, match=re.escape("packed['k']: K = 8 inputs along axes (0,) of shape (8, 3), "
                                                   "not a positive multiple of m = 3")):
        rebuild(m=3)
    # untouched, it still rebuilds the masked kernel
    np.testing.assert_array_equal(rebuild()["k"], np.where(masks["k"], params["k"], 0))


def test_to_nm_takes_a_prunes_input_axes():
    """A mapping {path: axes} (``result.input_axes`` of either driver) groups each leaf along its own axes:
    the same packing as the tuple; a masked leaf it does not name (no product said its inputs) is not
    exported; a (out, in) kernel used as einsum("j,kj->k") packs along axis 1."""
    params, masks = _two_four()
    by_tuple = swapjax.to_nm(params, masks, axes=(0,))
    by_mapping = swapjax.to_nm(params, masks, axes={"k": (0,)})
    np.testing.assert_array_equal(by_mapping["k"].values, by_tuple["k"].values)
    np.testing.assert_array_equal(by_mapping["k"].indices, by_tuple["k"].indices)
    with pytest.raises(ValueError, match="nothing to export"):
        swapjax.to_nm(params, masks, axes={"other": (0,)})
    rng = np.random.default_rng(0)
    w = rng.normal(size=(3, 8)).astype(np.float32)  # (out, in)
    loss_fn = lambda p, ex: jnp.sum(jnp.einsum("j,kj->k", ex["x"], p["w"]) ** 2)  # noqa: E731
    res = swapjax.prune(loss_fn, {"w": w}, {"x": rng.normal(size=(16, 8)).astype(np.float32)},
                        method=swapjax.Magnitude(), constraint=swapjax.NM(2, 4), stages=1, progress=False)
    assert res.input_axes == {"w": (1,)}
    packed = swapjax.to_nm(res.params, res.masks, axes=res.input_axes)
    assert packed["w"].axes == (1,)
    np.testing.assert_array_equal(swapjax.from_nm(packed, res.params)["w"], res.params["w"])
