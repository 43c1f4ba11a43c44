"""Files that a store, a checkpoint folder or a dataset folder provides are untrusted: a
planted checkpoint or label file that would run code when unpickled is refused, and its code
never runs (`raymeta run --resume`, a sweep's `--resume`, the label reader)."""

import builtins

import numpy as np
import polars as pl
import pytest
import torch
from conftest import tiny_experiment
from test_cli import raymeta

from raymeta.config import ExperimentConfig, parse_sweep
from raymeta.data.datasets import read_label_file
from raymeta.errors import DataError
from raymeta.orchestrate.grid import expand
from raymeta.orchestrate.sweep import run_sweep
from raymeta.results import query


class Payload:
    """Unpickling this object writes `marker`: what an attacker's shell command would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.exec, (f"open({self.marker!r}, 'w').write('ran')",)


def plant(path, marker, **content):
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({**content, "payload": Payload(marker)}, path)


def test_the_payload_runs_when_unpickled(tmp_path):
    """The planted file is a real attack: torch.load without weights_only runs it."""
    plant(tmp_path / "evil.pt", tmp_path / "ran")
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert (tmp_path / "ran").read_text() == "ran"


def test_run_resume_refuses_a_planted_checkpoint(tmp_path):
    (tmp_path / "exp.yaml").write_text("dataset: {name: digits}\nmodel: {name: mlp}\n"
                                       "train: {epochs: 1}\nmeta_set: {per_class: 5}\n")
    marker = tmp_path / "ran"
    # a forged digest does not help: nothing is unpickled beyond plain data
    digest = ExperimentConfig.model_validate({"dataset": {"name": "digits"}, "model": {"name": "mlp"},
                                              "train": {"epochs": 1}, "meta_set": {"per_class": 5}}).digest()
    plant(tmp_path / "ckpt" / "checkpoint.pt", marker, config_digest=digest)
    proc = raymeta("run", "exp.yaml", "--out", "ckpt", "--resume", "--store", "store",
                   cwd=tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "refused to load" in proc.stderr and "could run code" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not marker.exists()
    assert not (tmp_path / "store").exists()  # refused before anything ran


def test_sweep_resume_refuses_a_planted_checkpoint(ray_session, tmp_path):
    spec = parse_sweep({"name": "planted", "store": str(tmp_path / "store"),
                        "base": tiny_experiment(), "grid": {"seed": [0, 1]}})
    cells = expand(spec)
    marker = tmp_path / "ran"
    planted = cells[0].trial_id
    plant(tmp_path / "store" / "checkpoints" / "sweep=planted" / planted / "checkpoint.pt",
          marker, config_digest=cells[0].config.digest())
    run_sweep(spec, cells, resume=True)
    assert not marker.exists()
    trials = query.load(str(tmp_path / "store"), "trials", "planted")
    status = dict(zip(trials["trial_id"], trials["status"]))
    assert status == {planted: "failed", cells[1].trial_id: "completed"}
    error = trials.filter(pl.col("trial_id") == planted)["error"].item()
    assert "refused to load" in error and "checkpoint.pt" in error


def test_label_reader_refuses_code_and_pickled_arrays(tmp_path):
    marker = tmp_path / "ran"
    plant(tmp_path / "labels.pt", marker, worse_label=torch.zeros(10, dtype=torch.long))
    with pytest.raises(DataError, match="refused to load"):
        read_label_file(str(tmp_path / "labels.pt"), "worse_label", 10, 10)
    assert not marker.exists()
    np.save(tmp_path / "labels.npy", np.array([Payload(marker)] * 10, dtype=object),
            allow_pickle=True)
    with pytest.raises(DataError, match="could not read noisy labels"):
        read_label_file(str(tmp_path / "labels.npy"), None, 10, 10)
    assert not marker.exists()


def test_label_reader_accepts_cifar_n_style_numpy_and_checks_the_range(tmp_path):
    torch.save({"worse_label": np.arange(10) % 3, "clean_label": np.arange(10) % 3},
               tmp_path / "cifar-n.pt")
    labels = read_label_file(str(tmp_path / "cifar-n.pt"), "worse_label", 10, 3)
    assert labels.tolist() == (np.arange(10) % 3).tolist()
    for bad, shown in (([0] * 9 + [99], "99 at index 9"), ([-1] + [0] * 9, "-1 at index 0")):
        np.save(tmp_path / "bad.npy", np.array(bad))
        with pytest.raises(DataError, match=f"outside 0..2.*first: {shown}"):
            read_label_file(str(tmp_path / "bad.npy"), None, 10, 3)
