"""``--target select`` (poisonreach.experiments.selection): candidates from GradPC, planted label
flips and the damage frontier, τ on the training split, validation accuracy only, GC tried lowest
validation accuracy first, the reached candidate with the least accurate victim chosen, every
candidate recorded, resumed without redoing an attempt."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from poisonreach import data, io, models, training
from poisonreach.attacks import GaussNewtonCanceling, LabelFlip, PoisonResult
from poisonreach.errors import PoisonReachError
from poisonreach.experiments import selection as selection_module
from poisonreach.experiments.config import RunConfig
from poisonreach.experiments.run import format_table, run
from poisonreach.experiments.selection import SELECT_DEFAULTS, Candidate, TargetSelection, check_select_options
from poisonreach.reachability import box_threshold, threshold
from poisonreach.targets import GradPC

OPTIONS = {"eps_w": [0.25, 0.5, 2.0], "flip_eps_d": [0.3], "flip_factors": [], "frontier_factors": []}


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
                       ({"flip_eps_d": [0.1, -1]}, "list of positive numbers"), ({"frontier_factors": [0]}, "list of positive numbers"),
                       ({"eps_w": [], "flip_eps_d": [], "flip_factors": [], "frontier_factors": []}, "no candidates"),
                       ({"reach": 2.0}, "reach"), ({"flip_strategy": "worst"}, "flip_strategy"),
                       ({"seed": -1}, "seed"), ({"seed": 1.5}, "seed")]:
        with pytest.raises(PoisonReachError, match=match):
            check_select_options(bad)


def test_the_seed_option_draws_the_candidates_instead_of_the_run_seed(digits_lr, tmp_path):
    s, clean = digits_lr
    options = {"eps_w": [0.5], "flip_factors": [1.0], "frontier_factors": []}

    def drawn(run_seed, **extra):
        sel = TargetSelection({**options, **extra}, clean, s.x_train, s.y_train, s, fit_for(s), save_for(s),
                              tmp_path / f"{run_seed}-{extra}", weight_decay=0.0, seed=run_seed)
        sel.candidates(0.1)
        return sel._planting("labelflip-eps_d=0.1").source_indices, sel.targets["gradpc-eps_w=0.5"]

    flips, gradpc = drawn(0, seed=3)
    same_flips, same_gradpc = drawn(3)
    other_flips, other_gradpc = drawn(0)
    assert torch.equal(flips, same_flips) and not torch.equal(flips, other_flips)
    assert torch.equal(models.last_linear(gradpc).weight, models.last_linear(same_gradpc).weight)
    assert not torch.equal(models.last_linear(gradpc).weight, models.last_linear(other_gradpc).weight)


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

    def counting(self, model, X, y, loss=None, start=None):
        attacks.append((self, start))
        return real_poison(self, model, X, y, loss, start)

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
    binary = []
    for c in candidates[:3]:
        target = GradPC(float(c.name.split("=")[1])).generate(clean, X, y)  # deterministic: the same target again
        tau = threshold(target, X, y)
        assert c.tau == pytest.approx(tau.tau_multiclass, rel=1e-9) and c.budget is None
        binary.append(tau.tau)
    # τ(c) of equation (10), the necessary one with 10 classes, not τ(2)'s larger value
    assert any(c.tau < b for c, b in zip(candidates, binary))
    planted = fit_for(s)(*LabelFlip(0.3, strategy="least-likely").poison(clean, X, y).mixed(X, y, 10))
    assert training.agreement(planted, sel.targets["labelflip-eps_d=0.3"], s.x_test) == 100.0
    assert candidates[3].budget == 0.3


def check_choice(s, sel, target, poisons, records, eps_d):
    """The rule of ``choose``: candidates tried lowest validation accuracy first, the reached one with
    the least accurate victim chosen, the rest not tried only when they could not beat it."""
    tried = [c for c in records if c.grad_norm_ratio is not None]
    eligible = sorted((c for c in records if c.tau <= eps_d or c.family == "frontier"), key=lambda c: c.val_acc)
    assert sorted(c.name for c in tried) == sorted(c.name for c in eligible[: len(tried)])  # lowest validation accuracy first
    kept = [c for c in tried if c.kept]
    assert kept and all(c.grad_norm_ratio <= 0.1 for c in kept) and all(c.grad_norm_ratio > 0.1 for c in tried if not c.kept)
    best = min(kept, key=lambda c: c.victim_val_acc)
    assert [c.name for c in records if c.chosen] == [best.name] and target is sel.targets[best.name]
    assert math.isclose(poisons.grad_norm_ratio, best.grad_norm_ratio)
    for c in records:
        if c.grad_norm_ratio is None and c.tau <= eps_d:
            assert c.reason.startswith("not tried") and c.val_acc >= best.victim_val_acc, c
        elif c.grad_norm_ratio is None:
            assert "tau" in c.reason and c.family != "frontier"
    return tried, best


def test_only_validation_accuracy_and_the_least_accurate_victim_is_chosen(chosen):
    s, clean, sel, target, poisons, records, seen, attacks, attack, tmp_path = chosen
    assert seen and all(t is s.x_val for t in seen)  # the test split is never read
    tried, best = check_choice(s, sel, target, poisons, records, 0.1)
    assert len(tried) >= 2, [(c.name, c.val_acc, c.grad_norm_ratio) for c in records]
    # the victim's accuracy is that of a victim trained on clean ∪ the poisons saved for that candidate
    for c in (c for c in tried if c.kept):
        mixed = PoisonResult.load(tmp_path / "cell" / f"candidate={c.name}").mixed(s.x_train, s.y_train, 10)
        assert c.victim_val_acc == pytest.approx(training.accuracy(fit_for(s)(*mixed), s.x_val, s.y_val))
    saved = io.read_json(tmp_path / "cell" / "selection.json")
    assert saved["chosen"] == best.name and len(saved["candidates"]) == len(records)
    # each attempt had its own checkpoint and poisons folder
    assert sorted(a.checkpoint for a, _ in attacks) == sorted(tmp_path / "cell" / f"candidate={c.name}" / "checkpoint.pt" for c in tried)
    assert all((tmp_path / "cell" / f"candidate={c.name}" / "poisons.pt").is_file() for c in tried)


def test_a_planted_candidate_is_attacked_from_its_planting_flips(chosen):
    s, clean, sel, target, poisons, records, seen, attacks, attack, tmp_path = chosen
    starts = {a.checkpoint.parent.name.split("=", 1)[1]: start for a, start in attacks}
    for c in records:
        if c.name not in starts:
            continue
        start = starts[c.name]
        assert (start is None) == (c.family != "labelflip") and c.start == ("planting" if start is not None else "clean")
        if start is None:
            continue
        flips = LabelFlip(c.budget, strategy="least-likely", seed=0).poison(clean, s.x_train, s.y_train)
        assert torch.equal(start.y, flips.y) and torch.equal(start.source_indices, flips.source_indices)
        result = PoisonResult.load(tmp_path / "cell" / f"candidate={c.name}")
        m = len(result.y)
        assert torch.equal(result.source_indices, flips.source_indices[:m])  # the first m of the flips



def test_no_frontier_candidates_without_weight_decay(digits_lr, tmp_path):
    s, clean = digits_lr  # the box programme of the frontier needs λ > 0
    sel = TargetSelection({"eps_w": [], "flip_factors": [1.0], "frontier_factors": [0.5]}, clean, s.x_train, s.y_train, s, fit_for(s),
                          save_for(s), tmp_path, weight_decay=0.0, seed=0)
    assert [c.name for c in sel.candidates(0.1)] == ["labelflip-eps_d=0.1"]


@pytest.fixture(scope="module")
def frontier_selection(tmp_path_factory):
    """Digits LR under weight decay 1e-3, trained to convergence: the frontier's conditions hold."""
    s = data.load("digits", seed=0)

    def fit(X, y):
        return training.minimize(models.create("lr", s.input_shape, 10, mean=s.mean, std=s.std, seed=0), X, y, weight_decay=1e-3, progress=False)
    clean = fit(s.x_train, s.y_train)
    folder = tmp_path_factory.mktemp("frontier")
    options = {"eps_w": [], "flip_factors": [1.0, 2.0], "frontier_factors": [0.5]}
    sel = TargetSelection(options, clean, s.x_train, s.y_train, s, fit, save_for(s), folder / "candidates", weight_decay=1e-3, seed=0)
    attack = GaussNewtonCanceling(0.3, iterations=10, weight_decay=1e-3)
    return s, fit, sel, attack, folder, sel.choose(attack, folder / "cell")


