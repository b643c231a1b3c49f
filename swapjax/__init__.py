"""swapjax: SWAP (sparse entropic Wasserstein regression) network pruning in JAX.

    result = swapjax.prune(loss_fn, params, batch, sparsity=0.9, method=swapjax.SWAP())

``swapjax.data`` (TFDS, IDX files) and ``swapjax.models`` (Flax models) load on
first use, so ``import swapjax`` stays light; ott-jax (Sinkhorn), orbax and
``jax.experimental.sparse`` are imported inside the functions that use them. ``swapjax.text`` (a text
corpus as byte tokens, split by document) comes with ``swapjax.perplexity``.
"""
import importlib

from .baselines import Magnitude, WoodFisher
from .blocks import Blocked
from .constraints import NM, Constraint, Groups, LayerBudgets, TopK, kept_count
from .contract import Method, Problem
from .comparison import MethodResult, compare, compare_sparsities, format_table
from .finetune import batched_loss, keep_pruned_at_zero, make_finetune_hook, masked_optimizer, masked_updates
from .gradients import GradientNoise, add_gradient_noise, per_sample_grads
from .io import bcoo_bytes, from_bcoo, load_pruned, save_pruned, to_bcoo
from .layer_methods import LayerMagnitude, Refit, Regression, SparseGPT, Swaps, Wanda
from .layers import Layer, Layers, find_layers
from .layerwise import layer_grams, prune_layerwise
from .methods import LR, SWAP, SolveInfo
from .nm_format import from_nm, to_nm
from .operators import Formed, GradientOperator, Operator, RowSharded, linearized_gradients
from .prune import PruneResult, StageInfo, prune
from .pytree import allow_vectors, apply_masks, exclude, sparsity_summary
from .selection import Selected
from .schedules import cubic_schedule, linear_schedule, polynomial_schedule
from .training import evaluate, train
from .text import perplexity

__all__ = [
    "Method", "Problem", "LR", "SWAP", "Magnitude", "WoodFisher", "Selected", "SolveInfo", "Blocked", "Constraint", "TopK", "LayerBudgets", "NM", "Groups",
    "compare", "compare_sparsities", "format_table", "MethodResult", "GradientNoise", "PruneResult", "StageInfo",
    "prune", "prune_layerwise", "layer_grams", "find_layers", "Layer", "Layers", "SparseGPT", "Wanda", "Refit", "Regression", "Swaps", "LayerMagnitude", "per_sample_grads", "add_gradient_noise", "kept_count", "linearized_gradients", "Operator", "Formed", "RowSharded",
    "GradientOperator",
    "allow_vectors", "exclude", "apply_masks", "sparsity_summary", "cubic_schedule", "linear_schedule", "polynomial_schedule",
    "keep_pruned_at_zero", "masked_updates", "masked_optimizer", "make_finetune_hook", "batched_loss",
    "train", "evaluate", "perplexity",
    "save_pruned", "load_pruned", "to_bcoo", "from_bcoo", "bcoo_bytes", "to_nm", "from_nm",
]
__version__ = "0.1.0"


def __getattr__(name):
    if name in ("data", "models"):
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'swapjax' has no attribute {name!r}")
