"""``manifest.json``: what a generated data set is (parameters, source, versions, and per
shard its id range, files, sizes and sha256), written atomically and read back checked."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from diffeo_engine.generate.files import _fsync_dir, _write_file

__all__ = ["DTYPES", "FORMAT", "FORMAT_VERSION", "MANIFEST", "read_manifest", "shard_name"]

FORMAT = "diffeo-engine-generated"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DTYPES = {"uint8": torch.uint8, "float16": torch.float16, "float32": torch.float32}


def shard_name(kind: str, index: int) -> str:
    return f"{kind}-{index:05d}.npy"


def _kinds(noise) -> list[str]:
    return ["tau"] if noise == "none" else ["tau", "noisy"]


def _manifest_bytes(manifest: dict) -> bytes:
    return (json.dumps(manifest, indent=1) + "\n").encode()


def _write_manifest(out: Path, manifest: dict, fault=None, shard: int = -1) -> None:
    data = memoryview(_manifest_bytes(manifest))
    half = len(data) // 2
    chunks = [data] if fault is None else [data[:half], None, data[half:]]
    _write_file(
        out / MANIFEST,
        chunks,
        fault=fault,
        point="manifest-write",
        shard=shard,
    )
    _fsync_dir(out)


def read_manifest(out: str | Path) -> dict:
    """The manifest of a generated data set (``FileNotFoundError`` when there is none)."""
    path = Path(out) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"out: no {MANIFEST} in {out}: not a generated data set")
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"out: {path} is not valid JSON: {error}") from error
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"out: {path} is not a diffeo-engine generate manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"out: {path} has format_version {manifest.get('format_version')}, "
            f"this library reads {FORMAT_VERSION}"
        )
    return manifest
