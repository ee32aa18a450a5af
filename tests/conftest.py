"""Shared test settings: one thread per process (the CI machine has 2 cores) and fixed seeds.

Tests import their shared oracles as ``import oracles`` (this folder is put on sys.path): the name
``tests`` belongs to VISSL's wheel, which installs a top-level package of that name.
"""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
    """A data root holding the digits datasets (``digits``, ``digits_val``), written once per session."""
    from convit_ssl.data import ensure_digits

    root = tmp_path_factory.mktemp("data")
    ensure_digits(root)
    return root


@pytest.fixture(autouse=True)
def _deterministic():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
