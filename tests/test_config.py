"""Configs and sweep files: bad input is an error that names the key, the value and the fix."""

import pytest

from raymeta.config import ExperimentConfig, flatten, parse_experiment, parse_sweep
from raymeta.errors import ConfigError
from raymeta.orchestrate.grid import expand, load_sweep, read_yaml

BAD_EXPERIMENTS = [
    ({"noise": {"typ": "uniform"}}, "unknown key 'noise.typ' (did you mean 'noise.type'?)"),
    ({"noise": {"type": "unifrom"}}, "noise.type: unknown noise type 'unifrom'; choose one of"),
    ({"noise": {"type": "unifrom"}}, "(did you mean 'uniform'?)"),
    ({"method": {"name": "mwnett"}}, "method.name: unknown method 'mwnett'; choose one of 'ce'"),
    ({"noise": {"type": "uniform", "rate": 1.0}}, "noise.rate: Input should be less than 1"),
    ({"noise": {"type": "uniform", "rate": -0.1}}, "noise.rate: Input should be greater than or equal to 0"),
    ({"noise": {"rate": 0.3}}, "noise.type none needs noise.rate 0.0, got 0.3"),
    ({"train": {"epochs": 0}}, "train.epochs: Input should be greater than or equal to 1"),
    ({"datset": {}}, "unknown key 'datset' (did you mean 'dataset'?)"),
    ({"method": {"name": "ce", "lr": 1}}, "unknown key 'method.lr'; allowed here: name"),
    ({"meta_set": {"per_class": 5, "size": 10}}, "set exactly one of meta_set.per_class and meta_set.size"),
    ({"model": {"name": "resnet"}}, "(did you mean 'resnet50'?)"),
    ({"dataset": {"name": "cifar"}}, "dataset.name: unknown dataset 'cifar'; choose one of"),
]


@pytest.mark.parametrize("data,message", BAD_EXPERIMENTS)
def test_bad_experiment_is_a_clear_error(data, message):
    with pytest.raises(ConfigError) as err:
        parse_experiment(data)
    assert message in str(err.value)


def test_all_problems_are_reported_at_once():
    with pytest.raises(ConfigError) as err:
        parse_experiment({"noise": {"typ": 1}, "train": {"epochs": -1}})
    assert "noise.typ" in str(err.value) and "train.epochs" in str(err.value)


def test_defaults_and_flat_keys():
    cfg = parse_experiment({"meta_set": {"size": 50}})
    assert cfg.meta_set.per_class is None and cfg.meta_set.size == 50
    flat = ExperimentConfig().flat()
    assert flat["noise.type"] == "none" and flat["method.name"] == "ce" and "model.options" in flat
    assert flatten({"a": {"b": 1, "c": {}}}) == {"a.b": 1, "a.c": {}}


def test_configs_are_frozen_and_hashable_by_content():
    a, b = parse_experiment({"seed": 1}), parse_experiment({"seed": 1})
    assert a.digest() == b.digest() != parse_experiment({"seed": 2}).digest()
    with pytest.raises(Exception):
        a.seed = 3


def test_digests_of_configs_that_run_as_before_do_not_change():
    """A store finds a finished trial by its digest: a new option that leaves a run as it was
    must leave its digest as it was, or a resumed sweep reruns it and a summary counts it twice.
    (famus.window changed the default FaMUS window, so only FaMUS runs with it moved.)"""
    before = {"993cd29bef": {}, "053c50681e": {"method": {"name": "mwnet"}},
              "37b6d8c705": {"method": {"name": "mwnet", "famus": True},
                             "famus": {"candidates": 2, "classifier_always_on": True}},
              "90a8008b19": {"method": {"name": "mwnet", "famus": True}, "famus": {"window": "all"}},
              "7a02d851ce": {"method": {"name": "mlc"}}}  # before warmup_epochs, meta_grad_clip
    assert {parse_experiment(c).digest(): c for c in before.values()} == before
    assert parse_experiment({"method": {"name": "mwnet", "famus": True}}).digest() != "90a8008b19"
    assert parse_experiment({"method": {"name": "mlc", "warmup_epochs": 2}}).digest() != "7a02d851ce"
    assert parse_experiment({"method": {"name": "mlc", "meta_grad_clip": 1.0}}).digest() != "7a02d851ce"


def test_settings_a_run_never_reads_leave_its_digest_and_a_stored_row_is_given_that_digest(tmp_path):
    """l2r with famus.candidates set and FaMUS off (a sweep cell beside FaMUS cells that read
    it) trains plain l2r: it is that run, with its digest. Rows written when the setting still
    changed the digest are given the run's digest when read, so a sweep does not train the run
    again and a summary counts it once."""
    from raymeta.orchestrate.trial import trial_row
    from raymeta.results import query
    from raymeta.results.store import write_trial

    plain = parse_experiment({"method": {"name": "l2r"}})
    beside_famus = parse_experiment({"method": {"name": "l2r"}, "famus": {"candidates": 2}},
                                    unread_ok=True)
    assert beside_famus.digest() == plain.digest() and plain.digest() != "f5b0f93b2f"
    for digest, cfg in (("f5b0f93b2f", beside_famus), (plain.digest(), plain)):  # then and now
        row = {**trial_row(cfg, "s", {}), "config_digest": digest, "status": "completed",
               "final_test_acc": 0.5, "trial_id": f"l2r_{digest}"}
        write_trial(str(tmp_path), "s", f"l2r_{digest}", row, [])
    rows = query.load(str(tmp_path), "trials", "s")
    assert rows["config_digest"].to_list() == [plain.digest()] * 2
    assert len(query.unique_runs(rows, quiet=True)) == 1


