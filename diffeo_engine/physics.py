"""Temperature helpers, the mode disc, the exact variance law, and argument validation.

The formulas are those of Petrini et al. (NeurIPS 2021), written out in design.md
section 2. Validation lives here, once, and every layer above imports it: bad input
raises ``ValueError``/``TypeError`` naming the argument and what was expected. (A little
over 500 lines: the checks stay together so that there is one place to look.)
"""

from __future__ import annotations

import functools
import math
import numbers
import os
import warnings
from collections.abc import Sequence

import torch

__all__ = [
    "CutWarning",
    "FoldingWarning",
    "OutputOverflowError",
    "check_T",
    "check_choice",
    "check_cut",
    "check_cut_for_image",
    "check_cuts",
    "check_device",
    "check_displacement",
    "check_field",
    "check_finite",
    "check_float",
    "check_ids",
    "check_images",
    "check_in_dtype",
    "check_int",
    "check_int_or_pair",
    "check_memory",
    "check_noise",
    "check_overflow",
    "check_scalar_T",
    "check_seed",
    "check_stream",
    "check_uint8_scale",
    "image_mode_masks",
    "max_cut",
    "memory_limit",
    "mode_mask",
    "mode_variances",
    "perturbation_bytes",
    "pixel_variance",
    "sine_table",
    "temperature_range",
    "typical_displacement",
    "typical_temperature",
]

IMAGE_DTYPES = (torch.uint8, torch.float16, torch.bfloat16, torch.float32, torch.float64)
SEED_LIMIT = 1 << 63
ID_LIMIT = 1 << 63  # ids are int64 and keyed into Philox as two 32-bit words
# Above this typical displacement float32 pixel coordinates lose sub-pixel resolution
# (2**23 is where their spacing reaches one pixel): the warp no longer follows the field.
MAX_TYPICAL_DISPLACEMENT = float(1 << 22)
CUT_COST_BOUND = 64  # above max_cut, cuts up to this run (with a CutWarning); beyond: refused


class FoldingWarning(UserWarning):
    """``T`` above ``T_max``: the field folds the image (it is no longer a diffeomorphism)."""


class OutputOverflowError(ValueError):
    """Finite images whose perturbation overflows the output dtype (see
    :func:`check_overflow`); a ``ValueError``, raised before anything is returned.
    ``image``: the index in the batch of the first such image."""

    def __init__(self, message: str, image: int = 0) -> None:
        super().__init__(message)
        self.image = image


class CutWarning(UserWarning):
    """``cut`` above :func:`max_cut`: the extra modes only alias lower ones."""


# --------------------------------------------------------------------------- validation


def _is_integer(value) -> bool:
    """Python and NumPy integers (``bool`` is not one here); ``type(...) is int`` first,
    because the ``numbers.Integral`` check is slow and runs several times per call."""
    if type(value) is int:
        return True
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_int(name: str, value, minimum: int = 1, maximum: int | None = None) -> int:
    """An integer in ``[minimum, maximum]`` (``bool`` is not an integer here)."""
    bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
    if not _is_integer(value):
        raise TypeError(f"{name}: expected an integer {bound}, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        raise ValueError(f"{name}: expected an integer {bound}, got {value}")
    return int(value)


def check_float(
    name: str, value, minimum: float = 0.0, *, strict: bool = False, allow_none: bool = False
):
    """A finite real number ``>= minimum`` (``> minimum`` when ``strict``)."""
    if value is None and allow_none:
        return None
    op = ">" if strict else ">="
    value = _to_float(name, value, f"a finite number {op} {minimum}")
    if not math.isfinite(value) or value < minimum or (strict and value == minimum):
        raise ValueError(f"{name}: expected a finite number {op} {minimum}, got {value}")
    return value


def check_noise(noise) -> float | None:
    """``"matched"`` (returns None) or a fixed ``sigma >= 0`` (a Python or NumPy number,
    returned as a float that stays finite in float32, the dtype noise is drawn in)."""
    if isinstance(noise, str):
        if noise != "matched":
            raise ValueError(f"noise: expected 'matched' or a sigma >= 0, got {noise!r}")
        return None
    if isinstance(noise, bool) or not isinstance(noise, numbers.Real):
        raise TypeError(f"noise: expected 'matched' or a float sigma >= 0, got {_shown(noise)}")
    sigma = _to_float("noise", noise, "'matched' or a finite sigma >= 0")
    if not sigma >= 0 or not math.isfinite(sigma):
        raise ValueError(f"noise: expected a finite sigma >= 0, got {sigma}")
    return check_in_dtype("noise", sigma, torch.float32, what="noise is drawn in float32")


def check_choice(name: str, value, choices: Sequence[str]) -> str:
    """One of a fixed set of strings."""
    if not isinstance(value, str):
        raise TypeError(f"{name}: expected one of {list(choices)}, got {value!r}")
    if value not in choices:
        raise ValueError(f"{name}: expected one of {list(choices)}, got {value!r}")
    return value


def check_int_or_pair(name: str, value, minimum: int = 1) -> tuple[int, int]:
    """An integer ``n`` (meaning ``(n, n)``) or a pair of integers, each ``>= minimum``."""
    if _is_integer(value):
        n = check_int(name, value, minimum)
        return n, n
    if isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2:
        first, second = value
        return check_int(f"{name}[0]", first, minimum), check_int(f"{name}[1]", second, minimum)
    raise TypeError(f"{name}: expected an integer or a pair (H, W) of integers, got {value!r}")


def check_seed(seed) -> int:
    """A seed is an integer in ``[0, 2**63)``."""
    if not _is_integer(seed):
        raise TypeError(f"seed: expected an integer in [0, 2**63), got {type(seed).__name__}")
    if not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"seed: expected an integer in [0, 2**63), got {seed}")
    return int(seed)


