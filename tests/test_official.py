"""The official protocol: the official code's GC (OfficialGradientCanceling) and retraining
(training.official_retrain), run as ``protocol: official`` (experiments/official.py).

On 300 digits (nothing to download, nothing skips):
- the attack: its objective is ‖Σ_clean ∇_W ℓ + Σ_poisons ∇_W ℓ‖ over the first weight tensor with
  the poisons in normalised space (an independent full-batch autograd computation agrees), its
  gradient matches central finite differences, the objective decreases, it starts from the first m
  points in order, returns pixel-space poisons with their range recorded, and is deterministic;
- the retraining: one test accuracy per epoch, min ≤ median ≤ max, float64, plain full-batch
  gradient descent when the batch holds every point (checked step by step), seeded;
- the run: the new fields are written and consistent (both clean references, the drops, the
  spread over epochs and over victim seeds), the poisons start from the first training images in
  file order, a second run gives the same numbers, resuming retrains nothing; the CLI and sweeps
  carry the protocol; other models and data sets are refused in one line.
"""

from __future__ import annotations

import copy
import csv
import statistics

import pytest
import torch
import yaml

from poisonreach import data, io, models
from poisonreach.data import synthetic
from poisonreach.attacks import ATTACKS, OfficialGradientCanceling, PoisonResult
from poisonreach.cli import main
from poisonreach.errors import PoisonReachError
from poisonreach.experiments.config import RunConfig, load_data
from poisonreach.experiments.official import file_order
from poisonreach.experiments.run import format_table, run
from poisonreach.experiments.sweep import OFFICIAL_COLUMNS, format_results, load_sweep, run_sweep
from poisonreach.losses import cross_entropy
from poisonreach.targets import GradPC
from poisonreach.training import accuracy, official_retrain, train


@pytest.fixture(scope="module")
def small():
    """300 digits, a clean LR and a GradPC target."""
    s = data.load("digits", seed=0).subset(300, seed=0)
    clean = train(models.create("lr", s.input_shape, 10, mean=s.mean, std=s.std, seed=0), s.x_train, s.y_train, epochs=3, progress=False)
    target = GradPC(eps_w=1.0).generate(clean, s.x_train, s.y_train)
    return s, clean, target


def full_batch_objective(model, X, y, z, yp):
    """‖Σ_clean ∇_W ℓ + Σ_poisons ∇_W ℓ‖ with W = the head's weight, the poisons fed as normalised
    inputs straight to the linear layer (as the official script feeds its nn.Linear)."""
    head = copy.deepcopy(model.head).double()
    mean, std = model.normalize.mean.double(), model.normalize.std.double()
    Xn = ((X.double() - mean) / std).flatten(1)
    g_clean = torch.autograd.grad(cross_entropy(head(Xn), y).sum(), head.weight)[0]
    g_poison = torch.autograd.grad(cross_entropy(head(z.flatten(1)), yp).sum(), head.weight, create_graph=True)[0]
    return torch.linalg.vector_norm(g_clean + g_poison)


def test_the_objective_is_the_unsquared_summed_first_tensor_norm_in_normalised_space(small):
    s, _, target = small
    X, y = s.x_train, s.y_train
    attack = OfficialGradientCanceling(0.1)
    p = attack.problem(target, X, y)
    assert [tuple(t.shape) for t in p.params] == [tuple(target.head.weight.shape)]  # the first tensor: the weight, not the bias
    z = torch.randn((30, *s.input_shape), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    yp = y[:30]
    assert p.residual(z, yp)[1] == pytest.approx(float(full_batch_objective(target, X, y, z, yp).detach()), rel=1e-10)


def test_the_gradient_matches_finite_differences(small):
    s, _, target = small
    X, y = s.x_train, s.y_train
    p = OfficialGradientCanceling(0.1).problem(target, X, y)
    gen = torch.Generator().manual_seed(1)
    z = torch.randn((30, *s.input_shape), generator=gen, dtype=torch.float64)
    yp = y[:30]
    v, norm = p.residual(z, yp)
    grad = p.gradient(z, yp, v, norm)
    # against autograd of the independent full-batch objective
    zz = z.clone().requires_grad_(True)
    auto = torch.autograd.grad(full_batch_objective(target, X, y, zz, yp), zz)[0]
    assert torch.allclose(grad, auto, rtol=1e-8, atol=1e-10)
    # and against central differences along random directions
    h = 1e-5
    for _ in range(3):
        d = torch.randn(z.shape, generator=gen, dtype=torch.float64)
        fd = (p.residual(z + h * d, yp)[1] - p.residual(z - h * d, yp)[1]) / (2 * h)
        assert float((grad * d).sum()) == pytest.approx(fd, rel=1e-5)


def test_the_objective_decreases_and_the_history_is_it_over_n(small):
    s, _, target = small
    X, y = s.x_train, s.y_train
    result = OfficialGradientCanceling(0.1, epochs=50, progress=False).poison(target, X, y)
    objective = result.extra["objective_history"]
    assert len(objective) == 51 and result.extra["stopped_at_epoch"] is None
    assert objective[-1] < 0.9 * objective[0]
    assert objective[-1] <= min(objective[:10])
    assert result.grad_norm_history == pytest.approx([o / len(X) for o in objective])
    # the first entry is the objective at the start points, computed independently
    z0 = ((X[:30].double() - target.normalize.mean.double()) / target.normalize.std.double())
    assert objective[0] == pytest.approx(float(full_batch_objective(target, X, y, z0, y[:30]).detach()), rel=1e-10)


def test_it_starts_from_the_first_m_points_in_order(small):
    s, _, target = small
    X, y = s.x_train, s.y_train
    result = OfficialGradientCanceling(0.1, epochs=0).poison(target, X, y)
    assert result.x.dtype == torch.float64 and len(result.x) == 30
    assert torch.equal(result.source_indices, torch.arange(30))
    assert torch.equal(result.y, y[:30])
    assert torch.allclose(result.x, X[:30].double(), atol=1e-12)  # pixel space: x = z·std + mean
    # another order of the same data: the first m rows of that order
    perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(3))
    again = OfficialGradientCanceling(0.1, epochs=0).poison(target, X[perm], y[perm])
    assert torch.allclose(again.x, X[perm[:30]].double(), atol=1e-12)


