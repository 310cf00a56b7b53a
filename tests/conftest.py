"""Shared fixtures: one real local Ray cluster per test session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster (2 CPUs, no dashboard), shared by every test that needs Ray.

    The environment the platform sets in ``study.runner.init_ray`` is set here
    first, so the studies under test run exactly as ``study run`` runs them.
    """
    import ray

    from study.runner import set_driver_env

    set_driver_env(local=True)
    # address="local": a new cluster even when `ray start` left one on this machine
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
