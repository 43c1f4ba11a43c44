"""The `raymeta` command as a user runs it (subprocesses, real files)."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def raymeta(*args, cwd, check=True):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "raymeta.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


TINY = """
dataset: {name: digits}
model: {name: mlp, options: {hidden: [32]}}
train: {epochs: 2, batch_size: 128}
meta_set: {per_class: 5}
"""


def test_validate_shipped_sweeps():
    """Every shipped sweep is valid; those that need GPUs or data this machine lacks are
    refused for that reason alone, as `raymeta sweep` would refuse them."""
    files = sorted(ROOT.glob("sweeps/*.yaml"))
    proc = raymeta("validate", *(str(f.relative_to(ROOT)) for f in files), cwd=ROOT, check=False)
    assert "quickstart.yaml: ok, sweep with 36 trials" in proc.stdout
    assert "mnist-mlc-table1.yaml: ok, sweep with 108 trials" in proc.stdout  # ../shared/data
    assert "digits-search.yaml: ok, sweep with a search of 12 samples in each of 2 cells" in proc.stdout
    assert ("mnist-mlc-beta-search.yaml: note: Optuna's TPE draws its first 10 samples at random"
            in proc.stdout)  # its 8 samples are a random search
    refused = proc.stderr.strip().splitlines()
    valid = [line for line in proc.stdout.splitlines() if ": ok, " in line]
    assert len(valid) + len(refused) == len(files)
    assert all("GPU per trial, but this machine has no GPU" in line or "no data found" in line
               for line in refused), refused


CIFAR10_JPEG = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


@pytest.mark.skipif(not CIFAR10_JPEG.is_file(), reason="needs ../shared/data/cifar10-jpeg.tar.gz")
def test_cifar10_jpeg_sweep_validates_on_the_shared_images(tmp_path):
    """The CIFAR-10 (JPEG q75) sweep reads the shared archive, unpacked as its header says, as
    an image folder: 50,000 + 10,000 images decoded (and cached) before any trial would start."""
    import tarfile

    with tarfile.open(CIFAR10_JPEG) as archive:
        archive.extractall(tmp_path / "data" / "cifar10-jpeg", filter="data")
    sweep = str(ROOT / "sweeps" / "cifar10-jpeg-40.yaml")
    proc = raymeta("validate", "--address", "gpu-cluster:6379", sweep, cwd=tmp_path)
    assert "cifar10-jpeg-40.yaml: ok, sweep with 15 trials" in proc.stdout
    assert len(list((tmp_path / "data" / "cifar10-jpeg" / ".raymeta-cache").glob("*.npz"))) == 1


def test_bad_input_exits_2_with_the_reason(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: q\nbase: {noise: {type: unifrom, rate: 0.4}}\ngrid: {seed: [0]}\n")
    proc = raymeta("sweep", str(bad), cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert "noise.type: unknown noise type 'unifrom'" in proc.stderr and "did you mean 'uniform'" in proc.stderr
    assert not (tmp_path / "results").exists()  # nothing written, no Ray started
    proc = raymeta("validate", str(bad), cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "unifrom" in proc.stderr


def test_run_then_summary(tmp_path):
    (tmp_path / "exp.yaml").write_text(TINY)
    proc = raymeta("run", "exp.yaml", "--set", "noise.type=uniform", "--set", "noise.rate=0.4",
                   cwd=tmp_path)
    assert "epoch   2/2" in proc.stdout and "final test acc" in proc.stdout
    assert list((tmp_path / "runs").glob("*/checkpoint.pt"))
    summary = raymeta("results", "summary", "--sweep", "runs", cwd=tmp_path)
    assert "uniform 0.4" in summary.stdout and "(1)" in summary.stdout
    again = raymeta("run", "exp.yaml", "--set", "noise.type=uniform", "--set", "noise.rate=0.4",
                    "--resume", cwd=tmp_path)  # already finished: nothing left to train
    assert not [line for line in again.stdout.splitlines() if line.startswith("epoch")]
    final = [line for line in proc.stdout.splitlines() if "final test acc" in line]
    assert final and final[0].split(":")[1] in again.stdout  # the same result, from the checkpoint
    missing = raymeta("results", "summary", "--sweep", "nope", cwd=tmp_path, check=False)
    assert missing.returncode == 2 and "no trials results for sweep 'nope'" in missing.stderr
    no_trial = raymeta("results", "curves", "--trial", "xyz", "--sweep", "runs", cwd=tmp_path,
                       check=False)
    assert no_trial.returncode == 2 and "no curves of trial(s) xyz in sweep 'runs'" in no_trial.stderr
    plotted = raymeta("results", "plot", "curves", "--sweep", "runs", "--metric", "meta_acc",
                      cwd=tmp_path)
    assert "wrote plots/runs-curves-meta_acc.png" in plotted.stdout  # not the test_acc file
    costs = raymeta("results", "summary", "--sweep", "runs", "--metric", "wall_seconds", cwd=tmp_path)
    seconds = float(costs.stdout.splitlines()[2].split()[1])
    assert 0 < seconds < 300  # seconds, not a percentage


def test_ctrl_c_of_a_run_says_how_to_resume(tmp_path):
    import signal
    import time

    (tmp_path / "exp.yaml").write_text(TINY.replace("epochs: 2", "epochs: 5000"))
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen([sys.executable, "-m", "raymeta.cli", "run", "exp.yaml"], cwd=tmp_path,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list((tmp_path / "runs").glob("*/checkpoint.pt")):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, out + err
    assert "interrupted: no results row was written; its last finished epoch is saved in runs/" in err
    assert "continue with: raymeta run exp.yaml --resume" in err
    assert not (tmp_path / "results" / "trials").exists()


def test_run_packed_seeds_writes_a_row_per_seed(tmp_path):
    (tmp_path / "exp.yaml").write_text(TINY)
    single = raymeta("run", "exp.yaml", "--set", "noise.type=uniform", "--set", "noise.rate=0.4",
                     "--set", "method.name=mwnet", cwd=tmp_path)
    proc = raymeta("run", "exp.yaml", "--set", "noise.type=uniform", "--set", "noise.rate=0.4",
                   "--set", "method.name=mwnet", "--seeds", "0,1,2", cwd=tmp_path)
    assert "epoch   2/2  test_acc per seed" in proc.stdout and "(3 seeds)" in proc.stdout
    assert len([line for line in proc.stdout.splitlines() if "final test acc" in line]) == 3
    assert list((tmp_path / "runs").glob("mwnet_digits_uniform0.4_s0_*-pack3/checkpoint.pt"))
    summary = raymeta("results", "summary", "--sweep", "runs", cwd=tmp_path)
    assert "(3)" in summary.stdout  # three seeds: mean ± std over them
    # seed 0 ran alone first and again in the pack: one experiment, one trial id, one row
    trial_id = single.stdout.strip().splitlines()[-1].split(":")[0]
    assert trial_id.startswith("mwnet_digits_uniform0.4_s0_") and f"{trial_id}: final" in proc.stdout
    assert len(list((tmp_path / "results" / "trials" / "sweep=runs").glob("*.parquet"))) == 3
    # resuming that pack's folder with other seeds is refused before anything is trained
    other = raymeta("run", "exp.yaml", "--set", "noise.type=uniform", "--set", "noise.rate=0.4",
                    "--set", "method.name=mwnet", "--seeds", "0,1,3", "--resume", "--out",
                    str(next((tmp_path / "runs").glob("*-pack3"))), cwd=tmp_path, check=False)
    assert other.returncode == 2 and "was written by another config" in other.stderr


@pytest.mark.ray
def test_sweep_command_prints_the_summary(tmp_path):
    (tmp_path / "mini.yaml").write_text(textwrap.dedent("""
        name: mini
        store: out
        base:
          dataset: {name: digits}
          model: {name: mlp, options: {hidden: [32]}}
          train: {epochs: 2, batch_size: 128}
        grid:
          noise: [{type: none}, {type: flip_to_one, rate: 0.4}]
        """))
    proc = raymeta("sweep", "mini.yaml", cwd=tmp_path)
    assert "sweep 'mini': 2 trials" in proc.stdout
    assert "[2/2 done, 0 running, 0 failed, 0 pending" in proc.stdout
    assert "2 completed, 0 failed" in proc.stdout
    assert "clean" in proc.stdout and "flip_to_one 0.4" in proc.stdout
    assert len(list((tmp_path / "out" / "trials" / "sweep=mini").glob("*.parquet"))) == 2


def test_impossible_worker_requests_fail_before_ray_starts(tmp_path):
    (tmp_path / "exp.yaml").write_text(TINY)
    proc = raymeta("run", "exp.yaml", "--workers", "2", "--gpus-per-worker", "1", cwd=tmp_path,
                   check=False)
    assert proc.returncode == 2 and "has no GPU" in proc.stderr
    (tmp_path / "half.yaml").write_text(
        "name: h\nbase: {}\ngrid: {seed: [0]}\n"
        "resources: {workers_per_trial: 2, gpus_per_trial: 1}\n")
    proc = raymeta("validate", "half.yaml", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "workers of one run cannot share a GPU" in proc.stderr


@pytest.mark.ray
def test_sweep_into_s3_and_summary_from_it(tmp_path, s3_server):
    (tmp_path / "mini.yaml").write_text(textwrap.dedent(f"""
        name: s3mini
        store: "{s3_server}"
        base:
          dataset: {{name: digits}}
          model: {{name: mlp, options: {{hidden: [32]}}}}
          train: {{epochs: 2, batch_size: 128}}
        grid:
          noise: [{{type: none}}, {{type: uniform, rate: 0.4}}]
        """))
    proc = raymeta("sweep", "mini.yaml", cwd=tmp_path)
    assert "2 completed, 0 failed" in proc.stdout
    assert not (tmp_path / "sweeps").exists() and not (tmp_path / "s3:").exists()
    summary = raymeta("results", "summary", "--sweep", "s3mini", "--store", s3_server, cwd=tmp_path)
    assert "clean" in summary.stdout and "uniform 0.4" in summary.stdout and "(1)" in summary.stdout
    import pyarrow.fs as pafs

    fs, base = pafs.FileSystem.from_uri(s3_server)
    names = {i.path.removeprefix(base) for i in
             fs.get_file_info(pafs.FileSelector(base, recursive=True))}
    assert len([n for n in names if n.startswith("/trials/sweep=s3mini/")]) == 2
    assert any(n.startswith("/tune/s3mini/") for n in names)  # Tune's own state, for --resume
    # each trial's checkpoint at a path of its own, beside its rows
    assert len([n for n in names if n.startswith("/checkpoints/sweep=s3mini/")
                and n.endswith("/checkpoint.pt")]) == 2


@pytest.mark.parametrize("command,content,message", [
    ("sweep", "name: q\nbase: {method: {name: mwn}}\ngrid: {seed: [0]}\n", "did you mean 'mwnet'"),
    ("run", "method: {name: mwn}\n", "did you mean 'mwnet'"),
    ("run", "model: {name: wrn, options: {widht: 2}}\n", "did you mean 'width'")])
def test_a_bad_config_is_refused_before_torch_or_ray_load(tmp_path, command, content, message):
    """The refusal is instant: neither torch (2 s to import) nor Ray is loaded to check a config."""
    (tmp_path / "bad.yaml").write_text(content)
    probe = ("import sys\nfrom raymeta import cli\nsys.argv = ['raymeta', %r, 'bad.yaml']\n"
             "try:\n    cli.main()\nexcept SystemExit as e:\n    code = e.code\n"
             "print(code, [m for m in ('torch', 'ray', 'polars') if m in sys.modules])" % command)
    proc = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.stdout.split()[0] == "2" and message in proc.stderr, proc.stderr
    assert proc.stdout.strip().endswith("[]"), proc.stdout
