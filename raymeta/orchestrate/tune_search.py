"""The Ray Tune side of a search (raymeta.orchestrate.search): one search algorithm and one
early-stopping scheduler per grid cell, behind one Tune experiment. Imports Tune: loaded only
when a search runs."""

from __future__ import annotations

import pickle

import numpy as np
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import Searcher

from raymeta.config import SearchConfig, SweepSpec, check_distribution
from raymeta.orchestrate.search import SCORE


def _domain(kind: str, args: list):
    if kind == "choice":
        return tune.choice(args)
    if kind == "randint":
        return tune.randint(args[0], args[1] + 1)  # Tune's upper end is excluded
    return {"uniform": tune.uniform, "loguniform": tune.loguniform}[kind](*args)


class CellSearch(Searcher):
    """One search algorithm per grid cell behind one Tune experiment: each free slot gets the
    next sample of the first cell (in grid order) that has samples left, so the cells search
    side by side and no slot waits for a cell's last samples. Each cell's algorithm sees only
    its own samples' results (Optuna's TPE, or random sampling), seeded alike."""

    def __init__(self, cell_ids: list[str], search: SearchConfig):
        super().__init__(metric=SCORE, mode=search.mode)
        space = {key: _domain(*check_distribution(key, dist)) for key, dist in search.space.items()}
        self.left = dict.fromkeys(cell_ids, search.num_samples)
        self.owner: dict[str, str] = {}  # Tune trial id -> cell
        self.inner = {cell: _algorithm(search, space) for cell in cell_ids}

    def suggest(self, trial_id: str) -> dict | None:
        for cell, left in self.left.items():
            if left and (params := self.inner[cell].suggest(trial_id)) is not None:
                self.left[cell] -= 1
                self.owner[trial_id] = cell
                return {"cell": cell, **params}
        return Searcher.FINISHED if not any(self.left.values()) else None

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self.owner:
            self.inner[self.owner[trial_id]].on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        if trial_id in self.owner:
            self.inner[self.owner[trial_id]].on_trial_complete(trial_id, result, error)

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as out:
            pickle.dump(self.__dict__, out)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as source:
            self.__dict__.update(pickle.load(source))


def _algorithm(search: SearchConfig, space: dict):
    """A cell's own search algorithm over the Tune domains of `space`."""
    if search.algorithm == "random":
        return _Random(space, search.seed)
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own line per sample
    algorithm = OptunaSearch(metric=SCORE, mode=search.mode, seed=search.seed)
    algorithm.set_search_properties(SCORE, search.mode, config=space)
    return algorithm


class _Random:
    """Independent draws from each domain (numpy's generator, seeded)."""

    def __init__(self, space: dict, seed: int):
        self.space, self.rng = space, np.random.default_rng(seed)

    def suggest(self, trial_id: str) -> dict:
        return {key: _plain(domain.sample(random_state=self.rng)) for key, domain in self.space.items()}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        pass

    def on_trial_complete(self, trial_id: str, result=None, error: bool = False) -> None:
        pass


def _plain(value):
    """A numpy scalar as the Python number a config takes."""
    return value.item() if hasattr(value, "item") else value


class PerCellScheduler(FIFOScheduler):
    """Early stopping within each cell: one ASHA per cell, so a sample is compared with its own
    cell's samples only (cells differ more than their samples do)."""

    def __init__(self, spec: SweepSpec, scells: list):
        super().__init__()
        stopping = spec.early_stopping
        self.inner = {s.cell_id: ASHAScheduler(
            time_attr="epoch", metric=stopping.metric, mode=stopping.mode,
            max_t=s.seeds[0].config.train.epochs, grace_period=stopping.grace_period,
            reduction_factor=stopping.reduction_factor) for s in scells}

    def _of(self, trial):
        return self.inner[trial.config["cell"]]

    def on_trial_add(self, tune_controller, trial) -> None:
        self._of(trial).on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        return self._of(trial).on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        self._of(trial).on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller, trial) -> None:
        self._of(trial).on_trial_remove(tune_controller, trial)

    def debug_string(self) -> str:
        return f"ASHA in each of {len(self.inner)} cells"
