"""Whole jobs across processes (Gloo, CPU), launched as users launch them.

``torchrun`` (``python -m torch.distributed.run``) runs ``diffeo_engine sensitivity`` and
``generate`` on 2 and 3 processes; their output is compared with a single process's run of
the same command: the sensitivities to 1e-9 relative (errors included), the generated
shards and manifest byte for byte. A rank killed mid-run (the generate fault hook), started
with torchrun's variables but without torchrun's agent (which would kill the others
itself), must make the survivor fail with a clear error within the short timeout, and the
run must then resume to the same bytes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from diffeo_engine.cli import main as cli_main
from diffeo_engine.distributed import TIMEOUT_ENV, distributed_session
from diffeo_engine.generate import FAULT_ENV, MANIFEST, generate, read_manifest, verify
from diffeo_engine.sensitivity import SensitivityMeter

MODELS = Path(__file__).with_name("test_sensitivity_models.py")
N_IMAGES = 40
SENSITIVITY = ["--T", "0.01", "0.03", "--cut", "3", "--seed", "5", "--batch-size", "3"]
SENSITIVITY += ["--per-image", "2", "--error-groups", "7", "--no-plot", "--no-progress"]
SENSITIVITY += ["--model-arg", "dtype=float32"]  # float32: batches must be the same too
GENERATE = dict(T=0.02, cut=3, per_image=2, seed=11, shard_size=7, batch_size=3)  # 12 shards
GENERATE_CLI = ["--T", "0.02", "--cut", "3", "--per-image", "2", "--seed", "11"]
GENERATE_CLI += ["--shard-size", "7", "--batch-size", "3", "--device", "cpu", "--quiet"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """40 small (8x9) RGB uint8 images with structure, so deformations change pixels."""
    y, x = np.meshgrid(np.arange(8), np.arange(9), indexing="ij")
    k = np.arange(N_IMAGES)[:, None, None, None]
    c = np.arange(3)[None, None, None, :]
    waves = 127.5 + 120 * np.sin((1 + k % 5) * x[None, ..., None] / 2.0 + c + k)
    noise = np.random.default_rng(0).integers(0, 15, (N_IMAGES, 8, 9, 3))
    images = np.clip(waves * np.cos(y[None, ..., None] / 3.0) ** 2 + noise, 0, 255)
    path = tmp_path_factory.mktemp("data") / "images.npy"
    np.save(path, images.astype(np.uint8))
    return path


def torchrun(nproc: int, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node", str(nproc), "-m", "diffeo_engine", *args]
    environment = {**os.environ, TIMEOUT_ENV: "60", **(env or {})}
    done = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


# -------------------------------------------------------------------------- sensitivity


def _sensitivity_args(data: Path, out: Path) -> list[str]:
    model = f"{MODELS}:tiny_cnn"
    return ["sensitivity", "--model", model, "--data", str(data), "--out", str(out), *SENSITIVITY]


@pytest.fixture(scope="module")
def one_process_sensitivity(data, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("sensitivity") / "single"
    assert cli_main(_sensitivity_args(data, out)) == 0
    return json.loads((out / "sensitivity.json").read_text())


def _assert_same_records(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want) > 0
    for mine, theirs in zip(got, want):
        assert mine.keys() == theirs.keys()
        for key, expected in theirs.items():
            value = mine[key]
            if isinstance(expected, float) and not isinstance(expected, bool):
                assert value == pytest.approx(expected, rel=1e-9, abs=0), (mine["name"], key)
            else:
                assert value == expected, (mine["name"], key)


@pytest.mark.parametrize("nproc", [2, 3])
def test_sensitivity_under_torchrun_equals_one_process(
    nproc, data, one_process_sensitivity, tmp_path
):
    out = tmp_path / "multi"
    done = torchrun(nproc, *_sensitivity_args(data, out))
    got = json.loads((out / "sensitivity.json").read_text())
    want = one_process_sensitivity
    _assert_same_records(got["layers"], want["layers"])
    assert {r["count"] for r in got["layers"]} == {N_IMAGES}
    assert all(r["D_err"] > 0 for r in got["layers"])  # errors exist and agree (above)
    assert got["settings"]["images"] == N_IMAGES
    assert got["settings"]["processes"] == nproc
    assert done.stdout.count(f"{N_IMAGES} images on {nproc} processes") == 1  # rank 0 only
    assert sorted(p.name for p in out.iterdir()) == ["sensitivity.csv", "sensitivity.json"]


def _meter_worker(rank, world_size, port, models, results):
    """Library use: uneven shares in unaligned batches, the last rank with no images."""
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    sys.path.insert(0, models)
    from test_sensitivity_models import tiny_cnn

    images = torch.rand(11, 3, 8, 8, generator=torch.Generator().manual_seed(7))
    shares = {0: range(0, 7), 1: range(7, 11), 2: range(11, 11)}
    with distributed_session("cpu", timeout_s=60) as ctx:
        meter = SensitivityMeter(tiny_cnn(), T=0.02, cut=3, seed=9, error_groups=4)
        share = shares[rank]
        for start in range(share.start, share.stop, 3):
            stop = min(start + 3, share.stop)
            meter.update(images[start:stop] * 10 + 100, start=start)  # a large mean
        result = meter.compute(distributed=ctx)
        results[rank] = [vars(r) for r in result.layers]
        results[f"{rank}-local"] = meter.count


def test_meter_compute_distributed_equals_one_pass():
    results = mp.Manager().dict()
    mp.start_processes(
        _meter_worker,
        args=(3, free_port(), str(MODELS.parent), results),
        nprocs=3,
        start_method="spawn",
    )
    sys.path.insert(0, str(MODELS.parent))
    from test_sensitivity_models import tiny_cnn

    images = torch.rand(11, 3, 8, 8, generator=torch.Generator().manual_seed(7))
    with SensitivityMeter(tiny_cnn(), T=0.02, cut=3, seed=9, error_groups=4) as meter:
        for start in range(0, 11, 5):  # other batches: the float64 model makes no odds
            meter.update(images[start : start + 5] * 10 + 100)
        want = [vars(r) for r in meter.compute().layers]
    assert [results[f"{r}-local"] for r in range(3)] == [7, 4, 0]
    for rank in range(3):  # every rank gets the whole result
        _assert_same_records(results[rank], want)


# ----------------------------------------------------------------------------- generate


@pytest.fixture(scope="module")
def one_process_generate(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("generate") / "single"
    manifest = generate(data, out, device="cpu", progress=False, **GENERATE)
    assert manifest["complete"] and manifest["n_shards"] == 12
    return out


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name != ".lock"}


def _assert_same_output(out: Path, reference: Path) -> None:
    got, want = _files(out), _files(reference)
    assert sorted(got) == sorted(want)  # nothing missing, nothing extra, no temp files
    for name in want:
        assert got[name] == want[name], f"{name} differs from the one-process run"


def _partial_copy(reference: Path, out: Path, listed: int) -> None:
    """What a run killed after ``listed`` shards leaves: a whole manifest listing them,
    one more shard's files renamed into place, a half-written temporary file."""
    out.mkdir()
    manifest = read_manifest(reference)
    manifest["shards"] = manifest["shards"][:listed]
    manifest["complete"] = False
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    for index in range(listed + 1):
        for kind in ("tau", "noisy"):
            name = f"{kind}-{index:05d}.npy"
            shutil.copyfile(reference / name, out / name)
    (out / ".noisy-00007.npy.tmp").write_bytes(b"\x93NUMPY half")