def sweep(**fields):
    return parse_sweep({"name": "t", "base": {"train": {"epochs": 1}}, **fields})


def test_grid_expands_dotted_keys_and_dict_values():
    spec = sweep(grid={"noise": [{"type": "none"}, {"type": "uniform", "rate": 0.4}],
                       "seed": [0, 1, 2], "model.options.hidden": [[16]]})
    cells = expand(spec)
    assert len(cells) == 6
    assert {c.config.noise.type for c in cells} == {"none", "uniform"}
    assert all(c.config.model.options == {"hidden": [16]} for c in cells)
    assert len({c.trial_id for c in cells}) == 6


def test_root_grid_key_sets_several_sections_per_entry():
    spec = sweep(grid={".": [{"method.name": "ce"}, {"method.name": "l2r", "optimizer.lr": 0.03}],
                       "seed": [0]})
    cells = {c.config.method.name: c.config for c in expand(spec)}
    assert cells["ce"].optimizer.lr == 0.1 and cells["l2r"].optimizer.lr == 0.03
    with pytest.raises(ConfigError, match="grid key '.' takes mappings of dotted keys"):
        expand(sweep(grid={".": ["l2r"]}))


def test_trial_ids_are_stable_and_identical_cells_run_once():
    spec = sweep(grid={"noise": [{"type": "none"}, {"type": "none", "rate": 0.0}], "seed": [0, 1]})
    cells = expand(spec)
    assert len(cells) == 2  # the two noise entries are the same experiment
    assert [c.trial_id for c in cells] == [c.trial_id for c in expand(spec)]
    assert cells[0].trial_id.startswith("ce_digits_clean_s0_")
    pseudo = expand(sweep(grid={"meta_set": [{"per_class": 5}, {"source": "pseudo"}],
                                "train.epochs": [8]}))
    assert [c.trial_id[:18] for c in pseudo] == ["ce_digits_clean_s0", "ce_digits-pseudo_c"]


def test_a_base_setting_that_only_some_cells_read_keeps_every_cell():
    """A sweep's base may hold settings that only some cells read (FaMUS's options beside the
    full method it is compared with): every cell runs, while a single run that sets them is
    refused."""
    famus = {"candidates": 2, "classifier_always_on": True, "exact_below_window": False}
    cells = expand(sweep(base={"famus": famus, "train": {"epochs": 2}},
                         grid={"method": [{"name": "mwnet", "famus": True}, {"name": "mwnet"}]}))
    assert [c.trial_id.split("_")[0] for c in cells] == ["mwnet-famus", "mwnet"]
    assert cells[1].config.unread()
    assert cells[1].config.digest() == parse_experiment(
        {"train": {"epochs": 2}, "method": {"name": "mwnet"}}).digest() != cells[0].config.digest()
    with pytest.raises(ConfigError, match="famus.candidates: read only when the method runs FaMUS"):
        parse_experiment({"famus": famus, "train": {"epochs": 2}, "method": {"name": "mwnet"}})


def test_exclude_and_its_errors():
    grid = {"noise.type": ["uniform", "pair"], "noise.rate": [0.2, 0.4]}
    cells = expand(sweep(grid=grid, exclude=[{"noise.type": "pair", "noise.rate": 0.4}]))
    assert len(cells) == 3
    with pytest.raises(ConfigError, match="exclude rule.*match no cell"):
        expand(sweep(grid=grid, exclude=[{"noise.type": "pairs"}]))
    with pytest.raises(ConfigError, match="every cell is excluded"):
        expand(sweep(grid={"seed": [0]}, exclude=[{"seed": 0}]))


def test_empty_grid_values_and_invalid_cells():
    with pytest.raises(ConfigError, match="grid key 'seed' has no values"):
        expand(sweep(grid={"seed": []}))
    with pytest.raises(ConfigError) as err:
        expand(sweep(grid={"noise.type": ["uniform", "unifrom"], "noise.rate": [0.2]}))
    assert "cell {'noise.type': 'unifrom'" in str(err.value) and "did you mean 'uniform'" in str(err.value)


def test_sweep_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ngrid:\n  seed: [0, 1\n")
    with pytest.raises(ConfigError, match=r"YAML syntax error at line \d+, column \d+"):
        read_yaml(bad)
    with pytest.raises(ConfigError, match="no such file"):
        read_yaml(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="'bad name' may only contain letters"):
        parse_sweep({"name": "bad name"})
    with pytest.raises(ConfigError, match="unknown key 'grd' \\(did you mean 'grid'\\?\\)"):
        parse_sweep({"name": "x", "grd": {}})


def test_relative_paths_are_made_absolute(tmp_path):
    spec = sweep(base={"dataset": {"name": "cifar10", "root": "data/c10"}}, grid={"seed": [0]})
    cell = expand(spec, base_dir=tmp_path)[0]
    assert cell.config.dataset.root == str(tmp_path / "data" / "c10")


def test_every_shipped_sweep_file_is_valid():
    from pathlib import Path

    files = sorted(Path(__file__).resolve().parents[1].glob("sweeps/**/*.yaml"))
    assert files, "no sweep files found"
    for file in files:
        assert expand(load_sweep(file)), file
