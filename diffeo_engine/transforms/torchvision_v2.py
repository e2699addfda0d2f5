""":class:`~diffeo_engine.transforms.Diffeo` as a ``torchvision.transforms.v2`` transform.

A thin layer: torchvision finds the parts of a sample (``tv_tensors.Image``, ``Video``,
``Mask``, ``BoundingBoxes``, ``KeyPoints`` where the version has them, PIL images, and the
pure tensor it takes for the image); this module draws one :class:`DiffeoParams` per call
with :meth:`Diffeo.sample_params` and moves each part with :meth:`Diffeo.move`, then wraps
the result back into its tv_tensor type. Other inputs pass through. An image ``(C, H, W)``
(or video ``(T, C, H, W)``) is one sample; a batch ``(B, C, H, W)`` gets one field per image
(unlike torchvision's own transforms, which share one draw across a batch); boxes and
keypoints, which torchvision keeps per sample, need a single sample. Boxes keep their own
format (``XYXY``, ``XYWH``, ``CXCYWH``) and canvas.

Importing this module imports torchvision; ``diffeo_engine.transforms.TorchvisionDiffeo``
does so on first use only.
"""

from __future__ import annotations

from typing import Any

import PIL.Image
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import query_size

from diffeo_engine.targets import check_box_format
from diffeo_engine.transforms.modules import Diffeo
from diffeo_engine.transforms.samples import to_batch

__all__ = ["TorchvisionDiffeo"]

_KEYPOINTS = getattr(tv_tensors, "KeyPoints", None)  # torchvision >= 0.23


def _kind(inpt: Any) -> str | None:
    """The part an input is, or None (passed through)."""
    if isinstance(inpt, tv_tensors.BoundingBoxes):
        return "boxes"
    if _KEYPOINTS is not None and isinstance(inpt, _KEYPOINTS):
        return "keypoints"
    if isinstance(inpt, tv_tensors.Mask):
        return "mask"
    if isinstance(inpt, tv_tensors.Video):
        return "video"
    if isinstance(inpt, (torch.Tensor, PIL.Image.Image)):
        return "image"  # an Image, or the one pure tensor torchvision treats as the image
    return None


def _batch_size(flat_inputs: list) -> tuple[bool, int]:
    """Whether the call is a batch (a 4-D image or 5-D video), and how many samples."""
    for inpt in flat_inputs:
        kind = _kind(inpt)
        if kind == "image" and getattr(inpt, "ndim", 0) == 4:
            return True, int(inpt.shape[0])
        if kind == "video" and inpt.ndim == 5:
            return True, int(inpt.shape[0])
    return False, 1


class TorchvisionDiffeo(v2.Transform):
    """``Diffeo(*args, **kwargs)`` on torchvision samples; the same laws, seed and ids (the
    counter of a fixed seed, or a fresh seed per call), recorded in ``diffeo.last_params``."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__()
        self.diffeo = Diffeo(*args, **kwargs)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        batched, n = _batch_size(flat_inputs)
        size = tuple(int(s) for s in query_size(flat_inputs))
        device = next(
            (x.device for x in flat_inputs if torch.is_tensor(x) and _kind(x) != "boxes"),
            torch.device("cpu"),
        )
        params = self.diffeo.sample_params(size, n=n, device=device)
        self.diffeo.last_params = params
        return {"params": params, "size": size, "batched": batched, "field": []}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        kind = _kind(inpt)
        if kind is None:
            return inpt
        box_format = None
        if kind in ("boxes", "keypoints"):
            if params["batched"]:
                raise ValueError(
                    f"{kind}: torchvision keeps them per sample; transform a batch of images "
                    "with Diffeo and a list of per-sample boxes or keypoints instead"
                )
            if kind == "boxes":  # rotated formats are refused here, naming the format
                box_format = check_box_format(inpt.format.name)
        plain = inpt.as_subclass(torch.Tensor) if torch.is_tensor(inpt) else inpt
        part = to_batch(kind, kind, plain, params["batched"])
        moved = self.diffeo.move(
            part, params["params"], params["size"], params["field"], box_format=box_format
        )
        out = part.back(moved)
        if isinstance(inpt, tv_tensors.TVTensor):
            return tv_tensors.wrap(out, like=inpt)
        return out

    # torchvision before 0.21 calls these private names
    _get_params = make_params
    _transform = transform
