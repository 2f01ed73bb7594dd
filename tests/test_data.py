"""Tests of poisonreach.data: loaders on small files in the original formats, written here, and
on the real MNIST in ../shared/data when it is there. Nothing here reaches the network."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import math
import os
import pickle
import shutil
import tarfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from poisonreach import data
from poisonreach.data import cifar, idx, tinyimagenet
from poisonreach.data.files import Known
from poisonreach.errors import CorruptFileError, DatasetNotFoundError, PoisonReachError
from poisonreach.rows import dense

from poisonreach.data import fake_files as fakedata
from poisonreach.data.fake_files import write_cifar

SHARED_MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Fail any test that would open a URL; download tests replace this with their own fake."""
    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to open a URL")
    monkeypatch.setattr(urllib.request, "urlopen", refuse)


# --- IDX (MNIST format) ----------------------------------------------------------------------

def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file holding a uint8 array."""
    header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, dtype=">u4").tobytes()
    return header + array.astype(np.uint8).tobytes()


def write_mnist(folder: Path, *, gz: bool, n_train: int = 20, n_test: int = 10,
                targets: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Write four small IDX files into ``folder``; return the arrays by file name."""
    rng = np.random.default_rng(0)
    if targets is None:
        targets = np.arange(n_train + n_test) % 10
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": targets[:n_train].astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": targets[n_train:].astype(np.uint8),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        content = idx_bytes(array)
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(content))
        else:
            (folder / name).write_bytes(content)
    return arrays


@pytest.mark.parametrize("gz", [True, False])
def test_idx_round_trip(tmp_path, gz):
    arrays = write_mnist(tmp_path / "mnist", gz=gz)
    splits = data.load("mnist", root=tmp_path, seed=0)
    assert splits.input_shape == (1, 28, 28)
    assert (len(splits.x_train), len(splits.x_val), len(splits.x_test)) == (14, 6, 10)
    assert splits.x_train.dtype == torch.float32 and splits.y_train.dtype == torch.int64
    expected = torch.from_numpy(arrays["t10k-images-idx3-ubyte"]).float()[:, None] / 255
    assert torch.equal(dense(splits.x_test), expected)
    assert splits.y_test.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    # train + val is a permutation of the original training set, pairs kept together
    pool_x = torch.cat([dense(splits.x_train), dense(splits.x_val)]).flatten(1)
    pool_y = torch.cat([splits.y_train, splits.y_val])
    original = torch.from_numpy(arrays["train-images-idx3-ubyte"]).float().flatten(1) / 255
    for row, label in zip(pool_x, pool_y):
        match = (original == row).all(dim=1).nonzero().flatten()
        assert len(match) == 1 and arrays["train-labels-idx1-ubyte"][match[0]] == label
    assert splits.mean == (0.1307,) and splits.std == (0.3081,) and splits.num_classes == 10


@pytest.mark.parametrize("change", [lambda b: b[:-5], lambda b: b[:10], lambda b: b + b"\0"],
                         ids=["truncated", "header-only", "padded"])
def test_idx_wrong_length_is_corrupt(tmp_path, change):
    write_mnist(tmp_path / "mnist", gz=False)
    images = tmp_path / "mnist" / "train-images-idx3-ubyte"
    images.write_bytes(change(images.read_bytes()))
    with pytest.raises(CorruptFileError, match="train-images-idx3-ubyte.*truncated"):
        data.load("mnist", root=tmp_path)


def test_idx_truncated_gzip_is_corrupt(tmp_path):
    write_mnist(tmp_path / "mnist", gz=True)
    labels = tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz"
    labels.write_bytes(labels.read_bytes()[:-12])
    with pytest.raises(CorruptFileError, match="t10k-labels-idx1-ubyte.gz"):
        data.load("mnist", root=tmp_path)


def test_idx_wrong_magic_is_corrupt(tmp_path):
    write_mnist(tmp_path / "mnist", gz=False)
    labels = tmp_path / "mnist" / "train-labels-idx1-ubyte"
    labels.write_bytes(b"\x00\x00\x42\x01" + labels.read_bytes()[4:])
    with pytest.raises(CorruptFileError, match="train-labels-idx1-ubyte.*magic"):
        data.load("mnist", root=tmp_path)


