"""Dispatch, torch.library registration, torch.compile and bad input of ``ops``."""

from __future__ import annotations

import pytest
import torch

from diffeo_engine import ops, reference
from diffeo_engine.kernels import perturb as kernels

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def images_for(shape=(2, 3, 17, 23), dtype=torch.float32):
    x = torch.rand(shape, generator=torch.Generator().manual_seed(1))
    return (x * 255).round().to(dtype) if dtype == torch.uint8 else x.to(dtype)


def test_auto_on_cpu_is_the_cpu_kernel_within_the_stated_tolerance():
    x = images_for()
    T = torch.tensor([0.01, 0.03])
    ids = [5, 2**40]
    tau, noisy = ops.perturb(x, T, 4, seed=3, ids=ids, noise=0.2)
    kernel = ops.perturb(x, T, 4, seed=3, ids=ids, noise=0.2, backend="cpu")
    assert torch.equal(tau, kernel[0]) and torch.equal(noisy, kernel[1])
    ref_tau, ref_noisy = reference.perturb(x, T, 4, seed=3, ids=ids, noise=0.2)
    torch.testing.assert_close(tau, ref_tau, rtol=0, atol=1e-5)
    torch.testing.assert_close(noisy, ref_noisy, rtol=0, atol=1e-5)
    deformed = ops.deform(x, 0.02, 3, seed=1)
    torch.testing.assert_close(deformed, reference.deform(x, 0.02, 3, seed=1), rtol=0, atol=1e-5)
    assert ops.deform(x.double(), 0.02, 3, seed=1).dtype == torch.float64  # the reference


def test_triton_backend_agrees_with_torch_backend():
    """On CPU this runs the kernels in the interpreter; with CUDA, through the operator."""
    x = images_for(dtype=torch.uint8).to(DEVICE).contiguous(memory_format=torch.channels_last)
    kwargs = dict(seed=11, ids=torch.tensor([7, 8], device=DEVICE), out_dtype=torch.uint8)
    tau, noisy = ops.perturb(x, 0.02, 5, backend="triton", **kwargs)
    ref_tau, ref_noisy = ops.perturb(x, 0.02, 5, backend="torch", **kwargs)
    assert tau.is_contiguous(memory_format=torch.channels_last)
    assert (tau.int() - ref_tau.int()).abs().max() <= 1
    assert (noisy.int() - ref_noisy.int()).abs().max() <= 1
    nearest = ops.deform(x.float(), 0.0, 5, seed=11, interp="nearest", backend="triton")
    assert torch.equal(nearest, x.float())


def test_compile_fullgraph_over_perturb_and_deform():
    x = images_for()
    T = torch.tensor([0.01, 0.02])

    @torch.compile(fullgraph=True)
    def pipeline(images, T):
        tau, noisy = ops.perturb(images, T, 3, seed=7, ids=torch.arange(2) + 10)
        return (tau - noisy).square().sum(), ops.deform(images, 0.02, 4, seed=3)

    gap, tau = pipeline(x, T)
    eager_tau, eager_noisy = ops.perturb(x, T, 3, seed=7, ids=torch.arange(2) + 10)
    torch.testing.assert_close(gap, (eager_tau - eager_noisy).square().sum())
    assert torch.equal(tau, ops.deform(x, 0.02, 4, seed=3))  # the same implementation
    torch.testing.assert_close(tau, reference.deform(x, 0.02, 4, seed=3), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="T: expected finite"):  # value check inside the op
        pipeline(x, torch.tensor([float("nan"), 0.02]))


def test_deform_is_differentiable_in_the_images():
    x = images_for().requires_grad_(True)
    weights = torch.rand(x.shape, generator=torch.Generator().manual_seed(2))
    (ops.deform(x, 0.02, 3, seed=5) * weights).sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    (reference.deform(x_ref, 0.02, 3, seed=5) * weights).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    assert x.grad.abs().sum() > 0


# -------------------------------------------------------------------------- bad input


def test_backend_name_and_float64_on_triton():
    x = images_for()
    with pytest.raises(ValueError, match="backend"):
        ops.deform(x, 0.01, 3, seed=0, backend="cuda")
    with pytest.raises(TypeError, match="float64"):
        ops.deform(x.double(), 0.01, 3, seed=0, backend="triton")
    assert ops.deform(x.double(), 0.01, 3, seed=0).dtype == torch.float64  # reference does it


def test_tensors_on_different_devices():
    x = images_for()
    with pytest.raises(ValueError, match="T: expected a tensor on cpu"):
        ops.perturb(x, torch.zeros(2, device="meta"), 3, seed=0)
    with pytest.raises(ValueError, match="ids: expected a tensor on cpu"):
        ops.deform(x, 0.01, 3, seed=0, ids=torch.arange(2, device="meta"), backend="triton")


