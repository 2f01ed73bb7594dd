"""Poisons out and in: `poisonreach export` (npz, safetensors, png with a manifest) and `poisonreach
evaluate` (retrain on clean ∪ any poison file), end to end through the command line."""

from __future__ import annotations

import csv
import json
import math
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from poisonreach.attacks import PoisonResult
from poisonreach.cli import main

# a tiny run: 300 digits, 3 epochs, a label flip at eps_d = 0.1 (30 poisons), a few seconds
SETTINGS = ["--train-size", "300", "--train-epochs", "3"]


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "labelflip"
    assert main(["run", *SETTINGS, "--attack", "labelflip", "--eps-d", "0.1", "--out", str(out), "--quiet"]) == 0
    return out


def copy_run(run_dir: Path, tmp_path: Path, **poisons) -> Path:
    """The run folder with its cell's poisons replaced by a PoisonResult of the given fields."""
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    result = PoisonResult.load(copy / "eps_d=0.1")
    for key, value in poisons.items():
        setattr(result, key, value)
    result.save(copy / "eps_d=0.1")
    return copy


def evaluation(capsys, poisons, out: Path, *extra) -> dict:
    code, table, err = run_cli(capsys, "evaluate", "--poisons", poisons, *SETTINGS, "--out", out, *extra)
    assert code == 0, err
    assert "acc drop" in table
    return json.loads((out / "evaluation.json").read_text())


# poisons out


def test_export_writes_the_poisons_bit_exact_with_their_manifest(run_dir, tmp_path, capsys):
    code, out, err = run_cli(capsys, "export", run_dir, "--format", "npz", "--out", tmp_path)
    assert code == 0, err
    assert "eps_d=0.1: 30 poisons" in out
    poisons = PoisonResult.load(run_dir / "eps_d=0.1")
    with np.load(tmp_path / "eps_d=0.1" / "poisons.npz", allow_pickle=False) as f:
        assert sorted(f.files) == ["eps_d", "source_indices", "x", "y"]
        assert f["x"].dtype == np.float32 and f["x"].shape == (30, 1, 8, 8)
        assert f["y"].dtype == np.int64 and f["source_indices"].dtype == np.int64
        assert torch.equal(torch.from_numpy(f["x"]), poisons.x) and torch.equal(torch.from_numpy(f["y"]), poisons.y)
        assert torch.equal(torch.from_numpy(f["source_indices"]), poisons.source_indices)
        assert float(f["eps_d"]) == 0.1

    manifest = json.loads((tmp_path / "eps_d=0.1" / "manifest.json").read_text())
    assert manifest["format"] == "poisonreach-poisons" and manifest["format_version"] == 1
    assert manifest["file_format"] == "npz" and manifest["file"] == "poisons.npz"
    assert manifest["num_poisons"] == 30 and manifest["eps_d"] == 0.1 and manifest["labels"] == "classes"
    assert manifest["arrays"]["x"] == {"shape": [30, 1, 8, 8], "dtype": "float32"}
    assert manifest["arrays"]["y"] == {"shape": [30], "dtype": "int64"}
    assert manifest["value_range"] == [float(poisons.x.min()), float(poisons.x.max())]
    assert manifest["box"] is None  # label flip declares none: its poisons are copies of clean images
    assert manifest["training_set"] == {"dataset": "digits", "seed": 0, "train_size": 300, "split": "train", "num_train": 300}
    assert manifest["attack"] == "labelflip" and manifest["attack_config"] == poisons.config
    assert manifest["victim"] == {"model": "lr", "protocol": "honest", "training": {"epochs": 3}}


def test_safetensors_export_is_bit_exact(run_dir, tmp_path, capsys):
    safetensors = pytest.importorskip("safetensors.torch", reason="the safetensors format needs the safetensors package")
    assert run_cli(capsys, "export", run_dir, "--format", "safetensors", "--out", tmp_path, "--eps-d", "0.1")[0] == 0
    poisons = PoisonResult.load(run_dir / "eps_d=0.1")
    saved = safetensors.load_file(tmp_path / "eps_d=0.1" / "poisons.safetensors")
    assert saved["x"].dtype == torch.float32 and saved["y"].dtype == torch.int64
    assert torch.equal(saved["x"], poisons.x) and torch.equal(saved["y"], poisons.y)
    assert torch.equal(saved["source_indices"], poisons.source_indices) and saved["eps_d"].item() == 0.1
    assert json.loads((tmp_path / "eps_d=0.1" / "manifest.json").read_text())["file"] == "poisons.safetensors"


