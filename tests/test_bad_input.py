"""Bad input, caught early: each case exits with status 2 and a message naming the problem and
the fix, before Ray starts and before anything is written to the store (in-process CLI)."""

import gzip
import shutil
import sys

import numpy as np
import pytest
import yaml
from fixtures_formats import MNIST_NAMES, mnist_arrays, write_cifar_tarball, write_imagefolder, write_mnist
from PIL import Image

from raymeta import cli

DIGITS = {"dataset": {"name": "digits"}, "model": {"name": "mlp", "options": {"hidden": [8]}},
          "train": {"epochs": 1, "batch_size": 128}, "meta_set": {"per_class": 5}}


def experiment(**changes):
    data = yaml.safe_load(yaml.safe_dump(DIGITS))
    for key, value in changes.items():
        section, _, field = key.partition(".")
        if field:
            data.setdefault(section, {})[field] = value
        else:
            data[section] = value
    return data


def sweep(base=None, **extra):
    return {"name": "bad", "store": "out", "base": base or DIGITS, "grid": {"seed": [0]}, **extra}


def searched(space, **search):
    """A sweep of MW-Net whose `search:` has this space and these settings."""
    return sweep(experiment(method={"name": "mwnet"}), search={"space": space, **search})


def truncated_cifar(root):
    path, _ = write_cifar_tarball(root)
    path.write_bytes(path.read_bytes()[:300])
    return str(root)


def corrupt_mnist(root):
    write_mnist(root, mnist_arrays())
    (root / MNIST_NAMES[0]).write_bytes(b"\x00\x00\x08\x03" + b"\x00" * 10)
    return str(root)


def label_file(root, labels=None):
    path = root / "labels.npy"
    np.save(path, np.zeros(7, dtype=np.int64) if labels is None else np.asarray(labels))
    return str(path)


def image_folder(root, damage):
    """A small image folder (fixtures_formats.write_imagefolder), then `damage` done to it."""
    write_imagefolder(root)
    if damage == "no test split":
        shutil.rmtree(root / "test")
    elif damage == "two sizes":
        Image.fromarray(np.zeros((20, 16, 3), dtype=np.uint8)).save(root / "train" / "dog" / "big.png")
    elif damage == "unreadable":
        (root / "test" / "cat" / "0002.jpg").write_bytes(b"not a jpeg")
    return str(root)


def digits_labels(bad: int):
    """The digits training split's size (1,257 after the test split) with one bad label."""
    labels = np.zeros(1257, dtype=np.int64)
    labels[3] = bad
    return labels


