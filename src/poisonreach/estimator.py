"""The base of every configurable object (attacks, target generators, defenses).

As in scikit-learn: hyperparameters are the constructor's keyword arguments, validated there and
stored under their own names, so :meth:`Estimator.get_params` can return them and ``repr`` can show
the ones that differ from the defaults. Data never goes into the constructor.

Each class declares how its arguments are checked in ``constraints`` (name → a callable
``check(name, value) -> stored value``, e.g. :class:`poisonreach.validation.Number`), merged along
the class hierarchy, and its constructor ends with ``self._set_params(locals())``, which validates
and stores every argument of its signature (an argument without a constraint is stored as given).

Keyword parameters that a family of classes shares (``seed``, ``device``, ``progress``; the canceling
problem's ``box``, ``weight_decay``, ...) are declared once, in the class attribute ``shared``: a
constructor whose signature ends in ``**shared`` takes them, and its signature (``inspect``, ``help``,
``poisonreach options``) lists them after its own.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any, Callable

import torch
from torch import nn

from .progress import Progress
from .validation import Number, progress_flag


def keywords(stub: Callable) -> tuple[inspect.Parameter, ...]:
    """The keyword-only parameters of ``stub``, a function written only to declare them."""
    return tuple(p for p in inspect.signature(stub).parameters.values() if p.kind is p.KEYWORD_ONLY)


def _runtime(*, seed: int = 0, device: str | torch.device | None = None, progress: bool | None = None):
    """What most estimators take besides their hyperparameters: a seed, a device and a progress bar."""


class Estimator:
    """Base class: parameters are the constructor's keyword arguments, stored under their names.

    Parameters
    ----------
    seed: seeds every random choice the object makes.
    chunk_size: rows per forward/backward chunk; bounds memory, not the result.
    device: where the computation runs ("cpu", "cuda:0"); None: where the model's parameters are.
    progress: a tqdm bar on stderr: True, False, or None (a bar on a terminal, elsewhere a log line
        every 30 s of a long loop, :mod:`poisonreach.progress`).
    """

    # A name means one thing: the checks of the names several classes use live here (a class may
    # narrow one, e.g. a target generator's ``epochs`` must be at least 1).
    constraints: dict[str, Callable[[str, Any], Any]] = {
        "seed": Number(integer=True),
        "chunk_size": Number(low=1, integer=True),
        "progress": progress_flag,
        "epochs": Number(low=0, integer=True),
        "iterations": Number(low=0, integer=True),
        "lr": Number(low=0, low_open=True),
        "cg_iterations": Number(low=1, integer=True),
        "damping": Number(low=0),
    }
    # The parameters a constructor ending in ``**shared`` takes, after its own.
    shared: tuple[inspect.Parameter, ...] = keywords(_runtime)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        init = vars(cls).get("__init__")
        if init is None:
            return
        own = list(inspect.signature(init).parameters.values())
        if own and own[-1].kind is inspect.Parameter.VAR_KEYWORD:
            init.__signature__ = inspect.Signature(own[:-1] + list(cls.shared))

    @classmethod
    def _signature(cls) -> dict[str, inspect.Parameter]:
        return {k: p for k, p in inspect.signature(cls.__init__).parameters.items() if k != "self"}

    @classmethod
    def _constraints(cls) -> dict[str, Callable[[str, Any], Any]]:
        """The constraints of the class and its bases, the most derived winning."""
        merged: dict = {}
        for klass in reversed(cls.__mro__):
            merged.update(vars(klass).get("constraints", {}))
        return merged

    def _set_params(self, values: dict[str, Any]) -> None:
        """Validate the constructor's arguments (its ``locals()``) in signature order and store them."""
        constraints = self._constraints()
        shared = dict(values.get("shared", {}))
        unknown = sorted(set(shared) - {p.name for p in self.shared})
        if unknown:  # what Python says of an unknown keyword argument
            raise TypeError(f"{type(self).__name__}() got an unexpected keyword argument {unknown[0]!r}")
        for name, param in self._signature().items():
            value = values[name] if name in values else shared.get(name, param.default)
            setattr(self, name, value if (check := constraints.get(name)) is None else check(name, value))

    def get_params(self) -> dict[str, Any]:
        """The constructor arguments; ``type(self)(**self.get_params())`` is an equal object."""
        return {name: getattr(self, name) for name in self._signature()}

    def __repr__(self) -> str:
        sig = self._signature()
        shown = [
            f"{k}={v!r}"
            for k, v in self.get_params().items()
            if sig[k].default is inspect.Parameter.empty or v != sig[k].default
        ]
        return f"{type(self).__name__}({', '.join(shown)})"

    # Runtime helpers for estimators that take ``device`` and ``progress`` arguments.

    def _device(self, model: nn.Module) -> torch.device:
        """``device`` when given, else where the model's parameters are."""
        return torch.device(self.device) if self.device is not None else next(model.parameters()).device

    def _progress(self, iterable=None, **kwargs) -> Progress:
        """The progress of a loop, honouring ``progress``, logged as the estimator's module; the bar is removed when done."""
        return Progress(iterable, show=self.progress, logger=logging.getLogger(type(self).__module__), leave=False, **kwargs)
