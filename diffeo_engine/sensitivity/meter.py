"""The streaming sensitivity meter: ``D_k``, ``G_k``, ``R_k`` of design.md section 2.

Each :meth:`SensitivityMeter.update` perturbs the batch (through :func:`ops.perturb`, so the
fused kernel on GPU, or through the user's :class:`~diffeo_engine.transforms.Perturbation`),
makes *one* forward pass over ``cat([x, tau x, x + eta])`` under ``torch.no_grad``, and lets
forward hooks fold every measured activation into float64 sums
(:mod:`diffeo_engine.sensitivity.stats`). Nothing per image is kept, so memory does not
grow with the number of images (except with ``estimator="median"``, :mod:`.median`).
The perturbations come from :mod:`.settings`, the features and metric from
:mod:`.features`, the distributed gather from :mod:`.gather`. The module is a little over
500 lines because the meter's hooks, staging and commit are one idea.

Scaling out: give each process a contiguous share of the data set, pass every batch's
global position (``update(images, start=i)``) so that ids and jackknife groups are those of
a single pass, and call ``compute(distributed=ctx)`` (a :class:`DistributedContext`): the
float64 sums of all ranks are added with one all-reduce and every rank gets the result of
the whole data set, equal to a single process's to rounding (design.md section 3).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from diffeo_engine.distributed import DistributedContext
from diffeo_engine.physics import (
    _is_integer,
    check_choice,
    check_ids,
    check_int,
    check_memory,
    check_seed,
)
from diffeo_engine.progress import Progress
from diffeo_engine.sensitivity.features import (
    METRICS,
    REDUCTIONS,
    measured_features,
    model_float_dtype,
    model_tensor,
    reduce_features,
)
from diffeo_engine.sensitivity.gather import reduced_copy
from diffeo_engine.sensitivity.hooks import (
    INPUT,
    OUTPUT,
    LayerHooks,
    first_tensor,
    select_modules,
)
from diffeo_engine.sensitivity.median import MedianStore
from diffeo_engine.sensitivity.result import LayerRecord, SensitivityResult
from diffeo_engine.sensitivity.settings import make_settings, perturb_batch
from diffeo_engine.sensitivity.stats import SiteStats
from diffeo_engine.versions import versions

__all__ = [
    "ESTIMATORS",
    "METRICS",
    "REDUCTIONS",
    "NonFiniteActivationError",
    "SensitivityMeter",
    "reduce_features",
    "update_bytes",
]

ESTIMATORS = ("mean", "median")


class NonFiniteActivationError(ValueError):
    """A measured activation held NaN or inf; the message names the layer."""


class _HookFailure(Exception):
    """Carries an error raised by the meter's own hook through the model's forward."""


def update_bytes(shape: tuple[int, ...], copies: int, itemsize: int, model_itemsize: int) -> int:
    """About the bytes one :meth:`SensitivityMeter.update` of a batch of ``shape`` (images
    of ``itemsize`` bytes) allocates before the model runs: the batch repeated once per
    perturbed pair, the ``copies`` (clean and perturbed) in float32 and the concatenated
    model input (of ``model_itemsize`` bytes); the model's activations come on top."""
    elements = math.prod(shape)
    repeated = (copies - 1) // 2 * elements * itemsize
    return copies * elements * (4 + 2 * model_itemsize) + repeated


