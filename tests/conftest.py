"""Shared fixtures: one real local Ray cluster per test session."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster (2 CPUs, no dashboard), shared by every test that needs Ray.

    The environment the platform sets in ``study.runner.init_ray`` is set here
    first, so the studies under test run exactly as ``study run`` runs them.
    """
    import ray

    from study.runner import train_env

    for key, value in train_env(local=True).items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "0.5")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # address="local": a new cluster even when `ray start` left one on this machine
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
