"""Transforms for training pipelines and the perturbation protocol.

:class:`Diffeo` (augmentation: every part of a sample moved by one field per sample),
:class:`DiffeoPair` (the ``(tau x, x + eta)`` pair the sensitivity meter uses), the
:class:`Perturbation` protocol, the record of a call (:class:`DiffeoParams`), and
``TorchvisionDiffeo``, the same transform as a ``torchvision.transforms.v2`` transform
(imported on first use, only where torchvision imports).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from diffeo_engine.transforms.laws import DiffeoParams
from diffeo_engine.transforms.modules import Diffeo, DiffeoPair, Perturbation

__all__ = ["Diffeo", "DiffeoPair", "DiffeoParams", "Perturbation", "TorchvisionDiffeo"]

if TYPE_CHECKING:
    from diffeo_engine.transforms.torchvision_v2 import TorchvisionDiffeo


def __getattr__(name: str):
    if name == "TorchvisionDiffeo":
        from diffeo_engine.transforms.torchvision_v2 import TorchvisionDiffeo

        return TorchvisionDiffeo
    raise AttributeError(f"module 'diffeo_engine.transforms' has no attribute {name!r}")
