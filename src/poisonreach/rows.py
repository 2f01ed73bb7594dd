"""Data sets whose rows are served as float32 tensors a chunk at a time, never as one dense copy.

The clean images of the large sets are stored as bytes, as their files hold them: TinyImageNet's
100,000 training images are 1.2 GB of uint8 but 4.9 GB as float32, and the attacks, τ, training
and evaluation only ever look at a chunk or a batch of rows at once (:func:`poisonreach.gradients.chunks`,
``X[idx]`` per batch). So a loader returns a :class:`UInt8Images` (an in-memory array, or a
read-only ``np.memmap`` of a cache file, which the operating system pages in and out), and every
row it serves is the float32 tensor the loaders made before, bit for bit (:func:`unit_pixels`).

    X = UInt8Images(pixels)        # pixels: uint8 (N, C, H, W)
    X[i], X[a:b], X[index], X[mask]  # float32 tensors in [0, 1]: one image (C, H, W), or rows
    X.rows(index)                  # a view of some rows (Selected): the split, --subset, the kept
    concat_rows([X, poisons])      # clean ∪ poisons (Concatenated), a victim's training set

A :class:`Rows` looks enough like a tensor for the library's consumers: ``len``, ``shape``,
``dtype`` (float32), ``device`` (the CPU), ``dim()``, ``is_floating_point()``, indexing,
``split(size)`` (chunks), and ``amin``/``amax`` over the rows and ``sum`` computed chunk by chunk
(the data-range box, the checkpoint fingerprint). It is a ``torch.utils.data.Dataset`` whose
items are images, without labels (the labels stay a tensor beside it). It has no ``.to()``: moving
or casting the whole set is what it avoids, so a consumer that truly needs one dense tensor says so
with :func:`dense` (or ``X.dense()``), and everything else moves chunks (``X[sl].to(device)``).
"""

from __future__ import annotations

import numbers
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

# rows per chunk of the reductions (amin, amax, sum, all_finite): 48 MB of float32 TinyImageNet images
REDUCTION_ROWS = 1024


def unit_pixels(images: np.ndarray) -> Tensor:
    """uint8 images as float32 in [0, 1]: each byte converted, then divided by 255 in float32."""
    return torch.from_numpy(images).to(torch.float32).div_(255.0)


