"""Gradient Matching (Geiping et al. 2021, "Witches' Brew"), adapted to indiscriminate poisoning as in
section 4 of the paper, equations (20)–(21), and appendix C.4.

The attacker knows the clean model w. Its wish is a step that *un*-fits the clean data: the gradient
of the reversed cross-entropy (20) (Fowl et al. 2021a) over the clean data,

    ℓ̄(h, y) = −log[1 − exp(−ℓ(h, y))] = −log(1 − p_y),   t = ∇_w ℓ̄(µ; w) = (1/n) Σ_i ∇_w ℓ̄(z_i; w),

computed once as an explicit chunked sum. The poisons ν̂ = (1/m) Σ_j δ_{z_j}, m = round(n·ε_d), start
from a seeded subsample of the clean points (their labels kept) and are moved so that the gradient of
the *ordinary* loss on them points the same way (21):

    S(z) = 1 − cos(t, P),   P = Σ_j ∇_w ℓ(z_j; w)   (the cosine ignores P's scale, so a sum will do),
    ∂S/∂z_j = ∇_{z_j} ⟨∇_w ℓ(z_j; w), u⟩,   u = ∂S/∂P = cos·P/‖P‖² − t/(‖t‖‖P‖).

Like Gradient Canceling's (19), each step is two chunked passes over the poisons: P without a graph,
then the bracket with u fixed (:func:`poisonreach.gradients.cancel_gradient`).

The optimiser is Witches' Brew's: Adam on the sign of the gradient ("signAdam"), 250 steps, the step
divided by 10 after 3/8, 5/8 and 7/8 of them, each step projected onto the admissible set (the box Γ
intersected with an optional ℓ∞ ball around the starting point), the best of ``restarts`` random
starts in that ball. Where we differ from Witches' Brew, and why:

- the whole poison set is matched at once (equation (21)); Witches' Brew sums the objective over
  poison batches of 512, an approximation forced by GPU memory that chunking makes unnecessary;
- ``lr`` is in pixel units, because our poisons live in pixel space; Witches' Brew steps 0.1 in the
  normalised input space, i.e. 0.1·σ in pixels (≈ 0.03 on MNIST and CIFAR-10), our default;
- no differentiable data augmentation, no ensembles, one restart by default (Witches' Brew: 8),
  unbounded perturbations by default (the paper's budget is ε_d, not a perturbation size);
- the model is in eval mode (Witches' Brew keeps dropout on while brewing).

Matching a direction says nothing about the poisons' pull once the victim retrains from scratch
(section 4, point (3)): unbounded poisons reach S ≈ 0 within a few dozen steps, yet a logistic
regression retrained on digits ∪ poisons lost no accuracy for ε_d ≤ 0.5 in our runs.

Two directions to match (``objective``):

- ``"reversed"`` (default; Table 2's baseline): t = ∇_w ℓ̄(µ; w) at the clean model, with the
  reversed loss (20). It exists for the cross-entropy and the logistic loss only: for least squares
  the paper defines no reversed loss, and the negated squared loss has zero mean gradient at the
  clean fit, so regression targets and custom losses are refused.
- ``"target"`` (model-targeted; our reading of appendix C.4 and Figure 6, where GM is compared with GC
  on least squares and lands on "different model parameters for every ε_d"): the model given is the
  target w_t, and t = −g(µ; w_t) = −∇_w ℓ(µ; w_t), the direction GC's poisons must cancel (16), i.e.
  the negated loss ℓ̄ = −ℓ taken at the target, where its gradient is not zero. GM matches only the
  direction; GC also matches the size, ε_d·g(ν̂) = −g(µ). Any loss works, least squares included. As
  P/n = ε_d·g(ν̂), the GC residual ‖g(µ) + ε_d·g(ν̂)‖ comes for free at every step and is recorded in
  ``grad_norm_history``, so the two attacks' curves can be drawn together.

For ``"target"``, the poisons start from a sample with replacement when m = n: the whole clean set
would be a start at the maximum S = 2, where S has no gradient. The paper does not say which
objective its Figure 6 used; ``"target"`` is the one under which the figure's comparison with GC
(same data, same target) makes sense.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..errors import PoisonReachError
from ..gradients import Params, cancel_gradient, flat_norm, gradient_sum, inner, select_parameters
from ..losses import REVERSED, LossFn, resolve
from ..validation import Choice, Number, check_model_data, evaluating
from .base import Attack, PoisonResult, box_bounds, clamp_box, draw_sources

OBJECTIVES = ("reversed", "target")
OPTIMIZERS = ("signadam", "adam", "sgd")
SCHEDULES = ("multistep", "constant")
# Witches' Brew's step-decay milestones (MultiStepLR, factor 0.1) as fractions of the steps, and its
# momentum for "momSGD".
MILESTONES = (3 / 8, 5 / 8, 7 / 8)
SGD_MOMENTUM = 0.9
# S within this of its maximum 2 at the start: its gradient there is rounding noise
MAXIMUM_TOLERANCE = 1e-9


def matching_gradient(
    model: nn.Module,
    params: Params,
    target: Params,
    X: Tensor,
    y: Tensor,
    loss_fn: LossFn,
    *,
    chunk_size: int,
    device: torch.device,
) -> tuple[float, Tensor, Params]:
    """The matching objective S = 1 − cos(t, P), P = Σ_j ∇_w ℓ(z_j; w) (21), at the points (X, y),
    its gradient with respect to every z_j (see the module docstring), and P; two chunked passes."""
    P = gradient_sum(model, params, X, y, loss_fn, chunk_size=chunk_size, device=device)
    t_norm, p_norm = math.sqrt(float(inner(target, target, dtype=torch.float64))), math.sqrt(float(inner(P, P, dtype=torch.float64)))
    if p_norm == 0:
        raise PoisonReachError(
            "the poisons' loss gradient is exactly zero, so its direction is undefined: start from other "
            "points (another seed) or use a model whose loss is not saturated"
        )
    cos = float(inner(target, P, dtype=torch.float64)) / (t_norm * p_norm)
    u = [cos / p_norm**2 * p - t / (t_norm * p_norm) for p, t in zip(P, target)]  # ∂S/∂P
    return 1.0 - cos, cancel_gradient(model, params, X, y, loss_fn, u, chunk_size=chunk_size).x, P


class GradientMatching(Attack):
    """Gradient Matching: poisons whose loss gradient points along the reversed-loss gradient of the
    clean data (equations (20)–(21); Geiping et al. 2021).

    Parameters
    ----------
    eps_d: the poison budget ε_d = m / n (> 0); m = round(n·ε_d) poisons, at least one, added to the
        clean data.
    objective: the direction t to match (see the module docstring): ``reversed`` (equation (20) at
        the clean model given to :meth:`poison`) or ``target`` (−g(µ) at the target model given to
        :meth:`poison`: model-targeted, any loss, least squares included; appendix C.4).
    steps: optimisation steps per restart (Witches' Brew: 250).
    lr: the step size in pixel units (see the module docstring for the scale).
    optimizer: ``signadam`` (Adam on the sign of the gradient, Witches' Brew's default), ``adam``
        (on the gradient itself) or ``sgd`` (heavy-ball momentum 0.9, Witches' Brew's "momSGD").
        The gradient of S is small and its scale varies, so ``sgd`` needs its own ``lr``.
    schedule: ``multistep`` (lr divided by 10 after 3/8, 5/8 and 7/8 of the steps) or ``constant``.
    restarts: independent random starts in the ℓ∞ ball; the poisons with the smallest final S are
        kept. More than one needs ``eps_perturbation``, since without a ball every start is the
        clean point itself.
    eps_perturbation: the ℓ∞ bound on z_j − x_j around the starting clean point x_j (Witches' Brew:
        16/255); None leaves the poisons free within the box. With a bound, each start is
        x_j + clamp(ε·N(0, 1), −ε, ε), as in Witches' Brew.
    box: the admissible set Γ for the features, as in GradientCanceling: ``(low, high)``,
        ``"data-range"`` (the per-feature range of the clean data) or None.
    parameters: whose gradients are matched: ``all`` (Witches' Brew), ``last`` or ``first``.
    chunk_size: rows per forward/backward chunk; bounds memory, not the result.
    seed: seeds the starting points and the random starts.
    """

    name = "gm"
    constraints = {
        "objective": Choice(OBJECTIVES),
        "steps": Number(low=0, integer=True),
        "optimizer": Choice(OPTIMIZERS),
        "schedule": Choice(SCHEDULES),  # its own schedules, not the canceling attacks'
        "restarts": Number(low=1, integer=True),
        "eps_perturbation": Number(low=0, low_open=True, optional=True),
    }

    def __init__(
        self,
        eps_d: float,
        *,
        objective: str = "reversed",
        steps: int = 250,
        lr: float = 0.03,
        optimizer: str = "signadam",
        schedule: str = "multistep",
        restarts: int = 1,
        eps_perturbation: float | None = None,
        box: tuple[float, float] | str | None = (0.0, 1.0),
        parameters: str = "all",
        chunk_size: int = 128,
        **shared,
    ):
        self._set_params(locals())
        if self.restarts > 1 and self.eps_perturbation is None:
            raise PoisonReachError(
                "restarts > 1 needs eps_perturbation: restarts differ only by their random start in the ℓ∞ ball, "
                "so without one every restart is the same run"
            )

    def _lr_at(self, step: int) -> float:
        """The step size of step ``step`` (0-based): ``lr`` divided by 10 at each milestone passed."""
        if self.schedule == "constant":
            return self.lr
        return self.lr * 0.1 ** sum(step >= f * self.steps for f in MILESTONES)

    @property
    def model_targeted(self) -> bool:
        return self.objective == "target"

    def poison(self, model: nn.Module, X: Tensor, y: Tensor, loss=None) -> PoisonResult:
        """Craft poisons against ``model`` (its parameters are w: the clean model, or the target w_t
        with ``objective="target"``) on clean data (X, y)."""
        device = self._device(model)
        with evaluating(model):  # a fixed w: no dropout, batch-norm running statistics
            return self._run(model, X, y, loss, device)

    def _run(self, model: nn.Module, X: Tensor, y: Tensor, loss, device: torch.device) -> PoisonResult:
        num_outputs = check_model_data(model, X, y, device, strict=not callable(loss))
        loss_fn = resolve(num_outputs, y, loss)
        if self.objective == "reversed" and loss_fn not in REVERSED:
            raise PoisonReachError(
                "gradient matching needs the reversed loss of equation (20), defined here for the cross-entropy "
                "and the logistic loss (class labels); regression targets and custom losses have none: "
                "use objective='target' (match −g(µ) at a target model, appendix C.4) or GradientCanceling"
            )
        params = select_parameters(model, self.parameters)
        n = len(X)
        m = self.num_poisons(n)
        gen = torch.Generator().manual_seed(self.seed)
        # distinct points while they last; for objective "target" the whole clean set is no start: its
        # gradient sum is exactly −n·t, the maximum of S, where S's gradient vanishes
        source = draw_sources(n, m, gen, distinct=m < n or self.objective == "reversed")
        start = X[source].to(device)
        py = y[source].to(device)

        # t = ∇_w ℓ̄(µ; w) with ℓ̄ the reversed loss (20), or −g(µ; w_t) = ∇_w (−ℓ)(µ; w_t): the sum over
        # the clean chunks divided by n; computed once, w is fixed.
        sign, matched = (1.0, REVERSED[loss_fn]) if self.objective == "reversed" else (-1.0, loss_fn)
        target = [sign * g / n for g in gradient_sum(model, params, X, y, matched, chunk_size=self.chunk_size, device=device)]
        target_norm = flat_norm(target)
        if target_norm == 0:
            raise PoisonReachError(
                "the gradient to match is zero on the clean data, so there is no direction: "
                + ("the target minimises the clean loss already" if self.objective == "target" else "the reversed loss is flat here")
            )
        low, high = self._bounds(X, start)

        best = None
        objectives = []
        for restart in range(self.restarts):
            x = start.clone()
            if self.eps_perturbation is not None:
                noise = torch.randn(start.shape, generator=gen, dtype=start.dtype).to(device)
                x = x + (self.eps_perturbation * noise).clamp(-self.eps_perturbation, self.eps_perturbation)
            x = clamp_box(x, low, high)
            x, history, residuals = self._optimize(model, params, target, x, py, loss_fn, low, high, device, restart, n)
            objectives.append(history[-1])
            if best is None or history[-1] < best[1][-1]:
                best = (x, history, residuals, restart)
        x, history, residuals, chosen = best
        return self._result(
            x, py, source,
            # ‖g(µ) + ε_d·g(ν̂)‖ at the target (objective "target"); the reversed objective has no target
            history=residuals,
            objective_history=history,  # S = 1 − cos before the first step and after each
            num_clean=n,
            num_poisons=m,
            target_grad_norm=target_norm,
            restart_objectives=objectives,
            restart=chosen,
        )

    def _optimize(self, model, params, target, x, py, loss_fn, low, high, device, restart, n) -> tuple[Tensor, list[float], list[float]]:
        """``steps`` projected steps on S; the histories hold S (and, for ``objective="target"``,
        ‖g(µ) + P/n‖ with g(µ) = −t) before the first step and after each."""
        x = x.detach().requires_grad_(True)  # a leaf for torch.optim; its .grad is set by hand
        if self.optimizer == "sgd":
            opt = torch.optim.SGD([x], lr=self.lr, momentum=SGD_MOMENTUM)
        else:
            opt = torch.optim.Adam([x], lr=self.lr)
        history: list[float] = []
        residuals: list[float] = []
        desc = f"GM eps_d={self.eps_d:g}" + (f" restart {restart + 1}/{self.restarts}" if self.restarts > 1 else "")
        bar = self._progress(range(self.steps + 1), desc=desc)
        for step in bar:
            objective, grad, P = matching_gradient(
                model, params, target, x.detach(), py, loss_fn, chunk_size=self.chunk_size, device=device
            )
            history.append(objective)
            if self.objective == "target":
                residuals.append(flat_norm([p / n - t for p, t in zip(P, target)]))
            if step == 0 and objective > 2 - MAXIMUM_TOLERANCE:
                # S = 2 is its maximum, where the gradient is zero or rounding noise (whose sign signed Adam
                # would follow), e.g. when a sample with replacement drew every clean point once
                raise PoisonReachError(
                    f"the poisons start at the maximum of the matching objective (S = {objective:.10g}, their gradient "
                    "points exactly against t), where its gradient vanishes: give eps_perturbation for a random start "
                    "in an ℓ∞ ball, or another seed"
                )
            bar.set_postfix(objective=f"{objective:.4g}")
            if step == self.steps:
                break  # the last entry is S after the final update
            x.grad = grad.sign() if self.optimizer == "signadam" else grad
            opt.param_groups[0]["lr"] = self._lr_at(step)
            opt.step()
            with torch.no_grad():
                x.copy_(clamp_box(x, low, high))
        bar.close()
        return x.detach(), history, residuals

    def _bounds(self, X: Tensor, start: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """Per-coordinate bounds of the admissible set: the box Γ intersected with the ℓ∞ ball."""
        low, high = box_bounds(self.box, X, device=start.device, dtype=start.dtype)
        if self.eps_perturbation is not None:
            ball_low, ball_high = start - self.eps_perturbation, start + self.eps_perturbation
            low = ball_low if low is None else torch.maximum(low, ball_low)
            high = ball_high if high is None else torch.minimum(high, ball_high)
        return low, high

