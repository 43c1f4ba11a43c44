"""`raymeta run` on a machine whose cores are all busy with other work, against the same
config as a one-trial sweep (Ray gives a trial cpus_per_trial threads), side by side.

    python tools/bench_loaded.py            # MW-Net, MLP 256x256 on digits, 3 epochs

Starts one busy process per core (pure Python loops, ended when the benchmark ends), then
times, in turn: `raymeta run` with its default threads, `raymeta run --threads 1`, and
`raymeta sweep` of the same config. Prints ms per training step
from each results row and the ratios to the sweep trial.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

EXPERIMENT = textwrap.dedent("""
    dataset: {name: digits}
    model: {name: mlp, options: {hidden: [256, 256]}}
    method: {name: mwnet}
    meta_set: {per_class: 10}
    train: {epochs: 3, batch_size: 64}
    """)


def raymeta(*args: str, cwd: Path) -> None:
    subprocess.run([sys.executable, "-m", "raymeta.cli", *args], cwd=cwd, check=True,
                   capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})


def ms_per_step(store: Path, sweep: str) -> float:
    from raymeta.results import query

    return float(query.load(str(store), "trials", sweep)["ms_per_step"].item())


def main() -> None:
    cores = os.cpu_count() or 1
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(cores)]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            (folder / "exp.yaml").write_text(EXPERIMENT)
            sweep = {"name": "loaded", "store": "out", "grid": {"seed": [0]},
                     "resources": {"cpus_per_trial": 1}}
            import yaml

            sweep["base"] = yaml.safe_load(EXPERIMENT)
            (folder / "sweep.yaml").write_text(yaml.safe_dump(sweep))
            raymeta("run", "exp.yaml", "--store", "out", "--sweep", "default", "--out", "a", cwd=folder)
            raymeta("run", "exp.yaml", "--store", "out", "--sweep", "one", "--out", "b",
                    "--threads", "1", cwd=folder)
            raymeta("sweep", "sweep.yaml", cwd=folder)
            trial = ms_per_step(folder / "out", "loaded")
            rows = [(f"raymeta run ({cores} threads, passive waits: the default)",
                     ms_per_step(folder / "out", "default")),
                    ("raymeta run --threads 1", ms_per_step(folder / "out", "one")),
                    ("the same config as a sweep trial (cpus_per_trial 1)", trial)]
    finally:
        for proc in busy:
            proc.kill()
    print(f"{cores} cores, each kept busy by another process; MW-Net, MLP 256x256, digits")
    print("| run | ms/step | x sweep trial |\n|---|---|---|")
    for label, ms in rows:
        print(f"| {label} | {ms:.1f} | {ms / trial:.2f} |")


if __name__ == "__main__":
    main()
