"""Random inputs for the whole suite (``tests/`` and ``bench/``).

Tests draw fresh random inputs: every run has a seed, printed in pytest's header and fresh
unless ``DIFFEO_TEST_SEED`` gives one. Each test starts the global torch, NumPy and
``random`` generators from that seed and its own id, so a failure replays alone and in any
order: ``DIFFEO_TEST_SEED=<seed> python -m pytest <test id>``.
"""

import os
import random
import secrets
import zlib

import numpy as np
import pytest
import torch

RUN_SEED = int(os.environ.get("DIFFEO_TEST_SEED") or secrets.randbits(31))


def pytest_report_header(config) -> str:
    return f"random inputs: DIFFEO_TEST_SEED={RUN_SEED} replays this run"


@pytest.fixture(autouse=True)
def _seed_per_test(request) -> None:
    seed = zlib.crc32(f"{RUN_SEED}:{request.node.nodeid}".encode())
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
