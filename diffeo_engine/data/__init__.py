"""Data: readers for arrays, image folders, MNIST IDX and CIFAR-10 binary files, and the
scale-detection tasks of Tomasini et al. (2022/23) with their task-specific perturbations."""

from diffeo_engine.data.cifar10 import load_cifar10
from diffeo_engine.data.scale_detection import (
    OneHotShift,
    ScaleDetection,
    ScaleDetectionPerturbation,
    one_hot_signals,
    scale_detection_labels,
)
from diffeo_engine.data.sources import ImageSource, load_mnist, open_source, parse_resize, read_idx

__all__ = [
    "ImageSource",
    "OneHotShift",
    "ScaleDetection",
    "ScaleDetectionPerturbation",
    "load_cifar10",
    "load_mnist",
    "one_hot_signals",
    "open_source",
    "parse_resize",
    "read_idx",
    "scale_detection_labels",
]