def test_png_export_writes_one_image_per_poison_and_labels_csv(run_dir, tmp_path, capsys):
    assert run_cli(capsys, "export", run_dir, "--format", "png", "--out", tmp_path)[0] == 0
    cell = tmp_path / "eps_d=0.1"
    poisons = PoisonResult.load(run_dir / "eps_d=0.1")
    assert len(list(cell.glob("*.png"))) == 30
    with open(cell / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["label"]) for r in rows] == poisons.y.tolist()
    assert [int(r["source_index"]) for r in rows] == poisons.source_indices.tolist()
    with Image.open(cell / rows[0]["file"]) as image:
        assert image.mode == "L" and image.size == (8, 8)
        assert np.array_equal(np.asarray(image), np.rint(poisons.x[0, 0].numpy() * 255).astype(np.uint8))
    png = json.loads((cell / "manifest.json").read_text())["png"]
    assert png["mode"] == "L" and png["clipped_values"] == 0 and png["clipped_poisons"] == 0


def test_png_export_counts_the_values_it_clips(run_dir, tmp_path, capsys):
    poisons = PoisonResult.load(run_dir / "eps_d=0.1")
    x = poisons.x.clone()
    x[0, 0, 0, :3] = torch.tensor([-0.5, 1.5, 2.0])  # an unboxed attack's poison
    run = copy_run(run_dir, tmp_path, x=x)
    assert run_cli(capsys, "export", run, "--format", "png", "--out", tmp_path / "png")[0] == 0
    manifest = json.loads((tmp_path / "png" / "eps_d=0.1" / "manifest.json").read_text())
    assert manifest["png"]["clipped_values"] == 3 and manifest["png"]["clipped_poisons"] == 1
    assert manifest["value_range"] == [-0.5, 2.0]


def test_soft_labels_are_refused_unless_allowed(run_dir, tmp_path, capsys):
    soft = torch.softmax(torch.randn(30, 10, generator=torch.Generator().manual_seed(0)), dim=1)
    run = copy_run(run_dir, tmp_path, y=soft)
    code, _, err = run_cli(capsys, "export", run, "--format", "npz", "--out", tmp_path / "out")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "relaxation" in err and "--allow-soft-labels" in err
    assert not (tmp_path / "out").exists()
    assert run_cli(capsys, "export", run, "--format", "npz", "--out", tmp_path / "out", "--allow-soft-labels")[0] == 0
    with np.load(tmp_path / "out" / "eps_d=0.1" / "poisons.npz") as f:
        assert f["y"].dtype == np.float32 and np.array_equal(f["y"], soft.numpy())
    assert json.loads((tmp_path / "out" / "eps_d=0.1" / "manifest.json").read_text())["labels"] == "soft"
    code, _, err = run_cli(capsys, "export", run, "--format", "png", "--out", tmp_path / "png", "--allow-soft-labels")
    assert code == 2 and "one class per image" in err


def test_export_names_the_cells_it_has(run_dir, tmp_path, capsys):
    code, _, err = run_cli(capsys, "export", run_dir, "--format", "npz", "--out", tmp_path, "--eps-d", "0.5")
    assert code == 2 and "no poisons at eps_d=0.5: its cells are 0.1" in err
    code, _, err = run_cli(capsys, "export", tmp_path, "--format", "npz", "--out", tmp_path / "out")
    assert code == 2 and "not a run folder" in err


# poisons in


