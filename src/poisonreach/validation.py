"""Input validation shared by every constructor and every call that takes data.

Each check raises :class:`~poisonreach.errors.PoisonReachError` with a message that names the
argument, what was wrong with it, and what is accepted.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor, nn

from .errors import PoisonReachError


def is_int(value) -> bool:
    """An integer of any integral type, but not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_number(name: str, value, *, low=None, high=None, low_open=False, integer=False) -> None:
    """Raise a PoisonReachError naming ``name`` unless ``value`` is a number within the bounds."""
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or (integer and not is_int(value)):
        raise PoisonReachError(f"{name} must be {kind}, got {value!r}")
    if not math.isfinite(value):
        raise PoisonReachError(f"{name} must be a finite number, got {value!r}")
    if low is not None and (value <= low if low_open else value < low):
        raise PoisonReachError(f"{name} must be {'>' if low_open else '>='} {low}, got {value!r}")
    if high is not None and value > high:
        raise PoisonReachError(f"{name} must be <= {high}, got {value!r}")


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise PoisonReachError(f"{name} must be one of {list(choices)}, got {value!r}")


def check_data(X: Tensor, y: Tensor) -> None:
    """The checks every attack runs on its clean data before any work."""
    if not isinstance(X, Tensor) or not isinstance(y, Tensor):
        raise PoisonReachError("X and y must be torch tensors")
    if len(X) != len(y):
        raise PoisonReachError(f"X has {len(X)} rows but y has {len(y)} labels: they must match")
    if len(X) == 0:
        raise PoisonReachError("the clean training set is empty")
    if not torch.isfinite(X).all():
        raise PoisonReachError("X contains NaN or infinite values: clean the data first")


def check_model_data(model: nn.Module, X: Tensor, y: Tensor, device=None) -> int:
    """Check that ``model`` accepts X and that the labels fit its outputs; return the output count."""
    check_data(X, y)
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(X[:1].to(device))
    except RuntimeError as e:
        raise PoisonReachError(
            f"the model does not accept inputs of shape {tuple(X.shape[1:])} ({str(e).splitlines()[0]}): "
            "use a model built for this data set"
        ) from None
    finally:
        model.train(was_training)
    outputs = out.reshape(1, -1).shape[1]
    if not y.is_floating_point():
        classes = 2 if outputs == 1 else outputs
        if int(y.min()) < 0 or int(y.max()) >= classes:
            raise PoisonReachError(
                f"labels range over {int(y.min())}..{int(y.max())} but the model has {outputs} output(s) "
                f"({classes} classes): use a model with as many classes as the data set"
            )
    elif y.dim() == 2 and y.shape[1] != outputs:
        raise PoisonReachError(f"soft labels have {y.shape[1]} columns but the model has {outputs} outputs")
    return outputs
