"""Deep Partition Aggregation (Levine and Feizi 2021; section 5.4, Table 4).

- the certified radius (DPA Theorem 1) on hand-computed vote counts with ties, and against a brute
  force over every vote vector of up to 6 base models: ρ + 1 is the least number of base models whose
  votes must change to change the prediction;
- the published hash (Σ trunc(255·x) mod k) on hand-made images, on every 8-bit value and on the raw
  digits pixels; the canonical order inside a partition, and permutation invariance of the ensemble;
- batched training (vmap over stacked models, one optimizer) equals training the base models one by
  one with ``training.train`` on the same partitions and seeds, for Adadelta, SGD and Adam, with
  partitions of different step counts and unequal batch sizes within a step;
- the ensemble's votes, its tie-break through ``training.accuracy``, saving and loading, seeds,
  validation of the data, and a DPA on digits with k = 5.

Constructor validation, repr and get_params: ``test_defense_contract.py``.
"""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from torch import nn

from poisonreach import data, models, training
from poisonreach.defenses.dpa import (
    Certificate,
    DeepPartitionAggregation,
    Ensemble,
    canonical_order,
    certified_radius,
    certify,
    partition,
)
from poisonreach.errors import PoisonReachError


@pytest.fixture(scope="module")
def digits():
    return data.load("digits", seed=0)


def template(s, name="lr", seed=0):
    return models.create(name, s.input_shape, s.num_classes, mean=s.mean, std=s.std, seed=seed)


def states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------------------------------
# the certificate (DPA Theorem 1)
# --------------------------------------------------------------------------------------------------

# (votes, prediction, radius), worked out by hand from ρ = ⌊(n_a − max_{c≠a}(n_c + [c < a])) / 2⌋
HAND_CASES = [
    ([5, 3, 0], 0, 1),  # b = 1 > a: (5 − 3 − 0) / 2 = 1
    ([3, 5, 0], 1, 0),  # b = 0 < a: (5 − 3 − 1) / 2 = 0.5 → 0
    ([3, 6, 0], 1, 1),  # b = 0 < a: (6 − 3 − 1) / 2 = 1
    ([4, 4, 2], 0, 0),  # tie at the top goes to class 0; runner-up class 1: (4 − 4 − 0) / 2 = 0
    ([2, 4, 4], 1, 0),  # tie between 1 and 2 → 1; runner-up 2 (4 > 2 + 1): 0
    ([0, 6, 5], 1, 0),  # runner-up 2 (5 > 0 + 1): (6 − 5) / 2 = 0.5 → 0
    ([5, 6, 0], 1, 0),  # runner-up 0 (5 + 1 = 6): (6 − 5 − 1) / 2 = 0
    ([0, 0, 7], 2, 3),  # all in one class; runner-up 0 (0 + 1 ties with 1's 0 + 1, smaller index): (7 − 0 − 1) / 2 = 3
    ([7, 0, 0], 0, 3),  # all in class 0; runner-up 1: (7 − 0 − 0) / 2 = 3.5 → 3
    ([3, 3, 3], 0, 0),  # equal votes everywhere
    ([2, 2], 0, 0),
    ([1, 3], 1, 0),  # (3 − 1 − 1) / 2 = 0.5 → 0
    ([0, 4], 1, 1),  # (4 − 0 − 1) / 2 = 1.5 → 1
    ([1, 2, 9, 3], 2, 3),  # n_c + [c < 2] = 2, 3, ·, 3: runner-up 1 (tie with 3, smaller index): (9 − 2 − 1) / 2 = 3
]


@pytest.mark.parametrize("votes, prediction, radius", HAND_CASES)
def test_certified_radius_on_hand_cases(votes, prediction, radius):
    top, rho = certified_radius(torch.tensor([votes]))
    assert top.tolist() == [prediction] and rho.tolist() == [radius]


def least_changes_to_flip(votes: tuple[int, ...]) -> int:
    """Brute force: the fewest base models whose votes must change so that the plurality vote (ties
    to the smaller class) changes. Changing m models reaches exactly the vote vectors v' with the
    same total and ½‖v − v'‖₁ ≤ m; every vote vector of the same total is enumerated."""
    k, classes = sum(votes), len(votes)
    top = max(range(classes), key=lambda c: (votes[c], -c))
    best = None
    for cut in itertools.combinations(range(k + classes - 1), classes - 1):  # stars and bars
        bounds = (-1, *cut, k + classes - 1)
        other = [bounds[i + 1] - bounds[i] - 1 for i in range(classes)]
        if max(range(classes), key=lambda c: (other[c], -c)) != top:
            d = sum(abs(a - b) for a, b in zip(votes, other)) // 2
            best = d if best is None else min(best, d)
    return best


