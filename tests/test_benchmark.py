"""CPU smoke of diffeo_engine.benchmark: the bytes model, the providers' semantics, the
JSON of run_benchmarks and the ``bench`` subcommand end to end (tiny shapes, one round)."""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffeo_engine import benchmark as bm
from diffeo_engine import reference
from diffeo_engine.benchmark import device as bm_device

ROOT = Path(__file__).resolve().parents[1]
TINY = [(3, 2, 6, 7)]
FAST = ["fused", "fused-deform", "torch-reference", "grid_sample", "published-loop", "kornia"]


def test_pair_bytes_by_hand():
    # 3x32x32 float32: read 12 KiB, write 2 x 12 KiB = 36 KiB (design.md section 6).
    assert bm.pair_bytes((3, 32, 32), torch.float32) == 36 * 1024
    assert bm.pair_bytes((3, 32, 32), "float32", "float32") == 36864
    assert bm.pair_bytes((3, 32, 32), torch.bfloat16) == 3072 * 2 * 3
    # uint8 in, float32 out (the default for uint8): 3072 + 2 * 3072 * 4.
    assert bm.pair_bytes((3, 32, 32), torch.uint8) == 27648
    assert bm.pair_bytes((4096, 3, 32, 32), torch.float32) == 4096 * 36864
    assert bm.deform_bytes((3, 32, 32), torch.float32) == 24576
    assert bm.deform_bytes((1, 28, 28), torch.uint8) == 784 * 5
    assert bm.deform_bytes((1, 28, 28), torch.uint8, torch.uint8) == 784 * 2
    with pytest.raises(TypeError, match="dtype"):
        bm.pair_bytes((3, 32, 32), "float99")


def _images(dtype, B=5, C=3, H=12, W=17):
    gen = torch.Generator().manual_seed(7)
    if dtype == torch.uint8:
        return torch.randint(0, 256, (B, C, H, W), generator=gen).to(torch.uint8)
    return torch.rand((B, C, H, W), generator=gen).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8])
def test_grid_sample_pipeline_equals_reference(dtype):
    images = _images(dtype)
    B = images.shape[0]
    T, cut, seed = 0.02, 5, 11  # displacements of a few pixels, reaching the border
    coeffs = reference.sample_coefficients(B, cut, T, seed=seed)
    tau, noisy = bm.grid_sample_perturb(images, T, cut, coeffs=coeffs)
    expected = reference.deform(images, T, cut, seed=seed, out_dtype=torch.float32)
    x = images.to(torch.float32)
    span = float(x.max() - x.min())
    assert tau.dtype == noisy.dtype == torch.float32
    assert (expected - x).abs().max() > 0.1 * span  # the warp is not trivial
    assert (tau - expected).abs().max() <= 1e-4 * span
    change = (tau - x).flatten(1).norm(dim=1)
    eta = (noisy - x).flatten(1).norm(dim=1)
    torch.testing.assert_close(eta, change, rtol=1e-5, atol=1e-6)


def test_grid_sample_pipeline_draws_its_own_coefficients():
    images = _images(torch.bfloat16, B=3)
    tau, noisy = bm.grid_sample_perturb(images, 0.01, 3)
    assert tau.shape == noisy.shape == images.shape
    assert tau.dtype == noisy.dtype == torch.bfloat16


def test_published_loop_equals_reference_for_the_same_fields():
    images = _images(torch.float32)
    B, _, H, W = images.shape
    coeffs = reference.sample_coefficients(B, 4, 0.03, seed=5)
    displacement = reference.displacement_field(coeffs, H, W)
    expected = reference.warp(images, displacement)
    got = bm.published_loop_warp(images, displacement)
    span = float(images.max() - images.min())
    assert (got - expected).abs().max() <= 1e-5 * span
    # Integer displacements (corners exactly on pixels: floor == ceil) agree too.
    whole = displacement.round()
    torch.testing.assert_close(bm.published_loop_warp(images, whole), reference.warp(images, whole))


