"""Data: readers for arrays, image folders and MNIST IDX files, and the scale-detection tasks
of Tomasini et al. (2022/23) with their task-specific perturbations."""

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
    "load_mnist",
    "one_hot_signals",
    "open_source",
    "parse_resize",
    "read_idx",
    "scale_detection_labels",
]