def test_export_then_evaluate_gives_the_runs_own_numbers(run_dir, tmp_path, capsys):
    """The exported poisons retrain the same victim as the run's: the same seed, protocol and data."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    result = json.loads((run_dir / "eps_d=0.1" / "result.json").read_text())
    assert run_cli(capsys, "export", run_dir, "--format", "npz", "--out", tmp_path / "export")[0] == 0
    record = evaluation(capsys, tmp_path / "export" / "eps_d=0.1" / "poisons.npz", tmp_path / "npz", "--victim-seeds", "0", "1")
    assert record["victim_seeds"] == [0, 1] and record["num_poisons"] == 30 and record["num_train"] == 300
    assert record["clean_acc_per_seed"][0] == metrics["clean_acc"]
    assert record["poisoned_acc_per_seed"][0] == result["poisoned_acc"]
    assert record["acc_drop_per_seed"][0] == result["acc_drop"]
    assert record["victim_grad_norm_per_seed"][0] == pytest.approx(result["victim_grad_norm"], rel=1e-12)
    drops = record["acc_drop_per_seed"]
    assert drops == [c - p for c, p in zip(record["clean_acc_per_seed"], record["poisoned_acc_per_seed"])]
    assert record["acc_drop_mean"] == pytest.approx(sum(drops) / 2)
    assert record["acc_drop_std"] == pytest.approx(abs(drops[0] - drops[1]) / math.sqrt(2))
    # the run cell itself (poisons.pt) gives the same victim
    cell = evaluation(capsys, run_dir / "eps_d=0.1", tmp_path / "pt")
    assert cell["poisoned_acc_per_seed"] == [result["poisoned_acc"]] and cell["poisons"].endswith("poisons.pt")


def test_a_png_export_reads_back_to_within_its_8_bits(run_dir, tmp_path, capsys):
    from poisonreach import data
    from poisonreach.experiments.evaluate import poison_file, read_poisons

    assert run_cli(capsys, "export", run_dir, "--format", "png", "--out", tmp_path)[0] == 0
    splits = data.load("digits", seed=0).subset(300, seed=0)
    back = read_poisons(poison_file(tmp_path / "eps_d=0.1"), splits)
    poisons = PoisonResult.load(run_dir / "eps_d=0.1")
    assert torch.equal(back.y, poisons.y)
    assert (back.x - poisons.x).abs().max() <= 0.5 / 255 + 1e-7


def write_npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


GOOD_X, GOOD_Y = np.full((4, 1, 8, 8), 0.5, np.float32), np.array([0, 1, 2, 3])
BAD = {
    "empty": (dict(x=np.zeros((0, 1, 8, 8), np.float32), y=np.zeros(0, np.int64)), "holds no poisons"),
    "length": (dict(x=GOOD_X, y=GOOD_Y[:3]), "4 images but 3 labels"),
    "shape": (dict(x=GOOD_X.reshape(4, 64), y=GOOD_Y), "digits inputs have shape (1, 8, 8): give x as (4, 1, 8, 8)"),
    "integer pixels": (dict(x=(GOOD_X * 255).astype(np.uint8), y=GOOD_Y), "divide 8-bit pixels by 255"),
    "nan": (dict(x=np.where(np.arange(4)[:, None, None, None] == 2, np.nan, GOOD_X).astype(np.float32), y=GOOD_Y),
            "1 poison(s) hold NaN or infinite values (the first is poison 2)"),
    "inf": (dict(x=np.full((4, 1, 8, 8), np.inf, np.float32), y=GOOD_Y), "NaN or infinite"),
    "box": (dict(x=GOOD_X * 3 - 0.25, y=GOOD_Y), "x ranges over [1.25, 1.25], outside digits's pixel box [0, 1]: clip"),
    "fractional labels": (dict(x=GOOD_X, y=np.array([0, 1.5, 2, 3])), "non-integer labels (e.g. 1.5)"),
    "label range": (dict(x=GOOD_X, y=np.array([0, 1, 2, 10])), "labels range over 0..10, but the data set has classes 0..9"),
    "negative label": (dict(x=GOOD_X, y=np.array([-1, 1, 2, 3])), "labels range over -1..3"),
    "soft labels": (dict(x=GOOD_X, y=np.full((4, 10), 0.1)), "soft labels are a relaxation"),
    "no labels": (dict(x=GOOD_X), "has no y (it holds x)"),
    "objects": (dict(x=GOOD_X, y=np.array([object()] * 4)), "Python objects other than numeric arrays: refused"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_each_bad_poison_file_gets_one_line(case, tmp_path, capsys):
    arrays, message = BAD[case]
    file = write_npz(tmp_path / "poisons.npz", **arrays)
    code, out, err = run_cli(capsys, "evaluate", "--poisons", file, *SETTINGS)
    assert code == 2 and not out
    assert len(err.strip().splitlines()) == 1 and err.startswith("poisonreach: error: "), err
    assert message in err and str(file) in err, err


def test_whole_numbered_float_labels_are_classes(tmp_path, capsys):
    file = write_npz(tmp_path / "poisons.npz", x=GOOD_X.astype(np.float64), y=GOOD_Y.astype(np.float32))
    record = evaluation(capsys, file, tmp_path, "--quiet")
    assert record["num_poisons"] == 4 and record["eps_d"] == 4 / 300


class Canary:
    """Unpickling this would create a file: a loader that executes code leaves it behind."""

    path = None

    def __reduce__(self):
        return (open, (str(self.path), "w"))


@pytest.mark.parametrize("suffix", [".pt", ".npz"])
def test_files_that_would_run_code_are_refused_without_running_it(suffix, tmp_path, capsys):
    Canary.path = tmp_path / "executed"
    file = tmp_path / f"poisons{suffix}"
    if suffix == ".pt":
        torch.save({"x": torch.from_numpy(GOOD_X), "y": Canary()}, file)
    else:
        np.savez(file, x=GOOD_X, y=np.array([Canary()] * 4, dtype=object))
    code, _, err = run_cli(capsys, "evaluate", "--poisons", file, *SETTINGS)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "refused" in err, err
    assert not Canary.path.exists()
    pickle.loads(pickle.dumps(Canary())).close()  # the canary works: an unpickler that runs code creates the file
    assert Canary.path.exists()


def test_safetensors_poisons_are_evaluated(tmp_path, capsys):
    safetensors = pytest.importorskip("safetensors.torch", reason="the safetensors format needs the safetensors package")
    file = tmp_path / "poisons.safetensors"
    file.write_bytes(safetensors.save({"x": torch.from_numpy(GOOD_X), "y": torch.from_numpy(GOOD_Y)}))
    assert evaluation(capsys, file, tmp_path, "--quiet")["num_poisons"] == 4
    file.write_bytes(b"not a safetensors file")
    code, _, err = run_cli(capsys, "evaluate", "--poisons", file, *SETTINGS)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "not a readable .safetensors file" in err


@pytest.mark.parametrize("name, message", [("poisons.txt", "not a poison file"), ("missing.npz", "does not exist"),
                                           ("", "holds no poisons (none of poisons.pt"), ("poisons.pt", "cannot be loaded as tensors"),
                                           ("poisons.npz", "not a readable .npz archive")])
def test_what_is_not_a_poison_file_is_named(name, message, tmp_path, capsys):
    path = tmp_path / name
    if name not in ("", "missing.npz"):
        path.write_text("damaged")
    code, _, err = run_cli(capsys, "evaluate", "--poisons", path, *SETTINGS)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_the_clean_points_a_replacing_attack_keeps_travel_with_the_poisons(run_dir, tmp_path, capsys):
    from poisonreach import data
    from poisonreach.experiments.evaluate import read_poisons

    kept = torch.arange(0, 300, 2)
    run = copy_run(run_dir, tmp_path, kept_indices=kept)
    assert run_cli(capsys, "export", run, "--format", "npz", "--out", tmp_path / "out")[0] == 0
    file = tmp_path / "out" / "eps_d=0.1" / "poisons.npz"
    assert json.loads((file.parent / "manifest.json").read_text())["arrays"]["kept_indices"] == {"shape": [150], "dtype": "int64"}
    splits = data.load("digits", seed=0).subset(300, seed=0)
    back = read_poisons(file, splits)
    assert torch.equal(back.kept_indices, kept)
    X_mix, _ = back.mixed(splits.x_train, splits.y_train)
    assert len(X_mix) == 150 + 30
    bad = write_npz(tmp_path / "bad.npz", x=GOOD_X, y=GOOD_Y, kept_indices=np.array([0, 300]))
    code, _, err = run_cli(capsys, "evaluate", "--poisons", bad, *SETTINGS)
    assert code == 2 and "kept_indices must be integer rows of the 300-point training split" in err and "range 0..300" in err
