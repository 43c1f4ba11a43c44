"""Shared fixtures. Ray starts once per test session, for real (ray-notes §3.3 settings)."""

import os

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # no token file, no warnings in tests
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# raymeta's local state (the record of rows a store refused) stays out of the user's home
os.environ.setdefault("RAYMETA_STATE_DIR", __import__("tempfile").mkdtemp(prefix="raymeta-state-"))

import pytest

EXAMPLE_PLUGIN = __import__("pathlib").Path(__file__).resolve().parents[1] / "examples" / "raymeta-example"
"""the example plugin package (docs/extending.md); on the path of every Ray worker the tests
start, as an installed package would be (test_plugins)"""
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(EXAMPLE_PLUGIN), os.environ.get("PYTHONPATH")]))


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


@pytest.fixture
def s3_server():
    """A local S3-compatible server (moto in server mode) with an empty bucket."""
    import pyarrow.fs as pafs
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    pafs.S3FileSystem(endpoint_override=f"{host}:{port}", scheme="http",
                      region="us-east-1", allow_bucket_creation=True).create_dir("sweeps")
    yield f"s3://sweeps/raymeta?endpoint_override={host}:{port}&scheme=http&region=us-east-1"
    server.stop()
    for key, value in old.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