def test_poisons_are_pixels_outside_the_box_and_say_how_far(small, tmp_path):
    s, _, target = small
    X, y = s.x_train, s.y_train
    result = OfficialGradientCanceling(0.1, epochs=30).poison(target, X, y)
    x = result.x
    assert result.extra["pixel_min"] == float(x.min()) and result.extra["pixel_max"] == float(x.max())
    assert result.extra["fraction_outside_unit_box"] == pytest.approx(float(((x < 0) | (x > 1)).double().mean()))
    assert x.min() < 0 or x.max() > 1  # unbounded steps of lr 10: the poisons are not images
    # the saved set round-trips with its labels of what it is
    loaded = PoisonResult.load(result.save(tmp_path))
    assert torch.equal(loaded.x, x) and loaded.extra["pixel_max"] == result.extra["pixel_max"]


def test_the_attack_is_deterministic_and_stops_below_its_threshold(small):
    s, _, target = small
    X, y = s.x_train, s.y_train
    a = OfficialGradientCanceling(0.1, epochs=10).poison(target, X, y)
    b = OfficialGradientCanceling(0.1, epochs=10).poison(target, X, y)
    assert torch.equal(a.x, b.x) and a.grad_norm_history == b.grad_norm_history
    stop = OfficialGradientCanceling(0.1, epochs=10, stop_below=1e9).poison(target, X, y)
    assert stop.extra["stopped_at_epoch"] == 0 and torch.allclose(stop.x, X[:30].double(), atol=1e-12)


def test_the_retrain_records_one_accuracy_per_epoch(small):
    s, _, _ = small
    X, y = s.x_train, s.y_train
    fresh = lambda seed: models.create("lr", s.input_shape, 10, mean=s.mean, std=s.std, seed=seed)  # noqa: E731
    result = official_retrain(fresh(0), X, y, s.x_test, s.y_test, epochs=7, batch_size=64, seed=0)
    accs = result.test_acc_per_epoch
    assert len(accs) == 7 and result.final_acc == accs[-1]
    summary = result.summary()
    assert summary["retrain_acc_min"] <= summary["retrain_acc_median"] <= summary["retrain_acc_max"]
    assert summary["retrain_acc_median"] == statistics.median(accs) and summary["retrain_acc_per_epoch"] == accs
    assert all(p.dtype == torch.float64 for p in result.model.parameters())
    # the last epoch's accuracy is the model's
    assert accuracy(result.model, s.x_test.double(), s.y_test) == accs[-1]
    same = official_retrain(fresh(0), X, y, s.x_test, s.y_test, epochs=7, batch_size=64, seed=0)
    other = official_retrain(fresh(1), X, y, s.x_test, s.y_test, epochs=7, batch_size=64, seed=1)
    assert same.test_acc_per_epoch == accs and other.test_acc_per_epoch != accs


