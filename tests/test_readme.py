"""The README stays true: CI runs its test command verbatim, and its Python examples run."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def quick_start_commands() -> list[str]:
    section = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, re.S)]


def test_quick_start_has_exactly_two_commands_and_ci_runs_the_second():
    commands = quick_start_commands()
    assert len(commands) == 2
    assert all("\n" not in command for command in commands)
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert commands[1] in ci_lines


def test_quick_start_says_cpu_or_gpu_before_the_commands_and_names_no_host():
    section = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    before = section.split("```bash", 1)[0]
    assert "CPU-only machine" in before and "GPU machine" in before
    assert "torch==2.13.0" in before  # the CPU step CI takes (.ci/run), said in words
    assert "python -m pip install torch==2.13.0" in (ROOT / ".ci" / "run").read_text()
    assert not re.search(r"https?://|www\.", README)


def test_the_first_command_installs_matplotlib_so_reproduce_draws_its_figures():
    """``reproduce`` writes figures only with matplotlib: the command's extra must bring it."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    first = quick_start_commands()[0]
    match = re.search(r'pip install "?\.\[([a-z,]+)\]"? && diffeo-engine reproduce$', first)
    assert match, first
    wanted = []
    for extra in match.group(1).split(","):
        wanted += project["optional-dependencies"][extra]
    assert any(req.startswith("matplotlib") for req in wanted + project["dependencies"])
    assert not any("nvidia" in req for req in wanted + project["dependencies"])


@pytest.mark.slow
def test_python_examples_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the examples write their result files here
    namespace: dict = {}
    for block in re.findall(r"```python\n(.*?)```", README, re.S):
        exec(compile(block, "README.md", "exec"), namespace)