def test_certified_radius_is_one_less_than_the_least_changes_that_flip_the_vote():
    """DPA's threat model: one inserted or removed training point changes one partition, so at most
    one vote; the radius must be exactly the changes that never flip the prediction."""
    for classes in (2, 3, 4):
        cases = [v for k in range(1, 7) for v in itertools.product(range(k + 1), repeat=classes) if sum(v) == k]
        top, rho = certified_radius(torch.tensor(cases))
        assert top.tolist() == [max(range(classes), key=lambda c: (v[c], -c)) for v in cases]
        assert rho.tolist() == [least_changes_to_flip(v) - 1 for v in cases]


def test_certified_radius_rejects_bad_votes():
    for bad in (torch.tensor([1, 2]), torch.tensor([[3]]), torch.tensor([[1.5, 2.0]]), torch.tensor([[-1, 2]])):
        with pytest.raises(PoisonReachError, match="votes"):
            certified_radius(bad)


def test_certificate_marks_wrong_predictions_and_summarises():
    votes = torch.tensor([[7, 0, 0], [3, 5, 0], [0, 0, 9], [1, 6, 0]])
    cert = Certificate.from_votes(votes, torch.tensor([0, 1, 0, 1]))
    # radii: 3; (5 − 3 − 1) / 2 → 0; wrong → −1; (6 − 1 − 1) / 2 = 2
    assert cert.predictions.tolist() == [0, 1, 2, 1]
    assert cert.radii.tolist() == [3, 0, -1, 2]
    assert cert.accuracy == 75.0
    assert [cert.certified_accuracy(r) for r in range(5)] == [75.0, 50.0, 50.0, 25.0, 0.0]
    assert cert.certified_accuracy_curve() == [75.0, 50.0, 50.0, 25.0]
    assert cert.median_radius == 2  # the 2nd largest of [3, 2, 0, −1]: CA(2) = 50 %, CA(3) = 25 %
    d = json.loads(json.dumps(cert.to_dict()))
    assert d["accuracy"] == 75.0 and d["median_radius"] == 2 and d["num_models"] == 7 and d["num_points"] == 4


def test_median_radius_is_minus_one_when_fewer_than_half_are_correct():
    cert = Certificate.from_votes(torch.tensor([[2, 0], [0, 2], [0, 2]]), torch.tensor([0, 0, 0]))
    assert cert.radii.tolist() == [1, -1, -1]
    assert cert.median_radius == -1 and cert.certified_accuracy_curve() == [pytest.approx(100 / 3)] * 2


