"""Input validation shared by every constructor and every call that takes data.

Each check raises :class:`~poisonreach.errors.PoisonReachError` with a message that names the
argument, what was wrong with it, and what is accepted.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .errors import PoisonReachError
from .rows import Rows


def is_int(value) -> bool:
    """An integer of any integral type, but not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_number(name: str, value, *, low=None, high=None, low_open=False, high_open=False, integer=False) -> None:
    """Raise a PoisonReachError naming ``name`` unless ``value`` is a number within the bounds."""
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or (integer and not is_int(value)):
        raise PoisonReachError(f"{name} must be {kind}, got {value!r}")
    if not math.isfinite(value):
        raise PoisonReachError(f"{name} must be a finite number, got {value!r}")
    if low is not None and (value <= low if low_open else value < low):
        raise PoisonReachError(f"{name} must be {'>' if low_open else '>='} {low}, got {value!r}")
    if high is not None and (value >= high if high_open else value > high):
        raise PoisonReachError(f"{name} must be {'<' if high_open else '<='} {high}, got {value!r}")


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise PoisonReachError(f"{name} must be one of {list(choices)}, got {value!r}")


@dataclass(frozen=True)
class Number:
    """A constructor argument that must be a number within bounds (:func:`check_number`); stored as
    a float, or as given when ``integer``. ``optional``: None is accepted too."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    optional: bool = False

    def __call__(self, name: str, value):
        if value is None and self.optional:
            return None
        check_number(name, value, low=self.low, high=self.high, low_open=self.low_open, high_open=self.high_open, integer=self.integer)
        return value if self.integer else float(value)


@dataclass(frozen=True)
class Choice:
    """A constructor argument that must be one of ``options``."""

    options: tuple

    def __call__(self, name: str, value):
        check_choice(name, value, self.options)
        return value


def flag(name: str, value) -> bool:
    """A constructor argument read as a truth value."""
    return bool(value)


def strict_flag(name: str, value) -> bool:
    """A constructor argument that must be True or False."""
    if not isinstance(value, bool):
        raise PoisonReachError(f"{name} must be True or False, got {value!r}")
    return value


def progress_flag(name: str, value) -> bool | None:
    """``progress``: True, False, or None (a bar only on a terminal)."""
    if value is not None and not isinstance(value, bool):
        raise PoisonReachError(f"{name} must be True, False or None, got {value!r}")
    return value


def check_inputs(X: Tensor | Rows) -> int:
    """Validate X (a non-empty, finite, floating tensor with a batch dimension, or :class:`Rows`
    served as one: checked without a dense copy) and return N."""
    if not isinstance(X, (Tensor, Rows)):
        raise PoisonReachError(f"X must be a torch.Tensor, got {type(X).__name__}; convert it with torch.as_tensor")
    if not X.is_floating_point():
        raise PoisonReachError(
            f"X must be floating point in pixel space, got dtype {X.dtype}; e.g. use X.float() / 255 for bytes"
        )
    if X.dim() < 2 or len(X) == 0:
        raise PoisonReachError(f"X must be a non-empty batch of shape (N, ...), got shape {tuple(X.shape)}")
    if not (X.all_finite() if isinstance(X, Rows) else torch.isfinite(X).all()):
        raise PoisonReachError("X contains NaN or infinite values: remove or repair those samples")
    return len(X)


def check_values(x: Tensor, source: str, name: str, noun: str, box: tuple[float, float] | None, outside: str) -> None:
    """Raise a PoisonReachError naming how many rows of array ``name`` (each a ``noun`` of
    ``source``) hold NaN or infinite values and the first of them, or its range when it leaves
    ``box`` (``outside`` completes that message: where the box comes from and the fix)."""
    bad = ~torch.isfinite(x).flatten(1).all(dim=1)
    if bad.any():
        raise PoisonReachError(f"{source}: {int(bad.sum())} {noun}(s) hold NaN or infinite values (the first is {noun} "
                               f"{int(bad.nonzero()[0])}): remove or repair them")
    if box is not None and (x.min() < box[0] or x.max() > box[1]):
        raise PoisonReachError(f"{source}: {name} ranges over [{float(x.min()):.6g}, {float(x.max()):.6g}], outside {outside}")


def check_labels(y: Tensor, n: int, num_outputs: int | None, *, strict: bool) -> Tensor:
    """Validate y against N and (when ``strict``) the model's outputs; return int labels as int64."""
    if not isinstance(y, Tensor):
        raise PoisonReachError(f"y must be a torch.Tensor, got {type(y).__name__}; convert it with torch.as_tensor")
    if len(y) != n:
        raise PoisonReachError(f"X has {n} samples but y has {len(y)}: pass one label per sample")
    if y.is_floating_point():
        if y.dim() not in (1, 2) or not torch.isfinite(y).all():
            raise PoisonReachError(
                f"float labels must be finite soft labels (N, C) or regression targets (N,), got shape {tuple(y.shape)}"
            )
        if strict and y.dim() == 2 and y.shape[1] != num_outputs:
            raise PoisonReachError(
                f"soft labels have {y.shape[1]} columns but the model has {num_outputs} outputs: they must match"
            )
        if strict and y.dim() == 1 and num_outputs != 1:
            raise PoisonReachError(
                f"regression targets (float labels of shape (N,)) need a model with one output, this one has "
                f"{num_outputs}; use 'linreg', or pass class indices as int64"
            )
        return y
    if y.dtype in (torch.bool, torch.complex64, torch.complex128) or y.dim() != 1:
        raise PoisonReachError(f"class labels must be integers of shape (N,), got {y.dtype} of shape {tuple(y.shape)}")
    y = y.long()
    if strict:
        classes = 2 if num_outputs == 1 else num_outputs
        if y.min() < 0 or y.max() >= classes:
            raise PoisonReachError(
                f"labels must lie in [0, {classes}) for a model with {num_outputs} output(s), got "
                f"[{y.min().item()}, {y.max().item()}]; relabel the classes or create the model with more classes"
            )
    return y


