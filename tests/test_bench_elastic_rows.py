"""The bench rows of the elastic augmentations users compare with (kornia's
RandomElasticTransform, torchvision v2's ElasticTransform): labelled as another law, one
independent field per image, and skipped with the reason where the package does not import."""

import pytest
import torch

from diffeo_engine import benchmark as bm
from diffeo_engine.benchmark.providers import Case

ROWS = ("kornia", "torchvision-elastic")


@pytest.mark.parametrize("name", ROWS)
def test_elastic_rows_are_labelled_as_another_law(name):
    provider = bm.PROVIDERS[name]
    assert provider.kind == "deform"
    assert provider.law.startswith("different law") and "Gaussian-smoothed" in provider.law


@pytest.mark.parametrize("name", ROWS)
def test_elastic_rows_deform_each_image_with_its_own_field(name):
    reason = bm.PROVIDERS[name].unavailable(torch.device("cpu"))
    if reason is not None:
        assert "not installed" in reason or "does not import" in reason
        pytest.skip(reason)
    for dtype in ("float32", "uint8"):
        case = Case(3, (2, 20, 24), dtype, 3, "cpu")
        run = bm.PROVIDERS[name].build(case)
        one = torch.rand(1, 2, 20, 24, generator=torch.Generator().manual_seed(0)) * 255
        images = one.expand(3, 2, 20, 24).to(case.in_dtype)
        out = run(images, torch.arange(3))
        assert out.shape == images.shape and out.dtype == case.out_dtype
        x = images.to(torch.float32)
        assert (out - x).abs().amax() > 1.0  # the images moved
        assert not torch.equal(out[0], out[1]) and not torch.equal(out[1], out[2])


def test_run_benchmarks_reports_the_rows_or_why_not():
    doc = bm.run_benchmarks(
        [(2, 1, 12, 14)], ["float32"], [3], list(ROWS), device="cpu", smoke=True
    )
    ran = {r["provider"] for r in doc["results"]}
    skipped = {s["provider"]: s["reason"] for s in doc["skipped"]}
    assert ran | set(skipped) == set(ROWS) and not ran & set(skipped)
    for r in doc["results"]:
        assert r["kind"] == "deform" and r["law"].startswith("different law")
    assert "* different law" in bm.format_table(doc) or not ran
