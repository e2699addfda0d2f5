"""Layer-wise sensitivities ``D_k``, ``G_k``, ``R_k`` (design.md section 2), streamed.

``SensitivityMeter(model, layers, T, cut)`` hooks the chosen layers, ``update(images)``
folds each batch into float64 sums, ``compute()`` returns a :class:`SensitivityResult`.
"""

from diffeo_engine.sensitivity.hooks import select_modules
from diffeo_engine.sensitivity.meter import (
    REDUCTIONS,
    NonFiniteActivationError,
    SensitivityMeter,
    reduce_features,
)
from diffeo_engine.sensitivity.result import LayerRecord, SensitivityResult

__all__ = [
    "REDUCTIONS",
    "LayerRecord",
    "NonFiniteActivationError",
    "SensitivityMeter",
    "SensitivityResult",
    "reduce_features",
    "select_modules",
]
