"""The ResNet rows of Table 2 run end to end with their shipped ``cpu`` profile.

The shipped sweeps ``table2-cifar10`` (ResNet-18) and ``table2-tinyimagenet`` (ResNet-34) go
through ``poisonreach sweep NAME --profile cpu`` (the CLI, in this process) on tiny
synthetic data sets written in the original on-disk formats (``poisonreach.data.fake_files``), read by the real
loaders. Overrides shrink sizes only (training points, epochs, batch sizes); the data set, model,
target, attack, ε_d and every other setting are the shipped profile's, which the test checks
against the run's saved config. About 10 s for CIFAR-10 and 30 s for TinyImageNet at one thread.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch

from poisonreach.data import fake_files as fakedata
from poisonreach import data, io
from poisonreach.attacks import PoisonResult
from poisonreach.cli import main
from poisonreach.experiments.config import cell_name
from poisonreach.experiments.sweep_file import load_sweep
from poisonreach.rows import dense

N_TRAIN = 8  # GC makes max(1, round(n·ε_d)) poisons: one per budget here
SHRINK = {"train_size": N_TRAIN, "training.epochs": 1, "training.batch_size": 4, "attack_options.epochs": 2, "attack_options.block_size": 1}


def write_cifar(root: Path) -> None:
    fakedata.write_cifar(root / "cifar10" / "cifar-10-batches-py", per_batch=3, test_size=4)  # 11 train, 4 val, 4 test


def write_tinyimagenet(root: Path) -> None:
    # 4 of the 200 classes: 8 train, 4 val, 4 test
    fakedata.write_tinyimagenet(root / "tinyimagenet" / "tiny-imagenet-200", wnids=4, train_per_class=3, val_per_class=1)


CASES = [
    pytest.param("table2-cifar10", "cifar10", "resnet18", write_cifar, (3, 32, 32), 10, id="cifar10-resnet18"),
    pytest.param("table2-tinyimagenet", "tinyimagenet", "resnet34", write_tinyimagenet, (3, 64, 64), 200, id="tinyimagenet-resnet34"),
]


def finite(value: str) -> float:
    number = float(value)
    assert math.isfinite(number), value
    return number


@pytest.mark.slow
@pytest.mark.parametrize("name, dataset, model, write, shape, classes", CASES)
def test_shipped_cpu_profile_runs_end_to_end(tmp_path, monkeypatch, name, dataset, model, write, shape, classes):
    write(tmp_path / "data")
    monkeypatch.setenv("POISONREACH_DATA", str(tmp_path / "data"))  # the config's data_root stays the shipped None
    overrides = [f"run.{key}={value}" for key, value in SHRINK.items()]
    out = tmp_path / "sweep"
    assert main(["sweep", name, "--profile", "cpu", "--out", str(out), "--quiet", *overrides]) == 0

    # what ran is the shipped cpu profile, but for the shrunk sizes
    (cid, shipped), = load_sweep(name, profile="cpu").cells
    assert (shipped.dataset, shipped.model, shipped.attack) == (dataset, model, "gc-pgd")
    expected = shipped.to_dict()
    for key, value in SHRINK.items():
        *parents, last = key.split(".")
        section = expected
        for parent in parents:
            section = section[parent]
        section[last] = value
    run_dir = out / "cells" / cid
    assert io.read_yaml(run_dir / "config.yaml") == io.plain(expected)

    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["eps_d"] for row in rows] == [str(e) for e in shipped.eps_d]  # one row per budget
    for row in rows:
        assert (row["dataset"], row["model"], row["attack"]) == (dataset, model, "gc-pgd")
        clean, poisoned = finite(row["clean_acc"]), finite(row["poisoned_acc"])
        assert 0 <= clean <= 100 and 0 <= poisoned <= 100 and 0 <= finite(row["target_acc"]) <= 100
        assert finite(row["acc_drop"]) == pytest.approx(clean - poisoned)
        assert finite(row["tau"]) >= 0 and finite(row["grad_norm_ratio"]) >= 0

    for eps_d in shipped.eps_d:
        poisons = PoisonResult.load(run_dir / cell_name(eps_d))
        assert poisons.x.shape == (max(1, round(N_TRAIN * eps_d)), *shape)
        assert torch.isfinite(poisons.x).all() and poisons.x.min() >= 0 and poisons.x.max() <= 1  # GC's box [0, 1]
        assert poisons.y.dtype == torch.int64 and ((0 <= poisons.y) & (poisons.y < classes)).all()
        assert len(poisons.grad_norm_history) == SHRINK["attack_options.epochs"] + 1


@pytest.mark.parametrize("dataset", ["cifar10", "tinyimagenet"])
def test_synthetic_images_have_class_structure(tmp_path, dataset):
    """Through the real loaders, the nearest class mean of the training images classifies the test
    images: the data carry their labels (pure noise would give chance, 10% or 25%)."""
    if dataset == "cifar10":
        fakedata.write_cifar(tmp_path / "cifar10" / "cifar-10-batches-py", per_batch=60, test_size=100)
    else:
        fakedata.write_tinyimagenet(tmp_path / "tinyimagenet" / "tiny-imagenet-200", wnids=4, train_per_class=10, val_per_class=5)
    s = data.load(dataset, root=tmp_path)
    present = s.y_train.unique()
    means = torch.stack([s.x_train[s.y_train == c].mean(0) for c in present]).flatten(1)
    predicted = present[torch.cdist(dense(s.x_test).flatten(1), means).argmin(1)]
    assert (predicted == s.y_test).float().mean() >= 0.9
