"""Shared fixtures. Ray starts once per test session, for real (ray-notes §3.3 settings)."""

import os

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # no token file, no warnings in tests
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

import pytest


@pytest.fixture(scope="session")
def ray_session():
    import ray

    ray.init(num_cpus=3, object_store_memory=256 * 1024**2, log_to_driver=False,
             configure_logging=True, logging_level="ERROR")
    yield
    ray.shutdown()


def tiny_experiment(**sections):
    """A digits experiment that trains in well under a second."""
    base = {"dataset": {"name": "digits"}, "model": {"name": "mlp", "options": {"hidden": [32]}},
            "train": {"epochs": 2, "batch_size": 128}, "meta_set": {"per_class": 5}}
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return base
