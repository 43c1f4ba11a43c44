"""One live driver per sweep name and store: a second driver of the same name is refused
before Ray starts; a driver that is gone is taken over."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from test_cli import TINY, raymeta

from raymeta.config import parse_sweep
from raymeta.errors import ConfigError
from raymeta.orchestrate import owner


def sweep_file(path, grid: str, epochs: int = 2) -> None:
    base = TINY.replace("epochs: 2", f"epochs: {epochs}")
    path.write_text("name: dup\nstore: out\nbase:\n" + "".join(f"  {line}\n" for line in
                    base.strip().splitlines()) + f"grid:\n  {grid}\n")


def test_a_second_sweep_of_the_same_name_is_refused_while_the_first_runs(tmp_path):
    sweep_file(tmp_path / "a.yaml", "seed: [0, 1]", epochs=400)
    sweep_file(tmp_path / "b.yaml", "seed: [0, 1, 2]")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONWARNINGS": "ignore"}
    first = subprocess.Popen([sys.executable, "-m", "raymeta.cli", "sweep", "a.yaml"], cwd=tmp_path,
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    marker = tmp_path / "out" / "tune" / "dup.owner.json"
    try:
        for _ in range(600):
            if marker.exists() or first.poll() is not None:
                break
            time.sleep(0.1)
        assert marker.exists(), first.communicate()
        record = json.loads(marker.read_text())
        assert record["pid"] == first.pid and record["sweep_file"] == "a.yaml"

        second = raymeta("sweep", "b.yaml", cwd=tmp_path, check=False)
        assert second.returncode == 2, second.stderr
        assert "sweep 'dup' is already running in this store" in second.stderr
        assert f"(pid {first.pid}) from a.yaml, with other settings than b.yaml" in second.stderr
        assert "give this one another name" in second.stderr
        assert "Ray" not in second.stdout + second.stderr.replace("Ray Tune", "")  # before Ray started

        again = raymeta("sweep", "a.yaml", cwd=tmp_path, check=False)  # the same file, twice
        assert again.returncode == 2 and "would train every trial twice" in again.stderr
    finally:
        first.send_signal(signal.SIGINT)
        out, err = first.communicate(timeout=120)
    assert first.returncode == 130, err
    assert not marker.exists()  # released: the next driver may take it


def test_a_gone_driver_is_taken_over_and_a_live_one_is_named(tmp_path, capsys):
    spec = parse_sweep({"name": "dup", "store": str(tmp_path), "base": {}, "grid": {"seed": [0]}})
    fs, path = owner.owner_path(spec)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    now = time.time()
    gone = {"host": os.uname().nodename, "pid": int(dead), "token": "other", "sweep_file": "x.yaml",
            "sweep_digest": "0", "started": now, "heartbeat": now}
    owner._write(fs, path, gone)
    with owner.own_sweep(spec, "mine.yaml"):
        assert json.loads(open(path).read())["sweep_file"] == "mine.yaml"
    assert "taking over sweep 'dup'" in capsys.readouterr().err
    assert not os.path.exists(path)

    # alive elsewhere (another host, recent heartbeat): refused; silent for STALE_S: taken over
    owner._write(fs, path, {**gone, "host": "node-7", "pid": 1})
    with pytest.raises(ConfigError, match=r"on node-7 \(pid 1\) from x.yaml"):
        owner.check_owner(spec, "mine.yaml")
    owner._write(fs, path, {**gone, "host": "node-7", "heartbeat": now - owner.STALE_S - 1})
    assert owner.check_owner(spec, "mine.yaml")["host"] == "node-7"
