"""The data bundle: meta split, noise on top, label files, device batches and augmentation."""

import numpy as np
import pytest
import torch
from conftest import tiny_experiment

from raymeta.config import MetaSetConfig, parse_experiment
from raymeta.data.bundle import build_data, stratified_pick
from raymeta.data.loader import DeviceSplit, augment_batch
from raymeta.errors import ConfigError, DataError


def bundle(**sections):
    return build_data(parse_experiment(tiny_experiment(**sections)))


def test_meta_split_is_stratified_clean_and_disjoint():
    data = bundle(meta_set={"per_class": 7}, noise={"type": "flip_to_one", "rate": 0.4})
    assert np.bincount(data.meta.y, minlength=10).tolist() == [7] * 10
    assert np.array_equal(data.meta.y, data.meta.y_clean)  # the meta set keeps its true labels
    # disjoint, and together exactly the training split (70% of 1,797 digits)
    assert not set(data.meta.origin) & set(data.train.origin)
    assert sorted([*data.meta.origin, *data.train.origin]) == list(range(1257))
    assert abs(data.noise.realized_rate - 0.4) < 0.01  # exact on the training set that remains


def test_meta_split_indices_are_disjoint_and_deterministic():
    labels = np.repeat(np.arange(5), 40)
    cfg = MetaSetConfig(per_class=6)
    a = stratified_pick(labels, 5, cfg, np.random.default_rng(1), "training")
    b = stratified_pick(labels, 5, cfg, np.random.default_rng(1), "training")
    c = stratified_pick(labels, 5, cfg, np.random.default_rng(2), "training")
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert len(set(a.tolist())) == 30 and np.bincount(labels[a]).tolist() == [6] * 5


def test_meta_size_spreads_over_classes():
    labels = np.repeat(np.arange(4), 50)
    picked = stratified_pick(labels, 4, MetaSetConfig(size=10), np.random.default_rng(0), "training")
    assert sorted(np.bincount(labels[picked]).tolist()) == [2, 2, 3, 3]


def test_meta_set_too_large_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"meta_set.per_class asks for 500 samples of class 0, "
                                          r"but the training split has only \d+"):
        bundle(meta_set={"per_class": 500})


def test_meta_set_from_test_split():
    data = bundle(meta_set={"per_class": 5, "source": "test"})
    assert len(data.meta) == 50 and len(data.test) == 540 - 50 and len(data.train) == 1257
    assert not set(data.meta.origin) & set(data.test.origin)


def test_same_seed_same_data_other_seed_other_data():
    first = bundle(noise={"type": "symmetric", "rate": 0.4}, seed=3)
    again = bundle(noise={"type": "symmetric", "rate": 0.4}, seed=3)
    other = bundle(noise={"type": "symmetric", "rate": 0.4}, seed=4)
    assert first.summary() == again.summary()
    assert first.noise.sha != other.noise.sha and first.meta_sha != other.meta_sha


def test_feature_dependent_on_digits_flips_to_confusable_classes():
    data = bundle(noise={"type": "feature_dependent", "rate": 0.2})
    assert abs(data.noise.realized_rate - 0.2) < 0.002
    # flips follow a classifier's confusions, so they concentrate on few targets per class
    t = data.noise.transition * (1 - np.eye(10))
    top_share = (t.max(axis=1) / np.maximum(t.sum(axis=1), 1e-9)).mean()
    assert top_share > 0.4  # uniform over 9 others would give ~0.11


def test_real_noise_from_a_label_file(tmp_path):
    clean_train = build_data(parse_experiment(tiny_experiment(meta_set={"per_class": 5,
                                                                        "source": "test"})))
    labels = (clean_train.train.y + 1) % 10  # every label wrong, in original training order
    path = tmp_path / "labels.npy"
    np.save(path, labels)
    data = bundle(noise={"type": "real", "file": str(path)}, meta_set={"per_class": 5})
    assert data.noise.realized_rate == 1.0
    (tmp_path / "labels.txt").write_text("\n".join(map(str, labels.tolist())))
    from_text = bundle(noise={"type": "real", "file": str(tmp_path / "labels.txt")})
    assert np.array_equal(from_text.train.y, data.train.y)
    np.save(path, labels[:-1])
    with pytest.raises(DataError, match="has 1256 labels but the training split has 1257"):
        bundle(noise={"type": "real", "file": str(path)})


