"""The suite's random inputs (root ``conftest.py``): one seed per run, printed and replayable;
each test's draws depend on that seed and its own id, not on which tests ran before it."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

DRAWS = """
import json, os, random
import numpy as np
import torch

def _record(name):
    with open(os.environ["DRAWS_OUT"], "a") as f:
        draw = [torch.rand(2).tolist(), float(np.random.rand()), random.random()]
        f.write(json.dumps([name, draw]) + "\\n")

def test_first():
    _record("first")

def test_second():
    _record("second")
"""


def _run(tmp_path: Path, seed: int, *selection: str) -> tuple[dict, str]:
    out = tmp_path / f"draws-{seed}-{len(selection)}.jsonl"
    env = {**os.environ, "DIFFEO_TEST_SEED": str(seed), "DRAWS_OUT": str(out),
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "conftest", "-p", "no:cacheprovider",
         *selection],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return dict(json.loads(line) for line in out.read_text().splitlines()), done.stdout


def test_a_run_seed_replays_each_test_alone_and_in_any_order(tmp_path):
    (tmp_path / "test_draws.py").write_text(DRAWS)
    both, header = _run(tmp_path, 12345, "test_draws.py")
    assert "DIFFEO_TEST_SEED=12345" in header
    assert both["first"] != both["second"]  # each test its own stream
    alone, _ = _run(tmp_path, 12345, "test_draws.py::test_second")
    assert alone["second"] == both["second"]  # not moved by the test that ran before it
    other, _ = _run(tmp_path, 54321, "test_draws.py")
    assert all(other[name][i] != both[name][i] for name in both for i in range(3))
