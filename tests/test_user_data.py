"""A user's own data set: ``npz:PATH`` and ``folder:PATH`` (poisonreach.data.user), split as the named sets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from poisonreach import data
from poisonreach.cli import main
from poisonreach.errors import PoisonReachError

DIGITS = load_digits()


def digits_npz(path: Path, **extra) -> Path:
    """scikit-learn's digits as the digits loader reads them: (N, 8, 8) floats in [0, 1], in file order."""
    np.savez(path, x=(DIGITS.images / 16.0).astype(np.float32), y=DIGITS.target, **extra)
    return path


def test_an_npz_without_a_test_split_is_split_exactly_as_digits(tmp_path):
    """The same fixed 20% test split and the same seeded 70/30 train/validation split as the named set."""
    own = data.load(f"npz:{digits_npz(tmp_path / 'digits.npz')}", seed=3)
    named = data.load("digits", seed=3)
    for field in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test", "train_index"):
        assert torch.equal(getattr(own, field), getattr(named, field)), field
    assert own.num_classes == 10 and own.task == "classification" and own.input_shape == (1, 8, 8)
    # the statistics the models normalise with are those of the images before the train/validation split
    pool = torch.cat([named.x_train, named.x_val])
    assert own.mean == pytest.approx((float(pool.double().mean()),), rel=1e-9)
    assert own.std == pytest.approx((float(pool.double().std()),), rel=1e-9)
    other = data.load(f"npz:{tmp_path / 'digits.npz'}", seed=4)
    assert torch.equal(other.x_test, own.x_test) and not torch.equal(other.x_train, own.x_train)


def test_a_given_test_split_is_kept_and_the_rest_split_by_the_seed(tmp_path):
    x, y = np.random.default_rng(0).integers(0, 256, (50, 4, 4), dtype=np.uint8), np.arange(50) % 3
    file = tmp_path / "own.npz"
    np.savez(file, x=x, y=y, x_test=x[:7], y_test=y[:7])
    s = data.load(f"npz:{file}", seed=0)
    assert torch.equal(s.x_test, torch.from_numpy(x[:7, None]).float() / 255) and torch.equal(s.y_test, torch.from_numpy(y[:7]))
    assert len(s.x_train) == 35 and len(s.x_val) == 15  # 70/30 of the 50 training points
    assert torch.equal(s.x_train, torch.from_numpy(x[:, None]).float()[s.train_index] / 255)  # rows of x, in file order


def test_uint8_channels_last_and_float_channels_first_are_the_same_images(tmp_path):
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (40, 6, 5, 3), dtype=np.uint8)  # N, H, W, C
    y = np.arange(40) % 2
    np.savez(tmp_path / "last.npz", x=rgb, y=y)
    np.savez(tmp_path / "first.npz", x=rgb.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255), y=y)
    last, first = data.load(f"npz:{tmp_path / 'last.npz'}"), data.load(f"npz:{tmp_path / 'first.npz'}")
    assert last.input_shape == first.input_shape == (3, 6, 5)
    assert torch.equal(last.x_train, first.x_train) and torch.equal(last.x_test, first.x_test)
    assert len(last.mean) == 3 and last.mean == pytest.approx(first.mean)
    # each channel's statistics are its own
    assert last.mean[0] == pytest.approx(float(torch.cat([last.x_train, last.x_val])[:, 0].double().mean()), rel=1e-9)


GOOD_X = np.zeros((20, 8, 8), np.float32)
GOOD_Y = np.arange(20) % 2
BAD_NPZ = {
    "no y": (dict(x=GOOD_X), "has no y (it holds x)"),
    "half a test split": (dict(x=GOOD_X, y=GOOD_Y, x_test=GOOD_X), "has x_test but not y_test: give both or neither"),
    "flat images": (dict(x=GOOD_X.reshape(20, 64), y=GOOD_Y), "x has shape (20, 64); give images as (N, H, W)"),
    "five channels": (dict(x=np.zeros((20, 8, 8, 5), np.float32), y=GOOD_Y), "with C = 1 or 3 channels"),
    "outside [0, 1]": (dict(x=GOOD_X + 2, y=GOOD_Y), "x ranges over [2, 2], outside [0, 1]: store 8-bit pixels as uint8"),
    "int64 pixels": (dict(x=GOOD_X.astype(np.int64), y=GOOD_Y), "x is int64; give uint8 pixels (0-255) or floats in [0, 1]"),
    "nan": (dict(x=np.where(np.arange(20)[:, None, None] == 4, np.nan, GOOD_X), y=GOOD_Y), "1 x image(s) hold NaN or infinite values (the first is x image 4)"),
    "fractional labels": (dict(x=GOOD_X, y=GOOD_Y + 0.5), "y is float64 with non-integer values"),
    "negative labels": (dict(x=GOOD_X, y=GOOD_Y - 1), "y holds the negative class -1"),
    "label count": (dict(x=GOOD_X, y=GOOD_Y[:5]), "y has shape (5,) but there are 20 images"),
    "one class": (dict(x=GOOD_X, y=np.zeros(20, np.int64)), "y holds one class only"),
    "test shape": (dict(x=GOOD_X, y=GOOD_Y, x_test=np.zeros((3, 4, 4), np.float32), y_test=GOOD_Y[:3]), "x_test images are (1, 4, 4) but x images (1, 8, 8)"),
    "objects": (dict(x=GOOD_X, y=np.array([object()] * 20)), "holds Python objects other than numeric arrays: refused"),
}


