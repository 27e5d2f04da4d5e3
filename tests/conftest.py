"""Fixtures shared by the training and reliability tests."""
import pytest

from trainkit import toy_root, torch_threads


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread: on 2 shared cores this is faster and keeps results independent of the load."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A small toy dataset (VOC and Cityscapes layouts), generated once per test module."""
    return toy_root(tmp_path_factory)
