"""The software versions a result was produced with, recorded beside every result file."""

from __future__ import annotations

import importlib
import platform

__all__ = ["versions"]

_OPTIONAL = ("triton", "matplotlib", "kornia")


def versions(*, detail: bool = False) -> dict:
    """``diffeo_engine``, ``torch``, ``numpy`` and ``python`` versions.

    ``detail=True`` adds the platform, torch's thread count, the CUDA runtime torch was
    built with, and the versions of the optional packages (``None`` where not installed).
    """
    import numpy
    import torch

    import diffeo_engine

    found = {
        "diffeo_engine": diffeo_engine.__version__,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
    }
    if not detail:
        return found
    found.update(
        platform=platform.platform(),
        torch_threads=torch.get_num_threads(),
        cuda_runtime=torch.version.cuda,
    )
    for name in _OPTIONAL:
        try:
            found[name] = importlib.import_module(name).__version__
        except ImportError:
            found[name] = None
    return found
