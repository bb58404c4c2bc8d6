import os
from pathlib import Path

import pytest
import ray

from orchestrator.cluster import init_ray

# Ray workers import trainables defined in test modules by name.
TESTS = str(Path(__file__).resolve().parent)
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (TESTS, os.environ.get("PYTHONPATH")) if p)


@pytest.fixture(scope="session")
def local_ray():
    """One local Ray instance (127.0.0.1, 2 CPUs) shared by the tests that need it."""
    init_ray(num_cpus=2, num_gpus=0)
    yield
    ray.shutdown()
