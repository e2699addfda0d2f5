"""The kernels compiled for an H100 (sm_90) with the installed Triton, on a machine without a
GPU: compile errors the interpreter cannot see fail here, and the static cost report's
parser, loop accounting and issue 11's targets are checked on real SASS.

Each case goes through ``kernels.perturb.launches`` (the launcher's own grid, arguments and
constexprs, on ``meta`` tensors) and Triton's JIT binder, so integer specialisations
(an argument equal to 1 becomes a constant) are the ones a launch would get. The suite
runs with ``TRITON_INTERPRET=1`` (conftest), under which ``triton.jit`` makes interpreted
functions, so the compiling happens in one subprocess without it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")

from diffeo_engine.benchmark import static  # noqa: E402
from diffeo_engine.kernels import perturb as kernels  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
Case = static.StaticCase

# Every constexpr value of the launcher at least once, and arguments equal to 1 (B, C,
# seed, strides, one tile) that Triton turns into constants.
CI_CASES = [
    Case((1, 1, 2, 2), torch.float32, cut=1, seed=1),  # resident, one channel, H = 2
    Case(
        (3, 3, 17, 23),
        torch.uint8,
        torch.uint8,
        cut=3,
        noise=0.1,
        interp="nearest",
        layout="channels_last",
    ),
    Case((2, 5, 40, 70), torch.bfloat16, cut=32, noise="matched"),  # tiled matched noise
    Case((1, 3, 32, 32), torch.float16, cut=64, noise=None),  # resident, EVEN, dot field
    Case((2, 4, 64, 128), torch.float32, cut=8, noise="matched"),  # tiled, EVEN
]

EXHAUSTIVE = [
    Case((2, 3, H, W), dtype, out, cut=cut, noise=noise, interp=interp)
    for (dtype, out) in [
        (torch.uint8, None),
        (torch.uint8, torch.uint8),
        (torch.float16, None),
        (torch.bfloat16, None),
        (torch.float32, None),
    ]
    for (H, W) in [(32, 32), (100, 130)]
    for cut in (3, 15, 64)
    for noise in ("matched", 0.2, None)
    for interp in ("bilinear", "nearest")
    # every constexpr value with every dtype; the remaining products only for float32
    if dtype == torch.float32 or (interp == "bilinear" and noise != 0.2 and H == 32)
]

# Issue 11's targets, read off the report of the real sm_90 binary.
TARGET_CASE = Case((4096, 3, 32, 32), torch.float32, cut=3, noise="matched")
NO_SPILL_CASES = [
    Case((256, 3, 224, 224), dtype, cut=cut, noise=noise)
    for dtype in (torch.float32, torch.uint8, torch.bfloat16)
    for cut in (3, 15)
    for noise in ("matched", None)
]

_SCRIPT = """
import json, sys, torch
from diffeo_engine.benchmark import static
cases, report = eval(sys.argv[1], {"torch": torch, "Case": static.StaticCase})
out = {"compiled": [], "report": None}
for case in cases:
    try:
        for launch in static.case_launches(case):
            assert static.compile_launch(launch, 90).asm["cubin"]
        out["compiled"].append([case.name, None])
    except Exception as error:
        out["compiled"].append([case.name, f"{type(error).__name__}: {error}"[:2000]])
if report:
    out["report"] = static.static_report(report, capabilities=(90,))
print(json.dumps(out))
"""


def _compile(cases, report=()) -> dict:
    """Compile ``cases`` for sm_90 (and report on ``report``) in a non-interpreting child."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    arg = repr(([_spell(c) for c in cases], [_spell(c) for c in report]))
    arg = arg.replace("'", "")
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT, arg], capture_output=True, text=True, env=env, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def _spell(case: Case) -> str:
    fields = ", ".join(
        f"{f.name}={_value(getattr(case, f.name))}" for f in static.dataclasses.fields(case)
    )
    return f"Case({fields})"


def _value(v) -> str:
    return str(v) if isinstance(v, torch.dtype) else repr(v).replace("'", '"')


@pytest.fixture(scope="module")
def compiled() -> dict:
    return _compile(CI_CASES, report=[CI_CASES[1], TARGET_CASE])


def test_every_launch_compiles_for_sm90(compiled):
    failed = [(name, error) for name, error in compiled["compiled"] if error]
    assert not failed, failed
    assert len(compiled["compiled"]) == len(CI_CASES)


@pytest.mark.slow
def test_every_variant_compiles_for_sm90_exhaustive():
    doc = _compile(EXHAUSTIVE)
    failed = [(name, error) for name, error in doc["compiled"] if error]
    assert not failed, failed


