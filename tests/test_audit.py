"""The reachability audit (``poisonreach.audit``, ``poisonreach audit``).

- a user's linear model on an npz data set goes through the whole audit from the command line,
  and audit.json holds every field the auditor reads;
- an unsafe weights file is refused in one line, never unpickled;
- the diagnosis gives each verdict where it should: below τ, reached (a planted target and its
  own flips), stalled;
- the damage frontier's models meet the condition it names.
"""

from __future__ import annotations

import dataclasses
import json
import sys

import numpy as np
import pytest
import torch

from poisonreach import audit, data, models, training
from poisonreach.attacks import GaussNewtonCanceling, LabelFlip
from poisonreach.cli import main
from poisonreach.errors import PoisonReachError
from poisonreach.targets import GradPC
from poisonreach.reachability import box_threshold

DECAY = 1e-3

USER_MODULE = '''
import math
from torch import nn

class Linear(nn.Module):
    """A user's logistic regression on the raw pixels."""

    def __init__(self, input_shape, num_classes):
        super().__init__()
        self.head = nn.Linear(math.prod(input_shape), num_classes)

    def forward(self, x):
        return self.head(x.flatten(1))
'''


@pytest.fixture(scope="module")
def digits():
    s = data.load("digits", seed=0)
    model = models.create("lr", s.input_shape, s.num_classes, mean=s.mean, std=s.std, seed=0)
    training.minimize(model, s.x_train, s.y_train, weight_decay=DECAY, progress=False)
    return s, model


