"""Shared fixtures: one real local Ray cluster per test session.

Tests by speed: every test that uses a real Ray cluster (the ``ray_cluster``
fixture, directly or through another fixture) is marked ``slow`` here, as are the
cluster, browser and subprocess tests that carry the mark themselves. The README's
``python -m pytest`` runs everything; ``pytest -m "not slow"`` is the quick loop.
"""

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


def pytest_collection_modifyitems(config, items) -> None:  # noqa: ARG001 - pytest's hook
    """Mark every test that needs the shared Ray cluster ``slow``."""
    for item in items:
        if "ray_cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _no_credentials_leak():
    """Each test leaves the environment as it found it: code under test moves passwords
    out of URIs into variables (``PGPASSWORD``, ``MLFLOW_TRACKING_PASSWORD`` …) and
    remembers which (``study.credentials._TAKEN``); neither may reach a later test."""
    import os

    from study import credentials

    env, taken = dict(os.environ), set(credentials._TAKEN)
    yield
    for name in set(os.environ) - set(env):
        del os.environ[name]
    os.environ.update(env)
    credentials._TAKEN.clear()
    credentials._TAKEN.update(taken)
