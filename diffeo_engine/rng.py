"""Philox4x32-10 in PyTorch integer arithmetic: the twin of Triton's ``tl.philox``.

Every random number of the library is keyed by ``(seed, image id, stream, counter)``
(design.md section 3). The Philox key is the 64-bit ``seed`` and the four 32-bit counter
words are::

    c0 = counter      c1 = stream      c2 = low 32 bits of id      c3 = high 32 bits of id

so ``tl.philox(seed, counter, stream, id_lo, id_hi)`` in a Triton kernel returns the very
same integers as :func:`philox4x32` here. Streams in use:

* ``0`` / ``1``: the coefficients of ``dx`` / ``dy``; mode ``(i, j)`` (1-based, ``i``
  along x) sits at counter ``((i - 1) << 16) | (j - 1)`` and takes the first Box-Muller
  normal of words ``(r0, r1)``, so a mode's coefficient does not depend on ``cut``;
* ``2 + c * H + y``: the noise ``z[c, y, x]``, at counter ``x >> 2``; the four words give
  four normals, ``(r0, r1) -> lanes 0, 1`` and ``(r2, r3) -> lanes 2, 3``, lane ``x & 3``;
* ``USER_STREAM_BASE + k``: free for other perturbations (see :func:`stream_normals`).

Uint32 values live in int64 tensors; products are split in 16-bit halves so that nothing
overflows, which makes the generator run on any device PyTorch supports. The key may also be
a 0-d int64 tensor, so that a compiled caller (:mod:`diffeo_engine.compiled`) does not
specialise on the seed; the integers are the same either way.
"""

from __future__ import annotations

import torch

from diffeo_engine.physics import check_ids, check_seed, check_stream

__all__ = [
    "COEFF_STREAM_DX",
    "COEFF_STREAM_DY",
    "MAX_CUT",
    "NOISE_STREAM_BASE",
    "USER_STREAM_BASE",
    "box_muller",
    "coefficient_normals",
    "noise_normals",
    "philox4x32",
    "stream_normals",
    "stream_uniforms",
    "uniform_from_uint32",
]

MASK32 = 0xFFFFFFFF
PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
PHILOX_ROUNDS = 10

COEFF_STREAM_DX = 0
COEFF_STREAM_DY = 1
NOISE_STREAM_BASE = 2
USER_STREAM_BASE = 1 << 31
MAX_CUT = 1 << 16  # the coefficient counter packs (i - 1, j - 1) in 16 bits each

