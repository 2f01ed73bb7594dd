"""The sharpened necessary threshold (A.17) (``reachability.sharpened_threshold``).

- over all logits it is τ(c) with A = I, and the proof's claim holds numerically: g_A = α·g_I for
  A = αI + 1r⊤, while a generic A has a logit ray along which g_A falls without bound;
- the box's infimum and supremum of ⟨h, p − e_y⟩ over intervals of logit differences equal what a
  multi-start search and a corner enumeration find;
- with the box the threshold is ≥ τ(c), and it stays necessary: a planted target trained on flipped
  points *inside* the box at ε_d = E never gets a threshold above E.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from poisonreach import data, models, training
from poisonreach.attacks import LabelFlip
from poisonreach.reachability import _box_maximum, _box_minimum, lambert_w_constant, sharpened_threshold, threshold
from poisonreach.targets import GradPC

DECAY = 1e-3


def g_A(A: np.ndarray, h: np.ndarray, label: int) -> float:
    p = np.exp(h - h.max())
    p /= p.sum()
    return float((A.T @ (p - np.eye(len(h))[label])) @ h)


def test_a_matrix_of_the_optimal_family_is_a_multiple_of_the_identity():
    rng = np.random.default_rng(0)
    c = 4
    A = 2.5 * np.eye(c) + np.outer(np.ones(c), rng.normal(size=c))  # αI + 1r⊤, as the proof says g_A = α g_I
    for _ in range(20):
        h, label = rng.normal(size=c) * 3, int(rng.integers(c))
        assert g_A(A, h, label) == pytest.approx(2.5 * g_A(np.eye(c), h, label), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_any_other_matrix_has_a_ray_along_which_its_infimum_is_minus_infinity(seed):
    rng = np.random.default_rng(seed)
    c = 4
    A = np.eye(c) + 0.3 * rng.normal(size=(c, c))
    best = None
    for k, label in itertools.permutations(range(c), 2):  # the proof's rays: argmax v_k, label y ≠ k
        for _ in range(200):
            v = rng.normal(size=c)
            v[k] = v.max() + abs(rng.normal())
            slope = (np.eye(c)[k] - np.eye(c)[label]) @ A @ v
            if best is None or slope < best[0]:
                best = (slope, v, label)
    slope, v, label = best
    assert slope < 0
    values = [g_A(A, t * v, label) for t in (10, 100, 1000)]
    assert values[2] < values[1] < values[0] and values[2] < -50


def test_over_all_logits_the_sharpened_threshold_is_tau_c():
    s = data.load("digits", seed=0)
    model = models.create("lr", s.input_shape, s.num_classes, mean=s.mean, std=s.std, seed=0)
    training.minimize(model, s.x_train, s.y_train, weight_decay=DECAY, progress=False)
    target = GradPC(2.0).generate(model, s.x_train, s.y_train)
    sharp = sharpened_threshold(target, s.x_train, s.y_train, weight_decay=DECAY)
    base = threshold(target, s.x_train, s.y_train, weight_decay=DECAY)
    assert sharp.tau == sharp.tau_multiclass == base.tau_multiclass > 0
    assert sharp.matrix == torch.eye(10).tolist() and sharp.infimum == -lambert_w_constant(10) and sharp.domain == "logits"


@pytest.mark.parametrize("seed", range(6))
def test_the_box_infimum_and_supremum_of_the_logit_differences(seed):
    rng = np.random.default_rng(seed)
    c, label = 4, seed % 4
    lo = rng.uniform(-3, 0.5, size=c)
    hi = lo + rng.uniform(0.1, 3, size=c)
    lo[label] = hi[label] = 0.0
    F = lambda d: float(np.exp(d - d.max()) @ d / np.exp(d - d.max()).sum())  # noqa: E731
    starts = [rng.uniform(lo, hi) for _ in range(30)]
    searched = min(minimize(F, x0, bounds=list(zip(lo, hi)), method="L-BFGS-B").fun for x0 in starts)
    ours = _box_minimum(torch.tensor(lo), torch.tensor(hi), lambert_w_constant(c))
    assert ours == pytest.approx(searched, abs=1e-7)
    corners = max(F(np.where(bits, hi, lo)) for bits in itertools.product([0, 1], repeat=c))
    samples = max(F(rng.uniform(lo, hi)) for _ in range(2000))
    assert _box_maximum(torch.tensor(lo), torch.tensor(hi)) == pytest.approx(corners, rel=1e-12) and corners >= samples
    # a box holding the unconstrained minimiser reaches −W((c−1)/e)
    wide = torch.full((c,), -10.0), torch.full((c,), 10.0)
    wide[0][label] = wide[1][label] = 0.0
    assert _box_minimum(*wide, lambert_w_constant(c)) == pytest.approx(-lambert_w_constant(c), rel=1e-9)


@pytest.mark.parametrize("name", ["digits", "gaussian10"])
def test_the_box_threshold_is_at_least_tau_c_and_stays_necessary(name):
    s = data.load(name, seed=0)
    box = (float(s.x_train.min()), float(s.x_train.max()))
    clean = models.create("lr", s.input_shape, s.num_classes, mean=s.mean, std=s.std, seed=0)
    training.minimize(clean, s.x_train, s.y_train, weight_decay=DECAY, progress=False)
    for E in (0.05, 0.2):
        flips = LabelFlip(E, strategy="least-likely").poison(clean, s.x_train, s.y_train)  # real points, in the box
        target = models.create("lr", s.input_shape, s.num_classes, mean=s.mean, std=s.std, seed=0)
        training.minimize(target, *flips.mixed(s.x_train, s.y_train), weight_decay=DECAY, tolerance=1e-8, progress=False)
        sharp = sharpened_threshold(target, s.x_train, s.y_train, box=box, weight_decay=DECAY)
        assert sharp.domain == "box" and sharp.tau >= sharp.tau_multiclass
        assert sharp.tau <= E * (1 + 1e-3)  # reached at E by its own flips, so a necessary threshold cannot exceed E
    far = GradPC(5.0).generate(clean, s.x_train, s.y_train)
    assert sharpened_threshold(far, s.x_train, s.y_train, box=box, weight_decay=DECAY).tau >= threshold(far, s.x_train, s.y_train, weight_decay=DECAY).tau_multiclass
