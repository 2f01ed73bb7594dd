"""Gradient Canceling over poisoning measures by Frank–Wolfe (appendix B, (B.1)–(B.5)).

(B.1), min_ν ½‖g(µ) + ε_d·g(ν)‖², is a convex quadratic in the measure ν. ν is kept as atoms z_i with
weights w_i and g(ν) = Σ_i w_i ∇_w ℓ(z_i; w) as a running vector. Iteration t solves the linear
subproblem (B.5) for v = g(µ) + ε_d·g(ν_t) (:func:`linear_minimization`), then mixes the new atom in,
ν_{t+1} = (1 − η_t)ν_t + η_t δ_{z_t} (B.3). The paper's ν̂ is uniform over m points, so the final
measure is rounded to multiplicities that sum to m (:func:`poisonreach.rounding.largest_remainder`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import PoisonReachError
from ..gradients import cancel_gradient, flat_norm, inner
from ..losses import task_of, to_probabilities
from ..rounding import largest_remainder
from ..validation import Choice, Number, evaluating
from .base import PoisonResult, clamp_box
from .canceling import CancelingAttack, CancelingProblem, canceling_problem

# line-search: the exact minimiser of (B.1) along the FW direction; open-loop: η_t = 2/(t + 2) (appendix B)
STEPS = ("line-search", "open-loop")


def linear_minimization(
    model: nn.Module,
    params: list[Tensor],
    loss_fn,
    v: list[Tensor],
    starts: Tensor,
    labels: Tensor,
    low: Tensor,
    high: Tensor,
    *,
    steps: int,
    chunk_size: int,
    device: torch.device,
) -> tuple[int, Tensor, Tensor, float]:
    """Approximately solve the linear subproblem (B.5): min over z = (x, y) ∈ Γ = [low, high] × labels
    of ⟨v, ∇_w ℓ(z; w)⟩.

    The paper notes that (B.5) is nonconvex. Even for a linear model h = Wx + b with cross-entropy it
    is ⟨p(x) − e_y, V_W x + v_b⟩ (∇_W ℓ = (p − e_y)xᵀ), a nonconvex function of x for each label. For
    one output it depends on x only through two affine functions (h and u = v_Wᵀx + v_b):
    (σ(h) − y)·u for the logistic loss and (h − y)·u, an indefinite quadratic, for the squared loss;
    its minimum over the box is then on the boundary of the box's 2-D image, i.e. at a box point
    with all coordinates but (generically) one at a bound, which the corner starts below reach.

    So we run projected gradient from every start paired with every label, and from the box corner
    that minimises the linearisation at each of those (x_i = high_i where the gradient is negative,
    else low_i), and keep the best point found; it is a local minimum, not a certified global one.
    Each candidate takes box-scaled steps −s·(high − low)·∇/‖∇‖_∞, with s doubled (up to 1) after a
    decrease and halved, the step undone, otherwise.

    Returns the index of the start the winner came from, its x and label, and its value.
    """

    def scores(x: Tensor, ly: Tensor) -> tuple[Tensor, Tensor]:
        bracket = cancel_gradient(model, params, x, ly, loss_fn, v, chunk_size=chunk_size, device=device)
        return bracket.values, bracket.x

    k = len(starts)
    # label-major: candidate i starts from starts[i % k]
    x = clamp_box(starts.to(device).repeat(len(labels), *[1] * (starts.dim() - 1)), low, high)
    ly = labels.to(device).repeat_interleave(k, dim=0)
    val, grad = scores(x, ly)
    corners = torch.where(grad < 0, high, low)
    cval, cgrad = scores(corners, ly)
    x, ly, val, grad = torch.cat([x, corners]), torch.cat([ly, ly]), torch.cat([val, cval]), torch.cat([grad, cgrad])
    width = high - low
    shape = (-1,) + (1,) * (x.dim() - 1)
    step = torch.full((len(x),), 0.25, dtype=x.dtype, device=device)
    for _ in range(steps):
        scale = grad.flatten(1).abs().amax(1).clamp_min(torch.finfo(grad.dtype).tiny)
        trial = clamp_box(x - (step / scale).reshape(shape) * width * grad, low, high)
        tval, tgrad = scores(trial, ly)
        better = tval < val
        x[better], val[better], grad[better] = trial[better], tval[better], tgrad[better]
        step = torch.where(better, (2 * step).clamp(max=1.0), step / 2)
    best = int(torch.argmin(val))
    return best % k, x[best], ly[best], float(val[best])


def exact_step(r: list[Tensor], d: list[Tensor]) -> float:
    """argmin over η ∈ [0, 1] of ½‖r + η·d‖².

    Along the Frank–Wolfe direction ν_t → δ_z, g(ν) is affine in η, so (B.1) is the quadratic
    ½‖r‖² + η⟨r, d⟩ + ½η²‖d‖² with r = g(µ) + ε_d·g(ν_t) and d = ε_d·(∇_w ℓ(z) − g(ν_t)); its
    minimiser −⟨r, d⟩/‖d‖² is clipped to [0, 1] so that ν stays a probability measure.
    """
    rd = float(inner(r, d, dtype=torch.float64))
    dd = float(inner(d, d, dtype=torch.float64))
    return 0.0 if dd == 0 else min(max(-rd / dd, 0.0), 1.0)


def label_set(y: Tensor, num_outputs: int, device) -> Tensor:
    """The label part of Γ, in the clean labels' format."""
    if task_of(y) == "regression":
        # (B.5) is linear in a regression target y (the squared loss gives (h − y)·u), unbounded
        # below unless y is bounded: Γ takes the clean targets' range, whose ends are the minimisers
        return torch.stack([y.min(), y.max()]).to(device)
    classes = torch.arange(2 if num_outputs == 1 else num_outputs, device=device)
    # (B.5) is linear in a soft label, so a class (a vertex of the simplex) is always a minimiser
    return to_probabilities(classes, num_outputs) if y.is_floating_point() else classes


