"""A small, deterministic trainer: SGD or Adam on a hinge or cross-entropy loss, and weight
files.

Tomasini et al. (2022/23) train with SGD on the hinge loss ``relu(1 - y f(x))`` on ``+-1``
labels, with a ridge penalty on the weights, until some multiple of the epoch at which the
training loss first vanishes (``penalty``, ``stop_loss``, ``post_interpolation``); Petrini
et al. (2021) train with SGD (momentum 0.9, weight decay 5e-4, cosine schedule) or Adam on
the cross-entropy and keep the checkpoint with the best test accuracy (``keep_best``).
:func:`train` does either, for a number of epochs or of steps, and returns a
:class:`TrainHistory`. Shuffling uses a ``torch.Generator``
seeded by ``seed`` and dropout runs under a forked, seeded RNG, so a run depends only on
its arguments and the model's initial weights (draw those with ``get_model(..., seed=)``)
and the global RNG state is left as it was.

:func:`save_weights` writes safetensors (``.safetensors``, or any other suffix when the
package is installed) or a ``torch.save`` state dict (``.pt``/``.pth``/``.bin``) that
``torch.load(..., weights_only=True)`` reads; :func:`load_weights` reads either.
"""

from __future__ import annotations

import importlib.util
import math
import os
import pickle
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from diffeo_engine.physics import check_choice, check_float, check_int, check_seed

__all__ = [
    "TrainHistory",
    "evaluate",
    "hinge_loss",
    "load_weights",
    "save_weights",
    "train",
]

LOSSES = ("hinge", "cross_entropy")
OPTIMIZERS = ("sgd", "adam")
_TORCH_SUFFIXES = (".pt", ".pth", ".bin")


# ----------------------------------------------------------------------------- losses


def hinge_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean of ``relu(1 - y f(x))`` for scores ``(B,)`` or ``(B, 1)`` and labels ``+-1``."""
    return F.relu(1 - _scores(output) * target.to(output.dtype)).mean()


def _scores(output: torch.Tensor) -> torch.Tensor:
    if output.dim() == 2 and output.shape[1] == 1:
        output = output[:, 0]
    if output.dim() != 1:
        raise ValueError(
            f"model output: the hinge loss expects one score per sample, shape (B,) or (B, 1), "
            f"got {tuple(output.shape)}"
        )
    return output


def _check_targets(loss: str, target: torch.Tensor) -> None:
    if loss == "hinge":
        if not bool(((target == 1) | (target == -1)).all()):
            raise ValueError("targets: the hinge loss expects labels +1 / -1")
    elif target.is_floating_point() or target.dim() != 1:
        raise ValueError(
            "targets: cross-entropy expects integer class indices of shape (B,), "
            f"got dtype {target.dtype} and shape {tuple(target.shape)}"
        )


def _loss_and_errors(loss: str, output, target) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean loss and number of misclassified samples of a batch."""
    if loss == "hinge":
        scores = _scores(output)
        return hinge_loss(scores, target), (scores * target.to(scores.dtype) <= 0).sum()
    return F.cross_entropy(output, target), (output.argmax(1) != target).sum()


# ----------------------------------------------------------------------------- data


