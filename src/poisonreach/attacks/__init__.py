"""Poisoning attacks: constructor hyperparameters, ``poison(model, X, y, loss=None)``, a PoisonResult.

GradientCanceling attacks a target model (``model_targeted``); the baselines attack the clean model.
"""

from .base import Attack, PoisonResult
from .gradient_canceling import PRESETS, GradientCanceling
from .gradient_matching import GradientMatching
from .label_flip import LabelFlip
from .tgda import TGDA

__all__ = ["Attack", "PoisonResult", "GradientCanceling", "GradientMatching", "LabelFlip", "TGDA", "PRESETS"]
