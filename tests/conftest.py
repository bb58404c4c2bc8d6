import pytest
import ray

from orchestrator.cluster import init_ray


@pytest.fixture(scope="session")
def local_ray():
    """One local Ray instance (127.0.0.1, 2 CPUs) shared by the tests that need it."""
    init_ray(num_cpus=2, num_gpus=0)
    yield
    ray.shutdown()