class Rows(Dataset):
    """Rows of a data set served as float32 tensors; subclasses say how rows are stored (``_gather``).

    Indexing takes what tensors take along their first dimension: an int (one row, without the row
    dimension), a slice, an integer tensor, array or list (rows in that order, repeats allowed), a
    boolean mask of length N, and a tuple whose first entry is one of those and whose rest indexes
    within the rows (``X[:, 0]``). Each returns a new float32 tensor on the CPU.
    """

    dtype = torch.float32
    device = torch.device("cpu")

    def __len__(self) -> int:
        raise NotImplementedError

    @property
    def row_shape(self) -> tuple[int, ...]:
        """The shape of one row, e.g. (3, 64, 64)."""
        raise NotImplementedError

    def _gather(self, index: slice | np.ndarray) -> Tensor:
        """The rows at ``index`` (a slice with 0 <= start, stop <= N, or int64 positions in [0, N))."""
        raise NotImplementedError

    def all_finite(self) -> bool:
        """Whether every stored row is finite (bytes always are)."""
        raise NotImplementedError

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self), *self.row_shape))

    def dim(self) -> int:
        return 1 + len(self.row_shape)

    def is_floating_point(self) -> bool:
        return True

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={tuple(self.shape)}, served as {self.dtype})"

    def __getitem__(self, key) -> Tensor:
        if isinstance(key, tuple):
            if not key:
                return self.dense()
            first = self[key[0]]
            return first[key[1:]] if _is_int(key[0]) else first[(slice(None), *key[1:])]
        index = self._positions(key)
        if isinstance(index, int):
            return self._gather(np.array([index]))[0]
        return self._gather(index)

    def rows(self, key) -> Selected:
        """The rows at ``key`` (a slice, integer positions or a boolean mask) as a view that stores
        only their positions: the rows are gathered when the view is indexed."""
        index = self._positions(key)
        if isinstance(index, int):
            raise IndexError("rows() selects rows: give a slice, positions or a mask, not a single int")
        return Selected(self, np.arange(len(self))[index] if isinstance(index, slice) else index)

    def split(self, size: int) -> Iterator[Tensor]:
        """Consecutive chunks of at most ``size`` rows, as float32 tensors, one at a time (a
        generator, unlike ``Tensor.split``'s tuple of views)."""
        return (self[start:start + size] for start in range(0, len(self), size))

    def dense(self) -> Tensor:
        """Every row as one float32 tensor (N, ...): the copy this class exists to avoid."""
        return self[:]

    def amin(self, dim: int = 0) -> Tensor:
        """The per-feature minimum over the rows, computed chunk by chunk (equal to the dense one:
        a minimum involves no rounding)."""
        return self._reduce(dim, torch.minimum, lambda chunk: chunk.amin(dim=0))

    def amax(self, dim: int = 0) -> Tensor:
        """The per-feature maximum over the rows, computed chunk by chunk."""
        return self._reduce(dim, torch.maximum, lambda chunk: chunk.amax(dim=0))

    def sum(self, dtype: torch.dtype | None = None) -> Tensor:
        """The sum of every entry (in ``dtype``, default float32), a chunk's sum at a time."""
        return self._reduce(0, torch.add, lambda chunk: chunk.sum(dtype=dtype))

    def _reduce(self, dim: int, combine, of_chunk) -> Tensor:
        if dim != 0:
            raise ValueError(f"{type(self).__name__} reduces over its rows only (dim=0), got dim={dim}")
        result = None
        for chunk in self.split(REDUCTION_ROWS):
            part = of_chunk(chunk)
            result = part if result is None else combine(result, part)
        return result

    def _positions(self, key) -> int | slice | np.ndarray:
        """``key`` as one position, a normalised slice or an int64 array of positions in [0, N)."""
        n = len(self)
        if isinstance(key, Tensor) and key.dim() == 0 and not key.dtype.is_floating_point and key.dtype != torch.bool:
            key = int(key)
        if _is_int(key):
            if not -n <= key < n:
                raise IndexError(f"index {key} is out of range for {n} rows")
            return int(key) % n
        if isinstance(key, slice):
            return slice(*key.indices(n))
        if isinstance(key, (Tensor, np.ndarray, list, range)):
            array = key.cpu().numpy() if isinstance(key, Tensor) else np.asarray(key)
            if array.dtype == np.bool_:
                if array.shape != (n,):
                    raise IndexError(f"a boolean mask must have shape ({n},), one entry per row, got {array.shape}")
                return np.flatnonzero(array)
            if array.ndim != 1 or not (np.issubdtype(array.dtype, np.integer) or array.size == 0):
                raise IndexError(f"rows are indexed by one-dimensional integer positions or a mask, got {array.dtype} {array.shape}")
            array = array.astype(np.int64)
            if array.size and not (-n <= array.min() and array.max() < n):
                raise IndexError(f"indices from {array.min()} to {array.max()} are out of range for {n} rows")
            return np.where(array < 0, array + n, array)
        raise IndexError(f"{type(self).__name__} cannot be indexed by {type(key).__name__}: give an int, a slice, positions or a mask")


def _is_int(key) -> bool:
    return isinstance(key, numbers.Integral) and not isinstance(key, (bool, np.bool_))


