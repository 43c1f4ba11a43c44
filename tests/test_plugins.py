"""A method from another package (examples/raymeta-example): found through its entry point or
its import path, validated like a built-in, trained by `raymeta run` and in a real Ray Tune
sweep, and counted in summaries like any other row."""

import sys

import pytest
import yaml
from conftest import EXAMPLE_PLUGIN, tiny_experiment

from raymeta import cli, plugins
from raymeta.config import parse_experiment, parse_sweep
from raymeta.errors import ConfigError
from raymeta.orchestrate.grid import expand
from raymeta.orchestrate.sweep import run_sweep
from raymeta.results import query

IMPORT_PATH = "raymeta_example.threshold:MetaThreshold"
NOISE = {"type": "uniform", "rate": 0.4}


@pytest.fixture
def installed(tmp_path, monkeypatch):
    """The example package importable and installed as pip would record it: a dist-info
    folder whose entry_points.txt declares `threshold` (the example's pyproject.toml)."""
    site = tmp_path / "site"
    info = site / "raymeta_example-0.1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: raymeta-example\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text(f"[raymeta.methods]\nthreshold = {IMPORT_PATH}\n")
    monkeypatch.syspath_prepend(str(EXAMPLE_PLUGIN))
    monkeypatch.syspath_prepend(str(site))
    return site


def run_cli(args, monkeypatch, capsys) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["raymeta", *args])
    try:
        cli.main()
    except SystemExit as exit_:
        out = capsys.readouterr()
        return exit_.code, out.out, out.err
    out = capsys.readouterr()
    return 0, out.out, out.err


def test_an_installed_plugin_method_trains_with_raymeta_run_and_joins_the_summary(
        installed, tmp_path, monkeypatch, capsys):
    assert plugins.installed()["threshold"] == IMPORT_PATH
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tiny_experiment(
        method={"name": "threshold", "temperature": 0.5}, noise=NOISE, train={"epochs": 3})))
    code, out, err = run_cli(["run", str(config), "--store", str(tmp_path / "out")], monkeypatch, capsys)
    assert code == 0, err
    rows = query.load(str(tmp_path / "out"), "trials", "runs")
    assert rows["method.name"].to_list() == ["threshold"] and rows["status"].to_list() == ["completed"]
    assert rows["method.temperature"].to_list() == [0.5]
    curves = query.load(str(tmp_path / "out"), "curves", "runs")
    assert curves["threshold"].drop_nulls().len() == 3  # the plugin's own per-epoch metric
    assert curves["train_weight_noisy"].mean() < curves["train_weight_clean"].mean()  # it down-weights
    code, out, err = run_cli(["results", "summary", "--store", str(tmp_path / "out")], monkeypatch, capsys)
    assert code == 0 and "threshold" in out, out + err


def test_a_typo_in_a_plugin_option_is_refused_before_ray_with_a_did_you_mean(
        installed, tmp_path, monkeypatch, capsys):
    import ray

    ray_before = ray.is_initialized()
    monkeypatch.chdir(tmp_path)
    for name in ("threshold", IMPORT_PATH):
        (tmp_path / "s.yaml").write_text(yaml.safe_dump({
            "name": "typo", "store": "out", "base": tiny_experiment(noise=NOISE),
            "grid": {"method": [{"name": name, "temperatur": 0.5}]}}))
        code, _, err = run_cli(["sweep", "s.yaml"], monkeypatch, capsys)
        assert code == 2 and "unknown key 'method.temperatur' (did you mean 'method.temperature'?)" in err, err
    assert not (tmp_path / "out").exists() and ray.is_initialized() == ray_before
    with pytest.raises(ConfigError, match="did you mean 'threshold'"):
        parse_experiment({"method": {"name": "treshold"}})
    with pytest.raises(ConfigError, match="cannot import raymeta_exampel"):
        parse_experiment({"method": {"name": "raymeta_exampel.threshold:MetaThreshold"}})


def test_a_plugin_method_runs_in_a_real_tune_sweep_beside_a_builtin(installed, ray_session, tmp_path):
    # the trials' processes have the package on their path (conftest) but not its entry point:
    # they load the class the driver resolved
    spec = parse_sweep({"name": "plug", "store": str(tmp_path),
                        "base": tiny_experiment(noise=NOISE, train={"epochs": 3}),
                        "grid": {"method": [{"name": "ce"}, {"name": "threshold"}], "seed": [0, 1]}})
    assert run_sweep(spec, expand(spec)).failed == 0
    trials = query.load(str(tmp_path), "trials", "plug")
    assert sorted(trials["method.name"].to_list()) == ["ce", "ce", "threshold", "threshold"]
    assert set(trials["status"]) == {"completed"}
    table = query.summary(trials)
    assert {"ce", "threshold"} <= set(table["method"]) and "(2)" in str(table)


def test_a_plugin_class_that_is_not_a_method_is_refused_with_the_reason(installed):
    with pytest.raises(ConfigError, match="is not a raymeta.methods.Method subclass"):
        parse_experiment({"method": {"name": "raymeta_example.threshold:Threshold"}})
