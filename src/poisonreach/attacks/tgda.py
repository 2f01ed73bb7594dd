"""The TGDA baseline: total-gradient descent ascent (Lu, Kamath & Yu 2022, "Indiscriminate Data
Poisoning Attacks on Neural Networks", TMLR; arXiv 2204.09092), the baseline of Tables 1, 2, 5 and 7.

TGDA treats poisoning as a Stackelberg game. The leader (the attacker) controls the poisons through a
generator G_θ applied to m = max(1, round(n·ε_d)) clean seed points S; the follower (the victim)
trains on the clean data D together with the poisons:

    leader:    max_θ  L(w) = mean_{z ∈ V} ℓ(z; w)                  (loss on clean validation data V)
    follower:  min_w  ℓ(θ, w) = mean_{z ∈ D ∪ G_θ(S)} ℓ(z; w)      (training loss on clean ∪ poisons)

The leader ascends the total gradient, the derivative of L(w*(θ)) through the follower's best
response w*(θ) by the implicit function theorem,

    D_θ L = ∂_θ L − ∂²_{θw} ℓ · (∂²_{ww} ℓ)⁻¹ · ∂_w L          (∂_θ L = 0: L sees θ only through w)

and the follower takes gradient-descent steps on ℓ. The Hessian-inverse-vector product
u = (∂²_{ww} ℓ + λI)⁻¹ ∂_w L is solved by a few conjugate-gradient iterations (damping λ), each a
Hessian-vector product by double backprop, chunk by chunk; then ∂²_{θw} ℓ · u = ∇_θ ⟨∇_w ℓ, u⟩ is
one more double backprop through the poisons only, the clean points not depending on θ.

One epoch visits the clean data in batches of ``batch_size``, each paired with its share of the
poisons (and of the validation data); on each batch the leader takes ``leader_steps`` total-gradient
ascent steps, then the follower ``follower_steps`` gradient-descent steps, as in the TGDA paper.

Choices and deviations (see also the class docstring):
- V: ``poison(..., validation=(X_val, y_val))`` gives the attacker's validation set, as in TGDA
  (whose code holds out 30% of each batch for it). Without it the clean training data serves as V.
- Labels: the poisons keep the labels of their seeds; only the features are optimised (TGDA).
- The autoencoder: the TGDA paper's MNIST leader (two hidden fully connected layers as wide as the
  input, LeakyReLU(0.2), the label as an extra input), made residual, G_θ(x, y) = Proj_Γ(x + f_θ(x, y)),
  with the last layer starting at zero. The paper pretrains a plain autoencoder to reconstruct its
  input so the first poisons are (about) the seeds; here they are exactly the seeds, without a
  pretraining run. The label enters one-hot (the official code appends the class index as a number).
- The follower is a copy of the given model in eval mode (no dropout, fixed batch-norm statistics),
  so that chunked sums and Hessian-vector products are exact for the batch.
- A follower Hessian need not be positive definite (a neural network away from its minimum): conjugate
  gradient stops on a direction of non-positive curvature (truncated Newton–CG).
"""

from __future__ import annotations

import copy
import math
from typing import Sequence

import torch
from torch import Tensor, nn

from .. import training
from ..errors import PoisonReachError
from ..gradients import chunks, conjugate_gradient, flatten, gradient_sum, hessian_vector_products, inner, unflatten
from ..losses import LossFn, resolve, task_of, to_probabilities
from ..validation import Choice, Number, check_labels, check_model_data
from .base import Attack, PoisonResult, box_bounds, clamp_box, draw_sources

GENERATORS = ("autoencoder", "points")

Part = tuple[Tensor, Tensor]  # (inputs, labels) of one group of points
Vectors = Sequence[Tensor]  # one tensor per parameter, taken as one vector


class PointsGenerator(nn.Module):
    """The leader's variables are the poisons themselves; :meth:`project` keeps them in Γ."""

    def __init__(self, x0: Tensor, low: Tensor | None, high: Tensor | None):
        super().__init__()
        self.points = nn.Parameter(x0.clone())
        self.low, self.high = low, high

    def forward(self, index: Tensor) -> Tensor:
        return self.points[index]

    @torch.no_grad()
    def project(self) -> None:
        self.points.copy_(clamp_box(self.points, self.low, self.high))