class UInt8Images(Rows):
    """Images stored as uint8 (N, C, H, W), in memory or memory-mapped, served as float32 in [0, 1]."""

    def __init__(self, pixels: np.ndarray):
        if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8 or pixels.ndim < 2:
            raise ValueError(f"UInt8Images needs a uint8 array (N, ...), got {getattr(pixels, 'dtype', type(pixels).__name__)}")
        self.pixels = pixels

    def __len__(self) -> int:
        return len(self.pixels)

    @property
    def row_shape(self) -> tuple[int, ...]:
        return tuple(self.pixels.shape[1:])

    def _gather(self, index: slice | np.ndarray) -> Tensor:
        chunk = self.pixels[index]
        # a slice of a read-only memmap is copied out (torch.from_numpy wants writable memory)
        return unit_pixels(chunk if chunk.flags.writeable else chunk.copy())

    def all_finite(self) -> bool:
        return True


class Selected(Rows):
    """Some rows of another :class:`Rows`, by position (:meth:`Rows.rows`): a split, a subset."""

    def __init__(self, base: Rows, index: np.ndarray):
        if isinstance(base, Selected):  # a selection of a selection is one selection of the stored rows
            base, index = base.base, base.index[index]
        self.base, self.index = base, index

    def __len__(self) -> int:
        return len(self.index)

    @property
    def row_shape(self) -> tuple[int, ...]:
        return self.base.row_shape

    def _gather(self, index: slice | np.ndarray) -> Tensor:
        return self.base._gather(self.index[index])

    def all_finite(self) -> bool:
        return self.base.all_finite()


class Concatenated(Rows):
    """The rows of several parts (each :class:`Rows` or a tensor) one after the other, e.g. clean
    ∪ poisons: the clean rows keep their storage, the poisons are the float rows they are."""

    def __init__(self, parts: Sequence[Rows | Tensor]):
        shapes = {tuple(part.shape[1:]) for part in parts}
        if len(shapes) != 1:
            raise ValueError(f"concatenated parts must have rows of one shape, got {sorted(shapes)}")
        self.parts = [part if isinstance(part, Rows) else part.detach().to(torch.float32) for part in parts]
        self.ends = np.cumsum([len(part) for part in parts])
        self.starts = self.ends - [len(part) for part in parts]

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    @property
    def row_shape(self) -> tuple[int, ...]:
        return tuple(self.parts[0].shape[1:])

    def _gather(self, index: slice | np.ndarray) -> Tensor:
        if isinstance(index, slice) and index.step == 1:  # a chunk: each part's overlap, one slice each
            pieces = [part[max(index.start - lo, 0):index.stop - lo] for part, lo, hi in zip(self.parts, self.starts, self.ends)
                      if lo < index.stop and index.start < hi]
            return torch.cat(pieces) if pieces else torch.empty((0, *self.row_shape), dtype=self.dtype)
        positions = np.arange(len(self))[index] if isinstance(index, slice) else index
        out = torch.empty((len(positions), *self.row_shape), dtype=self.dtype)
        owner = np.searchsorted(self.ends, positions, side="right")
        for k, part in enumerate(self.parts):
            hit = np.flatnonzero(owner == k)
            if len(hit):
                out[torch.from_numpy(hit)] = part[torch.from_numpy(positions[hit] - self.starts[k])]
        return out

    def all_finite(self) -> bool:
        return all(part.all_finite() if isinstance(part, Rows) else bool(torch.isfinite(part).all()) for part in self.parts)


def select_rows(x: Rows | Tensor, index) -> Rows | Tensor:
    """``x[index]`` for a tensor; a view of those rows for :class:`Rows`, so no float copy is made."""
    return x.rows(index) if isinstance(x, Rows) else x[index]


def concat_rows(parts: Sequence[Rows | Tensor]) -> Rows | Tensor:
    """The rows of ``parts`` one after the other: ``torch.cat`` of tensors, a :class:`Concatenated`
    as soon as one part is :class:`Rows` (its rows are not copied)."""
    if any(isinstance(part, Rows) for part in parts):
        return Concatenated(parts)
    return torch.cat(list(parts))


def dense(x: Rows | Tensor) -> Tensor:
    """``x`` as one tensor: itself if it is one, else every row in float32 (for the few consumers
    that need the whole set at once, e.g. DPA's hashes of all points)."""
    return x.dense() if isinstance(x, Rows) else x
