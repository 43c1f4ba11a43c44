"""The Trainer: really trains, resumes exactly from a checkpoint, fails clearly."""

import pytest
import torch
from conftest import tiny_experiment

from raymeta.config import parse_experiment
from raymeta.errors import ConfigError
from raymeta.train import Trainer, TrainingDiverged


def cfg(**sections):
    return parse_experiment(tiny_experiment(**sections))


def test_ce_learns_digits():
    result = Trainer(cfg(train={"epochs": 6, "batch_size": 64})).fit()
    accs = [c["test_acc"] for c in result.curves]
    assert accs[-1] > 0.9 and accs[-1] > accs[0]
    assert result.outcome["final_test_acc"] == accs[-1]
    assert result.outcome["best_test_acc"] == max(accs)
    assert len(result.curves) == 6 and [c["epoch"] for c in result.curves] == list(range(6))


def test_noise_hurts_ce():
    clean = Trainer(cfg(train={"epochs": 20, "batch_size": 64})).fit().outcome
    noisy = Trainer(cfg(train={"epochs": 20, "batch_size": 64},
                        noise={"type": "flip_to_one", "rate": 0.45})).fit().outcome
    assert clean["final_test_acc"] > noisy["final_test_acc"] + 0.05
    assert noisy["realized_noise_rate"] == pytest.approx(0.45, abs=0.01)


PSEUDO = {"per_class": None, "source": "pseudo", "pseudo": {"warmup_epochs": 1, "min_size": 8}}


def assert_resumes_exactly(tmp_path, sections: dict) -> None:
    """Stopping after 2 of 4 epochs and resuming from the checkpoint gives the uninterrupted
    run: the model, the method's state (meta-model, its optimizer, teacher, encoder, random
    streams) and the pseudo meta set survive a checkpoint. Every method passes it
    (test_conformance)."""
    config = cfg(train={"epochs": 4}, noise={"type": "uniform", "rate": 0.3}, **sections,
                 dataset={"augment": "crop_flip"})  # augmentation draws random numbers too
    straight = Trainer(config).fit()

    class Stop(Exception):
        pass

    def stop_after_two(metrics, trainer):
        if metrics["epoch"] == 1:
            raise Stop

    with pytest.raises(Stop):
        Trainer(config, checkpoint_dir=tmp_path, on_epoch_end=stop_after_two).fit()
    resumed = Trainer(config, checkpoint_dir=tmp_path, resume_from=tmp_path).fit()
    assert len(resumed.curves) == 4
    for a, b in zip(straight.curves, resumed.curves):
        assert a["test_acc"] == b["test_acc"] and a["train_loss"] == b["train_loss"]


def test_resume_with_a_pseudo_meta_set_equals_an_uninterrupted_run(tmp_path):
    assert_resumes_exactly(tmp_path, {"method": {"name": "mwnet"}, "meta_set": PSEUDO})


def test_checkpoint_of_another_config_is_refused(tmp_path):
    Trainer(cfg(train={"epochs": 1}), checkpoint_dir=tmp_path).fit()
    with pytest.raises(ConfigError, match="written by another config"):
        Trainer(cfg(train={"epochs": 1}, seed=5), resume_from=tmp_path)


def test_diverging_loss_fails_with_its_reason():
    with pytest.raises(TrainingDiverged, match="training loss is nan in epoch 0"):
        Trainer(cfg(optimizer={"lr": 1e12})).fit()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_gpu_is_a_config_error():
    with pytest.raises(ConfigError, match="no CUDA GPU is visible"):
        Trainer(cfg(train={"device": "cuda"}))


@pytest.mark.parametrize("model,dataset", [("lenet", "digits"), ("cnn8", "digits"),
                                           ("mlp", "synthetic")])
def test_models_and_datasets_train_end_to_end(model, dataset):
    result = Trainer(cfg(model={"name": model, "options": {}}, dataset={"name": dataset},
                         train={"epochs": 1})).fit()
    assert 0.0 <= result.outcome["final_test_acc"] <= 1.0