# (name, what to write: "run" experiment or "sweep" file, a function of the tmp folder that
#  returns the content, extra CLI args, the message the user sees)
CASES = [
    ("unknown method", "run", lambda d: experiment(method={"name": "mwn"}), [],
     "did you mean 'mwnet'"),
    ("unknown noise type", "run", lambda d: experiment(**{"noise.type": "unifrom", "noise.rate": 0.4}), [],
     "did you mean 'uniform'"),
    ("unknown dataset", "run", lambda d: experiment(**{"dataset.name": "cifar"}), [],
     "dataset.name: unknown dataset 'cifar'; choose one of cifar10, cifar100, clothing1m, digits"),
    ("unknown model", "run", lambda d: experiment(**{"model.name": "resnet18"}), [],
     "model.name"),
    ("unknown model option", "run", lambda d: experiment(**{"model.options": {"hiden": [8]}}), [],
     "model.options: model 'mlp' has no option 'hiden'; its options: hidden, batchnorm (did you mean 'hidden'?)"),
    ("a noise map with a noise type that does not read it", "run",
     lambda d: experiment(noise={"type": "uniform", "rate": 0.4, "mapping": {0: 1}}), [],
     "noise.mapping: noise.type uniform does not read it (read by: asymmetric)"),
    ("a test split share for a dataset with its own test split", "run",
     lambda d: experiment(dataset={"name": "mnist", "root": str(d), "test_fraction": 0.2}), [],
     "dataset.test_fraction: dataset mnist does not read it (read by: digits, synthetic)"),
    ("unknown key", "run", lambda d: experiment(**{"train.epoch": 3}), [],
     "did you mean 'train.epochs'"),
    ("unknown section", "run", lambda d: {**experiment(), "optimiser": {"lr": 0.1}}, [],
     "did you mean 'optimizer'"),
    ("noise rate above 1", "run", lambda d: experiment(**{"noise.type": "uniform", "noise.rate": 1.5}), [],
     "noise.rate"),
    ("noise rate 1.0", "run", lambda d: experiment(**{"noise.type": "uniform", "noise.rate": 1.0}), [],
     "noise.rate"),
    ("negative noise rate", "run", lambda d: experiment(**{"noise.type": "uniform", "noise.rate": -0.1}), [],
     "noise.rate"),
    ("rate without a noise type", "run", lambda d: experiment(**{"noise.rate": 0.4}), [],
     "noise.type none needs noise.rate 0.0"),
    ("per_class larger than a class has", "run", lambda d: experiment(**{"meta_set.per_class": 500}), [],
     "use meta_set.per_class of at most"),
    ("meta set from a val split that does not exist", "run",
     lambda d: experiment(meta_set={"per_class": 5, "source": "val"}), [],
     "meta_set.source val needs a dataset with a clean validation split"),
    ("pseudo meta set given a size", "run",
     lambda d: experiment(meta_set={"source": "pseudo", "per_class": 5}), [],
     "meta_set.per_class does not apply to source pseudo"),
    ("pseudo settings on a clean meta set", "run",
     lambda d: experiment(meta_set={"per_class": 5, "pseudo": {"threshold": 0.7}}), [],
     "meta_set.pseudo applies only to meta_set.source pseudo"),
    ("pseudo warm-up as long as the training", "run",
     lambda d: experiment(meta_set={"source": "pseudo"}, **{"train.epochs": 5}), [],
     "leaves no epoch for the meta method"),
    ("method step after the last epoch", "run",
     lambda d: experiment(method={"name": "metalabelnet"}), [],
     "method.warmup_epochs (44) is not below train.epochs (1): metalabelnet would train plain "
     "cross-entropy throughout"),
    ("a sweep cell whose correction never runs", "sweep",
     lambda d: {**sweep(), "grid": {"method": [{"name": "forward", "estimate_epoch": 1},
                                               {"name": "mlnt", "start_epoch": 0}]}}, [],
     "method.estimate_epoch (1) is not below train.epochs (1): forward would train plain"),
    ("bf16 with float64", "run", lambda d: experiment(**{"train.bf16": True, "train.dtype": "float64"}), [],
     "train.bf16 autocasts float32 models"),
    ("missing dataset files", "run",
     lambda d: experiment(dataset={"name": "cifar10", "root": str(d / "nowhere")}), [],
     "nowhere"),
    ("truncated CIFAR tarball", "run",
     lambda d: experiment(dataset={"name": "cifar10", "root": truncated_cifar(d / "c")}), [],
     "cifar-10-python.tar.gz"),
    ("corrupt IDX file", "run",
     lambda d: experiment(dataset={"name": "mnist", "root": corrupt_mnist(d / "m")}), [],
     "train-images-idx3-ubyte"),
    ("image folder without a test split", "run",
     lambda d: experiment(dataset={"name": "imagefolder", "root": image_folder(d / "i", "no test split")}),
     [], "has no test/ folder; the layout is"),
    ("image folder with images of two sizes", "run",
     lambda d: experiment(dataset={"name": "imagefolder", "root": image_folder(d / "i", "two sizes")}),
     [], "set dataset.image_size: N to resize them all"),
    ("image folder with an unreadable image", "run",
     lambda d: experiment(dataset={"name": "imagefolder", "root": image_folder(d / "i", "unreadable")}),
     [], "test/cat/0002.jpg"),
    ("class fractions without a training size", "run",
     lambda d: experiment(dataset={"name": "digits", "classes": [4, 9], "class_fractions": [0.1, 0.9]}),
     [], "dataset.class_fractions and dataset.train_size go together"),
    ("a class subset asking for more samples than a class has", "run",
     lambda d: experiment(dataset={"name": "digits", "classes": [4, 9], "train_size": 1000,
                                   "class_fractions": [0.1, 0.9]}),
     [], "asks for 900 training samples of class 1, but only"),
    ("label file of the wrong length", "run",
     lambda d: experiment(noise={"type": "real", "file": label_file(d)}), [],
     "labels.npy"),
    ("label file with a label beyond the classes", "run",
     lambda d: experiment(noise={"type": "real", "file": label_file(d, digits_labels(99))}), [],
     "1 label(s) outside 0..9, the dataset's classes (first: 99 at index 3)"),
    ("label file with -1 labels", "run",
     lambda d: experiment(noise={"type": "real", "file": label_file(d, digits_labels(-1))}), [],
     "for unlabeled samples use dataset.unlabeled_fraction, not -1"),
    ("a --sweep name that leaves the store", "run", lambda d: experiment(),
     ["--sweep", "../../../ESCAPED"], "--sweep '../../../ESCAPED' is not a valid sweep name"),
    ("negative epochs", "run", lambda d: experiment(**{"train.epochs": 0}), [],
     "train.epochs"),
    ("a string where a number goes", "run", lambda d: experiment(**{"optimizer.lr": "fast"}), [],
     "optimizer.lr"),
    ("famus on a method without a meta-model", "run",
     lambda d: experiment(method={"name": "mlnt", "famus": True}), [], "famus"),
    ("a setting the method never reads", "run",
     lambda d: experiment(method={"name": "l2r", "meta_lr": 0.01}), [],
     "method.meta_lr: method l2r does not read it (the methods that do: mwnet, mlc, metalabelnet"),  # then any plugin loaded
    ("FaMUS settings with FaMUS off", "run",
     lambda d: experiment(method={"name": "mwnet"}, famus={"k": 2}), [],
     "famus.k: read only when the method runs FaMUS (method.famus: true)"),
    ("SGD's momentum given to Adam", "run",
     lambda d: experiment(optimizer={"name": "adam", "lr": 1e-3, "momentum": 0.0}), [],
     "optimizer.momentum: optimizer adam does not read it (sgd does)"),
    ("two sweep cells that are the same run", "sweep",
     lambda d: {**sweep(), "grid": {"method.name": ["l2r", "mwnet"], "method.meta_lr": [1e-3, 1e-2]}},
     [], "are the same run, since method.meta_lr: method l2r does not read it"),
    ("a sweep setting no cell reads", "sweep",
     lambda d: {**sweep({**DIGITS, "famus": {"k": 2}}), "grid": {"method.name": ["ce", "mwnet"]}},
     [], "famus.k is set, but no cell of the sweep reads it"),
    ("empty grid", "sweep", lambda d: {**sweep(), "grid": {"seed": []}}, [],
     "grid key 'seed' has no values"),
    ("exclude that matches nothing", "sweep",
     lambda d: sweep(exclude=[{"seed": 7}]), [], "exclude rule(s) that match no cell"),
    ("every cell excluded", "sweep", lambda d: sweep(exclude=[{"seed": 0}]), [],
     "has no cells to run"),
    ("bad sweep name", "sweep", lambda d: {**sweep(), "name": "my sweep"}, [], "name"),
    ("grid over an unknown key", "sweep", lambda d: {**sweep(), "grid": {"noise.rat": [0.2]}}, [],
     "noise.rat"),
    ("store that cannot be written", "sweep", lambda d: sweep(), ["--store", "/proc/raymeta-results"],
     "cannot be written"),
    ("GPUs where none exist", "sweep",
     lambda d: sweep(resources={"gpus_per_trial": 1}), [], "has no GPU"),
    ("more workers than the machine can place", "sweep",
     lambda d: sweep(resources={"workers_per_trial": 64, "cpus_per_trial": 64}), [],
     "lower resources.cpus_per_trial / workers_per_trial"),
    ("workers sharing a GPU", "sweep",
     lambda d: sweep(resources={"workers_per_trial": 2, "gpus_per_trial": 1}), [],
     "workers of one run cannot share a GPU"),
    ("packed seeds of a method that needs its model", "sweep",
     lambda d: {**sweep(experiment(method={"name": "mlnt", "start_epoch": 0})), "grid": {"seed": [0, 1]},
                "resources": {"seeds_per_trial": 2}}, [], "train mlnt one seed per trial"),
    ("packed seeds and data-parallel workers", "sweep",
     lambda d: sweep(resources={"seeds_per_trial": 2, "workers_per_trial": 2}), [],
     "does not combine with workers_per_trial > 1"),
    ("chained cells with packed seeds", "sweep",
     lambda d: sweep(resources={"cells_per_trial": 4, "seeds_per_trial": 2}), [],
     "cells_per_trial > 1 chains short one-process cells; it does not combine"),
    ("chained cells with early stopping", "sweep",
     lambda d: {**sweep(resources={"cells_per_trial": 4}),
                "early_stopping": {"scheduler": "asha", "metric": "meta_acc"}}, [],
     "early_stopping does not combine with resources.cells_per_trial > 1"),
    ("packed seeds that are not numbers", "run", lambda d: experiment(), ["--seeds", "0,one"],
     "--seeds expects seeds separated by commas"),
    ("packed seeds with FaMUS", "run", lambda d: experiment(method={"name": "mwnet", "famus": True}),
     ["--seeds", "0,1"], "do not combine with method.famus"),
    ("elastic workers whose global batch does not split", "sweep",
     lambda d: sweep(experiment(method={"name": "mwnet"},
                                **{"train.batch_size": 7, "train.meta_batch_size": 6}),
                     resources={"workers_per_trial": 3, "cpus_per_trial": 1.5, "elastic": True}),
     [],
     "set train.batch_size to a multiple of"),
    ("a repeated grid value", "sweep", lambda d: {**sweep(), "grid": {"seed": [0, 1, 0]}}, [],
     "grid key 'seed' repeats the value(s) 0"),
    ("a search chosen on the test set", "sweep",
     lambda d: searched({"method.meta_lr": {"loguniform": [1e-3, 1e-1]}}, metric="test_acc"), [],
     "test_acc is a test-set metric: choosing a configuration on the test set"),
    ("an unknown search algorithm", "sweep",
     lambda d: searched({"method.meta_lr": {"loguniform": [1e-3, 1e-1]}}, algorithm="optuan"), [],
     "search.algorithm: 'optuan' is not allowed; choose one of 'optuna' or 'random' (did you mean 'optuna'?)"),
    ("a log-uniform range from 0", "sweep",
     lambda d: searched({"method.meta_lr": {"loguniform": [0, 1]}}), [],
     "method.meta_lr: loguniform [0, 1] needs low > 0"),
    ("an empty choice", "sweep",
     lambda d: searched({"method.meta_interval": {"choice": []}}), [],
     "method.meta_interval: choice takes a non-empty list of values"),
    ("a searched key the method never reads", "sweep",
     lambda d: searched({"famus.k": {"randint": [1, 4]}}), [],
     "search.space.famus.k: read only when the method runs FaMUS (method.famus: true); search it only in cells whose method reads it"),
    ("an unreachable MLflow tracking server", "sweep",
     lambda d: sweep(tracking={"mlflow": {"uri": "http://127.0.0.1:9"}}), [],
     "tracking.mlflow.uri 'http://127.0.0.1:9' cannot be used"),
    ("YAML syntax error", "yaml", lambda d: "name: x\nbase: {dataset: {name: digits}\ngrid: {}\n", [],
     "line 3"),
]


