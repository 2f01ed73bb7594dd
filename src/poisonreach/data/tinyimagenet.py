"""TinyImageNet-200 from its original folder of JPEGs, decoded once and then cached.

The cache is two files beside the folder: the images as one raw ``.npy`` (the training images, then
the test images; uint8 (110000, 3, 64, 64), 1.35 GB), which later loads memory-map read-only, and
their labels in a small ``.npz``. The operating system pages the images in as rows are read, so a
load costs a fraction of a second and holds no float copy (reading the earlier ``.npz`` cache into
float32 tensors took 44 s and 10.4 GB of peak resident memory). A cache of that earlier format (one
``.npz`` of four arrays, which cannot be memory-mapped) is read once, written in the new format and
deleted.
"""

from __future__ import annotations

import warnings
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from poisonreach.data.files import Archive, Known, ensure_extracted
from poisonreach.io import atomic_write
from poisonreach.data.splits import Pool, labels
from poisonreach.rows import UInt8Images
from poisonreach.errors import CorruptFileError, DatasetNotFoundError

SUB, TOP = "tinyimagenet", "tiny-imagenet-200"
ARCHIVE = Archive("tiny-imagenet-200.zip", "http://cs231n.stanford.edu/tiny-imagenet-200.zip",
                  Known(248100043, "90528d7ca1a48142e341f4ef8d21d0de"))
NEEDED = ["wnids.txt", "train", "val/val_annotations.txt", "val/images"]
# Decoding 110,000 JPEGs takes minutes; the decoded uint8 images are memory-mapped at once.
CACHE = "cache-tiny-imagenet-200-uint8.npy"  # the training images, then the test images
LABELS = "cache-tiny-imagenet-200-labels.npz"  # y_train, y_test
OLD_CACHE = "cache-tiny-imagenet-200-uint8.npz"  # the earlier cache: x_train, y_train, x_test, y_test
_KEYS = ("x_train", "y_train", "x_test", "y_test")
SIZE = 64


def load(root: Path, download: bool) -> Pool:
    """The train folder (to be split) and the val folder (the test split) as (N, 3, 64, 64)
    images served as floats in [0, 1] (:class:`~poisonreach.rows.UInt8Images`), memory-mapped from
    the cache; a class's index is its wnid's position in sorted wnids.txt."""
    folder = ensure_extracted("tinyimagenet", root, SUB, TOP, NEEDED, ARCHIVE, download)
    wnids = _wnids(folder)
    train, test = _train_listing(folder, wnids), _val_listing(folder, wnids)
    counts, sources_mtime = (len(train), len(test)), _sources_mtime(folder, wnids)
    arrays = _read_cache(root / SUB, sources_mtime, counts)
    if arrays is None:
        old = root / SUB / OLD_CACHE
        arrays = _read_old_cache(old, sources_mtime, counts)
        if arrays is None:
            images, y = _decode(train + test)
            arrays = (images[: len(train)], y[: len(train)], images[len(train):], y[len(train):])
        if _write_cache(root / SUB, arrays):
            old.unlink(missing_ok=True)  # converted (or superseded): 1.35 GB the new cache holds
            arrays = _read_cache(root / SUB, sources_mtime, counts) or arrays  # mapped: the in-memory copy goes
    x_train, y_train, x_test, y_test = arrays
    return Pool(UInt8Images(x_train), labels(y_train), UInt8Images(x_test), labels(y_test))


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


_DAMAGED = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile)  # absent or damaged: only a cache


def _read_cache(folder: Path, sources_mtime: int, counts: tuple[int, int]) -> tuple[np.ndarray, ...] | None:
    """(x_train, y_train, x_test, y_test), the images memory-mapped read-only, if both cache files
    in ``folder`` are newer than the sources and fit them, else None."""
    try:
        if min((folder / name).stat().st_mtime_ns for name in (CACHE, LABELS)) <= sources_mtime:
            return None
        images = np.load(folder / CACHE, mmap_mode="r")
        with np.load(folder / LABELS) as stored:
            y_train, y_test = stored["y_train"], stored["y_test"]
    except _DAMAGED:
        return None
    if images.shape != (sum(counts), 3, SIZE, SIZE):
        return None
    return _fitting((images[: counts[0]], y_train, images[counts[0]:], y_test), counts)


def _read_old_cache(cache: Path, sources_mtime: int, counts: tuple[int, int]) -> tuple[np.ndarray, ...] | None:
    """The arrays of an earlier-format cache (one .npz, read into memory) if it is newer than the
    sources and fits them, else None."""
    try:
        if cache.stat().st_mtime_ns <= sources_mtime:
            return None
        with np.load(cache) as stored:
            arrays = tuple(stored[key] for key in _KEYS)
    except _DAMAGED:
        return None
    return _fitting(arrays, counts)


def _fitting(arrays: tuple[np.ndarray, ...], counts: tuple[int, int]) -> tuple[np.ndarray, ...] | None:
    """``arrays`` (x_train, y_train, x_test, y_test) if they are uint8 images and labels of ``counts``."""
    x_train, y_train, x_test, y_test = arrays
    fits = (x_train.shape == (counts[0], 3, SIZE, SIZE) and x_test.shape == (counts[1], 3, SIZE, SIZE)
            and x_train.dtype == x_test.dtype == np.uint8
            and y_train.shape == (counts[0],) and y_test.shape == (counts[1],))
    return arrays if fits else None


def _write_cache(folder: Path, arrays: tuple[np.ndarray, ...]) -> bool:
    """Write the cache files into ``folder``, each atomically: the images first (streamed, the
    training then the test images, without concatenating them), then the labels. Whether it
    worked; a read-only data root still loads, only slower next time."""
    x_train, y_train, x_test, y_test = arrays
    try:
        with atomic_write(folder / CACHE) as (out, _):
            header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                      "shape": (len(x_train) + len(x_test), *x_train.shape[1:])}
            np.lib.format.write_array_header_1_0(out, header)
            for part in (x_train, x_test):
                out.write(memoryview(np.ascontiguousarray(part)).cast("B"))
        with atomic_write(folder / LABELS) as (out, _):
            np.savez(out, y_train=y_train, y_test=y_test)
    except OSError as err:
        warnings.warn(f"could not write the TinyImageNet cache {folder / CACHE} ({err}); the images will be "
                      "decoded again on the next load", stacklevel=3)
        return False
    return True
