"""diffeo-engine: max-entropy diffeomorphisms, matched noise, and layer-wise sensitivities.

The public API of design.md section 5, re-exported; nothing is defined here. Names are
imported on first use (PEP 562), so ``import diffeo_engine`` costs little more than
``import torch`` and loads neither ``triton`` nor ``torch._inductor``, and
``diffeo-engine --help`` does not load torch at all.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "Diffeo": "diffeo_engine.transforms",
    "DiffeoPair": "diffeo_engine.transforms",
    "DiffeoParams": "diffeo_engine.transforms",
    "Perturbation": "diffeo_engine.transforms",
    "SensitivityMeter": "diffeo_engine.sensitivity",
    "SensitivityResult": "diffeo_engine.sensitivity",
    "deform": "diffeo_engine.ops",
    "displacement_field": "diffeo_engine.reference",
    "inverse_displacement": "diffeo_engine.targets",
    "load_generated": "diffeo_engine.generate",
    "mode_mask": "diffeo_engine.physics",
    "move_boxes": "diffeo_engine.targets",
    "move_keypoints": "diffeo_engine.targets",
    "perturb": "diffeo_engine.ops",
    "pixel_variance": "diffeo_engine.physics",
    "sample_coefficients": "diffeo_engine.reference",
    "sample_displacement": "diffeo_engine.targets",
    "temperature_range": "diffeo_engine.physics",
    "typical_displacement": "diffeo_engine.physics",
    "typical_temperature": "diffeo_engine.physics",
    "verify": "diffeo_engine.generate",
    "warp": "diffeo_engine.reference",
    "warp_mask": "diffeo_engine.targets",
}

__all__ = [
    "Diffeo",
    "DiffeoPair",
    "DiffeoParams",
    "Perturbation",
    "SensitivityMeter",
    "SensitivityResult",
    "__version__",
    "deform",
    "displacement_field",
    "inverse_displacement",
    "load_generated",
    "mode_mask",
    "move_boxes",
    "move_keypoints",
    "perturb",
    "pixel_variance",
    "sample_coefficients",
    "sample_displacement",
    "temperature_range",
    "typical_displacement",
    "typical_temperature",
    "verify",
    "warp",
    "warp_mask",
]

if TYPE_CHECKING:
    from diffeo_engine.generate import load_generated, verify
    from diffeo_engine.ops import deform, perturb
    from diffeo_engine.physics import (
        mode_mask,
        pixel_variance,
        temperature_range,
        typical_displacement,
        typical_temperature,
    )
    from diffeo_engine.reference import displacement_field, sample_coefficients, warp
    from diffeo_engine.sensitivity import SensitivityMeter, SensitivityResult
    from diffeo_engine.targets import (
        inverse_displacement,
        move_boxes,
        move_keypoints,
        sample_displacement,
        warp_mask,
    )
    from diffeo_engine.transforms import Diffeo, DiffeoPair, DiffeoParams, Perturbation


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'diffeo_engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
