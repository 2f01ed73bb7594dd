"""CIFAR-10 from its original python-pickle batches, read without trusting the pickles."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from poisonreach.data.files import Archive, Known, ensure_extracted
from poisonreach.data.splits import Pool, labels
from poisonreach.rows import UInt8Images
from poisonreach.errors import CorruptFileError

SUB, TOP = "cifar10", "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
ARCHIVE = Archive("cifar-10-python.tar.gz", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                  Known(170498071, "c58f30108f718f92721af3b95e74349a"))

# The only globals a pickled numpy array needs; anything else (os.system, eval, ...) would let the
# file run code. numpy 1 spells the module numpy.core, numpy 2 numpy._core; protocol 2 pickles
# written by Python 3 store bytes through _codecs.encode, protocol 5 arrays use _frombuffer.
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain data and numpy arrays, and refuses every other global."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"refusing {module}.{name}: a CIFAR-10 batch holds only "
                                         "arrays and lists, so this file may be malicious")
        return super().find_class(module, name)


def load(root: Path, download: bool) -> Pool:
    """The five training batches and the test batch as (N, 3, 32, 32) images, kept as their bytes
    in memory (150 MB, not 600 MB as float32) and served as floats in [0, 1]
    (:class:`~poisonreach.rows.UInt8Images`)."""
    folder = ensure_extracted("cifar10", root, SUB, TOP, [*TRAIN_BATCHES, TEST_BATCH], ARCHIVE,
                              download)
    train = [read_batch(folder / name) for name in TRAIN_BATCHES]
    x_test, y_test = read_batch(folder / TEST_BATCH)
    return Pool(UInt8Images(np.concatenate([x for x, _ in train])),
                labels(np.concatenate([y for _, y in train])),
                UInt8Images(x_test), labels(y_test))


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch: uint8 images (N, 3, 32, 32) and int64 labels (N,)."""
    try:
        with open(path, "rb") as f:
            # encoding="bytes" reads the original Python 2 pickles; their keys are bytes.
            batch = _ArrayUnpickler(f, encoding="bytes").load()
    except Exception as err:  # any failure to parse an untrusted file means it is damaged
        raise CorruptFileError(f"{path} is not a readable CIFAR-10 batch ({err}); delete it and "
                               "re-download the original") from err
    if not isinstance(batch, dict):
        raise CorruptFileError(f"{path} holds a {type(batch).__name__}, not a CIFAR-10 batch "
                               "dict; re-download it")
    data, targets = batch.get(b"data"), batch.get(b"labels")
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
            and data.shape[1] == 3 * 32 * 32):
        raise CorruptFileError(f"{path} lacks b'data' as uint8 (N, 3072) images; re-download it")
    if not (isinstance(targets, list) and len(targets) == len(data)
            and all(isinstance(t, int) and 0 <= t < 10 for t in targets)):
        raise CorruptFileError(f"{path} lacks b'labels' as a list of {len(data)} integers 0-9; "
                               "re-download it")
    # Each row is the red, green and blue 32x32 planes in turn.
    return data.reshape(-1, 3, 32, 32), np.array(targets, dtype=np.int64)
