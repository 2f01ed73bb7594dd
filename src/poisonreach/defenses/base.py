"""What the defenses share.

A *filtering* defense (Sever, influence) looks at a model trained on the possibly poisoned data and
answers ``filter(model, X, y, loss=None) -> FilterResult``: which points to keep and the score that
decided it. It is evaluated as: train, filter, retrain on what is kept (section 5.4, appendix C.8).
*Training* defenses (MaxUp, DPA) replace the training itself and have ``train``'s signature.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn

from ..estimator import Estimator
from ..gradients import select_parameters
from ..losses import resolve
from ..validation import Choice, Number, check_model_data, check_number


@dataclass
class FilterResult:
    """keep_mask: bool (N,), True for the points the defense keeps. scores: float (N,), higher is
    more suspicious; a point removed in an earlier round of a multi-round defense keeps the score it
    was removed with. extra: defense-specific diagnostics (JSON-serialisable)."""

    keep_mask: Tensor
    scores: Tensor
    extra: dict = field(default_factory=dict)

    @property
    def removed_indices(self) -> Tensor:
        return (~self.keep_mask).nonzero().flatten()


class Filter(Estimator):
    """Base class of the filtering defenses.

    ``fraction``: the share of the points given to :meth:`filter` that is removed; the paper removes
    as many points as there are poisons, i.e. ε_d/(1 + ε_d) of the mixed set.
    """

    name = "filter"
    constraints = {"fraction": Number(low=0, high=1), "parameters": Choice(("all", "last"))}

    def filter(self, model: nn.Module, X: Tensor, y: Tensor, loss=None) -> FilterResult:
        raise NotImplementedError

    def _setup(self, model: nn.Module, X: Tensor, y: Tensor, loss):
        """Checks shared by the filters: (device, per-sample loss, the parameters scored)."""
        device = self._device(model)
        loss_fn = resolve(check_model_data(model, X, y, device, strict=not callable(loss)), y, loss)
        return device, loss_fn, select_parameters(model, self.parameters)


def removal_count(n: int, fraction: float) -> int:
    """How many of n points a defense removing ``fraction`` of them removes (rounded, < n)."""
    check_number("fraction", fraction, low=0, high=1, low_open=False)
    return min(n - 1, round(n * fraction))