@pytest.mark.parametrize("shape", [(1, 1, 1, 5), (1, 1, 5, 1), (2, 3, 1, 1)])
def test_check_launchable_refuses_what_cannot_compile(shape):
    """``H == 1`` or ``W == 1``: Triton specialises them to constants and the kernels do
    not compile (``(H - 1).to(tl.float32)`` on a Python int); refused with one line."""
    images = torch.empty(shape, device="meta")
    with pytest.raises(ValueError, match=r"H, W >= 2"):
        kernels.check_launchable(images, 3)


def test_grids_are_one_dimensional_and_limited():
    """Every grid is 1-D (2**31 - 1 programs; the 65535 limit of a second axis never
    applies), a batch beyond it is refused in one line, and a bad G is named."""
    for case in CI_CASES:
        assert all(len(launch.grid) == 1 for launch in static.case_launches(case))
    n = 2**20
    images = torch.empty((n, 1, 224, 224), device="meta")
    T = torch.empty(n, device="meta")
    ids = torch.empty(n, dtype=torch.int64, device="meta")
    tau = torch.empty_like(images)
    kw = dict(cut=3, seed=0, noise=None, interp="nearest")
    assert kernels.launches(images, T, ids, tau, None, **kw)[-1].grid == (n * 7 * 7,)
    big = torch.empty((2**27, 1, 224, 224), device="meta")
    with pytest.raises(ValueError, match="at most 2147483647 programs"):
        kernels.launches(big, T, ids, big, None, **kw)
    for bad, error in ((0, ValueError), (2.0, TypeError), (True, TypeError)):
        with pytest.raises(error, match="programs_per_image"):
            kernels.launches(images, T, ids, tau, None, programs_per_image=bad, **kw)


def test_static_report_parses_real_sass(compiled):
    """Registers, spills, the mix and the dynamic count of one small case on sm_90: every
    class of the mix is counted, global stores are there, and the loops were matched."""
    record = compiled["report"]["results"][0]
    for launch in record["launches"]:
        assert 0 < launch["registers"] <= 255
        assert launch["ptxas_check_registers"] == launch["registers"]
        assert launch["spill_store_bytes"] is not None
        assert sum(launch["static_mix"].values()) == launch["static_instructions"]
        assert launch["static_mix"].get("global store", 0) > 0
        assert launch["loops_matched"], "the launcher's loop trips do not match the SASS loops"
    assert record["dynamic_instructions_per_channel_pixel"] > 0
    est = record["model_estimate"]
    assert "model estimate" in est["label"] and 0 < est["fraction_of_copy"] <= 1
    assert "MODEL ESTIMATE" in static.format_static_table(compiled["report"])


def test_issue_11_targets_for_3x32x32_matched_cut3(compiled):
    """3x32x32 float32, B = 4096, matched noise, cut 3 on sm_90: at most 128 registers, no
    spills, at most 90 dynamic instructions per output channel-pixel (88.3 with Triton 3.9).
    Triton 3.6 compiles the same source to 91.4: a known miss (bench/NOTES.md), held here
    so that it cannot grow."""
    record = compiled["report"]["results"][1]
    assert record["case"] == TARGET_CASE.name
    assert record["spill_bytes"] == 0
    assert record["max_registers"] <= 128, record["max_registers"]
    version = tuple(int(p) for p in triton.__version__.split(".")[:2])
    bound = 90 if version >= (3, 9) else 92
    assert record["dynamic_instructions_per_channel_pixel"] <= bound


def test_sass_loop_accounting_on_a_listing():
    """Loop trips multiply the instructions inside; a loop that stores nothing (a libdevice
    slow path) and the branch around it count zero."""
    listing = "\n".join(
        [
            "/*0000*/ MOV R1, c[0x0][0x28] ;",
            "/*0010*/ IADD3 R2, R2, 0x1, RZ ;",  # outer loop start
            "/*0020*/ @!P0 BRA 0x60 ;",  # guard around the slow path
            "/*0030*/ LDG.E.CONSTANT R3, desc[UR4][R4.64] ;",  # slow loop start
            "/*0040*/ IADD3 R5, R5, 0x1, RZ ;",
            "/*0050*/ @P1 BRA 0x30 ;",  # slow loop end
            "/*0060*/ STG.E.128 desc[UR4][R6.64], R8 ;",
            "/*0070*/ @P2 BRA 0x10 ;",  # outer loop end
            "/*0080*/ EXIT ;",
            "/*0090*/ BRA 0x90 ;",
        ]
    )
    cost = static.sass_cost(listing, ((5, ()),))
    assert cost["loops_matched"] and cost["slow_path_loops"] == 1
    # MOV and EXIT once; IADD3, BRA guard, STG, BRA back 5 times; slow path 0; self-loop 0
    assert cost["dynamic_per_thread"] == 2 + 5 * 4
    assert cost["global_access_widths_per_thread"] == {"LDG.32": 0, "STG.128": 5}