def check_cut(cut, *, minimum: int = 1, maximum: int | None = None) -> int:
    """``cut`` is an integer ``>= minimum`` (and ``<= maximum`` where a backend has one)."""
    if not _is_integer(cut):
        raise TypeError(f"cut: expected an integer >= {minimum}, got {cut!r}")
    if cut < minimum:
        why = " (log 1 = 0: there is no temperature range)" if minimum == 2 else ""
        raise ValueError(f"cut: expected an integer >= {minimum}, got {cut}{why}")
    if maximum is not None and cut > maximum:
        raise ValueError(f"cut: expected an integer <= {maximum} for this backend, got {cut}")
    return int(cut)


def _one_per_image(name: str, values: torch.Tensor, n_images: int, what: str) -> torch.Tensor:
    """A 0-d tensor broadcast to ``(n_images,)``, or one of that shape."""
    if values.dim() == 0:
        return values.reshape(1).expand(n_images)
    if values.shape != (n_images,):
        raise ValueError(f"{name}: expected {what}, shape ({n_images},), got {tuple(values.shape)}")
    return values


def check_cuts(
    cut, n_images: int, device: torch.device | str | None, *, maximum: int | None = None
) -> tuple[int, torch.Tensor | None]:
    """``cut`` as ``(largest, per_image)``: an integer gives ``(cut, None)``; one integer per
    image (an integer tensor of shape ``(n_images,)`` or 0-d, or a sequence) gives the
    batch's largest and an int64 tensor ``(n_images,)`` on ``device``. Each image keeps its
    own disc of modes; the largest only sizes the work (one host read for a CUDA tensor).
    """
    if not torch.is_tensor(cut):
        if _is_integer(cut) or isinstance(cut, (str, bytes)) or not _iterable(cut):
            return check_cut(cut, maximum=maximum), None
        values = list(cut)
        for value in values:
            check_cut(value, maximum=maximum)
        cut = torch.tensor(values, dtype=torch.int64)
    elif cut.dtype.is_floating_point or cut.dtype.is_complex or cut.dtype == torch.bool:
        raise TypeError(f"cut: expected an integer or an integer tensor, got dtype {cut.dtype}")
    cut = _one_per_image("cut", cut, n_images, "an integer or one per image")
    if n_images == 0:
        return 1, cut.to(device=device, dtype=torch.int64)
    low, high = (int(v) for v in torch.aminmax(cut))
    check_cut(low, maximum=maximum)
    check_cut(high, maximum=maximum)
    return high, cut.to(device=device, dtype=torch.int64).contiguous()


def check_stream(stream, limit: int) -> int:
    if not _is_integer(stream) or not 0 <= stream < limit:
        raise ValueError(f"stream: expected an integer in [0, {limit}), got {stream!r}")
    return int(stream)


