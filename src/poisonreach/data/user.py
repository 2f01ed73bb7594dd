"""A user's own data set: ``npz:PATH`` (an archive of arrays) or ``folder:PATH`` (images by class).

    data.load("npz:mydata.npz", seed=0)      # x, y and optionally x_test, y_test
    data.load("folder:photos", seed=0)       # photos/<class>/*.png|jpg|jpeg

**npz.** ``x`` holds images, uint8 (0-255, divided by 255) or floating point in [0, 1], shaped
(N, H, W) (grayscale), (N, C, H, W) or (N, H, W, C) with C = 1 or 3 channels: channels last when
the last dimension is 1 or 3 and the second is not, channels first otherwise. ``y`` holds N
integer classes 0 … C − 1 (whole-numbered floats are accepted). ``x_test`` and ``y_test``, both or
neither, are the test split; without them a fixed 20% of the points is (as for ``digits``). The
archive is read with ``allow_pickle=False``.

**folder.** One sub-folder per class, holding that class's PNG or JPEG images (``.png``, ``.jpg``,
``.jpeg``; other files and hidden folders are ignored); the class index is the folder's position
among the sorted folder names. Every image must be 8-bit grayscale (L) or RGB, and all of one mode
and size. A fixed 20% is the test split.

Either way the rest is split into train and validation as for the named sets (``val_fraction``,
seeded with ``seed``), and the per-channel mean and standard deviation of the images before that
split are the ``mean`` and ``std`` models normalise with. Relative paths are read from the working
folder. Every problem (missing keys, wrong shapes, values outside [0, 1], an empty folder, an
unreadable image) is one PoisonReachError naming it and the fix.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from poisonreach import io
from poisonreach.data.splits import Pool, hold_out_test, labels
from poisonreach.rows import unit_pixels
from poisonreach.errors import CorruptFileError, DatasetNotFoundError, PoisonReachError
from poisonreach.validation import check_values

KINDS = ("npz", "folder")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
CHANNELS = (1, 3)


class UserData(NamedTuple):
    """What :func:`read` gives :func:`poisonreach.data.load`: the pool and what models need of it."""

    pool: Pool
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


def is_spec(name) -> bool:
    """Whether ``name`` is ``npz:PATH`` or ``folder:PATH`` rather than a named data set."""
    return isinstance(name, str) and name.partition(":")[0] in KINDS and ":" in name


def spec_of(path: str | Path) -> str:
    """The spec :func:`poisonreach.data.load` reads the data set at ``path`` by: ``npz:PATH`` for a
    file, ``folder:PATH`` for a folder."""
    path = Path(path)
    if not path.exists():
        raise DatasetNotFoundError(f"no file or folder {path.absolute()}: give an .npz archive or a folder of class folders")
    return f"{'folder' if path.is_dir() else 'npz'}:{path}"


def path_of(spec: str) -> Path:
    """The path of ``npz:PATH`` or ``folder:PATH``, checked to exist as a file or a folder."""
    kind, _, text = spec.partition(":")
    path = Path(text).expanduser()
    if not text:
        raise PoisonReachError(f"data set {spec!r} names no path: give {kind}:PATH")
    if kind == "npz" and not path.is_file():
        raise DatasetNotFoundError(f"data set {spec}: no file {path.absolute()}; give the path of an .npz archive "
                                   "(relative paths start in the working folder)")
    if kind == "folder" and not path.is_dir():
        raise DatasetNotFoundError(f"data set {spec}: no folder {path.absolute()}; give a folder holding one sub-folder "
                                   "of images per class (relative paths start in the working folder)")
    return path


def read(spec: str) -> UserData:
    """The data set ``spec`` names (see the module's docstring), checked."""
    path = path_of(spec)
    pool = read_npz(path) if spec.startswith("npz:") else read_folder(path)
    x = pool.x_train.double()
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3))
    std = torch.where(std > 0, std, torch.ones_like(std))  # a constant channel: nothing to scale
    num_classes = int(max(pool.y_train.max(), pool.y_test.max())) + 1
    return UserData(pool, num_classes, tuple(mean.tolist()), tuple(std.tolist()))


def read_npz(path: Path) -> Pool:
    """The pool of an npz data set: its test split, or a fixed 20% held out."""
    arrays = io.load_npz(path)
    missing = [k for k in ("x", "y") if k not in arrays]
    if missing:
        raise PoisonReachError(f"{path} has no {' and no '.join(missing)} (it holds {', '.join(sorted(arrays)) or 'nothing'}): "
                               "save the images as x and their classes as y, numpy.savez(FILE, x=..., y=...) "
                               "(and x_test=..., y_test=... for a test split)")
    test = [k for k in ("x_test", "y_test") if k in arrays]
    if len(test) == 1:
        raise PoisonReachError(f"{path} has {test[0]} but not {({'x_test', 'y_test'} - set(test)).pop()}: give both or neither")
    x = _images(path, "x", arrays["x"])
    y = _classes(path, "y", arrays["y"], len(x))
    if len(set(y.tolist())) < 2:
        raise PoisonReachError(f"{path}: y holds one class only: a classifier needs examples of at least two")
    if not test:
        return hold_out_test(x, y)
    x_test = _images(path, "x_test", arrays["x_test"])
    if x_test.shape[1:] != x.shape[1:]:
        raise PoisonReachError(f"{path}: x_test images are {tuple(x_test.shape[1:])} but x images {tuple(x.shape[1:])}: "
                               "give both in one shape and layout")
    return Pool(x, y, x_test, _classes(path, "y_test", arrays["y_test"], len(x_test)))


