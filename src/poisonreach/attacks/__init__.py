"""Poisoning attacks: constructor hyperparameters, ``poison(model, X, y, loss=None)``, a PoisonResult."""

from .base import Attack, PoisonResult
from .gradient_canceling import PRESETS, GradientCanceling

__all__ = ["Attack", "PoisonResult", "GradientCanceling", "PRESETS"]
