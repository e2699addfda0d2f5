"""A sample as the transforms see it: named parts in, the same structure out.

A call gives one image (a tensor, a numpy array or a PIL image), a dict of parts, or an
image and parts by keyword. Parts are recognised by name: ``image``, ``video``, ``mask``,
``boxes``, ``keypoints``; other names (labels, file names) come back unchanged. Every part is
turned into a batch the library works on and turned back into the form it came in:

============  ==============================  ================================
part          one sample                      a batch of ``B``
============  ==============================  ================================
image         tensor ``(H, W)``, ``(C, H, W)``; tensor ``(B, C, H, W)``;
              array ``(H, W)``, ``(H, W, C)``; array ``(B, H, W, C)``
              PIL image
video         tensor ``(T, C, H, W)``         tensor ``(B, T, C, H, W)``
mask          tensor ``(H, W)``, ``(K, H, W)``; tensor ``(B, H, W)``, ``(B, K, H, W)``;
              array ``(H, W)``, ``(H, W, K)``; array ``(B, H, W)``, ``(B, H, W, K)``
              PIL image
boxes         ``(N, 4)`` tensor or array      ``(B, N, 4)``, or a list of ``B`` ``(N_b, 4)``
keypoints     ``(..., 2)`` tensor or array    ``(B, ..., 2)``, or a list of ``B``
============  ==============================  ================================

Numpy arrays and PIL images are channels-last (their habit), tensors channels-first. The
image (or video) says whether the call is a batch; without one, ``ids`` does (a sequence or
a tensor of ids: a batch), or the replayed record (of more than one sample: a batch).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["PART_KINDS", "Part", "Sample", "parse_sample", "to_batch"]

PART_KINDS = ("image", "video", "mask", "boxes", "keypoints")
# names of other libraries that would silently pass through: refused with the right one
_RENAMED = {"bboxes": "boxes", "masks": "mask", "images": "image", "videos": "video"}
_SPATIAL = ("image", "video", "mask")


def _is_pil(value) -> bool:
    try:
        from PIL import Image
    except ImportError:
        return False
    return isinstance(value, Image.Image)


def _pil_to_array(image) -> np.ndarray:
    return np.array(image)  # a copy: torch refuses read-only buffers


def _array_to_pil(array: np.ndarray, like):
    """A PIL image of ``array`` in the mode of ``like`` (palette kept for ``P`` masks)."""
    from PIL import Image

    if like.mode == "P":
        out = Image.frombytes("P", like.size, np.ascontiguousarray(array, np.uint8).tobytes())
        out.putpalette(like.getpalette())
        return out
    out = Image.fromarray(np.ascontiguousarray(array))
    return out if out.mode == like.mode else out.convert(like.mode)


@dataclass
class Part:
    """One part: its name, kind, the library's batch form and the way back."""

    name: str | None
    kind: str  # one of PART_KINDS, or "other" (passed through)
    value: object  # as given
    batch: object = None  # tensor, or a list of per-sample tensors (boxes, keypoints)
    back: Callable | None = None  # batch result -> the given form
    out_dtype: torch.dtype | None = None  # for images: None (the library's rule) or the input's


def _shape_error(name: str, expected: str, value) -> ValueError:
    shape = tuple(value.shape) if hasattr(value, "shape") else type(value).__name__
    return ValueError(f"{name}: expected {expected}, got {shape}")


def _torch_dtype_of(array: np.ndarray) -> torch.dtype:
    return torch.from_numpy(np.zeros(1, dtype=array.dtype)).dtype