def _images(path: Path, name: str, a: np.ndarray) -> torch.Tensor:
    """Array ``name`` as float32 images N × C × H × W in [0, 1]."""
    shape = a.shape
    if a.ndim == 3:
        a = a[:, None]
    elif a.ndim == 4 and shape[3] in CHANNELS and shape[1] not in CHANNELS:
        a = a.transpose(0, 3, 1, 2)  # channels last
    elif a.ndim != 4 or shape[1] not in CHANNELS:
        raise PoisonReachError(f"{path}: {name} has shape {shape}; give images as (N, H, W), (N, C, H, W) or (N, H, W, C) "
                               f"with C = 1 or 3 channels (e.g. x.reshape(-1, 1, 28, 28) for flattened 28×28 images)")
    if len(a) == 0:
        raise PoisonReachError(f"{path}: {name} holds no images: give at least one per class")
    if a.dtype == np.uint8:
        return unit_pixels(np.ascontiguousarray(a))
    if a.dtype.kind != "f":
        raise PoisonReachError(f"{path}: {name} is {a.dtype}; give uint8 pixels (0-255) or floats in [0, 1]")
    x = torch.from_numpy(np.ascontiguousarray(a)).to(torch.float32)
    check_values(x, str(path), name, f"{name} image", (0.0, 1.0), "[0, 1]: store 8-bit pixels as uint8, or divide them by 255")
    return x


def _classes(path: Path, name: str, a: np.ndarray, n: int) -> torch.Tensor:
    """Array ``name`` as n int64 classes ≥ 0."""
    if a.ndim != 1 or len(a) != n:
        raise PoisonReachError(f"{path}: {name} has shape {a.shape} but there are {n} images: give one integer class per "
                               f"image, shape ({n},)")
    if a.dtype.kind not in "iuf" or (a.dtype.kind == "f" and not (np.isfinite(a).all() and np.array_equal(a, np.round(a)))):
        raise PoisonReachError(f"{path}: {name} is {a.dtype}{' with non-integer values' if a.dtype.kind == 'f' else ''}; "
                               "give integer classes 0, 1, …")
    if len(a) and a.min() < 0:
        raise PoisonReachError(f"{path}: {name} holds the negative class {a.min():g}; give classes 0, 1, …")
    return labels(a)


def read_folder(path: Path) -> Pool:
    """The pool of a folder data set, one sub-folder per class; a fixed 20% is the test split."""
    classes = sorted(d for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))
    if len(classes) < 2:
        raise PoisonReachError(f"{path} holds {len(classes)} class folder(s) ({', '.join(d.name for d in classes) or 'none'}): "
                               "put each class's PNG or JPEG images in a sub-folder of its own, at least two classes")
    files, y = [], []
    for index, folder in enumerate(classes):
        images = sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise PoisonReachError(f"{folder} holds no PNG or JPEG images ({', '.join(IMAGE_SUFFIXES)}): put the class's images "
                                   "directly in it, or remove the folder")
        files += images
        y += [index] * len(images)
    x = read_images(files, str(path))
    return hold_out_test(unit_pixels(x), labels(np.array(y)))


def read_image(path: Path) -> np.ndarray:
    """One 8-bit grayscale or RGB image as uint8 C × H × W."""
    try:
        with Image.open(path) as image:
            mode, pixels = image.mode, np.asarray(image)
    except FileNotFoundError:
        raise PoisonReachError(f"{path} does not exist") from None
    except (UnidentifiedImageError, OSError) as e:
        raise CorruptFileError(f"{path} is not a readable image ({e}): replace or remove it") from None
    if mode not in ("L", "RGB"):
        raise PoisonReachError(f"{path} is a {mode} image: give 8-bit grayscale (L) or RGB images (e.g. PIL's "
                               "image.convert('RGB'))")
    return pixels[None] if mode == "L" else pixels.transpose(2, 0, 1)


def read_images(paths: Iterable[Path], where: str) -> np.ndarray:
    """The images at ``paths`` (:func:`read_image`) stacked as uint8 N × C × H × W; they must share
    one mode and size (``where`` names them in the error)."""
    images, first = [], None
    for path in paths:
        image = read_image(path)
        if first is None:
            first = (path, image.shape)
        elif image.shape != first[1]:
            raise PoisonReachError(f"the images of {where} differ in mode or size: {first[0]} is {_describe(first[1])}, "
                                   f"{path} {_describe(image.shape)}; give them all one mode and size")
        images.append(image)
    return np.stack(images) if images else np.zeros((0,), np.uint8)


def _describe(shape: tuple[int, ...]) -> str:
    channels, height, width = shape
    return f"{'grayscale' if channels == 1 else 'RGB'} {width}×{height}"
