"""Choosing the layers to measure and hooking them: forward hooks, no model surgery.

A layer is chosen by a glob pattern over the names of ``model.named_modules()``
(``"layer1.*"``, ``"features.3"``), by module type (``nn.Conv2d`` or the string
``"type:Conv2d"``), or as ``"leaves"`` (every module without children). Two pseudo-layers
are always available: ``"input"`` (the images as the network sees them) and ``"output"``
(the network's return value).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

__all__ = ["INPUT", "LEAVES", "OUTPUT", "LayerHooks", "first_tensor", "select_modules"]

INPUT, OUTPUT, LEAVES = "input", "output", "leaves"
TYPE_PREFIX = "type:"


def _type_matches(module: nn.Module, type_name: str) -> bool:
    return any(cls.__name__ == type_name for cls in type(module).__mro__)


def _as_list(layers) -> list:
    if layers is None:
        return [LEAVES]
    if isinstance(layers, (str, type)):
        return [layers]
    if isinstance(layers, Iterable):
        return list(layers)
    raise TypeError(
        "layers: expected a glob pattern, a module type, 'leaves', or a list of them, "
        f"got {type(layers).__name__}"
    )


def select_modules(model: nn.Module, layers) -> tuple[list[tuple[str, nn.Module]], bool]:
    """The ``(name, module)`` pairs chosen by ``layers`` in ``named_modules()`` order, and
    whether the ``"input"`` pseudo-layer was asked for.

    Every pattern must match something: a pattern that matches nothing raises a
    ``ValueError`` listing some names that exist.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    named = [(name, module) for name, module in model.named_modules() if name]
    chosen: dict[str, nn.Module] = {}
    want_input = False
    for spec in _as_list(layers):
        if isinstance(spec, type):
            if not issubclass(spec, nn.Module):
                raise TypeError(f"layers: expected an nn.Module subclass, got {spec!r}")
            hits = [(n, m) for n, m in named if isinstance(m, spec)]
            what = f"modules of type {spec.__name__}"
        elif isinstance(spec, str):
            if spec == INPUT:
                want_input = True
                continue
            if spec == OUTPUT:
                continue  # the output is always measured
            if spec == LEAVES:
                hits = [(n, m) for n, m in named if next(m.children(), None) is None]
                what = "leaf modules"
            elif spec.startswith(TYPE_PREFIX):
                type_name = spec[len(TYPE_PREFIX) :]
                hits = [(n, m) for n, m in named if _type_matches(m, type_name)]
                what = f"modules of type {type_name!r}"
            else:
                hits = [(n, m) for n, m in named if fnmatch.fnmatchcase(n, spec)]
                what = f"module names matching {spec!r}"
        else:
            raise TypeError(
                "layers: expected glob patterns (str) or nn.Module types, "
                f"got {type(spec).__name__}: {spec!r}"
            )
        if not hits and spec != LEAVES:  # a model without children: output only
            names = [n for n, _ in named]
            shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
            raise ValueError(
                f"layers: no {what} in {type(model).__name__}; "
                f"its modules are: {shown or '(none)'}; pseudo-layers: 'input', 'output'"
            )
        for name, module in hits:
            chosen.setdefault(name, module)
    order = {name: i for i, (name, _) in enumerate(named)}
    return sorted(chosen.items(), key=lambda item: order[item[0]]), want_input


def first_tensor(value, where: str) -> torch.Tensor:
    """The tensor a module returned: the value itself, or the first tensor of a tuple/list
    (as for modules returning ``(output, state)``), or of a dict's values."""
    if torch.is_tensor(value):
        return value
    items: Sequence = ()
    if isinstance(value, (tuple, list)):
        items = value
    elif isinstance(value, dict):
        items = list(value.values())
    for item in items:
        if torch.is_tensor(item):
            return item
    raise TypeError(
        f"layer {where!r}: expected its output to be a tensor (or a tuple/dict holding one), "
        f"got {type(value).__name__}"
    )


class LayerHooks:
    """Forward hooks on the chosen modules calling ``sink(site_name, module, tensor)``.

    A module called several times in one forward pass (a shared ReLU, say) gives one site
    per call: ``name`` for the first, ``name#1``, ``name#2``, ... for the next ones.
    ``reset()`` must be called before each forward pass. ``remove()`` takes every hook off.
    """

    def __init__(
        self,
        modules: list[tuple[str, nn.Module]],
        sink: Callable[[str, nn.Module, torch.Tensor], None],
    ) -> None:
        self._sink = sink
        self._calls: dict[str, int] = {}
        self._handles = [
            module.register_forward_hook(self._make_hook(name)) for name, module in modules
        ]

    def _make_hook(self, name: str):
        def hook(module: nn.Module, inputs, output) -> None:
            call = self._calls.get(name, 0)
            self._calls[name] = call + 1
            site = name if call == 0 else f"{name}#{call}"
            self._sink(site, module, first_tensor(output, site))

        return hook

    def reset(self) -> None:
        self._calls.clear()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
