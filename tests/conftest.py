"""Fixtures shared by several test files."""

import pickle

import pytest

pytest.register_assert_rewrite("contract")  # the shared checks of the contract tests report like the tests' own asserts

from poisonreach import data, models, training


class Canary:
    """Unpickling this creates the file ``path``: a loader that executes code leaves it behind."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


@pytest.fixture
def canary(tmp_path):
    """A :class:`Canary` for ``tmp_path/executed``, checked to work when the test is done."""
    bait = Canary(tmp_path / "executed")
    yield bait
    assert not bait.path.exists(), "a loader ran code from a file"
    pickle.loads(pickle.dumps(bait)).close()  # the canary works: an unpickler that runs code creates the file
    assert bait.path.exists()


@pytest.fixture(scope="session")
def digits_lr():
    """The digits splits and a logistic regression trained on them (about 93% test accuracy)."""
    s = data.load("digits", seed=0)
    model = models.create("lr", s.input_shape, 10, mean=s.mean, std=s.std, seed=0)
    training.train(model, s.x_train, s.y_train, epochs=5, batch_size=16, progress=False)
    return s, model
