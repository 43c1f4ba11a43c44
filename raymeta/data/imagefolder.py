"""Your own images as a dataset: `root/train/<class>/*`, `root/test/<class>/*` and, optionally,
`root/val/<class>/*` (the layout of WebVision, Food-101N and ANIMAL-10N once unpacked, and of
torchvision's ImageFolder). Classes are the train split's folder names in sorted order, numbered
as ImageFolder numbers them. Every image is decoded once into uint8 arrays, kept in a cache
file keyed by the files' names, sizes and modification times, so a second run starts at once.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np

from raymeta.data.formats import resize_center_crop
from raymeta.errors import DataError

EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
"""the image files a class folder may hold (torchvision's list); other files are skipped"""
CACHE_VERSION = 1


def _images(folder: Path) -> list[Path]:
    with os.scandir(folder) as entries:  # scandir: no stat per file to tell files from folders
        names = sorted(e.name for e in entries
                       if e.is_file() and os.path.splitext(e.name)[1].lower() in EXTENSIONS)
    return [folder / name for name in names]


def list_split(root: Path, split: str, classes: list[str] | None) -> tuple[list[Path], np.ndarray, list[str]]:
    """The image paths and labels of one split; `classes`: the train split's, which every
    other split's class folders must be among."""
    folder = root / split
    if not folder.is_dir():
        raise DataError(f"imagefolder {root} has no {split}/ folder; the layout is "
                        f"{root}/train/<class>/*.jpg and {root}/test/<class>/*.jpg (val/ optional)")
    found = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if not found:
        raise DataError(f"imagefolder {folder} holds no class folders; put each class's images "
                        f"in {folder}/<class name>/")
    if classes is None:
        classes = found
    elif unknown := [c for c in found if c not in classes]:
        raise DataError(f"imagefolder {folder} has class folder(s) {', '.join(unknown)} that "
                        f"{root}/train does not have; every class must have training images "
                        f"(train has: {', '.join(classes)})")
    paths, labels = [], []
    for name in found:
        files = _images(folder / name)
        if not files:
            raise DataError(f"imagefolder class folder {folder / name} holds no images "
                            f"({', '.join(EXTENSIONS)}); add images or remove the folder")
        paths += files
        labels += [classes.index(name)] * len(files)
    return paths, np.asarray(labels, dtype=np.int64), classes


def decode(paths: list[Path], size: int | None) -> np.ndarray:
    """uint8 (N, C, H, W): C = 1 when every image is greyscale, else 3 (RGB). With `size`, the
    shorter side is resized to it and the center cropped to size x size; without, every image
    must have the first one's size."""
    from PIL import Image

    out, grey, first = None, True, None
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as im:
                im.load()
                grey &= im.mode in ("1", "L", "I;16", "I")
                rgb = im.convert("RGB")
                pixels = np.asarray(rgb if size is None else resize_center_crop(rgb, size))
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            raise DataError(f"cannot read image {path} ({err}): it is missing, truncated or "
                            f"corrupt; replace or remove it") from None
        if out is None:
            first = (path, pixels.shape)
            h, w, c = pixels.shape  # filled channels first: no second full-size copy at the end
            out = np.empty((len(paths), c, h, w), dtype=np.uint8)
        elif pixels.shape != first[1]:
            (h0, w0, _), (h, w, _) = first[1], pixels.shape
            raise DataError(f"imagefolder images differ in size: {first[0]} is {w0}x{h0}, {path} "
                            f"is {w}x{h}; set dataset.image_size: N to resize them all (shorter "
                            f"side to N, then a center crop to N x N)")
        out[i] = pixels.transpose(2, 0, 1)
    return out[:, :1].copy() if grey else out


def _fingerprint(root: Path, split_paths: dict[str, list[Path]], size: int | None) -> str:
    h = hashlib.sha256(f"v{CACHE_VERSION} size={size}".encode())
    skip = len(str(root)) + 1  # names relative to root: a moved folder keeps its cache
    for paths in split_paths.values():
        for p in paths:
            st = os.stat(p)
            h.update(f"{str(p)[skip:]}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _cache_file(root: Path, cache: str | None, size: int | None, key: str) -> Path:
    """Where the decoded arrays live: `cache`, else root/.raymeta-cache, else (root read-only)
    ~/.cache/raymeta."""
    if cache is not None:
        folder = Path(cache).expanduser()
    elif os.access(root, os.W_OK):
        folder = root / ".raymeta-cache"
    else:
        folder = Path.home() / ".cache" / "raymeta" / "imagefolder"
    return folder / f"{root.name}-{size or 'own'}-{key}.npz"


def load_arrays(root: Path, size: int | None, cache: str | None) -> dict:
    """Decoded splits, from the cache when the files have not changed: {split: (x, y)},
    and the class names."""
    train, train_y, classes = list_split(root, "train", None)
    split_paths, labels = {"train": train}, {"train": train_y}
    for split in ("test", "val"):
        if split == "val" and not (root / "val").is_dir():
            continue
        split_paths[split], labels[split], _ = list_split(root, split, classes)
    file = _cache_file(root, cache, size, _fingerprint(root, split_paths, size))
    if file.is_file():
        try:
            with np.load(file, allow_pickle=False) as stored:
                return {"classes": classes, **{s: (stored[s], labels[s]) for s in split_paths}}
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache is decoded again
    arrays = {s: decode(paths, size) for s, paths in split_paths.items()}
    channels = {a.shape[1] for a in arrays.values()}
    if len(channels) > 1:  # a greyscale split beside a colour one: colour everywhere
        arrays = {s: np.repeat(a, 3, axis=1) if a.shape[1] == 1 else a for s, a in arrays.items()}
    shapes = {a.shape[2:] for a in arrays.values()}
    if len(shapes) > 1:
        raise DataError(f"imagefolder splits differ in image size ({', '.join(f'{s}: {a.shape[3]}x{a.shape[2]}' for s, a in arrays.items())}); "
                        f"set dataset.image_size: N to resize them all")
    try:  # written whole, then renamed: a reader never sees half a cache
        file.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=file.parent, suffix=".npz", delete=False) as tmp:
            np.savez(tmp, **arrays)
        os.replace(tmp.name, file)
        for stale in file.parent.glob(f"{file.name.rsplit('-', 1)[0]}-*.npz"):
            if stale != file:  # the same folder and size before its files changed
                stale.unlink(missing_ok=True)
    except OSError:
        pass  # no cache then: the next run decodes again
    return {"classes": classes, **{s: (arrays[s], labels[s]) for s in split_paths}}


def load_imagefolder(root: Path, size: int | None, cache: str | None):
    from raymeta.data.datasets import RawData

    data = load_arrays(Path(root), size, cache)
    val = data.get("val", (None, None))
    return RawData(*data["train"], *data["test"], len(data["classes"]), data["classes"],
                   val_x=val[0], val_y=val[1])