def test_cifar_n_style_label_file(tmp_path):
    clean = build_data(parse_experiment(tiny_experiment(meta_set={"per_class": 5, "source": "test"})))
    path = tmp_path / "CIFAR-10_human.pt"
    torch.save({"worse_label": (clean.train.y + 1) % 10, "aggre_label": clean.train.y}, path)
    with pytest.raises(DataError, match="set noise.key to one of: aggre_label, worse_label"):
        bundle(noise={"type": "real", "file": str(path)})
    data = bundle(noise={"type": "real", "file": str(path), "key": "aggre_label"},
                  meta_set={"per_class": 5, "source": "test"})
    assert data.noise.realized_rate == 0.0


def test_device_batches_cover_the_split_once_and_normalise():
    data = bundle()
    split = DeviceSplit(data.train, data, torch.device("cpu"))
    seen = torch.cat([b.index for b in split.batches(100, shuffle=True,
                                                     order_generator=torch.Generator().manual_seed(0))])
    assert sorted(seen.tolist()) == list(range(len(data.train)))
    full = next(split.batches(len(data.train), shuffle=False))
    assert abs(full.x.mean().item()) < 1e-3 and abs(full.x.std().item() - 1) < 0.05


def test_channels_last_batches_hold_the_same_images():
    data = bundle()
    data.train.x = np.random.default_rng(0).integers(0, 256, (len(data.train), 3, 8, 8), dtype=np.uint8)
    data.mean, data.std = (0.5, 0.5, 0.5), (0.2, 0.2, 0.2)
    plain, last = (next(DeviceSplit(data.train, data, torch.device("cpu"), layout=layout)
                        .batches(16, shuffle=False, augment="crop_flip",
                                 aug_generator=torch.Generator().manual_seed(0)))
                   for layout in (torch.contiguous_format, torch.channels_last))
    assert last.x.is_contiguous(memory_format=torch.channels_last) and not last.x.is_contiguous()
    assert torch.equal(plain.x, last.x)


def test_augment_crop_and_flip_are_exact_shifts():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    g = torch.Generator().manual_seed(0)
    flipped = augment_batch(x, "flip", g)
    for i in range(2):  # each image is itself or its mirror
        assert torch.equal(flipped[i], x[i]) or torch.equal(flipped[i], x[i].flip(-1))
    cropped = augment_batch(x, "crop", torch.Generator().manual_seed(1))
    pad = 1  # 8 // 8
    padded = torch.nn.functional.pad(x, (pad,) * 4)
    for i in range(2):  # each crop is some window of the zero-padded image
        windows = [padded[i, :, dy:dy + 8, dx:dx + 8] for dy in range(3) for dx in range(3)]
        assert any(torch.equal(cropped[i], w) for w in windows)
    assert cropped.shape == x.shape


def test_augmentation_default_depends_on_dataset():
    assert bundle().augment == "none"  # never flip digits


@pytest.mark.parametrize("noise_type,noise_sha", [("uniform", "4e22078b4a8ea40c"),
                                                  ("flip_to_one", "a3a2b7fbb65ad2ee")])
def test_noisy_labels_and_meta_split_are_the_same_on_every_machine(noise_type, noise_sha):
    """Pinned hashes (recorded in every results row): numpy's seeded generators are the same
    on every platform, so a seed names one set of noisy labels and one meta split anywhere."""
    cfg = parse_experiment(tiny_experiment(noise={"type": noise_type, "rate": 0.4}))
    data = build_data(cfg)
    assert (data.noise.sha, data.meta_sha) == (noise_sha, "a2994a276bc376b2")


def test_same_config_same_metrics_run_to_run():
    from raymeta.train import Trainer

    cfg = parse_experiment(tiny_experiment(method={"name": "mwnet"},
                                           noise={"type": "uniform", "rate": 0.4}))
    timing = {"epoch_seconds", "ms_per_step", "meta_step_share"}
    runs = [[{k: v for k, v in c.items() if k not in timing} for c in Trainer(cfg).fit().curves]
            for _ in range(2)]
    assert runs[0] == runs[1]


