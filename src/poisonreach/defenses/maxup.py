"""MaxUp (Gong et al. 2021, "MaxUp: Lightweight Adversarial Training with Data Augmentation Improves
Neural Network Training"), the training defense of appendix C.8.

Each sample x is replaced by m random augmentations x'_1 … x'_m and the model minimises the worst
of them, E_x[max_i ℓ(x'_i)], instead of E_x[ℓ(x)]. The paper uses it with "random perturbations":
the default augmentation adds Gaussian noise; ``shift`` translates images by whole pixels.
With m = 1 it is ordinary training on randomly augmented data; with zero strength it is ordinary
training.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import training
from ..errors import PoisonReachError
from ..estimator import Estimator
from ..validation import Choice, Number, check_number

AUGMENTATIONS = ("noise", "shift")


class MaxUp(Estimator):
    """A training defense: :meth:`train` has :func:`poisonreach.training.train`'s signature.

    Parameters
    ----------
    m: augmentations per sample; the loss is the largest of the m.
    augmentation: ``noise`` (x + σ·N(0, I), σ = ``strength``) or ``shift`` (images (N, C, H, W)
        moved by up to ``strength`` whole pixels in each direction, the border filled with zeros).
    strength: σ of the noise, or the largest shift in pixels (an integer).
    """

    name = "maxup"
    constraints = {"m": Number(low=1, integer=True), "augmentation": Choice(AUGMENTATIONS)}

    def __init__(self, m: int = 4, *, augmentation: str = "noise", strength: float = 0.1):
        self._set_params(locals())
        check_number("strength", strength, low=0, integer=augmentation == "shift")  # shifts are whole pixels

    def augment(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """One random augmentation of every row of the (CPU) batch x."""
        if self.augmentation == "noise":
            return x + self.strength * torch.randn(x.shape, generator=generator, dtype=x.dtype)
        if x.dim() != 4:
            raise PoisonReachError(f"augmentation 'shift' needs images (N, C, H, W), got shape {tuple(x.shape)}: use 'noise'")
        k = int(self.strength)
        shifts = torch.randint(-k, k + 1, (len(x), 2), generator=generator)
        padded = nn.functional.pad(x, (k, k, k, k))
        h, w = x.shape[-2:]
        return torch.stack([padded[i, :, k - dy : k - dy + h, k - dx : k - dx + w] for i, (dy, dx) in enumerate(shifts.tolist())])

    def train(self, model: nn.Module, X: Tensor, y: Tensor, **kwargs) -> nn.Module:
        """Train ``model`` in place with the MaxUp objective; ``kwargs`` are those of ``training.train``."""
        for key in ("augment", "worst_of"):
            if key in kwargs:
                raise PoisonReachError(f"MaxUp sets {key} itself: configure it with m, augmentation and strength")
        return training.train(model, X, y, augment=self.augment, worst_of=self.m, **kwargs)
