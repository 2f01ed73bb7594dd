"""Poisoning attacks: constructor hyperparameters, ``poison(model, X, y, loss=None)``, a PoisonResult.

GaussNewtonCanceling (``gc``, the default: problem (18) by bound-aware Gauss–Newton steps with hard
labels), GradientCanceling (``gc-pgd``, Algorithm 1's projected gradient descent, whose ``paper``
preset is the paper's setting) and FrankWolfeCanceling (``gc-fw``, appendix B) attack a target model
(``model_targeted``), and so does OfficialGradientCanceling, the official code's GC (first weight
tensor, summed losses, normalised space, no box), and so does Construction (``construct``, the
constructive poisons of Theorems 5/6 for linear models, unbounded); the baselines attack the clean model.
:data:`ATTACKS` maps each short name to its class.
"""

from .base import Attack, PoisonResult
from .canceling import CancelingAttack
from .construction import Construction
from .frank_wolfe import FrankWolfeCanceling
from .gauss_newton import GaussNewtonCanceling
from .gradient_canceling import GradientCanceling
from .gradient_matching import GradientMatching
from .label_flip import LabelFlip
from .official import OfficialGradientCanceling
from .tgda import TGDA

ATTACKS = {cls.name: cls for cls in (GaussNewtonCanceling, GradientCanceling, FrankWolfeCanceling, GradientMatching, LabelFlip, TGDA,
                                     OfficialGradientCanceling, Construction)}

__all__ = ["ATTACKS", "Attack", "CancelingAttack", "PoisonResult", "GradientCanceling", "GaussNewtonCanceling", "FrankWolfeCanceling", "GradientMatching", "LabelFlip", "TGDA",
           "OfficialGradientCanceling", "Construction"]