class SensitivityMeter:
    """Stream images through ``model`` and measure ``D_k``, ``G_k``, ``R_k`` per layer.

    Arguments:
        layers: glob patterns over ``named_modules()`` names, module types (``nn.Conv2d``
            or ``"type:Conv2d"``), ``"leaves"`` (default: every module without children),
            and ``"input"``; the network output is always measured, as ``"output"``.
        T, cut: one setting of the max-entropy perturbation; or ``settings=[(T, cut), ...]``
            to sweep several in the same pass over the data (settings sharing ``cut`` are one
            launch of the perturbation, with a per-image ``T``).
        perturbation: instead of ``T, cut``, any callable ``(images, ids) -> (tau x, x+eta)``
            (:class:`~diffeo_engine.transforms.Perturbation`), or a list of them to sweep;
            this is how 1D inputs ``(B, C, L)`` are measured.
        noise: ``"matched"`` or a fixed sigma (design.md section 2).
        reduce: ``"full"``, ``"channel_mean"`` or ``"spatial_mean"`` (:func:`reduce_features`).
        metric: ``"euclidean"`` (design.md section 2) or ``"cosine"``: each reduced
            representation is scaled to unit length first, so ``D = E[1 - cos(f(tau x),
            f(x))] / E_{x != z}[1 - cos(f(x), f(z))]``, the normalised cosine stability of
            Ruderman, Rabinowitz, Morcos, Zoran (2018); an all-zero representation stays
            zero.
        estimator: ``"mean"`` (streamed float64 sums, jackknife errors) or ``"median"``,
            the estimator of Petrini et al. (NeurIPS 2021), :mod:`.median`: it keeps every
            image's representation of each measured layer in memory and gives no errors.
        seed, perturbations_per_image: image id ``i`` is perturbed ``K`` times, with the
            perturbation ids ``i * K + k``; its clean representation counts once. With
            ``ids=None`` an image's id is its position in the stream (0, 1, 2, ...; a batch
            passed with ``update(..., start=i)`` begins at position ``i``).
        error_groups: ``G``, the number of interleaved groups of images of the
            delete-one-group jackknife that gives every ``*_err`` (the image at position
            ``n`` of the stream goes to group ``n mod G``). Memory is ``G`` times each
            layer's size. With fewer than two groups holding images (``G = 1`` saves
            memory) the errors are not defined: every ``*_err`` is NaN.
        autocast_dtype: run the forward pass under ``torch.autocast`` with this dtype.
        channels_last: convert the model (in place) and the 4D batches to channels_last.
        input_dtype: the dtype fed to the model; default that of its first floating
            parameter (so a float64 model gets float64 images); uint8 images are
            converted to float with their 0..255 values (normalise in ``preprocess``).
        preprocess: a callable applied to the concatenated batch just before the forward
            pass (normalisation, say); the ``"input"`` pseudo-layer sees its output.
        progress: ``True`` or the expected number of images: a progress line on stderr.

    The model's train/eval mode is left as the user set it. In train mode, BatchNorm
    normalises with the statistics of the concatenated ``(1 + 2 S K) B`` batch, which
    mixes clean and perturbed images (and updates its running statistics with them):
    the measured representation then depends on the perturbations in the batch. Call
    ``model.eval()`` first for the published measurement. Dropout likewise.

    Use as a context manager (``with SensitivityMeter(...) as meter:``) or call
    :meth:`close` to take the hooks off.
    """

    def __init__(
        self,
        model: nn.Module,
        layers=None,
        T=None,
        cut: int | None = None,
        *,
        noise="matched",
        reduce: str = "full",
        seed: int = 0,
        perturbations_per_image: int = 1,
        perturbation=None,
        settings: Sequence[tuple[float, int]] | None = None,
        interp: str = "bilinear",
        backend: str = "auto",
        autocast_dtype: torch.dtype | None = None,
        channels_last: bool = False,
        progress: bool | int = False,
        error_groups: int = 10,
        input_dtype: torch.dtype | None = None,
        preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
        metric: str = "euclidean",
        estimator: str = "mean",
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        if reduce not in REDUCTIONS:
            raise ValueError(f"reduce: expected one of {REDUCTIONS}, got {reduce!r}")
        K = check_int("perturbations_per_image", perturbations_per_image, 1)
        error_groups = check_int("error_groups", error_groups, 1)
        if autocast_dtype is not None and not isinstance(autocast_dtype, torch.dtype):
            raise TypeError(f"autocast_dtype: expected a torch.dtype, got {autocast_dtype!r}")
        if input_dtype is not None and not (
            isinstance(input_dtype, torch.dtype) and input_dtype.is_floating_point
        ):
            raise TypeError(f"input_dtype: expected a floating torch.dtype, got {input_dtype!r}")
        self.model = model
        self.seed = check_seed(seed)
        self.K, self.reduce, self.noise = K, reduce, noise
        self.interp, self.backend = interp, backend
        self.autocast_dtype, self.channels_last = autocast_dtype, bool(channels_last)
        self.input_dtype, self.preprocess = input_dtype, preprocess
        if preprocess is not None and not callable(preprocess):
            raise TypeError(f"preprocess: expected a callable, got {type(preprocess).__name__}")
        self.metric = check_choice("metric", metric, METRICS)
        self.estimator = check_choice("estimator", estimator, ESTIMATORS)
        self._kept: dict[str, MedianStore] = {}  # estimator="median": every image's features
        self.error_groups = error_groups
        self._layers_spec = layers
        self._settings = make_settings(
            T, cut, settings, perturbation, seed=self.seed, noise=noise, interp=interp,
            backend=backend,
        )  # fmt: skip
        modules, self._want_input = select_modules(model, layers)
        names = {name for name, _ in modules}
        self._input_name = INPUT if INPUT not in names else "<input>"
        self._output_name = OUTPUT if OUTPUT not in names else "<output>"
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        self._hooks = LayerHooks(modules, self._observe)
        self._closed = False
        self._stats: dict[str, SiteStats] = {}
        self._meta: dict[str, tuple[str, list[int]]] = {}  # site -> (type, shape)
        self._order: list[str] = []
        self._pending: dict[str, dict] = {}
        self._batch_info: tuple | None = None
        self._n_seen = 0
        self._position = 0  # the stream position of the next image (see update's start)
        self._mode: str | None = None
        self._image_info: dict = {}
        total = int(progress) if _is_integer(progress) else None
        self._progress = Progress(total, desc="sensitivity", unit="images") if progress else None

    # ----------------------------------------------------------------------- settings

    # ------------------------------------------------------------------------- update

    def __enter__(self) -> SensitivityMeter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Take the hooks off the model (the sums stay: :meth:`compute` still works)."""
        self._hooks.remove()
        self._closed = True
        if self._progress is not None:
            self._progress.close()

    def reset(self) -> None:
        """Forget every image seen so far (the hooks stay)."""
        self._stats.clear()
        self._kept.clear()
        self._meta.clear()
        self._order.clear()
        self._n_seen = 0
        self._position = 0

    @property
    def count(self) -> int:
        """The number of images seen so far."""
        return self._n_seen

    def _check_device(self, images: torch.Tensor) -> None:
        reference = model_tensor(self.model)
        if reference is not None and reference.device != images.device:
            raise ValueError(
                f"images: expected a tensor on {reference.device} (the model's device), "
                f"got {images.device}; move the model or the images"
            )

    def _check_size(self, images: torch.Tensor) -> None:
        """Refuse, naming ``images``, a batch whose :func:`update_bytes` the device cannot
        hold (before anything is allocated)."""
        dtype = self.input_dtype or model_float_dtype(self.model) or torch.float32
        copies = 1 + 2 * len(self._settings) * self.K
        check_memory(
            "images", update_bytes(images.shape, copies, images.element_size(), dtype.itemsize),
            images.device, what=f"measuring {images.shape[0]} image(s) of "
            f"{'x'.join(map(str, images.shape[1:]))} in {copies} copies",
        )  # fmt: skip

    def update(self, images: torch.Tensor, ids=None, *, start: int | None = None) -> None:
        """Fold one batch ``(B, C, H, W)`` (or ``(B, C, L)`` with a ``perturbation``) in.

        ``ids`` (one int per image) key the perturbations; default: the images' positions
        in the stream. ``start`` is the position of the batch's first image (default: just
        after the previous batch, so ``0, B, 2B, ...``); the image at position ``n`` goes to
        jackknife group ``n mod G``. Give it when several processes share a data set (or a
        pass is split in pieces), each batch its global index, and the ids and error
        groups are those of one uninterrupted pass.
        """
        if self._closed:
            raise RuntimeError("update: the meter is closed (its hooks were removed)")
        if not torch.is_tensor(images):
            raise TypeError(f"images: expected a torch.Tensor, got {type(images).__name__}")
        if images.dim() < 2:
            raise ValueError(f"images: expected a batch (B, C, ...), got {tuple(images.shape)}")
        B = images.shape[0]
        if B == 0:
            return
        self._check_device(images)
        self._check_size(images)
        if start is not None:
            self._position = check_int("start", start, 0)
        positions = torch.arange(self._position, self._position + B, device=images.device)
        if ids is None:
            ids = positions
        ids = check_ids(ids, B, images.device)
        if self.K > 1 and int(ids.max()) > (2**63 - 1) // self.K - 1:
            raise ValueError(
                f"ids: with perturbations_per_image={self.K} ids must stay below "
                f"{(2**63 - 1) // self.K} (perturbation ids are id * K + k)"
            )
        with torch.no_grad():
            perturbed = perturb_batch(
                self._settings, images, ids, self.K, seed=self.seed, noise=self.noise,
                interp=self.interp, backend=self.backend,
            )  # fmt: skip
            clean = images.to(torch.float32) if images.dtype == torch.uint8 else images
            parts = [clean] + [p for _, _, p in perturbed]
            dtype = self.input_dtype or model_float_dtype(self.model)
            if dtype is None:
                dtype = clean.dtype if clean.is_floating_point() else torch.float32
            batch = torch.cat([p.to(dtype) for p in parts])
            if self.channels_last and batch.dim() == 4:
                batch = batch.contiguous(memory_format=torch.channels_last)
            if self.preprocess is not None:
                shape = tuple(batch.shape)
                batch = self.preprocess(batch)
                if not torch.is_tensor(batch) or batch.dim() == 0 or batch.shape[0] != shape[0]:
                    got = tuple(batch.shape) if torch.is_tensor(batch) else type(batch).__name__
                    raise TypeError(
                        f"preprocess: expected it to return a tensor with the batch's first "
                        f"dimension {shape[0]} (it received {shape}), got {got}"
                    )
            groups = positions % self.error_groups
            onehot = torch.nn.functional.one_hot(groups, self.error_groups).T.to(torch.float64)
            self._batch_info = (B, [(s, kind) for s, kind, _ in perturbed], onehot)
            self._pending = {}
            self._hooks.reset()
            try:
                if self._want_input:
                    self._observe(self._input_name, None, batch)
                output = self._forward(batch, images)
                self._observe(self._output_name, self.model, output)
            except _HookFailure as failure:
                raise failure.args[0] from None
            finally:
                self._batch_info = None
            self._commit()
        if self._mode is None:
            self._mode = "train" if self.model.training else "eval"
            self._image_info = {
                "image_shape": list(images.shape[1:]),
                "image_dtype": str(images.dtype).replace("torch.", ""),
                "input_dtype": str(batch.dtype).replace("torch.", ""),
                "device": str(images.device),
            }
        self._n_seen += B
        self._position += B
        if self._progress is not None:
            self._progress.update(B)

    def _forward(self, batch: torch.Tensor, images: torch.Tensor):
        autocast = (
            torch.autocast(batch.device.type, dtype=self.autocast_dtype)
            if self.autocast_dtype is not None
            else contextlib.nullcontext()
        )
        try:
            with autocast:
                return self.model(batch)
        except _HookFailure:
            raise
        except (RuntimeError, ValueError, TypeError, IndexError) as error:
            parts = 1 + 2 * len(self._settings) * self.K
            raise ValueError(
                f"images: the model rejected a batch of shape {tuple(batch.shape)} "
                f"({parts} parts [x, tau x, x + eta, ...] of {images.shape[0]} images of shape "
                f"{tuple(images.shape[1:])}): {type(error).__name__}: {error}"
            ) from error

    def _observe(self, site: str, module: nn.Module | None, value) -> None:
        """Hook sink: reduce one activation and stage its sums for the batch."""
        try:
            self._stage(site, module, value)
        except (TypeError, ValueError) as error:
            raise _HookFailure(error) from error

    def _stage(self, site: str, module: nn.Module | None, value) -> None:
        if self._batch_info is None:
            return  # the model ran outside update(): not ours to measure
        B, plan, onehot = self._batch_info
        value = first_tensor(value, site)
        parts = 1 + len(plan)
        if value.dim() == 0 or value.shape[0] != parts * B:
            raise ValueError(
                f"layer {site!r}: expected its output's first dimension to be the batch, "
                f"{parts * B} ({parts} parts of {B}), got shape {tuple(value.shape)}; "
                "layers that mix the batch dimension cannot be measured"
            )
        value = value.detach().reshape(parts, B, *value.shape[1:])

        # float32 at least for the reduction and the differences; the sums are float64
        work_dtype = torch.promote_types(value.dtype, torch.float32)

        def features(index: int) -> torch.Tensor:
            return measured_features(value[index].to(work_dtype), self.reduce, self.metric)

        clean = features(0)
        stats = self._stats.get(site)
        if stats is None:
            stats = SiteStats(clean.shape[1], len(self._settings), self.error_groups, clean.device)
            self._stats[site] = stats
            kind = "input" if module is None else type(module).__name__
            if site == self._output_name:
                kind = f"output ({type(module).__name__})"
            self._meta[site] = (kind, list(value.shape[2:]))
            self._order.append(site)
        elif clean.shape[1] != stats.n_features:
            raise ValueError(
                f"layer {site!r}: its size changed from {stats.n_features} to "
                f"{clean.shape[1]} features between batches"
            )
        perturbed = [(s, kind, features(1 + i)) for i, (s, kind) in enumerate(plan)]
        self._pending[site] = stats.contributions(clean, perturbed, onehot)
        if self.estimator == "median":
            self._pending[site]["kept"] = MedianStore.batch(clean, perturbed)

    def _commit(self) -> None:
        """Refuse the batch if any staged sum is not finite (naming the layer), else add."""
        if not self._pending:
            return
        sites = list(self._pending)
        flags = torch.stack(
            [
                torch.stack(
                    [
                        torch.isfinite(self._pending[s]["S2"]).all(),
                        torch.isfinite(self._pending[s]["num"][:, 0]).all(),
                        torch.isfinite(self._pending[s]["num"][:, 1]).all(),
                    ]
                )
                for s in sites
            ]
        ).cpu()
        if not bool(flags.all()):
            row = int((~flags.all(dim=1)).nonzero()[0])
            which = ["x", "tau x", "x + eta"][int((~flags[row]).nonzero()[0])]
            self._pending = {}
            raise NonFiniteActivationError(
                f"layer {sites[row]!r}: NaN or inf in its activation for {which}, or (float64 "
                "activations beyond ~1e154 only) its squared distance overflowed float64 "
                "(this batch was not added)"
            )
        for site in sites:
            kept = self._pending[site].pop("kept", None)
            self._stats[site].add(self._pending[site])
            if kept is not None:
                self._kept.setdefault(site, MedianStore()).add(kept)
        self._pending = {}

    # ------------------------------------------------------------------------ compute

    def compute(self, *, distributed: DistributedContext | None = None) -> SensitivityResult:
        """The records, per layer in forward order and per setting, and the settings.

        With ``distributed`` (a :class:`~diffeo_engine.distributed.DistributedContext` of
        several processes) every rank must call it: the sums of all ranks are added (one
        all-reduce) and each rank gets the records of all the images seen by all.
        """
        if distributed is not None and distributed.active:
            if self.estimator == "median":
                raise ValueError("distributed: estimator='median' keeps per-image values and "
                                 "cannot be gathered; use estimator='mean'")  # fmt: skip
            return reduced_copy(self, distributed).compute()
        if not self._order:
            raise RuntimeError("compute: no images yet; call update(images) first")
        offset = 0 if self._want_input else 1
        records = []
        for position, site in enumerate(self._order):
            stats = self._stats[site]
            if stats.count < 2:
                raise ValueError(
                    f"compute: layer {site!r} saw {stats.count} image(s); the denominator "
                    "E||f(x) - f(z)||^2 needs at least two"
                )
            kind, shape = self._meta[site]
            for index, setting in enumerate(self._settings):
                est = (
                    self._kept[site].estimates(index)
                    if self.estimator == "median"
                    else stats.estimates(index)
                )
                records.append(
                    LayerRecord(
                        name=site,
                        depth=position + offset,
                        type=kind,
                        shape=shape,
                        features=stats.n_features,
                        reduce=self.reduce,
                        setting=setting.label,
                        T=setting.T,
                        cut=setting.cut,
                        count=stats.count,
                        perturbations=round(float(stats.M[index].sum())),
                        **est,
                    )
                )
        return SensitivityResult(records, self.describe())

    def describe(self) -> dict:
        """The settings, versions and seed that reproduce the run."""
        model = self.model
        perturbations = [
            None if s.perturbation is None else repr(s.perturbation) for s in self._settings
        ]
        layers = self._layers_spec
        if layers is not None and not isinstance(layers, (str, list, tuple)):
            layers = [layers]
        if isinstance(layers, (list, tuple)):
            layers = [x.__name__ if isinstance(x, type) else str(x) for x in layers]
        return {
            "seed": self.seed,
            "settings": [
                {"label": s.label, "T": s.T, "cut": s.cut, "perturbation": p}
                for s, p in zip(self._settings, perturbations)
            ],
            "noise": self.noise,
            "reduce": self.reduce,
            "metric": self.metric,
            "estimator": self.estimator,
            "perturbations_per_image": self.K,
            "perturbation_ids": "id * K + k",
            "interp": self.interp,
            "backend": self.backend,
            "images": self._n_seen,
            "layers": layers if layers is not None else "leaves",
            "model": f"{type(model).__module__}.{type(model).__qualname__}",
            "model_mode": self._mode,
            "autocast_dtype": None
            if self.autocast_dtype is None
            else str(self.autocast_dtype).replace("torch.", ""),
            "channels_last": self.channels_last,
            "preprocess": None if self.preprocess is None else repr(self.preprocess),
            "errors": f"delete-one-group jackknife over {self.error_groups} interleaved "
            "groups of images (image n in group n mod G)",
            "error_groups": self.error_groups,
            **self._image_info,
            "versions": versions(),
        }

    def __repr__(self) -> str:
        labels = ", ".join(s.label for s in self._settings)
        return (
            f"SensitivityMeter({type(self.model).__name__}, [{labels}], reduce={self.reduce!r}, "
            f"K={self.K}, images={self._n_seen})"
        )
