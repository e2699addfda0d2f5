"""The fused CPU kernel (numba) against the PyTorch reference and against its parts.

Philox integers are bit-identical to :mod:`diffeo_engine.rng`; floats agree with the
reference within 1e-5 of the image range for sides up to 128 pixels and 5e-5 beyond
(float32 source coordinates ``x - dx`` have a spacing of 1.5e-5 past pixel 128, so a
one-ulp difference in the field moves a sample by that much); uint8 outputs within one
level. An image's outputs do not depend on its batch, the thread count or the chunking.
"""

from __future__ import annotations

import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch

from diffeo_engine import ops, reference, rng
from diffeo_engine.kernels import cpu

DTYPES = [torch.uint8, torch.float16, torch.bfloat16, torch.float32]


def images_for(shape, dtype=torch.float32, seed=0, layout="contiguous"):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g, dtype=torch.float64)
    x = (x * 255).round().to(torch.uint8) if dtype == torch.uint8 else x.to(dtype)
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # a view with gaps: every other column of a wider tensor
        wide = torch.repeat_interleave(x, 2, dim=-1)
        return wide[..., ::2]
    return x


def run_cpu(images, T, cut, *, seed=3, ids=None, noise="matched", interp="bilinear",
            out_dtype=None, cuts=None):  # fmt: skip
    """The kernel into poisoned buffers (NaN for floats; uint8 twice, from 0xAB and 0x00,
    which must agree): every element must be written."""
    B = images.shape[0]
    out_dtype = out_dtype or (torch.float32 if images.dtype == torch.uint8 else images.dtype)
    T = torch.full((B,), T, dtype=torch.float32) if not torch.is_tensor(T) else T
    ids = torch.arange(B) if ids is None else torch.as_tensor(ids, dtype=torch.int64)
    poisons = [0xAB, 0x00] if out_dtype == torch.uint8 else [float("nan")]
    results = []
    for poison in poisons:
        fmt = reference.memory_format_of(images)
        bufs = [
            torch.full(images.shape, poison, dtype=out_dtype).contiguous(memory_format=fmt)
            for _ in range(2)
        ]
        tau, noisy, bad = cpu.perturb(
            images, T, ids, cut=cut, cuts=cuts, seed=seed, noise=noise, interp=interp,
            out_dtype=out_dtype, out=(bufs[0], bufs[1] if noise is not None else None),
        )  # fmt: skip
        assert tau is bufs[0]
        results.append((tau, noisy, bad))
    if len(results) == 2:
        for first, second in zip(results[0][:2], results[1][:2]):
            if first is not None:
                assert torch.equal(first, second), "an element was left unwritten"
    return results[0]


def assert_close_to_reference(got, want, images, out_dtype):
    side = max(images.shape[-2:])
    if out_dtype == torch.uint8:
        assert (got.int() - want.int()).abs().max() <= 1
        return
    scale = 255.0 if images.dtype == torch.uint8 else 1.0
    atol = (1e-5 if side <= 128 else 5e-5) * scale
    ulp = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}.get(out_dtype, 0.0)
    diff = (got.double() - want.double()).abs()
    bound = atol + ulp * want.double().abs()
    assert bool((diff <= bound).all()), f"max diff {float(diff.max())}"


# ---------------------------------------------------------------------------- the parts


def test_philox_words_are_rng_bit_for_bit():
    g = np.random.default_rng(0)
    n = 1000
    c0 = g.integers(0, 2**32, n, dtype=np.uint64)
    c1 = g.integers(0, 2**32, n, dtype=np.uint64)
    for seed in (0, 1, 2**32 + 7, 2**63 - 1):
        for image_id in (0, 5, 2**32 + 3, 2**63 - 2):
            words = [np.empty(n, np.uint32) for _ in range(4)]
            key = np.uint64(seed)
            cpu._philox(
                c0, c1, n, np.uint64(image_id & 0xFFFFFFFF), np.uint64(image_id >> 32),
                key & np.uint64(0xFFFFFFFF), key >> np.uint64(32), *words,
            )  # fmt: skip
            want = rng.philox4x32(
                seed, torch.from_numpy(c0.astype(np.int64)), torch.from_numpy(c1.astype(np.int64)),
                image_id & 0xFFFFFFFF, image_id >> 32,
            )  # fmt: skip
            for got, expected in zip(words, want):
                assert np.array_equal(got.astype(np.int64), expected.numpy())


