"""Appendix D's choice of a target (poisonreach.experiments.selection): τ on the training split,
GC's objective, the lowest validation accuracy among the targets kept; the test split never used."""

from __future__ import annotations

import pytest
import torch

from poisonreach import training
from poisonreach.attacks import GradientCanceling
from poisonreach.experiments.selection import select_target
from poisonreach.reachability import threshold
from poisonreach.targets import GradPC


def flat(model) -> torch.Tensor:
    return torch.cat([p.detach().double().reshape(-1) for p in model.parameters()])


def test_select_target_uses_only_train_and_validation_and_rules_out_tau_above_eps_d(digits_lr, monkeypatch):
    s, model = digits_lr
    X, y, Xv, yv = s.x_train, s.y_train, s.x_val, s.y_val
    seen_accuracy, seen_tau = [], []
    real_accuracy, real_threshold = training.accuracy, threshold

    def spy_accuracy(m, Xa, ya, **kw):
        seen_accuracy.append(Xa)
        return real_accuracy(m, Xa, ya, **kw)

    def spy_threshold(m, Xt, yt, **kw):
        seen_tau.append(Xt)
        return real_threshold(m, Xt, yt, **kw)

    monkeypatch.setattr("poisonreach.training.accuracy", spy_accuracy)
    monkeypatch.setattr("poisonreach.reachability.threshold", spy_threshold)
    eps_w_list = [0.2, 0.35, 0.5, 0.75, 2.0]
    sel = select_target(
        model, X, y, Xv, yv, eps_w_list=eps_w_list, eps_d=0.5,
        make_attack=lambda e: GradientCanceling(e, epochs=20, progress=False),
    )
    monkeypatch.undo()
    assert seen_accuracy and all(t is Xv for t in seen_accuracy)  # accuracy only ever on validation
    assert seen_tau and all(t is X for t in seen_tau[: len(eps_w_list)])  # τ on the training split

    cands = sel.candidates
    assert [c.eps_w for c in cands] == eps_w_list
    for c in cands:
        target = GradPC(c.eps_w).generate(model, X, y)  # deterministic: the same target again
        assert c.tau == pytest.approx(threshold(target, X, y).tau, rel=1e-9)
        assert c.val_acc == training.accuracy(target, Xv, yv)
        if c.tau > 0.5:
            assert not c.kept and c.loss_ratio is None and "tau" in c.reason
        else:
            assert c.loss_ratio is not None and c.kept == (c.loss_ratio <= 0.1)
    # observed: τ = 0, 0, 0, 2.0, 23.4; GC objective ratios 0.014, 0.044, 0.17 → kept 0.2 and 0.35
    assert [c.kept for c in cands] == [True, True, False, False, False]
    assert sum(c.tau > 0.5 for c in cands) == 2
    kept = [c for c in cands if c.kept]
    best = min(kept, key=lambda c: c.val_acc)
    assert sel.eps_w == best.eps_w == 0.35
    assert torch.equal(flat(sel.model), flat(GradPC(0.35).generate(model, X, y)))
    assert sel.to_dict()["eps_w"] == 0.35 and len(sel.to_dict()["candidates"]) == 5


def test_select_target_with_nothing_reachable(digits_lr):
    s, model = digits_lr
    sel = select_target(model, s.x_train, s.y_train, s.x_val, s.y_val, eps_w_list=[1.0, 2.0], eps_d=0.5)
    assert sel.model is None and sel.eps_w is None
    assert all(not c.kept and c.loss_ratio is None for c in sel.candidates)