def test_idx_count_mismatch_is_corrupt(tmp_path):
    folder = tmp_path / "mnist"
    write_mnist(folder, gz=False)
    (folder / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(9, np.uint8)))
    with pytest.raises(CorruptFileError, match="10 images but .* 9 labels"):
        data.load("mnist", root=tmp_path)


def test_idx_missing_files_are_named(tmp_path):
    folder = tmp_path / "mnist"
    write_mnist(folder, gz=True)
    (folder / "train-labels-idx1-ubyte.gz").unlink()
    (folder / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(DatasetNotFoundError) as caught:
        data.load("mnist", root=tmp_path)
    message = str(caught.value)
    assert isinstance(caught.value, FileNotFoundError)
    assert "train-labels-idx1-ubyte" in message and "t10k-images-idx3-ubyte" in message
    assert "train-images-idx3-ubyte" not in message  # present files are not blamed
    assert f"{folder.absolute()}/" in message and "--data-root" in message
    assert "POISONREACH_DATA" in message


def fake_urlopen(files: dict[str, bytes]):
    """An urlopen that serves ``files`` by the last part of the URL."""
    def urlopen(url, timeout):
        assert timeout > 0
        return io.BytesIO(files[url.rsplit("/", 1)[-1]])
    return urlopen


def test_idx_download_unreachable_says_where_to_put_files(tmp_path, monkeypatch):
    def unreachable(url, timeout):
        raise urllib.error.URLError("no route to host")
    monkeypatch.setattr(urllib.request, "urlopen", unreachable)
    with pytest.raises(DatasetNotFoundError) as caught:
        data.load("mnist", root=tmp_path, download=True)
    message = str(caught.value)
    assert "t10k-labels-idx1-ubyte" in message and str((tmp_path / "mnist").absolute()) in message
    assert "https://ossci-datasets.s3.amazonaws.com/mnist/train-images-idx3-ubyte.gz" in message
    assert "no route to host" in message
    assert list((tmp_path / "mnist").iterdir()) == []  # no partial files left behind


def test_idx_download_verifies_then_renames(tmp_path, monkeypatch):
    arrays = write_mnist(tmp_path / "source", gz=False)
    served = {}
    for name, array in arrays.items():
        content = idx_bytes(array)
        served[f"{name}.gz"] = gzip.compress(content)
        # pretend the tiny files are the published ones, so the strict check passes
        monkeypatch.setitem(idx.MNIST.checksums, name,
                            Known(len(content), hashlib.md5(content).hexdigest()))
    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen(served))
    splits = data.load("mnist", root=tmp_path / "root", download=True)
    assert len(splits.x_test) == 10
    assert sorted(p.name for p in (tmp_path / "root" / "mnist").iterdir()) == sorted(served)


def test_idx_download_with_bad_checksum_keeps_nothing(tmp_path, monkeypatch):
    arrays = write_mnist(tmp_path / "source", gz=False)
    served = {f"{name}.gz": gzip.compress(idx_bytes(a)) for name, a in arrays.items()}
    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen(served))
    # the real published sizes and checksums: the tiny files must be refused
    with pytest.raises(CorruptFileError, match="expected 47040016"):
        data.load("mnist", root=tmp_path / "root", download=True)
    assert list((tmp_path / "root" / "mnist").iterdir()) == []


def test_mnist17_is_binary_one_versus_seven(tmp_path):
    targets = np.array([1, 7, 3, 1, 7, 7, 0, 1, 9, 7] * 4)
    arrays = write_mnist(tmp_path / "mnist", gz=True, n_train=30, n_test=10, targets=targets)
    splits = data.load("mnist17", root=tmp_path)
    assert splits.num_classes == 2
    pool_y = torch.cat([splits.y_train, splits.y_val])
    assert set(pool_y.tolist()) == {0, 1}
    assert (pool_y == 0).sum() == (targets[:30] == 1).sum()
    assert (pool_y == 1).sum() == (targets[:30] == 7).sum()
    keep = np.isin(targets[30:], [1, 7])
    assert splits.y_test.tolist() == (targets[30:][keep] == 7).astype(int).tolist()
    expected = torch.from_numpy(arrays["t10k-images-idx3-ubyte"][keep]).float()[:, None] / 255
    assert torch.equal(dense(splits.x_test), expected)