def run_cli(args, monkeypatch, capsys) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["raymeta", *args])
    try:
        cli.main()
    except SystemExit as exit_:
        return exit_.code, capsys.readouterr().err
    return 0, capsys.readouterr().err


@pytest.mark.parametrize("name,kind,make,args,message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_early(name, kind, make, args, message, tmp_path, monkeypatch, capsys):
    import ray

    ray_before = ray.is_initialized()  # False unless a Ray test ran earlier in this session
    monkeypatch.chdir(tmp_path)
    content = make(tmp_path)
    path = tmp_path / "input.yaml"
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    command = ["run", str(path), "--store", "out"] if kind == "run" else ["sweep", str(path)]
    code, err = run_cli([*command, *args], monkeypatch, capsys)
    assert code == 2, err
    assert message in err, err
    assert not (tmp_path / "out").exists() and not (tmp_path / "runs").exists()  # nothing written
    assert ray.is_initialized() == ray_before  # the command never started Ray


@pytest.mark.parametrize("name,kind,make,args,message", [c for c in CASES if not c[3]],
                         ids=[c[0] for c in CASES if not c[3]])
def test_validate_refuses_what_run_and_sweep_refuse(name, kind, make, args, message, tmp_path,
                                                    monkeypatch, capsys):
    """`raymeta validate` makes the same checks (config, data, store, resources), without
    creating anything."""
    monkeypatch.chdir(tmp_path)
    content = make(tmp_path)
    path = tmp_path / "input.yaml"
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    code, err = run_cli(["validate", str(path)], monkeypatch, capsys)
    assert code == 2 and message in err, err
    assert not (tmp_path / "out").exists() and not (tmp_path / "results").exists()


def test_validate_refuses_an_empty_file_and_reports_a_problem_once(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty.yaml").write_text("")
    code, err = run_cli(["validate", "empty.yaml"], monkeypatch, capsys)
    assert code == 2 and "empty.yaml is empty" in err
    (tmp_path / "typo.yaml").write_text(yaml.safe_dump(
        {**sweep(), "grid": {"seed": [0, 1, 2], "noise.rat": [0.2, 0.4]}}))
    code, err = run_cli(["validate", "typo.yaml"], monkeypatch, capsys)
    assert code == 2 and err.count("unknown key 'noise.rat'") == 1  # once, not once per cell
    assert "and 5 more cell(s)" in err


def test_at_least_25_cases():
    assert len(CASES) >= 25


def test_checkpoint_of_another_config_is_refused_on_resume(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(experiment()))
    code, _ = run_cli(["run", "a.yaml", "--out", "ck", "--store", "first"], monkeypatch, capsys)
    assert code == 0
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(experiment(**{"train.batch_size": 64})))
    code, err = run_cli(["run", "b.yaml", "--out", "ck", "--resume", "--store", "second"],
                        monkeypatch, capsys)
    assert code == 2 and "was written by another config" in err and "--out" in err
    assert not (tmp_path / "second").exists()


def test_gzip_is_not_required_to_be_valid_to_be_named(tmp_path):
    """A broken .gz IDX file is reported by name too (not a bare zlib error)."""
    from raymeta.data.formats import read_idx
    from raymeta.errors import DataError

    bad = tmp_path / "train-images-idx3-ubyte.gz"
    bad.write_bytes(gzip.compress(b"\x00\x00\x08\x03")[:-4])
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz"):
        read_idx(bad)
