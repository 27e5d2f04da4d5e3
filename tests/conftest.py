"""Fixtures shared by the training and reliability tests, and the order tests are handed out in."""
import pytest

from trainkit import toy_root, torch_threads

# Modules whose tests run whole pipelines or several processes: collected first, so that with pytest-xdist
# (tools/test.sh) the longest tests start at once and the short ones fill the gaps at the end, instead of a
# long test starting last while the other worker idles.
LONG_FIRST = ("test_pipeline", "test_cluster", "test_reliability", "test_fidelity", "test_accumulation",
              "test_benchmark", "test_validation", "test_run", "test_teacher_labels", "test_training")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONG_FIRST)}
    items.sort(key=lambda item: rank.get(item.module.__name__.rsplit(".", 1)[-1], len(rank)))


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread: on 2 shared cores this is faster and keeps results independent of the load."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A small toy dataset (VOC and Cityscapes layouts), generated once per test module."""
    return toy_root(tmp_path_factory)