class AutoencoderGenerator(nn.Module):
    """G_θ(x, y) = Proj_Γ(x + f_θ([x, code(y)])) for the seed points (x, y): f_θ is the TGDA paper's
    MNIST leader, three fully connected layers as wide as the input with LeakyReLU(0.2), its last
    layer starting at zero so that the first poisons are the seeds. Γ is enforced by clamping, so the
    poisons are always admissible."""

    def __init__(self, seeds: Tensor, codes: Tensor, low: Tensor | None, high: Tensor | None):
        super().__init__()
        d = seeds[0].numel()
        self.register_buffer("seeds", seeds)
        self.register_buffer("codes", codes)
        self.low, self.high = low, high
        self.net = nn.Sequential(
            nn.Linear(d + codes.shape[1], d), nn.LeakyReLU(0.2), nn.Linear(d, d), nn.LeakyReLU(0.2), nn.Linear(d, d)
        )
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, index: Tensor) -> Tensor:
        x = self.seeds[index]
        return clamp_box(x + self.net(torch.cat([x.flatten(1), self.codes[index]], dim=1)).view_as(x), self.low, self.high)

    def project(self) -> None:
        """Nothing to do: the output is clamped into Γ."""


def generate(generator: nn.Module, index: Tensor, chunk_size: int) -> Tensor:
    """The poisons G_θ(S[index]) without a graph, chunk by chunk (an empty index gives no rows)."""
    with torch.no_grad():
        return torch.cat([generator(index[sl]) for sl in chunks(len(index), chunk_size)] or [generator(index)])


def total_gradient(
    follower: nn.Module,
    params: Vectors,
    generator: nn.Module,
    index: Tensor,
    labels: Tensor,
    clean: Part,
    validation: Part,
    loss_fn: LossFn,
    *,
    cg_iterations: int,
    damping: float,
    chunk_size: int,
    device: torch.device,
) -> list[Tensor]:
    """D_θ L = −∂²_{θw} ℓ · (∂²_{ww} ℓ + λI)⁻¹ · ∂_w L for one batch, one tensor per generator parameter.

    ℓ is the mean loss over ``clean`` ∪ the poisons G_θ(S[index]) with ``labels``; L the mean loss
    over ``validation``; w are ``params`` of the follower. (∂²_{ww} ℓ + λI)⁻¹ is applied by
    :func:`poisonreach.gradients.conjugate_gradient` (truncated on negative curvature) with
    ``cg_iterations`` Hessian-vector products (:func:`poisonreach.gradients.hessian_vector_products`).
    """
    X, y = clean
    count = len(X) + len(index)  # the follower's loss is a mean over clean ∪ poisons
    parts = [clean, (generate(generator, index, chunk_size), labels)]
    b = flatten(gradient_sum(follower, params, *validation, loss_fn, chunk_size=chunk_size, device=device)) / len(validation[0])

    def damped(V: Tensor) -> Tensor:
        """(∂²_{ww} ℓ + λI)·v for every row v of V, the Hessian summed part by part."""
        hv = sum(hessian_vector_products(follower, params, *part, loss_fn, V, chunk_size=chunk_size, device=device) for part in parts)
        return hv / count + damping * V

    u = unflatten(conjugate_gradient(damped, b[None], iterations=cg_iterations, truncate=True)[0][0], params)
    theta = list(generator.parameters())
    mixed = [torch.zeros_like(t) for t in theta]
    for sl in chunks(len(index), chunk_size):  # only the poisons depend on θ
        losses = loss_fn(follower(generator(index[sl])), labels[sl])
        grads = torch.autograd.grad(losses.sum(), params, create_graph=True)
        for acc, g in zip(mixed, torch.autograd.grad(inner(grads, u), theta, allow_unused=True)):
            if g is not None:
                acc += g
    return [-m / count for m in mixed]


