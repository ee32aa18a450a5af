"""A data root with the digits dataset, shared by the training tests of this folder."""
import os

import pytest

from convit_ssl import data


@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    data.ensure_digits(root)
    return root


@pytest.fixture
def train_env(data_root):
    """Environment for `convit-ssl train` subprocesses: the data root, one thread per process."""
    return dict(os.environ, CONVIT_SSL_DATA=str(data_root), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
