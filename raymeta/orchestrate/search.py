"""A sweep file's `search:`: inside each grid cell, Ray Tune's search algorithm (Optuna, or
random) proposes values for the searched keys; each sample trains the cell's seeds and is
scored on the clean meta set; the best sample's configuration is then trained on the
confirmation seeds, whose rows are the sweep's results.

Tune sees the searched keys as its own parameter axes (one Tune domain per dotted key, and
the sample's `cell`; the cells' configs passed with `tune.with_parameters`), so
`ResultGrid.get_dataframe()` and Tune's analysis show them. All cells search side by side in
one Tune experiment, `<store>/tune/<sweep>.search`, each with its own algorithm and early
stopping (raymeta.orchestrate.tune_search); the samples' rows go to the sweep `<name>.search`
(raymeta.results.search), the confirmation runs are ordinary cells of the sweep
(raymeta.orchestrate.sweep).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import sys
import warnings
from dataclasses import dataclass
from typing import Any

from raymeta import plugins
from raymeta.config import (ExperimentConfig, SearchConfig, SweepSpec, check_distribution,
                            parse_experiment, set_dotted)
from raymeta.errors import ConfigError
from raymeta.orchestrate.grid import Cell, seed_groups
from raymeta.results.search import SAMPLES, samples_sweep, trial_score
from raymeta.results.store import (FINISHED, display_store, read_json, read_run, resolve_store,
                                   store_join, write_json, write_trial)

SCORE = "search_score"
"""what each sample reports to Tune: the search metric, at the last epoch or the best so far"""
DONE_FILE = "raymeta-search-done.json"
"""beside the search's Tune experiment once every sample ran: the settings and cells it ran with"""


@dataclass(frozen=True)
class SearchCell:
    """A cell of the grid without its seed: the seeds are searched together."""
    cell_id: str
    """the first seed's trial id: names the cell in its samples' Tune configs and rows"""
    label: dict[str, Any]
    """the grid values that define the cell (the seed left out)"""
    seeds: tuple[Cell, ...]


def plan(spec: SweepSpec, cells: list[Cell]) -> list[SearchCell]:
    """The cells to search, in grid order, after checking that every searched key, at the ends
    of its range and at each choice, gives a valid run that reads it (all problems at once)."""
    search = spec.search
    assert search is not None
    if spec.name.endswith(SAMPLES):
        raise ConfigError(f"sweep name {spec.name!r} ends in {SAMPLES!r}, the suffix of search "
                          f"samples' partition; choose another name")
    if search.algorithm == "optuna" and importlib.util.find_spec("optuna") is None:
        raise ConfigError("search.algorithm optuna needs Optuna: pip install 'raymeta[search]' "
                          "(or optuna); or use algorithm: random")
    groups = seed_groups(cells)
    problems: dict[str, list[str]] = {}
    for key, spec_ in search.space.items():
        kind, values = check_distribution(key, spec_)  # both ends of a range, or each choice
        if (search.algorithm == "optuna" and kind == "choice"
                and any(isinstance(v, (dict, list)) for v in values)):
            problems.setdefault(f"search.space.{key}: Optuna's choices must be numbers, strings, "
                                f"booleans or null, not {values!r}; search the keys inside "
                                f"instead (e.g. method.meta_lr), or use algorithm: random", [])
            continue
        for seeds in groups:
            first = seeds[0]
            for value in values:
                data = first.config.model_dump(mode="json")
                set_dotted(data, key, value)
                label = _label(first)
                try:
                    cfg = parse_experiment(data, where=f"cell {label} with {key}={value!r}",
                                           unread_ok=True)
                except ConfigError as err:
                    problems.setdefault(str(err), []).append(str(label))
                    continue
                if (why := cfg.unread().get(key)) is not None:
                    problems.setdefault(f"search.space.{key}: {why}; search it only in cells whose "
                                        f"method reads it (exclude the others)",
                                        []).append(str(label))
    if spec.early_stopping.scheduler != "none" and any(len(s) > 1 for s in groups):
        problems.setdefault("early_stopping does not combine with searching several seeds "
                            "together (it would stop a sample on the mean of its seeds); search "
                            "on one seed and list the others in search.confirm_seeds", [])
    if problems:
        lines = [text + (f" (cells {', '.join(where[:3])}{' ...' if len(where) > 3 else ''})"
                         if any(w != "{}" for w in where) and "cell " not in text else "")
                 for text, where in problems.items()]
        raise ConfigError(f"sweep '{spec.name}': the search cannot run:\n" + "\n".join(lines[:8]))
    return [SearchCell(seeds[0].trial_id, _label(seeds[0]), tuple(seeds)) for seeds in groups]


def _label(cell: Cell) -> dict[str, Any]:
    return {k: v for k, v in cell.overrides.items() if k != "seed"}