# Triton's uint_to_uniform_float scale for 32-bit words, and its Box-Muller constants.
_UNIFORM_SCALE = 4.6566127342e-10
_TWO_PI = 6.283185307179586
_U1_FLOOR = 1.0e-7


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of ``a * b`` for a uint32 constant ``a`` and uint32 ``b``."""
    b_lo = b & 0xFFFF
    b_hi = b >> 16
    p_lo = a * b_lo  # < 2**48
    p_hi = a * b_hi  # < 2**48
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = (((p_hi & 0xFFFF) << 16) + p_lo) & MASK32
    return hi, lo


def philox4x32(
    seed: int | torch.Tensor,
    c0: torch.Tensor,
    c1: torch.Tensor,
    c2: torch.Tensor,
    c3: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32-10 with key ``seed`` (64 bits) on broadcastable counter words.

    Counter words are integer tensors whose values are taken modulo ``2**32``; the four
    returned words are int64 tensors holding uint32 values, bit-identical to
    ``tl.philox(seed, c0, c1, c2, c3)``. ``seed`` is an int or a 0-d int64 tensor.
    """
    c0, c1, c2, c3 = (torch.as_tensor(c).to(torch.int64) & MASK32 for c in (c0, c1, c2, c3))
    c0, c1, c2, c3 = torch.broadcast_tensors(c0, c1, c2, c3)
    k0 = seed & MASK32
    k1 = (seed >> 32) & MASK32
    for _ in range(PHILOX_ROUNDS):
        hi_b, lo_b = _mulhilo(PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mulhilo(PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + PHILOX_KEY_A) & MASK32
        k1 = (k1 + PHILOX_KEY_B) & MASK32
    return c0, c1, c2, c3


def uniform_from_uint32(words: torch.Tensor) -> torch.Tensor:
    """Triton's ``uint_to_uniform_float`` for 32-bit words: float32 in ``[0, 1)``."""
    signed = torch.where(words >= 1 << 31, words - (1 << 32), words)
    signed = torch.where(signed < 0, -signed - 1, signed)  # ~x for negative x
    return signed.to(torch.float32) * _UNIFORM_SCALE


def box_muller(u1: torch.Tensor, u2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton's ``pair_uniform_to_normal``: two float32 standard normals per uniform pair."""
    u1 = torch.clamp(u1, min=_U1_FLOOR)
    theta = u2 * _TWO_PI
    radius = torch.sqrt(torch.log(u1) * -2.0)
    return radius * torch.cos(theta), radius * torch.sin(theta)


def _checked_key(seed: int, ids, device) -> torch.Tensor:
    check_seed(seed)
    n = ids.shape[0] if torch.is_tensor(ids) else len(ids)
    return check_ids(ids, n, device, tensor_values=False)


def _id_words(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    ids = ids.to(torch.int64)
    return ids & MASK32, (ids >> 32) & MASK32


def coefficient_normals(
    seed: int, ids: torch.Tensor, cut: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """Standard normals ``(B, 2, cut, cut)`` behind the field coefficients of each image.

    ``[b, s, i - 1, j - 1]`` is the draw of stream ``s`` (0: dx, 1: dy) for mode ``(i, j)``.
    """
    ids = _checked_key(seed, ids, device)
    if not 1 <= cut <= MAX_CUT:
        raise ValueError(f"cut: expected an integer in [1, {MAX_CUT}], got {cut}")
    return _coefficient_normals(seed, ids, cut)


def _coefficient_normals(seed: int | torch.Tensor, ids: torch.Tensor, cut: int) -> torch.Tensor:
    """:func:`coefficient_normals` on checked arguments (also traced by :mod:`compiled`)."""
    device = ids.device
    modes = torch.arange(cut, device=device, dtype=torch.int64)
    counter = (modes[:, None] << 16) | modes[None, :]  # (cut, cut): i - 1 rows, j - 1 cols
    stream = torch.arange(2, device=device, dtype=torch.int64)
    id_lo, id_hi = _id_words(ids)
    r0, r1, _, _ = philox4x32(
        seed,
        counter[None, None],
        stream[None, :, None, None],
        id_lo[:, None, None, None],
        id_hi[:, None, None, None],
    )
    normal, _ = box_muller(uniform_from_uint32(r0), uniform_from_uint32(r1))
    return normal


def _lane_normals(seed: int, n: int, stream, id_lo, id_hi) -> torch.Tensor:
    """Normals ``0..n-1`` along a new last axis: normal ``k`` is lane ``k & 3`` at counter
    ``k >> 2``. One Philox call gives four lanes, so it runs on ``ceil(n / 4)`` counters."""
    counter = torch.arange((n + 3) // 4, dtype=torch.int64, device=id_lo.device)
    r0, r1, r2, r3 = philox4x32(seed, counter, stream, id_lo, id_hi)
    n0, n1 = box_muller(uniform_from_uint32(r0), uniform_from_uint32(r1))
    n2, n3 = box_muller(uniform_from_uint32(r2), uniform_from_uint32(r3))
    lanes = torch.stack([n0, n1, n2, n3], dim=-1)  # (..., ceil(n / 4), 4)
    return lanes.flatten(-2)[..., :n]


def noise_normals(
    seed: int,
    ids: torch.Tensor,
    shape: tuple[int, int, int],
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The noise ``z`` of each image: float32 standard normals of shape ``(B, C, H, W)``."""
    ids = _checked_key(seed, ids, device)
    C, H, W = (int(s) for s in shape)
    return _noise(seed, ids, C, H, W)


def _noise(seed: int | torch.Tensor, ids: torch.Tensor, C: int, H: int, W: int) -> torch.Tensor:
    """:func:`noise_normals` on checked arguments (also traced by :mod:`compiled`)."""
    device = ids.device
    c = torch.arange(C, device=device, dtype=torch.int64)[:, None, None]
    y = torch.arange(H, device=device, dtype=torch.int64)[None, :, None]
    stream = NOISE_STREAM_BASE + c * H + y  # (C, H, 1), broadcast over the counters
    id_lo, id_hi = (w[:, None, None, None] for w in _id_words(ids))
    return _lane_normals(seed, W, stream, id_lo, id_hi)


def stream_normals(
    seed: int,
    ids: torch.Tensor,
    stream: int,
    n: int,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``n`` float32 standard normals per image from ``USER_STREAM_BASE + stream``: ``(B, n)``.

    For perturbations other than the max-entropy diffeomorphism, so that their randomness
    too depends only on ``(seed, id)``.
    """
    ids = _checked_key(seed, ids, device)
    check_stream(stream, USER_STREAM_BASE)
    id_lo, id_hi = (w[:, None] for w in _id_words(ids))
    return _lane_normals(seed, n, USER_STREAM_BASE + stream, id_lo, id_hi)


def stream_uniforms(
    seed: int,
    ids: torch.Tensor,
    stream: int,
    n: int,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``n`` float32 uniforms in ``[0, 1)`` per image from ``USER_STREAM_BASE + stream``.

    Word ``r0`` at counter ``k``; disjoint from :func:`stream_normals` only if the caller
    uses another ``stream`` for it.
    """
    ids = _checked_key(seed, ids, device)
    check_stream(stream, USER_STREAM_BASE)
    k = torch.arange(n, device=ids.device, dtype=torch.int64)[None, :]
    id_lo, id_hi = (w[:, None] for w in _id_words(ids))
    r0, _, _, _ = philox4x32(seed, k, USER_STREAM_BASE + stream, id_lo, id_hi)
    return uniform_from_uint32(r0)
