"""MaxUp: the worst-of-m objective, its augmentations, and equality with ordinary training.

Constructor validation, repr and get_params: ``test_defense_contract.py``.
"""

import pytest
import torch

from poisonreach import models, training
from poisonreach.defenses.maxup import MaxUp
from poisonreach.errors import PoisonReachError
from poisonreach.losses import cross_entropy


def _digits_model(s, seed=0):
    return models.create("lr", s.input_shape, 10, mean=s.mean, std=s.std, seed=seed)


def _same(a, b):
    return all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.fixture(scope="module")
def digits(digits_lr):
    s, _ = digits_lr
    return s


def test_maxup_with_one_unperturbed_copy_equals_ordinary_training(digits):
    s = digits
    plain = training.train(_digits_model(s), s.x_train, s.y_train, epochs=2, progress=False)
    maxup = MaxUp(1, strength=0.0).train(_digits_model(s), s.x_train, s.y_train, epochs=2, progress=False)
    assert _same(plain, maxup)


def test_maxup_with_one_copy_is_training_on_augmented_batches(digits):
    """m = 1: each batch is augmented once, which changes the model (noise is really applied)."""
    s = digits
    plain = training.train(_digits_model(s), s.x_train, s.y_train, epochs=1, progress=False)
    augmented = MaxUp(1, strength=0.5).train(_digits_model(s), s.x_train, s.y_train, epochs=1, progress=False)
    assert not _same(plain, augmented)


def test_the_batch_loss_is_the_mean_of_the_per_sample_worst_of_m():
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    x, y = torch.randn(8, 5), torch.randint(3, (8,))
    maxup = MaxUp(3, strength=0.3)
    got = training._batch_loss(model, cross_entropy, x, y, None, torch.device("cpu"), maxup.augment, 3, torch.Generator().manual_seed(7))
    gen = torch.Generator().manual_seed(7)
    copies = [maxup.augment(x, gen) for _ in range(3)]  # drawn in the same order as training draws them
    per_copy = torch.stack([cross_entropy(model(c), y) for c in copies])
    expected = per_copy.max(dim=0).values.mean()
    torch.testing.assert_close(got, expected)
    assert got > per_copy.mean(dim=0).mean()  # the worst case is above the average


def test_maxup_is_a_function_of_the_seed(digits):
    s = digits
    a = MaxUp(2).train(_digits_model(s), s.x_train, s.y_train, epochs=1, seed=3, progress=False)
    b = MaxUp(2).train(_digits_model(s), s.x_train, s.y_train, epochs=1, seed=3, progress=False)
    c = MaxUp(2).train(_digits_model(s), s.x_train, s.y_train, epochs=1, seed=4, progress=False)
    assert _same(a, b) and not _same(a, c)


def test_maxup_still_learns(digits):
    s = digits
    model = MaxUp(4).train(_digits_model(s), s.x_train, s.y_train, epochs=3, batch_size=16, progress=False)
    assert training.accuracy(model, s.x_test, s.y_test) > 85


def test_shift_moves_images_by_whole_pixels():
    x = torch.zeros(50, 1, 5, 5)
    x[:, 0, 2, 2] = 1.0
    shifted = MaxUp(1, augmentation="shift", strength=1).augment(x, torch.Generator().manual_seed(0))
    assert torch.all(shifted.sum(dim=(1, 2, 3)) == 1)  # one pixel, moved, never lost (shift ≤ border)
    positions = {tuple(p) for p in shifted[:, 0].nonzero()[:, 1:].tolist()}
    assert positions <= {(r, c) for r in (1, 2, 3) for c in (1, 2, 3)} and len(positions) > 3


def test_shift_needs_images():
    with pytest.raises(PoisonReachError, match="needs images"):
        MaxUp(2, augmentation="shift", strength=1).augment(torch.zeros(3, 4), torch.Generator())


def test_train_refuses_the_arguments_maxup_sets_itself():
    with pytest.raises(PoisonReachError, match="MaxUp sets worst_of"):
        MaxUp().train(torch.nn.Linear(2, 2), torch.zeros(4, 2), torch.zeros(4, dtype=torch.long), worst_of=2)


def test_worst_of_needs_an_augmentation():
    with pytest.raises(PoisonReachError, match="worst_of > 1 needs augment"):
        training.train(torch.nn.Linear(2, 2), torch.zeros(4, 2), torch.zeros(4, dtype=torch.long), worst_of=2, progress=False)