def test_certificate_validation():
    votes = torch.tensor([[2, 0], [0, 2]])
    with pytest.raises(PoisonReachError, match="int64"):
        Certificate.from_votes(votes, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    with pytest.raises(PoisonReachError, match="labels must lie"):
        Certificate.from_votes(votes, torch.tensor([0, 2]))
    with pytest.raises(PoisonReachError, match="radius"):
        Certificate.from_votes(votes, torch.tensor([0, 1])).certified_accuracy(-1)


# --------------------------------------------------------------------------------------------------
# the hash and the partitions
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_hash_recovers_every_8_bit_pixel_value(dtype):
    """(v / 255)·255 truncated must give v back, not v − 1, for every byte v."""
    v = torch.arange(256)
    X = (v.to(dtype) / 255).reshape(256, 1, 1, 1)
    assert torch.equal(partition(X, 7), v % 7)
    assert torch.equal(partition(X, 256), v)


def test_hash_of_hand_made_images():
    pixels = torch.tensor([[[0, 255], [128, 1]], [[17, 34], [51, 68]], [[255, 255], [255, 255]]])
    X = (pixels.float() / 255).unsqueeze(1)  # (3, 1, 2, 2)
    # sums 384, 170, 1020; mod 7: 384 = 54·7 + 6, 170 = 24·7 + 2, 1020 = 145·7 + 5
    assert partition(X, 7).tolist() == [6, 2, 5]
    assert DeepPartitionAggregation(7).partition(X).tolist() == [6, 2, 5]
    assert partition(X, 1).tolist() == [0, 0, 0]


def test_hash_outside_pixel_space_truncates_towards_zero_and_wraps_non_negative():
    X = torch.tensor([[-0.5, 0.1], [-0.01, 0.0]])
    # trunc(−127.5) + trunc(25.5) = −127 + 25 = −102 = −15·7 + 3;  trunc(−2.55) = −2 = −1·7 + 5
    assert partition(X, 7).tolist() == [3, 5]


def test_hash_matches_the_raw_digits_pixels():
    from sklearn.datasets import load_digits

    raw = load_digits().data.astype(np.int64)  # pixels 0..16; the loader divides them by 16
    X = torch.from_numpy((raw / 16.0).astype(np.float32)).reshape(-1, 1, 8, 8)
    expected = torch.from_numpy((raw * 255 // 16).sum(1) % 50)
    assert torch.equal(partition(X, 50), expected)


def test_hash_refuses_data_whose_sums_overflow():
    with pytest.raises(PoisonReachError, match="overflow"):
        partition(torch.full((2, 3), 1e17), 5)


def test_canonical_order_sorts_by_label_then_pixels_and_keeps_ties_in_place():
    g = torch.Generator().manual_seed(0)
    X = torch.randint(0, 3, (40, 1, 1, 3), generator=g).float() / 2
    y = torch.randint(0, 3, (40,), generator=g)
    expected = sorted(range(40), key=lambda i: (y[i].item(), *X[i].flatten().tolist()))  # stable
    assert canonical_order(X, y).tolist() == expected


def test_members_are_the_partitions_in_canonical_order(digits):
    X, y = digits.x_train[:300], digits.y_train[:300]
    dpa = DeepPartitionAggregation(7)
    ids = partition(X, 7)
    members = dpa.members(X, y)
    assert len(members) == 7
    assert sorted(torch.cat(members).tolist()) == list(range(300))
    rank = torch.empty(300, dtype=torch.long)
    rank[canonical_order(X, y)] = torch.arange(300)
    for i, m in enumerate(members):
        assert torch.all(ids[m] == i) and torch.all(rank[m].diff() > 0)


def test_permuting_the_training_set_gives_the_same_ensemble(digits):
    X, y = digits.x_train[:120], digits.y_train[:120]
    perm = torch.randperm(120, generator=torch.Generator().manual_seed(1))
    dpa = DeepPartitionAggregation(3, epochs=2, batch_size=8, progress=False)
    a = dpa.train(template(digits), X, y)
    b = dpa.train(template(digits), X[perm], y[perm])
    assert states_equal(a.stacked_state(), b.stacked_state())


# --------------------------------------------------------------------------------------------------
# batched training equals one-by-one training
# --------------------------------------------------------------------------------------------------

OPTIMIZERS = [
    ("adadelta", {}),
    ("sgd", {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3}),
    ("adam", {"lr": 1e-3, "weight_decay": 1e-3}),
]


@pytest.mark.parametrize("name", ["lr", "nn"])
@pytest.mark.parametrize("optimizer, options", OPTIMIZERS)
def test_batched_training_equals_training_each_base_model_with_train(digits, name, optimizer, options):
    """float64, so that only rounding separates the two (float32 differs by ~1e-6 with Adam)."""
    X, y = digits.x_train[:90].double(), digits.y_train[:90]
    model = template(digits, name).double()
    settings = dict(epochs=3, batch_size=16, optimizer=optimizer, **options)
    dpa = DeepPartitionAggregation(3, progress=False, **settings)
    members = dpa.members(X, y)
    steps = [-(-len(m) // 16) for m in members]
    # the case the protocol must handle: different step counts, and unequal batches within a step
    assert len(set(steps)) > 1
    assert any(steps[i] == steps[j] and len(members[i]) != len(members[j]) for i in range(3) for j in range(i))
    ensemble = dpa.train(model, X, y)
    for i in range(3):
        reference = training.train(
            dpa.initial_model(model, i), X[members[i]], y[members[i]], seed=dpa.model_seed(i), progress=False, **settings
        )
        got = ensemble.base_model(i).state_dict()
        for key, value in reference.state_dict().items():
            torch.testing.assert_close(got[key], value, rtol=0, atol=1e-12)
        assert not torch.allclose(got["head.weight"], dpa.initial_model(model, i).head.weight)  # it trained


def test_group_size_does_not_change_a_dropout_free_ensemble(digits):
    X, y = digits.x_train[:90].double(), digits.y_train[:90]
    model = template(digits).double()
    a = DeepPartitionAggregation(4, epochs=2, batch_size=8, group_size=1, progress=False).train(model, X, y)
    b = DeepPartitionAggregation(4, epochs=2, batch_size=8, group_size=4, progress=False).train(model, X, y)
    for key, value in a.stacked_state().items():
        torch.testing.assert_close(b.stacked_state()[key], value, rtol=0, atol=1e-12)


def test_batch_norm_models_are_trained_one_by_one_with_train(digits):
    X, y = digits.x_train[:60], digits.y_train[:60]
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 10))
    dpa = DeepPartitionAggregation(2, epochs=2, batch_size=8, progress=False)
    ensemble = dpa.train(model, X, y)
    members = dpa.members(X, y)
    for i in range(2):
        reference = training.train(dpa.initial_model(model, i), X[members[i]], y[members[i]], epochs=2, batch_size=8,
                                   seed=dpa.model_seed(i), progress=False)
        assert states_equal(ensemble.base_model(i).state_dict(), reference.state_dict())
        assert reference[2].num_batches_tracked.item() > 0
    # the votes use each base model's running statistics (eval mode)
    predicted = torch.stack([ensemble.base_model(i)(digits.x_test).argmax(1) for i in range(2)])
    expected = torch.stack([torch.bincount(p, minlength=10) for p in predicted.T]).float()
    assert torch.equal(ensemble(digits.x_test), expected)


def test_empty_partitions_keep_their_initial_model(digits):
    X, y = digits.x_train[:5], digits.y_train[:5]
    model = template(digits)
    dpa = DeepPartitionAggregation(40, epochs=1, progress=False)
    members = dpa.members(X, y)
    empty = [i for i, m in enumerate(members) if len(m) == 0]
    assert empty
    ensemble = dpa.train(model, X, y)
    for i in empty[:3]:
        assert states_equal(ensemble.base_model(i).state_dict(), dpa.initial_model(model, i).state_dict())


# --------------------------------------------------------------------------------------------------
# initialisation and seeds
# --------------------------------------------------------------------------------------------------


def test_initial_models_are_fresh_seeded_per_model_and_leave_the_template_alone(digits):
    model = template(digits, "nn")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dpa = DeepPartitionAggregation(10, seed=2)
    a, b, a2 = dpa.initial_model(model, 3), dpa.initial_model(model, 4), dpa.initial_model(model, 3)
    assert states_equal(model.state_dict(), before)
    assert states_equal(a.state_dict(), a2.state_dict())
    assert not torch.equal(a.head.weight, b.head.weight) and not torch.equal(a.head.weight, model.head.weight)
    assert torch.equal(a.normalize.mean, model.normalize.mean)  # buffers without reset_parameters stay
    assert dpa.model_seed(3) == 23 and DeepPartitionAggregation(10).model_seed(3) == 3  # seed·k + i
    torch.manual_seed(5)
    expected = torch.rand(1)
    torch.manual_seed(5)
    dpa.initial_model(model, 0)
    assert torch.equal(torch.rand(1), expected)  # the global random state is left as it was


def test_same_seed_same_ensemble_with_dropout(digits):
    X, y = digits.x_train[:80], digits.y_train[:80]
    model = template(digits, "cnn")

    def run(seed):
        return DeepPartitionAggregation(2, epochs=1, batch_size=16, seed=seed, progress=False).train(model, X, y).stacked_state()

    first = run(0)
    assert states_equal(first, run(0))
    assert not states_equal(first, run(1))


# --------------------------------------------------------------------------------------------------
# the ensemble
# --------------------------------------------------------------------------------------------------


def constant_voters(classes: list[int]) -> Ensemble:
    """Linear base models on 2 features with zero weights, each always voting for its class."""
    ensemble = Ensemble(models.create("lr", (2,), 3), len(classes), 3)
    state = ensemble.stacked_state()
    with torch.no_grad():
        state["head.weight"].zero_()
        state["head.bias"].copy_(torch.nn.functional.one_hot(torch.tensor(classes), 3).float())
    return ensemble


def test_forward_counts_votes_and_ties_go_to_the_smaller_class():
    ensemble = constant_voters([2, 1, 2, 1])
    x = torch.rand(5, 2)
    assert torch.equal(ensemble(x), torch.tensor([[0.0, 2.0, 2.0]]).expand(5, 3))
    assert training.accuracy(ensemble, x, torch.full((5,), 1)) == 100.0
    assert training.accuracy(ensemble, x, torch.full((5,), 2)) == 0.0


def test_a_single_output_base_model_votes_by_the_sign_of_its_logit():
    ensemble = Ensemble(models.create("lr", (2,), 2), 3, 2)
    with torch.no_grad():
        ensemble.stacked_state()["head.weight"].copy_(torch.tensor([[[1.0, 0.0]], [[1.0, 0.0]], [[-1.0, 0.0]]]))
        ensemble.stacked_state()["head.bias"].zero_()
    x = torch.tensor([[1.0, 5.0], [-1.0, 5.0]])
    assert torch.equal(ensemble(x), torch.tensor([[1.0, 2.0], [2.0, 1.0]]))


def test_votes_are_the_counts_of_the_base_models_predictions_and_survive_save_and_load(digits, tmp_path):
    dpa = DeepPartitionAggregation(4, epochs=2, batch_size=16, group_size=3, progress=False)
    ensemble = dpa.train(template(digits), digits.x_train[:200], digits.y_train[:200])
    x = digits.x_test[:50]
    predicted = torch.stack([ensemble.base_model(i)(x).argmax(1) for i in range(4)])  # (k, N), one model at a time
    expected = torch.stack([torch.bincount(p, minlength=10) for p in predicted.T]).float()
    assert torch.equal(ensemble(x), expected)
    torch.save(ensemble.state_dict(), tmp_path / "dpa.pt")
    loaded = Ensemble(template(digits), 4, 10)
    loaded.load_state_dict(torch.load(tmp_path / "dpa.pt", weights_only=True))
    assert torch.equal(loaded(x), expected)
    assert ensemble.stacked_state()["head.weight"].shape == (4, 10, 64)


# --------------------------------------------------------------------------------------------------
# DPA on digits
# --------------------------------------------------------------------------------------------------


def test_dpa_on_digits_is_accurate_and_its_certified_accuracy_falls_with_the_radius(digits):
    s = digits
    dpa = DeepPartitionAggregation(5, epochs=10, batch_size=16, optimizer="sgd", lr=0.1, progress=False)
    ensemble = dpa.train(template(s), s.x_train, s.y_train)
    cert = dpa.certify(ensemble, s.x_test, s.y_test)
    assert cert.accuracy == pytest.approx(training.accuracy(ensemble, s.x_test, s.y_test))
    assert cert.accuracy > 88  # one logistic regression on all the data reaches about 93 %
    curve = cert.certified_accuracy_curve()
    assert curve[0] == cert.accuracy and all(a >= b for a, b in zip(curve, curve[1:]))
    assert len(curve) == 3 and curve[-1] > 0  # 5 votes certify at most ⌊5 / 2⌋ = 2 changes
    assert torch.all(cert.votes.sum(1) == 5)
    other = certify(ensemble, s.x_test, s.y_test, chunk_size=100)  # the chunks change nothing
    assert torch.equal(other.votes, cert.votes) and torch.equal(other.radii, cert.radii)


# --------------------------------------------------------------------------------------------------
# validation of the data
# --------------------------------------------------------------------------------------------------


def test_train_and_certify_reject_bad_input(digits):
    s = digits
    dpa = DeepPartitionAggregation(2, epochs=1, progress=False)
    with pytest.raises(PoisonReachError, match="regression"):
        dpa.train(models.create("linreg", (2,), 1), torch.rand(10, 2), torch.rand(10))
    with pytest.raises(PoisonReachError, match="labels must lie"):
        dpa.train(template(s), s.x_train[:10], torch.full((10,), 12))
    with pytest.raises(PoisonReachError, match="torch.Tensor"):
        dpa.train(template(s), s.x_train[:10].numpy(), s.y_train[:10])
    with pytest.raises(PoisonReachError, match="Ensemble"):
        dpa.certify(template(s), s.x_test, s.y_test)
    with pytest.raises(PoisonReachError, match="chunk_size"):
        certify(Ensemble(template(s), 2, 10), s.x_test, s.y_test, chunk_size=0)
    with pytest.raises(PoisonReachError, match="num_classes"):
        Ensemble(template(s), 3, 1)
    with pytest.raises(PoisonReachError, match="num_classes"):
        Ensemble(template(s), 3, 4)(s.x_test[:2])  # 10 outputs cannot vote among 4 classes