class FrankWolfeCanceling(CancelingAttack):
    """Gradient Canceling solved over poisoning measures by Frank–Wolfe (appendix B).

    ν_0 is uniform on the clean points GradientCanceling starts from (projected onto the box), so
    both attacks' histories start from the same measure when the clean data lies in the box. Each
    iteration adds one atom whose label it chooses itself (the label part of Γ is the classes).

    Parameters
    ----------
    eps_d: the poison budget ε_d = m / n (> 0); the measure is rounded to m = round(n·ε_d) points.
    iterations: Frank–Wolfe iterations, each adding one atom.
    step: the step sizes η_t: ``line-search`` (the exact minimiser, :func:`exact_step`) or
        ``open-loop`` (η_t = 2/(t + 2), the paper's example); both take η_0 = 1.
    starts: clean points drawn per iteration as starts of the subproblem (B.5); each is paired with
        every label and also gives a box-corner start (:func:`linear_minimization`).
    start_steps: projected-gradient steps per start in the subproblem (B.5).
    chunk_size: rows per forward/backward chunk; bounds memory, not the result.
    box: the admissible set Γ of the features: ``(low, high)`` or ``"data-range"``; it must be
        bounded, since (B.5) has no minimum over unbounded features.
    seed: seeds the initial subsample, the replaced subset and the starts of the subproblems.
    """

    name = "gc-fw"
    constraints = {
        "step": Choice(STEPS),
        "starts": Number(low=1, integer=True),
        "start_steps": Number(low=0, integer=True),
    }

    def __init__(
        self,
        eps_d: float,
        *,
        iterations: int = 200,
        step: str = "line-search",
        starts: int = 8,
        start_steps: int = 30,
        chunk_size: int = 128,
        **shared,
    ):
        self._set_params(locals())
        if self.box is None:
            raise PoisonReachError(
                "Frank-Wolfe needs a bounded box: its subproblem (B.5) has no minimum over "
                "unbounded features; pass box=(low, high) or box='data-range'"
            )

    def poison(self, model: nn.Module, X: Tensor, y: Tensor, loss=None, start: PoisonResult | None = None) -> PoisonResult:
        """Craft poisons against the target ``model`` (its parameters are w) on clean data (X, y),
        ν_0 on ``start``'s first m poisons if given (:func:`canceling_problem`).

        The history holds ‖g(µ) + ε_d·g(ν_t)‖ of the measures; ``extra`` has the FW gaps and step
        sizes, the number of atoms, and the objective ½‖·‖² of the last measure and of the returned
        m points (``objective_measure``, ``objective_rounded``).
        """
        device = self._device(model)
        with evaluating(model):  # the target is a fixed w: no dropout, batch-norm running statistics
            problem = canceling_problem(self, model, X, y, loss, device, start)
            x, py, source, history, extra = self._frank_wolfe(problem)
        return self._result(x, py, source, history=history, tau=problem.tau, kept=problem.kept, **problem.record(), **extra)

    def _frank_wolfe(self, p: CancelingProblem):
        """Frank–Wolfe on ν (see the module docstring).

        The first step is η_0 = 1 with either rule (as 2/(0 + 2)), so ν_1 = δ_{z_0}: left to the line
        search, ν_0's m atoms linger with small weights and make the rounding coarse (on the OR data
        of the tests, ratio 0.079 after rounding instead of 0.0085). The FW gap −⟨v, d⟩,
        d = ε_d(∇_w ℓ(z_t) − g(ν_t)), bounds the suboptimality of ν_t when (B.5) is solved exactly;
        with an approximate solution it is a lower bound of the true gap. Rounding to m points drops
        the atoms lighter than about 1/(2m).
        """
        m, eps = p.m, p.eps_d
        atoms_x, atoms_y = p.start_points()
        atoms_src = p.source.clone()
        weights = torch.full((m,), 1.0 / m, dtype=torch.float64, device=p.device)
        labels = label_set(p.y, p.num_outputs, p.device)
        # the running sums in float64, so that hundreds of rank-one updates do not drift
        g_nu = [s.double() / m for s in p.gradient_sum(atoms_x, atoms_y)]
        r = [gm.double() + eps * gn for gm, gn in zip(p.g_mu, g_nu)]
        history, gaps, etas = [flat_norm(r)], [], []
        bar = self._progress(range(self.iterations), desc=f"GC-FW eps_d={self.eps_d:g}")
        for t in bar:
            idx = torch.randint(len(p.X), (self.starts,), generator=p.gen)
            v = [ri.to(w.dtype) for ri, w in zip(r, p.params)]
            k, zx, zy, _ = linear_minimization(
                p.model, p.params, p.loss_fn, v, p.X[idx].to(atoms_x.dtype), labels, p.low, p.high,
                steps=self.start_steps, chunk_size=self.chunk_size, device=p.device,
            )
            g_z = p.gradient_sum(zx[None], zy[None])
            d = [eps * (gz.double() - gn) for gz, gn in zip(g_z, g_nu)]
            gaps.append(-float(inner(r, d)))
            eta = exact_step(r, d) if self.step == "line-search" and t > 0 else 2.0 / (t + 2)
            etas.append(eta)
            if eta > 0:  # (B.3)
                r = [ri + eta * di for ri, di in zip(r, d)]
                g_nu = [(1 - eta) * gn + eta * gz.double() for gn, gz in zip(g_nu, g_z)]
                weights = torch.cat([weights * (1 - eta), weights.new_tensor([eta])])
                atoms_x, atoms_y = torch.cat([atoms_x, zx[None]]), torch.cat([atoms_y, zy[None].to(atoms_y.dtype)])
                atoms_src = torch.cat([atoms_src, idx[k : k + 1]])
                keep = weights > 0  # η = 1 replaces the whole measure
                weights, atoms_x, atoms_y, atoms_src = weights[keep], atoms_x[keep], atoms_y[keep], atoms_src[keep.cpu()]
            history.append(flat_norm(r))
            bar.set_postfix(grad_norm=f"{history[-1]:.3g}", ratio=f"{history[-1] / max(history[0], 1e-30):.3g}", atoms=len(weights))
        bar.close()
        counts = largest_remainder(weights, m).to(weights.device)
        x = atoms_x.repeat_interleave(counts, dim=0)
        py = atoms_y.repeat_interleave(counts, dim=0)
        rounded = p.residual(p.gradient_sum(x, py))
        extra = {
            "fw_gap": gaps,
            "fw_step_sizes": etas,
            "num_atoms": len(weights),
            "objective_measure": 0.5 * history[-1] ** 2,
            "objective_rounded": 0.5 * flat_norm(rounded) ** 2,
        }
        return x, py, atoms_src.repeat_interleave(counts.cpu()), history, extra
