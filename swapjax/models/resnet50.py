"""ResNet50 for ImageNet (He et al. 2016, Table 1), bottleneck blocks with the stride in the 3×3 conv.

Architecture (input 224×224×3, NHWC; every conv is followed by BN, convs have no bias):

    conv1     7×7, 3→64, stride 2 ─ BN ─ ReLU ─ max-pool 3×3 stride 2     → 56×56
    layer1    3 bottlenecks, 64 → 256                                       → 56×56
    layer2    4 bottlenecks, 128 → 512, first one stride 2                 → 28×28
    layer3    6 bottlenecks, 256 → 1024, first one stride 2                → 14×14
    layer4    3 bottlenecks, 512 → 2048, first one stride 2                →  7×7
    global average pool ─ fc 2048→1000 (with bias)

Bottleneck(c): 1×1 conv → c ─ BN ─ ReLU ─ 3×3 conv → c (stride s) ─ BN ─ ReLU ─ 1×1 conv → 4c ─ BN,
plus the shortcut (1×1 conv, stride s, + BN, on the first block of each layer), then ReLU. The
stride sits in the 3×3 conv ("ResNet v1.5", torchvision's and the pruning literature's model).

Parameter count at 224×224, 1000 classes:

    prunable kernels (53 convs + fc, ndim ≥ 2)      25,502,912
    + fc bias                                            1,000
    + BN scales and biases (53 BNs, 26,560 channels)    53,120
    = 25,557,032 parameters: torchvision's resnet50, exactly.

Parameter paths follow torchvision (``layer3_2/conv2/kernel`` ↔ ``layer3.2.conv2.weight``;
the shortcut is ``layer2_0/shortcut_conv`` and ``layer2_0/shortcut_bn``). BatchNorm as in
:class:`~swapjax.models.ResNet20`: ``train=False`` (the default) uses the running statistics.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from .resnet20 import _as_batch, _batch_norm, _conv_init, _pad, _pool_and_classify


class Bottleneck(nn.Module):
    """1×1 → 3×3 (stride s) → 1×1 (4× channels) conv-BN layers with a residual connection."""

    features: int  # c, the width of the 3×3 conv; the block outputs 4c channels
    stride: int = 1
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        def conv_bn(y, features, k, s, conv, bn):
            y = nn.Conv(features, (k, k), strides=(s, s), padding=_pad(k), use_bias=False,
                        kernel_init=_conv_init, dtype=self.dtype, name=conv)(y)
            return _batch_norm(train, self.bn_momentum, self.bn_epsilon, self.dtype, bn)(y)

        out = nn.relu(conv_bn(x, self.features, 1, 1, "conv1", "bn1"))
        out = nn.relu(conv_bn(out, self.features, 3, self.stride, "conv2", "bn2"))
        out = conv_bn(out, 4 * self.features, 1, 1, "conv3", "bn3")
        if self.stride != 1 or x.shape[-1] != 4 * self.features:
            x = conv_bn(x, 4 * self.features, 1, self.stride, "shortcut_conv", "shortcut_bn")
        return nn.relu(out + x)


class ResNet50(nn.Module):
    """ImageNet ResNet50 (bottlenecks 3-4-6-3, stride in the 3×3 conv); returns logits.

    Input: (H, W, C) for one example or (B, H, W, C) for a batch, NHWC (224×224×3 on ImageNet;
    any size of at least 32×32 runs, the pool is global). Output: (num_classes,) or
    (B, num_classes). 25,502,912 prunable weights at 1000 classes.
    """

    num_classes: int = 1000
    widths: Sequence[int] = (64, 128, 256, 512)
    blocks: Sequence[int] = (3, 4, 6, 3)
    bn_momentum: float = 0.9  # running = 0.9·running + 0.1·batch (PyTorch momentum 0.1)
    bn_epsilon: float = 1e-5
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x, single = _as_batch(x, self.dtype, "ResNet50")
        x = nn.Conv(64, (7, 7), strides=(2, 2), padding=_pad(7), use_bias=False, kernel_init=_conv_init,
                    dtype=self.dtype, name="conv1")(x)
        x = nn.relu(_batch_norm(train, self.bn_momentum, self.bn_epsilon, self.dtype, "bn1")(x))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=_pad(3))
        for stage, (width, count) in enumerate(zip(self.widths, self.blocks)):
            for block in range(count):
                stride = 2 if stage > 0 and block == 0 else 1
                x = Bottleneck(width, stride, self.bn_momentum, self.bn_epsilon, self.dtype,
                               name=f"layer{stage + 1}_{block}")(x, train)
        return _pool_and_classify(x, self.num_classes, self.dtype, single)
