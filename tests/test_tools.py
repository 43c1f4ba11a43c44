"""The benchmark tools run and print their tables (tiny settings; numbers are not asserted)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_meta_step_prints_every_variant():
    extra = {"mwnet+window, every 2": {"method": {"name": "mwnet", "famus": True, "meta_interval": 2},
                                       "famus": {"candidates": 2, "exact_below_window": False}}}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "bench_meta_step.py"), "--model", "resnet32",
         "--model-options", '{"blocks": 1}', "--batch", "8", "--warmup", "1", "--steps", "1",
         "--repeats", "1", "--methods", "ce,mwnet,l2r", "--format", "markdown", "--compile",
         "--variants", json.dumps(extra)],
        capture_output=True, text=True, timeout=300, check=True)
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in proc.stdout.splitlines()
            if line.startswith("| ")]
    assert [r[0] for r in rows[1:]] == ["ce", "ce, compiled", "mwnet", "mwnet+famus", "l2r", "l2r+famus",
                                        "mwnet+window, every 2",
                                        "data path (gather, crop, flip, normalise)"]
    by_label = {r[0]: r for r in rows[1:]}
    assert float(by_label["mwnet+window, every 2"][3]) > 0  # x full: against full mwnet
    assert float(by_label["data path (gather, crop, flip, normalise)"][2]) < 1  # x ce: a share
    assert "2 steps after 2 warm-up" in proc.stdout  # whole meta intervals are timed
    assert "meta batch 8" in proc.stdout


def test_bench_times_a_whole_epoch_of_device_resident_data():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "bench_meta_step.py"), "--model", "resnet32",
         "--model-options", '{"blocks": 1}', "--batch", "16", "--epoch", "100"],
        capture_output=True, text=True, timeout=300, check=True)
    assert "one epoch of ce, resnet32, 96 samples in batches of 16" in proc.stdout  # 6 full batches
    assert "samples/s" in proc.stdout


def test_bench_times_packed_seeds_against_one():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "bench_meta_step.py"), "--model", "resnet32",
         "--model-options", '{"blocks": 1}', "--batch", "8", "--warmup", "1", "--steps", "1",
         "--repeats", "1", "--methods", "ce,mwnet", "--packed", "1,2", "--format", "markdown"],
        capture_output=True, text=True, timeout=300, check=True)
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in proc.stdout.splitlines()
            if line.startswith("| ")]
    assert [(r[0], r[1]) for r in rows[1:]] == [("ce", "1"), ("ce", "2"), ("mwnet", "1"), ("mwnet", "2")]
    assert [r[4] for r in rows[1:]][::2] == ["1.00", "1.00"]  # each method against its one seed
    assert all(float(r[3].replace(",", "")) > 0 for r in rows[1:])


NO_RAY = """import sys


class Absent:  # the GPU machine has neither Ray nor polars
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("ray", "polars"):
            raise ModuleNotFoundError(f"No module named {name!r}")


sys.meta_path.insert(0, Absent())
"""


def without_ray(tmp_path: Path) -> dict:
    """An environment where `import ray` and `import polars` fail, as on the GPU machine."""
    site = tmp_path / "no-ray"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(NO_RAY)
    return {**os.environ, "PYTHONPATH": str(site)}


def test_gpu_check_runs_every_section_on_a_cpu(tmp_path):
    """The GPU machine is lent for minutes: its one command must not rot between loans."""
    out = tmp_path / "report.md"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_check.py"), "--device", "cpu",
                           "--quick", "--out", str(out)], capture_output=True, text=True,
                          timeout=600, env=without_ray(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = out.read_text()
    for title in ("every method, full and FaMUS: cnn8", "bf16, channels_last", "packed seeds",
                  "one epoch of ce: preact_resnet18", "the Trainer against a bare PyTorch loop"):
        assert title in report, title
    assert "| mlc+famus |" in report and "| raymeta Trainer.train_epoch |" in report
    assert "0 section(s) failed" in report


DEVICE_SWEEP = """
name: tiny-device
base:
  dataset: {name: digits}
  model: {name: mlp, options: {hidden: [16]}}
  meta_set: {per_class: 5}
  noise: {type: uniform, rate: 0.4}
  train: {epochs: EPOCHS, batch_size: 64, meta_batch_size: 32}  # ce never reads meta_batch_size
