"""The fast CPU path, opt-in: the reference's own cores compiled by ``torch.compile``.

The eager reference spends its time in the Philox stream (ten rounds of int64 tensor
arithmetic, one pass over memory per operation) and in the gather warp; compiled by
Inductor into one C++ loop nest the same code runs several times faster on a CPU.
Nothing is re-implemented: :func:`call` runs exactly the function it is given, compiled
where :func:`enabled` (``DIFFEO_ENGINE_COMPILE=1``, CPU tensors, no autograd graph to
record, not already traced) or as plain PyTorch. Philox integers are identical either
way; floats agree to rounding (Inductor's vectorised ``log``/``sin``/``cos`` and
contractions are not eager PyTorch's), so within one process keep one setting: an image's
output does not depend on its batch within a path, but differs in the last bits between
paths.

Why opt-in (``bench/NOTES.md``): no extra package, but a C++ compiler at run time and a
first call of 30-70 s per graph on a loaded 2-core machine (one graph per ``interp`` and
function, more for batches of one), paid again by every fresh process with a cold
Inductor cache. Without a working compiler the failure is reported once and the eager
path is used from then on.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable

import torch

__all__ = ["ENV", "call", "enabled"]

ENV = "DIFFEO_ENGINE_COMPILE"  # "1": compile on CPU; unset or "0": the eager reference

_compiled: dict[Callable, Callable] = {}
_failed: list[str] = []


def enabled(*tensors: torch.Tensor) -> bool:
    """Whether :func:`call` compiles for these inputs: CPU tensors, not already being traced
    by an outer ``torch.compile``, no autograd graph to record, not switched off."""
    if os.environ.get(ENV, "0") != "1" or _failed or torch.compiler.is_compiling():
        return False
    if any(t.device.type != "cpu" for t in tensors):
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def _compile(fn: Callable) -> Callable:
    if fn not in _compiled:
        # Inductor's bound checks on the gathers stay on: a NaN displacement must raise,
        # never read outside the image.
        _compiled[fn] = torch.compile(fn, dynamic=True, fullgraph=True)
    return _compiled[fn]


def call(fn: Callable, *args, **static):
    """``fn(*args, **static)``, compiled where :func:`enabled` says so.

    Tensors in ``args`` are traced with dynamic sizes (one graph for every batch and image
    size); ``static`` holds the few Python values a graph is specialised on (``interp``).
    """
    tensors = [a for a in args if torch.is_tensor(a)]
    if not enabled(*tensors):
        return fn(*args, **static)
    compiled = _compile(fn)
    try:
        with (
            torch._dynamo.config.patch(recompile_limit=64, accumulated_recompile_limit=1024),
            torch.fx.experimental._config.patch(backed_size_oblivious=True, use_duck_shape=False),
        ):
            return compiled(*args, **static)
    except Exception as error:  # no C++ compiler, an Inductor bug: fall back, say it once
        if not _is_compile_failure(error):
            raise
        _failed.append(f"{type(error).__name__}: {error}".splitlines()[0])
        warnings.warn(
            f"diffeo_engine: torch.compile of the CPU path failed ({_failed[0]}); using the "
            f"eager reference from now on (set {ENV}=0 to skip the attempt)",
            RuntimeWarning,
            stacklevel=3,
        )
        return fn(*args, **static)


def _is_compile_failure(error: Exception) -> bool:
    module = type(error).__module__ or ""
    return module.startswith(("torch._dynamo", "torch._inductor")) or isinstance(
        error, (OSError, ImportError)
    )
