import os
from pathlib import Path

import pytest
import ray

from cifar10_jpeg import cifar10_jpeg
from orchestrator.tuning.cluster import init_ray
from results_fixture import results_sweep  # noqa: F401  (the sweep the results tests share)

# Ray workers import trainables defined in test modules by name.
TESTS = str(Path(__file__).resolve().parent)
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (TESTS, os.environ.get("PYTHONPATH")) if p)


@pytest.fixture(scope="session", autouse=True)
def _image_cache(tmp_path_factory):
    """Decoded images of the tests' throwaway folders are cached for this session only, not
    in ~/.cache (set before any Ray worker starts, so trials inherit it)."""
    os.environ["MATE_IMAGE_CACHE"] = str(tmp_path_factory.mktemp("image-cache"))


@pytest.fixture(scope="session")
def local_ray():
    """One local Ray instance (127.0.0.1, 2 CPUs) shared by the tests that need it."""
    init_ray(num_cpus=2, num_gpus=0)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def cifar10_root() -> Path:
    """The extracted CIFAR-10 JPEG set; the test fails (never skips) when it is missing."""
    try:
        return cifar10_jpeg()
    except FileNotFoundError as err:
        pytest.fail(str(err), pytrace=False)