def test_the_retrain_is_plain_sgd_in_float64(small):
    """With one batch per epoch (300 points, batch 10,000) every epoch is one gradient step
    w ← w − 0.1·∇ mean loss, whatever the shuffle: checked against steps taken by hand."""
    s, _, _ = small
    X, y = s.x_train, s.y_train
    model = models.create("lr", s.input_shape, 10, mean=s.mean, std=s.std, seed=0)
    by_hand = copy.deepcopy(model).double()
    official_retrain(model, X, y, s.x_test, s.y_test, epochs=3, seed=5)
    for _ in range(3):
        loss = cross_entropy(by_hand(X.double()), y).mean()
        grads = torch.autograd.grad(loss, list(by_hand.parameters()))
        with torch.no_grad():
            for p, g in zip(by_hand.parameters(), grads):
                p -= 0.1 * g
    for a, b in zip(model.parameters(), by_hand.parameters()):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)


def test_the_split_knows_its_file_order():
    s = data.load("digits", seed=0)
    everything = synthetic.digits()  # the pool in its original order
    assert torch.equal(s.x_train, everything.x_train[s.train_index])
    sub = s.subset(100, seed=2)
    assert torch.equal(sub.x_train, everything.x_train[sub.train_index])
    order = file_order(sub)
    assert torch.equal(sub.train_index[order], sub.train_index.sort().values)


# -- the run ---------------------------------------------------------------------------------------

BASE = dict(train_size=300, eps_d=[0.1], protocol="official", attack_options={"epochs": 20}, training={"epochs": 3})


@pytest.fixture(scope="module")
def official_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("official") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("poisonreach.experiments.run.plot_run", lambda out: [])
        metrics = run(RunConfig(**BASE, victim_seeds=[0, 1]), out)
    return out, metrics


def test_the_run_writes_the_official_fields(official_run):
    out, metrics = official_run
    r = metrics["results"][0]
    assert metrics["protocol"] == "official" and io.read_yaml(out / "config.yaml")["protocol"] == "official"
    assert io.read_json(out / "eps_d=0.1" / "poisons.json")["config"]["attack"] == "gc-official"
    accs = r["retrain_acc_per_epoch"]
    assert len(accs) == 100 and r["poisoned_acc"] == accs[-1]
    assert r["retrain_acc_min"] == min(accs) and r["retrain_acc_max"] == max(accs) and r["retrain_acc_median"] == statistics.median(accs)
    assert r["retrain_acc_min"] <= r["retrain_acc_median"] <= r["retrain_acc_max"]
    # both clean references, and the drop against each
    assert r["acc_drop"] == pytest.approx(metrics["clean_acc"] - r["poisoned_acc"])
    assert r["acc_drop_vs_official_clean"] == pytest.approx(metrics["official_clean_acc"] - r["poisoned_acc"])
    assert len(metrics["official_clean_acc_per_epoch"]) == 100 and metrics["official_clean_acc"] == metrics["official_clean_acc_per_epoch"][-1]
    assert "Adadelta" in r["acc_drop_reference"]
    # how far the poisons leave [0, 1]
    poisons = PoisonResult.load(out / "eps_d=0.1")
    assert r["poison_pixel_min"] == float(poisons.x.min()) and r["poison_pixel_max"] == float(poisons.x.max())
    assert 0 < r["poison_fraction_outside_unit_box"] <= 1
    # the honest fields are there too
    for key in ("target_agreement", "victim_grad_norm", "param_distance", "grad_norm_ratio"):
        assert key in r


def test_the_run_spreads_over_victim_seeds(official_run):
    out, metrics = official_run
    r = metrics["results"][0]
    assert r["victim_seeds"] == [0, 1] and metrics["victim_seeds"] == [0, 1]
    assert r["poisoned_acc_per_seed"][0] == r["poisoned_acc"]
    assert all(len(a) == 100 for a in r["retrain_acc_per_epoch_per_seed"])
    assert r["retrain_acc_min_per_seed"] == [min(a) for a in r["retrain_acc_per_epoch_per_seed"]]
    assert r["acc_drop_per_seed"] == pytest.approx([c - p for c, p in zip(r["clean_acc_per_seed"], r["poisoned_acc_per_seed"])])
    assert r["acc_drop_vs_official_clean_per_seed"] == pytest.approx(
        [c - p for c, p in zip(r["official_clean_acc_per_seed"], r["poisoned_acc_per_seed"])])
    assert r["poisoned_acc_mean"] == pytest.approx(statistics.mean(r["poisoned_acc_per_seed"]))
    assert r["acc_drop_std"] == pytest.approx(statistics.stdev(r["acc_drop_per_seed"]))
    assert r["official_clean_acc_per_seed"] == metrics["official_clean_acc_per_seed"]
    # seed 1's victim is its own retraining: another initialisation and shuffle
    assert r["retrain_acc_per_epoch_per_seed"][0] != r["retrain_acc_per_epoch_per_seed"][1]
    table = format_table(metrics)
    assert "official protocol" in table and "epochs min–max (all seeds)" in table and "drop vs SGD clean" in table


