"""Sweep files: read, validate, and expand into one validated ExperimentConfig per cell.

Everything here runs before Ray starts, so a bad file costs the user a second, not an hour.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from raymeta.config import (ExperimentConfig, SweepSpec, get_dotted, parse_experiment,
                            parse_sweep, set_dotted)
from raymeta.errors import ConfigError

PATH_KEYS = ("dataset.root", "noise.file", "noise.probs_file", "model.options.weights_path")
"""config values that are file paths: made absolute, because trials run in other folders"""


@dataclass(frozen=True)
class Cell:
    trial_id: str
    config: ExperimentConfig
    overrides: dict[str, Any]


def read_yaml(path: str | Path) -> Any:
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"no such file: {file}")
    try:
        return yaml.safe_load(file.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError(f"{file}: YAML syntax error{where}: {problem}") from None


def load_sweep(path: str | Path) -> SweepSpec:
    return parse_sweep(read_yaml(path), where=str(path))


def absolutize(data: dict, base_dir: Path) -> dict:
    data = copy.deepcopy(data)
    for key in PATH_KEYS:
        try:
            value = get_dotted(data, key)
        except KeyError:
            continue
        if isinstance(value, str) and "://" not in value:
            set_dotted(data, key, str((base_dir / Path(value).expanduser()).resolve()))
    return data


def _matches(overrides: dict[str, Any], rule: dict[str, Any], data: dict) -> bool:
    for key, want in rule.items():
        try:
            have = get_dotted(data, key)
        except KeyError:
            have = overrides.get(key)
        if have != want:
            return False
    return True


def expand(spec: SweepSpec, base_dir: str | Path = ".") -> list[Cell]:
    """All cells of the grid minus the excluded ones; every cell validated, all errors at once."""
    for key, values in spec.grid.items():
        if not values:
            raise ConfigError(f"sweep '{spec.name}': grid key '{key}' has no values; give at "
                              f"least one, or remove the key")
        texts = [yaml.safe_dump(v, sort_keys=True) for v in values]
        repeated = [v for i, v in enumerate(values) if texts[i] in texts[:i]]
        if repeated:  # seed: [0, 0] would count one run as two seeds
            raise ConfigError(f"sweep '{spec.name}': grid key '{key}' repeats the value(s) "
                              f"{', '.join(map(repr, repeated))}; each value must appear once "
                              f"(a repeated seed is the same run, not another seed)")
    keys = list(spec.grid)
    cells, errors, seen = [], [], set()
    used_rules = set()
    runs: dict[str, dict] = {}  # the digest of the run a cell stands for -> its first cell
    unread: dict[str, tuple[str, dict]] = {}  # a setting some cell never reads -> why, a cell
    ignored_by: set[frozenset[str]] = set()  # the sets of settings that cells never read
    for combo in itertools.product(*(spec.grid[k] for k in keys)):
        overrides = dict(zip(keys, combo))
        data = copy.deepcopy(spec.base)
        for key, value in overrides.items():
            set_dotted(data, key, value)
        hit = [i for i, rule in enumerate(spec.exclude) if _matches(overrides, rule, data)]
        if hit:
            used_rules.update(hit)
            continue
        data = absolutize(data, Path(base_dir))
        try:
            cfg = parse_experiment(data, where=CELL, unread_ok=True)
        except ConfigError as err:  # the same problem in many cells is reported once
            errors.append((str(err), f"cell {overrides}"))
            continue
        written = cfg.model_dump_json()
        if written in seen:  # two grid cells that are the same experiment run once
            continue
        seen.add(written)
        # A base setting that only some cells read is fine; one that makes two cells the same
        # run, or that no cell reads, would promise an effect there is none of
        cell_unread = cfg.unread()
        ignored_by.add(frozenset(cfg.ignored()))
        for key, why in cell_unread.items():
            unread.setdefault(key, (why, overrides))
        same = runs.setdefault(cfg.digest(), overrides)
        if same is not overrides:
            errors.append((f"cells {same} and {overrides} are the same run, since "
                           f"{'; '.join(f'{k}: {w}' for k, w in cell_unread.items())}; set "
                           f"{'it' if len(cell_unread) == 1 else 'them'} only in the cells that "
                           f"read {'it' if len(cell_unread) == 1 else 'them'}", ""))
            continue
        if spec.resources.seeds_per_trial > 1 and (problem := _packing_problem(cfg)):
            errors.append((problem, ""))  # the same for every seed: listed once
            continue
        cells.append(Cell(cfg.trial_id(), cfg, overrides))
    read = {key for key in unread if any(key not in ignored for ignored in ignored_by)}
    for key in sorted(set(unread) - read):
        why, cell = unread[key]
        errors.append((f"{key} is set, but no cell of the sweep reads it: {why} (e.g. cell "
                       f"{cell}); remove it", ""))
    unused = [spec.exclude[i] for i in range(len(spec.exclude)) if i not in used_rules]
    if unused:
        errors.append((f"exclude rule(s) that match no cell of the grid: {unused}; check the "
                       f"keys and values (they must equal grid values exactly)", ""))
    if errors:
        cells_of: dict[str, list[str]] = {}
        for text, cell in errors:
            cells_of.setdefault(text, []).append(cell)
        unique = [_name_cells(text, found) for text, found in cells_of.items()]
        more = f"\n(and {len(unique) - 5} more)" if len(unique) > 5 else ""
        raise ConfigError(f"sweep '{spec.name}' has invalid cells:\n" + "\n".join(unique[:5]) + more)
    if not cells:
        raise ConfigError(f"sweep '{spec.name}' has no cells to run (every cell is excluded)")
    return cells


def _packing_problem(cfg: ExperimentConfig) -> str | None:
    from raymeta.methods.packed import packing_problem  # imports torch: only when packing

    return packing_problem(cfg)


CELL = "\0cell"
"""stands for the cell's name in its config errors, so that one problem is listed once"""


def _name_cells(text: str, cells: list[str]) -> str:
    if CELL not in text:
        return text
    more = f" and {len(cells) - 1} more cell(s)" if len(cells) > 1 else ""
    return text.replace(CELL, f"{cells[0]}{more}")


def pack_cells(cells: list[Cell], seeds_per_trial: int) -> list[list[Cell]]:
    """Cells that differ only in their seed, in groups of at most `seeds_per_trial` (in grid
    order): each group trains as one packed trial. One seed a trial keeps the grid's order
    exactly: a sweep file orders its cells to run what matters first."""
    if seeds_per_trial == 1:
        return [[cell] for cell in cells]
    return [group[i:i + seeds_per_trial] for group in seed_groups(cells)
            for i in range(0, len(group), seeds_per_trial)]


def seed_groups(cells: list[Cell]) -> list[list[Cell]]:
    """The cells grouped by setting (they differ only in their seed), groups and seeds in
    grid order."""
    groups: dict[str, list[Cell]] = {}
    for cell in cells:
        groups.setdefault(cell.config.setting_digest(), []).append(cell)
    return list(groups.values())
