"""Small data sets made in memory: the paper's toy sets (appendix C) and scikit-learn's digits.

Every set is drawn from its ``seed`` alone, so the same seed gives identical tensors.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_digits, make_classification

from poisonreach.data.splits import Pool, generator, hold_out_test, labels

_OR_CORNERS = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
OR_REPEATS, OR_NOISE = 50, 0.1
GAUSSIAN_TRAIN, GAUSSIAN_TEST, GAUSSIAN_FEATURES = 1000, 500, 10
REGRESSION_POINTS, REGRESSION_NOISE = 200, 0.5


def or2d(seed: int) -> Pool:
    """The OR function (appendix C.1): each corner of the unit square repeated 50 times with
    N(0, 0.1^2) noise, labelled 0 for (0, 0) and 1 otherwise; 200 train and 200 test points."""
    rng = generator(seed)  # one stream: the test points are the next draws after the training ones

    def draw():
        corners = _OR_CORNERS.repeat_interleave(OR_REPEATS, dim=0)
        noise = OR_NOISE * torch.randn(corners.shape, generator=rng)
        return corners + noise, (corners.sum(dim=1) > 0).long()

    return Pool(*draw(), *draw())


TOY_REPEATS = 100


def toy() -> Pool:
    """Appendix C.6's three points on the real line: x = 1 and x = −1 labelled 1, x = 0 labelled 0,
    each repeated 100 times (exact copies, so the empirical measure is the paper's), shape (300, 1).
    The test set is the three points once. Logistic regression's stationary point is w⋆ = (0, ln 2)."""
    x = torch.tensor([[1.0], [-1.0], [0.0]])
    y = torch.tensor([1, 1, 0])
    return Pool(x.repeat(TOY_REPEATS, 1), y.repeat(TOY_REPEATS), x, y)


def gaussian10(seed: int) -> Pool:
    """scikit-learn's make_classification with 10 features, two classes: 1000 train and 500 test
    points from one call, so both share the same class structure."""
    x, y = make_classification(n_samples=GAUSSIAN_TRAIN + GAUSSIAN_TEST,
                               n_features=GAUSSIAN_FEATURES, random_state=seed)
    x = torch.from_numpy(x.astype(np.float32))
    y = labels(y)
    return Pool(x[:GAUSSIAN_TRAIN], y[:GAUSSIAN_TRAIN], x[GAUSSIAN_TRAIN:], y[GAUSSIAN_TRAIN:])


def regression2d(seed: int) -> Pool:
    """Least-squares regression (appendix C.3): x ~ N(0, 1) of shape (N, 1) and
    y = 2x + 1 + N(0, 0.5^2) as float32; 200 train and 200 test points."""
    rng = generator(seed)

    def draw():
        x = torch.randn(REGRESSION_POINTS, 1, generator=rng)
        return x, 2 * x[:, 0] + 1 + REGRESSION_NOISE * torch.randn(REGRESSION_POINTS, generator=rng)

    return Pool(*draw(), *draw())


def digits() -> Pool:
    """scikit-learn's bundled 8x8 digits as (N, 1, 8, 8) floats in [0, 1] (pixels are 0-16).

    It has no test set, so 20% is held out with a fixed seed (:func:`hold_out_test`): the test
    split never changes with the experiment's seed, which only moves points between train and
    validation.
    """
    bunch = load_digits()
    x = torch.from_numpy((bunch.data / 16.0).astype(np.float32)).reshape(-1, 1, 8, 8)
    return hold_out_test(x, labels(bunch.target))
