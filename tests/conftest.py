"""Fixtures shared by the training and reliability tests; tools/ on sys.path, so that tests import a tool
as a module (`import make_toy_data`): tools/ is not a package, and its scripts import each other the same
way, as siblings."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

from trainkit import toy_root, torch_threads  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread: on 2 shared cores this is faster and keeps results independent of the load."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A small toy dataset (VOC and Cityscapes layouts), generated once per test module."""
    return toy_root(tmp_path_factory)
