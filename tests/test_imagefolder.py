"""dataset.name imagefolder (train/<class>/*, test/<class>/*, optional val/), and the class
subsets and sizes of L2R's class-imbalance experiment (dataset.classes, class_fractions)."""

import numpy as np
import pytest
from fixtures_formats import write_imagefolder
from PIL import Image

from raymeta.config import parse_experiment
from raymeta.data.bundle import build_data
from raymeta.data.imagefolder import load_arrays
from raymeta.errors import ConfigError, DataError
from raymeta.train import Trainer


def folder_config(root, **dataset):
    return parse_experiment({"dataset": {"name": "imagefolder", "root": str(root), **dataset},
                             "model": {"name": "mlp", "options": {"hidden": [16]}},
                             "train": {"epochs": 2, "batch_size": 8}, "meta_set": {"per_class": 2}})


def test_jpeg_and_png_folders_train_with_imagefolder_numbering(tmp_path):
    root = write_imagefolder(tmp_path / "pets", classes=("emu", "cat", "dog"), val=True)
    data = build_data(folder_config(root, augment="none"))
    assert data.class_names == ["cat", "dog", "emu"]  # sorted, as torchvision's ImageFolder
    assert (len(data.train), len(data.meta), len(data.test)) == (30, 6, 12)
    assert data.train.x.shape[1:] == (3, 12, 12) and data.train.x.dtype == np.uint8
    # the labels are the folders' (the writer gave emu 40, cat 100, dog 160)
    means = [data.test.x[data.test.y == c].mean() for c in range(3)]
    assert np.allclose(means, [100, 160, 40], atol=3), means
    # per-channel statistics from the training split
    assert np.allclose(data.mean, data.train.x.mean(axis=(0, 2, 3)) / 255, atol=0.02)
    val = build_data(folder_config(root, augment="none").model_copy(
        update={"meta_set": parse_experiment({"meta_set": {"per_class": 2, "source": "val"}}).meta_set}))
    assert len(val.meta) == 6 and len(val.train) == 36  # the meta set from val/, train untouched
    result = Trainer(folder_config(root)).fit()
    assert result.outcome["final_test_acc"] > 0.9  # three separable colours


def test_augmentation_defaults_by_image_kind(tmp_path):
    small = build_data(folder_config(write_imagefolder(tmp_path / "small")))
    large = build_data(folder_config(write_imagefolder(tmp_path / "large", size=80)))
    grey = build_data(folder_config(write_imagefolder(tmp_path / "grey", grey=True)))
    assert (small.augment, large.augment, grey.augment) == ("crop_flip", "flip", "none")
    assert grey.train.x.shape[1] == 1  # greyscale images keep one channel


def test_the_decoded_cache_is_read_until_a_file_changes(tmp_path):
    root = write_imagefolder(tmp_path / "pets")
    first = load_arrays(root, None, None)
    cached = list((root / ".raymeta-cache").glob("*.npz"))
    assert len(cached) == 1
    # plant recognisable arrays in the cache: the next load returns them, without decoding
    np.savez(cached[0], train=np.full_like(first["train"][0], 7), test=np.full_like(first["test"][0], 7))
    assert (load_arrays(root, None, None)["train"][0] == 7).all()
    image = next((root / "train" / "cat").glob("*.png"))
    Image.fromarray(np.zeros((12, 12, 3), dtype=np.uint8)).save(image)  # a file changed
    again = load_arrays(root, None, None)
    assert not (again["train"][0] == 7).all() and (again["train"][0][0] == first["train"][0][0]).all()
    elsewhere = tmp_path / "cache"  # dataset.cache puts it elsewhere
    load_arrays(root, 8, str(elsewhere))
    assert len(list(elsewhere.glob("*.npz"))) == 1


def test_image_size_resizes_images_of_different_sizes(tmp_path):
    root = write_imagefolder(tmp_path / "pets")
    Image.fromarray(np.zeros((20, 16, 3), dtype=np.uint8)).save(root / "train" / "dog" / "big.png")
    with pytest.raises(DataError, match=r"differ in size: .*0000.jpg is 12x12, .*big.png is 16x20; "
                                        r"set dataset.image_size"):
        build_data(folder_config(root))
    data = build_data(folder_config(root, image_size=8))
    assert data.train.x.shape[2:] == (8, 8) and len(data.train) == 31


@pytest.mark.parametrize("break_it,message", [
    (lambda r: __import__("shutil").rmtree(r / "test"), "has no test/ folder"),
    (lambda r: write_imagefolder(r, classes=("yak",), per_class={"test": 2}),
     r"has class folder\(s\) yak that .*train does not have"),
    (lambda r: (r / "train" / "fox").mkdir(), r"class folder .*train/fox holds no images"),
    (lambda r: (r / "test" / "cat" / "0002.jpg").write_bytes(b"not a jpeg"),
     r"cannot read image .*test/cat/0002.jpg"),
], ids=["missing split", "class only in test", "empty class", "unreadable image"])
def test_bad_folders_are_named(tmp_path, break_it, message):
    root = write_imagefolder(tmp_path / "pets")
    break_it(root)
    with pytest.raises(DataError, match=message):
        build_data(folder_config(root))


def test_class_subsets_and_fractions_make_l2rs_imbalance_split():
    cfg = parse_experiment({"dataset": {"name": "digits", "classes": [4, 9], "train_size": 100,
                                        "class_fractions": [0.05, 0.95]},
                            "meta_set": {"per_class": 5}, "seed": 3})
    data = build_data(cfg)
    assert data.num_classes == 2 and data.class_names == ["4", "9"]
    assert np.bincount(data.train.y_clean).tolist() == [5, 95]
    assert np.bincount(data.meta.y).tolist() == [5, 5]  # the meta set stays balanced
    test_counts = np.bincount(data.test.y)
    assert test_counts.sum() == len(data.test) and abs(test_counts[0] - test_counts[1]) <= 2
    again = build_data(cfg)
    assert (again.train.origin == data.train.origin).all()  # the seed fixes the subset
    with pytest.raises(ConfigError, match="asks for 95 training samples of class 1, but only"):
        build_data(parse_experiment({"dataset": {"name": "digits", "classes": [4, 9], "train_size": 100,
                                                 "class_fractions": [0.05, 0.95]},
                                     "meta_set": {"per_class": 100}}))
    with pytest.raises(ConfigError, match=r"names class 12, but digits has 10 classes \(0..9\)"):
        build_data(parse_experiment({"dataset": {"name": "digits", "classes": [4, 12]}}))
    with pytest.raises(ConfigError, match="class_fractions and dataset.train_size go together"):
        parse_experiment({"dataset": {"class_fractions": [0.5, 0.5]}})
