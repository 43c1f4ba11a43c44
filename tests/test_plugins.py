"""A method, a model, a dataset and a noise model from another package
(examples/raymeta-example): found through their entry points or import paths, validated like
built-ins, trained by `raymeta run` and in a real Ray Tune sweep, and counted in summaries like
any other row."""

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
MODEL_PATH = "raymeta_example.smallcnn:SmallCNN"
SMALLCNN = {"name": "smallcnn", "options": {"width": 4}}
NOISE_PATH = "raymeta_example.noise:within_block"
WITHIN_BLOCK = {"type": "within_block", "rate": 0.4, "options": {"block": 5}}
DATASET_PATH = "raymeta_example.arrays:npz_arrays"
NOISE = {"type": "uniform", "rate": 0.4}


@pytest.fixture
def installed(tmp_path, monkeypatch):
    """The example package importable and installed as pip would record it: a dist-info
    folder whose entry_points.txt declares `threshold` (the example's pyproject.toml)."""
    site = tmp_path / "site"
    info = site / "raymeta_example-0.1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: raymeta-example\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text(f"[raymeta.methods]\nthreshold = {IMPORT_PATH}\n\n"
                                           f"[raymeta.models]\nsmallcnn = {MODEL_PATH}\n\n"
                                           f"[raymeta.noise]\nwithin_block = {NOISE_PATH}\n\n"
                                           f"[raymeta.datasets]\nnpz_arrays = {DATASET_PATH}\n")
    monkeypatch.syspath_prepend(str(EXAMPLE_PLUGIN))
    monkeypatch.syspath_prepend(str(site))
    return site


@pytest.fixture
def arrays(tmp_path):
    """The digits as the example's npz_arrays dataset reads them: one .npz of four arrays."""
    import numpy as np
    from sklearn.datasets import load_digits

    digits = load_digits()
    x, y = (digits.images * 16).astype(np.uint8), digits.target
    np.savez(tmp_path / "data.npz", x_train=x[:1200], y_train=y[:1200], x_test=x[1200:], y_test=y[1200:])
    return {"name": "npz_arrays", "root": str(tmp_path)}


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


def test_every_kind_of_plugin_runs_in_a_real_tune_sweep_beside_builtins(installed, arrays, ray_session,
                                                                        tmp_path):
    # the trials' processes have the package on their path (conftest) but not its entry points:
    # they load the classes the driver resolved
    base = tiny_experiment(noise=NOISE, train={"epochs": 3})
    mlp = base.pop("model")  # each cell names its model: a grid merges options into the base's
    spec = parse_sweep({"name": "plug", "store": str(tmp_path), "base": base,
                        "grid": {".": [{"method": {"name": "ce"}, "model": mlp},
                                       {"method": {"name": "threshold"}, "model": mlp},
                                       {"model": SMALLCNN}, {"noise": WITHIN_BLOCK, "model": mlp},
                                       {"dataset": arrays, "model": mlp}],
                                 "seed": [0, 1]}})
    assert run_sweep(spec, expand(spec)).failed == 0
    trials = query.load(str(tmp_path), "trials", "plug")
    cells = sorted(zip(trials["method.name"], trials["model.name"], trials["noise.type"],
                       trials["dataset.name"]))
    assert cells == sorted(2 * [("ce", "mlp", "uniform", "digits"), ("ce", "mlp", "within_block", "digits"),
                                ("ce", "smallcnn", "uniform", "digits"), ("threshold", "mlp", "uniform", "digits"),
                                ("ce", "mlp", "uniform", "npz_arrays")])
    assert set(trials["status"]) == {"completed"}
    table = query.summary(trials.filter((trials["model.name"] == "mlp") & (trials["dataset.name"] == "digits")))
    assert {"ce", "threshold"} <= set(table["method"]) and "(2)" in str(table)
    assert "within_block 0.4" in table.columns  # the plugin noise's own column
    by_model = query.summary(trials.filter(trials["method.name"] == "ce"), by=["model.name"])
    assert set(by_model["model.name"]) == {"smallcnn", "mlp"}


def test_an_installed_plugin_model_trains_with_raymeta_run(installed, tmp_path, monkeypatch, capsys):
    assert plugins.installed("model")["smallcnn"] == MODEL_PATH
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tiny_experiment(model=SMALLCNN, noise=NOISE, train={"epochs": 2})))
    code, out, err = run_cli(["run", str(config), "--store", str(tmp_path / "out")], monkeypatch, capsys)
    assert code == 0, err
    rows = query.load(str(tmp_path / "out"), "trials", "runs")
    assert rows["model.name"].to_list() == ["smallcnn"] and rows["status"].to_list() == ["completed"]
    assert rows["final_test_acc"][0] > 0.2  # it learns (chance is 0.1)


