"""A local Ray cluster for the tests/test_ray_*.py files: small, on this machine, shut down after.

`ray_cluster` starts one per test module (num_cpus is Ray's logical count: room for a few actors
and tasks on a 2-core machine, not a promise of cores) and yields the address other drivers (a
subprocess under test) join it with.
"""
from __future__ import annotations

import pytest

CPUS = 4


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.serve")
    pytest.importorskip("ray.data")
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=CPUS, include_dashboard=False, log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def worker_pids(class_name_part: str) -> list[int]:
    """Process ids of the live actors whose class name holds `class_name_part`."""
    from ray._private import state   # the GCS' actor table; the state API needs the dashboard

    return [a["Pid"] for a in state.actors().values()
            if class_name_part in a["ActorClassName"] and a["State"] == "ALIVE" and a.get("Pid")]
