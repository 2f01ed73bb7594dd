"""``--target select`` (poisonreach.experiments.selection): candidates from GradPC and planted label
flips, τ on the training split, validation accuracy only, GC tried lowest validation accuracy first
until one is reached, every candidate recorded, resumed without redoing an attempt."""

from __future__ import annotations

import math

import pytest

from poisonreach import io, models, training
from poisonreach.attacks import GaussNewtonCanceling, LabelFlip
from poisonreach.errors import PoisonReachError
from poisonreach.experiments import selection as selection_module
from poisonreach.experiments.config import RunConfig
from poisonreach.experiments.run import format_table, run
from poisonreach.experiments.selection import SELECT_DEFAULTS, TargetSelection, check_select_options
from poisonreach.reachability import threshold
from poisonreach.targets import GradPC

OPTIONS = {"eps_w": [0.25, 0.5, 2.0], "flip_eps_d": [0.3], "flip_factors": []}


def test_planted_budgets_follow_eps_d(digits_lr, tmp_path):
    s, clean = digits_lr
    sel = TargetSelection({"eps_w": [], "flip_factors": [1.0, 2.0], "flip_eps_d": [0.2]}, clean, s.x_train, s.y_train, s, fit_for(s),
                          save_for(s), tmp_path, weight_decay=0.0, seed=0)
    assert [c.budget for c in sel.candidates(0.1)] == [0.1, 0.2]  # 2·0.1 and the absolute 0.2 are one candidate
    assert [c.budget for c in sel.candidates(0.03)] == [0.03, 0.06, 0.2]
    assert sorted(sel.built) == ["labelflip-eps_d=0.03", "labelflip-eps_d=0.06", "labelflip-eps_d=0.1", "labelflip-eps_d=0.2"]


def test_select_options_defaults_and_errors():
    assert check_select_options({}) == SELECT_DEFAULTS
    assert check_select_options({"eps_w": []})["eps_w"] == []
    for bad, match in [({"grid": [1]}, "unknown option"), ({"eps_w": 1.0}, "list of positive numbers"),
                       ({"flip_eps_d": [0.1, -1]}, "list of positive numbers"), ({"eps_w": [], "flip_eps_d": [], "flip_factors": []}, "no candidates"),
                       ({"reach": 2.0}, "reach"), ({"flip_strategy": "worst"}, "flip_strategy")]:
        with pytest.raises(PoisonReachError, match=match):
            check_select_options(bad)


def fit_for(s):
    return lambda X, y: training.train(models.create("lr", s.input_shape, 10, mean=s.mean, std=s.std, seed=0), X, y,
                                       epochs=5, batch_size=16, progress=False)


def save_for(s):
    def save(model, path):
        models.save_model(model, path, name="lr", input_shape=s.input_shape, num_classes=10, mean=s.mean, std=s.std)
        return model
    return save


@pytest.fixture(scope="module")
def chosen(digits_lr, tmp_path_factory):
    s, clean = digits_lr
    tmp_path = tmp_path_factory.mktemp("select")
    seen, attacks = [], []
    real_accuracy, real_poison = selection_module.accuracy, GaussNewtonCanceling.poison

    def counting(self, model, X, y, loss=None):
        attacks.append(self)
        return real_poison(self, model, X, y, loss)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(selection_module, "accuracy", lambda m, Xa, ya, **kw: seen.append(Xa) or real_accuracy(m, Xa, ya, **kw))
        patch.setattr(GaussNewtonCanceling, "poison", counting)
        sel = TargetSelection(OPTIONS, clean, s.x_train, s.y_train, s, fit_for(s), save_for(s), tmp_path / "candidates",
                              weight_decay=0.0, seed=0)
        attack = GaussNewtonCanceling(0.1, iterations=30, checkpoint=tmp_path / "cell" / "checkpoint.pt")
        target, poisons, records = sel.choose(attack, tmp_path / "cell")
        yield s, clean, sel, target, poisons, records, seen, attacks, attack, tmp_path


