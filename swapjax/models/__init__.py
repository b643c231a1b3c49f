"""Flax models of the paper's experiments."""
from .mlpnet import MLPNet
from .mobilenetv1 import MobileNetV1
from .resnet20 import ResNet20

__all__ = ["MLPNet", "ResNet20", "MobileNetV1"]
