"""diffeo-engine: max-entropy diffeomorphisms, matched noise, and layer-wise sensitivities.

The public API of design.md section 5, re-exported; nothing is defined here.
"""

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
from diffeo_engine.transforms import Diffeo, DiffeoPair, Perturbation

__version__ = "0.1.0"

__all__ = [
    "Diffeo",
    "DiffeoPair",
    "Perturbation",
    "SensitivityMeter",
    "SensitivityResult",
    "__version__",
    "deform",
    "displacement_field",
    "load_generated",
    "mode_mask",
    "perturb",
    "pixel_variance",
    "sample_coefficients",
    "temperature_range",
    "typical_displacement",
    "typical_temperature",
    "verify",
    "warp",
]
