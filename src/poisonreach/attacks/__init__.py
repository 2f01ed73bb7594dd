"""Poisoning attacks: constructor hyperparameters, ``poison(model, X, y, loss=None)``, a PoisonResult.

GradientCanceling (Algorithm 1) and FrankWolfeCanceling (appendix B) attack a target model
(``model_targeted``); the baselines attack the clean model. :data:`ATTACKS` maps each short name to
its class.
"""

from .base import Attack, PoisonResult
from .frank_wolfe import FrankWolfeCanceling
from .gradient_canceling import GradientCanceling
from .gradient_matching import GradientMatching
from .label_flip import LabelFlip
from .tgda import TGDA

ATTACKS = {cls.name: cls for cls in (GradientCanceling, FrankWolfeCanceling, GradientMatching, LabelFlip, TGDA)}

__all__ = ["ATTACKS", "Attack", "PoisonResult", "GradientCanceling", "FrankWolfeCanceling", "GradientMatching", "LabelFlip", "TGDA"]