@pytest.mark.parametrize("method", [{"name": "ce"}, {"name": "mwnet", "famus": True}, {"name": "mlc"}],
                         ids=lambda m: m["name"] + ("+famus" if m.get("famus") else ""))
def test_bf16_autocast_trains_like_float32(method):
    """train.bf16 really runs the model in bfloat16 (the run differs from float32), and learns
    as well: every stage of the bilevel step works under autocast."""
    runs = {bf16: Trainer(cfg(train={"epochs": 6, "batch_size": 64, "bf16": bf16}, method=method,
                              noise={"type": "uniform", "rate": 0.3})).fit()
            for bf16 in (False, True)}
    full, half = runs[False].outcome, runs[True].outcome
    assert half["final_train_loss"] != full["final_train_loss"]
    assert half["final_test_acc"] > 0.85 and abs(half["final_test_acc"] - full["final_test_acc"]) < 0.03



@pytest.mark.parametrize("method", [{"name": "ce"}, {"name": "mlc"}])
def test_compile_trains_like_eager(method):
    """train.compile: ce's steps and every evaluation run compiled, MLC's bilevel steps stay
    eager beside them; both train as the eager run does, up to float rounding."""
    from torch._dynamo.utils import counters

    trainers = {flag: Trainer(cfg(train={"epochs": 2, "batch_size": 64, "compile": flag},
                                  method=method, noise={"type": "uniform", "rate": 0.3}))
                for flag in (False, True)}
    runs = {flag: trainer.fit() for flag, trainer in trainers.items()}
    assert counters["stats"]["unique_graphs"] >= 1  # dynamo really captured the model
    assert trainers[True].engine.plain_model is not trainers[True].model
    for eager, compiled in zip(runs[False].curves, runs[True].curves):
        assert compiled["train_loss"] == pytest.approx(eager["train_loss"], rel=1e-4)
        assert compiled["test_acc"] == pytest.approx(eager["test_acc"], abs=0.01)


def test_a_collapsed_run_is_stored_as_collapsed_and_listed(tmp_path):
    """Weight decay that wins over every gradient leaves a model that predicts the same for
    every input: loss ln K, chance accuracy, no NaN. It must not pass as a result."""
    import subprocess
    import sys

    from raymeta.orchestrate.trial import run_trial
    from raymeta.results import query

    collapsing = cfg(optimizer={"lr": 0.1, "weight_decay": 5.0, "momentum": 0.0},
                     train={"epochs": 4})
    row = run_trial(collapsing, store=str(tmp_path), sweep="s", trial_id=collapsing.trial_id())
    assert row["status"] == "collapsed"
    assert row["error"].startswith("collapsed at epoch 0: training loss stuck at ln K = 2.3026")
    healthy = cfg()
    assert run_trial(healthy, store=str(tmp_path), sweep="s", trial_id=healthy.trial_id())["status"] == "completed"
    trials = query.load(str(tmp_path), "trials", "s")
    assert len(query.load(str(tmp_path), "curves", "s")) == 6  # the collapsed run keeps its curves
    assert query.summary(trials)["clean"].item().endswith("(1, 1 collapsed)**")
    listed = subprocess.run([sys.executable, "-m", "raymeta.cli", "results", "failed", "--store",
                             str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert f"s/{collapsing.trial_id()}: collapsed: collapsed at epoch 0" in listed.stdout


def test_the_trial_id_is_the_experiment_not_the_way_it_was_written():
    from raymeta.train.packed import packed_configs

    written = parse_experiment({**tiny_experiment(), "seed": 1})
    defaulted = cfg()
    packed = packed_configs(defaulted, [0, 1])
    assert [c.trial_id() for c in packed] == [defaulted.trial_id(), written.trial_id()]
    assert defaulted.trial_id().startswith("ce_digits_clean_s0_")
