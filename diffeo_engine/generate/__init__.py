"""Sharded, resumable writing of perturbed data sets (``diffeo-engine generate`` / ``verify``
/ ``export``).

A run holds one or several ``(T, cut)`` settings; perturbation ``k`` of source image ``i`` at
setting ``s`` has id ``(s * length + i) * K + k`` (``K = per_image``; with one setting
``i * K + k``); its content depends only on ``(seed, id)`` and the setting (design.md
section 3), so any image can be regenerated alone. Ids are cut into fixed-size shards, one
``.npy`` file per output kind (``tau-00000.npy``, ``noisy-00000.npy``; shape
``(n, C, H, W)``), memory-mappable, plus ``label-00000.npy`` (int64, the items' source
labels) when the source has labels.

Crash safety: a shard file is written under a hidden temporary name, fsynced and renamed;
then ``manifest.json`` (parameters, seed, versions, source fingerprint, and per shard its id
range, shape, dtype and sha256) is rewritten the same way (temporary file, fsync, rename,
fsync of the directory). A shard exists for a reader only once the manifest lists it, so a
run killed at any point resumes from the last listed shard, re-running the same command
(or ``--resume``) and producing byte-identical files. The manifest holds no timestamps. A
run that fails before it lists a shard (a refused parameter included: every setting is
tried on one image before the manifest is written) leaves ``out`` as it found it. Only
regular files are read from a data set, never through a link.
A ``.lock`` file (``flock``) keeps two processes from writing one directory at once; it
is removed when ``generate`` returns or raises (an interrupt included). A damaged data set
is repaired by :func:`repair` (``verify --repair``): its bad shards are forgotten, removed
and written again; ``verify(full=True)`` regenerates every image and compares it byte
for byte; :func:`export` writes the CIFAR-10-C layout or WebDataset tar shards.

Under ``torchrun`` (``generate(..., distributed=ctx)``) rank 0 alone validates, holds the
``.lock`` for the whole job, cleans leftovers and writes the manifest; the shards still
missing are dealt round-robin to the ranks, each writing its own shard files (distinct
names, so no lock is needed between them). After each round (one shard per rank) the
ranks' records are gathered and rank 0 rewrites the manifest, so a killed job loses at
most one round. Output and manifest are byte-identical to one process's (the manifest
does not record the number of processes), and any number of processes may resume. On
several machines ``--out`` must be a directory every rank sees (a shared filesystem).

One module per job: ``files`` (atomic writes, the lock, hashing, fault injection),
``manifest`` (the manifest and its schema), ``plan`` (validation before anything is written,
and the outputs' one computation), ``writer`` (the writer thread), ``run`` (:func:`generate`),
``dataset`` (:func:`load_generated`), ``verification`` (:func:`verify` and the one
``Regenerator``), ``repair`` (:func:`repair`, ``verify --repair``), ``exports``
(:func:`export`), ``command`` (the CLI).
"""

from diffeo_engine.generate.command import add_commands
from diffeo_engine.generate.dataset import GeneratedDataset, load_generated
from diffeo_engine.generate.exports import export
from diffeo_engine.generate.files import FAULT_ENV
from diffeo_engine.generate.manifest import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    check_manifest,
    read_manifest,
    shard_name,
)
from diffeo_engine.generate.plan import DEFAULT_SHARD_BYTES, MAX_DEFAULT_SHARD
from diffeo_engine.generate.repair import repair
from diffeo_engine.generate.run import generate
from diffeo_engine.generate.verification import VerifyReport, verify

__all__ = [
    "DEFAULT_SHARD_BYTES",
    "FAULT_ENV",
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST",
    "MAX_DEFAULT_SHARD",
    "GeneratedDataset",
    "VerifyReport",
    "add_commands",
    "check_manifest",
    "export",
    "generate",
    "load_generated",
    "read_manifest",
    "repair",
    "shard_name",
    "verify",
]
