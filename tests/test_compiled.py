"""The opt-in compiled CPU path (``DIFFEO_ENGINE_COMPILE=1``) against the eager reference."""

import pytest
import torch

from diffeo_engine import compiled, reference


@pytest.fixture
def compile_on(monkeypatch):
    monkeypatch.setenv(compiled.ENV, "1")


def test_switch_and_what_is_never_compiled(monkeypatch):
    x = torch.rand(2, 1, 4, 4)
    monkeypatch.delenv(compiled.ENV, raising=False)
    assert not compiled.enabled(x)  # opt-in
    monkeypatch.setenv(compiled.ENV, "1")
    assert compiled.enabled(x)
    assert not compiled.enabled(x.requires_grad_(True))  # autograd runs the eager reference
    assert not compiled.enabled(torch.rand(2, device="meta"))


@pytest.mark.slow
def test_compiled_perturb_agrees_and_keeps_batch_invariance(compile_on, generator):
    """One graph (perturb, bilinear): ~1 min of compilation on a loaded 2-core machine."""
    B = 7
    images = torch.rand(B, 3, 9, 13, generator=generator)
    T = torch.rand(B, generator=generator) * 0.02
    ids = torch.arange(B) * 7919 + (1 << 40)
    out = reference.perturb(images, T, 4, seed=3, ids=ids)
    assert reference.compiled._compiled, "the compiled path did not run"
    for got, want in zip(out, reference.perturb(images, T, 4, seed=3, ids=ids, noise=0.0)[:1]):
        torch.testing.assert_close(got, want)  # same tau whatever the noise
    with pytest.MonkeyPatch.context() as eager:
        eager.setenv(compiled.ENV, "0")
        ref = reference.perturb(images, T, 4, seed=3, ids=ids)
    for got, want in zip(out, ref):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    for part in ([4, 2], [5, 0, 2], [6, 1, 3, 0]):  # batches of one are another graph
        index = torch.tensor(part)
        sub = reference.perturb(images[index], T[index], 4, seed=3, ids=ids[index])
        for got, want in zip(sub, out):
            assert torch.equal(got, want[index])
