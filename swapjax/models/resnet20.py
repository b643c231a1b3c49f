"""ResNet20 for CIFAR-10 (He et al. 2016, §4.2), with 1×1 conv downsample shortcuts.

Architecture (input 32×32×3, NHWC):

    conv1 3×3, 3→16, stride 1 ─ bn1 ─ ReLU
    layer1: 3 BasicBlocks, 16 channels, 32×32
    layer2: 3 BasicBlocks, 32 channels, first one stride 2 → 16×16
    layer3: 3 BasicBlocks, 64 channels, first one stride 2 → 8×8
    global average pool ─ fc 64→10 (with bias)

BasicBlock: conv 3×3 (stride s) ─ BN ─ ReLU ─ conv 3×3 ─ BN, plus the shortcut,
then ReLU. The shortcut is the identity when the shape is kept and a 1×1 conv
(stride s, no bias) followed by BN when it changes ("option B"; the first
block of layer2 and of layer3). Convs have no bias (a BN follows each one).

Weight count (the prunable kernels: convs and fc, arrays with ndim ≥ 2):

    conv1                      3·3·3·16          =     432
    layer1, 6 convs            6 · 3·3·16·16     =  13,824
    layer2, 6 convs            3·3·16·32 + 5 · 3·3·32·32 = 50,688
    layer3, 6 convs            3·3·32·64 + 5 · 3·3·64·64 = 202,752
    fc                         64·10             =     640
    = 268,336 without the shortcuts
    1×1 shortcut convs         16·32 + 32·64     =   2,560
    = 270,896 with them: the published figure, exactly.

So 270,896 counts the 3×3 convs, the two 1×1 downsample convs and the fc
kernel, and excludes the fc bias (10), which this model has but which is not
pruned (ndim 1). Option A (parameter-free zero-padding shortcuts, the
original paper's CIFAR choice) would give 268,336 and does not match.
The non-pruned parameters are the BN scales/biases (1,568) and the fc bias
(10): 272,474 parameters in all. BN running means/variances live in the
``batch_stats`` collection (another 1,568 numbers, not parameters).

Parameter names follow the PyTorch CIFAR ResNet convention
(``layer2_0/conv1/kernel`` ↔ ``layer2.0.conv1.weight``; the shortcut is
``layer2_0/shortcut_conv`` and ``layer2_0/shortcut_bn``).

BatchNorm: ``train=False`` (the default) normalises with the running
statistics and reads ``batch_stats`` without changing them, so the model is a
pure function of one example, as per-sample gradients need::

    model.apply({"params": p, "batch_stats": s}, x)                  # inference
    y, upd = model.apply({"params": p, "batch_stats": s}, x, train=True,
                         mutable=["batch_stats"])                     # training
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

# He (fan-in, gain √2) normal init for the convs, as the reference CIFAR ResNets use.
_conv_init = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


def _pad(k: int):
    """Symmetric (k − 1)/2 zero padding, as PyTorch's ``padding=1`` for 3×3 and 0 for 1×1.

    Not "SAME": for stride 2 on even sizes, SAME pads (0, 1) and samples other
    pixels than PyTorch's (1, 1), so PyTorch checkpoints would not carry over.
    """
    return ((k // 2, k // 2), (k // 2, k // 2))


def _batch_norm(train: bool, momentum: float, epsilon: float, dtype, name: str) -> nn.BatchNorm:
    return nn.BatchNorm(
        use_running_average=not train, momentum=momentum, epsilon=epsilon, dtype=dtype, name=name
    )


class BasicBlock(nn.Module):
    """Two 3×3 conv-BN layers with a residual connection (1×1 conv + BN shortcut on shape change)."""

    features: int
    stride: int = 1
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        bn = lambda name: _batch_norm(train, self.bn_momentum, self.bn_epsilon, self.dtype, name)  # noqa: E731
        conv = lambda k, s, name: nn.Conv(  # noqa: E731
            self.features, (k, k), strides=(s, s), padding=_pad(k),
            use_bias=False, kernel_init=_conv_init, dtype=self.dtype, name=name,
        )
        out = nn.relu(bn("bn1")(conv(3, self.stride, "conv1")(x)))
        out = bn("bn2")(conv(3, 1, "conv2")(out))
        if self.stride != 1 or x.shape[-1] != self.features:
            x = bn("shortcut_bn")(conv(1, self.stride, "shortcut_conv")(x))
        return nn.relu(out + x)


class ResNet20(nn.Module):
    """CIFAR ResNet20 (16/32/64 channels, 1×1 downsample shortcuts); returns logits.

    Input: (H, W, C) for one example or (B, H, W, C) for a batch, NHWC
    (32×32 on CIFAR-10; any size works thanks to the global average pool).
    Output: (num_classes,) or (B, num_classes).
    ``blocks_per_stage`` = 3 gives ResNet20 (depth 6n + 2); 270,896 prunable weights.
    ``train``: False uses BN running statistics (no mutation); True uses the
    batch statistics and needs ``mutable=["batch_stats"]`` to update them.
    """

    num_classes: int = 10
    widths: Sequence[int] = (16, 32, 64)
    blocks_per_stage: int = 3
    bn_momentum: float = 0.9  # running = 0.9·running + 0.1·batch (PyTorch momentum 0.1)
    bn_epsilon: float = 1e-5
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x, single = _as_batch(x, self.dtype, "ResNet20")
        x = nn.Conv(
            self.widths[0], (3, 3), padding=_pad(3), use_bias=False,
            kernel_init=_conv_init, dtype=self.dtype, name="conv1",
        )(x)
        x = nn.relu(_batch_norm(train, self.bn_momentum, self.bn_epsilon, self.dtype, "bn1")(x))
        for stage, width in enumerate(self.widths):
            for block in range(self.blocks_per_stage):
                stride = 2 if stage > 0 and block == 0 else 1
                x = BasicBlock(
                    width, stride, self.bn_momentum, self.bn_epsilon, self.dtype,
                    name=f"layer{stage + 1}_{block}",
                )(x, train)
        return _pool_and_classify(x, self.num_classes, self.dtype, single)


def _as_batch(x, dtype, model: str) -> tuple[jax.Array, bool]:
    """(a (B, H, W, C) batch, whether ``x`` was one (H, W, C) example); ValueError for other shapes."""
    x = jnp.asarray(x, dtype)
    if x.ndim not in (3, 4):
        raise ValueError(f"{model}: expected an NHWC image (H, W, C) or batch (B, H, W, C), got shape {x.shape}")
    return (x[None], True) if x.ndim == 3 else (x, False)


def _pool_and_classify(x: jax.Array, num_classes: int, dtype, single: bool) -> jax.Array:
    """Global average pool and the ``fc`` layer (inside the calling module's compact method)."""
    logits = nn.Dense(num_classes, dtype=dtype, name="fc")(jnp.mean(x, axis=(1, 2)))
    return logits[0] if single else logits
