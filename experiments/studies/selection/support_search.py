"""Does the support leave the magnitude support, and does it pay? SWAP() one-shot on the MLPNet preset.

    .venv/bin/python experiments/studies/selection/support_search.py --seeds 0 1 2 3 4
    # → support_search.csv beside this script

For each seed (the problems of experiments/studies/selection/mlpnet_problems.py), sparsity
(0.9, 0.95) and gradient noise (none; 2σ on 25 % of the entries, key = seed): X on the 800 fitted
examples of `swapjax.prune`'s default hold-out, `SWAP().solve` with the held-out score; for
comparison, the chosen (λ, ε) solved again explicitly without any search (IHT and the backsolve,
`swap_rounds=0`). Columns: the selection's choice (its kind: "iht", "ridge", "swap" or "obs") and
held-out loss; of the selected result, the kept weights off the magnitude support H_k(w̄), f, and
f of the magnitude support's backsolve at the same λ and targets; test accuracy without the
search and of the selected result.
"""
from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).resolve().parents[2])]  # mlpnet_problems, reproduce
import mlpnet_problems as P  # noqa: E402
import reproduce as R  # noqa: E402

import swapjax  # noqa: E402
from swapjax.prune import kept_count  # noqa: E402

FIELDS = ["seed", "noise", "sparsity", "lam", "epsilon", "chosen", "held_out_loss", "moved",
          "objective_magnitude", "objective", "accuracy_no_search", "accuracy"]


def main():
    args = P.arguments(__doc__, "support_search.csv")
    rows = []
    for problem in P.problems(args.seeds, args.runs):
        seed, w_bar, score, accuracy = problem.seed, problem.w_bar, problem.score, problem.accuracy
        X_clean = swapjax.per_sample_grads(problem.loss_fn, problem.params, problem.fit, progress=False)
        for noise in ("none", "2σ,25%"):
            X = X_clean if noise == "none" else swapjax.GradientNoise(*R.NOISE[noise])(X_clean, jax.random.key(seed))
            for s in (0.9, 0.95):
                k = kept_count(s, w_bar.size)
                w, info = swapjax.SWAP().solve(X, w_bar, k, score=score)
                best = info.candidates[info.chosen]
                eps = 0.0 if best.epsilon is None else best.epsilon
                # ε = 0 in one-shot pruning is the identity plan: LR's targets, as the selection's y candidate
                plain, _ = swapjax.SWAP(lam=best.lam, epsilon=eps, swap_rounds=0).solve(X, w_bar, k)
                magnitude = swapjax.iht.hard_threshold_mask(w_bar, k)
                row = dict(seed=seed, noise=noise, sparsity=s, lam=best.lam, epsilon=best.epsilon, chosen=best.support,
                           held_out_loss=round(best.score, 5), moved=int(jnp.sum(info.support & ~magnitude)),
                           objective_magnitude=round(float(info.objective_magnitude), 5),
                           objective=round(float(info.objective), 5),
                           accuracy_no_search=round(accuracy(plain), 5), accuracy=round(accuracy(w), 5))
                rows.append(row)
                print(row, flush=True)
    P.write_csv(args.out, FIELDS, rows)


if __name__ == "__main__":
    main()