def test_a_plugin_model_option_typo_or_a_class_that_is_not_a_model_is_refused(installed):
    for name in ("smallcnn", MODEL_PATH):
        with pytest.raises(ConfigError, match="model 'raymeta_example.*' has no option 'widht'.*did you mean 'width'"
                           if ":" in name else "no option 'widht'.*did you mean 'width'"):
            parse_experiment({"model": {"name": name, "options": {"widht": 4}}})
    with pytest.raises(ConfigError, match="did you mean 'smallcnn'"):
        parse_experiment({"model": {"name": "smalcnn"}})
    with pytest.raises(ConfigError, match="is not a raymeta.models.Backbone subclass"):
        parse_experiment({"model": {"name": IMPORT_PATH}})


def test_a_plugin_class_that_is_not_a_method_is_refused_with_the_reason(installed):
    with pytest.raises(ConfigError, match="is not a raymeta.methods.Method subclass"):
        parse_experiment({"method": {"name": "raymeta_example.threshold:Threshold"}})


def test_a_plugin_noise_model_makes_the_labels_and_its_options_are_checked(installed, monkeypatch):
    """The plugin's labels are what training sees: its confusions stay inside their blocks of
    5 classes, at about its rate, the same for a seed; a typo in its option, a built-in type
    given options, or labels out of range are refused with what to fix."""
    import numpy as np

    from raymeta.data.bundle import build_data

    cfg = parse_experiment(tiny_experiment(noise=WITHIN_BLOCK))
    noise = build_data(cfg).noise
    assert noise.transition[:5, 5:].sum() == 0 == noise.transition[5:, :5].sum()
    assert noise.realized_rate == pytest.approx(0.4, abs=0.05)
    assert build_data(parse_experiment(tiny_experiment(noise={**WITHIN_BLOCK, "type": NOISE_PATH}))
                      ).noise.sha == noise.sha
    assert "within_block0.4" in cfg.trial_id()
    with pytest.raises(ConfigError, match="has no option 'blok'; its options: block .did you mean 'block'"):
        parse_experiment({"noise": {**WITHIN_BLOCK, "options": {"blok": 5}}})
    with pytest.raises(ConfigError, match="noise.options: options are a plugin noise model's; the built-in uniform"):
        parse_experiment({"noise": {"type": "uniform", "rate": 0.4, "options": {"block": 5}}})
    with pytest.raises(ConfigError, match="did you mean 'within_block'"):
        parse_experiment({"noise": {"type": "within_blok", "rate": 0.4}})
    from raymeta.data.noise import make_noisy_labels

    monkeypatch.setitem(plugins._CLASSES["noise"], "out_of_range", lambda clean, k, rate, rng: clean + k)
    with pytest.raises(ConfigError, match="must return integer labels in 0..9"):
        make_noisy_labels(np.arange(10), 10, "out_of_range", 0.4, np.random.default_rng(0))


def test_a_plugin_dataset_is_checked_before_ray_and_trains_like_a_builtin(installed, arrays, tmp_path,
                                                                         monkeypatch):
    """The example's npz_arrays gives the splits; raymeta carves the meta set and makes the noise
    on top. A typo in its option, a missing file (at the preflight, before Ray) and a function
    that returns something else are refused with what to fix."""
    from raymeta.data.bundle import build_data
    from raymeta.errors import DataError
    from raymeta.orchestrate.preflight import check_all_data

    cfg = parse_experiment(tiny_experiment(dataset=arrays, noise=NOISE, meta_set={"per_class": 5}))
    data = build_data(cfg)
    assert len(data.meta.y) == 50 and len(data.train.y) == 1200 - 50 and data.num_classes == 10
    assert data.noise.realized_rate == pytest.approx(0.36, abs=0.04)  # uniform 0.4 over 10 classes
    assert cfg.trial_id().startswith("ce_npz_arrays_uniform0.4_s0_")
    with pytest.raises(ConfigError, match="has no option 'fiel'; its options: file .did you mean 'file'"):
        parse_experiment({"dataset": {**arrays, "options": {"fiel": "x.npz"}}})
    with pytest.raises(DataError, match="does not exist; set dataset.root"):
        check_all_data([parse_experiment({"dataset": {**arrays, "root": str(tmp_path / "none")}})])
    monkeypatch.setitem(plugins._CLASSES["dataset"], "not_raw", lambda root: {"x": 1})
    with pytest.raises(DataError, match="returned dict; it must return a raymeta.data.datasets.RawData"):
        build_data(parse_experiment({"dataset": {"name": "not_raw"}}))
