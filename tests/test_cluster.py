"""A real 2-node Ray cluster on loopback (`ray start`, via tools/local_cluster.sh), a sweep
submitted through the Jobs API, trials spread over both nodes; the cluster is stopped even
when the test fails, and only its own processes."""

import os
import secrets
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from raymeta.results import query

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "local_cluster.sh"


@pytest.mark.ray
def test_two_node_cluster_runs_a_submitted_sweep_on_both_nodes(tmp_path):
    cluster_dir = f"/tmp/rmc-{os.getpid()}"  # short: Ray's unix sockets live under it
    env = {**os.environ, "RAYMETA_CLUSTER_DIR": cluster_dir, "RAYMETA_CLUSTER_PORT": "6391",
           "RAYMETA_DASHBOARD_PORT": "8276", "RAYMETA_PORT_BASE": "25000",
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONWARNINGS": "ignore"}
    env.pop("RAY_ADDRESS", None)
    (tmp_path / "sweep.yaml").write_text(textwrap.dedent(f"""
        name: twonode
        store: {tmp_path / 'out'}
        base:
          dataset: {{name: digits}}
          model: {{name: mlp, options: {{hidden: [32]}}}}
          train: {{epochs: 3, batch_size: 64}}
        grid:
          seed: [0, 1, 2, 3]
        resources: {{cpus_per_trial: 1}}
        """))
    try:
        subprocess.run([str(SCRIPT), "start", "1"], env=env, check=True, timeout=180)
        job = subprocess.run(
            ["ray", "job", "submit", "--address", "http://127.0.0.1:8276", "--",
             sys.executable, "-m", "raymeta.cli", "sweep", str(tmp_path / "sweep.yaml"),
             "--address", "auto"],
            env=env, capture_output=True, text=True, timeout=400)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        assert "4 completed, 0 failed" in job.stdout
    finally:
        subprocess.run([str(SCRIPT), "stop"], env=env, timeout=120)
    trials = query.load(str(tmp_path / "out"), "trials", "twonode")
    assert len(trials) == 4 and (trials["status"] == "completed").all()
    assert trials["ray_node_id"].n_unique() == 2  # each node holds one 1-CPU trial at a time
    leftover = subprocess.run(["pgrep", "-f", cluster_dir], capture_output=True, text=True)
    assert leftover.stdout.strip() == ""


@pytest.mark.parametrize("name", ["aws-gpu.yaml", "gcp-gpu.yaml"])
def test_cloud_configs_pass_rays_own_validation(name):
    """The cluster launcher's schema (`ray up` runs the same two calls)."""
    import copy

    import yaml
    from jsonschema import ValidationError
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((ROOT / "clusters" / name).read_text())
    validate_config(prepare_config(copy.deepcopy(config)))
    setup = " ".join(config["setup_commands"] + config["head_start_ray_commands"])
    assert "raymeta" in setup and "RAY_AUTH_MODE=token" in setup
    assert "~/.ray/auth_token" in config["file_mounts"].values()  # the token reaches every node
    typo = copy.deepcopy(config)
    typo["available_node_types"]["gpu_worker"]["min_wokers"] = 0
    with pytest.raises(ValidationError, match="min_wokers"):
        validate_config(prepare_config(typo))


def _check_cluster_spec(spec: dict, where: str) -> None:
    """What KubeRay's v1 API requires of a RayCluster spec (ray-operator/apis/ray/v1)."""
    groups = [("headGroupSpec", spec["headGroupSpec"])]
    groups += [(f"workerGroupSpecs[{i}]", g) for i, g in enumerate(spec["workerGroupSpecs"])]
    assert spec["rayVersion"] == "2.60.0", where
    assert spec["authOptions"]["mode"] == "token", where
    for name, group in groups:
        params = group["rayStartParams"]
        assert all(isinstance(v, str) for v in params.values()), (where, name)  # map[string]string
        containers = group["template"]["spec"]["containers"]
        assert containers and all(c["name"] and c["image"] for c in containers), (where, name)
        if name != "headGroupSpec":
            assert group["groupName"] and group["minReplicas"] <= group["maxReplicas"], (where, name)


def test_kuberay_manifests_have_what_kuberay_requires():
    import yaml

    cluster = yaml.safe_load((ROOT / "clusters" / "kuberay" / "raycluster.yaml").read_text())
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    _check_cluster_spec(cluster["spec"], "raycluster.yaml")
    job = yaml.safe_load((ROOT / "clusters" / "kuberay" / "rayjob.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert job["spec"]["entrypoint"].startswith("raymeta sweep ")
    assert "--resume" in job["spec"]["entrypoint"] and job["spec"]["shutdownAfterJobFinishes"]
    _check_cluster_spec(job["spec"]["rayClusterSpec"], "rayjob.yaml")