def test_cpu_tensors_on_triton_need_the_interpreter(monkeypatch):
    monkeypatch.setattr(ops, "_interpreter_enabled", lambda: False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        ops.perturb(images_for(), 0.01, 3, seed=0, backend="triton")
    ops.perturb(images_for(), 0.01, 3, seed=0, backend="auto")  # the reference still runs


def test_cut_above_the_kernels_maximum():
    with pytest.raises(ValueError, match=f"cut: expected an integer <= {kernels.MAX_CUT}"):
        ops.deform(images_for(), 0.01, kernels.MAX_CUT + 1, seed=0, backend="triton")


def test_images_beyond_the_index_range():
    huge = torch.zeros(1, 1, 1, 1).expand(1, 2, 2**15, 2**15)  # 2**31 elements, no memory
    with pytest.raises(ValueError, match=r"C\*H\*W < 2\*\*31"):
        ops.perturb(huge, 0.01, 3, seed=0, backend="triton")


def test_bad_noise_and_T_values_on_triton():
    x = images_for()
    with pytest.raises(ValueError, match="noise"):
        ops.perturb(x, 0.01, 3, seed=0, noise="loud", backend="triton")
    with pytest.raises(ValueError, match="T: expected temperatures >= 0"):
        ops.perturb(x, torch.tensor([0.01, -1.0]), 3, seed=0, backend="triton")


@pytest.mark.gpu
def test_compile_fullgraph_on_cuda_traces_the_kernels():
    x = images_for((4, 3, 32, 32)).cuda()

    @torch.compile(fullgraph=True)
    def pipeline(images):
        return ops.perturb(images, 0.01, 5, seed=2, noise="matched")

    tau, noisy = pipeline(x)
    ref_tau, ref_noisy = reference.perturb(x, 0.01, 5, seed=2)
    torch.testing.assert_close(tau, ref_tau, atol=1e-4, rtol=0)
    torch.testing.assert_close(noisy, ref_noisy, atol=1e-4, rtol=0)


@pytest.mark.parametrize("backend", ["auto", "torch", "triton"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_pixels_are_refused_unless_allowed(backend, bad):
    images = torch.rand(3, 2, 9, 11)
    images[1, 0, 4, 5] = bad
    for fn in (ops.deform, ops.perturb):
        message = r"images: 1 pixel\(s\) are NaN or inf \(first in image 1\)"
        with pytest.raises(ValueError, match=message):
            fn(images, 1e-3, 3, seed=0, backend=backend)
    tau, noisy = ops.perturb(images, 1e-3, 3, seed=0, backend=backend, allow_nonfinite=True)
    # the opt-out lets the maths run: the other images are untouched by the bad pixel
    assert torch.isfinite(tau[0]).all() and torch.isfinite(noisy[2]).all()
    assert not torch.isfinite(noisy[1]).all()


# ---------------------------------------------------------------------------- gradients


def _reference_grads(x, fn, *args, **kwargs):
    """``x``'s gradient and gradient-penalty gradient by autograd straight through the
    eager reference (an independent computation of what the operators' VJP writes out)."""
    x = x.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(fn(x, *args, **kwargs), x, create_graph=True)
    if not grad.requires_grad:  # a linear map (deform): its gradient does not depend on x
        return grad.detach(), torch.zeros_like(x)
    (penalty,) = torch.autograd.grad(grad.square().sum(), x)
    return grad.detach(), penalty


def _noisy_loss(perturb, x, T, ids, **kwargs):
    tau, noisy = perturb(x, T, 4, seed=9, ids=ids, **kwargs)
    weights = torch.linspace(-1, 1, x[0].numel()).reshape(x.shape[1:])
    return (tau * weights).sum() + noisy.square().sum()


@pytest.mark.parametrize("noise", ["matched", 0.3])
@pytest.mark.parametrize("interp", ["bilinear", "nearest"])
def test_double_backward_matches_autograd_through_the_reference(noise, interp):
    x = images_for((3, 2, 9, 11))
    T, ids = torch.tensor([0.01, 0.02, 0.005]), torch.tensor([4, 2**40, 7])
    kwargs = dict(noise=noise, interp=interp)
    want_grad, want_penalty = _reference_grads(
        x, lambda v: _noisy_loss(reference.perturb, v, T, ids, **kwargs)
    )

    leaf = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(
        _noisy_loss(ops.perturb, leaf, T, ids, **kwargs), leaf, create_graph=True
    )
    assert grad.grad_fn is not None  # a gradient penalty can backpropagate through it
    grad.square().sum().backward()
    torch.testing.assert_close(grad.detach(), want_grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(leaf.grad, want_penalty, rtol=1e-4, atol=1e-4)
    assert want_penalty.abs().sum() > 0


def test_compile_fullgraph_then_backward_on_cpu():
    x = images_for()
    T, ids = torch.tensor([0.01, 0.02]), torch.arange(2) + 10

    @torch.compile(fullgraph=True)
    def loss(images):
        return _noisy_loss(ops.perturb, images, T, ids) + ops.deform(images, 0.02, 3, seed=1).sum()

    leaf = x.clone().requires_grad_(True)
    loss(leaf).backward()

    def eager(v):
        return (
            _noisy_loss(reference.perturb, v, T, ids) + reference.deform(v, 0.02, 3, seed=1).sum()
        )

    want, _ = _reference_grads(x, eager)
    torch.testing.assert_close(leaf.grad, want, rtol=1e-4, atol=1e-5)


def test_triton_backend_deform_carries_the_reference_gradient():
    """The kernels (interpreter here, CUDA on a GPU) return an output with a ``grad_fn``."""
    x = images_for((2, 3, 8, 10)).to(DEVICE)
    weights = torch.rand(x.shape, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    leaf = x.clone().requires_grad_(True)
    out = ops.deform(leaf, 0.02, 3, seed=5, backend="triton")
    assert out.grad_fn is not None
    (out * weights).sum().backward()
    want, _ = _reference_grads(x, lambda v: (reference.deform(v, 0.02, 3, seed=5) * weights).sum())
    torch.testing.assert_close(leaf.grad, want, rtol=1e-5, atol=1e-6)
    tau, noisy = ops.perturb(leaf, 0.02, 3, seed=5, backend="triton")
    assert tau.grad_fn is not None and noisy.grad_fn is not None
