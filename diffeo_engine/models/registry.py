"""The model registry: ``get_model("name", **kwargs)``, ``list_models()``, ``register_model``.

Built-in names are the papers' networks (registered by the family modules of this package).
``"torchvision:NAME"`` and ``"timm:NAME"`` build a model of those packages when they are
installed, always without pretrained weights unless the caller asks for them (nothing is
downloaded by default).
"""

from __future__ import annotations

import fnmatch
import importlib
import inspect
from collections.abc import Callable

import torch
from torch import nn

from diffeo_engine.physics import check_seed

__all__ = ["get_model", "list_models", "model_parameters", "register_model"]

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
_EXTERNAL = ("torchvision", "timm")


def register_model(name=None, *, overwrite: bool = False):
    """Register a factory (a function or an ``nn.Module`` class) under ``name``.

    Usable bare (``@register_model``: the factory's ``__name__``) or with a name
    (``@register_model("vgg11")``). A name may not contain ``":"`` (reserved for
    ``torchvision:``/``timm:``); registering a taken name needs ``overwrite=True``.
    """

    def decorate(factory, key=name):
        if not callable(factory):
            raise TypeError(f"register_model: expected a callable factory, got {factory!r}")
        key = factory.__name__ if key is None else key
        if not isinstance(key, str) or not key or ":" in key:
            raise ValueError(f"name: expected a non-empty string without ':', got {key!r}")
        if key in _REGISTRY and not overwrite and _REGISTRY[key] is not factory:
            raise ValueError(f"name: {key!r} is already registered (pass overwrite=True)")
        _REGISTRY[key] = factory
        return factory

    if callable(name) and not isinstance(name, str):  # bare @register_model
        factory, name = name, None
        return decorate(factory)
    return decorate


def _ensure_builtins() -> None:
    importlib.import_module("diffeo_engine.models")  # the families register on import


def list_models(pattern: str | None = None) -> list[str]:
    """Sorted built-in model names, optionally filtered by a glob ``pattern``.

    ``torchvision:NAME`` / ``timm:NAME`` are accepted by :func:`get_model` but not listed.
    """
    _ensure_builtins()
    names = sorted(_REGISTRY)
    if pattern is not None:
        if not isinstance(pattern, str):
            raise TypeError(f"pattern: expected a glob string, got {pattern!r}")
        names = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
    return names


def model_parameters(name: str) -> list[str] | None:
    """The keyword arguments the built-in model ``name`` accepts, or None when it is not a
    built-in name or takes ``**kwargs`` (the CLI fills ``in_channels``/``input_size`` from
    the data when they are accepted and not given)."""
    if not isinstance(name, str) or ":" in name:
        return None
    _ensure_builtins()
    factory = _REGISTRY.get(name)
    return None if factory is None else _keyword_names(factory)


def _keyword_names(factory) -> list[str] | None:
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):
        return None
    params = signature.parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return [
        p.name
        for p in params
        if p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]


def _check_kwargs(name: str, factory, kwargs: dict) -> None:
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # builtins without a signature: let the call decide
        return
    params = signature.parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return
    accepted = [
        p.name
        for p in params
        if p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    for key in kwargs:
        if key not in accepted:
            raise TypeError(
                f"{key}: not an argument of model {name!r}; it accepts {', '.join(accepted)}"
            )


def _external(package: str, model_name: str, kwargs: dict) -> nn.Module:
    try:
        module = importlib.import_module(package)
    except ImportError as err:
        raise ImportError(
            f"name: '{package}:{model_name}' needs the {package} package, which is not "
            f"installed (pip install {package})"
        ) from err
    if not model_name:
        raise ValueError(f"name: expected '{package}:NAME' with a model name after the colon")
    if package == "torchvision":
        kwargs.setdefault("weights", None)
        return module.models.get_model(model_name, **kwargs)
    kwargs.setdefault("pretrained", False)
    return module.create_model(model_name, **kwargs)


def get_model(name: str, *, seed: int | None = None, **kwargs) -> nn.Module:
    """Build the model registered as ``name`` with ``kwargs``.

    With ``seed`` the initial weights are drawn under ``torch.manual_seed(seed)`` inside a
    forked RNG, so they are reproducible and the global RNG state is left untouched.
    Unknown names raise ``ValueError`` listing the available ones; unknown keyword
    arguments raise ``TypeError`` listing the accepted ones.
    """
    if not isinstance(name, str):
        raise TypeError(f"name: expected a model name (str), got {type(name).__name__}")
    if seed is not None:
        check_seed(seed)
    package, sep, rest = name.partition(":")
    if sep:
        if package not in _EXTERNAL:
            raise ValueError(
                f"name: expected 'torchvision:NAME', 'timm:NAME' or a built-in name, got {name!r}"
            )

        def build() -> nn.Module:
            return _external(package, rest, dict(kwargs))

    else:
        _ensure_builtins()
        if name not in _REGISTRY:
            raise ValueError(
                f"name: unknown model {name!r}; available: {', '.join(sorted(_REGISTRY))} "
                "(and 'torchvision:NAME' / 'timm:NAME' when installed)"
            )
        factory = _REGISTRY[name]
        _check_kwargs(name, factory, kwargs)

        def build() -> nn.Module:
            return factory(**kwargs)

    if seed is None:
        return build()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()