def test_published_loop_perturb_matches_noise_norms():
    images = _images(torch.uint8, B=3)
    tau, noisy = bm.published_loop_perturb(images, 0.02, 3)
    x = images.to(torch.float32)
    assert tau.dtype == torch.float32 and tau.shape == images.shape
    torch.testing.assert_close(
        (noisy - x).flatten(1).norm(dim=1), (tau - x).flatten(1).norm(dim=1), rtol=1e-5, atol=1e-5
    )


def test_fused_is_skipped_where_triton_cannot_run(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    items = bm.plan(TINY, ["float32"], [3], ["fused", "fused-deform", "grid_sample"], "cpu")
    skips = {item.provider: item.skip for item in items}
    assert "TRITON_INTERPRET=1" in skips["fused"] and "CUDA" in skips["fused"]
    assert skips["fused-deform"] == skips["fused"]
    assert skips["grid_sample"] is None
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert bm.plan(TINY, ["float32"], [3], ["fused"], "cpu")[0].skip is None


def test_plan_validates_and_runs_the_published_loop_at_small_batch():
    with pytest.raises(ValueError, match="providers"):
        bm.plan(TINY, ["float32"], [3], ["nope"], "cpu")
    with pytest.raises(ValueError, match="dtypes"):
        bm.plan(TINY, ["int7"], [3], ["grid_sample"], "cpu")
    items = bm.plan([(300, 1, 4, 4), (500, 1, 4, 4)], ["float32"], [3], ["published-loop"], "cpu")
    assert [i.case.batch for i in items] == [256, 256]
    assert items[0].skip is None and "measured already" in items[1].skip


def test_telemetry_says_what_is_missing(monkeypatch):
    info = bm.device_info("cpu")
    assert info["host"]["torch_threads"] == torch.get_num_threads()
    assert info["versions"]["torch"] == torch.__version__
    assert info["nvml"] == {"available": False, "reason": "not a CUDA device"}
    sampler = bm.ClockSampler("cpu")
    with sampler:
        pass
    assert sampler.summary() == {"available": False, "reason": "not a CUDA device"}
    monkeypatch.setitem(sys.modules, "pynvml", None)
    nvml, why = bm_device._nvml()
    assert nvml is None and "nvidia-ml-py is not installed" in why


def test_time_callable_on_cpu():
    calls = []
    timing = bm.time_callable(lambda: calls.append(1), "cpu", warmup_s=0.001, reps=5)
    assert timing["timer"] == "perf_counter" and timing["reps"] >= 3
    assert timing["p20_s"] <= timing["median_s"] <= timing["p80_s"]
    assert timing["min_s"] <= timing["p20_s"] and timing["p80_s"] <= timing["max_s"]
    assert len(calls) >= timing["warmup_calls"] + timing["reps"] * timing["inner"]
    smoke = bm.time_callable(lambda: None, "cpu", smoke=True)
    assert smoke["reps"] == 1 and smoke["inner"] == 1


def _check_schema(doc, providers):
    assert {"device", "copy_bandwidth_GBps", "results"} <= set(doc)
    assert doc["copy_bandwidth_GBps"] > 0
    assert doc["device"]["name"] and doc["device"]["versions"]["diffeo_engine"]
    json.dumps(doc)  # plain JSON throughout
    assert {r["provider"] for r in doc["results"]} == set(providers)
    for r in doc["results"]:
        for key in ("provider", "shape", "dtype", "cut", "pairs_per_s", "effective_GBps"):
            assert key in r
        assert 0 < r["pairs_per_s_min"] <= r["pairs_per_s"] <= r["pairs_per_s_max"]
        bytes_model = bm.pair_bytes if r["kind"] == "pair" else bm.deform_bytes
        assert r["bytes_per_pair"] == bytes_model(r["shape"], r["in_dtype"], r["out_dtype"])
        assert r["effective_GBps"] == pytest.approx(r["pairs_per_s"] * r["bytes_per_pair"] / 1e9)
        assert r["fraction_of_copy"] == pytest.approx(
            r["effective_GBps"] / doc["copy_bandwidth_GBps"]
        )


def test_run_benchmarks_json_schema(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    doc = bm.run_benchmarks(TINY, ["float32", "uint8"], [3], FAST, device="cpu", smoke=True)
    ran = [p for p in FAST if p != "kornia" or bm.PROVIDERS["kornia"].unavailable("cpu") is None]
    _check_schema(doc, ran)
    assert len(doc["results"]) == 2 * len(ran)
    by = {(r["provider"], r["dtype"]): r for r in doc["results"]}
    assert by[("grid_sample", "uint8->float32")]["bytes_per_pair"] == 2 * 6 * 7 * 9
    for name in ("fused", "torch-reference", "published-loop"):
        r = by[(name, "float32")]
        assert r["vs_grid_sample"] == pytest.approx(
            r["pairs_per_s"] / by[("grid_sample", "float32")]["pairs_per_s"]
        )
    assert "vs_grid_sample" not in by[("fused-deform", "float32")]
    assert by[("fused-deform", "float32")]["kind"] == "deform"
    if "kornia" not in ran:
        reasons = [s["reason"] for s in doc["skipped"] if s["provider"] == "kornia"]
        assert reasons and all("kornia is not installed" in r for r in reasons)
    table = bm.format_table(doc)
    assert "grid_sample" in table and "copy bandwidth" in table
    grid = by[("grid_sample", "float32")]
    spread = f"{grid['pairs_per_s_min']:.3g}-{grid['pairs_per_s_max']:.3g}"
    assert "min-max" in table and spread in table


def test_merge_results():
    doc = bm.run_benchmarks(TINY, ["float32"], [3], ["grid_sample"], device="cpu", smoke=True)
    other = bm.run_benchmarks(TINY, ["float32"], [3], ["torch-reference"], device="cpu", smoke=True)
    merged = bm.merge_results([doc, other])
    assert len(merged["results"]) == 2 and len(merged["parts"]) == 2
    ref = next(r for r in merged["results"] if r["provider"] == "torch-reference")
    grid = next(r for r in merged["results"] if r["provider"] == "grid_sample")
    assert ref["vs_grid_sample"] == pytest.approx(ref["pairs_per_s"] / grid["pairs_per_s"])
    assert ref["copy_bandwidth_GBps"] == other["copy_bandwidth_GBps"]


def _parser():
    parser = argparse.ArgumentParser(prog="diffeo-engine")
    bm.add_command(parser.add_subparsers(dest="command"))
    return parser


def test_bench_subcommand_end_to_end(tmp_path, capsys):
    out = tmp_path / "run.json"
    args = _parser().parse_args(
        [
            *("bench", "--smoke", "--device", "cpu"),
            *("--providers", "grid_sample,torch-reference", "published-loop"),
            *("--shapes", "2x1x6x6", "--dtypes", "float32", "bfloat16"),
            *("--cut", "3", "15", "--out", str(out)),
        ]
    )
    assert args.run(args) == 0
    doc = json.loads(out.read_text())
    _check_schema(doc, ["grid_sample", "torch-reference", "published-loop"])
    assert len(doc["results"]) == 3 * 2 * 2
    assert doc["settings"]["smoke"] is True
    printed = capsys.readouterr().out
    assert "published-loop" in printed and "bfloat16" in printed
    assert out.with_suffix(".md").read_text().startswith("device:")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "no plot" in printed
    else:
        assert out.with_suffix(".png").stat().st_size > 0

    # --merge writes the combined document; a folder as --out gets <gpu>-<date>.json.
    folder = tmp_path / "results"
    folder.mkdir()
    args = _parser().parse_args(["bench", "--merge", str(out), "--out", str(folder), "--no-plot"])
    assert args.run(args) == 0
    (written,) = folder.glob("*.json")
    assert written.name == bm.result_filename(doc)
    assert written.name.startswith("cpu-")
    assert len(json.loads(written.read_text())["results"]) == 12


def test_bench_command_rejects_bad_shapes():
    with pytest.raises(SystemExit):
        _parser().parse_args(["bench", "--shapes", "3x32x32"])


@pytest.mark.slow
def test_grid_sample_compiled_runs_or_skips_cleanly():
    doc = bm.run_benchmarks(
        [(2, 1, 5, 6)], ["float32"], [3], ["grid_sample", "grid_sample-compiled"],
        device="cpu", smoke=True,
    )  # fmt: skip
    compiled = [r for r in doc["results"] if r["provider"] == "grid_sample-compiled"]
    if compiled:
        assert compiled[0]["vs_grid_sample"] > 0
    else:
        (skip,) = [s for s in doc["skipped"] if s["provider"] == "grid_sample-compiled"]
        assert skip["reason"].startswith("skipped: torch.compile")


def test_bench_suite_smoke(tmp_path):
    """The pytest-benchmark suite collects and runs in smoke mode (one case per kind)."""
    out = tmp_path / "suite.json"
    env = {**os.environ, "DIFFEO_BENCH_SMOKE": "1", "DIFFEO_BENCH_DEVICE": "cpu"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    wanted = "grid_sample-4x3x8x8-uint8-cut3 or published-loop-4x3x8x8-float32-cut15"
    run = subprocess.run(
        [
            *(sys.executable, "-m", "pytest", "bench/test_bench_perturb.py", "-q"),
            *("-p", "no:cacheprovider", "-k", wanted, f"--benchmark-json={out}"),
        ],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["diffeo_engine"]["copy_bandwidth_GBps"] > 0
    assert len(doc["benchmarks"]) == 2
    for bench in doc["benchmarks"]:
        info = bench["extra_info"]
        assert info["pairs_per_s"] > 0 and info["fraction_of_copy"] > 0
        assert info["telemetry"] == {"available": False, "reason": "not a CUDA device"}


class _FakeNVML:
    """Just enough of pynvml for ClockSampler (no GPU here)."""

    NVML_CLOCK_SM, NVML_CLOCK_MEM, NVML_TEMPERATURE_GPU = 1, 2, 0

    class _Memory:
        used = 123 << 20

    @staticmethod
    def nvmlDeviceGetClockInfo(handle, kind):
        return 1980 if kind == 1 else 2619

    @staticmethod
    def nvmlDeviceGetPowerUsage(handle):
        return 350_000  # mW

    @staticmethod
    def nvmlDeviceGetTemperature(handle, kind):
        return 61

    @classmethod
    def nvmlDeviceGetMemoryInfo(cls, handle):
        return cls._Memory()


def test_clock_sampler_summarises_nvml_samples(monkeypatch):
    monkeypatch.setattr(bm_device, "_nvml", lambda: (_FakeNVML, None))
    monkeypatch.setattr(bm_device, "_nvml_handle", lambda nvml, device: "handle")
    sampler = bm.ClockSampler("cuda", interval_s=0.001)
    with sampler:
        bm.time.sleep(0.02)
    summary = sampler.summary()
    assert summary["available"] and summary["samples"] >= 2
    assert summary["sm_clock_MHz"] == {"min": 1980, "median": 1980, "max": 1980}
    assert summary["mem_clock_MHz"]["median"] == 2619
    assert summary["power_W"]["max"] == 350.0 and summary["temperature_C"]["min"] == 61
    assert summary["memory_used_bytes_max"] == 123 << 20


def test_bench_static_command_writes_json_and_table(tmp_path):
    """``bench --static`` end to end in a non-interpreting child (it compiles for sm_90)."""
    pytest.importorskip("triton")
    out = tmp_path / "static-x.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    cmd = [sys.executable, "-m", "diffeo_engine", "bench", "--static", "--targets", "90"]
    cmd += ["--shapes", "2x1x8x8", "--dtypes", "uint8", "--cut", "3", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "MODEL ESTIMATE" in done.stdout and "2x1x8x8-uint8->float32-cut3-matched" in done.stdout
    doc = json.loads(out.read_text())
    assert [r["case"] for r in doc["results"]] == [
        "2x1x8x8-uint8->float32-cut3-matched",
        "2x1x8x8-uint8->float32-cut3-deform",
    ]
    assert all(r["target"] == "sm_90" and r["max_registers"] > 0 for r in doc["results"])
    assert "model estimate" in doc["label"] and out.with_suffix(".md").exists()