@pytest.mark.parametrize("nproc", [2, 3])
def test_generate_under_torchrun_is_byte_identical(nproc, data, one_process_generate, tmp_path):
    out = tmp_path / "multi"
    command = ["generate", "--input", str(data), "--out", str(out), *GENERATE_CLI]
    if nproc == 3:  # resume with three processes what one process began
        _partial_copy(one_process_generate, out, listed=4)
        command += ["--resume"]
    done = torchrun(nproc, *command)
    assert done.stdout.count("80 images in 12 shards") == 1  # rank 0 only
    _assert_same_output(out, one_process_generate)
    assert verify(out, sample=4).ok


def test_a_killed_rank_fails_the_job_clearly_and_the_run_resumes(
    data, one_process_generate, tmp_path
):
    out = tmp_path / "run"
    port = free_port()
    command = [sys.executable, "-m", "diffeo_engine", "generate", "--input", str(data)]
    command += ["--out", str(out), *GENERATE_CLI]
    ranks = []
    start = time.perf_counter()
    for rank in range(2):  # rank 1 writes shards 1, 3, 5, ...: it dies after shard 3's files
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2"}
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        env.update({FAULT_ENV: "shard-renamed:3", TIMEOUT_ENV: "5"})
        pipes = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        ranks.append(subprocess.Popen(command, env=env, **pipes))
    try:
        outputs = [process.communicate(timeout=90) for process in ranks]
    finally:
        for process in ranks:
            if process.poll() is None:
                process.kill()
    assert time.perf_counter() - start < 60
    assert ranks[1].returncode == -signal.SIGKILL
    assert ranks[0].returncode == 1, outputs[0]
    stderr = outputs[0][1]
    assert "diffeo-engine generate: error: rank 0:" in stderr
    assert "did another rank die?" in stderr
    assert "Traceback" not in stderr

    manifest = read_manifest(out)  # whole, listing the rounds finished before the death
    assert not manifest["complete"]
    assert [s["index"] for s in manifest["shards"]] == [0, 1]
    generate(data, out, resume=True, progress=False)  # one process finishes it
    _assert_same_output(out, one_process_generate)
