import pytest
import torch


@pytest.fixture(autouse=True)
def _small_thread_pool():
    # The suite runs on 2 cores; more threads only oversubscribe them.
    torch.set_num_threads(min(2, torch.get_num_threads()))
    yield


@pytest.fixture(scope="session", autouse=True)
def _index_cache_in_a_temporary_directory(tmp_path_factory):
    # Offset indices of the tests' shards and TFRecords never land in the user's ~/.cache; session-wide,
    # so module fixtures and the subprocesses tests start (they inherit the environment) use it too.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ENSEMBLE_KD_INDEX_CACHE", str(tmp_path_factory.mktemp("index-cache")))
        yield
