"""The base of every configurable object (attacks, target generators, defenses).

As in scikit-learn: hyperparameters are the constructor's keyword arguments, validated there and
stored under their own names, so :meth:`Estimator.get_params` can return them and ``repr`` can show
the ones that differ from the defaults. Data never goes into the constructor.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm


class Estimator:
    """Base class: parameters are the constructor's keyword arguments, stored under their names."""

    @classmethod
    def _signature(cls) -> dict[str, inspect.Parameter]:
        return {k: p for k, p in inspect.signature(cls.__init__).parameters.items() if k != "self"}

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

    def _progress(self, iterable=None, **kwargs) -> tqdm:
        """A tqdm bar honouring ``progress`` (None: shown only on a terminal), removed when done."""
        return tqdm(iterable, disable=None if self.progress is None else not self.progress, leave=False, **kwargs)