def test_frontier_candidates_are_admissible_models_judged_by_their_victim(frontier_selection):
    s, fit, sel, attack, folder, (target, poisons, records) = frontier_selection
    assert [(c.name, c.family, c.budget) for c in records] == [("labelflip-eps_d=0.3", "labelflip", 0.3), ("labelflip-eps_d=0.6", "labelflip", 0.6),
                                                                ("frontier-eps_d=0.15", "frontier", 0.15)]
    check_choice(s, sel, target, poisons, records, 0.3)
    model = sel.targets["frontier-eps_d=0.15"]  # the most damaging model the search found admissible at B = 0.5·ε_d
    assert box_threshold(model, s.x_train, s.y_train, box=(0.0, 1.0), weight_decay=1e-3) <= 0.15 + 1e-6
    assert training.accuracy(model, s.x_val, s.y_val) < training.accuracy(sel.clean, s.x_val, s.y_val) - 5


def test_tau_does_not_rule_out_a_frontier_candidate(frontier_selection, monkeypatch):
    s, fit, sel, attack, folder, _ = frontier_selection
    monkeypatch.setattr(selection_module, "threshold", lambda *a, **k: SimpleNamespace(tau=math.inf, tau_multiclass=math.inf))
    again = TargetSelection(sel.options, sel.clean, s.x_train, s.y_train, s, fit, save_for(s), folder / "candidates", weight_decay=1e-3, seed=0)
    target, poisons, records = again.choose(attack, folder / "other-cell")  # the candidates are read back from their files
    assert [c.name for c in records if c.reason.startswith("tau")] == ["labelflip-eps_d=0.3", "labelflip-eps_d=0.6"]
    (frontier,) = [c for c in records if c.family == "frontier"]
    assert frontier.grad_norm_ratio is not None and (frontier.chosen or "GC residual ratio" in frontier.reason), frontier


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


