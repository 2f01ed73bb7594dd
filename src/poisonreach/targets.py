"""Target parameters: GradPC, RandomPC, FixedTarget (:data:`TARGET_GENERATORS`), scaling, distances.

A target generator answers ``generate(model, X, y) -> nn.Module``: a corrupted copy of the clean
model, never the model itself. Parameter corruption (Sun et al. 2020) perturbs the parameters
directly within an L2 ball of radius ε_w over all parameters, biases included.

ε_w: the paper's text calls it a relative change, but its published numbers come from an absolute
radius (the published code projects onto ‖δ‖ ≤ ε_w). ``eps_w_mode="absolute"`` (default) reproduces
the tables; ``"relative"`` uses the radius ε_w·‖w‖.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from .validation import Choice, Number, check_model_data, check_number
from .gradients import flat_norm
from .errors import PoisonReachError
from .estimator import Estimator
from .losses import resolve
from .models import last_linear

EPS_W_MODES = ("absolute", "relative")


def _radius(model: nn.Module, eps_w: float, mode: str) -> float:
    return eps_w if mode == "absolute" else eps_w * flat_norm(list(model.parameters()))


def _project_l2(delta: list[Tensor], radius: float) -> None:
    """Scale ``delta`` in place onto the L2 ball of ``radius`` (all tensors as one vector)."""
    norm = flat_norm(delta)
    if norm > radius:
        for d in delta:
            d.mul_(radius / norm)


def _apply(model: nn.Module, delta: list[Tensor]) -> nn.Module:
    target = copy.deepcopy(model)
    with torch.no_grad():
        for p, d in zip(target.parameters(), delta):
            p.add_(d)
    return target.eval()


class _Corruption(Estimator):
    """The parameter-corruption generators: a radius ε_w, absolute or relative, and a seed.

    Parameters
    ----------
    eps_w: the radius of the corruption δ, an L2 ball over all parameters, biases included (> 0).
    eps_w_mode: ``absolute`` (‖δ‖ ≤ ε_w, what the paper's numbers use) or ``relative`` (‖δ‖ ≤ ε_w·‖w‖).
    seed: seeds the random direction (RandomPC) or the batch order (GradPC).
    """

    constraints = {"eps_w": Number(low=0, low_open=True), "eps_w_mode": Choice(EPS_W_MODES)}

    def __init__(self, eps_w: float, *, eps_w_mode: str = "absolute", seed: int = 0):
        self._set_params(locals())

    def config(self) -> dict:
        return {"generator": type(self).__name__.lower(), **{k: v for k, v in vars(self).items() if k != "device"}}


class RandomPC(_Corruption):
    """Random parameter corruption: a Gaussian direction scaled to the radius (Sun et al. 2020)."""

    def generate(self, model: nn.Module, X: Tensor | None = None, y: Tensor | None = None) -> nn.Module:
        gen = torch.Generator().manual_seed(self.seed)
        delta = [torch.randn(p.shape, generator=gen).to(p) for p in model.parameters()]
        radius = _radius(model, self.eps_w, self.eps_w_mode)
        norm = flat_norm(delta)
        return _apply(model, [d * (radius / norm) for d in delta])


class FixedTarget(Estimator):
    """A target given by its last linear layer's parameters (Figure 1: a grid of w ∈ R² on the OR data).

    The other layers are the clean model's.

    Parameters
    ----------
    weight: the last layer's weight, nested lists or a tensor of its shape (out, features).
    bias: its bias (out,), or None to keep the clean model's.
    """

    def __init__(self, weight: list | Tensor, bias: list | Tensor | None = None):
        self.weight = weight
        self.bias = bias
        for name, value in (("weight", weight), ("bias", bias)):
            if value is not None and not torch.isfinite(torch.as_tensor(value, dtype=torch.float64)).all():
                raise PoisonReachError(f"{name} must be finite numbers, got {value!r}")

    def config(self) -> dict:
        return {"generator": "fixed", "weight": self.weight, "bias": self.bias}

    def generate(self, model: nn.Module, X: Tensor | None = None, y: Tensor | None = None) -> nn.Module:
        target = copy.deepcopy(model).eval()
        head = last_linear(target)
        with torch.no_grad():
            for name, value in (("weight", self.weight), ("bias", self.bias)):
                if value is None:
                    continue
                param = getattr(head, name)
                value = torch.as_tensor(value, dtype=param.dtype).reshape(-1)
                if value.numel() != param.numel():
                    raise PoisonReachError(f"the target {name} has {value.numel()} values but the model's last layer {name} has shape {tuple(param.shape)}")
                param.copy_(value.view_as(param))
        return target


class GradPC(_Corruption):
    """Gradient-based parameter corruption (Sun et al. 2020), as the paper's published code runs it.

    One pass over the training set in batches of ``batch_size``: each step adds ``step_size`` times
    the training-loss gradient normalised by its global L2 norm (ascent, taken at the current
    corrupted parameters), then projects the accumulated perturbation onto the ε_w ball. The model
    stays in eval mode. ``step_size`` defaults to a tenth of the radius, so the ball is reached within
    ten steps and the rest of the pass moves along its surface.

    Parameters
    ----------
    step_size: the length of each ascent step; None: a tenth of the radius.
    batch_size: training points per step.
    epochs: passes over the training set (the paper's code: one).
    """

    constraints = {
        "step_size": Number(low=0, low_open=True, optional=True),
        "batch_size": Number(low=1, integer=True),
        "epochs": Number(low=1, integer=True),
    }

    def __init__(
        self,
        eps_w: float,
        *,
        eps_w_mode: str = "absolute",
        step_size: float | None = None,
        batch_size: int = 64,
        epochs: int = 1,
        **shared,
    ):
        self._set_params(locals())

    def config(self) -> dict:
        cfg = super().config()
        cfg.pop("progress")
        return cfg

    def generate(self, model: nn.Module, X: Tensor, y: Tensor, loss=None) -> nn.Module:
        device = self._device(model)
        loss_fn = resolve(check_model_data(model, X, y, device, strict=not callable(loss)), y, loss)
        target = copy.deepcopy(model).eval()
        params = list(target.parameters())
        radius = _radius(model, self.eps_w, self.eps_w_mode)
        step = self.step_size if self.step_size is not None else radius / 10
        delta = [torch.zeros_like(p) for p in params]
        gen = torch.Generator().manual_seed(self.seed)
        total = self.epochs * ((len(X) + self.batch_size - 1) // self.batch_size)
        with self._progress(total=total, desc=f"GradPC eps_w={self.eps_w:g}") as bar:
            for _ in range(self.epochs):
                order = torch.randperm(len(X), generator=gen)
                for start in range(0, len(X), self.batch_size):
                    idx = order[start : start + self.batch_size]
                    losses = loss_fn(target(X[idx].to(device)), y[idx].to(device))
                    grads = torch.autograd.grad(losses.mean(), params)
                    norm = flat_norm(grads)
                    with torch.no_grad():
                        if norm > 0:
                            for d, g in zip(delta, grads):
                                d.add_(g, alpha=step / norm)
                        _project_l2(delta, radius)
                        for p, p0, d in zip(params, model.parameters(), delta):
                            p.copy_(p0 + d)
                    bar.update()
        return target


# The target generators by name (RunConfig's ``target``; the experiments add the poisoned targets).
TARGET_GENERATORS = {"gradpc": GradPC, "randompc": RandomPC, "fixed": FixedTarget}


def scale_target(model: nn.Module, factor: float) -> nn.Module:
    """A copy whose last linear layer (weight and bias) is multiplied by ``factor`` (appendix C.6).

    The logits scale by ``factor``: predictions, hence accuracy, are unchanged for factor > 0, while
    the threshold τ changes (it tends to 0 as factor → 0: less confident models are easier to reach).
    """
    check_number("factor", factor, low=0, low_open=True)
    target = copy.deepcopy(model).eval()
    with torch.no_grad():
        for p in last_linear(target).parameters():
            p.mul_(factor)
    return target


def parameter_distance(a: nn.Module, b: nn.Module) -> float:
    """‖θ_a − θ_b‖ / ‖θ_b‖ over all parameters: how close a retrained model is to the target b."""
    pa, pb = list(a.parameters()), list(b.parameters())
    if [p.shape for p in pa] != [p.shape for p in pb]:
        raise PoisonReachError("the two models have different parameter shapes")
    return flat_norm([x.detach() - y.detach().to(x.device) for x, y in zip(pa, pb)]) / max(flat_norm(pb), 1e-30)
