"""Run a sweep file's cells without Ray: several `raymeta run` processes at once, to a deadline.

For the GPU machine that is lent for minutes and has no Ray (tools/device_run.sh). Each cell
runs as `raymeta run` in a process of its own and writes its rows to STATE/store under the
sweep's name, with the trial id `raymeta sweep` gives it: copied into a store, a sweep's
`--resume` skips them. Each cell keeps its checkpoint in STATE/checkpoints/<trial id> and
continues from it when there is one, so a cell longer than one loan goes on in the next (carry
STATE there again). At the deadline every run still going is interrupted (its last finished
epoch is saved) and no more start. The report gives each cell's epochs, accuracy and speed.

    python tools/device_cells.py sweeps/cifar10-jpeg-cnn8.yaml --only seed=0 \\
        --only noise.rate=0.4 --parallel 3 --deadline 300 --state device-state
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the GPU machine has the checkout, not an installed raymeta

from raymeta.errors import ConfigError  # noqa: E402
from raymeta.orchestrate.grid import Cell, expand, load_sweep  # noqa: E402
from raymeta.results.store import completed_digests, read_run  # noqa: E402

EPOCH = re.compile(r"epoch\s+(\d+)/(\d+)\s+train_loss \S+\s+test_acc (\S+)\s+meta_acc \S+\s+(\S+) ms/step")
GRACE = 60  # seconds an interrupted run has to exit before it is killed


def chosen_cells(sweep: Path, only: list[str]) -> tuple[str, list[Cell]]:
    """The sweep's name and its cells that match every KEY=VALUE of `only` (dotted keys; a
    YAML list for VALUE keeps the cells with any of its values)."""
    spec = load_sweep(sweep)
    cells = expand(spec, base_dir=Path.cwd())
    for condition in only:
        key, sep, text = condition.partition("=")
        if not sep:
            raise ConfigError(f"--only {condition!r}: write KEY=VALUE, e.g. --only seed=0")
        flat = cells[0].config.flat() if cells else {}
        if key not in flat:
            raise ConfigError(f"--only {condition!r}: no config key {key!r} (e.g. seed, method.name, "
                              f"noise.type, noise.rate)")
        value = yaml.safe_load(text)
        values = value if isinstance(value, list) else [value]  # --only 'seed=[0, 1]'
        cells = [c for c in cells if c.config.flat()[key] in values]
    return spec.name, cells


def standalone(cell: Cell) -> dict:
    """The cell's config as `raymeta run` takes it: without the sweep-wide settings this cell
    never reads, which `raymeta run` refuses (they change nothing: digest and trial id stay)."""
    data = cell.config.model_dump(mode="json")
    for key in cell.config.unread():
        section, field = key.split(".")
        del data[section][field]
    return data


def command(config: Path, state: Path, sweep: str, trial_id: str, threads: int) -> list[str]:
    return [sys.executable, "-m", "raymeta.cli", "run", str(config), "--store", str(state / "store"),
            "--sweep", sweep, "--out", str(state / "checkpoints" / trial_id), "--resume",
            "--threads", str(threads)]


def row_status(state: Path, sweep: str, trial_id: str) -> str:
    """A finished run's stored status: completed, or collapsed with the reason."""
    (row,) = read_run(str(state / "store"), "trials", sweep, trial_id)
    return row["status"] + (f" ({row['error']})" if row["status"] != "completed" else "")


