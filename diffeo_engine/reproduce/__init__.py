"""``diffeo-engine reproduce``: the published claims, measured on a CPU in minutes.

One module per experiment, each appending to one claims table
(:class:`~diffeo_engine.reproduce.claims.Claims`) with thresholds fixed in its code before
any outcome was seen; a claim that does not reproduce is printed as FAIL with its numbers.

* :mod:`.analytical`: claim 1, the constant-filter model of Tomasini, Petrini, Cagnetta,
  Wyart (2022/23);
* :mod:`.scale_detection`: claims 2-3, scale detection in the authors' convention;
* :mod:`.real_images`: claim 4 (CIFAR-10 nets, with ``--cifar10`` and ``--weights``) and
  the exploratory MNIST LeNet run 4x;
* :mod:`.mnist`: the MNIST data (the packaged test set), training recipe and measurements
  shared by 4x, N1-N3 and P1-P3;
* :mod:`.petrini2021`: N1-N3, relative stability of the output (Petrini et al. 2021);
* :mod:`.ruderman`: P1-P3, pooling vs strided convolutions (Ruderman et al. 2018);
* :mod:`.figures`: the PNGs; :mod:`.run`: :func:`run_reproduction` and the command.

Verdicts over seeds need a margin of two standard errors (``INCONCLUSIVE`` otherwise); the
default run judges what fits in about five minutes on two cores, ``--full`` every claim.

``results.json``: ``claims`` (``{id, claim, statement, expected, measured, verdict,
experiment, values, thresholds, quick_note}``), ``experiments`` (settings, per-layer
records, training summaries, figure files, seconds), ``settings``, ``versions``,
``seconds``.
"""

from diffeo_engine.reproduce.analytical import (
    ANALYTICAL,
    EXPONENT_TOLERANCE,
    AnalyticalCase,
    ShiftByOne,
    analytical_case,
    experiment_analytical,
    spread_one_hot,
)
from diffeo_engine.reproduce.claims import Claims, SeedEstimate, claims_table, judge
from diffeo_engine.reproduce.mnist import (
    LEARNED_MAX_ERROR,
    MnistData,
    MnistTraining,
    use_batch_statistics,
)
from diffeo_engine.reproduce.real_images import experiment_cifar10, experiment_mnist
from diffeo_engine.reproduce.run import add_command, parse_weights, run_reproduction
from diffeo_engine.reproduce.scale_detection import (
    POST_INTERPOLATION,
    R_DROP,
    RIDGE,
    SCALE_DEFAULT,
    SCALE_QUICK,
    SCALE_SEEDS,
    TANH_LOG_FRACTION,
    TRAINING_EFFECT,
    ScaleSettings,
    experiment_scale_detection,
)

__all__ = [
    "ANALYTICAL",
    "EXPONENT_TOLERANCE",
    "LEARNED_MAX_ERROR",
    "POST_INTERPOLATION",
    "RIDGE",
    "R_DROP",
    "SCALE_DEFAULT",
    "SCALE_QUICK",
    "SCALE_SEEDS",
    "TANH_LOG_FRACTION",
    "TRAINING_EFFECT",
    "AnalyticalCase",
    "Claims",
    "MnistData",
    "MnistTraining",
    "ScaleSettings",
    "SeedEstimate",
    "ShiftByOne",
    "add_command",
    "analytical_case",
    "claims_table",
    "experiment_analytical",
    "experiment_cifar10",
    "experiment_mnist",
    "experiment_scale_detection",
    "judge",
    "parse_weights",
    "run_reproduction",
    "spread_one_hot",
    "use_batch_statistics",
]
