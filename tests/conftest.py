"""Fixtures shared by several test files."""

import pytest

pytest.register_assert_rewrite("contract")  # the shared checks of the contract tests report like the tests' own asserts

from poisonreach import data, models, training


@pytest.fixture(scope="session")
def digits_lr():
    """The digits splits and a logistic regression trained on them (about 93% test accuracy)."""
    s = data.load("digits", seed=0)
    model = models.create("lr", s.input_shape, 10, mean=s.mean, std=s.std, seed=0)
    training.train(model, s.x_train, s.y_train, epochs=5, batch_size=16, progress=False)
    return s, model