def progress(log: Path) -> dict:
    """Epochs done, last and peak test accuracy, ms a step, from a `raymeta run` log."""
    epochs = [m.groups() for m in EPOCH.finditer(log.read_text())] if log.exists() else []
    if not epochs:
        return {"epochs": 0}
    done, total = int(epochs[-1][0]), int(epochs[-1][1])
    accuracies = [float(e[2]) for e in epochs]
    return {"epochs": done, "total": total, "last_acc": accuracies[-1], "peak_acc": max(accuracies),
            "ms_per_step": float(epochs[-1][3])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep", type=Path)
    parser.add_argument("--only", action="append", default=[], metavar="KEY=VALUE",
                        help="keep the cells with this config value (repeatable)")
    parser.add_argument("--parallel", type=int, default=1, help="cells at once")
    parser.add_argument("--deadline", type=float, default=None, help="seconds from now")
    parser.add_argument("--state", type=Path, default=Path("device-state"),
                        help="store, checkpoints, configs and logs [default: device-state]")
    args = parser.parse_args()
    started = time.monotonic()
    try:
        sweep, cells = chosen_cells(args.sweep, args.only)
    except ConfigError as err:
        sys.exit(f"error: {err}")
    state = args.state.resolve()
    for folder in ("store", "checkpoints", "configs", "logs"):
        (state / folder).mkdir(parents=True, exist_ok=True)
    finished = completed_digests(str(state / "store"), sweep, [c.trial_id for c in cells])
    todo = [c for c in cells if finished[c.trial_id] != c.config.digest()]
    print(f"{sweep}: {len(cells)} cell(s) chosen, {len(cells) - len(todo)} finished before, "
          f"{len(todo)} to run, {args.parallel} at a time", flush=True)
    threads = max(1, (os.cpu_count() or 1) // args.parallel)
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    running: dict[str, subprocess.Popen] = {}
    outcome: dict[str, str] = {c.trial_id: "finished before" for c in cells if c not in todo}
    queue = list(todo)
    stopped, signalled = False, set()
    while queue or running:
        late = args.deadline is not None and time.monotonic() - started > args.deadline
        if late and not stopped:
            stopped = True
            for proc in running.values():  # `raymeta run` keeps its last finished epoch
                proc.send_signal(signal.SIGINT)
            signalled = set(running)
            outcome.update({c.trial_id: "not started (deadline)" for c in queue})
            queue = []
        if stopped and time.monotonic() - started > args.deadline + GRACE:
            for proc in running.values():
                proc.kill()
        while queue and len(running) < args.parallel:
            cell = queue.pop(0)
            config = state / "configs" / f"{cell.trial_id}.yaml"
            config.write_text(yaml.safe_dump(standalone(cell), sort_keys=False))
            with open(state / "logs" / f"{cell.trial_id}.log", "a") as log:
                running[cell.trial_id] = subprocess.Popen(
                    command(config, state, sweep, cell.trial_id, threads), stdout=log,
                    stderr=subprocess.STDOUT, env=env, cwd=Path.cwd())
        for trial_id, proc in list(running.items()):
            if proc.poll() is None:
                continue
            del running[trial_id]
            outcome[trial_id] = (row_status(state, sweep, trial_id) if proc.returncode == 0 else
                                 "interrupted (deadline)" if trial_id in signalled else
                                 f"failed (exit {proc.returncode}; logs/{trial_id}.log)")
            print(f"{trial_id}: {outcome[trial_id]}", flush=True)
        time.sleep(0.5)
    print(report(cells, outcome, state, sweep, time.monotonic() - started))
    sys.exit(1 if any(o.startswith("failed") for o in outcome.values()) else 0)


def report(cells: list[Cell], outcome: dict[str, str], state: Path, sweep: str, seconds: float) -> str:
    lines = [f"## {sweep}: {len(cells)} cell(s) in {seconds:.0f} s (rows: {state / 'store'})\n",
             "| trial | outcome | epochs | last test acc | peak test acc | ms/step |",
             "|---|---|---|---|---|---|"]
    for cell in cells:
        p = progress(state / "logs" / f"{cell.trial_id}.log")
        epochs = f"{p['epochs']}/{p['total']}" if p["epochs"] else "0"
        numbers = (f"{100 * p['last_acc']:.2f} | {100 * p['peak_acc']:.2f} | {p['ms_per_step']:.1f}"
                   if p["epochs"] else "— | — | —")
        lines.append(f"| {cell.trial_id} | {outcome.get(cell.trial_id, '?')} | {epochs} | {numbers} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