def test_box_muller_within_an_ulp_of_the_reference():
    g = np.random.default_rng(1)
    edges = np.array([0, 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32 - 2], dtype=np.uint32)
    wa = np.concatenate([edges, g.integers(0, 2**32, 20000).astype(np.uint32), edges[::-1]])
    wb = np.concatenate([edges, g.integers(0, 2**32, 20000).astype(np.uint32), edges])
    n = wa.shape[0]
    normals = np.empty(2 * n, np.float32)
    scratch = (np.empty(n, np.float32), np.empty(n, np.int32), np.empty(n, np.int32))
    cpu._normals(wa, wb, n, normals, *scratch)
    cos, sin = normals[0::2], normals[1::2]
    u1 = rng.uniform_from_uint32(torch.from_numpy(wa.astype(np.int64)))
    u2 = rng.uniform_from_uint32(torch.from_numpy(wb.astype(np.int64)))
    want_cos, want_sin = rng.box_muller(u1, u2)
    # float64 truth from the same float32 uniforms
    u1d = np.maximum(u1.numpy(), np.float32(1e-7)).astype(np.float64)
    theta = (u2.numpy() * np.float32(2 * math.pi)).astype(np.float64)
    radius = np.sqrt(-2.0 * np.log(u1d))
    for got, ref, truth in (
        (cos, want_cos.numpy(), radius * np.cos(theta)),
        (sin, want_sin.numpy(), radius * np.sin(theta)),
    ):
        scale = np.maximum(np.abs(truth), 1e-30)
        assert np.max(np.abs(got - truth) / scale) < 4e-7  # a few float32 ulps
        assert np.max(np.abs(got - ref)) < 5e-6


def test_half_conversions_are_torch_bit_for_bit():
    every = torch.arange(2**16, dtype=torch.int32).to(torch.int16)
    for dtype, kind in ((torch.float16, cpu.FLOAT16), (torch.bfloat16, cpu.BFLOAT16)):
        values = every.view(dtype).float()
        for bits, want in zip(every.tolist()[::97], values.tolist()[::97]):
            got = cpu._half_value(bits & 0xFFFF, kind)
            assert (math.isnan(got) and math.isnan(want)) or got == want
    g = torch.Generator().manual_seed(2)
    samples = torch.cat([
        torch.randn(20000, generator=g) * torch.logspace(-9, 6, 20000),
        torch.tensor([0.0, -0.0, 65504.0, 65519.9, 65520.0, 1e30, float("inf"), -float("inf"),
                      2.0**-24, 2.0**-25, 3 * 2.0**-26, 2.0**-14, 5.96e-8, 1e-40]),
    ])  # fmt: skip
    bits = samples.view(torch.int32).long() & 0xFFFFFFFF
    for dtype, kind in ((torch.float16, cpu.FLOAT16), (torch.bfloat16, cpu.BFLOAT16)):
        want = samples.to(dtype).view(torch.int16).long() & 0xFFFF
        got = torch.tensor([cpu._half_bits(int(b), kind) for b in bits.tolist()])
        assert torch.equal(got, want), dtype


# ---------------------------------------------------------------- against the reference


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("noise", ["matched", 0.07, None])
@pytest.mark.parametrize("interp", ["bilinear", "nearest"])
def test_matches_the_reference_over_dtypes_noise_and_interp(dtype, noise, interp):
    x = images_for((5, 3, 13, 17), dtype, seed=4)
    T = torch.tensor([0.0, 0.002, 0.01, 0.03, 0.005])
    ids = [0, 7, 2**32 + 1, 2**62, 12345]
    tau, noisy, bad = run_cpu(x, T, 4, ids=ids, noise=noise, interp=interp)
    out_dtype = tau.dtype
    if noise is None:
        want = (reference.deform(x, T, 4, seed=3, ids=ids, interp=interp),)
        got = (tau,)
    else:
        want = reference.perturb(x, T, 4, seed=3, ids=ids, noise=noise, interp=interp)
        got = (tau, noisy)
    for g, w in zip(got, want):
        assert_close_to_reference(g, w, x, out_dtype)
    assert not bad.any()
    x_out = x if dtype != torch.uint8 else x.float()
    assert torch.equal(tau[0], x_out[0])  # T = 0: the identity, bit for bit


@pytest.mark.parametrize("out_dtype", [torch.uint8, torch.float16, torch.bfloat16, torch.float64])
def test_output_dtypes(out_dtype):
    x = images_for((3, 2, 11, 9), torch.uint8, seed=5)
    tau, noisy, _ = run_cpu(x, 0.01, 3, out_dtype=out_dtype)
    want = reference.perturb(x, 0.01, 3, seed=3, out_dtype=out_dtype)
    assert tau.dtype == noisy.dtype == out_dtype
    for g, w in zip((tau, noisy), want):
        assert_close_to_reference(g, w, x, out_dtype)


