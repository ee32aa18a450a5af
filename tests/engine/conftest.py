"""The environment of `convit-ssl train` subprocesses (the digits data root comes from tests/conftest.py)."""
import os

import pytest


@pytest.fixture
def train_env(data_root):
    """Environment for `convit-ssl train` subprocesses: the data root, one thread per process."""
    return dict(os.environ, CONVIT_SSL_DATA=str(data_root), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
