"""MNIST and Fashion-MNIST from their original IDX files, gzip-compressed or not."""

from __future__ import annotations

import gzip
import hashlib
import zlib
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from poisonreach.data.files import Known, check_known, fetch, missing_message
from poisonreach.data.splits import Pool, labels
from poisonreach.rows import UInt8Images, select_rows
from poisonreach.errors import CorruptFileError, DatasetNotFoundError

# The four files of a set, in Pool order.
FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
         "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")

# IDX type codes (third byte of the magic number); multi-byte values are big-endian.
_DTYPES = {0x08: np.dtype("u1"), 0x09: np.dtype("i1"), 0x0B: np.dtype(">i2"),
           0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


@dataclass(frozen=True)
class IdxSet:
    """Where an IDX data set lives and how to check it.

    ``checksums`` are the published MD5s of the *uncompressed* files. They are checked when the
    uncompressed size equals the published one: a same-size corrupt copy fails, while the small
    IDX files that tests or users write load unchecked (a truncated or padded real file fails the
    header's length check instead). The published .gz checksums are not used because the .gz
    bytes differ between copies (shared/ and Debian recompressed them) while the content agrees.
    """

    name: str
    checksums: dict[str, Known]
    mirrors: tuple[str, ...]
    fallback: Path | None = None  # a system folder searched when the data root lacks the set
    fallback_hint: str = ""


# The four files of a set in MNIST's format (60,000 training and 10,000 test images of 28×28
# pixels) and their sizes: a 16-byte header and a byte a pixel, an 8-byte header and a byte a label.
_FILES = {"train-images-idx3-ubyte": 16 + 60_000 * 784, "train-labels-idx1-ubyte": 8 + 60_000,
          "t10k-images-idx3-ubyte": 16 + 10_000 * 784, "t10k-labels-idx1-ubyte": 8 + 10_000}


def _checksums(*md5: str) -> dict[str, Known]:
    """The files of :data:`_FILES` with their MD5s, given in that order."""
    return {name: Known(size, digest) for (name, size), digest in zip(_FILES.items(), md5, strict=True)}


MNIST = IdxSet(
    name="mnist",
    checksums=_checksums("6bbc9ace898e44ae57da46a324031adb", "a25bea736e30d166cdddb491f175f624",
                         "2646ac647ad5339dbf082846283269ea", "27ae3e4e09519cfbb04c329615203637"),
    mirrors=("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
)

# Checksums computed from Debian's dataset-fashion-mnist files; they equal the published MD5s of
# the uncompressed Fashion-MNIST files.
FASHION_MNIST = IdxSet(
    name="fashion-mnist",
    checksums=_checksums("f4a8712d7a061bf5bd6d2ca38dc4d50a", "9018921c3c673c538a1fc5bad174d6f9",
                         "8181f5470baa50b63fa0f6fddb340f0a", "15d484375f8d13e6eb1aabb0c3f46965"),
    mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
    fallback=Path("/usr/share/datasets/fashion-mnist"),
    fallback_hint="install Debian's package dataset-fashion-mnist "
                  "(it puts them in /usr/share/datasets/fashion-mnist)",
)


def load(spec: IdxSet, root: Path, download: bool) -> Pool:
    """Read the four IDX files of ``spec``: images (N, 1, 28, 28) kept as their bytes in memory and
    served as [0, 1] floats (:class:`~poisonreach.rows.UInt8Images`; 47 MB, not 188 MB), labels int64."""
    paths = _locate(root / spec.name)
    if None in paths.values() and spec.fallback is not None:
        system = _locate(spec.fallback)
        if None not in system.values():
            paths = system
    missing = [name for name, path in paths.items() if path is None]
    if missing:
        paths.update(_download(spec, root, missing, download))
    x_train, y_train, x_test, y_test = (read_idx(paths[name], spec.checksums[name])
                                        for name in FILES)
    return Pool(*_images_and_labels(x_train, y_train, paths[FILES[0]], paths[FILES[1]]),
                *_images_and_labels(x_test, y_test, paths[FILES[2]], paths[FILES[3]]))


def load_pair(root: Path, download: bool, classes: tuple[int, int]) -> Pool:
    """MNIST restricted to two digits as a binary task: ``classes[0]`` -> 0, ``classes[1]`` -> 1."""
    pool = load(MNIST, root, download)
    first, second = classes

    def keep(x, y):
        mask = (y == first) | (y == second)
        return select_rows(x, mask), (y[mask] == second).long()

    return Pool(*keep(pool.x_train, pool.y_train), *keep(pool.x_test, pool.y_test))


def read_idx(path: Path, known: Known, *, strict: bool = False) -> np.ndarray:
    """Parse one IDX file (gzip or raw): header, type code, dims, and a payload of exactly the
    size the dims say. Its uncompressed content is checked against ``known`` (see IdxSet;
    ``strict`` as in check_known)."""
    data = _read_bytes(path)
    check_known(str(path), len(data), lambda: hashlib.md5(data).hexdigest(), known, strict=strict)
    return parse_idx(data, path)


def parse_idx(data: bytes, path: Path) -> np.ndarray:
    """The array stored in the IDX bytes ``data`` read from ``path``."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _DTYPES:
        raise CorruptFileError(f"{path} is not an IDX file (bad magic number {data[:4].hex()}); "
                               "re-download it")
    dtype, ndim = _DTYPES[data[2]], data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise CorruptFileError(f"{path} is truncated inside its IDX header; re-download it")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = header + dtype.itemsize * int(np.prod(dims, dtype=np.int64))
    if len(data) != expected:
        raise CorruptFileError(f"{path} has {len(data)} bytes but its IDX header {dims} needs "
                               f"{expected}: the file is truncated or corrupt; re-download it")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def _read_bytes(path: Path) -> bytes:
    """The uncompressed content of ``path``, recognising gzip by its magic bytes."""
    try:
        with open(path, "rb") as f:
            gzipped = f.read(2) == b"\x1f\x8b"
        if not gzipped:
            return path.read_bytes()
        with gzip.open(path, "rb") as f:
            return f.read()
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:
        raise CorruptFileError(f"{path} is a damaged gzip file ({err}); re-download it") from err


def _images_and_labels(images: np.ndarray, targets: np.ndarray, images_path: Path,
                       labels_path: Path):
    """Check that an images file and its labels file belong together; return both as tensors."""
    if images.ndim != 3 or images.dtype != np.uint8:
        raise CorruptFileError(f"{images_path} should hold uint8 images (N, rows, cols), found "
                               f"{images.dtype} {images.shape}; re-download it")
    if targets.ndim != 1 or targets.dtype != np.uint8 or (targets > 9).any():
        raise CorruptFileError(f"{labels_path} should hold uint8 labels 0-9 (N,), found "
                               f"{targets.dtype} {targets.shape}; re-download it")
    if len(images) != len(targets):
        raise CorruptFileError(f"{images_path} has {len(images)} images but {labels_path} has "
                               f"{len(targets)} labels: the files do not belong together; "
                               "re-download both")
    return UInt8Images(images[:, None]), labels(targets)


def _locate(folder: Path) -> dict[str, Path | None]:
    """Each IDX file in ``folder``, raw or .gz, or None where neither exists."""
    found = {}
    for name in FILES:
        candidates = [folder / name, folder / f"{name}.gz"]
        found[name] = next((p for p in candidates if p.is_file()), None)
    return found


def _download(spec: IdxSet, root: Path, missing: list[str], download: bool) -> dict[str, Path]:
    """Fetch the ``missing`` files into ``root/spec.name`` if ``download``; else say where to put
    them."""
    message = missing_message(spec.name, root, spec.name, [f"{n}.gz (or {n})" for n in missing],
                              alternative=spec.fallback_hint)
    if not download:
        raise DatasetNotFoundError(message)
    return {name: fetch([f"{mirror}{name}.gz" for mirror in spec.mirrors],
                        root / spec.name / f"{name}.gz",
                        partial(read_idx, known=spec.checksums[name], strict=True), message)
            for name in missing}
