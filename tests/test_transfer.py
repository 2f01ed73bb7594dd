"""Transfer victims (``--victim-model``): poisons made against one architecture, retrained on by another,
the drop measured against a clean model of the victim's architecture trained the same way."""

from __future__ import annotations

import json

import pytest
import torch

from poisonreach import data, models, training
from poisonreach.cli import main
from poisonreach.errors import PoisonReachError
from poisonreach.experiments.config import RunConfig

FAST = ["--train-size", "300", "--train-epochs", "3", "--attack", "gc-pgd", "--attack-option", "epochs=5", "--eps-w", "0.3",
        "--eps-d", "0.1", "--threads", "1", "--quiet"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("transfer")
    assert main(["run", *FAST, "--out", str(root / "lr")]) == 0
    assert main(["run", *FAST, "--victim-model", "nn", "--victim-seeds", "0", "1", "--out", str(root / "nn")]) == 0
    return root


def read(folder, name="metrics.json"):
    return json.loads((folder / name).read_text())


def test_the_victim_is_the_other_architecture_and_the_drop_is_against_its_clean_model(runs):
    metrics = read(runs / "nn")
    assert metrics["model"] == "lr" and metrics["victim_model"] == "nn" and metrics["victim_model_options"] == {}
    s = data.load("digits", seed=0).subset(300, seed=0)
    reference = training.train(models.create("nn", s.input_shape, 10, mean=s.mean, std=s.std, seed=0), s.x_train, s.y_train, seed=0, epochs=3)
    assert metrics["victim_clean_acc"] == training.accuracy(reference, s.x_test, s.y_test)
    result = metrics["results"][0]
    assert result["acc_drop"] == metrics["victim_clean_acc"] - result["poisoned_acc"]
    victim = models.load_model(runs / "nn" / "eps_d=0.1" / "retrained_model.pt")
    assert models.last_linear(victim).in_features == 784  # nn's hidden width, not lr's 64 pixels
    assert training.accuracy(victim, s.x_test, s.y_test) == result["poisoned_acc"]
    assert result["param_distance"] is None  # another architecture's parameters are not the target's
    assert 0 <= result["target_agreement"] <= 100
    clean_victim = models.load_model(runs / "nn" / "clean_victim_model.pt")
    assert all(torch.equal(p, q) for p, q in zip(clean_victim.state_dict().values(), reference.state_dict().values()))


def test_the_target_tau_and_poisons_are_the_targets_architectures(runs):
    own, transfer = read(runs / "lr"), read(runs / "nn")
    for key in ("clean_acc", "target_acc", "tau", "grad_norm_clean"):
        assert own[key] == transfer[key], key
    a, b = (torch.load(runs / name / "eps_d=0.1" / "poisons.pt", weights_only=True) for name in ("lr", "nn"))
    assert torch.equal(a["x"], b["x"]) and torch.equal(a["y"], b["y"])
    assert own["results"][0]["poisoned_acc"] != transfer["results"][0]["poisoned_acc"]
    assert "victim_model" not in own and own["results"][0]["param_distance"] is not None


def test_victim_seeds_train_clean_models_of_the_victims_architecture(runs):
    metrics = read(runs / "nn")
    assert (runs / "nn" / "clean_victim_model_seed=1.pt").is_file() and not (runs / "nn" / "clean_model_seed=1.pt").exists()
    assert metrics["victim_clean_acc_per_seed"][0] == metrics["victim_clean_acc"]
    result = metrics["results"][0]
    assert result["acc_drop_per_seed"] == [c - p for c, p in zip(metrics["victim_clean_acc_per_seed"], result["poisoned_acc_per_seed"])]
    assert result["param_distance_mean"] is None


def test_the_table_names_the_victim_and_its_reference(runs, capsys):
    from poisonreach.experiments.run import format_table

    text = format_table(read(runs / "nn"))
    assert "victim model nn (transfer), trained on clean data: " in text and "the reference of the drops" in text
    row = text.splitlines()[-1].split()
    assert "-" in row  # no parameter distance


def test_the_victim_model_is_part_of_the_runs_identity(runs, tmp_path, capsys):
    assert main(["run", *FAST, "--out", str(runs / "nn")]) == 2
    assert "victim_model" in capsys.readouterr().err
    assert main(["run", *FAST, "--victim-model", "nn", "--victim-seeds", "0", "1", "--out", str(runs / "nn")]) == 0  # resumes


def test_defending_a_transfer_run_measures_against_the_victims_clean_model(runs, tmp_path):
    import shutil

    from poisonreach.experiments.defend import defend

    run = tmp_path / "run"
    shutil.copytree(runs / "nn", run)
    summary = defend(run, "maxup", {"m": 2})
    metrics = read(run)
    r = summary["results"][0]
    assert r["acc_drop_defended"] == metrics["victim_clean_acc"] - r["defended_acc"]


@pytest.mark.parametrize("config, message", [
    (dict(protocol="official", victim_model="nn"), "--protocol official retrains the official script's logistic regression"),
    (dict(victim_model="vgg"), "unknown model 'vgg'"),
    (dict(victim_model_options={"width": 3}), "victim model options ['width'] are given but no victim model"),
    (dict(victim_model="nn", victim_model_options={"width": 3}), "model options ['width'] are for module.path:Class models; nn takes none"),
])
def test_bad_victim_models_are_refused(config, message):
    with pytest.raises(PoisonReachError) as e:
        RunConfig(**config).validate()
    assert message in str(e.value)


def test_a_sweep_over_victim_models(tmp_path):
    """A victim of the target's own architecture is the ordinary run; another gets its own clean reference."""
    from poisonreach.experiments.sweep import run_sweep
    from poisonreach.experiments.sweep_file import parse_sweep

    doc = {"name": "transfer", "run": {"train_size": 200, "eps_d": [0.1], "attack": "labelflip", "training": {"epochs": 2}},
           "grid": {"victim_model": [None, "lr", "nn"]}}
    plain, same, other = run_sweep(parse_sweep(doc, "test", lookup=None), tmp_path)
    assert plain["victim_model"] is None and plain["victim_clean_acc"] is None
    assert same["victim_model"] == "lr" and same["victim_clean_acc"] == plain["clean_acc"]
    assert (same["poisoned_acc"], same["acc_drop"]) == (plain["poisoned_acc"], plain["acc_drop"])
    assert other["victim_model"] == "nn" and other["acc_drop"] == pytest.approx(other["victim_clean_acc"] - other["poisoned_acc"])
    header = (tmp_path / "results.csv").read_text().splitlines()[0].split(",")
    assert "victim_model" in header and "victim_clean_acc" in header
