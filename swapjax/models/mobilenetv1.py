"""MobileNetV1 with a width multiplier α (Howard et al. 2017, Table 1).

ImageNet architecture (input 224×224×3, NHWC; every conv is followed by BN
and ReLU, convs have no bias):

    conv0     3×3, 3→32, stride 2                       → 112×112
    block 1   dw 3×3 s1, pw 1×1 → 64                     → 112×112
    block 2   dw 3×3 s2, pw 1×1 → 128                    →  56×56
    block 3   dw 3×3 s1, pw 1×1 → 128
    block 4   dw 3×3 s2, pw 1×1 → 256                    →  28×28
    block 5   dw 3×3 s1, pw 1×1 → 256
    block 6   dw 3×3 s2, pw 1×1 → 512                    →  14×14
    block 7–11  5 × (dw 3×3 s1, pw 1×1 → 512)
    block 12  dw 3×3 s2, pw 1×1 → 1024                   →   7×7
    block 13  dw 3×3 s1, pw 1×1 → 1024   (Table 1 prints s2 here, a known typo;
                                           every implementation uses s1)
    global average pool ─ fc 1024→1000 (with bias)

Depthwise convs are ``nn.Conv(C, (3, 3), feature_group_count=C)`` (kernel
shape (3, 3, 1, C)). The width multiplier scales every conv's output channels
to ``int(c · α)`` (the Keras convention; exact for α ∈ {1, .75, .5, .25}).
3×3 convs pad 1 on each side (PyTorch's convention; see ``resnet20._pad``).

Parameter count at α = 1.0, 224×224, 1000 classes:

    prunable kernels (convs + fc, ndim ≥ 2)          4,209,088
      conv0 864, depthwise 17,280, pointwise 3,167,232, fc 1,024,000
    + fc bias                                            1,000
    + BN scales and biases (27 BNs, 10,944 channels)    21,888
    = 4,231,976 parameters: the published "4.2 million" (Howard et al.
      Tables 6 and 8; Keras' MobileNet reports the same 4,231,976 trainable),
      0.76% above 4.2M (the kernels alone are 0.22% above). BN running
      statistics (21,888 more numbers) sit in ``batch_stats``. Dropout before
      the classifier is omitted.

Other widths (all parameters / prunable kernels), against Howard et al.
Table 6 (2.6M, 1.3M, 0.5M): α = 0.75: 2,585,560 / 2,568,144; α = 0.5:
1,331,592 / 1,319,648; α = 0.25: 470,072 / 463,600.

Small-input variant (``small_input=True``, for 32×32 CIFAR-style inputs):
conv0 has stride 1 instead of 2, the rest is unchanged, so there are four
downsamplings instead of five (32 → 16 → 8 → 4 → 2 before the pool); this is
the common CIFAR MobileNet (e.g. kuangliu/pytorch-cifar). The parameters are
exactly those of the ImageNet model with ``num_classes`` outputs.

BatchNorm: ``train=False`` (the default) uses the running statistics and
leaves ``batch_stats`` untouched (per-sample gradients); ``train=True`` with
``mutable=["batch_stats"]`` for training.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from .resnet20 import _as_batch, _conv_init, _pad, _pool_and_classify

# (pointwise output channels, depthwise stride) of the 13 depthwise-separable blocks at α = 1.
BLOCKS: Tuple[Tuple[int, int], ...] = (
    (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
    (512, 1), (512, 1), (512, 1), (512, 1), (512, 1),
    (1024, 2), (1024, 1),
)
STEM_CHANNELS = 32


class MobileNetV1(nn.Module):
    """MobileNetV1 (width multiplier ``width``); returns logits.

    Input: (H, W, C) for one example or (B, H, W, C) for a batch, NHWC
    (224×224×3 on ImageNet; 32×32×3 with ``small_input=True``). Output:
    (num_classes,) or (B, num_classes). Parameter paths: ``conv0``, ``bn0``,
    ``block{i}/dw_conv``, ``block{i}/dw_bn``, ``block{i}/pw_conv``,
    ``block{i}/pw_bn`` (i = 1 … 13), ``fc``.
    """

    width: float = 1.0  # α
    num_classes: int = 1000
    small_input: bool = False  # conv0 stride 1 (32×32 inputs)
    blocks: Sequence[Tuple[int, int]] = BLOCKS
    bn_momentum: float = 0.9  # running = 0.9·running + 0.1·batch (PyTorch momentum 0.1)
    bn_epsilon: float = 1e-5
    dtype: jnp.dtype = jnp.float32

    def channels(self, c: int) -> int:
        """The width-scaled channel count int(c · α) (at least 1)."""
        return max(1, int(c * self.width))

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if not self.width > 0:
            raise ValueError(f"MobileNetV1: width must be > 0, got {self.width}")
        x, single = _as_batch(x, self.dtype, "MobileNetV1")

        x = nn.Conv(
            self.channels(STEM_CHANNELS), (3, 3), strides=1 if self.small_input else 2, padding=_pad(3),
            use_bias=False, kernel_init=_conv_init, dtype=self.dtype, name="conv0",
        )(x)
        x = nn.BatchNorm(
            use_running_average=not train, momentum=self.bn_momentum, epsilon=self.bn_epsilon,
            dtype=self.dtype, name="bn0",
        )(x)
        x = nn.relu(x)
        for i, (out, stride) in enumerate(self.blocks, start=1):
            x = _Separable(
                self.channels(out), stride, self.bn_momentum, self.bn_epsilon, self.dtype, name=f"block{i}"
            )(x, train)
        return _pool_and_classify(x, self.num_classes, self.dtype, single)


class _Separable(nn.Module):
    """Depthwise 3×3 conv ─ BN ─ ReLU ─ pointwise 1×1 conv ─ BN ─ ReLU."""

    features: int
    stride: int
    bn_momentum: float
    bn_epsilon: float
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        cin = x.shape[-1]
        for kind, features, k, s, groups in (
            ("dw", cin, 3, self.stride, cin),
            ("pw", self.features, 1, 1, 1),
        ):
            x = nn.Conv(
                features, (k, k), strides=(s, s), padding=_pad(k), feature_group_count=groups,
                use_bias=False, kernel_init=_conv_init, dtype=self.dtype, name=f"{kind}_conv",
            )(x)
            x = nn.BatchNorm(
                use_running_average=not train, momentum=self.bn_momentum, epsilon=self.bn_epsilon,
                dtype=self.dtype, name=f"{kind}_bn",
            )(x)
            x = nn.relu(x)
        return x
