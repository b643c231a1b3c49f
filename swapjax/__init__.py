"""swapjax: SWAP (sparse entropic Wasserstein regression) network pruning in JAX.

    result = swapjax.prune(loss_fn, params, batch, sparsity=0.9, method=swapjax.SWAP())
"""
from .baselines import Magnitude, WoodFisher
from .comparison import MethodResult, compare, compare_sparsities, format_table
from .finetune import batched_loss, keep_pruned_at_zero, make_finetune_hook, masked_optimizer, masked_updates
from .gradients import GradientNoise, add_gradient_noise, per_sample_grads
from .methods import LR, SWAP, SolveInfo
from .prune import PruneResult, StageInfo, kept_count, prune
from .pytree import apply_masks, sparsity_summary
from .schedules import cubic_schedule, linear_schedule, polynomial_schedule
from .training import evaluate, train

__all__ = [
    "LR", "SWAP", "Magnitude", "WoodFisher", "SolveInfo",
    "compare", "compare_sparsities", "format_table", "MethodResult", "GradientNoise", "PruneResult", "StageInfo",
    "prune", "per_sample_grads", "add_gradient_noise", "kept_count",
    "apply_masks", "sparsity_summary", "cubic_schedule", "linear_schedule", "polynomial_schedule",
    "keep_pruned_at_zero", "masked_updates", "masked_optimizer", "make_finetune_hook", "batched_loss",
    "train", "evaluate",
]
__version__ = "0.1.0"