@pytest.mark.parametrize("layout", ["channels_last", "strided"])
def test_layouts(layout):
    x = images_for((4, 3, 10, 12), torch.float32, seed=6, layout=layout)
    tau, noisy, _ = run_cpu(x, 0.01, 5)
    assert tau.is_contiguous(memory_format=reference.memory_format_of(x))
    for g, w in zip((tau, noisy), reference.perturb(x, 0.01, 5, seed=3)):
        assert_close_to_reference(g, w, x, torch.float32)


@pytest.mark.parametrize(("H", "W", "cut"), [(2, 2, 1), (2, 5, 3), (7, 2, 2), (28, 28, 15),
                                             (33, 65, 9), (130, 129, 3)])  # fmt: skip
def test_sizes_and_cuts(H, W, cut):
    x = images_for((2, 1, H, W), torch.float32, seed=H * W)
    side = math.sqrt(H * W)
    T = 0.5 * (1 / (math.pi * side**2 * math.log(max(cut, 2)))) + 1e-4
    tau, noisy, _ = run_cpu(x, T, cut, ids=[3, 2**40])
    want = reference.perturb(x, T, cut, seed=3, ids=[3, 2**40])
    for g, w in zip((tau, noisy), want):
        assert_close_to_reference(g, w, x, torch.float32)


def test_per_image_T_and_cut():
    x = images_for((6, 3, 16, 16), torch.float32, seed=7)
    T = torch.tensor([0.001, 0.02, 0.0, 0.004, 0.01, 0.003])
    cuts = torch.tensor([1, 3, 8, 2, 5, 3])
    tau, noisy, _ = run_cpu(x, T, 8, cuts=cuts, ids=[9, 8, 7, 6, 5, 4])
    want = reference.perturb(x, T, cuts, seed=3, ids=[9, 8, 7, 6, 5, 4])
    for g, w in zip((tau, noisy), want):
        assert_close_to_reference(g, w, x, torch.float32)


# ----------------------------------------------------------------------- determinism


def test_an_image_is_the_same_in_any_batch_and_with_any_thread_count():
    x = images_for((67, 3, 12, 14), torch.float32, seed=8)
    ids = torch.arange(67) * 3 + 11
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        whole = ops.perturb(x, 0.01, 4, seed=5, ids=ids, backend="cpu")  # parallel, chunked
        torch.set_num_threads(1)
        serial = ops.perturb(x, 0.01, 4, seed=5, ids=ids, backend="cpu")
    finally:
        torch.set_num_threads(threads)
    for part in (slice(0, 1), slice(30, 33), slice(9, 58), slice(66, 67)):
        alone = ops.perturb(x[part], 0.01, 4, seed=5, ids=ids[part], backend="cpu")
        for a, b, c in zip(whole, serial, alone):
            assert torch.equal(a[part], c) and torch.equal(b[part], c)
    shuffled = torch.randperm(67, generator=torch.Generator().manual_seed(0))
    moved = ops.perturb(x[shuffled], 0.01, 4, seed=5, ids=ids[shuffled], backend="cpu")
    for a, b in zip(whole, moved):
        assert torch.equal(a[shuffled], b)


# ------------------------------------------------------------------ non-finite values


def test_nonfinite_pixels_are_counted_in_the_kernel_pass():
    x = images_for((4, 2, 8, 8), torch.float32, seed=9)
    x[2, 1, 3, 4] = float("nan")
    x[3, 0, 0, 0] = float("inf")
    _, _, bad = run_cpu(x, 0.01, 3)
    assert bad[0] == bad[1] == 0 and bad[2] > 0 and bad[3] > 0
    with pytest.raises(ValueError, match="first in image 2"):
        ops.perturb(x, 0.01, 3, seed=0, backend="cpu")
    tau, noisy = ops.perturb(x, 0.01, 3, seed=0, backend="cpu", allow_nonfinite=True)
    ref_tau, ref_noisy = ops.perturb(x, 0.01, 3, seed=0, backend="torch", allow_nonfinite=True)
    assert torch.equal(tau.isnan(), ref_tau.isnan()) and torch.equal(
        noisy.isnan(), ref_noisy.isnan()
    )
    assert torch.isfinite(noisy[:2]).all()