def test_candidates_are_the_grid_and_the_planted_flips(chosen):
    s, clean, sel, *_ = chosen
    X, y = s.x_train, s.y_train
    candidates = sel.candidates(0.1)
    assert [c.name for c in candidates] == ["gradpc-eps_w=0.25", "gradpc-eps_w=0.5", "gradpc-eps_w=2", "labelflip-eps_d=0.3"]
    for c in candidates[:3]:
        target = GradPC(float(c.name.split("=")[1])).generate(clean, X, y)  # deterministic: the same target again
        assert c.tau == pytest.approx(threshold(target, X, y).tau, rel=1e-9) and c.budget is None
    planted = fit_for(s)(*LabelFlip(0.3, strategy="least-likely").poison(clean, X, y).mixed(X, y, 10))
    assert training.agreement(planted, sel.targets["labelflip-eps_d=0.3"], s.x_test) == 100.0
    assert candidates[3].budget == 0.3


def test_only_validation_accuracy_and_the_lowest_reached_is_chosen(chosen):
    s, clean, sel, target, poisons, records, seen, attacks, attack, tmp_path = chosen
    assert seen and all(t is s.x_val for t in seen)  # the test split is never read
    tried = sorted((c for c in records if c.grad_norm_ratio is not None), key=lambda c: c.val_acc)
    order = sorted((c for c in records if c.tau <= 0.1), key=lambda c: c.val_acc)
    assert len(tried) >= 2, [(c.name, c.val_acc, c.grad_norm_ratio) for c in records]
    assert [c.name for c in tried] == [c.name for c in order[: len(tried)]]  # lowest validation accuracy first
    assert all(not c.kept and c.grad_norm_ratio > 0.1 for c in tried[:-1]) and tried[-1].kept and tried[-1].grad_norm_ratio <= 0.1, records
    for c in records:
        if c.tau > 0.1:
            assert "tau" in c.reason and c.grad_norm_ratio is None
        elif c not in tried:
            assert c.reason.startswith("not tried") and c.val_acc >= tried[-1].val_acc
    assert target is sel.targets[tried[-1].name] and math.isclose(poisons.grad_norm_ratio, tried[-1].grad_norm_ratio)
    saved = io.read_json(tmp_path / "cell" / "selection.json")
    assert saved["chosen"] == tried[-1].name and len(saved["candidates"]) == len(records)
    # each attempt had its own checkpoint and poisons folder
    assert sorted(a.checkpoint for a in attacks) == sorted(tmp_path / "cell" / f"candidate={c.name}" / "checkpoint.pt" for c in tried)
    assert all((tmp_path / "cell" / f"candidate={c.name}" / "poisons.pt").is_file() for c in tried)


def test_choose_again_reads_every_attempt_back(chosen):
    *_, sel, target, poisons, records, seen, attacks, attack, tmp_path = chosen
    count = len(attacks)
    again, poisons_again, records_again = sel.choose(attack, tmp_path / "cell")
    assert len(attacks) == count and again is target and records_again == records


def test_nothing_reached(digits_lr, tmp_path):
    s, clean = digits_lr
    sel = TargetSelection({"eps_w": [2.0], "flip_factors": []}, clean, s.x_train, s.y_train, s, fit_for(s), save_for(s), tmp_path,
                          weight_decay=0.0, seed=0)
    target, poisons, records = sel.choose(GaussNewtonCanceling(0.05, iterations=2), tmp_path / "cell")
    assert target is None and poisons is None and "tau" in records[0].reason


def test_select_configuration_errors():
    for kwargs, match in [(dict(attack="labelflip"), "use a GC attack"), (dict(protocol="official"), "honest or converged"),
                          (dict(eps_d=["tau"]), "give numbers"), (dict(target_options={"grid": 1}), "unknown option")]:
        with pytest.raises(PoisonReachError, match=match):
            RunConfig(target="select", **kwargs).validate()


def test_select_run_records_the_chosen_target_per_eps_d(tmp_path):
    config = RunConfig(dataset="digits", target="select", eps_d=[0.3], attack="gc", attack_options={"iterations": 8},
                       target_options={"eps_w": [0.25, 2.0], "flip_factors": [1.0, 2.0]}, training={"epochs": 5})
    metrics = run(config, tmp_path)
    (entry,) = metrics["results"]
    saved = io.read_json(tmp_path / "eps_d=0.3" / "selection.json")
    assert entry["target"] == saved["chosen"] and "tau" in entry and "target_acc" in entry and "grad_norm_clean" in entry
    assert "tau" not in metrics and metrics["target"] == "select"
    assert entry["target"] in format_table(metrics)  # the table names it
    # the planted candidates at E = ε_d and 2·ε_d were built for this ε_d and cached
    assert all((tmp_path / "candidates" / f"labelflip-eps_d={e:g}" / "target_model.pt").is_file() for e in (0.3, 0.6))
