"""``import diffeo_engine`` stays light: no Triton, no Inductor, no Dynamo until used."""

import json
import os
import subprocess
import sys

import pytest

HEAVY = ("triton", "torch._inductor", "torch._dynamo")


def _loaded_after(code: str) -> list[str]:
    """The heavy modules loaded by ``code`` in a fresh interpreter (this checkout first)."""
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    env.pop("TRITON_INTERPRET", None)
    report = f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    probe = f"{code}\nimport json, sys\n{report}"
    out = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_loads_neither_triton_nor_inductor():
    assert _loaded_after("import diffeo_engine") == []


@pytest.mark.parametrize("name", ["perturb", "Diffeo", "sample_coefficients"])
def test_public_names_resolve_without_triton(name):
    loaded = _loaded_after(f"import diffeo_engine as de\nassert callable(de.{name})")
    assert "triton" not in loaded and "torch._inductor" not in loaded


def test_every_public_name_resolves():
    import diffeo_engine as de

    for name in de.__all__:
        assert getattr(de, name) is not None
    assert set(de.__all__) <= set(dir(de))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        de.nope  # noqa: B018