@pytest.mark.parametrize("backend", ["cpu", "torch", "triton"])
def test_overflowing_outputs_are_refused(backend):
    x = images_for((2, 1, 8, 8), torch.float32, seed=10) * 3e38
    x[:, :, ::2] *= -1  # changes of 6e38 overflow float32 on the way to the norm
    with pytest.raises(ValueError, match="overflows float32"):
        ops.perturb(x, 0.05, 3, seed=0, backend=backend)
    half = (6.4e4 + images_for((2, 1, 8, 8), torch.float32, seed=11) * 1e3).half()
    with pytest.raises(ValueError, match="overflows float16"):
        ops.perturb(half, 0.05, 3, seed=0, noise=1000.0, backend=backend)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_kernels_are_asked_for_no_separate_finite_pass(monkeypatch, backend):
    """Both kernels count non-finite values in their own read of the images (Triton here in
    its interpreter): ``ops`` runs no check of its own unless the count says something is
    wrong, and then names the image."""
    from diffeo_engine import ops as ops_module

    calls = []
    real = ops_module.check_finite
    monkeypatch.setattr(ops_module, "check_finite", lambda *a, **k: calls.append(a) or real(*a))
    x = images_for((3, 2, 8, 8), torch.float32, seed=12)
    ops.perturb(x, 0.01, 3, seed=0, backend=backend)
    ops.deform(x, 0.01, 3, seed=0, backend=backend)
    ops.perturb(x, 0.01, 3, seed=0, noise=0.1, backend=backend)
    assert calls == []
    x[1, 1, 7, 0] = float("nan")
    for call in (ops.perturb, ops.deform):
        with pytest.raises(ValueError, match="NaN or inf .first in image 1"):
            call(x, 0.01, 3, seed=0, backend=backend)
    assert len(calls) == 2


# -------------------------------------------------------------- imports and fallback


def test_an_eager_cpu_call_imports_neither_dynamo_nor_triton():
    code = (
        "import sys, torch, diffeo_engine as de\n"
        "x = torch.rand(2, 3, 8, 8)\n"
        "de.perturb(x, 0.01, 3, seed=0); de.deform(x, 0.01, 3, seed=0)\n"
        "x.requires_grad_(True); de.perturb(x, 0.01, 3, seed=0)[1].sum().backward()\n"
        "bad = [m for m in ('torch._dynamo', 'torch._inductor', 'triton') if m in sys.modules]\n"
        "print('IMPORTED', bad)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert "IMPORTED []" in out.stdout


def test_without_numba_the_reference_runs_with_one_warning():
    code = (
        "import sys, warnings\n"
        "sys.modules['numba'] = None  # import numba raises ImportError\n"
        "import torch, diffeo_engine as de\n"
        "x = torch.rand(2, 3, 8, 8)\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    a = de.perturb(x, 0.01, 3, seed=0); b = de.perturb(x, 0.01, 3, seed=0)\n"
        "r = de.perturb(x, 0.01, 3, seed=0, backend='torch')\n"
        "assert all(torch.equal(p, q) for p, q in zip(a, r))\n"
        "print('WARNINGS', len(caught), caught[0].message if caught else '')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "WARNINGS 1" in out.stdout and "numba" in out.stdout


def test_backend_cpu_refuses_what_it_cannot_run():
    x = images_for((2, 1, 8, 8))
    with pytest.raises(TypeError, match="float64"):
        ops.perturb(x.double(), 0.01, 3, seed=0, backend="cpu")
    with pytest.raises(ValueError, match="meta device"):
        ops.perturb(x.to("meta"), 0.01, 3, seed=0, backend="cpu")


@pytest.mark.slow
def test_a_read_only_package_caches_the_kernel_in_the_user_cache(tmp_path):
    """A package whose folders cannot take a ``__pycache__`` (a read-only site-packages; here
    a file stands where the folder would be, which stops root too) compiles once into the
    user's cache folder, and a second process loads the kernel from there."""
    import shutil

    import diffeo_engine

    site = tmp_path / "site"
    shutil.copytree(
        pathlib.Path(diffeo_engine.__file__).parent,
        site / "diffeo_engine",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    for folder in (site / "diffeo_engine").rglob("*"):
        if folder.is_dir():
            (folder / "__pycache__").write_text("not a folder")
    (site / "diffeo_engine" / "__pycache__").write_text("not a folder")
    home = tmp_path / "home"
    code = (
        f"import sys; sys.path.insert(0, {str(site)!r})\n"
        "import torch, diffeo_engine as de\n"
        "assert de.__file__.startswith(sys.path[0])\n"
        "de.perturb(torch.rand(2, 3, 8, 8), 0.01, 3, seed=0)\n"
        "from diffeo_engine.kernels import cpu\n"
        "print('HITS', sum(cpu._images.stats.cache_hits.values()))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    env.update(HOME=str(home), XDG_CACHE_HOME=str(home / ".cache"))
    runs = [
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
        for _ in range(2)
    ]
    for run in runs:
        assert run.returncode == 0, run.stderr
    assert "HITS 0" in runs[0].stdout and "HITS 1" in runs[1].stdout
    cached = list((home / ".cache" / "numba").rglob("cpu._images*.nbi"))
    assert cached, "no cache in the user's cache folder"
    assert not list(site.rglob("*.nbi"))
