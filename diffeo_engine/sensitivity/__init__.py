"""Layer-wise sensitivities ``D_k``, ``G_k``, ``R_k`` (design.md section 2), streamed.

``SensitivityMeter(model, layers, T, cut)`` hooks the chosen layers, ``update(images)``
folds each batch into float64 sums, ``compute()`` returns a :class:`SensitivityResult`.
``metric="cosine"`` gives Ruderman et al.'s (2018) normalised cosine sensitivity,
``estimator="median"`` Petrini et al.'s (2021) median estimator.
"""

from diffeo_engine.sensitivity.hooks import select_modules
from diffeo_engine.sensitivity.meter import (
    ESTIMATORS,
    METRICS,
    REDUCTIONS,
    NonFiniteActivationError,
    SensitivityMeter,
    reduce_features,
)
from diffeo_engine.sensitivity.result import LayerRecord, SensitivityResult

__all__ = [
    "ESTIMATORS",
    "METRICS",
    "REDUCTIONS",
    "LayerRecord",
    "NonFiniteActivationError",
    "SensitivityMeter",
    "SensitivityResult",
    "reduce_features",
    "select_modules",
]
