"""The laws of ``T`` and ``cut`` in the transforms, drawn per sample from ``(seed, id)``.

Each parameter is fixed, uniform on a range ``(low, high)`` (``cut``: an integer, both ends
included), or the Beta law of the published transform (Petrini et al. 2021,
``pcsl-epfl/diffeomorphism``, ``transform.py``), with the same parameter names::

    cut = floor(cutmin + (cutmax + 1 - cutmin) b_cut)    b_cut ~ Beta(alpha_cut, beta_cut)
    T   = T_min(cut) + (T_max(cut) - T_min(cut)) b_T     b_T   ~ Beta(alpha_T, beta_T)
    alpha = s r / (r + 1),  beta = s / (r + 1)           (s, r) = (scut, rcut) or (sT, rT)

``s = alpha + beta`` says how peaked a law is, ``r = alpha / beta`` how far it leans to the
high end (``s = 1e10, r = x / (1 - x)`` pins the value at the fraction ``x``);
``(T_min, T_max)`` is :func:`~diffeo_engine.physics.temperature_range` of the drawn ``cut``
for the image's side (``sqrt(H W)`` for non-square images).

Every draw comes from Philox keyed by ``(seed, id)`` (:func:`~diffeo_engine.rng.stream_uniforms`
and ``stream_normals``), so a sample's ``T`` and ``cut`` depend on nothing else. A Beta
variate is ``X / (X + Y)`` with ``X ~ Gamma(alpha)``, ``Y ~ Gamma(beta)``
(:func:`beta_variates`); each Gamma variate is Marsaglia and Tsang's (2000) rejection
method on ``GAMMA_CANDIDATES`` counter-based candidates, the first accepted one kept
(shapes below 1 through ``Gamma(a) = Gamma(a + 1) U^(1/a)``).

Streams (offsets from :data:`~diffeo_engine.rng.USER_STREAM_BASE`): :data:`APPLY_STREAM`
(the coin of ``p``), :data:`CUT_STREAMS` and :data:`T_STREAMS`, four each: the normals and
uniforms of ``X``, then those of ``Y``; a uniform law reads the second of its four.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from diffeo_engine.physics import (
    check_cut,
    check_float,
    check_ids,
    check_int,
    check_scalar_T,
    check_seed,
    check_T,
    temperature_range,
)
from diffeo_engine.rng import stream_normals, stream_uniforms

__all__ = [
    "APPLY_STREAM",
    "CUT_STREAMS",
    "GAMMA_CANDIDATES",
    "T_STREAMS",
    "Beta",
    "DiffeoParams",
    "Fixed",
    "Uniform",
    "beta_variates",
    "check_probability",
    "cut_law",
    "describe",
    "draw_applied",
    "draw_cuts",
    "draw_temperatures",
    "temperature_law",
]

APPLY_STREAM = 200
CUT_STREAMS = 204  # 204..207
T_STREAMS = 208  # 208..211
# Marsaglia-Tsang accepts a candidate with probability above 0.95 for every shape >= 1
# (0.952 at shape 1, the worst), so 10 candidates all fail with probability below 1e-13;
# then the Gamma's d = a - 1/3 (close to its median) is used.
GAMMA_CANDIDATES = 10
_UNIFORM_FLOOR = 2.0**-33  # keeps log(U) finite; uniforms are multiples of 2**-31 or more


@dataclass(frozen=True)
class Fixed:
    """One value for every sample (``T``: a number, or a tensor with one per image)."""

    value: object


@dataclass(frozen=True)
class Uniform:
    """Uniform on ``[low, high]`` (``cut``: the integers ``low..high``)."""

    low: float
    high: float


@dataclass(frozen=True)
class Beta:
    """The published Beta law: ``s = alpha + beta``, ``r = alpha / beta``; for ``cut`` the
    range ``cutmin..cutmax``, for ``T`` the range ``[T_min(cut), T_max(cut)]``."""

    s: float
    r: float
    low: int | None = None
    high: int | None = None

    @property
    def shapes(self) -> tuple[float, float]:
        """``(alpha, beta)`` as the published transform computes them."""
        return self.s - self.s / (self.r + 1), self.s / (self.r + 1)


def check_probability(p) -> float:
    """``p``: the probability of applying the transform, a number in ``[0, 1]``."""
    p = check_float("p", p, 0.0)
    if p > 1:
        raise ValueError(f"p: expected a probability in [0, 1], got {p}")
    return p


def _is_pair(value) -> bool:
    return isinstance(value, (tuple, list)) and len(value) == 2


def _refuse_partial(names: dict, law: str) -> None:
    """Some but not all of the Beta law's parameters given: name the first one given."""
    given = [k for k, v in names.items() if v is not None]
    if given:
        raise ValueError(
            f"{given[0]}: only with the Beta law of {law}, which needs all of "
            f"{', '.join(names)}; got {given[0]} without the others"
        )


