"""The train/validation/test splits every loader returns, and the seeded split that makes them."""

from __future__ import annotations

import dataclasses
import numbers
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from poisonreach.errors import PoisonReachError
from poisonreach.rows import Rows, select_rows


class Pool(NamedTuple):
    """What a loader reads: the original training set (to be split) and the original test set.
    Images read from bytes stay bytes (:class:`~poisonreach.rows.UInt8Images`)."""

    x_train: Tensor | Rows
    y_train: Tensor
    x_test: Tensor | Rows
    y_test: Tensor


@dataclasses.dataclass(frozen=True)
class Splits:
    """A data set split into train, validation and test tensors.

    Images are float32 in [0, 1] with shape (N, C, H, W); tabular sets are float32 (N, d). The
    images of MNIST, Fashion-MNIST, CIFAR-10 and TinyImageNet are :class:`~poisonreach.rows.Rows`
    that store their bytes and serve float32 rows (bit for bit what a float32 tensor would hold),
    so no split is ever a dense float copy: ``x[i]``, ``x[a:b]``, ``x[index]`` are tensors, and
    :func:`poisonreach.rows.dense` makes the whole split one when a consumer needs it. Labels
    are int64 for classification and float32 for regression. ``mean`` and ``std`` (per channel, or
    (0.0,) and (1.0,) for tabular sets) are for models to normalise their input themselves, so
    poisoned points stay in pixel space. ``train_index`` is each training row's position in the
    original training set (its file order), None when unknown.
    """

    name: str
    x_train: Tensor | Rows
    y_train: Tensor
    x_val: Tensor | Rows
    y_val: Tensor
    x_test: Tensor | Rows
    y_test: Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    task: str
    train_index: Tensor | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input, e.g. (1, 28, 28) for MNIST."""
        return tuple(self.x_train.shape[1:])

    def subset(self, n_train: int | None, *, seed: int) -> Splits:
        """These splits with ``n_train`` training points drawn at random (seeded) from the training
        split; validation and test are unchanged. ``None`` keeps every training point."""
        if n_train is None:
            return self
        available = len(self.x_train)
        if isinstance(n_train, bool) or not isinstance(n_train, numbers.Integral) \
                or not 1 <= n_train <= available:
            raise PoisonReachError(f"n_train must be a whole number from 1 to {available} (the size "
                                   f"of the {self.name} training split), got {n_train!r}")
        keep = torch.randperm(available, generator=generator(seed))[:n_train]
        index = None if self.train_index is None else self.train_index[keep]
        return dataclasses.replace(self, x_train=select_rows(self.x_train, keep), y_train=self.y_train[keep], train_index=index)



def check_seed(seed: int) -> int:
    """Return ``seed`` if it is a whole number that torch and scikit-learn both accept."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**32:
        raise PoisonReachError(f"seed must be a whole number from 0 to 2**32 - 1, got {seed!r}")
    return int(seed)


def generator(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed``, so draws never depend on the global RNG state."""
    return torch.Generator().manual_seed(check_seed(seed))


def check_fraction(fraction: float, what: str = "val_fraction") -> float:
    """Return ``fraction`` if it lies strictly between 0 and 1."""
    if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real) \
            or not 0 < fraction < 1:
        raise PoisonReachError(f"{what} must be a number strictly between 0 and 1 "
                               f"(e.g. 0.3), got {fraction!r}")
    return float(fraction)


def split_indices(n: int, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Seeded random partition of range(n) into (kept, held out), ``fraction`` of n held out."""
    held = round(n * check_fraction(fraction))
    if not 0 < held < n:
        raise PoisonReachError(f"cannot hold out {fraction} of {n} examples: both parts must be "
                               "non-empty; use a larger data set or another fraction")
    order = torch.randperm(n, generator=generator(seed))
    return order[held:], order[:held]


# a set without a test split (digits, a user's own data) holds out this share of its points, always
# the same ones: the test split never moves with the experiment's seed
TEST_FRACTION, TEST_SEED = 0.2, 0


def hold_out_test(x: Tensor, y: Tensor) -> Pool:
    """A pool whose test set is a fixed :data:`TEST_FRACTION` of (x, y), drawn with :data:`TEST_SEED`."""
    rest, test = split_indices(len(x), TEST_FRACTION, TEST_SEED)
    return Pool(select_rows(x, rest), y[rest], select_rows(x, test), y[test])


def make_splits(name: str, pool: Pool, *, num_classes: int, mean: tuple[float, ...],
                std: tuple[float, ...], task: str, seed: int, val_fraction: float | None) -> Splits:
    """Split the pool's training set into train and validation; its test set is the test split.

    ``val_fraction=None`` keeps the whole training set (for sets whose proportions are the point,
    such as the toy example) and validates on the test points.
    """
    if val_fraction is None:
        return Splits(name=name, x_train=pool.x_train, y_train=pool.y_train, x_val=pool.x_test, y_val=pool.y_test,
                      x_test=pool.x_test, y_test=pool.y_test, num_classes=num_classes, mean=mean, std=std, task=task,
                      train_index=torch.arange(len(pool.x_train)))
    train, val = split_indices(len(pool.x_train), val_fraction, seed)
    return Splits(name=name, x_train=select_rows(pool.x_train, train), y_train=pool.y_train[train],
                  x_val=select_rows(pool.x_train, val), y_val=pool.y_train[val],
                  x_test=pool.x_test, y_test=pool.y_test,
                  num_classes=num_classes, mean=mean, std=std, task=task, train_index=train)


def labels(values: np.ndarray) -> Tensor:
    """Class labels as the int64 tensor the losses expect."""
    return torch.from_numpy(np.asarray(values, dtype=np.int64))