@pytest.mark.skipif(not SHARED_MNIST.is_dir(), reason=f"real MNIST not at {SHARED_MNIST}")
def test_real_mnist(monkeypatch):
    hashed = []
    real_check = idx.check_known

    def spy(label, size, digest, known, **kwargs):
        def recorded():
            hashed.append(Path(label).name)
            return digest()
        real_check(label, size, recorded, known, **kwargs)
    monkeypatch.setattr(idx, "check_known", spy)
    splits = data.load("mnist", root=SHARED_MNIST.parent, seed=0)
    assert hashed == [f"{name}.gz" for name in idx.FILES]  # every file's checksum was compared
    assert (len(splits.x_train), len(splits.x_val), len(splits.x_test)) == (42000, 18000, 10000)
    assert splits.x_train.shape[1:] == (1, 28, 28)
    x_train = dense(splits.x_train)
    assert x_train.min() == 0 and x_train.max() == 1
    assert abs(x_train.mean().item() - 0.1307) < 0.003
    assert set(splits.y_test.tolist()) == set(range(10))


@pytest.mark.skipif(not SHARED_MNIST.is_dir(), reason=f"real MNIST not at {SHARED_MNIST}")
def test_real_mnist_corrupt_copy_fails_checksum(tmp_path):
    folder = tmp_path / "mnist"
    folder.mkdir()
    for name in ("train-images-idx3-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (folder / f"{name}.gz").symlink_to(SHARED_MNIST / f"{name}.gz")
    labels = bytearray(gzip.decompress((SHARED_MNIST / "train-labels-idx1-ubyte.gz").read_bytes()))
    labels[1000] = (labels[1000] + 1) % 10  # a different, still valid, label: same size
    (folder / "train-labels-idx1-ubyte").write_bytes(bytes(labels))
    with pytest.raises(CorruptFileError) as caught:
        data.load("mnist", root=tmp_path)
    message = str(caught.value)
    assert "train-labels-idx1-ubyte" in message and "a25bea736e30d166cdddb491f175f624" in message
    assert hashlib.md5(labels).hexdigest() in message and "re-download" in message


@pytest.mark.skipif(not DEBIAN_FASHION.is_dir(), reason="Debian's dataset-fashion-mnist not installed")
def test_fashion_mnist_falls_back_to_debian_package(tmp_path):
    splits = data.load("fashion-mnist", root=tmp_path)
    assert (len(splits.x_train), len(splits.x_val), len(splits.x_test)) == (42000, 18000, 10000)
    assert splits.mean == (0.2860,)


def test_fashion_mnist_missing_mentions_debian_package(tmp_path, monkeypatch):
    monkeypatch.setattr(idx, "FASHION_MNIST",
                        dataclasses.replace(idx.FASHION_MNIST, fallback=tmp_path / "absent"))
    with pytest.raises(DatasetNotFoundError, match="dataset-fashion-mnist"):
        data.load("fashion-mnist", root=tmp_path)


# --- CIFAR-10 --------------------------------------------------------------------------------

def test_cifar10_loads_original_batches(tmp_path):
    batches = write_cifar(tmp_path / "cifar10" / "cifar-10-batches-py")
    splits = data.load("cifar10", root=tmp_path, seed=1)
    assert (len(splits.x_train), len(splits.x_val), len(splits.x_test)) == (35, 15, 10)
    assert splits.input_shape == (3, 32, 32) and splits.num_classes == 10
    test = batches["test_batch"]
    first = test[b"data"][0]
    # rows are the red, then green, then blue plane, each 32x32 row-major
    assert splits.x_test[0, 1, 2, 3].item() == pytest.approx(first[1024 + 2 * 32 + 3] / 255)
    assert splits.y_test.tolist() == test[b"labels"]
    assert 0 <= dense(splits.x_train).min() and dense(splits.x_train).max() <= 1
    all_train = sorted(v for name in cifar.TRAIN_BATCHES for v in batches[name][b"labels"])
    assert sorted(torch.cat([splits.y_train, splits.y_val]).tolist()) == all_train


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_cifar10_malicious_pickle_is_refused_unexecuted(tmp_path):
    folder = tmp_path / "cifar10" / "cifar-10-batches-py"
    write_cifar(folder)
    marker = tmp_path / "exploited"
    (folder / "data_batch_3").write_bytes(pickle.dumps({b"data": _Exploit(marker)}, protocol=2))
    with pytest.raises(CorruptFileError, match="data_batch_3.*refusing .*system"):
        data.load("cifar10", root=tmp_path)
    assert not marker.exists()


def test_cifar10_wrong_contents_are_corrupt(tmp_path):
    folder = tmp_path / "cifar10" / "cifar-10-batches-py"
    write_cifar(folder)
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8),
                                                      b"labels": [1, 12]}, protocol=2))
    with pytest.raises(CorruptFileError, match="test_batch.*labels"):
        data.load("cifar10", root=tmp_path)
    (folder / "test_batch").write_bytes(b"\x80\x02not a pickle")
    with pytest.raises(CorruptFileError, match="test_batch"):
        data.load("cifar10", root=tmp_path)