def temperature_law(T, sT=None, rT=None) -> Fixed | Uniform | Beta:
    """``T`` as a number ``>= 0``, a per-image tensor, a range ``(low, high)``, or ``None``
    with ``sT, rT`` (the published Beta law, relative to ``[T_min(cut), T_max(cut)]``)."""
    if T is None:
        if sT is None or rT is None:
            _refuse_partial({"sT": sT, "rT": rT}, "T")
            raise ValueError(
                "T: expected a temperature, a range (low, high) or the Beta law sT, rT; got none"
            )
        return Beta(
            check_float("sT", sT, 0.0, strict=True), check_float("rT", rT, 0.0, strict=True)
        )
    if sT is not None or rT is not None:
        raise ValueError("T: give either T or the Beta law sT, rT, not both")
    if torch.is_tensor(T):
        return Fixed(T)
    if _is_pair(T):
        low, high = (check_scalar_T(v) for v in T)
        if low > high:
            raise ValueError(f"T: expected a range (low, high) with low <= high, got {tuple(T)}")
        return Uniform(low, high)
    if isinstance(T, (str, bytes)) or not isinstance(T, numbers.Real):
        raise TypeError(
            f"T: expected a number >= 0, a tensor, a range (low, high) or the Beta law sT, rT; "
            f"got {T!r}"
        )
    return Fixed(check_scalar_T(T))


def cut_law(cut, scut=None, rcut=None, cutmin=None, cutmax=None, *, minimum: int = 1):
    """``cut`` as an integer, a range ``(low, high)`` of integers, or ``None`` with
    ``scut, rcut, cutmin, cutmax`` (the published Beta law). ``minimum`` is 2 when ``T`` is
    drawn relative to ``temperature_range``, which needs ``log cut > 0``."""
    beta = {"scut": scut, "rcut": rcut, "cutmin": cutmin, "cutmax": cutmax}
    if cut is None:
        if any(v is None for v in beta.values()):
            _refuse_partial(beta, "cut")
            raise ValueError(
                "cut: expected an integer, a range (low, high) or the Beta law scut, rcut, "
                "cutmin, cutmax; got none"
            )
        low = check_int("cutmin", cutmin, minimum)
        high = check_int("cutmax", cutmax, minimum)
        if low > high:
            raise ValueError(f"cutmax: expected an integer >= cutmin = {low}, got {high}")
        s = check_float("scut", scut, 0.0, strict=True)
        return Beta(s, check_float("rcut", rcut, 0.0, strict=True), low, high)
    if any(v is not None for v in beta.values()):
        raise ValueError(
            "cut: give either cut or the Beta law scut, rcut, cutmin, cutmax, not both"
        )
    if _is_pair(cut):
        low, high = (check_cut(v, minimum=minimum) for v in cut)
        if low > high:
            raise ValueError(
                f"cut: expected a range (low, high) with low <= high, got {tuple(cut)}"
            )
        return Uniform(low, high)
    return Fixed(check_cut(cut, minimum=minimum))


