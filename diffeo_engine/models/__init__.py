"""The papers' networks and a registry: ``get_model("name", **kwargs)``.

Families, one per module: the constant-filter CNN of the analytical model, the 1D/2D
scale-detection CNNs, and CIFAR/MNIST-style ``fcn``, ``fcn_ntk``, ``lenet``, ``alexnet``,
``vgg11/13/16/19[_bn]``, ``resnet18/34/50``, Ruderman et al.'s ``pooling_cnn``;
``"torchvision:NAME"`` and ``"timm:NAME"`` when those packages are installed.
:mod:`diffeo_engine.models.train` is a small trainer.
"""

from diffeo_engine.models import (
    alexnet,
    constant_filter,
    fcn,
    lenet,
    pooling,
    resnet,
    scale_detection,
    vgg,
)
from diffeo_engine.models.alexnet import AlexNet
from diffeo_engine.models.constant_filter import ConstantFilterCNN
from diffeo_engine.models.fcn import FCN, NTKFCN
from diffeo_engine.models.lenet import LeNet
from diffeo_engine.models.pooling import PoolingCNN
from diffeo_engine.models.registry import get_model, list_models, register_model
from diffeo_engine.models.resnet import ResNet
from diffeo_engine.models.scale_detection import ScaleDetectionCNN
from diffeo_engine.models.vgg import VGG

del alexnet, constant_filter, fcn, lenet, pooling, resnet, scale_detection, vgg

__all__ = [
    "FCN",
    "NTKFCN",
    "VGG",
    "AlexNet",
    "ConstantFilterCNN",
    "LeNet",
    "PoolingCNN",
    "ResNet",
    "ScaleDetectionCNN",
    "get_model",
    "list_models",
    "register_model",
]