def check_data(X: Tensor, y: Tensor) -> int:
    """The checks every call that takes clean data runs before any work; returns N."""
    n = check_inputs(X)
    check_labels(y, n, num_outputs=None, strict=False)
    return n


@contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode inside the block; every submodule's own mode is restored after it. A model already
    wholly in eval mode is left alone: switching costs more than a small model's forward pass."""
    modes = [(m, m.training) for m in model.modules()]
    if not any(training for _, training in modes):
        yield
        return
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def num_outputs(model: nn.Module, X: Tensor, device) -> int:
    """The model's number of outputs, from one sample in eval mode (batch-norm statistics stay);
    a model that cannot take X's shape is a PoisonReachError."""
    try:
        with evaluating(model), torch.no_grad():
            out = model(X[:1].to(device))
    except RuntimeError as e:
        raise PoisonReachError(
            f"the model does not accept inputs of shape {tuple(X.shape[1:])} ({str(e).splitlines()[0]}): "
            "use a model built for this data set"
        ) from None
    return out.reshape(1, -1).shape[1]


def check_model_data(model: nn.Module, X: Tensor, y: Tensor, device=None, *, strict: bool = True) -> int:
    """Check that ``model`` accepts X and (``strict``: the labels fit its outputs, which a custom
    loss may not need); return the model's number of outputs."""
    check_data(X, y)
    outputs = num_outputs(model, X, device or next(model.parameters()).device)
    check_labels(y, len(X), outputs, strict=strict)
    return outputs


def check_options(cls, options: dict, what: str) -> None:
    """Raise a PoisonReachError naming any key of ``options`` that ``cls``'s constructor does not take."""
    import inspect

    accepted = [k for k, p in inspect.signature(cls).parameters.items() if p.kind is p.KEYWORD_ONLY or p.kind is p.POSITIONAL_OR_KEYWORD]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise PoisonReachError(f"unknown {what} option(s) {unknown}: {cls.__name__} accepts {accepted}")