grid:
  method: [{name: ce}, {name: l2r}]
  seed: [0, 1]
"""


def test_device_cells_train_a_sweeps_cells_without_ray_and_continue_them_after_a_deadline(tmp_path):
    """The GPU machine has no Ray: tools/device_cells.py runs a sweep's cells there, with the ids
    a sweep gives them, and a cell cut off at the deadline goes on from its checkpoint."""
    import pyarrow.parquet as pq

    from raymeta.orchestrate.grid import expand, load_sweep

    def cells(sweep: Path, *args: str) -> subprocess.CompletedProcess:
        proc = subprocess.run([sys.executable, str(ROOT / "tools" / "device_cells.py"), str(sweep),
                               "--state", str(tmp_path / "state"), *args], cwd=tmp_path,
                              env=without_ray(tmp_path), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc

    short, long = tmp_path / "short.yaml", tmp_path / "long.yaml"
    short.write_text(DEVICE_SWEEP.replace("EPOCHS", "3"))
    long.write_text(DEVICE_SWEEP.replace("EPOCHS", "400").replace("tiny-device", "long-device"))
    proc = cells(short, "--only", "seed=0", "--parallel", "2")
    assert "2 cell(s) chosen, 0 finished before, 2 to run" in proc.stdout
    ids = {c.trial_id for c in expand(load_sweep(short), tmp_path) if c.config.seed == 0}
    trials = tmp_path / "state" / "store" / "trials" / "sweep=tiny-device"
    assert {p.stem for p in trials.glob("*.parquet")} == ids  # a sweep's --resume skips them
    assert {pq.read_table(p).column("status")[0].as_py() for p in trials.glob("*.parquet")} == {"completed"}
    assert proc.stdout.count("| completed | 3/3 |") == 2
    assert "2 cell(s) chosen, 2 finished before, 0 to run" in cells(short, "--only", "seed=0").stdout

    proc = cells(long, "--only", "seed=1", "--only", "method.name=[ce]", "--deadline", "6")
    (cell,) = [c for c in expand(load_sweep(long), tmp_path)
               if c.config.seed == 1 and c.config.method.name == "ce"]
    assert f"{cell.trial_id}: interrupted (deadline)" in proc.stdout
    assert not (tmp_path / "state" / "store" / "trials" / "sweep=long-device").exists()  # no row
    checkpoint = tmp_path / "state" / "checkpoints" / cell.trial_id / "checkpoint.pt"
    first_log = (tmp_path / "state" / "logs" / f"{cell.trial_id}.log").read_text()
    proc = cells(long, "--only", "seed=1", "--only", "method.name=ce")
    assert "| completed | 400/400 |" in proc.stdout
    log = (tmp_path / "state" / "logs" / f"{cell.trial_id}.log").read_text()[len(first_log):]
    if checkpoint.exists():  # the first run finished an epoch before the deadline: no epoch twice
        assert "epoch   1/400" not in log
    assert "epoch 400/400" in log
    assert "| not started (deadline) |" in cells(long, "--only", "seed=0", "--deadline", "0").stdout


def test_mlc_t_gradient_reports_the_size_of_t_steps():
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "mlc_t_gradient.py"), "--dataset", "digits",
                           "--epochs", "1", "--clip", "1"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "epoch 0: T diagonal" in proc.stdout and "largest entry in [0, 1): 12 steps" in proc.stdout


def test_bench_sweep_compares_the_driver_with_bare_tune():
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_sweep.py"), "--trials", "10",
                           "--quick", "--chain", "4"], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ray tune, bare")
            or line.startswith("| raymeta sweep")]
    assert len(rows) == 3 and "raymeta sweep: overhead per trial over Tune's own" in proc.stdout
    assert rows[2].startswith("| raymeta sweep, cells_per_trial 4 |")
    assert "raymeta sweep, cells_per_trial 4: slots idle" in proc.stdout and "between the cells of a chain" in proc.stdout


def _fidelity_table_tool():
    import importlib.util

    spec = importlib.util.spec_from_file_location("fidelity_table", ROOT / "tools" / "fidelity_table.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def test_fidelity_table_keeps_each_mlc_form_and_beta_in_a_row_of_its_own():
    import polars as pl

    rows = [  # (method, its label, MLC's code form, beta, seed, final accuracy)
        ("ce", "ce", False, None, 0, 0.97), ("mlc", "mlc", False, 1.0, 0, 0.94),
        ("mlc", "mlc", True, 1.0, 0, 0.975), ("mlc", "mlc", False, 0.003, 0, 0.976),
        ("mlc", "mlc", False, 0.003, 1, 0.978), ("mlc", "mlc+famus", False, 0.1, 0, 0.97),
        ("mlc", "mlc", False, 0.003, 2, 0.10)]  # collapsed: out of the mean, but in the cell
    trials = pl.DataFrame([{
        "config_digest": f"d{i}", "trial_id": f"t{i}", "finished_at": "x",
        "noise.type": "uniform", "noise.rate": 0.4, "method.name": name, "method": label,
        "method.t_on_logits": code, "method.reset_t_each_step": code, "method.meta_lr": beta,
        "final_test_acc": acc, "seed": seed, "status": "collapsed" if acc < 0.5 else "completed"}
        for i, (name, label, code, beta, seed, acc) in enumerate(rows)])
    lines = [line for line in _fidelity_table_tool().table(trials, "final").splitlines()
             if "| uniform |" in line]
    paper = "/ 98.47"  # MLC's paper number stands beside each of its forms
    assert lines == [
        "| CE | uniform | — / 98.59 | — / 98.39 | — / 98.27 | 97.00 ± 0.00 (1) / 98.02 (-1.02) |",
        f"| MLC | uniform | — / 98.98 | — / 98.80 | — / 98.64 | 94.00 ± 0.00 (1) {paper} (-4.47) |",
        f"| MLC (code) | uniform | — / 98.98 | — / 98.80 | — / 98.64 | 97.50 ± 0.00 (1) {paper} (-0.97) |",
        "| MLC (beta 0.003) | uniform | — / 98.98 | — / 98.80 | — / 98.64 | "
        f"97.70 ± 0.14 (2) + 1 collapsed {paper} (-0.77) |",
        "| MLC + FaMUS (beta 0.1) | uniform | — / 98.98 | — / 98.80 | — / 98.64 | "
        f"97.00 ± 0.00 (1) {paper} (-1.47) |"]


def test_fidelity_table_sets_each_fast_setting_beside_its_full_method():
    import polars as pl

    tool = _fidelity_table_tool()
    rows = [  # (method, famus, MLC's code form, meta interval, seed, noise rate, final accuracy)
        ("mwnet", True, False, 2, 0, 0.4, 0.97), ("mwnet", True, False, 2, 1, 0.4, 0.98),
        ("mwnet", True, False, 4, 0, 0.4, 0.96),  # another fast setting: a row of its own
        ("mwnet", False, False, 1, 0, 0.4, 0.99), ("mwnet", False, False, 1, 0, 0.2, 0.10),
        ("mlc", True, True, 1, 0, 0.4, 0.96), ("mlc", False, True, 1, 0, 0.4, 0.95),
        ("mlc", False, False, 1, 0, 0.4, 0.50)]  # MLC as the paper writes it: not the code form's
    trials = pl.DataFrame([{
        "config_digest": f"d{i}", "trial_id": f"t{i}", "status": "completed", "finished_at": "x",
        "noise.type": "uniform", "noise.rate": rate, "method.name": name, "method": name,
        "method.famus": famus, "method.t_on_logits": code, "method.reset_t_each_step": code,
        "method.meta_interval": every, "train.meta_batch_size": 100, "final_test_acc": acc,
        "seed": seed} for i, (name, famus, code, every, seed, rate, acc) in enumerate(rows)])
    lines = tool.cheap_table(trials, "final").splitlines()
    assert lines[2:] == [
        "| MW-Net | every 2, meta batch 100 | uniform 40% | 97.50 ± 0.71 (2) | 99.00 ± 0.00 (1) | -1.50 |",
        "| MW-Net | every 4, meta batch 100 | uniform 40% | 96.00 ± 0.00 (1) | 99.00 ± 0.00 (1) | -3.00 |",
        "| MLC (code) | every 1, meta batch 100 | uniform 40% | 96.00 ± 0.00 (1) | 95.00 ± 0.00 (1) | +1.00 |"]


def test_fidelity_table_extra_rows_give_each_setting_a_row_and_each_cell_its_gap_to_ce():
    import polars as pl

    rows = [  # (method label, meta interval, warm-up, momentum, noise rate, seed, final accuracy)
        ("ce", None, None, 0.0, 0.3, 0, 0.97), ("ce", None, None, 0.0, 0.4, 0, 0.95),
        ("ce", None, None, 0.0, 0.4, 1, 0.97), ("ce", None, None, 0.9, 0.4, 0, 0.99),  # on another optimizer
        ("metalabelnet", 1, 6, 0.9, 0.4, 0, 0.99),  # on another optimizer: not this table's
        ("mwnet", 1, None, 0.0, 0.4, 0, 0.94), ("mwnet+famus", 4, None, 0.0, 0.4, 0, 0.975),
        ("mwnet+famus", 4, None, 0.0, 0.2, 0, 0.99),  # not a column of this table
        ("metalabelnet", 1, 5, 0.0, 0.3, 0, 0.95), ("metalabelnet", 1, 8, 0.0, 0.3, 0, 0.98)]
    trials = pl.DataFrame([{
        "config_digest": f"d{i}", "trial_id": f"t{i}", "status": "completed", "finished_at": "x",
        "noise.type": "uniform", "noise.rate": rate, "method.name": label.split("+")[0],
        "method": label, "method.meta_interval": every, "method.warmup_epochs": warmup,
        "optimizer.momentum": momentum, "train.meta_batch_size": 100, "final_test_acc": acc,
        "seed": seed} for i, (label, every, warmup, momentum, rate, seed, acc) in enumerate(rows)])
    lines = _fidelity_table_tool().extra_table(trials, "final").splitlines()
    assert lines[2:] == [
        "| CE | full | uniform | 97.00 ± 0.00 (1) | 96.00 ± 1.41 (2) |",
        "| MW-Net | full | uniform | — | 94.00 ± 0.00 (1) [-2.00] |",
        "| MW-Net + FaMUS | every 4 | uniform | — | 97.50 ± 0.00 (1) [+1.50] |",
        "| MetaLabelNet | warm-up 5 | uniform | 95.00 ± 0.00 (1) [-2.00] | — |",
        "| MetaLabelNet | warm-up 8 | uniform | 98.00 ± 0.00 (1) [+1.00] | — |"]


def test_virtual_step_ab_runs_both_steps_side_by_side():
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "virtual_step_ab.py"), "--methods",
                           "metalabelnet", "--noise", "uniform", "--seeds", "0"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [line.split(" | ") for line in proc.stdout.splitlines() if line.startswith("| metalabelnet")]
    assert len(rows) == 1 and rows[0][1:3] == ["uniform", "0"]
    test_optimizer, test_sgd, meta_optimizer, meta_sgd = (float(c.strip(" |")) for c in rows[0][3:])
    assert min(test_optimizer, test_sgd) > 80.0 and min(meta_optimizer, meta_sgd) > 0.8  # both learn