def _image_batch(name: str, value, batched: bool, kind: str) -> Part:
    """Images (and masks: ``kind="mask"``) as ``(B, C, H, W)`` tensors."""
    if _is_pil(value):
        if batched:
            raise ValueError(f"{name}: a PIL image is one sample, but the call is a batch")
        part = _image_batch(name, _pil_to_array(value), False, kind)
        back = part.back
        part.value, part.back = value, lambda out: _array_to_pil(back(out), value)
        return part
    if isinstance(value, np.ndarray):
        tensor = torch.from_numpy(np.ascontiguousarray(value))
        if batched:
            if value.ndim == 3 and kind == "mask":
                return Part(name, kind, value, tensor[:, None], lambda out: out[:, 0].numpy())
            if value.ndim != 4:
                expected = "(B, H, W, C)" if kind == "image" else "(B, H, W) or (B, H, W, K)"
                raise _shape_error(name, f"a batch of arrays {expected}", value)
            batch = tensor.permute(0, 3, 1, 2)
            back = lambda out: out.permute(0, 2, 3, 1).contiguous().numpy()  # noqa: E731
        elif value.ndim == 2:
            batch, back = tensor[None, None], lambda out: out[0, 0].numpy()
        elif value.ndim == 3:
            batch = tensor.permute(2, 0, 1)[None]
            back = lambda out: out[0].permute(1, 2, 0).contiguous().numpy()  # noqa: E731
        else:
            expected = "(H, W) or (H, W, C)" if kind == "image" else "(H, W) or (H, W, K)"
            raise _shape_error(name, f"an array {expected}", value)
        return Part(name, kind, value, batch, back, _torch_dtype_of(value))
    if not torch.is_tensor(value):
        raise TypeError(
            f"{name}: expected a tensor, a numpy array or a PIL image, got {type(value).__name__}"
        )
    if batched:
        if value.dim() == 3 and kind == "mask":
            return Part(name, kind, value, value[:, None], lambda out: out[:, 0])
        if value.dim() != 4:
            expected = "(B, C, H, W)" if kind == "image" else "(B, H, W) or (B, K, H, W)"
            raise _shape_error(name, f"a batch {expected}", value)
        return Part(name, kind, value, value, lambda out: out)
    if value.dim() == 2:
        return Part(name, kind, value, value[None, None], lambda out: out[0, 0])
    if value.dim() == 3:
        return Part(name, kind, value, value[None], lambda out: out[0])
    expected = "(H, W), (C, H, W) or a batch (B, C, H, W)"
    if kind == "mask":
        expected = "(H, W) or (K, H, W) (or a batch with an image)"
    raise _shape_error(name, expected, value)


def _video_batch(name: str, value, batched: bool) -> Part:
    if not torch.is_tensor(value):
        raise TypeError(f"{name}: expected a tensor (T, C, H, W), got {type(value).__name__}")
    if value.dim() == 5 and batched:
        return Part(name, "video", value, value, lambda out: out)
    if value.dim() == 4 and not batched:
        return Part(name, "video", value, value[None], lambda out: out[0])
    expected = "(B, T, C, H, W)" if batched else "(T, C, H, W) or a batch (B, T, C, H, W)"
    raise _shape_error(name, expected, value)


def _points_batch(name: str, kind: str, value, batched: bool) -> Part:
    """Boxes and keypoints as one ``(B, ..., k)`` tensor, or a list of per-sample ones."""
    width, shape = (4, "(N, 4)") if kind == "boxes" else (2, "(..., 2)")

    def one(item, label):
        if isinstance(item, np.ndarray):
            return torch.from_numpy(np.ascontiguousarray(item)), lambda out: out.numpy()
        if torch.is_tensor(item):
            return item, lambda out: out
        got = type(item).__name__
        raise TypeError(f"{label}: expected a tensor or a numpy array {shape}, got {got}")

    def check(t, label, extra):
        if (
            t.dim() < 1 + extra
            or t.shape[-1] != width
            or (kind == "boxes" and t.dim() != 2 + extra)
        ):
            lead = "(B, " if extra else "("
            raise _shape_error(label, f"{lead}{shape[1:]}" if extra else shape, t)

    if batched and isinstance(value, Sequence) and not isinstance(value, str):
        items, backs = [], []
        for i, item in enumerate(value):
            t, back = one(item, f"{name}[{i}]")
            check(t, f"{name}[{i}]", 0)
            items.append(t)
            backs.append(back)
        rebuild = type(value) if isinstance(value, (list, tuple)) else list
        return Part(
            name, kind, value, items,
            lambda outs: rebuild(b(o) for b, o in zip(backs, outs)),
        )  # fmt: skip
    t, back = one(value, name)
    if batched:
        check(t, name, 1)
        return Part(name, kind, value, t, back)
    check(t, name, 0)
    return Part(name, kind, value, t[None], lambda out: back(out[0]))


@dataclass
class Sample:
    """The parsed call: its parts, how to rebuild it, the batch size, canvas and device."""

    parts: list[Part]
    structure: str  # "bare" (one image), "tuple" (image and keywords), "dict"
    batched: bool
    size: tuple[int, int]
    batch_size: int
    device: torch.device

    def rebuild(self, outputs: list):
        """The outputs (in the parts' batch form) in the structure the call came in."""
        values = [p.back(o) if p.back is not None else o for p, o in zip(self.parts, outputs)]
        if self.structure == "bare":
            return values[0]
        if self.structure == "tuple":
            return tuple(values)
        return {p.name: v for p, v in zip(self.parts, values)}