def test_choice_is_the_least_accurate_victim_among_the_reached(digits_lr, tmp_path):
    """The rule alone, on made-up candidates: τ rules out GradPC and planted ones but not frontier
    ones; GC goes lowest validation accuracy first; a later reached candidate wins when its victim
    is less accurate; a candidate is skipped only once its own accuracy is not below the best victim's."""
    s, clean = digits_lr
    sel = TargetSelection({}, clean, s.x_train, s.y_train, s, fit_for(s), save_for(s), tmp_path, weight_decay=0.0, seed=0)
    made_up = {  # name: (family, tau, validation accuracy, GC's ratio, victim's validation accuracy)
        "gradpc-eps_w=1": ("gradpc", math.inf, 30.0, 0.01, 10.0), "frontier-eps_d=0.05": ("frontier", math.inf, 40.0, 0.05, 72.0),
        "labelflip-eps_d=0.5": ("labelflip", 0.0, 50.0, 0.5, 20.0), "labelflip-eps_d=0.3": ("labelflip", 0.0, 60.0, 0.05, 75.0),
        "labelflip-eps_d=0.2": ("labelflip", 0.0, 65.0, 0.05, 64.0), "labelflip-eps_d=0.1": ("labelflip", 0.0, 70.0, 0.01, 1.0)}
    sel.candidates = lambda eps_d, box: [Candidate(name, tau, val, None, family) for name, (family, tau, val, *_) in made_up.items()]
    sel.targets = {name: object() for name in made_up}
    sel._attack = lambda attack, folder, target, start: SimpleNamespace(grad_norm_ratio=made_up[folder.name.split("=", 1)[1]][3])
    sel._victim_accuracy = lambda folder, result: made_up[folder.name.split("=", 1)[1]][4]
    target, poisons, records = sel.choose(SimpleNamespace(eps_d=0.1, box=(0.0, 1.0)), tmp_path / "cell")
    by_name = {c.name: c for c in records}
    assert target is sel.targets["labelflip-eps_d=0.2"] and [c.name for c in records if c.chosen] == ["labelflip-eps_d=0.2"]
    assert by_name["gradpc-eps_w=1"].reason.startswith("tau") and by_name["gradpc-eps_w=1"].grad_norm_ratio is None
    assert by_name["frontier-eps_d=0.05"].kept and by_name["frontier-eps_d=0.05"].victim_val_acc == 72.0
    assert not by_name["labelflip-eps_d=0.5"].kept and by_name["labelflip-eps_d=0.5"].victim_val_acc is None
    assert by_name["labelflip-eps_d=0.3"].kept and not by_name["labelflip-eps_d=0.3"].chosen
    assert by_name["labelflip-eps_d=0.1"].grad_norm_ratio is None and "64.00%" in by_name["labelflip-eps_d=0.1"].reason
    assert io.read_json(tmp_path / "cell" / "selection.json")["chosen"] == "labelflip-eps_d=0.2"