def test_long_tailed_training_split_keeps_the_meta_set_balanced():
    balanced = bundle()
    data = bundle(dataset={"name": "digits", "imbalance": 10})
    counts = np.bincount(data.train.y_clean, minlength=10)
    available = np.bincount(balanced.train.y_clean, minlength=10)
    n_max = available.max()  # class c keeps n_max * 10^(-c/9), or all it has
    expected = [min(int(available[c]), max(1, int(n_max * 10 ** (-c / 9)))) for c in range(10)]
    assert counts.tolist() == expected and counts[0] / counts[-1] >= 9.5
    assert np.bincount(data.meta.y).tolist() == [5] * 10  # per_class, as without imbalance
    assert np.array_equal(data.test.y, balanced.test.y)  # the test set is untouched
    again = bundle(dataset={"name": "digits", "imbalance": 10})
    assert np.array_equal(data.train.origin, again.train.origin)  # seeded


def test_per_class_and_rarest_third_accuracy_are_recorded():
    from raymeta.train import Trainer

    cfg = parse_experiment(tiny_experiment(dataset={"name": "digits", "imbalance": 10}))
    result = Trainer(cfg).fit()
    last = result.curves[-1]
    assert len(last["test_class_acc"]) == 10
    assert last["test_acc_rare_third"] == pytest.approx(np.mean(last["test_class_acc"][6:]), abs=1e-4)
    assert result.outcome["final_rare_third_acc"] == last["test_acc_rare_third"]
    plain = Trainer(parse_experiment(tiny_experiment())).fit()
    assert "final_rare_third_acc" not in plain.outcome and len(plain.curves[-1]["test_class_acc"]) == 10


def test_built_in_datasets_are_what_their_modules_say():
    """A built-in dataset is a module of raymeta.data.sets (found by reading the source, without
    importing it): what the registry read is what the module says when imported, every module
    names at least one dataset and has its loader, and the settings it reads are dataset
    settings. Adding a dataset touches its own module only."""
    import importlib
    from pathlib import Path

    from raymeta.config import DATASETS, DatasetConfig
    from raymeta.data import sets

    found = sets.built_ins()
    assert tuple(found) == DATASETS == tuple(sorted(DATASETS))
    modules = {p.stem for p in Path(sets.__file__).parent.glob("*.py")} - {"__init__"}
    assert {entry.module.rsplit(".", 1)[1] for entry in found.values()} == modules
    for name, entry in found.items():
        module = importlib.import_module(entry.module)
        assert name in module.NAMES and callable(module.load)
        assert entry.augment == getattr(module, "AUGMENT", "none")
        assert entry.reads == tuple(getattr(module, "READS", ()))
        assert entry.needs_root == getattr(module, "NEEDS_ROOT", True)
        assert set(entry.reads) <= set(DatasetConfig.model_fields)
    # what only some datasets read is refused elsewhere, naming them
    with pytest.raises(ConfigError, match=r"dataset\.test_fraction: dataset mnist does not read "
                                          r"it \(read by: digits, synthetic\)"):
        parse_experiment({"dataset": {"name": "mnist", "root": ".", "test_fraction": 0.2}})


def test_kmnist_reads_its_idx_files_through_the_registry(tmp_path):
    """A dataset added as one module of raymeta.data.sets (kmnist.py) is a config's dataset:
    validated by name, read from torchvision's layout, its class names its own."""
    import fixtures_formats as fx

    arrays = fx.mnist_arrays(n_train=40, n_test=20)
    fx.write_mnist(tmp_path / "KMNIST" / "raw", arrays, gz=True)
    cfg = parse_experiment({"dataset": {"name": "kmnist", "root": str(tmp_path)},
                            "meta_set": {"per_class": 1}})
    data = build_data(cfg)
    assert data.class_names[:3] == ["o", "ki", "su"] and data.num_classes == 10
    assert len(data.train.y) + len(data.meta.y) == 40 and len(data.test.y) == 20
    assert data.augment == "none"  # characters, like digits, change with a flip
    with pytest.raises(DataError, match=r"kmnist: no data found under"):
        build_data(parse_experiment({"dataset": {"name": "kmnist", "root": str(tmp_path / "none")}}))