def test_cifar10_archive_is_extracted(tmp_path):
    staging = tmp_path / "staging"
    batches = write_cifar(staging / "cifar-10-batches-py")
    with tarfile.open(tmp_path / "cifar10.tmp", "w:gz") as tar:
        tar.add(staging / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    (tmp_path / "root" / "cifar10").mkdir(parents=True)
    shutil.move(tmp_path / "cifar10.tmp", tmp_path / "root" / "cifar10" / "cifar-10-python.tar.gz")
    splits = data.load("cifar10", root=tmp_path / "root")
    assert splits.y_test.tolist() == batches["test_batch"][b"labels"]
    assert (tmp_path / "root" / "cifar10" / "cifar-10-batches-py" / "data_batch_5").is_file()


@pytest.mark.parametrize("kind", ["parent", "absolute", "symlink"])
def test_cifar10_archive_escaping_its_folder_is_refused(tmp_path, kind):
    folder = tmp_path / "root" / "cifar10"
    folder.mkdir(parents=True)
    with tarfile.open(folder / "cifar-10-python.tar.gz", "w:gz") as tar:
        member = tarfile.TarInfo({"parent": "../../escaped", "absolute": str(tmp_path / "escaped"),
                                  "symlink": "cifar-10-batches-py/data_batch_1"}[kind])
        if kind == "symlink":
            member.type, member.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(member)
        else:
            member.size = 3
            tar.addfile(member, io.BytesIO(b"bad"))
    with pytest.raises(CorruptFileError, match="refusing"):
        data.load("cifar10", root=tmp_path / "root")
    assert not (tmp_path / "escaped").exists()
    assert not (folder / "cifar-10-batches-py" / "data_batch_1").exists()


def test_cifar10_missing_names_batches_and_archive(tmp_path):
    folder = tmp_path / "cifar10" / "cifar-10-batches-py"
    write_cifar(folder)
    (folder / "data_batch_2").unlink()
    with pytest.raises(DatasetNotFoundError) as caught:
        data.load("cifar10", root=tmp_path)
    message = str(caught.value)
    assert "data_batch_2" in message and "data_batch_1" not in message
    assert str(folder.absolute()) in message and "cifar-10-python.tar.gz" in message


# --- TinyImageNet ----------------------------------------------------------------------------

WNIDS = ["n03", "n01", "n02"]  # deliberately unsorted: classes follow the sorted order


def write_tinyimagenet(top: Path) -> None:
    """A tiny tree in the original layout: each class's images are one solid colour, and one
    training image of n02 is greyscale."""
    fakedata.write_tinyimagenet(top, wnids=WNIDS, train_per_class=3, val_per_class=1,
                                colours=[(40 * int(wnid[-1]), 200, 100) for wnid in WNIDS])
    Image.new("L", (64, 64), 90).save(top / "train" / "n02" / "images" / "n02_grey.JPEG")


def test_tinyimagenet_loads_and_reuses_its_cache(tmp_path, monkeypatch):
    top = tmp_path / "tinyimagenet" / "tiny-imagenet-200"
    write_tinyimagenet(top)
    splits = data.load("tinyimagenet", root=tmp_path, val_fraction=0.4)
    assert splits.input_shape == (3, 64, 64) and splits.num_classes == 200
    assert (len(splits.x_train), len(splits.x_val), len(splits.x_test)) == (6, 4, 3)
    # class index = position in sorted wnids: n01 -> 0, n02 -> 1, n03 -> 2
    assert splits.y_test.tolist() == [2, 0, 1]
    red = splits.x_test[:, 0].mean(dim=(1, 2)) * 255
    assert torch.allclose(red, torch.tensor([120.0, 40.0, 80.0]), atol=3)
    cache = tmp_path / "tinyimagenet" / tinyimagenet.CACHE
    assert cache.is_file()

    def no_decoding(path):
        raise AssertionError(f"decoded {path} although the cache is fresh")
    monkeypatch.setattr(tinyimagenet, "_decode_image", no_decoding)
    again = data.load("tinyimagenet", root=tmp_path, val_fraction=0.4)
    assert torch.equal(dense(again.x_train), dense(splits.x_train)) and torch.equal(again.y_val, splits.y_val)

    # a source newer than the cache makes it stale
    future = cache.stat().st_mtime + 10
    os.utime(top / "wnids.txt", (future, future))
    with pytest.raises(AssertionError, match="decoded"):
        data.load("tinyimagenet", root=tmp_path)


def test_tinyimagenet_archive_is_extracted(tmp_path):
    write_tinyimagenet(tmp_path / "staging" / "tiny-imagenet-200")
    (tmp_path / "root" / "tinyimagenet").mkdir(parents=True)
    shutil.make_archive(str(tmp_path / "root" / "tinyimagenet" / "tiny-imagenet-200"), "zip",
                        tmp_path / "staging")
    splits = data.load("tinyimagenet", root=tmp_path / "root")
    assert splits.y_test.tolist() == [2, 0, 1]


def test_zip_escaping_its_folder_is_refused(tmp_path):
    folder = tmp_path / "root" / "tinyimagenet"
    folder.mkdir(parents=True)
    with zipfile.ZipFile(folder / "tiny-imagenet-200.zip", "w") as z:
        z.writestr("tiny-imagenet-200/../../escaped", b"bad")
    with pytest.raises(CorruptFileError, match="refusing"):
        data.load("tinyimagenet", root=tmp_path / "root")
    assert not (tmp_path / "escaped").exists()


def test_archive_download_unreachable_names_the_url(tmp_path, monkeypatch):
    def unreachable(url, timeout):
        raise TimeoutError("timed out")
    monkeypatch.setattr(urllib.request, "urlopen", unreachable)
    with pytest.raises(DatasetNotFoundError) as caught:
        data.load("cifar10", root=tmp_path, download=True)
    message = str(caught.value)
    assert cifar.ARCHIVE.url in message and "timed out" in message and "test_batch" in message
    assert list((tmp_path / "cifar10").iterdir()) == []


def test_tinyimagenet_bad_annotation_is_corrupt(tmp_path):
    top = tmp_path / "tinyimagenet" / "tiny-imagenet-200"
    write_tinyimagenet(top)
    with open(top / "val" / "val_annotations.txt", "a") as f:
        f.write("val_x.JPEG\tn99\t0\t0\t1\t1\n")
    with pytest.raises(CorruptFileError, match="line 4.*n99"):
        data.load("tinyimagenet", root=tmp_path)


def test_tinyimagenet_missing_is_named(tmp_path):
    top = tmp_path / "tinyimagenet" / "tiny-imagenet-200"
    write_tinyimagenet(top)
    (top / "wnids.txt").unlink()
    with pytest.raises(DatasetNotFoundError, match=f"{top.absolute()}.*wnids.txt"):
        data.load("tinyimagenet", root=tmp_path)


# --- synthetic sets and digits ---------------------------------------------------------------

@pytest.mark.parametrize("name, shape, n_pool, n_test, classes", [
    ("or2d", (2,), 200, 200, 2),
    ("gaussian10", (10,), 1000, 500, 2),
    ("regression2d", (1,), 200, 200, 1),
    ("digits", (1, 8, 8), 1438, 359, 10),
])
def test_small_sets_shapes_and_determinism(name, shape, n_pool, n_test, classes):
    splits = data.load(name, seed=5)
    assert splits.input_shape == shape and splits.num_classes == classes
    assert len(splits.x_train) + len(splits.x_val) == n_pool and len(splits.x_test) == n_test
    assert len(splits.x_val) == round(0.3 * n_pool)
    assert splits.x_train.dtype == torch.float32
    again, other = data.load(name, seed=5), data.load(name, seed=6)
    for field in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test"):
        assert torch.equal(getattr(splits, field), getattr(again, field))
    assert not torch.equal(splits.x_train, other.x_train)


def test_or2d_labels_follow_or():
    splits = data.load("or2d", seed=3)
    for x, y in ((splits.x_train, splits.y_train), (splits.x_test, splits.y_test)):
        corners = x.round().clamp(0, 1)
        assert torch.equal(y, (corners.sum(dim=1) > 0).long())
        assert (x - corners).std() == pytest.approx(0.1, rel=0.2)
    assert splits.y_train.dtype == torch.int64 and splits.mean == (0.0,) and splits.std == (1.0,)


def test_regression2d_follows_its_line():
    splits = data.load("regression2d", seed=2)
    assert splits.task == "regression" and splits.y_train.dtype == torch.float32
    design = torch.cat([splits.x_test, torch.ones(len(splits.x_test), 1)], dim=1)
    slope, intercept = torch.linalg.lstsq(design, splits.y_test[:, None]).solution.flatten()
    assert slope.item() == pytest.approx(2, abs=0.2) and intercept.item() == pytest.approx(1, abs=0.2)


def test_digits_test_split_is_the_same_for_every_seed():
    first, second = data.load("digits", seed=0), data.load("digits", seed=1)
    assert torch.equal(first.x_test, second.x_test) and torch.equal(first.y_test, second.y_test)
    assert not torch.equal(first.x_train, second.x_train)
    assert first.x_train.min() == 0 and first.x_train.max() == 1


# --- splits, arguments and the data root ------------------------------------------------------

def test_val_fraction_and_subset():
    splits = data.load("gaussian10", seed=1, val_fraction=0.5)
    assert len(splits.x_train) == len(splits.x_val) == 500
    small = splits.subset(50, seed=7)
    assert len(small.x_train) == len(small.y_train) == 50
    assert torch.equal(small.x_val, splits.x_val) and torch.equal(small.x_test, splits.x_test)
    assert torch.equal(small.x_train, splits.subset(50, seed=7).x_train)
    assert not torch.equal(small.x_train, splits.subset(50, seed=8).x_train)
    rows = {tuple(r.tolist()) for r in splits.x_train}
    assert all(tuple(r.tolist()) in rows for r in small.x_train)
    assert splits.subset(None, seed=0) is splits
    assert len(splits.subset(500, seed=0).x_train) == 500


@pytest.mark.parametrize("n_train", [0, 501, -1, 2.5, True, "10"])
def test_subset_rejects_bad_sizes(n_train):
    splits = data.load("gaussian10", val_fraction=0.5)
    with pytest.raises(PoisonReachError, match="n_train"):
        splits.subset(n_train, seed=0)


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(PoisonReachError) as caught:
        data.load("imagenet")
    assert all(name in str(caught.value) for name in data.names())
    assert {"digits", "mnist", "mnist17", "fashion-mnist", "cifar10", "tinyimagenet", "or2d",
            "gaussian10", "regression2d", "toy"} == set(data.names())


@pytest.mark.parametrize("fraction", [0, 1, -0.1, 1.5, math.nan, True, "0.3"])
def test_bad_val_fraction(fraction):
    with pytest.raises(PoisonReachError, match="val_fraction"):
        data.load("or2d", val_fraction=fraction)


@pytest.mark.parametrize("seed", [-1, 1.5, 2**32, None])
def test_bad_seed(seed):
    with pytest.raises(PoisonReachError, match="seed"):
        data.load("or2d", seed=seed)


def test_data_root_resolution_order(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("POISONREACH_DATA", raising=False)
    assert data.data_root() == tmp_path / "home" / ".cache" / "poisonreach"
    monkeypatch.setenv("POISONREACH_DATA", str(tmp_path / "env"))
    assert data.data_root() == tmp_path / "env"
    assert data.data_root(tmp_path / "arg") == tmp_path / "arg"
    assert data.data_root("~/x") == tmp_path / "home" / "x"


def test_load_reads_the_env_root(tmp_path, monkeypatch):
    write_mnist(tmp_path / "mnist", gz=True)
    monkeypatch.setenv("POISONREACH_DATA", str(tmp_path))
    assert len(data.load("mnist").x_test) == 10


def test_toy_is_the_exact_measure_of_appendix_c6():
    s = data.load("toy", seed=3)
    assert s.x_train.shape == (300, 1) and s.y_train.dtype == torch.int64
    for value, label in ((1.0, 1), (-1.0, 1), (0.0, 0)):
        rows = s.x_train[:, 0] == value
        assert rows.sum() == 100 and torch.all(s.y_train[rows] == label)
    assert torch.equal(s.x_val, s.x_test) and len(s.x_test) == 3
