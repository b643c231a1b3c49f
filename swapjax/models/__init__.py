"""Flax models of the paper's experiments, LeNet-5 as a small CNN, a small ViT and a byte-level GPT."""
from .gpt import GPT, next_token_loss
from .lenet5 import LeNet5
from .mlpnet import MLPNet
from .mobilenetv1 import MobileNetV1
from .resnet20 import ResNet20
from .resnet50 import ResNet50
from .vit import ViT

__all__ = ["MLPNet", "LeNet5", "ResNet20", "MobileNetV1", "ResNet50", "ViT", "GPT", "next_token_loss"]
