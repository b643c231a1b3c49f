"""Peak memory and time of the gradient noise (swapjax.add_gradient_noise) on an N×p float32 X.

    python experiments/studies/noise_memory/noise_memory.py --n 1000 --p 500000 --impl new-donate

Prints one line: impl, N, p, X in GB, seconds, and the peak RSS above the RSS before X was
made, in GB and as a multiple of X's size (ru_maxrss; one process per measurement). ``old``
is the previous implementation (full-size Bernoulli and normal draws in one jitted call),
kept here for the comparison.
"""
import argparse
import resource
import time

import jax
import jax.numpy as jnp

import swapjax


@jax.jit
def old_noise(X, key, std_scale, prop):
    k_hit, k_val = jax.random.split(key)
    hit = jax.random.bernoulli(k_hit, prop, X.shape)
    noise = std_scale * jnp.std(X) * jax.random.normal(k_val, X.shape, X.dtype)
    return X + jnp.where(hit, noise, 0)


def rss_gb():
    with open("/proc/self/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))
    return kb / 2**20


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--p", type=int, default=500_000)
    ap.add_argument("--impl", choices=["old", "new", "new-donate"], default="new-donate")
    a = ap.parse_args()
    jnp.zeros(1).block_until_ready()
    base = rss_gb()
    # X made by one fused elementwise computation: no temporary beside X
    X = jax.jit(lambda: 3.0 + 0.5 * jnp.sin(jnp.arange(a.n, dtype=jnp.float32)[:, None] * 0.37
                                             + jnp.arange(a.p, dtype=jnp.float32)[None, :] * 1.3))()
    X.block_until_ready()
    x_gb = a.n * a.p * 4 / 2**30
    key = jax.random.key(0)
    t0 = time.perf_counter()
    if a.impl == "old":
        Xn = old_noise(X, key, 2.0, 0.25)
    else:
        Xn = swapjax.add_gradient_noise(X, key, 2.0, 0.25, donate=a.impl == "new-donate")
    Xn.block_until_ready()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20 - base
    print(f"{a.impl} N={a.n} p={a.p} X={x_gb:.2f} GB: {seconds:.1f} s, peak RSS above baseline "
          f"{peak:.2f} GB = {peak / x_gb:.2f}x X", flush=True)


if __name__ == "__main__":
    main()