@pytest.mark.parametrize("case", list(BAD_NPZ))
def test_each_bad_npz_gets_one_line_and_leaves_no_run_folder(case, tmp_path, capsys):
    arrays, message = BAD_NPZ[case]
    file = tmp_path / "own.npz"
    np.savez(file, **arrays)
    out = tmp_path / "run"
    assert main(["run", "--dataset", f"npz:{file}", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("poisonreach: error: ") and message in err, err
    assert not (out / "config.yaml").exists()  # the corrected command may use the same folder


def test_a_pickle_in_an_npz_is_refused_without_running_it(tmp_path, capsys, canary):
    file = tmp_path / "own.npz"
    np.savez(file, x=GOOD_X, y=np.array([canary] * 20, dtype=object))
    assert main(["tau", "--dataset", f"npz:{file}"]) == 2
    assert "refused" in capsys.readouterr().err


@pytest.mark.parametrize("spec, message", [("npz:missing.npz", "no file"), ("folder:missing", "no folder"), ("npz:", "names no path"),
                                           ("mnist-ish", "the dataset must be one of")])
def test_a_data_set_that_is_not_there_is_named_before_any_work(spec, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["run", "--dataset", spec, "--out", "run"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


def image_folder(root: Path, classes: dict[str, int], size=(8, 8), mode="L", suffix=".png") -> dict[str, list[np.ndarray]]:
    """``root/<class>/<i><suffix>``: seeded random images, returned by class as uint8 arrays."""
    rng = np.random.default_rng(0)
    written = {}
    for name, count in classes.items():
        (root / name).mkdir(parents=True)
        shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
        written[name] = [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(count)]
        for i, pixels in enumerate(written[name]):
            Image.fromarray(pixels, mode).save(root / name / f"{i:03d}{suffix}")
    return written


def test_a_folder_of_class_folders_is_read_with_sorted_class_indices(tmp_path):
    written = image_folder(tmp_path / "set", {"zebra": 6, "ant": 9, "cat": 5})
    (tmp_path / "set" / "notes.txt").write_text("ignored")
    (tmp_path / "set" / "ant" / "README").write_text("ignored")
    (tmp_path / "set" / ".cache").mkdir()  # hidden folders are not classes
    s = data.load(f"folder:{tmp_path / 'set'}", seed=0)
    assert s.num_classes == 3 and s.input_shape == (1, 8, 8)
    x = torch.cat([s.x_train, s.x_val, s.x_test])
    y = torch.cat([s.y_train, s.y_val, s.y_test])
    assert len(x) == 20 and sorted(y.tolist()) == [0] * 9 + [1] * 5 + [2] * 6  # ant, cat, zebra
    for index, name in enumerate(["ant", "cat", "zebra"]):  # PNG is lossless: every image comes back exactly
        expected = {tuple(torch.from_numpy(p).float().div(255).flatten().tolist()) for p in written[name]}
        assert {tuple(row.flatten().tolist()) for row in x[y == index]} == expected


def test_rgb_jpegs_are_read_as_three_channels(tmp_path):
    image_folder(tmp_path / "set", {"a": 5, "b": 5}, size=(6, 4), mode="RGB", suffix=".JPG")
    s = data.load(f"folder:{tmp_path / 'set'}")
    assert s.input_shape == (3, 4, 6) and len(s.mean) == 3


def bad_folder(root: Path, case: str) -> Path:
    folder = root / "set"
    if case == "empty":
        folder.mkdir()
    elif case == "one class":
        image_folder(folder, {"a": 4})
    elif case == "empty class":
        image_folder(folder, {"a": 4})
        (folder / "b").mkdir()
    elif case == "sizes":
        image_folder(folder, {"a": 3})
        image_folder(root / "other", {"b": 3}, size=(9, 8))
        (root / "other" / "b").rename(folder / "b")
    elif case == "unreadable":
        image_folder(folder, {"a": 3, "b": 3})
        (folder / "b" / "001.png").write_bytes(b"not a png")
    elif case == "rgba":
        image_folder(folder, {"a": 3, "b": 3})
        Image.fromarray(np.zeros((8, 8, 4), np.uint8), "RGBA").save(folder / "b" / "001.png")
    return folder


@pytest.mark.parametrize("case, message", [
    ("empty", "holds 0 class folder(s) (none)"),
    ("one class", "holds 1 class folder(s) (a)"),
    ("empty class", "b holds no PNG or JPEG images"),
    ("sizes", "differ in mode or size"),
    ("unreadable", "001.png is not a readable image"),
    ("rgba", "001.png is a RGBA image: give 8-bit grayscale (L) or RGB images"),
])
def test_each_bad_folder_gets_one_line(case, message, tmp_path, capsys):
    folder = bad_folder(tmp_path, case)
    with pytest.raises(PoisonReachError) as e:
        data.load(f"folder:{folder}")
    assert message in str(e.value) and "\n" not in str(e.value)
    assert main(["tau", "--dataset", f"folder:{folder}"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err, err


def test_a_path_names_its_kind(tmp_path):
    from poisonreach.data.user import spec_of

    file = digits_npz(tmp_path / "d.npz")
    image_folder(tmp_path / "set", {"a": 3, "b": 3})
    assert spec_of(file) == f"npz:{file}" and spec_of(tmp_path / "set") == f"folder:{tmp_path / 'set'}"
    assert data.load(spec_of(file)).num_classes == 10
    with pytest.raises(PoisonReachError, match="no file or folder"):
        spec_of(tmp_path / "missing")
