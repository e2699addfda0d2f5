"""TorchvisionDiffeo on tv_tensors: the same result as Diffeo given the same parameters.

Skipped where torchvision does not import: the PyPI wheels are CUDA builds whose compiled
operators need CUDA's libraries, so on a CPU-only torch they fail while registering their
operators (a RuntimeError, not an ImportError).
"""

import pytest
import torch

try:
    from torchvision import tv_tensors
    from torchvision.transforms import v2
except Exception as error:  # any failure to import means: not testable here
    pytest.skip(
        f"torchvision does not import here ({type(error).__name__}: {error})",
        allow_module_level=True,
    )

import diffeo_engine as de
from diffeo_engine.transforms import TorchvisionDiffeo

pytestmark = pytest.mark.filterwarnings("ignore:.*the fused CPU kernel needs numba:RuntimeWarning")
H, W = 32, 28
KEYPOINTS = getattr(tv_tensors, "KeyPoints", None)


def _plain(value):
    return value.as_subclass(torch.Tensor) if torch.is_tensor(value) else value


def test_a_sample_of_tv_tensors_moves_as_diffeo_moves_it(generator):
    image = tv_tensors.Image(torch.rand(3, H, W, generator=generator))
    mask = tv_tensors.Mask(torch.randint(0, 5, (H, W), generator=generator))
    boxes = tv_tensors.BoundingBoxes(
        torch.tensor([[2.0, 3.0, 14.0, 20.0], [0.0, 0.0, W, H]]), format="XYWH", canvas_size=(H, W)
    )
    sample = {"image": image, "mask": mask, "boxes": boxes, "label": 3}
    if KEYPOINTS is not None:
        sample["points"] = KEYPOINTS(torch.tensor([[4.0, 5.0], [20.0, 9.5]]), canvas_size=(H, W))
    transform = TorchvisionDiffeo(sT=1.0, rT=1.0, cut=4, seed=7)
    out = transform(sample)
    params = transform.diffeo.last_params
    assert params.ids.tolist() == [0] and params.T.item() > 0
    assert isinstance(out["image"], tv_tensors.Image) and isinstance(out["mask"], tv_tensors.Mask)
    assert isinstance(out["boxes"], tv_tensors.BoundingBoxes) and out["label"] == 3
    assert out["boxes"].format == boxes.format and tuple(out["boxes"].canvas_size) == (H, W)
    reference = de.Diffeo(sT=1.0, rT=1.0, cut=4, box_format="xywh")
    want = reference(
        image=_plain(image), mask=_plain(mask), boxes=_plain(boxes), params=params,
        **({"keypoints": _plain(sample["points"])} if KEYPOINTS is not None else {}),
    )  # fmt: skip
    assert torch.equal(_plain(out["image"]), want["image"])
    assert torch.equal(_plain(out["mask"]), want["mask"])
    assert torch.equal(_plain(out["boxes"]), want["boxes"])
    assert not torch.equal(_plain(out["boxes"]), _plain(boxes))
    if KEYPOINTS is not None:
        assert isinstance(out["points"], KEYPOINTS)
        assert torch.equal(_plain(out["points"]), want["keypoints"])


def test_a_batch_of_images_gets_one_field_per_image_and_composes(generator):
    from PIL import Image

    images = tv_tensors.Image(torch.rand(4, 3, H, W, generator=generator))
    transform = TorchvisionDiffeo(0.003, (2, 5), seed=1)
    out = transform(images)
    assert transform.diffeo.last_params.ids.tolist() == [0, 1, 2, 3]
    want = de.Diffeo(0.003, (2, 5)).forward(_plain(images), params=transform.diffeo.last_params)
    assert isinstance(out, tv_tensors.Image) and torch.equal(_plain(out), want)
    video = tv_tensors.Video(torch.rand(6, 3, H, W, generator=generator))
    moved = transform(video)
    assert isinstance(moved, tv_tensors.Video) and moved.shape == video.shape
    pipeline = v2.Compose([v2.ToImage(), TorchvisionDiffeo(0.003, 3), v2.ToDtype(torch.float32)])
    pixels = (torch.rand(H, W, 3, generator=generator) * 255).to(torch.uint8).numpy()
    assert pipeline(Image.fromarray(pixels)).shape == (3, H, W)


def test_boxes_with_a_batch_or_rotated_boxes_are_refused(generator):
    transform = TorchvisionDiffeo(0.003, 3, seed=1)
    boxes = tv_tensors.BoundingBoxes(
        torch.tensor([[1.0, 2.0, 5.0, 6.0]]), format="XYXY", canvas_size=(H, W)
    )
    with pytest.raises(ValueError, match="boxes: torchvision keeps them per sample"):
        transform(tv_tensors.Image(torch.rand(2, 3, H, W)), boxes)
    if hasattr(tv_tensors.BoundingBoxFormat, "XYWHR"):
        rotated = tv_tensors.BoundingBoxes(
            torch.tensor([[1.0, 2.0, 5.0, 6.0, 30.0]]), format="XYWHR", canvas_size=(H, W)
        )
        with pytest.raises(ValueError, match="box_format"):
            transform(tv_tensors.Image(torch.rand(3, H, W)), rotated)
