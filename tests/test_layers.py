"""The package's layers (design.md section 4): data flows one way, no module reaches up.

Every ``diffeo_engine`` import in every module, lazy ones inside functions included, must
point at a layer no higher than the importer's. A new module must be given a layer here.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "diffeo_engine"

# lowest first; a module belongs to the longest prefix listed
LAYERS: list[tuple[str, ...]] = [
    ("physics", "rng", "progress", "versions", "distributed", "flags"),
    ("reference", "kernels", "targets"),
    ("operators",),
    ("ops",),
    ("transforms", "data", "models"),
    ("sensitivity", "pictures"),
    ("generate", "benchmark", "reproduce", "sensitivity.command"),
    ("cli", "__main__"),
]
# what the top-level package defines itself rather than re-exports
OWN_NAMES = {"__version__"}


def layer_of(module: str) -> int:
    """The layer of ``diffeo_engine.<module>``, by its longest listed prefix."""
    best, found = -1, None
    for level, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and len(name) > best:
                best, found = len(name), level
    if found is None:
        raise KeyError(module)
    return found


def _imports(path: pathlib.Path, module: str) -> set[str]:
    """``diffeo_engine`` submodules imported anywhere in the file (relative ones resolved)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("diffeo_engine."))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(parts + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name == "diffeo_engine" or node.module is None:  # from X import submodule
                found.update(f"{name}.{a.name}" for a in node.names)
            elif name.startswith("diffeo_engine."):
                found.add(name)
    return found


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if module != "diffeo_engine.__init__":  # the public API re-exports every layer
            yield path, module.removesuffix(".__init__")


@pytest.mark.parametrize("path, module", list(_modules()), ids=lambda v: str(v))
def test_no_module_imports_a_higher_layer(path, module):
    own = layer_of(module.removeprefix("diffeo_engine."))
    for target in _imports(path, module):
        name = target.removeprefix("diffeo_engine.")
        if name in OWN_NAMES:
            continue
        assert layer_of(name) <= own, (
            f"{module} (layer {own}) imports {target} (layer {layer_of(name)}): "
            "lower layers never import higher ones"
        )


def test_the_map_knows_every_module_and_catches_a_violation(tmp_path):
    for _, module in _modules():
        layer_of(module.removeprefix("diffeo_engine."))  # raises KeyError if unmapped
    bad = tmp_path / "physics.py"
    bad.write_text("def f():\n    from diffeo_engine import cli\n")
    assert _imports(bad, "diffeo_engine.physics") == {"diffeo_engine.cli"}
    assert layer_of("cli") > layer_of("physics")
    rel = tmp_path / "hooks.py"
    rel.write_text("from ..generate import run\nfrom . import meter\n")
    assert _imports(rel, "diffeo_engine.sensitivity.hooks") == {
        "diffeo_engine.generate",
        "diffeo_engine.sensitivity.meter",
    }
