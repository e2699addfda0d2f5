"""Image sources: one reader interface over arrays, image folders, MNIST IDX and torchvision.

:func:`open_source` turns a user's ``--input``/``--data`` string into an :class:`ImageSource`,
which serves ``(B, C, H, W)`` batches by index range without loading the data set whole.
Shared by ``generate``, ``sensitivity`` and ``reproduce``, so every command reads data the
same way.

Spec rules (``open_source(spec)``):

* ``file.npy`` -- memory-mapped (``np.load(mmap_mode="r")``).
* ``file.npz`` -- the archive must hold exactly one array, else name it: ``file.npz:key``.
  A member stored uncompressed (``np.savez``) is memory-mapped in place; a compressed one
  (``np.savez_compressed``) is streamed from the archive (fast forwards, slow backwards).
* a directory -- every ``.png``/``.jpg``/``.jpeg`` below it (recursive, case-insensitive),
  sorted by relative path component-wise, decoded with Pillow to uint8. Grey images give
  ``C = 1``, colour ``C = 3``, images with alpha (or palette transparency) ``C = 4``. All must
  share one ``(C, H, W)``, else a ``ValueError`` names the first file that differs from the
  first one; with ``resize=(H, W)`` every image is resized (channels must still agree).
* an IDX file (MNIST's format, raw or ``.gz``) -- recognised by its magic number; raw files
  are memory-mapped, gzip'd ones are decompressed into memory.
* ``torchvision:NAME:ROOT[:SPLIT]`` -- ``torchvision.datasets.NAME(ROOT, download=False)``,
  with ``train=(SPLIT == "train")`` or ``split=SPLIT`` where the class takes one.
* CIFAR-10 binary batches -- one ``.bin`` file of 3073-byte records, or
  ``cifar10:DIR[:train|test]`` (default ``test``), read by :mod:`diffeo_engine.data.cifar10`.

Only folders and regular files (links to them included) are read: a FIFO or a device is
refused unread (:mod:`~diffeo_engine.data.sources.safe`).

Labels (``open_source(spec, labels=...)``, ``source.labels``): the format's own (MNIST's
labels file beside the images, CIFAR-10's records, a folder of class sub-folders), none
(``labels=False``), or a file (``.npy``, IDX, ``FILE.npz:KEY``, or an ``.npz`` source's own
``KEY``); see :mod:`~diffeo_engine.data.sources.labels`.

Array layout rule: ``(N, H, W)`` gets ``C = 1``; a 4-d array is ``(N, C, H, W)`` when its
axis 1 is 1, 3 or 4, else ``(N, H, W, C)`` when its last axis is 1, 3 or 4, else an error.
Data types: uint8 (kept as uint8), float16, float32, float64 (any byte order); anything
else is refused rather than guessed at.

``resize=(H, W)`` (or ``"HxW"``) applies to every kind of source: bilinear with
antialiasing (``torch.nn.functional.interpolate``), uint8 rounded half up back to uint8;
it is how a folder of mixed sizes is read: ``open_source(folder, resize=(H, W))``.

One module per reader: ``base`` (the interface, layout rule, fingerprint), ``arrays``
(.npy/.npz), ``folders``, ``idx`` (and MNIST), ``cifar`` (CIFAR-10 binary batches),
``torchvision_source``, ``labels``, ``safe`` (opening only regular files), ``spec`` (the
parser).
"""

from diffeo_engine.data.sources.arrays import ArraySource
from diffeo_engine.data.sources.base import HASH_CHUNK_BYTES, ImageSource
from diffeo_engine.data.sources.folders import IMAGE_SUFFIXES, FolderSource
from diffeo_engine.data.sources.idx import load_mnist, read_idx
from diffeo_engine.data.sources.labels import LabelSet, read_labels
from diffeo_engine.data.sources.spec import open_source, parse_resize
from diffeo_engine.data.sources.torchvision_source import TorchvisionSource

__all__ = [
    "HASH_CHUNK_BYTES",
    "IMAGE_SUFFIXES",
    "ArraySource",
    "FolderSource",
    "ImageSource",
    "LabelSet",
    "TorchvisionSource",
    "load_mnist",
    "open_source",
    "parse_resize",
    "read_idx",
    "read_labels",
]