def confirmation_cells(search: SearchConfig, scell: SearchCell,
                       params: dict[str, Any]) -> list[Cell]:
    """The chosen values on the confirmation seeds (default: the searched ones)."""
    seeds = search.confirm_seeds or [c.config.seed for c in scell.seeds]
    base = scell.seeds[0].config.model_dump(mode="json")
    runs = _apply([{**base, "seed": seed} for seed in seeds], params)
    return [Cell(trial_id, ExperimentConfig.model_validate(experiment),
                 {**scell.label, **params, "seed": experiment["seed"]})
            for trial_id, experiment in runs.items()]


class _Score:
    """The running search score of one sample: its metric now, or the best so far."""

    def __init__(self, search: dict):
        self.metric, self.at = search["metric"], search["at"]
        self.larger = search["metric"].endswith("_acc")
        self.best: float | None = None

    def __call__(self, metrics: dict) -> dict:
        value = float(metrics[self.metric])
        if self.at == "best" and self.best is not None:
            value = max(value, self.best) if self.larger else min(value, self.best)
        self.best = value
        return {**metrics, SCORE: value}


def _search_trial(params: dict, setup: dict) -> None:
    """One sample: its cell's seeds with the proposed values, trained (packed when the sweep
    packs seeds and the method packs) or one after another, each seed's rows in the samples'
    partition. Tune is told the score each epoch; when the seeds train one after another, or
    their rows were in the store already, once at the end."""
    import ray.tune

    from raymeta.orchestrate.sweep import _train_cell

    plugins.restore(setup["plugins"])
    cell_setup = setup["cells"][params["cell"]]
    cells = [{"trial_id": trial_id, "experiment": experiment}
             for trial_id, experiment in _apply(cell_setup["seeds"], params).items()]
    config = {key: setup[key] for key in ("store", "sweep", "resources", "rerun")}
    config["row_extra"] = cell_setup["row_extra"]
    # Ray Train's workers report to Tune without the score: it is told once at the end
    pack = cell_setup["pack"]
    live = (len(cells) == 1 or pack) and setup["resources"]["workers_per_trial"] == 1
    if len(cells) > 1 and pack:
        cell = {**cells[0], "trial_id": f"{cells[0]['trial_id']}-pack{len(cells)}", "pack": cells}
        trained = _train_cell(config, cell, on_report=_Score(setup["search"]))
    elif live:
        trained = _train_cell(config, cells[0], on_report=_Score(setup["search"]))
    else:
        trained = False
        for cell in cells:
            trained |= _train_cell(config, cell, on_report=lambda metrics: None)
    if not (live and trained):  # Tune has no score of this sample yet
        ray.tune.report({SCORE: stored_score(setup["store"], setup["sweep"],
                                             [c["trial_id"] for c in cells], setup["search"]),
                         "epoch": cells[0]["experiment"]["train"]["epochs"] - 1})


def _apply(seeds: list[dict], params: dict) -> dict[str, dict]:
    """The runs of a sample: each seed's config with the proposed values, by trial id."""
    runs = {}
    for data in seeds:
        data = copy.deepcopy(data)
        for key, value in params.items():
            if key != "cell":
                set_dotted(data, key, value)
        cfg = ExperimentConfig.model_validate(data)
        runs[cfg.trial_id()] = cfg.model_dump(mode="json")
    return runs


def stored_score(store: str, sweep: str, trial_ids: list[str], search: dict) -> float:
    """A sample's score from its seeds' curves in the store (their mean)."""
    import polars as pl

    scores = [trial_score(pl.DataFrame(read_run(store, "curves", sweep, trial_id)),
                          search["metric"], search["at"]) for trial_id in trial_ids]
    return sum(scores) / len(scores)


def _settings(search: SearchConfig, scells: list[SearchCell]) -> dict:
    """What a finished search ran with: other settings, or other cells, search again."""
    return {**json.loads(search.model_dump_json(exclude={"confirm_seeds"})),
            "cells": [s.cell_id for s in scells]}