def _as_loader_source(data, name: str):
    """``(X, y)`` tensors, or a map-style ``Dataset`` of ``(x, y)`` samples."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(map(torch.is_tensor, data)):
        X, y = data
        if X.shape[0] != y.shape[0]:
            raise ValueError(
                f"{name}: expected as many targets as inputs, got {X.shape[0]} and {y.shape[0]}"
            )
        if X.shape[0] == 0:
            raise ValueError(f"{name}: expected at least one sample")
        return X, y
    if hasattr(data, "tensors") and callable(data.tensors):  # e.g. ScaleDetection
        return _as_loader_source(data.tensors(), name)
    if isinstance(data, Dataset) and hasattr(data, "__len__"):
        if len(data) == 0:
            raise ValueError(f"{name}: expected at least one sample")
        return data
    raise TypeError(
        f"{name}: expected a pair (inputs, targets) of tensors or a map-style Dataset, "
        f"got {type(data).__name__}"
    )


def _batches(source, batch_size: int, generator: torch.Generator | None):
    """Yield ``(x, y)`` batches, shuffled by ``generator`` (in order when ``None``)."""
    if isinstance(source, tuple):
        X, y = source
        n = X.shape[0]
        order = torch.randperm(n, generator=generator) if generator is not None else None
        for start in range(0, n, batch_size):
            index = (
                order[start : start + batch_size]
                if order is not None
                else slice(start, start + batch_size)
            )
            yield X[index], y[index]
        return
    loader = DataLoader(
        source, batch_size=batch_size, shuffle=generator is not None, generator=generator
    )
    for x, y in loader:
        yield x, torch.as_tensor(y)


def _n_samples(source) -> int:
    return source[0].shape[0] if isinstance(source, tuple) else len(source)


# ----------------------------------------------------------------------------- history


@dataclass
class TrainHistory:
    """Per-epoch records of a :func:`train` run (the last epoch may be partial).

    ``loss``/``error`` are the mean training loss (without the ``penalty``) and the
    fraction of misclassified training samples over each epoch's batches (as the model
    stood at each batch); ``penalty`` is the mean penalty term (empty without one);
    ``test_loss``/``test_error`` are measured after the epoch when test data were given.
    ``interpolation_epoch`` is the first epoch whose loss was ``<= stop_loss`` (0 if none);
    ``best_epoch`` the epoch whose weights were kept with ``keep_best`` (0: not used).
    """

    epoch: list[int] = field(default_factory=list)
    step: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    error: list[float] = field(default_factory=list)
    penalty: list[float] = field(default_factory=list)
    test_loss: list[float] = field(default_factory=list)
    test_error: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    steps: int = 0
    stopped: str = ""
    interpolation_epoch: int = 0
    best_epoch: int = 0
    settings: dict = field(default_factory=dict)

    @property
    def final_loss(self) -> float:
        return self.loss[-1] if self.loss else math.nan

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- training


def _resolve_device(model: nn.Module, device) -> torch.device:
    if device is not None:
        return torch.device(device)
    param = next(iter(model.parameters()), None)
    return param.device if param is not None else torch.device("cpu")


@torch.no_grad()
def evaluate(
    model: nn.Module, data, *, loss: str = "hinge", batch_size: int = 1024, device=None
) -> tuple[float, float]:
    """``(mean loss, error fraction)`` of ``model`` on ``data``, in eval mode (restored)."""
    loss = check_choice("loss", loss, LOSSES)
    batch_size = check_int("batch_size", batch_size, 1)
    source = _as_loader_source(data, "data")
    device = _resolve_device(model, device)
    was_training = model.training
    model.eval()
    total, wrong, n = 0.0, 0, 0
    try:
        for x, y in _batches(source, batch_size, None):
            x, y = x.to(device), y.to(device)
            _check_targets(loss, y)
            value, errors = _loss_and_errors(loss, model(x), y)
            total += float(value) * x.shape[0]
            wrong += int(errors)
            n += x.shape[0]
    finally:
        model.train(was_training)
    return total / n, wrong / n


def train(
    model: nn.Module,
    data,
    *,
    loss: str = "hinge",
    epochs: int | None = None,
    steps: int | None = None,
    batch_size: int = 64,
    lr: float = 0.1,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    decay_parameters=None,
    schedule: str = "constant",
    optimizer: str = "sgd",
    seed: int = 0,
    device=None,
    test_data=None,
    stop_loss: float | None = None,
    post_interpolation: float = 1.0,
    penalty: Callable[[nn.Module], torch.Tensor] | None = None,
    keep_best: bool = False,
    callback: Callable[[dict], None] | None = None,
) -> TrainHistory:
    """Train ``model`` in place; return its :class:`TrainHistory`.

    ``data`` (and ``test_data``) is a pair ``(inputs, targets)`` of tensors, an object with
    a ``tensors()`` method (such as ``ScaleDetection``) or a map-style ``Dataset``. Give
    ``epochs`` or ``steps`` (one epoch by default); these bound the run. ``optimizer`` is
    ``sgd`` (with ``momentum``, ``weight_decay``) or ``adam`` (with ``weight_decay``);
    ``decay_parameters`` (parameters of ``model``) limits the weight decay to them. With
    plain SGD, ``weight_decay = 2 c`` on ``W`` is the gradient of the ridge term ``c
    ||W||^2`` added to the loss, applied in place (cheaper than a ``penalty``).
    ``schedule`` is ``constant`` or ``cosine`` (decay to 0 over ``epochs``/``steps``).
    ``penalty(model)`` is added to each batch's loss for the gradient only (the recorded
    loss and ``stop_loss`` see the loss without it): Tomasini et al.'s ridge term.

    ``stop_loss``: with ``n*`` the first epoch whose mean training loss is ``<= stop_loss``,
    stop at the first epoch ``n >= post_interpolation * n*`` whose loss is again ``<=
    stop_loss`` (``stop_loss=0`` and ``post_interpolation=1`` is "until the hinge loss
    vanishes"; Tomasini et al.'s released code waits ``500 n*`` with the ridge).
    ``keep_best`` (needs ``test_data``) restores at the end the weights of the epoch with
    the lowest test error (the first of equals), Petrini et al.'s best-test checkpoint.
    ``callback`` receives each epoch's record. The model's train/eval mode is restored.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    loss = check_choice("loss", loss, LOSSES)
    if epochs is not None and steps is not None:
        raise ValueError("epochs, steps: expected one of them, got both")
    epochs = check_int("epochs", epochs, 1) if epochs is not None else None
    steps = check_int("steps", steps, 1) if steps is not None else None
    if epochs is None and steps is None:
        epochs = 1
    batch_size = check_int("batch_size", batch_size, 1)
    lr = check_float("lr", lr, 0.0, strict=True)
    momentum = check_float("momentum", momentum, 0.0)
    weight_decay = check_float("weight_decay", weight_decay, 0.0)
    schedule = check_choice("schedule", schedule, ("constant", "cosine"))
    optimizer_name = check_choice("optimizer", optimizer, OPTIMIZERS)
    if optimizer_name == "adam" and momentum:
        raise ValueError("momentum: not used by optimizer='adam' (its betas are the defaults)")
    seed = check_seed(seed)
    stop_loss = check_float("stop_loss", stop_loss, 0.0, allow_none=True)
    post_interpolation = check_float("post_interpolation", post_interpolation, 1.0)
    if post_interpolation != 1.0 and stop_loss is None:
        raise ValueError("post_interpolation: needs stop_loss (the loss that marks interpolation)")
    if penalty is not None and not callable(penalty):
        raise TypeError(f"penalty: expected a callable model -> tensor, got {penalty!r}")
    if not isinstance(keep_best, bool):
        raise TypeError(f"keep_best: expected a bool, got {keep_best!r}")
    if keep_best and test_data is None:
        raise ValueError("keep_best: needs test_data (the best checkpoint is the best test one)")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback: expected a callable, got {callback!r}")
    source = _as_loader_source(data, "data")
    test_source = None if test_data is None else _as_loader_source(test_data, "test_data")
    if isinstance(source, tuple):
        _check_targets(loss, source[1])
    device = _resolve_device(model, device)
    model.to(device)

    per_epoch = math.ceil(_n_samples(source) / batch_size)
    total_steps = steps if steps is not None else epochs * per_epoch
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model: has no trainable parameters")
    groups: list[dict] = [{"params": params}]
    if decay_parameters is not None:
        chosen = {id(p) for p in decay_parameters}
        if not chosen <= {id(p) for p in params}:
            raise ValueError("decay_parameters: expected trainable parameters of the model")
        groups = [
            {"params": [p for p in params if id(p) in chosen]},
            {"params": [p for p in params if id(p) not in chosen], "weight_decay": 0.0},
        ]
    if optimizer_name == "adam":
        opt = torch.optim.Adam(groups, lr=lr, weight_decay=weight_decay)
    else:
        opt = torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    history = TrainHistory(
        settings=dict(
            loss=loss, epochs=epochs, steps=steps, batch_size=batch_size, lr=lr,
            momentum=momentum, weight_decay=weight_decay,
            decay_parameters=None if decay_parameters is None else "some", schedule=schedule,
            optimizer=optimizer_name, seed=seed, stop_loss=stop_loss,
            post_interpolation=post_interpolation, penalty=penalty is not None,
            keep_best=keep_best,
        )
    )  # fmt: skip
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    cuda = [device.index or 0] if device.type == "cuda" else []
    step, epoch = 0, 0
    best_error, best_state = math.inf, None
    try:
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(seed)
            while step < total_steps:
                epoch += 1
                model.train()
                total, wrong, seen, extra = 0.0, 0, 0, 0.0
                for x, y in _batches(source, batch_size, generator):
                    if step >= total_steps:
                        break
                    if schedule == "cosine":
                        for group in opt.param_groups:
                            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total_steps))
                    x, y = x.to(device), y.to(device)
                    if not isinstance(source, tuple):
                        _check_targets(loss, y)
                    opt.zero_grad(set_to_none=True)
                    value, errors = _loss_and_errors(loss, model(x), y)
                    objective = value
                    if penalty is not None:
                        term = penalty(model)
                        objective = value + term
                        extra += float(term.detach()) * x.shape[0]
                    if not torch.isfinite(objective):
                        raise FloatingPointError(
                            f"training diverged at step {step} (loss {float(value)}); lower lr"
                        )
                    objective.backward()
                    opt.step()
                    step += 1
                    total += float(value.detach()) * x.shape[0]
                    wrong += int(errors)
                    seen += x.shape[0]
                record = dict(
                    epoch=epoch, step=step, loss=total / seen, error=wrong / seen,
                    lr=opt.param_groups[0]["lr"],
                )  # fmt: skip
                if penalty is not None:
                    record["penalty"] = extra / seen
                if test_source is not None:
                    record["test_loss"], record["test_error"] = evaluate(
                        model, test_source, loss=loss, device=device
                    )
                    if keep_best and record["test_error"] < best_error:
                        best_error = record["test_error"]
                        best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                        history.best_epoch = epoch
                for key, value in record.items():
                    getattr(history, key).append(value)
                if callback is not None:
                    callback(record)
                if stop_loss is not None and record["loss"] <= stop_loss:
                    if not history.interpolation_epoch:
                        history.interpolation_epoch = epoch
                    if epoch >= post_interpolation * history.interpolation_epoch:
                        history.stopped = "stop_loss"
                        break
        if best_state is not None:
            model.load_state_dict(best_state)
    finally:
        model.train(was_training)
    history.steps = step
    history.stopped = history.stopped or ("steps" if steps is not None else "epochs")
    return history