def describe(name: str, law, beta_names: tuple[str, str]) -> str:
    """``name=...`` for a module's repr, in the spelling the law was given."""
    if isinstance(law, Fixed):
        value = law.value
        if torch.is_tensor(value):
            return f"{name}=tensor(shape={tuple(value.shape)})"
        return f"{name}={value}"
    if isinstance(law, Uniform):
        return f"{name}=({law.low}, {law.high})"
    s, r = beta_names
    text = f"{s}={law.s}, {r}={law.r}"
    if law.low is not None:
        text += f", cutmin={law.low}, cutmax={law.high}"
    return text


# ---------------------------------------------------------------------------- variates


def _log_gamma_variates(shape: float, normals: torch.Tensor, uniforms: torch.Tensor):
    """``log X`` for ``X ~ Gamma(shape)`` per row: Marsaglia-Tsang on the candidates
    ``normals`` ``(B, K)`` with acceptance uniforms ``uniforms[:, :K]``; ``uniforms[:, K]``
    boosts shapes below 1. Float64."""
    boost = shape < 1
    d = (shape + 1 if boost else shape) - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    v = (1 + c * normals) ** 3
    positive = v > 0
    log_v = torch.log(torch.where(positive, v, torch.ones_like(v)))
    log_u = torch.log(uniforms[:, :-1].clamp(min=_UNIFORM_FLOOR))
    accept = positive & (log_u < 0.5 * normals**2 + d - d * v + d * log_v)
    first = accept.to(torch.int8).argmax(dim=1, keepdim=True)  # the first accepted candidate
    chosen = torch.where(accept.any(dim=1), log_v.gather(1, first)[:, 0], 0.0)
    log_x = math.log(d) + chosen
    if boost:
        log_x = log_x + torch.log(uniforms[:, -1].clamp(min=_UNIFORM_FLOOR)) / shape
    return log_x


def _log_gamma(shape: float, seed: int, ids: torch.Tensor, stream: int) -> torch.Tensor:
    """``log Gamma(shape)`` per id from the normals of ``stream`` and uniforms of ``stream + 1``."""
    normals = stream_normals(seed, ids, stream, GAMMA_CANDIDATES).to(torch.float64)
    uniforms = stream_uniforms(seed, ids, stream + 1, GAMMA_CANDIDATES + 1).to(torch.float64)
    return _log_gamma_variates(shape, normals, uniforms)


def beta_variates(alpha: float, beta: float, *, seed: int, ids, stream: int) -> torch.Tensor:
    """``Beta(alpha, beta)`` variates, float64 ``(B,)``, one per id: ``X / (X + Y)`` with
    Gamma variates from streams ``stream..stream + 3`` (user streams, see the module's
    docstring), so each depends only on ``(seed, id, stream)``."""
    alpha = check_float("alpha", alpha, 0.0, strict=True)
    beta = check_float("beta", beta, 0.0, strict=True)
    seed = check_seed(seed)
    ids = check_ids(ids, len(ids), ids.device if torch.is_tensor(ids) else None)
    log_x = _log_gamma(alpha, seed, ids, stream)
    log_y = _log_gamma(beta, seed, ids, stream + 2)
    return torch.sigmoid(log_x - log_y)  # x / (x + y), finite for any magnitudes


def _uniforms(seed: int, ids: torch.Tensor, stream: int) -> torch.Tensor:
    return stream_uniforms(seed, ids, stream, 1)[:, 0].to(torch.float64)


def draw_applied(p: float, seed: int, ids: torch.Tensor) -> torch.Tensor:
    """Whether each sample is transformed: ``u < p`` for its uniform of :data:`APPLY_STREAM`
    (every sample when ``p = 1``, none when ``p = 0``)."""
    if p >= 1:
        return torch.ones(ids.shape, dtype=torch.bool, device=ids.device)
    return _uniforms(seed, ids, APPLY_STREAM) < p