def _search(spec: SweepSpec, scells: list[SearchCell], *, store: str, resume: bool,
            rerun: bool) -> bool:
    """Run every cell's search in one Tune experiment (or restore it); True when it ended
    (False: interrupted)."""
    import ray.tune

    from raymeta.methods.packed import packing_problem
    from raymeta.orchestrate.sweep import _graceful_stop, _quiet_tune_results, max_concurrent
    from raymeta.orchestrate.tune_search import CellSearch, PerCellScheduler

    search = spec.search
    experiment = store_join(store, "tune", samples_sweep(spec.name))
    if not rerun and read_json(store_join(experiment, DONE_FILE)) == _settings(search, scells):
        print(f"searched already ({search.num_samples} samples in each of {len(scells)} cells)",
              flush=True)
        return True
    setup = {"store": store, "sweep": samples_sweep(spec.name), "rerun": rerun,
             "resources": spec.resources.model_dump(mode="json"), "plugins": plugins.resolved(),
             "search": {"metric": search.metric, "at": search.at},
             "cells": {s.cell_id: _cell_setup(spec, s, packing_problem) for s in scells}}
    if spec.resources.workers_per_trial > 1:
        from raymeta.orchestrate.sweep import DRIVER_CPUS

        resources = {"cpu": DRIVER_CPUS}
    else:
        resources = {"cpu": spec.resources.cpus_per_trial, "gpu": spec.resources.gpus_per_trial}
    trainable = ray.tune.with_resources(ray.tune.with_parameters(_search_trial, setup=setup),
                                        resources)
    runs = _SampleCells({cell: part["seeds"] for cell, part in setup["cells"].items()})
    callbacks = [_progress(scells, search)]
    if spec.early_stopping.scheduler != "none":  # rows of the samples it stops
        from raymeta.orchestrate.sweep import _stopped_rows_callback

        callbacks.append(_stopped_rows_callback(
            store, samples_sweep(spec.name), spec.resources, cell_of=runs.only,
            extra=lambda trial: setup["cells"][trial.config["cell"]]["row_extra"]))
    if spec.tracking.enabled:
        from raymeta.tracking import tune_callback

        callbacks.append(tune_callback(spec.tracking, samples_sweep(spec.name), store, cells=runs))
    # a resumed sample continues from its checkpoint while Tune counts its reports from 1
    # again: Optuna ignores the repeated steps (rightly), and says so once per epoch
    warnings.filterwarnings("ignore", message="The reported value is ignored because")
    if resume and ray.tune.Tuner.can_restore(experiment):
        with _quiet_tune_results():
            tuner = ray.tune.Tuner.restore(experiment, trainable=trainable, resume_unfinished=True,
                                           resume_errored=True)
    else:
        tuner = ray.tune.Tuner(
            trainable,
            tune_config=ray.tune.TuneConfig(
                # the algorithm and the scheduler each hold their own metric (the search
                # score; early_stopping.metric): Tune refuses one given here as well
                search_alg=CellSearch([s.cell_id for s in scells], search),
                num_samples=search.num_samples * len(scells),
                scheduler=PerCellScheduler(spec, scells) if spec.early_stopping.scheduler != "none" else None,
                max_concurrent_trials=max_concurrent(spec.resources), reuse_actors=True,
                trial_name_creator=_sample_name, trial_dirname_creator=_sample_name),
            run_config=ray.tune.RunConfig(
                name=samples_sweep(spec.name), storage_path=store_join(store, "tune"), verbose=0,
                callbacks=callbacks, failure_config=ray.tune.FailureConfig(max_failures=0)))
    with _graceful_stop() as stopped:
        grid = tuner.fit()
    if stopped["signal"] is not None:
        return False
    if failed := [r for r in grid if r.error is not None]:
        print(f"{len(failed)} of {len(grid)} samples failed (see `raymeta results failed --sweep "
              f"{samples_sweep(spec.name)}`)", file=sys.stderr, flush=True)
    if len(grid) >= search.num_samples * len(scells):
        write_json(store_join(experiment, DONE_FILE), _settings(search, scells))
    return True


def _cell_setup(spec: SweepSpec, scell: SearchCell, packing_problem) -> dict:
    """What a sample of this cell trains: its seeds' configs, packed or not, and the columns
    its rows add."""
    search = spec.search
    return {"seeds": [c.config.model_dump(mode="json") for c in scell.seeds],
            "pack": (len(scell.seeds) > 1 and spec.resources.seeds_per_trial >= len(scell.seeds)
                     and packing_problem(scell.seeds[0].config) is None),
            "row_extra": {"search_cell": scell.cell_id, "search_label": json.dumps(scell.label),
                          "search_keys": json.dumps(list(search.space)),
                          "search_metric": search.metric, "search_at": search.at}}


def _sample_name(trial) -> str:
    return f"sample-{trial.trial_id}"  # Tune's default name lists every value: long paths


class _SampleCells:
    """The runs of a search's Tune trial, for trackers and stopped rows: trial id ->
    experiment config (its cell's seeds with the trial's proposed values)."""

    def __init__(self, seeds: dict[str, list[dict]]):
        self.seeds = seeds
        self.known: dict[str, dict[str, dict]] = {}  # Tune trial id -> its runs

    def __call__(self, trial) -> dict[str, dict]:
        if trial.trial_id not in self.known:  # asked on every result: validated once
            self.known[trial.trial_id] = _apply(self.seeds[trial.config["cell"]], trial.config)
        return self.known[trial.trial_id]

    def only(self, trial) -> dict:
        """The trial's one run as a cell, {trial_id, experiment} (one seed per sample)."""
        (trial_id, experiment), = self(trial).items()
        return {"trial_id": trial_id, "experiment": experiment}