# ----------------------------------------------------------------------------- weight files


def _has_safetensors() -> bool:
    return importlib.util.find_spec("safetensors") is not None


def save_weights(model: nn.Module, path, *, format: str = "auto") -> str:
    """Write ``model``'s state dict to ``path``; return the format used.

    ``format``: ``safetensors``, ``torch`` (``torch.save`` of the state dict, readable with
    ``weights_only=True``) or ``auto`` (by suffix: ``.safetensors`` -> safetensors,
    ``.pt``/``.pth``/``.bin`` -> torch, else safetensors when installed, torch otherwise).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a file path, got {type(path).__name__}")
    format = check_choice("format", format, ("auto", "safetensors", "torch"))
    path = os.fspath(path)
    if format == "auto":
        suffix = os.path.splitext(path)[1].lower()
        if suffix == ".safetensors":
            format = "safetensors"
        elif suffix in _TORCH_SUFFIXES:
            format = "torch"
        else:
            format = "safetensors" if _has_safetensors() else "torch"
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if format == "safetensors":
        if not _has_safetensors():
            raise ImportError(
                "format: safetensors is not installed (pip install safetensors); "
                "use a .pt path or format='torch'"
            )
        from safetensors.torch import save_file

        # tensors shared between names (tied weights) are stored once per name
        save_file({k: v.clone() for k, v in state.items()}, path)
    else:
        torch.save(state, path)
    return format


def load_weights(model: nn.Module, path, *, strict: bool = True, device=None) -> nn.Module:
    """Load a file written by :func:`save_weights` (either format, told apart by content)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a file path, got {type(path).__name__}")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"path: no such file {path!r}")
    with open(path, "rb") as handle:
        head = handle.read(4)
    device = _resolve_device(model, device)
    if head.startswith(b"PK"):  # torch.save's zip container
        try:
            state = torch.load(path, map_location=device, weights_only=True)
        except pickle.UnpicklingError:
            raise ValueError(
                f"path: {path!r} is not a state dict of tensors: it holds pickled Python "
                "objects, which are not loaded (save model.state_dict() instead)"
            ) from None
        except (RuntimeError, EOFError, ValueError) as error:  # a damaged zip, ...
            first = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise ValueError(f"path: {path!r} is not a saved state dict: {first[:200]}") from None
        if not isinstance(state, dict):
            raise ValueError(f"path: {path!r} holds a {type(state).__name__}, not a state dict")
    else:
        if not _has_safetensors():
            raise ImportError(f"path: {path!r} is not a torch file and safetensors is missing")
        from safetensors.torch import load_file

        state = load_file(path, device=str(device))
    model.load_state_dict(state, strict=strict)
    return model
