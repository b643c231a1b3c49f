"""How far can choosing λ go? The default selection against the best λ picked on test accuracy.

    .venv/bin/python experiments/studies/selection/selection_ceiling.py --seeds 0 1 2 3 4
    # → selection_ceiling.csv beside this script

For each seed (the problems of experiments/studies/selection/mlpnet_problems.py), sparsity
(0.9, 0.95) and gradient noise (none; 2σ on 25 % of the entries, key = seed): the test accuracy of
`SWAP().solve` with the held-out score on the 800 examples that `swapjax.prune` fits (its default
hold-out), and of `LR(lam=λ, swap_rounds=0)` on all 1,000 examples for every λ of the path. The best
of the latter is an oracle, chosen on the test split itself: no selection rule on held-out data can
beat it with this local model (the empirical Fisher of N = 1,000 examples), so it bounds what a
better choice of λ could add. The noise of the two X differs (one draw per shape). Also the best
test accuracy among the selection's own candidates: how much a better choice among them could add.
"""
from __future__ import annotations

import sys
from pathlib import Path

import jax

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).resolve().parents[2])]  # mlpnet_problems, reproduce
import mlpnet_problems as P  # noqa: E402
import reproduce as R  # noqa: E402

import swapjax  # noqa: E402
from swapjax.methods import LAM_PATH  # noqa: E402
from swapjax.prune import kept_count  # noqa: E402

FIELDS = ["seed", "noise", "sparsity", "selected_lam", "selected_epsilon", "selected_accuracy",
          "best_candidate_accuracy", "lam", "accuracy_all_n"]


def main():
    args = P.arguments(__doc__, "selection_ceiling.csv")
    rows = []
    for problem in P.problems(args.seeds, args.runs):
        seed, w_bar, accuracy = problem.seed, problem.w_bar, problem.accuracy
        clean = {name: swapjax.per_sample_grads(problem.loss_fn, problem.params, b, progress=False)
                 for name, b in (("fit", problem.fit), ("all", problem.batch))}
        for noise in ("none", "2σ,25%"):
            X = clean if noise == "none" else {
                name: swapjax.GradientNoise(*R.NOISE[noise])(x, jax.random.key(seed)) for name, x in clean.items()}
            for s in (0.9, 0.95):
                k = kept_count(s, w_bar.size)
                scored = []  # every candidate the selection scored, to find the one best on the test split

                def score(w):
                    scored.append(w)
                    return problem.score(w)

                w, info = swapjax.SWAP().solve(X["fit"], w_bar, k, score=score)
                chosen = info.candidates[info.chosen]
                selected = dict(seed=seed, noise=noise, sparsity=s, selected_lam=chosen.lam,
                                selected_epsilon=chosen.epsilon, selected_accuracy=accuracy(w),
                                best_candidate_accuracy=max(map(accuracy, scored)))
                for lam in LAM_PATH:
                    w_lam, _ = swapjax.LR(lam=lam, swap_rounds=0).solve(X["all"], w_bar, k)
                    rows.append(dict(selected, lam=lam, accuracy_all_n=accuracy(w_lam)))
                best = max(rows[-len(LAM_PATH):], key=lambda r: r["accuracy_all_n"])
                print(f"seed {seed} {noise} {s}: selected {selected['selected_accuracy']:.4f}, "
                      f"best λ {best['lam']} on all N {best['accuracy_all_n']:.4f}", flush=True)
    P.write_csv(args.out, FIELDS, rows)


if __name__ == "__main__":
    main()
