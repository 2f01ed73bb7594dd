"""Data sets for poisoning experiments, loaded into seeded train/validation/test splits.

    splits = load("mnist", root="../shared/data", seed=0)
    splits.x_train.shape  # (42000, 1, 28, 28), pixels in [0, 1]

Files are looked up below the data root (see :func:`data_root`) in their original published
formats, and are never downloaded unless ``download=True``:

    mnist/                 train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte,
                           t10k-labels-idx1-ubyte, each gzip-compressed (.gz) or not (also mnist17)
    fashion-mnist/         the same four files, else /usr/share/datasets/fashion-mnist/ (Debian's
                           package dataset-fashion-mnist)
    cifar10/               cifar-10-batches-py/ or cifar-10-python.tar.gz
    tinyimagenet/          tiny-imagenet-200/ or tiny-imagenet-200.zip; a decoded cache is kept here

digits, or2d, gaussian10 and regression2d need no files. The original training set is split into
train and validation (``val_fraction`` of it, by a permutation seeded with ``seed``); the original
test set is the test split.

A user's own data set is named by its path instead, ``npz:PATH`` (arrays x, y and optionally
x_test, y_test) or ``folder:PATH`` (one sub-folder of PNG/JPEG images per class), and split the
same way (:mod:`poisonreach.data.user`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from poisonreach.data import cifar, idx, synthetic, tinyimagenet, user
from poisonreach.data.files import data_root
from poisonreach.data.splits import Pool, Splits, check_fraction, check_seed, make_splits
from poisonreach.errors import PoisonReachError

__all__ = ["Splits", "check_name", "data_root", "load", "names"]


class _Entry(NamedTuple):
    read: Callable[[Path, int, bool], Pool]  # (data root, seed, download)
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    task: str = "classification"
    whole_train: bool = False  # no validation split: the set's proportions are the point (toy)


_TABULAR = {"mean": (0.0,), "std": (1.0,)}  # tabular inputs are used as they are

_REGISTRY: dict[str, _Entry] = {
    # mean and std of all 1,797 digits images, pixels divided by 16.
    "digits": _Entry(lambda root, seed, download: synthetic.digits(), 10, (0.3053,), (0.3760,)),
    "mnist": _Entry(lambda root, seed, download: idx.load(idx.MNIST, root, download),
                    10, (0.1307,), (0.3081,)),
    "mnist17": _Entry(lambda root, seed, download: idx.load_pair(root, download, (1, 7)),
                      2, (0.1307,), (0.3081,)),
    "fashion-mnist": _Entry(lambda root, seed, download: idx.load(idx.FASHION_MNIST, root, download),
                            10, (0.2860,), (0.3530,)),
    "cifar10": _Entry(lambda root, seed, download: cifar.load(root, download),
                      10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "tinyimagenet": _Entry(lambda root, seed, download: tinyimagenet.load(root, download),
                           200, (0.4802, 0.4481, 0.3975), (0.2770, 0.2691, 0.2821)),
    "or2d": _Entry(lambda root, seed, download: synthetic.or2d(seed), 2, **_TABULAR),
    "gaussian10": _Entry(lambda root, seed, download: synthetic.gaussian10(seed), 2, **_TABULAR),
    "toy": _Entry(lambda root, seed, download: synthetic.toy(), 2, **_TABULAR, whole_train=True),
    "regression2d": _Entry(lambda root, seed, download: synthetic.regression2d(seed), 1,
                           **_TABULAR, task="regression"),
}


def names() -> list[str]:
    """The names :func:`load` accepts (besides ``npz:PATH`` and ``folder:PATH``)."""
    return sorted(_REGISTRY)


def check_name(name: str) -> None:
    """Raise a PoisonReachError unless :func:`load` knows ``name``, or it is ``npz:PATH`` or
    ``folder:PATH`` of an existing file or folder (read only by :func:`load`)."""
    if user.is_spec(name):
        user.path_of(name)
    elif not isinstance(name, str) or name not in _REGISTRY:
        raise PoisonReachError(f"unknown data set {name!r}: the dataset must be one of {', '.join(names())}, or your own as "
                               "npz:PATH or folder:PATH")


def load(name: str, *, root: str | os.PathLike | None = None, seed: int = 0,
         val_fraction: float = 0.3, download: bool = False) -> Splits:
    """Load data set ``name`` (a name of :func:`names`, ``npz:PATH`` or ``folder:PATH``) split into
    train, validation and test.

    ``root`` is the data root (default: $POISONREACH_DATA, else ~/.cache/poisonreach); ``seed``
    fixes the train/validation split and the draws of synthetic sets; ``download`` fetches
    missing files from their published URLs (neither applies to a user's own set). Same
    arguments, identical tensors.
    """
    check_fraction(val_fraction)
    check_seed(seed)
    if user.is_spec(name):
        own = user.read(name)
        return make_splits(name, own.pool, num_classes=own.num_classes, mean=own.mean, std=own.std, task="classification",
                           seed=seed, val_fraction=val_fraction)
    entry = _REGISTRY.get(name) if isinstance(name, str) else None
    if entry is None:
        check_name(name)
    pool = entry.read(data_root(root), seed, download)
    return make_splits(name, pool, num_classes=entry.num_classes, mean=entry.mean, std=entry.std,
                       task=entry.task, seed=seed, val_fraction=None if entry.whole_train else val_fraction)
