"""The MNIST test set shipped inside the package (``diffeo_engine/data/mnist/``, CC BY-SA
3.0, see its README), so that ``diffeo-engine reproduce`` runs its MNIST claims with no
download; found through :mod:`importlib.resources`, so it works from any install."""

from __future__ import annotations

import importlib.resources

import numpy as np
import torch

from diffeo_engine.data.sources.idx import read_idx

__all__ = ["PACKAGED_MNIST_FILES", "packaged_mnist", "packaged_mnist_files"]

PACKAGED_MNIST_FILES = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


def packaged_mnist_files() -> list[importlib.resources.abc.Traversable]:
    """The two IDX files as :mod:`importlib.resources` resources (images, labels)."""
    folder = importlib.resources.files("diffeo_engine.data").joinpath("mnist")
    files = [folder.joinpath(name) for name in PACKAGED_MNIST_FILES]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(
            f"the packaged MNIST test set is missing {missing} (a broken install?); "
            "reinstall diffeo-engine or give --mnist DIR"
        )
    return files


def packaged_mnist() -> tuple[torch.Tensor, torch.Tensor]:
    """The packaged MNIST test set: ``(images uint8 (10000, 1, 28, 28), labels int64)``,
    as :func:`~diffeo_engine.data.sources.load_mnist` returns it from a folder."""
    arrays = []
    for resource in packaged_mnist_files():
        with importlib.resources.as_file(resource) as path:
            arrays.append(np.array(read_idx(path)))
    images, labels = arrays
    return (
        torch.from_numpy(images.astype(np.uint8))[:, None],
        torch.from_numpy(labels.astype(np.int64)),
    )