class TGDA(Attack):
    """TGDA: poisons from a leader that ascends the total gradient of the follower's validation loss.

    Parameters
    ----------
    eps_d: the poison budget ε_d = m / n (> 0); m = max(1, round(n·ε_d)) poisons are added.
    epochs: passes over the clean data; each batch gets leader then follower steps (200).
        The defaults marked "as in the paper" are the TGDA authors' MNIST setting, as their run script
        (bash_mnist.sh of github.com/watml/TGDA-Attack) records it; one default epoch on MNIST LR
        (42,000 images, ε_d = 0.03) takes about 17 s on one CPU thread.
    leader_lr: step size of the leader's total-gradient ascent on θ (0.01, as in the paper). For this
        residual autoencoder that is small: on MNIST LR, 5 epochs at 0.01 moved no pixel by more than
        0.007, at 1.0 the poisons used the whole box. With ``generator="points"`` one point's gradient
        carries the factor 1/(batch + its poisons): use a step of the order of the batch size there.
    follower_lr: step size of the follower's gradient descent (0.1, as in the paper).
    leader_steps, follower_steps: steps per batch (1 and 20, as in the paper).
    cg_iterations: conjugate-gradient iterations, i.e. Hessian-vector products, per leader step (16,
        as in the paper).
    damping: λ ≥ 0 in (∂²_{ww} ℓ + λI)⁻¹ (0, as in the paper); a positive λ regularises a singular or
        indefinite Hessian.
    generator: ``"autoencoder"`` (the TGDA leader, for images and flat features alike) or
        ``"points"`` (the poison features are the leader's variables, projected onto Γ after each step).
    box: the admissible set Γ of the poison features: ``(low, high)``, ``"data-range"`` (each feature's
        range in the clean data) or None.
    batch_size: clean points per batch (1000, as in the paper); None takes all at once.
    pretrain_follower: epochs of follower steps on clean ∪ the initial poisons before the game; 0
        starts the game from the given model, which (like the paper's pretrained follower) is
        trained on the clean data.
    chunk_size: rows per forward/backward chunk; bounds memory, not the result.
    seed: seeds the seed points, the batch order and the autoencoder's initial weights.
    """

    name = "tgda"
    constraints = {
        "leader_lr": Number(low=0, low_open=True),
        "follower_lr": Number(low=0, low_open=True),
        "leader_steps": Number(low=1, integer=True),
        "follower_steps": Number(low=1, integer=True),
        "generator": Choice(GENERATORS),
        "batch_size": Number(low=1, integer=True, optional=True),
        "pretrain_follower": Number(low=0, integer=True),
    }

    def __init__(
        self,
        eps_d: float,
        *,
        epochs: int = 200,
        leader_lr: float = 0.01,
        follower_lr: float = 0.1,
        leader_steps: int = 1,
        follower_steps: int = 20,
        cg_iterations: int = 16,
        damping: float = 0.0,
        generator: str = "autoencoder",
        box: tuple[float, float] | str | None = (0.0, 1.0),
        batch_size: int | None = 1000,
        pretrain_follower: int = 0,
        chunk_size: int = 1000,
        **shared,
    ):
        self._set_params(locals())

    def poison(
        self, model: nn.Module, X: Tensor, y: Tensor, loss=None, *, validation: Part | None = None
    ) -> PoisonResult:
        """Craft poisons against ``model``, the clean trained model the follower starts from (it is
        copied; ``model`` is left as it was), on the clean training data (X, y).

        ``validation``: the attacker's clean validation set (X_val, y_val) for the leader's loss;
        None uses (X, y).

        The result's ``extra`` holds, per epoch (the first entry at the start of the game):
        ``leader_objective`` L, the follower's mean loss on the validation data; ``follower_loss``,
        its mean loss on clean ∪ poisons; ``follower_accuracy`` on the validation data (%, not for
        regression); and ``num_clean``, ``num_poisons``, ``num_validation``. TGDA cancels no gradient,
        so ``grad_norm_history`` stays empty and ``tau`` is NaN.
        """
        device = self._device(model)
        follower = copy.deepcopy(model).to(device).eval()
        strict = not callable(loss)
        num_outputs = check_model_data(follower, X, y, device, strict=strict)
        y = check_labels(y, len(X), num_outputs, strict=strict)
        if validation is not None:
            if not isinstance(validation, (tuple, list)) or len(validation) != 2:
                raise PoisonReachError("validation must be a pair (X_val, y_val) of tensors, or None to use (X, y)")
            Xv, yv = validation
            check_model_data(follower, Xv, yv, device, strict=strict)
            yv = check_labels(yv, len(Xv), num_outputs, strict=strict)
            if Xv.shape[1:] != X.shape[1:] or task_of(yv) != task_of(y) or (yv.dim() == 2) != (y.dim() == 2):
                raise PoisonReachError(
                    f"validation data must look like the training data: inputs {tuple(X.shape[1:])} and the same kind "
                    f"of labels, got inputs {tuple(Xv.shape[1:])}; pass a validation split of the same data set"
                )
            validation = (Xv, yv)
        return self._run(follower, X, y, validation, resolve(num_outputs, y, loss), num_outputs, device)

    def _run(self, follower, X, y, validation, loss_fn, num_outputs, device) -> PoisonResult:
        gen = torch.Generator().manual_seed(self.seed)
        n = len(X)
        m = self.num_poisons(n)
        source = draw_sources(n, m, gen)
        params = [p for p in follower.parameters() if p.requires_grad]
        if not params:
            raise PoisonReachError("the model has no trainable parameters: the follower cannot respond to the poisons")
        dtype = params[0].dtype
        generator = self._generator(X, y, source, num_outputs, dtype, device)
        labels = y[source].to(device)
        all_poisons = torch.arange(m, device=device)
        Xv, yv = validation if validation is not None else (X, y)

        def batches():
            """One epoch's batches: clean indices, poison indices, validation indices (None: the
            batch's clean points), near-equal shares drawn from ``gen``."""
            k = 1 if self.batch_size is None else math.ceil(n / self.batch_size)
            clean = torch.randperm(n, generator=gen).tensor_split(k)
            poisons = [p.to(device) for p in torch.randperm(m, generator=gen).tensor_split(k)]
            val = [None] * k if validation is None else torch.randperm(len(Xv), generator=gen).tensor_split(k)
            return zip(clean, poisons, val)

        def follower_steps(clean: Part, p: Tensor) -> None:
            parts = [clean, (generate(generator, p, self.chunk_size), labels[p])]
            for _ in range(self.follower_steps):
                grads = self._gradient(follower, params, parts, loss_fn, device)
                with torch.no_grad():
                    for w, g in zip(params, grads):
                        w.sub_(g, alpha=self.follower_lr / (len(clean[0]) + len(p)))

        classification = task_of(y) == "classification"
        history = {"leader_objective": [], "follower_loss": [], **({"follower_accuracy": []} if classification else {})}

        def record() -> None:
            poisons = (generate(generator, all_poisons, self.chunk_size), labels)
            history["leader_objective"].append(self._mean_loss(follower, [(Xv, yv)], loss_fn, device))
            history["follower_loss"].append(self._mean_loss(follower, [(X, y), poisons], loss_fn, device))
            if classification:
                history["follower_accuracy"].append(training.accuracy(follower, Xv, yv, chunk_size=self.chunk_size, device=device))
            if not (math.isfinite(history["leader_objective"][-1]) and math.isfinite(history["follower_loss"][-1])):
                epoch = len(history["follower_loss"]) - 1  # 0: before the first epoch
                raise PoisonReachError(
                    f"TGDA diverged after epoch {epoch} of {self.epochs}: the losses are no longer finite; lower leader_lr "
                    "or follower_lr, add damping, or set a box"
                )

        for _ in range(self.pretrain_follower):
            for c, p, _ in batches():
                follower_steps((X[c], y[c]), p)
        record()
        bar = self._progress(range(self.epochs), desc=f"TGDA eps_d={self.eps_d:g}")
        for _ in bar:
            for c, p, v in batches():
                clean = (X[c], y[c])
                val = clean if v is None else (Xv[v], yv[v])
                if len(p) and len(val[0]):  # a batch without poisons or validation points gives no leader gradient
                    self._leader_steps(follower, params, generator, p, labels[p], clean, val, loss_fn, device)
                follower_steps(clean, p)
            record()
            bar.set_postfix(leader=f"{history['leader_objective'][-1]:.4g}")
        bar.close()
        # TGDA cancels no gradient: no history, its objective is under extra["leader_objective"]
        return self._result(generate(generator, all_poisons, self.chunk_size), labels, source, **history, num_clean=n, num_poisons=m, num_validation=len(Xv))

    def _leader_steps(self, follower, params, generator, index, labels, clean, val, loss_fn, device) -> None:
        """Total-gradient ascent on θ with the follower held fixed."""
        for _ in range(self.leader_steps):
            step = total_gradient(
                follower, params, generator, index, labels, clean, val, loss_fn,
                cg_iterations=self.cg_iterations, damping=self.damping, chunk_size=self.chunk_size, device=device,
            )
            with torch.no_grad():
                for theta, g in zip(generator.parameters(), step):
                    theta.add_(g, alpha=self.leader_lr)  # ascent: the leader maximises L
            generator.project()

    def _generator(self, X: Tensor, y: Tensor, source: Tensor, num_outputs: int, dtype, device) -> nn.Module:
        seeds = X[source].to(device=device, dtype=dtype)
        low, high = box_bounds(self.box, X, device=device, dtype=dtype)
        if self.generator == "points":
            return PointsGenerator(seeds, low, high)
        codes = to_probabilities(y[source], num_outputs).to(device=device, dtype=dtype)
        with torch.random.fork_rng(devices=[]):  # the initial weights depend on the seed alone
            torch.manual_seed(self.seed)
            return AutoencoderGenerator(seeds, codes, low, high).to(device=device, dtype=dtype)

    def _gradient(self, model, params, parts, loss_fn, device) -> list[Tensor]:
        """Σ_z ∇_w ℓ(z; w) over every part."""
        sums = [gradient_sum(model, params, Xp, yp, loss_fn, chunk_size=self.chunk_size, device=device) for Xp, yp in parts]
        return [sum(gs) for gs in zip(*sums)]

    def _mean_loss(self, model, parts, loss_fn, device) -> float:
        total, count = 0.0, 0
        with torch.no_grad():
            for Xp, yp in parts:
                for sl in chunks(len(Xp), self.chunk_size):
                    total += float(loss_fn(model(Xp[sl].to(device)), yp[sl].to(device)).double().sum())
                count += len(Xp)
        return total / count
