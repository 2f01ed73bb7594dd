"""TinyImageNet-200 from its original folder of JPEGs, decoded once and then cached."""

from __future__ import annotations

import warnings
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from poisonreach.data.files import Archive, Known, ensure_extracted
from poisonreach.io import atomic_write
from poisonreach.data.splits import Pool, labels, unit_pixels
from poisonreach.errors import CorruptFileError, DatasetNotFoundError

SUB, TOP = "tinyimagenet", "tiny-imagenet-200"
ARCHIVE = Archive("tiny-imagenet-200.zip", "http://cs231n.stanford.edu/tiny-imagenet-200.zip",
                  Known(248100043, "90528d7ca1a48142e341f4ef8d21d0de"))
NEEDED = ["wnids.txt", "train", "val/val_annotations.txt", "val/images"]
# Decoding 110,000 JPEGs takes minutes; the decoded uint8 arrays load in seconds.
CACHE = "cache-tiny-imagenet-200-uint8.npz"
_KEYS = ("x_train", "y_train", "x_test", "y_test")
SIZE = 64


def load(root: Path, download: bool) -> Pool:
    """The train folder (to be split) and the val folder (the test split) as (N, 3, 64, 64)
    floats in [0, 1]; a class's index is its wnid's position in sorted wnids.txt."""
    folder = ensure_extracted("tinyimagenet", root, SUB, TOP, NEEDED, ARCHIVE, download)
    wnids = _wnids(folder)
    train, test = _train_listing(folder, wnids), _val_listing(folder, wnids)
    cache = root / SUB / CACHE
    arrays = _read_cache(cache, _sources_mtime(folder, wnids), (len(train), len(test)))
    if arrays is None:
        arrays = (*_decode(train), *_decode(test))
        _write_cache(cache, arrays)
    x_train, y_train, x_test, y_test = arrays
    return Pool(unit_pixels(x_train), labels(y_train), unit_pixels(x_test), labels(y_test))


def _wnids(folder: Path) -> list[str]:
    wnids = sorted({line.strip() for line in (folder / "wnids.txt").read_text().splitlines()} - {""})
    if not wnids:
        raise CorruptFileError(f"{folder / 'wnids.txt'} lists no classes; re-extract "
                               f"{ARCHIVE.name}")
    return wnids


def _train_listing(folder: Path, wnids: list[str]) -> list[tuple[Path, int]]:
    """(image, class) for every training JPEG, in a fixed order."""
    items = []
    for index, wnid in enumerate(wnids):
        images = folder / "train" / wnid / "images"
        if not images.is_dir():
            raise DatasetNotFoundError(f"tinyimagenet: {images} is missing although wnids.txt lists "
                                       f"{wnid}; re-extract {ARCHIVE.name} into {folder.parent}")
        items += [(path, index) for path in sorted(images.glob("*.JPEG"))]
    return items


def _val_listing(folder: Path, wnids: list[str]) -> list[tuple[Path, int]]:
    """(image, class) for every line of val_annotations.txt (filename, wnid, box, tab-separated)."""
    annotations = folder / "val" / "val_annotations.txt"
    index = {wnid: i for i, wnid in enumerate(wnids)}
    items = []
    for number, line in enumerate(annotations.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2 or fields[1] not in index:
            raise CorruptFileError(f"{annotations} line {number} does not name an image and a "
                                   f"wnid from wnids.txt: {line!r}; re-extract {ARCHIVE.name}")
        items.append((folder / "val" / "images" / fields[0], index[fields[1]]))
    return items


def _sources_mtime(folder: Path, wnids: list[str]) -> int:
    """Latest change to the lists and image folders (a folder changes when images come or go)."""
    paths = [folder / "wnids.txt", folder / "val" / "val_annotations.txt", folder / "val" / "images",
             *(folder / "train" / wnid / "images" for wnid in wnids)]
    return max(path.stat().st_mtime_ns for path in paths)


def _decode(items: list[tuple[Path, int]]) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (N, 3, 64, 64) and int64 labels of ``items``."""
    images = np.empty((len(items), 3, SIZE, SIZE), dtype=np.uint8)
    for i, (path, _) in enumerate(items):
        images[i] = _decode_image(path)
    return images, np.array([label for _, label in items], dtype=np.int64)


def _decode_image(path: Path) -> np.ndarray:
    """One JPEG as uint8 (3, 64, 64); grey images are converted to RGB."""
    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
    except FileNotFoundError as err:
        raise DatasetNotFoundError(f"tinyimagenet: {path} is missing; re-extract "
                                   f"{ARCHIVE.name}") from err
    except OSError as err:
        raise CorruptFileError(f"cannot decode {path} ({err}); re-extract {ARCHIVE.name}") from err
    if rgb.size != (SIZE, SIZE):
        raise CorruptFileError(f"{path} is {rgb.size[0]}x{rgb.size[1]}, not {SIZE}x{SIZE}: it is "
                               f"not a TinyImageNet image; re-extract {ARCHIVE.name}")
    return np.asarray(rgb).transpose(2, 0, 1)


def _read_cache(cache: Path, sources_mtime: int,
                counts: tuple[int, int]) -> tuple[np.ndarray, ...] | None:
    """The cached arrays if the cache is newer than the sources and fits them, else None."""
    try:
        if cache.stat().st_mtime_ns <= sources_mtime:
            return None
        with np.load(cache) as stored:
            arrays = tuple(stored[key] for key in _KEYS)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None  # absent or damaged: it is only a cache, so decode again
    x_train, y_train, x_test, y_test = arrays
    fits = (x_train.shape == (counts[0], 3, SIZE, SIZE) and x_test.shape == (counts[1], 3, SIZE, SIZE)
            and x_train.dtype == x_test.dtype == np.uint8
            and y_train.shape == (counts[0],) and y_test.shape == (counts[1],))
    return arrays if fits else None


def _write_cache(cache: Path, arrays: tuple[np.ndarray, ...]) -> None:
    try:
        with atomic_write(cache) as (out, _):
            np.savez(out, **dict(zip(_KEYS, arrays)))
    except OSError as err:  # a read-only data root still loads, only slower next time
        warnings.warn(f"could not write the TinyImageNet cache {cache} ({err}); the JPEGs will be "
                      "decoded again on the next load", stacklevel=3)