def _kind_of(name: str) -> str:
    if name in _RENAMED:
        raise ValueError(
            f"{name}: name this part {_RENAMED[name]!r} (parts: {', '.join(PART_KINDS)}; "
            "other names pass through unchanged)"
        )
    return name if name in PART_KINDS else "other"


def to_batch(name: str, kind: str, value, batched: bool) -> Part:
    """One part in the library's batch form (see the module's table)."""
    if kind in ("image", "mask"):
        return _image_batch(name, value, batched, kind)
    if kind == "video":
        return _video_batch(name, value, batched)
    if kind in ("boxes", "keypoints"):
        return _points_batch(name, kind, value, batched)
    return Part(name, kind, value)


def _is_batch_of_ids(ids) -> bool:
    if ids is None or isinstance(ids, (int, np.integer)):
        return False
    return not (torch.is_tensor(ids) and ids.dim() == 0)


def parse_sample(
    inputs: tuple, named: Mapping, *, ids=None, size=None, recorded: int | None = None
) -> Sample:
    """The sample of a call ``transform(*inputs, **named)`` (``recorded``: the number of
    samples of replayed params, if any)."""
    if len(inputs) > 1:
        raise TypeError(
            f"expected one sample: an image or a dict of parts, and parts by name "
            f"(image=..., mask=..., boxes=..., keypoints=...); got {len(inputs)} positional "
            "arguments"
        )
    if inputs and isinstance(inputs[0], Mapping):
        if named:
            raise TypeError("expected a dict of parts or parts by name, not both")
        items, structure = list(inputs[0].items()), "dict"
    elif inputs:
        items = [("image", inputs[0]), *named.items()]
        structure = "tuple" if named else "bare"
    elif named:
        items, structure = list(named.items()), "dict"
    else:
        raise TypeError("expected a sample: an image, a dict of parts, or parts by name")
    for key, _ in items:
        if not isinstance(key, str):
            raise TypeError(f"expected parts named by strings, got the key {key!r}")
    kinds = [_kind_of(key) for key, _ in items]
    if kinds.count("image") > 1:
        raise TypeError("image: given twice (positionally and by name)")
    primary = next(((k, v) for (_, v), k in zip(items, kinds) if k in ("image", "video")), None)
    if primary is None:
        batched = _is_batch_of_ids(ids) or (recorded is not None and recorded > 1)
    elif primary[0] == "image":
        batched = getattr(primary[1], "ndim", 0) == 4
    else:
        batched = getattr(primary[1], "ndim", 0) == 5
    parts = [to_batch(key, kind, value, batched) for (key, value), kind in zip(items, kinds)]
    return _describe(parts, structure, batched, size)


def _describe(parts: list[Part], structure: str, batched: bool, size) -> Sample:
    """Check that the parts agree on the batch size and the canvas, and find the device."""
    canvas, count, device, spatial = None, None, None, False
    for part in parts:
        if part.kind == "other":
            continue
        batch = part.batch
        n = len(batch) if isinstance(batch, list) else batch.shape[0]
        if count is None:
            count = n
        elif n != count:
            raise ValueError(f"{part.name}: expected {count} samples (the batch), got {n}")
        if part.kind in _SPATIAL:
            hw = tuple(int(s) for s in batch.shape[-2:])
            if canvas is None:
                canvas = hw
            elif hw != canvas:
                raise ValueError(
                    f"{part.name}: expected the size (H, W) = {canvas} of the other parts, got {hw}"
                )
        first = batch[0] if isinstance(batch, list) and batch else batch
        if torch.is_tensor(first) and (device is None or (part.kind in _SPATIAL and not spatial)):
            device, spatial = first.device, part.kind in _SPATIAL
    if count is None:
        raise TypeError(
            f"expected at least one of the parts {', '.join(PART_KINDS)}; got only "
            f"{[p.name for p in parts]}"
        )
    if canvas is None:
        if size is None:
            raise ValueError(
                "size: boxes and keypoints alone need the canvas: pass size=(H, W) or an image"
            )
        if (
            not isinstance(size, Sequence)
            or len(size) != 2
            or not all(isinstance(s, (int, np.integer)) and s >= 2 for s in size)
        ):
            raise ValueError(f"size: expected (H, W), integers >= 2, got {size!r}")
        canvas = (int(size[0]), int(size[1]))
    elif size is not None and tuple(size) != canvas:
        raise ValueError(f"size: expected the parts' size {canvas} or None, got {tuple(size)}")
    if device is None:
        device = torch.device("cpu")
    return Sample(parts, structure, batched, canvas, count, device)
