"""Tolerances for comparing float32 results of different compiled programs.

Bit-identity holds only where the code guarantees it on any CPU: the same compiled program on
bit-equal inputs (XLA:CPU runs deterministically), exact operations (copies, gathers, masks,
comparisons, integer arithmetic such as the PRNG's bits). Two programs that compute the same
formula (sharded against single-device, traced against eager, other chunk shapes) may order a
reduction or contract a multiply-add differently, and Intel AVX-512 and AMD CPUs round such
programs differently; those results are compared within a bound from float32 rounding.
"""
from __future__ import annotations

import numpy as np

EPS32 = float(np.finfo(np.float32).eps)


def noise_sigma_rtol(n: int, p: int) -> float:
    """A bound on the relative float32 error of the noise scale σ = std_scale·std(X), X ∈ R^{n×p}.

    σ comes from a two-pass sum of positive terms: rows accumulated one by one (n terms, on one
    device or split over shards then added), then two levels of √p terms; a recursive sum of m
    positive terms has relative error ≤ (m − 1)·u, u = eps/2. With the square root, the scale and
    the shards' sum, (n + 2√p + 8)·eps bounds the difference of two such programs' σ."""
    return (n + 2 * np.sqrt(p) + 8) * EPS32


def assert_same_noise(noisy, reference, X, rtol_sigma: float):
    """``noisy`` and ``reference`` are X plus the gradient noise of one key, from two programs.

    The hit pattern is drawn from the PRNG's integer bits and a comparison, so it is the same bit
    for bit; the values σ·E_ij agree to ``rtol_sigma`` (σ's rounding), plus one rounding of the
    sum X + σ·E in each result."""
    noisy, reference, X = (np.asarray(a) for a in (noisy, reference, X))
    np.testing.assert_array_equal(noisy != X, reference != X, err_msg="hit pattern")
    tol = rtol_sigma * np.abs(reference - X) + 2 * np.spacing(np.maximum(np.abs(noisy), np.abs(reference)))
    excess = np.abs(noisy.astype(np.float64) - reference) - tol
    assert np.all(excess <= 0), (
        f"noise values differ beyond float32 rounding: {int(np.sum(excess > 0))} entries, "
        f"max |Δ| = {np.max(np.abs(noisy.astype(np.float64) - reference)):.3g}")
