"""The command line's spelling of the API's argument names, for one-line errors.

An error raised by the library begins with the argument it names (``cut: expected ...``);
a command shows it with the flag the user typed (``--cut: expected ...``). One table for
every command; a command passes the names it spells otherwise (``show`` takes its image as
``IMAGE``, ``verify`` its data set as ``DIR``).
"""

from __future__ import annotations

__all__ = ["FLAGS", "spelled", "spelled_error"]

FLAGS = {
    "T": "--T", "cut": "--cut", "seed": "--seed", "batch_size": "--batch-size",
    "device": "--device", "out": "--out", "backend": "--backend", "interp": "--interp",
    "noise": "--noise", "resize": "--resize", "size": "--size", "index": "--index",
    "per_image": "--per-image", "perturbations_per_image": "--per-image",
    "error_groups": "--error-groups", "reduce": "--reduce", "metric": "--metric",
    "estimator": "--estimator", "layers": "--layers", "limit": "--limit",
    "timeout_s": "--dist-timeout", "dtypes": "--dtypes", "providers": "--providers",
    "shapes": "--shapes", "docs": "--merge", "targets": "--targets", "input": "--input",
    "labels": "--labels", "dtype": "--dtype", "shard_size": "--shard-size",
    "resume": "--resume", "allow_nonfinite": "--allow-nonfinite",
}  # fmt: skip


def spelled(text: str, overrides: dict[str, str] | None = None) -> str:
    """``text`` with its leading argument names (``cut: ...``, ``T, cut: ...``) written as
    flags (``FLAGS``, then ``overrides``); other text is left as it is."""
    head, sep, rest = text.partition(": ")
    flags = FLAGS if not overrides else {**FLAGS, **overrides}
    names = head.split(", ")
    if not sep or not all(name in flags for name in names):
        return text
    return ", ".join(dict.fromkeys(flags[name] for name in names)) + ": " + rest


def spelled_error(error: Exception, overrides: dict[str, str] | None = None) -> Exception:
    """The same kind of error with its message :func:`spelled`."""
    text = spelled(str(error), overrides)
    return error if text == str(error) else type(error)(text)