def _shown(value) -> str:
    """A short ``repr`` for messages (an integer of 400 digits is not printed whole)."""
    if _is_integer(value) and abs(int(value)) >= 10**30:
        return f"an integer of about {int(int(value).bit_length() * 0.30103) + 1} digits"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _to_float(name: str, value, expected: str) -> float:
    """``float(value)`` for a real number, refusing (naming ``name``) what does not convert
    (an integer beyond the float range, a type whose ``__float__`` fails)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected {expected}, got {_shown(value)}")
    try:
        return float(value)
    except OverflowError:
        raise ValueError(
            f"{name}: expected {expected}, got {_shown(value)} (beyond the float range)"
        ) from None
    except (TypeError, ValueError) as error:
        raise TypeError(
            f"{name}: expected {expected}, got {_shown(value)} (float() fails: {error})"
        ) from None


def _check_positive_size(name: str, value) -> float:
    number = _to_float(name, value, "a positive number")
    if not math.isfinite(number) or number <= 0:
        raise ValueError(f"{name}: expected a positive finite number, got {_shown(value)}")
    return number


def _check_scalar_T(T) -> float:
    if isinstance(T, bool) or not isinstance(T, numbers.Real):
        raise TypeError(f"T: expected a non-negative float or a tensor, got {type(T).__name__}")
    value = _to_float("T", T, "a finite temperature >= 0")
    if not math.isfinite(value):
        raise ValueError(f"T: expected a finite temperature, got {value}")
    if value < 0:
        raise ValueError(f"T: expected a temperature >= 0, got {value}")
    return value


def check_scalar_T(T) -> float:
    """One temperature: a finite real number ``>= 0`` (``bool`` refused)."""
    return _check_scalar_T(T)


def check_T(T, n_images: int, device: torch.device, *, check_values: bool = True) -> torch.Tensor:
    """``T`` as a float32 tensor of shape ``(n_images,)`` on ``device``.

    A float is broadcast; a tensor must be a scalar or have one entry per image, be of a
    floating dtype and live on ``device``. Values must be finite and ``>= 0`` (checked
    unless ``check_values`` is off, as under ``torch.compile`` where values are unknown).
    """
    if not torch.is_tensor(T):
        value = _check_scalar_T(T)
        check_in_dtype("T", value, torch.float32, what="temperatures are float32")
        return torch.full((n_images,), value, dtype=torch.float32, device=device)
    if not T.is_floating_point():
        raise TypeError(f"T: expected a floating-point tensor, got dtype {T.dtype}")
    if T.device != torch.device(device):
        raise ValueError(f"T: expected a tensor on {device} (the images' device), got {T.device}")
    T = _one_per_image("T", T, n_images, "a scalar or one temperature per image")
    if check_values and T.numel() > 0:
        if not bool(torch.isfinite(T).all()):
            raise ValueError("T: expected finite temperatures, got NaN or inf")
        if bool((T < 0).any()):
            raise ValueError(f"T: expected temperatures >= 0, got minimum {float(T.min())}")
        check_in_dtype("T", float(T.max()), torch.float32, what="temperatures are float32")
    return T.to(torch.float32).contiguous()


def check_ids(
    ids, n_images: int, device: torch.device | str | None, *, tensor_values: bool = True
) -> torch.Tensor:
    """Image ids as an int64 tensor of shape ``(n_images,)``; ``None`` means ``0..n-1``.

    Ids are integers in ``[0, 2**63)``: a sequence, any iterable (read once, e.g. a
    generator) or an integer tensor. Python values and CPU tensors are checked here (a
    CUDA tensor's values are not read: that would cost a device sync); with
    ``tensor_values=False`` a tensor's values are not read at all: :mod:`~diffeo_engine.rng`
    keeps any int64 id as its 64-bit pattern. NumPy integers are integers, and a tensor
    may have any integer dtype: a ``uint64`` id from ``2**63`` on is refused (on a CUDA
    tensor, not read, it is the int64 of the same bits).
    """
    if ids is None:
        return torch.arange(n_images, dtype=torch.int64, device=device)
    bound = "integers in [0, 2**63)"
    if not torch.is_tensor(ids):
        if _is_integer(ids) or isinstance(ids, (str, bytes)) or not _iterable(ids):
            raise TypeError(
                f"ids: expected {n_images} {bound} (a sequence or an int64 tensor), "
                f"got {type(ids).__name__} {ids!r}"
            )
        values = list(ids)  # an iterator (a generator) is read exactly once
        for value in values:
            if not _is_integer(value):
                raise TypeError(f"ids: expected {bound}, got {value!r}")
            if not 0 <= value < ID_LIMIT:
                raise ValueError(f"ids: expected {bound}, got {value}")
        if len(values) != n_images:
            raise ValueError(f"ids: expected one id per image ({n_images}), got {len(values)}")
        return torch.tensor(values, dtype=torch.int64, device=device)
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"ids: expected an integer tensor, got dtype {ids.dtype}")
    if device is not None and ids.device != torch.device(device):
        raise ValueError(
            f"ids: expected a tensor on {device} (the images' device), got {ids.device}"
        )
    if ids.shape != (n_images,):
        raise ValueError(
            f"ids: expected one id per image, shape ({n_images},), got {tuple(ids.shape)}"
        )
    out = ids.to(torch.int64)  # (min is not implemented for unsigned dtypes)
    if (
        tensor_values
        and out.device.type == "cpu"
        and out.numel()
        and not torch.compiler.is_compiling()
    ):
        low = int(out.min())
        if low < 0:  # a uint64 id from 2**63 on wraps to a negative int64
            value = low + (1 << 64) if ids.dtype == torch.uint64 else low
            raise ValueError(f"ids: expected {bound}, got {value}")
    return out


def _iterable(value) -> bool:
    try:
        iter(value)
    except TypeError:
        return False
    return True


def check_images(images, name: str = "images") -> torch.Tensor:
    """A ``(B, C, H, W)`` tensor of a supported dtype with ``H, W >= 2``."""
    if not torch.is_tensor(images):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(images).__name__}")
    if images.dim() != 4:
        raise ValueError(f"{name}: expected shape (B, C, H, W), got {tuple(images.shape)}")
    if images.dtype not in IMAGE_DTYPES:
        kind = "integer images must be uint8" if not images.is_floating_point() else "a float"
        raise TypeError(
            f"{name}: expected dtype uint8, float16, bfloat16, float32 or float64 "
            f"({kind}), got {images.dtype}"
        )
    H, W = images.shape[-2:]
    if H < 2 or W < 2:
        raise ValueError(f"{name}: expected H >= 2 and W >= 2, got H={H}, W={W}")
    if images.device.type == "meta" and not torch.compiler.is_compiling():
        raise ValueError(
            f"{name}: expected a tensor with data, got one on the meta device (it has only a "
            "shape); move it to cpu or cuda first"
        )
    return images


def check_finite(images: torch.Tensor, name: str = "images", *, allow_nonfinite: bool = False):
    """Refuse NaN or inf pixels unless ``allow_nonfinite``: one such pixel would make the whole
    matched-noise image NaN (through its norm) and spread through the warp. Integer images
    are always finite and cost nothing; float images cost one read, ``aminmax`` (NaN and
    inf both reach the extremes), skipped when traced.
    """
    if not isinstance(allow_nonfinite, bool):
        raise TypeError(f"allow_nonfinite: expected True or False, got {allow_nonfinite!r}")
    if allow_nonfinite or not images.is_floating_point() or torch.compiler.is_compiling():
        return images
    if images.device.type == "meta" or images.numel() == 0:
        return images
    if not bool(torch.isfinite(torch.stack(torch.aminmax(images))).all()):
        finite = torch.isfinite(images)
        bad = int((~finite).sum())
        first = int((~finite).flatten(1).any(dim=1).nonzero()[0]) if images.dim() > 1 else 0
        raise ValueError(
            f"{name}: {bad} pixel(s) are NaN or inf (first in image {first}); clean them, or "
            "pass allow_nonfinite=True (--allow-nonfinite) to let them propagate"
        )
    return images


def check_overflow(images: torch.Tensor, out: torch.Tensor, name: str = "images") -> None:
    """A float output that is not finite although its (checked, finite) images were: a value
    overflowed the output dtype on the way (``x * 3e38``, half images near 6.5e4)."""
    if not out.is_floating_point() or torch.compiler.is_compiling() or out.device.type == "meta":
        return
    finite = torch.isfinite(out)
    if out.numel() == 0 or bool(finite.all()):
        return
    first = int((~finite).flatten(1).any(dim=1).nonzero()[0])
    limit = torch.finfo(out.dtype).max
    raise OutputOverflowError(
        f"{name}: the perturbation of image {first} overflows "
        f"{str(out.dtype).replace('torch.', '')} (largest finite value {limit:.4g}; largest "
        f"input magnitude {float(images[first].abs().max()):.4g}); scale the images down or "
        "ask for a wider out_dtype",
        image=first,
    )


def check_out_dtype(out_dtype, images: torch.Tensor) -> torch.dtype:
    """The output dtype: the input's for float images, float32 for uint8, or as asked.

    ``torch.uint8`` output of float images costs one ``aminmax`` pass over them (only in
    that combination): images on the unit scale (all within ``[-1, 1]``) are refused
    (:func:`check_uint8_scale`), since uint8 keeps the 0..255 scale and would turn them
    into 0/1 images.
    """
    if out_dtype is None:
        return torch.float32 if images.dtype == torch.uint8 else images.dtype
    if not isinstance(out_dtype, torch.dtype) or out_dtype not in IMAGE_DTYPES:
        raise TypeError(
            "out_dtype: expected None, torch.uint8, float16, bfloat16, float32 or float64, "
            f"got {out_dtype!r}"
        )
    if (
        out_dtype == torch.uint8
        and images.is_floating_point()
        and images.numel() > 0
        and images.device.type != "meta"
        and not torch.compiler.is_compiling()
    ):
        low, high = (float(v) for v in torch.aminmax(images))
        check_uint8_scale(
            "out_dtype", low, high, where="these float images lie in",
            fix="scale them to 0..255 first (images * 255) or ask for a float out_dtype",
        )  # fmt: skip
    return out_dtype


def check_uint8_scale(
    name: str, low: float, high: float, *, where: str, fix: str, refuse_negative: bool = False
) -> None:
    """Refuse uint8 output of float values in ``[low, high]`` that are not on its 0..255
    scale: values all within ``[-1, 1]`` (and not all 0) would round to 0 and 1; with
    ``refuse_negative`` (a whole data set) any negative value too, which uint8 clamps to 0.
    NaN extremes are left to the finite-value checks."""
    unit = low >= -1.0 and high <= 1.0 and not low == high == 0.0
    if not (unit or (refuse_negative and low < 0)):
        return
    effect = "round every pixel to 0 or 1" if unit else "clamp negative pixels to 0"
    if unit and low < 0:
        effect += " (and clamp negative pixels to 0)"
    raise ValueError(
        f"{name}: uint8 output keeps the 0..255 scale, but {where} [{low:.3g}, {high:.3g}]; "
        f"it would {effect}. {fix[:1].upper()}{fix[1:]}"
    )


def check_same_device(**tensors: torch.Tensor | None) -> None:
    """Every given tensor lives on the device of the first one."""
    named = [(k, t) for k, t in tensors.items() if t is not None]
    first_name, first = named[0]
    for name, t in named[1:]:
        if t.device != first.device:
            raise ValueError(
                f"{name}: expected a tensor on {first.device} (the device of {first_name}), "
                f"got {t.device}"
            )


def check_interp(interp: str) -> str:
    if not isinstance(interp, str):
        raise TypeError(f"interp: expected 'bilinear' or 'nearest', got {interp!r}")
    if interp not in ("bilinear", "nearest"):
        raise ValueError(f"interp: expected 'bilinear' or 'nearest', got {interp!r}")
    return interp


def check_in_dtype(name: str, value: float, dtype: torch.dtype, *, what: str = "") -> float:
    """``value`` stays finite once converted to ``dtype`` (1e39 is inf in float32)."""
    if dtype.is_floating_point and abs(value) > torch.finfo(dtype).max:
        why = f" ({what})" if what else ""
        raise ValueError(
            f"{name}: {value:g} overflows {str(dtype).replace('torch.', '')}{why}; expected at "
            f"most {torch.finfo(dtype).max:.3g}"
        )
    return value


def max_cut(H: int, W: int) -> int:
    """The largest ``cut`` that adds a new mode on an ``H x W`` pixel grid.

    On the grid ``t = k / (n - 1)`` the sines ``sin(i pi t)`` with ``i <= n - 2`` are the
    independent ones (``i = n - 1`` vanishes at every pixel, larger ``i`` alias smaller
    ones). The disc ``sqrt(i^2 + j^2) < cut + 1/2`` holds every mode with ``i <= W - 2``,
    ``j <= H - 2`` once ``cut + 1/2 > sqrt((W - 2)^2 + (H - 2)^2)``; a larger ``cut`` adds
    only aliases (and costs ``cut^2``). ``H, W >= 2``.
    """
    if type(H) is not int or type(W) is not int or H < 2 or W < 2:  # (fast path first)
        H, W = check_int("H", H, 2), check_int("W", W, 2)
    return max(1, math.floor(math.hypot(W - 2, H - 2) - 0.5) + 1)


def check_cut_for_image(cut: int, H: int, W: int) -> int:
    """``cut`` against :func:`max_cut` of an ``H x W`` image.

    Above ``max(max_cut(H, W), CUT_COST_BOUND)`` it is refused: only aliases are added, at
    a cost growing as ``cut^2``. Between ``max_cut`` and ``CUT_COST_BOUND`` (64, the
    kernels' largest) it runs with a :class:`CutWarning`, so that small test images can
    still exercise large cuts. Images with a 2-pixel side have a zero field: no warning.
    """
    if not _is_integer(cut):
        return cut
    limit = max_cut(H, W)
    hard = max(limit, CUT_COST_BOUND)
    if cut > hard:
        raise ValueError(
            f"cut: expected an integer <= {hard} for {H}x{W} images, got {cut} (modes beyond "
            f"cut = {limit} only alias lower ones on this pixel grid)"
        )
    if cut > limit and min(H, W) > 2 and not torch.compiler.is_compiling():
        warnings.warn(
            f"cut: {cut} is above {limit}, the largest cut that adds a mode on {H}x{W} "
            "images; the extra modes alias lower ones (the field no longer follows the "
            "max-entropy law)",
            CutWarning,
            stacklevel=4,
        )
    return cut


def check_field(T, cut: int, H: int, W: int, cuts: torch.Tensor | None = None) -> None:
    """``T`` and ``cut`` against the image size, before the field is drawn.

    ``cut`` (the batch's largest when ``cuts`` gives one per image) is checked by
    :func:`check_cut_for_image`. A typical
    displacement above ``MAX_TYPICAL_DISPLACEMENT`` pixels (float32 coordinates lose
    sub-pixel resolution) is refused naming ``T``; ``T`` above ``T_max`` warns
    (:class:`FoldingWarning`): the field folds the image. Each image is judged with its own
    ``T`` and ``cut``. Values of tensors are read only on the CPU (no device sync), and not
    at all under ``torch.compile``.
    """
    if cuts is None and type(T) is float and type(cut) is int and _quiet(T, cut, H, W):
        return  # a setting seen before, with nothing to say (a transform's every sample)
    check_cut_for_image(cut, H, W)
    if torch.compiler.is_compiling():
        return
    if not _is_integer(cut) or cut < 2:
        return
    if cuts is not None and cuts.device.type != "cpu":
        cuts = None  # judged at the largest cut below
    if torch.is_tensor(T):
        if T.device.type != "cpu" or T.numel() == 0:
            return
        if cuts is None:
            T = float(T.max())
    elif isinstance(T, bool) or not isinstance(T, numbers.Real) or not math.isfinite(T) or T < 0:
        return  # check_T names the problem
    side = math.sqrt(H * W)
    if cuts is None:
        worst_T, worst_cut = float(T), cut
    else:  # every image with its own cut; the one moving the most is named
        Ts = (T if torch.is_tensor(T) else torch.tensor(float(T))).to(torch.float64)
        Ts = Ts.expand(cuts.shape)
        if not bool(torch.isfinite(Ts).all()) or bool((Ts < 0).any()):
            return  # check_T names the problem
        logs = cuts.clamp(min=2).to(torch.float64).log()
        shift = side * (math.pi * Ts * logs).sqrt() / 2 * (cuts >= 2)
        worst = int(shift.argmax())
        fold = 4.0 / (math.pi**3 * cuts.to(torch.float64) ** 2 * logs)
        folding = (Ts > fold) & (cuts >= 2)
        if bool(folding.any()) and shift[worst] <= MAX_TYPICAL_DISPLACEMENT:
            worst = int(folding.nonzero()[0])
        worst_T, worst_cut = float(Ts[worst]), int(cuts[worst])
        if worst_cut < 2:
            return
    if not math.isfinite(worst_T) or worst_T < 0:
        return  # check_T names the problem
    shift, fold = _field_limits(worst_T, worst_cut, side)
    at = "" if cuts is None else f" (image {worst})"
    if shift > MAX_TYPICAL_DISPLACEMENT:
        raise ValueError(
            f"T: {worst_T:g}{at} gives a typical displacement of {shift:.3g} px on {H}x{W} "
            f"images; expected at most {MAX_TYPICAL_DISPLACEMENT:.3g} px (T_max is "
            f"{fold:.3g} for cut={worst_cut})"
        )
    if fold < worst_T:
        warnings.warn(
            f"T: {worst_T:g}{at} is above T_max = {fold:.3g} for cut={worst_cut} on {H}x{W} "
            f"images: the field folds the image (typical displacement {shift:.3g} px)",
            FoldingWarning,
            stacklevel=3,
        )


@functools.lru_cache(maxsize=256)
def _quiet(T: float, cut: int, H: int, W: int) -> bool:
    """Whether :func:`check_field` has nothing to refuse or warn about for this setting."""
    if not (math.isfinite(T) and T >= 0 and 1 <= cut <= max_cut(H, W)):
        return False
    if cut < 2:
        return True
    shift, fold = _field_limits(T, cut, math.sqrt(H * W))
    return shift <= MAX_TYPICAL_DISPLACEMENT and fold >= T


@functools.lru_cache(maxsize=256)
def _field_limits(T: float, cut: int, side: float) -> tuple[float, float]:
    """``(typical displacement, T_max)``: computed once per setting (a transform calls
    :func:`check_field` with the same values on every sample)."""
    return typical_displacement(T, cut, side), _temperature_bounds(side, cut)[1]


def check_displacement(displacement: torch.Tensor) -> torch.Tensor:
    """A displacement field must be finite (NaN would index outside the image)."""
    if torch.compiler.is_compiling() or displacement.device.type == "meta":
        return displacement
    finite = torch.isfinite(displacement)
    if not bool(finite.all()):
        first = int((~finite).flatten(1).any(dim=1).nonzero()[0])
        raise ValueError(
            f"displacement: {int((~finite).sum())} value(s) are NaN or inf (first in image "
            f"{first}); expected a finite field in pixels"
        )
    return displacement


def check_device(value, name: str = "device") -> torch.device:
    """A device torch knows and this machine has (``'gpu'`` and ``'cuda'`` without CUDA
    are refused in one line)."""
    if isinstance(value, torch.device):
        device = value
    else:
        if not isinstance(value, str):
            raise TypeError(f"{name}: expected a device such as 'cpu' or 'cuda', got {value!r}")
        try:
            device = torch.device(value)
        except RuntimeError:
            hint = " (did you mean 'cuda'?)" if value.lower().startswith("gpu") else ""
            raise ValueError(
                f"{name}: expected a device such as 'cpu', 'cuda' or 'cuda:1', got {value!r}{hint}"
            ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"{name}: {value!r} asked for, but CUDA is not available here (torch "
                f"{torch.__version__}, no usable GPU); use "
                + ("--device cpu" if name.startswith("--") else f"{name}='cpu'")
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"{name}: {value!r} asked for, but this machine has "
                f"{torch.cuda.device_count()} CUDA device(s)"
            )
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{name}: {value!r} asked for, but MPS is not available here")
    elif device.type == "meta":
        raise ValueError(f"{name}: the meta device holds no data; use cpu or cuda")
    return device


# ------------------------------------------------------------------------------ memory

# Below this many bytes an operation is not weighed against the machine (reading the
# limits costs a few system calls; any machine this library runs on gives 256 MiB).
MEMORY_CHECK_FLOOR = 1 << 28


@functools.lru_cache(maxsize=1)
def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):
        return None


@functools.lru_cache(maxsize=1)
def _cgroup_memory() -> int | None:
    """The memory limit of this process's cgroup (v2, else v1), if one is set."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as handle:
                text = handle.read().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:
            return int(text)
    return None


def _address_space_left() -> int | None:
    """What ``RLIMIT_AS`` leaves this process (None when unlimited or unknown)."""
    try:
        import resource
    except ImportError:  # not on this platform
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY or soft < 0:
        return None
    used = 0
    try:
        with open("/proc/self/statm") as handle:
            used = int(handle.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    return max(soft - used, 0)


def _gb(nbytes: float) -> str:
    return f"{nbytes / 1e9:,.3g} GB" if nbytes < 1e12 else f"{nbytes / 1e9:,.0f} GB"


def memory_limit(device: torch.device | str | None = None) -> tuple[int, str] | None:
    """``(bytes, what bounds them)``: the most memory one operation on ``device`` can hope
    for. CUDA: the device's total memory. CPU: the machine's physical memory (one
    ``sysconf``), lowered by this process's cgroup limit and by what ``RLIMIT_AS`` leaves
    it. None for devices whose memory is not known here."""
    device = torch.device("cpu") if device is None else torch.device(device)
    if device.type == "cuda":
        index = torch.cuda.current_device() if device.index is None else device.index
        total = int(torch.cuda.get_device_properties(index).total_memory)
        return total, f"the {_gb(total)} of cuda:{index}"
    if device.type != "cpu":
        return None
    bounds = []
    physical = _physical_memory()
    if physical:
        bounds.append((physical, f"the {_gb(physical)} of memory of this machine"))
    cgroup = _cgroup_memory()
    if cgroup:
        bounds.append((cgroup, f"the {_gb(cgroup)} memory limit of this process's cgroup"))
    left = _address_space_left()
    if left is not None:
        bounds.append((left, f"the {_gb(left)} of address space RLIMIT_AS leaves this process"))
    return min(bounds) if bounds else None


def check_memory(name: str, nbytes: float, device=None, *, what: str) -> None:
    """Refuse, naming ``name``, an operation that would allocate about ``nbytes`` (its
    outputs and the temporaries of the path that runs) on ``device`` beyond
    :func:`memory_limit`: one ``ValueError`` before any work, not the allocator's error
    (or a swapping machine) half-way. Nothing is read below ``MEMORY_CHECK_FLOOR``."""
    if nbytes <= MEMORY_CHECK_FLOOR or torch.compiler.is_compiling():
        return
    bound = memory_limit(device)
    if bound is not None and nbytes > bound[0]:
        raise ValueError(
            f"{name}: {what} would take about {_gb(nbytes)} of memory, more than "
            f"{bound[1]}; use smaller sizes or batches"
        )


def _largest(parts: dict[str, float]) -> str:
    """The name whose share of an estimate is the largest (the one to blame)."""
    return max(parts, key=parts.get)


def perturbation_bytes(
    shape: Sequence[int],
    out_dtype: torch.dtype,
    *,
    outputs: int,
    path: str,
    cut: int = 1,
    chunk: int | None = None,
) -> int:
    """About the bytes ``deform`` (``outputs=1``) or ``perturb`` (2) of images of ``shape``
    ``(B, C, H, W)`` allocates on ``path``: the outputs, plus the temporaries measured for
    each path: ``"triton"`` none to speak of, ``"cpu"`` one image's scratch per thread,
    ``"torch"`` (the reference) its compute-dtype outputs and, per ``chunk`` of images, the
    gathers, the field and the Philox draws."""
    B, C, H, W = (int(v) for v in shape)
    pixels = H * W
    total = outputs * B * C * pixels * out_dtype.itemsize
    if path == "cpu":
        total += min(B, torch.get_num_threads()) * pixels * (8 * outputs * C + 40)
    elif path == "torch":
        chunk = B if chunk is None else min(B, chunk)
        total += outputs * B * C * pixels * 8
        total += chunk * (pixels * (24 * outputs * C + 96) + 2 * cut * cut * 128)
    return total


# ----------------------------------------------------------------------------- physics


def _area(n: float) -> float:
    """``n^2`` of a checked side, refused where it leaves the float range."""
    area = n * n
    if area == 0 or math.isinf(area):
        size = "small" if area == 0 else "large"
        raise ValueError(f"n: {n:g} is too {size}: n^2 is {area:g} in floating point")
    return area


def _temperature_bounds(n: float, cut: int) -> tuple[float, float]:
    """``(T_min, T_max)`` of design.md section 2 on checked arguments, whether or not they
    cross; both must be positive floats (a side or cut beyond the float range is refused)."""
    log_cut = math.log(cut)
    T_min = 1.0 / (math.pi * _area(n) * log_cut)
    try:
        T_max = 4.0 / (math.pi**3 * float(cut) ** 2 * log_cut)
    except OverflowError:
        T_max = 0.0
    if not T_min > 0:
        raise ValueError(f"n: {n:g} is too large: T_min = 1 / (pi n^2 log cut) underflows to 0")
    if not T_max > 0:
        raise ValueError(
            f"cut: {_shown(cut)} is too large: T_max = 4 / (pi^3 cut^2 log cut) underflows to 0"
        )
    return T_min, T_max


def temperature_range(n: int, cut: int, *, strict: bool = True) -> tuple[float, float]:
    """``(T_min, T_max)`` for a square image of side ``n``: half-pixel displacement, no folds.

    For ``cut > 2 n / pi`` the two cross (half-pixel motion already folds the image: no
    temperature moves it visibly without folding): refused naming ``cut`` unless
    ``strict=False``, which returns the crossed pair (``T_min > T_max``).
    """
    n = _check_positive_size("n", n)
    cut = check_cut(cut, minimum=2)
    if not isinstance(strict, bool):
        raise TypeError(f"strict: expected True or False, got {strict!r}")
    T_min, T_max = _temperature_bounds(n, cut)
    if strict and T_min > T_max:
        raise ValueError(
            f"cut: {cut} is above 2 n / pi = {2 * n / math.pi:.3g} for images of side n = "
            f"{n:g}: T_min = {T_min:.3g} (half-pixel motion) exceeds T_max = {T_max:.3g} "
            f"(folds), so no temperature moves the image visibly without folding it; use "
            f"cut <= {max(2, math.floor(2 * n / math.pi))} or larger images"
        )
    return T_min, T_max


def _finite(name: str, value: float, what: str) -> float:
    if not math.isfinite(value):
        raise ValueError(f"{name}: {what} overflows a float (got {value})")
    return value


def typical_displacement(T: float, cut: int, n: int) -> float:
    """Typical displacement in pixels at the centre of a square image of side ``n``."""
    T = _check_scalar_T(T)
    check_cut(cut, minimum=2)
    n = _check_positive_size("n", n)
    shift = n * math.sqrt(math.pi * T * math.log(cut)) / 2.0
    return _finite("T", shift, f"the typical displacement of T = {T:g} on side n = {n:g}")


def typical_temperature(delta: float, cut: int, n: int) -> float:
    """The temperature whose typical displacement is ``delta`` pixels (inverse of the above)."""
    delta = _to_float("delta", delta, "a displacement >= 0 in pixels")
    if not math.isfinite(delta) or delta < 0:
        raise ValueError(f"delta: expected a finite displacement >= 0, got {delta}")
    check_cut(cut, minimum=2)
    n = _check_positive_size("n", n)
    T = 4.0 * delta * delta / (math.pi * _area(n) * math.log(cut))
    if delta > 0 and T == 0:
        name, what = ("delta", "small") if delta * delta == 0 else ("n", "large")
        raise ValueError(
            f"{name}: {locals()[name]:g} is too {what}: the temperature underflows to 0"
        )
    return _finite("delta", T, f"the temperature of a {delta:g}-pixel displacement")


def _device_arg(device) -> torch.device | None:
    """A ``device=`` argument: None, or a device this machine has (``'gpu'`` and ``'cuda'``
    without CUDA refused naming ``device``); a CPU ``torch.device`` costs nothing, and the
    meta device (shapes only, as for compiling kernels offline) is let through."""
    if device is None or (isinstance(device, torch.device) and device.type == "cpu"):
        return device
    if torch.compiler.is_compiling() or device in ("meta", "cpu"):
        return device
    if isinstance(device, torch.device) and device.type == "meta":
        return device
    return check_device(device, "device")


def mode_mask(cut: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Boolean ``(cut, cut)``: mode ``(i, j)`` at ``[i - 1, j - 1]`` is kept iff
    ``sqrt(i^2 + j^2) < cut + 1/2``."""
    cut = check_cut(cut)
    device = _device_arg(device)
    check_memory("cut", 4 * 8 * cut * cut, device, what=f"a ({cut}, {cut}) table of modes")
    k = torch.arange(1, cut + 1, device=device, dtype=torch.float64)
    r2 = k[:, None] ** 2 + k[None, :] ** 2
    return r2 < (cut + 0.5) ** 2


def image_mode_masks(cuts: torch.Tensor, cut: int) -> torch.Tensor:
    """Boolean ``(B, cut, cut)``: image ``b`` keeps mode ``(i, j)`` iff it lies in its own
    disc ``sqrt(i^2 + j^2) < cuts[b] + 1/2`` (``cut``: the batch's largest)."""
    k = torch.arange(1, cut + 1, device=cuts.device, dtype=torch.int64)
    r2 = k[:, None] ** 2 + k[None, :] ** 2
    return r2 <= (cuts * (cuts + 1))[:, None, None]  # i^2 + j^2 < (c + 1/2)^2 in integers


def mode_variances(cut: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``1 / (i^2 + j^2)`` on the disc, 0 outside: the coefficient variance per unit ``T``."""
    mask = mode_mask(cut, device)  # checks cut and device first
    k = torch.arange(1, cut + 1, device=mask.device, dtype=torch.float64)
    r2 = k[:, None] ** 2 + k[None, :] ** 2
    return torch.where(mask, 1.0 / r2, torch.zeros_like(r2))


def pixel_variance(T: float, cut: int, H: int, W: int) -> torch.Tensor:
    """Exact ``Var u(yh, xh)`` on the ``H x W`` pixel grid, float64 ``(H, W)``.

    ``sum over the disc of T sin^2(i pi xh) sin^2(j pi yh) / (i^2 + j^2)``; the variance of
    the displacement ``dx`` is ``W^2`` times this, that of ``dy`` ``H^2`` times it. ``H`` and
    ``W`` are at least 2 (``xh = x / (W - 1)``).
    """
    T = _check_scalar_T(T)
    cut = check_cut(cut)
    H, W = check_int("H", H, 2), check_int("W", W, 2)
    parts = {"H, W": 3 * 8 * H * W, "cut": 8 * (4 * cut * cut + 3 * (H + W) * cut)}
    check_memory(
        _largest(parts), sum(parts.values()), "cpu",
        what=f"the variance on {H}x{W} pixels with cut = {cut}",
    )  # fmt: skip
    k = torch.arange(1, cut + 1, dtype=torch.float64)
    xh = torch.arange(W, dtype=torch.float64) / (W - 1)
    yh = torch.arange(H, dtype=torch.float64) / (H - 1)
    sx2 = torch.sin(math.pi * xh[:, None] * k[None, :]) ** 2  # (W, cut) over i
    sy2 = torch.sin(math.pi * yh[:, None] * k[None, :]) ** 2  # (H, cut) over j
    return T * torch.einsum("ij,xi,yj->yx", mode_variances(cut), sx2, sy2)


def sine_table(
    n: int, cut: int, *, device=None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``(n, cut)`` table ``sin(k pi t / (n - 1))`` for pixel ``t`` and mode ``k = 1..cut``
    (``n >= 2``).

    Shared by every image of a batch: the field is ``S_y C^T S_x^T`` (design.md section 2).
    Computed in float64 and rounded once, so every backend starts from the same table.
    """
    n, cut = check_int("n", n, 2), check_cut(cut)
    device = _device_arg(device)
    check_memory(
        "n" if n >= cut else "cut", 3 * 8 * n * cut, device,
        what=f"a ({n}, {cut}) sine table",
    )  # fmt: skip
    t = torch.arange(n, dtype=torch.float64, device=device) / (n - 1)
    k = torch.arange(1, cut + 1, dtype=torch.float64, device=device)
    return torch.sin(math.pi * t[:, None] * k[None, :]).to(dtype)
