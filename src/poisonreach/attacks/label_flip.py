"""The label-flip baseline: copies of clean training points added with a wrong label.

m = round(n·ε_d) clean points (at least one) are chosen and added again with flipped labels, so the
victim trains on clean ∪ flipped copies, as every attack here adds its poisons (section 2). Which
points and which labels:

- ``random``: a seeded random subset; each copy gets a uniformly random other class (the other
  class for two classes).
- ``loss``: the points with the largest loss under the given model, each flipped to the class the
  model scores highest among the wrong ones. This is how Koh, Steinhardt & Liang (2022, "Stronger
  data poisoning attacks break data sanitization defenses") build their label-flip target parameters
  for model-targeted attacks: they flip the points of smallest margin h_y − max_{k≠y} h_k to the
  best-scoring wrong class, ``repeat`` times each. For one logit the logistic loss is a decreasing
  function of the margin, so both rankings agree; for several classes we rank by the loss, which
  honours a custom ``loss``. Flipped, these points sit where the model is least sure, so the victim
  can fit them by moving its decision boundary rather than by memorising outliers.
- ``least-likely``: the seeded random subset of ``random`` (the same points for the same seed), each
  copy relabelled to the class the given model scores *lowest* (the "least-likely class" of
  Kurakin et al.; ties to the lower class). It is the most implausible label the model knows, so
  it plants a target far from the clean model: ``poisonreach run --target labelflip
  --target-option strategy=least-likely --target-option eps_d=E`` makes the victim of this flip at
  ε_d = E the target, a target these very poisons reach at ε_d = E by construction, as far as
  that victim's training converged (:func:`poisonreach.training.training_gradient_norm` says how
  far; the run records it as ``target_grad_norm``). For C ≥ 3 classes the lowest
  class of a trained model is practically never the true one; with two classes it is the class
  the model does *not* predict, which is the true label of a misclassified point: such a copy
  keeps its label (a clean duplicate). Their number is ``extra["num_unchanged"]``.

When m > n the chosen order is repeated, so each point is flipped ⌊m/n⌋ or ⌈m/n⌉ times (Koh et al.'s
repetitions). The attack is deterministic given ``seed`` and costs one forward pass (``loss``,
``least-likely``) or none (``random``), so it also serves as a cheap target generator.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..errors import PoisonReachError
from ..losses import resolve
from ..training import predict_logits
from ..validation import Choice, check_model_data
from .base import Attack, PoisonResult

STRATEGIES = ("random", "loss", "least-likely")


class LabelFlip(Attack):
    """Label flipping: add copies of m = round(n·ε_d) clean points with wrong labels.

    Parameters
    ----------
    eps_d: the poison budget ε_d = m / n (> 0); m = round(n·ε_d) copies, at least one.
    strategy: ``random``, ``loss`` or ``least-likely`` (see the module docstring).
    chunk_size: rows per forward pass of ``loss`` and ``least-likely``; bounds memory, not the result.
    seed: seeds the random choice of points (``random``, ``least-likely``) and of wrong classes
        (``random``); ``loss`` uses no randomness.
    device: where the model's forward passes run; None: where its parameters are.
    """

    name = "labelflip"
    constraints = {"strategy": Choice(STRATEGIES)}

    def __init__(
        self,
        eps_d: float,
        *,
        strategy: str = "random",
        chunk_size: int = 256,
        seed: int = 0,
        device: str | torch.device | None = None,
    ):
        self._set_params(locals())

    def poison(self, model: nn.Module, X: Tensor, y: Tensor, loss=None) -> PoisonResult:
        """Flip the labels of copies of clean points chosen with ``model`` (the clean model)."""
        if isinstance(y, Tensor) and y.is_floating_point():
            raise PoisonReachError(
                "label flipping needs class indices (int64 labels of shape (N,)); got float labels "
                f"of shape {tuple(y.shape)} (regression targets or probabilities), which have no class to flip"
            )
        device = self._device(model)
        num_outputs = check_model_data(model, X, y, device, strict=not callable(loss))
        y = y.long()
        classes = 2 if num_outputs == 1 else num_outputs
        n = len(X)
        m = self.num_poisons(n)
        gen = torch.Generator().manual_seed(self.seed)

        if self.strategy in ("random", "least-likely"):
            order = torch.randperm(n, generator=gen)
        else:
            logits = predict_logits(model, X, chunk_size=self.chunk_size, device=device)
            losses = resolve(num_outputs, y, loss)(logits, y)
            order = torch.sort(losses, descending=True, stable=True).indices  # ties: the lower index first
        source = order.repeat(math.ceil(m / n))[:m]
        original = y[source]

        if self.strategy == "least-likely":
            scores = predict_logits(model, X[source], chunk_size=self.chunk_size, device=device).reshape(m, -1)
            if scores.shape[1] == 1:  # one logit h: class scores (0, h), so class 1 is lowest iff h < 0
                scores = torch.cat([torch.zeros_like(scores), scores], dim=1)
            flipped = scores.argmin(dim=1)  # ties: the first, i.e. the lower class
            return self._result(X[source].clone(), flipped, source, num_clean=n, num_poisons=m, num_classes=classes,
                                num_unchanged=int((flipped == original).sum()))
        if self.strategy == "random" or classes == 2:
            # an offset in 1..C−1 modulo C is a uniformly random other class
            flipped = (original + torch.randint(1, classes, (m,), generator=gen)) % classes
        else:
            wrong = logits[source].clone()
            wrong[torch.arange(m), original] = -math.inf
            flipped = wrong.argmax(dim=1)
        return self._result(X[source].clone(), flipped, source, num_clean=n, num_poisons=m, num_classes=classes)