def test_the_poisons_start_from_the_first_training_images_in_file_order(official_run):
    out, _ = official_run
    config = RunConfig(**BASE, victim_seeds=[0, 1])
    splits, _ = load_data(config)
    poisons = PoisonResult.load(out / "eps_d=0.1")
    first = file_order(splits)[:30]
    assert torch.equal(poisons.source_indices, first)
    assert splits.train_index[first].tolist() == sorted(splits.train_index.tolist())[:30]
    assert torch.equal(poisons.y, splits.y_train[first])


def test_the_run_is_deterministic_and_resumes_without_retraining(official_run, tmp_path):
    out, metrics = official_run
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("poisonreach.experiments.run.plot_run", lambda out: [])
        again = run(RunConfig(**BASE, victim_seeds=[0, 1]), tmp_path / "again")
        stamps = {p: p.stat().st_mtime_ns for p in sorted(out.rglob("*.pt"))}
        resumed = run(RunConfig(**BASE, victim_seeds=[0, 1]), out)
        assert {p: p.stat().st_mtime_ns for p in sorted(out.rglob("*.pt"))} == stamps
    timeless = lambda r: {k: v for k, v in r.items() if not k.endswith("time_s")}  # noqa: E731
    assert [timeless(r) for r in again["results"]] == [timeless(r) for r in metrics["results"]]
    assert [timeless(r) for r in resumed["results"]] == [timeless(r) for r in metrics["results"]]
    assert again["official_clean_acc_per_epoch"] == metrics["official_clean_acc_per_epoch"]


def test_protocol_is_part_of_the_run_and_gc_means_the_official_gc():
    honest, official = RunConfig(), RunConfig(protocol="official")
    assert honest.protocol == "honest" and honest.attack_name == "gc"
    assert official.attack_name == "gc-official" and isinstance(official.make_attacks()[0], OfficialGradientCanceling)
    assert ATTACKS["gc-official"] is OfficialGradientCanceling
    assert RunConfig(protocol="official", attack="labelflip").attack_name == "labelflip"
    saved = {k: v for k, v in honest.to_dict().items() if k != "protocol"}  # written before the field existed
    assert honest.differing_keys(saved) == [] and official.differing_keys(saved) == ["protocol"]


@pytest.mark.parametrize("changes, fragment", [
    (dict(model="nn"), "supports only --model lr"),
    (dict(dataset="or2d"), "supports only MNIST-like data"),
    (dict(preset="paper"), "not a setting of the gc-official attack"),
    (dict(attack_options={"box": None}), "unknown gc-official attack option"),
])
def test_other_models_and_settings_are_refused_in_one_line(changes, fragment):
    with pytest.raises(PoisonReachError, match=fragment) as info:
        RunConfig(protocol="official", **changes).validate()
    assert "\n" not in str(info.value)
    with pytest.raises(PoisonReachError, match="protocol"):
        RunConfig(protocol="paper").validate()


def test_the_command_line_and_sweeps_carry_the_protocol(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("poisonreach.experiments.run.plot_run", lambda out: [])
    assert main(["run", "--protocol", "official", "--train-size", "200", "--eps-d", "0.1", "--attack-option", "epochs=3",
                 "--train-epochs", "2", "--out", str(tmp_path / "cli"), "--quiet"]) == 0
    assert "drop vs SGD clean" in capsys.readouterr().out
    assert io.read_yaml(tmp_path / "cli" / "config.yaml")["protocol"] == "official"
    assert main(["run", "--protocol", "official", "--model", "nn", "--out", str(tmp_path / "nn")]) == 2
    assert "supports only --model lr" in capsys.readouterr().err
    # gc is Gauss-Newton under the honest protocol and the official code's GC under the official one
    doc = {"name": "official", "run": {"train_size": 200, "eps_d": [0.1], "training": {"epochs": 2}},
           "grid": {"protocol+attack_options": [["honest", {"iterations": 3}], ["official", {"epochs": 3}]]}}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(doc))
    rows = run_sweep(load_sweep(tmp_path / "sweep.yaml", lookup=None), tmp_path / "sweep")
    honest, official = rows
    assert honest["protocol"] == "honest" and official["protocol"] == "official"
    assert all(honest[k] is None for k in OFFICIAL_COLUMNS) and all(official[k] is not None for k in OFFICIAL_COLUMNS)
    # the residual floor bounds the honest GC's ratio; the official GC's unbounded poisons have none
    assert 0 <= honest["residual_floor_ratio"] <= honest["grad_norm_ratio"] and official["residual_floor_ratio"] is None
    assert "floor ratio" in format_results(rows)
    with open(tmp_path / "sweep" / "results.csv", newline="") as f:
        assert [r["protocol"] for r in csv.DictReader(f)] == ["honest", "official"]
