"""Rows served from bytes (poisonreach.rows): the same float32 values as the dense tensors the
loaders made before, every indexing form, chunked reductions, clean ∪ poisons without a dense copy,
and TinyImageNet's memory-mapped cache (written, reused, and migrated from the earlier .npz)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from poisonreach import data, models, rows
from poisonreach.attacks import PoisonResult
from poisonreach.data import fake_files as fakedata
from poisonreach.data import tinyimagenet
from poisonreach.errors import PoisonReachError
from poisonreach.gradients import gradient_sum, select_parameters
from poisonreach.losses import resolve
from poisonreach.rows import Concatenated, Selected, UInt8Images, concat_rows, dense, select_rows
from poisonreach.training import accuracy, minimize, train
from poisonreach.validation import check_inputs


def old_floats(pixels: np.ndarray) -> torch.Tensor:
    """The conversion the loaders made before: the whole set as float32 divided by 255."""
    return torch.from_numpy(pixels.astype(np.float32)) / 255


@pytest.fixture
def pixels() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (37, 3, 4, 4), dtype=np.uint8)


def test_rows_are_bit_identical_to_the_old_float_conversion(pixels):
    every_byte = np.arange(256, dtype=np.uint8).reshape(256, 1, 1, 1)
    assert torch.equal(UInt8Images(every_byte)[:], old_floats(every_byte))
    X = UInt8Images(pixels)
    assert X.dtype == X[:5].dtype == torch.float32 and X.shape == (37, 3, 4, 4) and len(X) == 37
    assert torch.equal(X[:], old_floats(pixels))


def test_every_indexing_form_matches_the_dense_tensor(pixels):
    X, D = UInt8Images(pixels), old_floats(pixels)
    mask = torch.arange(37) % 3 == 0
    keys = [5, -1, np.int64(4), torch.tensor(7), slice(None), slice(3, 20, 4), slice(-5, None), slice(9, 2),
            torch.tensor([36, 0, 0, -2]), np.array([2, 1]), [4, 4, 5], range(3, 6), mask, mask.numpy(),
            torch.tensor([], dtype=torch.int64)]
    for key in keys:
        expected = D[key] if not isinstance(key, range) else D[list(key)]
        assert torch.equal(X[key], expected), key
    assert torch.equal(X[:, 0], D[:, 0]) and torch.equal(X[2, 1], D[2, 1]) and torch.equal(X[mask, :, 1:3], D[mask, :, 1:3])
    for bad in (37, -38, torch.tensor([0, 37]), mask[:-1], torch.tensor([0.5]), "0", True):
        with pytest.raises(IndexError):
            X[bad]


def test_a_memory_mapped_array_serves_the_same_rows(tmp_path, pixels):
    np.save(tmp_path / "x.npy", pixels)
    X = UInt8Images(np.load(tmp_path / "x.npy", mmap_mode="r"))
    assert torch.equal(X[3:9], old_floats(pixels[3:9])) and torch.equal(X[torch.tensor([8, 1])], old_floats(pixels[[8, 1]]))
    X[0][0, 0, 0] = 5.0  # a served row is a copy: the read-only file is never written
    assert X[0][0, 0, 0] == float(pixels[0, 0, 0, 0]) / 255


def test_views_select_without_copying_and_compose(pixels):
    X, D = UInt8Images(pixels), old_floats(pixels)
    first = X.rows(torch.tensor([30, 2, 7, 7, 11]))
    second = first.rows(slice(1, None, 2))
    assert isinstance(second, Selected) and second.base is X  # one level: the positions compose
    assert second.index.tolist() == [2, 7]
    assert torch.equal(second[:], D[[2, 7]]) and torch.equal(first[-1], D[11])
    assert torch.equal(X.rows(D[:, 0, 0, 0] > 0.5)[:], D[D[:, 0, 0, 0] > 0.5])
    with pytest.raises(IndexError, match="not a single int"):
        X.rows(3)
    dense_rows = torch.arange(6.0).reshape(3, 2)
    assert torch.equal(select_rows(dense_rows, torch.tensor([2, 0])), dense_rows[[2, 0]])


def test_reductions_are_computed_chunk_by_chunk(monkeypatch, pixels):
    monkeypatch.setattr(rows, "REDUCTION_ROWS", 5)  # 37 rows: eight chunks
    X, D = UInt8Images(pixels).rows(torch.arange(36, -1, -1)), old_floats(pixels).flip(0)
    assert torch.equal(X.amin(dim=0), D.amin(dim=0)) and torch.equal(X.amax(0), D.amax(0))
    assert float(X.sum(dtype=torch.float64)) == pytest.approx(float(D.double().sum()), rel=1e-15)
    assert float(X.sum()) == pytest.approx(float(D.sum()), rel=1e-6)
    assert [len(chunk) for chunk in X.split(10)] == [10, 10, 10, 7]
    with pytest.raises(ValueError, match="dim=0"):
        X.amin(dim=1)


def test_clean_and_poisons_concatenate_without_a_dense_copy(pixels):
    clean, poisons = UInt8Images(pixels), torch.rand(4, 3, 4, 4, dtype=torch.float64)
    X = concat_rows([clean.rows(slice(0, 30)), poisons])
    D = torch.cat([old_floats(pixels)[:30], poisons.float()])
    assert isinstance(X, Concatenated) and X.shape == (34, 3, 4, 4)
    for key in (slice(None), slice(25, 33), slice(31, 34), slice(0, 30, 7), torch.tensor([33, 0, 29, 30]), D[:, 0, 0, 0] > 0.3, -1):
        assert torch.equal(X[key], D[key]), key
    assert torch.equal(X.amax(0), D.amax(0))
    assert torch.equal(concat_rows([poisons[:2], poisons[2:]]), poisons)  # tensors alone: torch.cat


def test_check_inputs_reads_rows_without_a_dense_copy(pixels):
    clean = UInt8Images(pixels)
    assert check_inputs(clean) == 37
    broken = torch.zeros(1, 3, 4, 4)
    broken[0, 0, 0, 0] = math.nan
    with pytest.raises(PoisonReachError, match="NaN"):
        check_inputs(concat_rows([clean, broken]))


def test_poisoned_set_keeps_the_clean_rows_as_bytes(pixels):
    X, y = UInt8Images(pixels), torch.arange(37) % 2
    result = PoisonResult(x=torch.rand(3, 3, 4, 4), y=torch.tensor([1, 0, 1]), source_indices=torch.tensor([0, 1, 2]), grad_norm_history=[],
                          tau=math.nan, eps_d=0.1, config={}, seed=0, kept_indices=torch.tensor([5, 1, 30]))
    X_mix, y_mix = result.mixed(X, y)
    dense_mix, dense_y = result.mixed(old_floats(pixels), y)
    assert isinstance(X_mix, Concatenated) and torch.equal(X_mix[:], dense_mix) and torch.equal(y_mix, dense_y)


def test_a_dataloader_batches_the_images(pixels):
    X = UInt8Images(pixels)
    batches = list(DataLoader(X, batch_size=16))
    assert [len(b) for b in batches] == [16, 16, 5] and torch.equal(torch.cat(batches), old_floats(pixels))


def test_consumers_give_the_same_numbers_as_on_the_dense_tensor():
    """Training (random batches), full-batch L-BFGS, g(µ) and the accuracy on rows served from
    bytes equal, bit for bit, the results on the float tensor the loaders made before."""
    gen = np.random.default_rng(1)
    pixels, y = gen.integers(0, 256, (120, 1, 8, 8), dtype=np.uint8), torch.from_numpy(gen.integers(0, 3, 120))
    X, D = UInt8Images(pixels).rows(torch.arange(119, -1, -1)), old_floats(pixels).flip(0)
    y = y.flip(0)

    def fresh():
        return models.create("lr", input_shape=(1, 8, 8), num_classes=3, mean=(0.5,), std=(0.3,), seed=0)

    trained = [train(fresh(), x, y, epochs=2, batch_size=16, progress=False) for x in (X, D)]
    minimised = [minimize(fresh(), x, y, max_iterations=30, chunk_size=50, progress=False) for x in (X, D)]
    for a, b in (trained, minimised):
        assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    model = minimised[0]
    params = select_parameters(model)
    sums = [gradient_sum(model, params, x, y, resolve(3, y), chunk_size=32, device=torch.device("cpu")) for x in (X, D)]
    assert all(torch.equal(p, q) for p, q in zip(*sums))
    assert accuracy(model, X, y) == accuracy(model, D, y)


# --- the loaders ----------------------------------------------------------------------------------

def test_splits_of_a_byte_set_are_views():
    pool = data.splits.Pool(UInt8Images(np.arange(10 * 4, dtype=np.uint8).reshape(10, 1, 2, 2)), torch.arange(10) % 2,
                            UInt8Images(np.zeros((3, 1, 2, 2), np.uint8)), torch.zeros(3, dtype=torch.int64))
    splits = data.splits.make_splits("bytes", pool, num_classes=2, mean=(0.0,), std=(1.0,), task="classification", seed=0,
                                     val_fraction=0.3).subset(5, seed=1)
    assert isinstance(splits.x_train, Selected) and isinstance(splits.x_val, Selected)
    assert torch.equal(splits.x_train[:], dense(pool.x_train)[splits.train_index])


def write_tiny(top):
    fakedata.write_tinyimagenet(top, wnids=3, train_per_class=4, val_per_class=2, seed=0)


def test_tinyimagenet_cache_is_memory_mapped_and_reused(tmp_path, monkeypatch):
    write_tiny(tmp_path / "tinyimagenet" / "tiny-imagenet-200")
    first = data.load("tinyimagenet", root=tmp_path, val_fraction=0.25)
    folder = tmp_path / "tinyimagenet"
    assert (folder / tinyimagenet.CACHE).is_file() and (folder / tinyimagenet.LABELS).is_file()
    assert np.load(folder / tinyimagenet.CACHE).shape == (18, 3, 64, 64)  # 12 training images, then 6 test images

    monkeypatch.setattr(tinyimagenet, "_decode_image", lambda path: pytest.fail(f"decoded {path} although the cache is fresh"))
    again = data.load("tinyimagenet", root=tmp_path, val_fraction=0.25)
    assert isinstance(again.x_train.base.pixels, np.memmap) and isinstance(again.x_test.pixels, np.memmap)
    for name in ("x_train", "x_val", "x_test"):
        assert torch.equal(dense(getattr(again, name)), dense(getattr(first, name))), name
    assert torch.equal(again.y_train, first.y_train) and torch.equal(again.y_test, first.y_test)


def test_tinyimagenet_earlier_cache_is_converted_once(tmp_path, monkeypatch):
    write_tiny(tmp_path / "tinyimagenet" / "tiny-imagenet-200")
    decoded = data.load("tinyimagenet", root=tmp_path)
    folder = tmp_path / "tinyimagenet"
    images = np.load(folder / tinyimagenet.CACHE)
    with np.load(folder / tinyimagenet.LABELS) as labels:
        y_train, y_test = labels["y_train"], labels["y_test"]
    np.savez(folder / tinyimagenet.OLD_CACHE, x_train=images[:12], y_train=y_train, x_test=images[12:], y_test=y_test)
    (folder / tinyimagenet.CACHE).unlink()
    (folder / tinyimagenet.LABELS).unlink()

    monkeypatch.setattr(tinyimagenet, "_decode_image", lambda path: pytest.fail(f"decoded {path} although an earlier cache is fresh"))
    converted = data.load("tinyimagenet", root=tmp_path)
    assert not (folder / tinyimagenet.OLD_CACHE).exists() and (folder / tinyimagenet.CACHE).is_file()
    assert isinstance(converted.x_test.pixels, np.memmap)
    assert torch.equal(dense(converted.x_train), dense(decoded.x_train)) and torch.equal(converted.y_val, decoded.y_val)


def test_tinyimagenet_damaged_cache_is_decoded_again(tmp_path):
    write_tiny(tmp_path / "tinyimagenet" / "tiny-imagenet-200")
    decoded = data.load("tinyimagenet", root=tmp_path)
    cache = tmp_path / "tinyimagenet" / tinyimagenet.CACHE
    cache.write_bytes(cache.read_bytes()[:-100])  # truncated
    again = data.load("tinyimagenet", root=tmp_path)
    assert torch.equal(dense(again.x_train), dense(decoded.x_train))
    assert np.load(cache).shape == (18, 3, 64, 64)  # written whole again
