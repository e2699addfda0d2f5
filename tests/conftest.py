"""Shared test set-up.

Without CUDA the Triton kernels run in the interpreter: ``TRITON_INTERPRET=1`` must be set
before ``triton`` is first imported, which is why it happens here, at collection time.
Tests marked ``gpu`` are skipped cleanly where CUDA is missing.
The seeding of random inputs is the repository root's ``conftest.py`` (tests and bench).
"""

import os

if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def generator() -> torch.Generator:
    """A fresh torch generator, seeded per test so failures reproduce."""
    return torch.Generator().manual_seed(20211206)