def _progress(scells: list[SearchCell], search: SearchConfig):
    import ray.tune

    labels = {s.cell_id: s.label for s in scells}
    number = {s.cell_id: f"{i + 1}/{len(scells)}" for i, s in enumerate(scells)}

    class Progress(ray.tune.Callback):
        def __init__(self):
            self.ended: dict[str, int] = {}

        def _line(self, trials, trial, text: str) -> None:
            from ray.tune.experiment import Trial

            cell = trial.config["cell"]
            # counted from Tune's list: a resumed search counts the samples it restored
            done = 1 + sum(t is not trial and t.config.get("cell") == cell
                           and t.status in (Trial.TERMINATED, Trial.ERROR) for t in trials)
            self.ended[cell] = max(self.ended.get(cell, 0) + 1, done)
            print(f"search {number[cell]} {labels[cell]}: sample {self.ended[cell]}/"
                  f"{search.num_samples} {text}", flush=True)

        def on_trial_complete(self, iteration, trials, trial, **info):
            score = (trial.last_result or {}).get(SCORE)
            values = ", ".join(f"{k}={_short(v)}" for k, v in trial.config.items() if k != "cell")
            shown = "?" if score is None else f"{score:.4f}"
            self._line(trials, trial, f"{values}: {search.metric} {shown}")

        def on_trial_error(self, iteration, trials, trial, **info):
            self._line(trials, trial, "FAILED (see `raymeta results failed`)")

    return Progress()


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def copy_runs(store: str, sweep: str, cells: list[Cell]) -> int:
    """Copy each confirmation cell whose run is a finished search sample (a searched seed)
    into the sweep's own rows, so it is not trained twice; how many were copied."""
    from raymeta.results.store import completed_digests

    have = completed_digests(store, sweep, [c.trial_id for c in cells])
    samples = completed_digests(store, samples_sweep(sweep), [c.trial_id for c in cells])
    copied = 0
    for cell in cells:
        digest = cell.config.digest()
        if have.get(cell.trial_id) == digest or samples.get(cell.trial_id) != digest:
            continue
        rows = {table: read_run(store, table, samples_sweep(sweep), cell.trial_id)
                for table in ("trials", "curves")}
        if not rows["trials"] or rows["trials"][0].get("status") not in FINISHED:
            continue
        curves = [{k: v for k, v in c.items() if k != "trial_id"} for c in rows["curves"]]
        write_trial(store, sweep, cell.trial_id, {**rows["trials"][0], "sweep_name": sweep}, curves)
        copied += 1
    return copied


@dataclass
class SearchRun:
    interrupted: bool
    confirm: list[Cell]
    """the chosen configurations on their confirmation seeds (empty where a cell has no
    finished sample)"""
    unsearched: list[str]
    """cells of which no sample finished"""


def run_search(spec: SweepSpec, scells: list[SearchCell], *, address: str | None, resume: bool,
               rerun: bool) -> SearchRun:
    """Search every cell (in grid order), then choose per cell; the confirmation cells are
    returned for the sweep driver to train, with the searched seeds' runs copied."""
    from raymeta.orchestrate.runtime import start_ray
    from raymeta.results.search import chosen, sample_scores, searched_keys

    store = resolve_store(spec.store)
    start_ray(address)
    if not _search(spec, scells, store=store, resume=resume, rerun=rerun):
        return SearchRun(True, [], [])
    try:
        samples = sample_scores(store, spec.name)
        best = {row["search_cell"]: row for row in chosen(samples).iter_rows(named=True)}
        keys = searched_keys(samples)
    except ConfigError:  # no sample of any cell finished
        best, keys = {}, []
    confirm, unsearched = [], []
    for scell in scells:
        row = best.get(scell.cell_id)
        if row is None:
            unsearched.append(scell.cell_id)
            continue
        params = {key: json.loads(row[key]) for key in keys}
        print(f"chosen for {scell.label}: {params} ({spec.search.metric} {row['score']:.4f}, "
              f"{row['at']} epoch, mean of {row['seeds']} seed(s))", flush=True)
        confirm += confirmation_cells(spec.search, scell, params)
    for cell_id in unsearched:
        print(f"no sample of cell {cell_id} finished: it has no confirmation runs (see `raymeta "
              f"results failed --sweep {samples_sweep(spec.name)}`)", file=sys.stderr, flush=True)
    if copied := copy_runs(store, spec.name, confirm):
        print(f"{copied} confirmation run(s) are searched runs: copied from "
              f"{display_store(store)} sweep '{samples_sweep(spec.name)}'", flush=True)
    return SearchRun(False, confirm, unsearched)