@pytest.fixture
def user_files(tmp_path, monkeypatch):
    s = data.load("digits", seed=0)
    x = (torch.cat([s.x_train, s.x_val]) * 255).round().to(torch.uint8).numpy()
    y = torch.cat([s.y_train, s.y_val]).numpy()
    np.savez(tmp_path / "mine.npz", x=x, y=y, x_test=(s.x_test * 255).round().to(torch.uint8).numpy(), y_test=s.y_test.numpy())
    (tmp_path / "auditmod.py").write_text(USER_MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("auditmod", None)


def test_a_user_model_on_npz_data_goes_through_the_whole_audit(user_files, capsys):
    out = user_files / "audit"
    argv = ["audit", "--data", "mine.npz", "--model", "auditmod:Linear", "--eps-w", "0.5", "--eps-d", "0.1", "1",
            "--restarts", "1", "--out", str(out), "--threads", "1"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "tau sharpened" in printed and "damage frontier" in printed
    record = json.loads((out / "audit.json").read_text())
    assert record["model"] == "auditmod:Linear" and record["linear"] and record["dataset"].startswith("npz:")
    for key in ("tau", "tau_multiclass", "tau_sharpened", "sharpening_matrix", "construction", "frontier"):
        assert key in record
    assert record["tau_sharpened"] >= record["tau_multiclass"]
    assert [c["eps_d"] for c in record["construction"]] == [0.1, 1.0]
    assert all({"residual_ratio", "agreement", "in_box"} <= set(c) for c in record["construction"])
    assert [p["eps_d"] for p in record["frontier"]] == [0.1, 1.0] and all(p["max_drop_estimate"] >= 0 for p in record["frontier"])
    assert (out / "audit.md").is_file() and (out / "frontier.png").is_file()
    # the model trained here is reused when the audit runs again
    assert (out / "clean_model.pt").is_file()


def test_an_unsafe_weights_file_is_refused_in_one_line(user_files, canary, capsys):
    evil = user_files / "weights.pt"
    torch.save({"head.weight": canary}, evil)  # torch's format, a pickle inside
    code = main(["audit", "--data", "mine.npz", "--model", "auditmod:Linear", "--weights", str(evil), "--out", str(user_files / "a")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "holds Python objects other than tensors" in err and "refused" in err


def test_given_weights_and_target_are_audited_and_poisons_diagnosed(user_files, capsys):
    s = data.load("npz:mine.npz", seed=0)
    model = models.create("auditmod:Linear", s.input_shape, s.num_classes, seed=0)
    training.minimize(model, s.x_train, s.y_train, weight_decay=DECAY, progress=False)
    torch.save(model.state_dict(), user_files / "model.pt")
    flips = LabelFlip(0.2, strategy="least-likely").poison(model, s.x_train, s.y_train)
    target = audit.retrained(model, *flips.mixed(s.x_train, s.y_train), weight_decay=DECAY)
    torch.save(target.state_dict(), user_files / "target.pt")
    np.savez(user_files / "flips.npz", x=flips.x.numpy(), y=flips.y.numpy())
    argv = ["audit", "--data", "mine.npz", "--model", "auditmod:Linear", "--weights", "model.pt", "--target-weights", "target.pt",
            "--eps-d", "0.2", "--no-frontier", "--poisons", "flips.npz", "--out", str(user_files / "given"), "--json"]
    assert main(argv) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["targets"][0]["name"] == "given" and record["tau_sharpened"] <= 0.2 * (1 + 1e-3)
    (diagnosis,) = record["diagnoses"]
    assert diagnosis["verdict"].startswith("reached") and diagnosis["residual_ratio"] < 1e-2
    # flips are points in the box: the floor, on the same scale, is below what they leave
    assert diagnosis["in_box"] and 0 <= diagnosis["floor_ratio"] <= diagnosis["residual_ratio"] and "no ratio below" in diagnosis["verdict"]
    assert diagnosis["victim_tau_multiclass"] <= diagnosis["eps_d"] + 1e-9  # what these poisons reached meets the condition


def test_the_verdicts_below_tau_and_stalled(digits):
    s, model = digits
    X, y = s.x_train, s.y_train
    far = GradPC(2.0).generate(model, X, y)  # τ(c) ≈ 2.4
    below = GaussNewtonCanceling(0.1, weight_decay=DECAY, iterations=2, progress=False).poison(far, X, y)
    verdict = audit.diagnose(far, X, y, below, X_test=s.x_test, weight_decay=DECAY)
    assert verdict["verdict"].startswith("unreachable below τ") and verdict["tau"] > 0.1
    boxed = audit.diagnose(far, X, y, below, X_test=s.x_test, weight_decay=DECAY, box=(0.0, 1.0))
    assert boxed["in_box"] and 0 < boxed["floor_ratio"] <= boxed["residual_ratio"]
    outside = dataclasses.replace(below, x=below.x + 2.0)
    assert not audit.diagnose(far, X, y, outside, X_test=s.x_test, weight_decay=DECAY, box=(0.0, 1.0))["in_box"]
    flips = LabelFlip(0.3, strategy="least-likely").poison(model, X, y)
    planted = audit.retrained(model, *flips.mixed(X, y), weight_decay=DECAY)  # reachable at 0.3 by its flips
    other = LabelFlip(0.3, strategy="random", seed=1).poison(model, X, y)  # the same budget, other points
    stalled = audit.diagnose(planted, X, y, other, X_test=s.x_test, weight_decay=DECAY)
    assert stalled["verdict"].startswith("reachable but the optimisation stalled") and stalled["agreement"] < audit.REACHED_AGREEMENT


def test_the_frontier_models_meet_the_condition_they_name(digits):
    s, model = digits
    points = audit.damage_frontier(model, s.x_train, s.y_train, s.x_test, s.y_test, [0.03, 0.3], weight_decay=DECAY, restarts=2)
    assert [p.condition for p in points] == ["tau(c)", "tau(c)"]
    assert all(p.condition_value <= 0 and p.max_drop_estimate >= 0 and p.programmes == 0 for p in points)
    boxed = audit.damage_frontier(model, s.x_train, s.y_train, s.x_test, s.y_test, [0.03], weight_decay=DECAY, box=(0.0, 1.0),
                                  restarts=2, pullback_steps=4)
    assert boxed[0].condition == "box LP" and boxed[0].condition_value <= 0 and boxed[0].programmes > 0
    # the admissible model itself comes back: its accuracy is the one reported, and it meets the box programme
    found = boxed[0].model
    assert found is not model and training.accuracy(found, s.x_test, s.y_test) == pytest.approx(boxed[0].accuracy, abs=1e-9)
    assert box_threshold(found, s.x_train, s.y_train, box=(0.0, 1.0), weight_decay=DECAY) <= 0.03
    assert "model" not in boxed[0].to_dict() and boxed[0].to_dict()["eps_d"] == 0.03


def test_a_budget_searched_after_others_is_at_least_as_damaging_as_searched_alone(digits):
    # the budgets before an ε_d only add a start (their best model): its own starts, and which of
    # them are pulled back to the box programme, do not depend on them
    s, model = digits
    kw = dict(weight_decay=DECAY, box=(0.0, 1.0), restarts=2, pullback_steps=4, iterations=30)
    alone = audit.damage_frontier(model, s.x_train, s.y_train, s.x_test, s.y_test, [0.1], **kw)[0]
    after = audit.damage_frontier(model, s.x_train, s.y_train, s.x_test, s.y_test, [0.03, 0.05, 0.1], **kw)[-1]
    assert after.max_drop_estimate >= alone.max_drop_estimate - 1e-9
    assert (after.restarts, alone.restarts) == (3, 2)
    with pytest.raises(PoisonReachError, match="restarts"):
        audit.damage_frontier(model, s.x_train, s.y_train, s.x_test, s.y_test, [0.1], weight_decay=DECAY, restarts=0)


def test_the_same_call_finds_the_same_frontier_model(digits):
    # its random starts come from the seed alone: two calls give the same model, bit for bit
    s, model = digits
    kw = dict(weight_decay=DECAY, box=(0.0, 1.0), restarts=2, pullback_steps=4, iterations=30, seed=3)
    first, second = (audit.damage_frontier(model, s.x_train, s.y_train, s.x_test, s.y_test, [0.1], **kw)[0] for _ in range(2))
    assert first.max_drop_estimate == second.max_drop_estimate
    assert all(torch.equal(a, b) for a, b in zip(first.model.state_dict().values(), second.model.state_dict().values()))


def test_a_budgets_own_starts_do_not_depend_on_the_budgets_before_it(digits, monkeypatch):
    s, model = digits
    starts = []
    monkeypatch.setattr(audit, "_ascend", lambda W, *args: starts.append(W.clone()) or W)  # record, do not search
    audit.damage_frontier(model, s.x_train, s.y_train, s.x_test, s.y_test, [0.1], weight_decay=DECAY, restarts=3)
    alone, starts[:] = list(starts), []
    audit.damage_frontier(model, s.x_train, s.y_train, s.x_test, s.y_test, [0.03, 0.1], weight_decay=DECAY, restarts=3)
    assert len(alone) == 3 and len(starts) == 7  # 3 at 0.03; at 0.1 the same 3 and the best of 0.03
    assert all(torch.equal(a, b) for a, b in zip(alone, starts[3:6]))
