"""The base of every configurable object (attacks, target generators, defenses).

As in scikit-learn: hyperparameters are the constructor's keyword arguments, validated there and
stored under their own names, so :meth:`Estimator.get_params` can return them and ``repr`` can show
the ones that differ from the defaults. Data never goes into the constructor.

Each class declares how its arguments are checked in ``constraints`` (name → a callable
``check(name, value) -> stored value``, e.g. :class:`poisonreach.validation.Number`), merged along
the class hierarchy, and its constructor ends with ``self._set_params(locals())``, which validates
and stores every argument of its signature (an argument without a constraint is stored as given).
"""

from __future__ import annotations

import inspect
import logging
from typing import Any, Callable

import torch
from torch import nn

from .progress import Progress
from .validation import Number, progress_flag


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

    constraints: dict[str, Callable[[str, Any], Any]] = {
        "seed": Number(integer=True),
        "chunk_size": Number(low=1, integer=True),
        "progress": progress_flag,
    }

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
        for name in self._signature():
            check = constraints.get(name)
            setattr(self, name, values[name] if check is None else check(name, values[name]))

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