def draw_cuts(law, seed: int, ids: torch.Tensor) -> torch.Tensor:
    """Each sample's ``cut``, int64 ``(B,)``."""
    if isinstance(law, Fixed):
        return torch.full(ids.shape, law.value, dtype=torch.int64, device=ids.device)
    if isinstance(law, Uniform):
        u = _uniforms(seed, ids, CUT_STREAMS + 1)
        b, low, high = u, law.low, law.high
    else:
        b = beta_variates(*law.shapes, seed=seed, ids=ids, stream=CUT_STREAMS)
        low, high = law.low, law.high
    # b = 1 exactly (a float rounding of a Beta variate near 1) would give high + 1
    return (low + torch.floor(b * (high + 1 - low))).clamp(max=high).to(torch.int64)


def draw_temperatures(
    law, seed: int, ids: torch.Tensor, cuts: torch.Tensor, side: float
) -> torch.Tensor:
    """Each sample's ``T``, float32 ``(B,)``; a Beta law places it in
    ``temperature_range(side, cut)`` of the sample's own ``cut``."""
    n = ids.shape[0]
    if isinstance(law, Fixed):
        return check_T(law.value, n, ids.device)
    if isinstance(law, Uniform):
        u = _uniforms(seed, ids, T_STREAMS + 1)
        return (law.low + u * (law.high - law.low)).to(torch.float32)
    b = beta_variates(*law.shapes, seed=seed, ids=ids, stream=T_STREAMS)
    low = torch.empty(n, dtype=torch.float64, device=ids.device)
    high = torch.empty_like(low)
    for cut in cuts.unique().tolist():
        where = cuts == cut
        t_min, t_max = temperature_range(side, cut)
        low[where], high[where] = t_min, t_max
    return (low + b * (high - low)).to(torch.float32)


# ---------------------------------------------------------------------------- records


@dataclass(frozen=True)
class DiffeoParams:
    """The parameters of one call, one entry per sample: ``T`` (float32, 0 where the
    transform was not applied), ``cut`` (int64), ``ids`` (int64), ``applied`` (bool), and the
    ``seed``. With ``(seed, id, T, cut)`` the field is determined: pass the record back as
    ``params=`` to move other parts of the same samples with the same fields (replay)."""

    T: torch.Tensor
    cut: torch.Tensor
    ids: torch.Tensor
    applied: torch.Tensor
    seed: int

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def __getitem__(self, index) -> DiffeoParams:
        """The record of some samples (an int, a slice, a mask or an index tensor)."""
        if isinstance(index, numbers.Integral):
            index = slice(index, index + 1 if index != -1 else None)
        return DiffeoParams(
            self.T[index], self.cut[index], self.ids[index], self.applied[index], self.seed
        )

    def to(self, device: torch.device | str) -> DiffeoParams:
        return DiffeoParams(
            self.T.to(device), self.cut.to(device), self.ids.to(device),
            self.applied.to(device), self.seed,
        )  # fmt: skip

    def as_dict(self) -> dict:
        """Plain Python values (for JSON logs); :meth:`from_dict` reads them back."""
        return {
            "seed": self.seed,
            "ids": self.ids.tolist(),
            "T": self.T.tolist(),
            "cut": self.cut.tolist(),
            "applied": self.applied.tolist(),
        }

    @classmethod
    def from_dict(cls, record: dict) -> DiffeoParams:
        """The record written by :meth:`as_dict`."""
        seed = check_seed(record["seed"])
        ids = check_ids(record["ids"], len(record["ids"]), "cpu")
        n = ids.shape[0]
        T = check_T(torch.tensor(record["T"], dtype=torch.float32), n, torch.device("cpu"))
        cut = torch.tensor(record["cut"], dtype=torch.int64).reshape(-1)
        applied = torch.tensor(record["applied"], dtype=torch.bool).reshape(-1)
        for name, values in (("cut", cut), ("applied", applied)):
            if values.shape != (n,):
                raise ValueError(f"{name}: expected {n} values (one per id), got {values.numel()}")
        return cls(T, cut, ids, applied, seed)
