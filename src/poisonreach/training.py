"""Training and evaluating target models.

The defaults of :func:`train` are the protocol the paper's MNIST models were trained with, the
PyTorch MNIST example: Adadelta with learning rate 1.0, the rate multiplied by 0.7 after each epoch
(StepLR), batches of 64, 14 epochs. Training is a function of ``seed`` alone, so the model trained
on poisoned data can be compared with the clean one trained from the same start (Section 5).

:func:`training_gradient_norm` checks that a training converged (the gradient of its objective at
the final parameters); :func:`agreement` compares two classifiers by their predictions.
:func:`official_retrain` is the official GC code's retraining (float64, plain SGD at lr 0.1 in
batches of 10,000, 100 epochs), with the test accuracy after every epoch (``--protocol official``).
"""

from __future__ import annotations

import copy
import logging
import math
import statistics
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from . import distributed, losses
from .errors import PoisonReachError
from .gradients import chunks, flat_norm, gradient_sum, select_parameters
from .models import features, last_linear
from .progress import Progress
from .rows import dense, select_rows
from .validation import Choice, Number, check_choice, check_inputs, check_labels, check_number, evaluating, num_outputs, progress_flag

OPTIMIZERS = ("adadelta", "sgd", "adam")
# The protocol's hyperparameters (keyword arguments of :func:`train`) and their checks; DPA's base
# models take the same arguments.
HYPERPARAMETERS = {
    "epochs": Number(low=1, integer=True),
    "lr": Number(low=0, low_open=True),
    "batch_size": Number(low=1, integer=True),
    "optimizer": Choice(OPTIMIZERS),
    "gamma": Number(low=0, low_open=True, high=1),
    "momentum": Number(low=0, high=1, high_open=True),
    "weight_decay": Number(low=0),
}

Augment = Callable[[Tensor, torch.Generator], Tensor]
# callback(step, values): a training's numbers after each epoch (or L-BFGS round), e.g. for tracking
Callback = Callable[[int, dict], None]
logger = logging.getLogger(__name__)


def train(
    model: nn.Module,
    X: Tensor,
    y: Tensor,
    *,
    epochs: int = 14,
    lr: float = 1.0,
    batch_size: int = 64,
    seed: int = 0,
    weights: Tensor | None = None,
    optimizer: str = "adadelta",
    gamma: float = 0.7,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    loss: str | losses.LossFn | None = None,
    device: str | torch.device | None = None,
    progress: bool | None = None,
    augment: Augment | None = None,
    worst_of: int = 1,
    callback: Callback | None = None,
) -> nn.Module:
    """Train ``model`` in place on (X, y) by mini-batch descent and return it in eval mode.

    Args:
        X: inputs (N, ...), in the pixel space the model expects; they may stay on the CPU, batches
            are moved to ``device`` one at a time.
        y: int class indices (N,), soft labels (N, C) or regression targets, float (N,).
        epochs: passes over the data (the paper's protocol: 14).
        lr: the learning rate of the first epoch; it is multiplied by ``gamma`` after every epoch
            (StepLR with step 1).
        batch_size: points per step (the paper's protocol: 64).
        seed: fixes the shuffling and the dropout masks. The caller's global random state is left
            as it was.
        weights: non-negative per-sample weights (N,). A batch minimises mean_i(w_i · ℓ_i), so an
            epoch minimises (1/N) Σ_i w_i ℓ_i: a weight is a multiplicity, not renormalised per batch.
        optimizer: "adadelta", "sgd" (with ``momentum``) or "adam".
        gamma: the learning rate's factor per epoch (the paper's protocol: 0.7); 1 keeps it constant.
        momentum: the heavy-ball momentum of "sgd" (the other optimizers ignore it).
        weight_decay: λ of every optimizer's weight decay: the objective gains λ/2·‖w‖².
        loss: per-sample loss, see :func:`poisonreach.losses.resolve` (default: from the labels).
        device: where to train; the model is moved there. None: where the model's parameters are.
        progress: a tqdm bar over epochs on stderr, with the epoch's mean loss. None shows it only
            on a terminal (elsewhere a log line every 30 s, :mod:`poisonreach.progress`), False never.
        augment: ``augment(x, generator) -> x'`` draws a random augmentation of a CPU batch; the
            generator is seeded from ``seed`` alone, so augmented training is reproducible too.
        worst_of: with ``augment``, each sample's loss is the largest over this many independent
            augmentations (MaxUp, :class:`poisonreach.defenses.MaxUp`); 1 is plain augmentation.
        callback: ``callback(epoch, {"loss": mean loss})`` after every epoch (1-based), the loss
            the bar shows (the mean over the epoch's batches as they were trained).

    Each epoch splits a fresh permutation into ⌈N / batch_size⌉ batches of near-equal size (at most
    ``batch_size``), so that no trailing batch of a single sample breaks BatchNorm.

    Data parallel (:mod:`poisonreach.distributed`): every rank draws the same permutation and
    trains on its shard of each batch under ``DistributedDataParallel``, its loss weighted by its
    share of the batch, so the averaged gradient is the whole batch's mean and every step is the
    single-process step up to rounding. Dropout draws its masks per rank and batch normalisation
    normalises each rank's shard (use ``SyncBatchNorm`` on CUDA for whole-batch statistics), so a
    model with either trains the same protocol, not the same numbers.
    """
    n = check_inputs(X)
    progress_flag("progress", progress)
    check_number("seed", seed, integer=True)
    given = locals()
    for name, check in HYPERPARAMETERS.items():
        check(name, given[name])
    w = _check_weights(weights, n)
    check_number("worst_of", worst_of, low=1, integer=True)
    if worst_of > 1 and augment is None:
        raise PoisonReachError("worst_of > 1 needs augment: the worst of identical copies is the sample itself")
    device = _device(model, device)
    outputs = num_outputs(model, X, device)
    y = check_labels(y, n, outputs, strict=not callable(loss))
    loss_fn = losses.resolve(outputs, y, loss)
    opt = make_optimizer(optimizer, model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=gamma)
    shuffle = torch.Generator().manual_seed(int(seed))
    # a stream of its own, so turning augmentation on leaves the batch order as it was
    draws = torch.Generator().manual_seed(int(seed) + 1) if augment is not None else None
    num_batches = math.ceil(n / batch_size)
    world = distributed.world_size()
    if n // num_batches < world:
        raise PoisonReachError(f"batches of {n // num_batches} points cannot be shared by {world} processes: "
                               f"raise batch_size to at least {world} or run on fewer processes")
    net = _data_parallel(model, device)

    # Dropout draws from the global generator: seed it inside a fork so the caller's state survives.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(int(seed))
        model.train()
        with Progress(range(epochs), desc="train", unit="epoch", show=progress, logger=logger) as bar:
            for epoch in bar:
                total = torch.zeros((), device=device)
                for batch in torch.randperm(n, generator=shuffle).tensor_split(num_batches):
                    idx = batch[distributed.shard(len(batch))]  # this rank's share of the batch
                    batch_loss = _batch_loss(
                        net, loss_fn, X[idx], y[idx], None if w is None else w[idx], device, augment, worst_of, draws
                    )
                    opt.zero_grad(set_to_none=True)
                    # DDP averages the ranks' gradients: weighting each by its share makes that the batch's mean
                    share = world * len(idx) / len(batch)
                    (batch_loss if share == 1 else batch_loss * share).backward()
                    opt.step()
                    total += batch_loss.detach() * len(idx)
                scheduler.step()
                mean_loss = distributed.reduce_number(total.item()) / n
                bar.set_postfix(loss=f"{mean_loss:.4g}")
                if callback is not None:
                    callback(epoch + 1, {"loss": mean_loss})
    return model.eval()


# what a converged training fits: every trainable parameter, or the last linear layer on the fixed
# features of the model it is given (a pretrained network's head: a convex problem)
TRAINED_PARAMETERS = ("all", "last")
# The converged protocol's options (keyword arguments of :func:`minimize`) and their checks.
CONVERGED_OPTIONS = {
    "weight_decay": Number(low=0),
    "tolerance": Number(low=0, low_open=True),
    "max_iterations": Number(low=1, integer=True),
    "history_size": Number(low=1, integer=True),
    "parameters": Choice(TRAINED_PARAMETERS),
}


def minimize(
    model: nn.Module,
    X: Tensor,
    y: Tensor,
    *,
    weight_decay: float = 1e-3,
    tolerance: float = 1e-5,
    max_iterations: int = 2000,
    history_size: int = 20,
    parameters: str = "all",
    loss: str | losses.LossFn | None = None,
    chunk_size: int = 8192,
    device: str | torch.device | None = None,
    progress: bool | None = None,
    callback: Callback | None = None,
) -> nn.Module:
    """Train ``model`` in place to a stationary point of (1/N) Σ ℓ(z; w) + λ/2·‖w‖² and return it
    in eval mode: full-batch L-BFGS with a strong-Wolfe line search, stopped once the gradient norm
    (:func:`training_gradient_norm`) is at most ``tolerance``.

    This is the protocol the theory assumes: the victim's w is *the* minimiser of its training
    objective, so a planted target is reachable exactly and a drop is not an artefact of where a
    schedule stopped. With λ > 0 the objective of a linear model is strongly convex, so the minimiser
    is unique and independent of the initialisation, and the data's flat directions (always-zero
    pixels) are pinned at 0. The objective is taken at the fixed w (eval mode: no dropout, batch-norm
    running statistics), as every gradient the attacks use. There is no randomness: the seed only
    chooses the start (the caller's initialisation). The loss is summed over chunks of
    ``chunk_size`` rows (a memory bound; the result changes by rounding only).

    Data parallel (:mod:`poisonreach.distributed`): each rank sums the loss and its gradient over
    its shard of the rows and the sums are all-reduced, so every rank takes the same L-BFGS steps.

    When ``max_iterations`` pass, or the line search stalls, before the tolerance is met, a warning
    says so (the run records every model's gradient norm, :func:`training_gradient_norm`).

    Args:
        weight_decay: λ of the objective's λ/2·‖w‖²; λ > 0 makes a linear model's minimiser unique.
        tolerance: stop once the objective's gradient norm is at most this.
        max_iterations: most L-BFGS iterations, line-search evaluations not counted.
        history_size: the curvature pairs L-BFGS keeps (its memory).
        parameters: ``all`` (every trainable parameter) or ``last``: the last linear layer only, the
            layers before it kept as given, so that training fits a pretrained network's head on
            fixed features φ(x), a problem as convex as a linear model's. The objective's λ/2·‖w‖²
            and its gradient norm count the trained parameters only.
        loss: per-sample loss, see :func:`poisonreach.losses.resolve` (default: from the labels).
        chunk_size: rows per forward/backward pass; bounds memory.
        device: where to train; the model is moved there. None: where the model's parameters are.
        progress: a tqdm bar over iterations on stderr. None shows it only on a terminal (elsewhere
            a log line every 30 s), False never.
        callback: ``callback(iterations, {"objective": value, "grad_norm": norm})`` after every
            round of L-BFGS iterations, with the iterations done so far.
    """
    n = check_inputs(X)
    given = locals()
    for name, check in CONVERGED_OPTIONS.items():
        check(name, given[name])
    check_number("chunk_size", chunk_size, low=1, integer=True)
    progress_flag("progress", progress)
    device = _device(model, device)
    outputs = num_outputs(model, X, device)
    y = check_labels(y, n, outputs, strict=not callable(loss))
    loss_fn = losses.resolve(outputs, y, loss)
    # float64: float32's rounding of a 42,000-point mean loss stops the line search near a gradient
    # norm of 2e-4 on MNIST. The minimiser is copied back into the model's own precision.
    work = copy.deepcopy(model).to(torch.float64)
    y = y.to(torch.float64) if y.is_floating_point() else y
    # the module L-BFGS fits and its inputs: with the layers before the head fixed, their features
    # are computed once and the head is fit on them (a linear model's cost per evaluation)
    fitted, inputs = (last_linear(work), _fixed_features(work, X, chunk_size, device)) if parameters == "last" else (work, X)
    params = [p for p in fitted.parameters() if p.requires_grad]
    # the stopping rule is ours (the 2-norm of the objective's gradient); L-BFGS's own stops off
    opt = torch.optim.LBFGS(params, lr=1.0, max_iter=_ITERATIONS_PER_CHECK, history_size=history_size,
                            tolerance_grad=0.0, tolerance_change=0.0, line_search_fn="strong_wolfe")

    def objective() -> Tensor:
        opt.zero_grad(set_to_none=False)
        total = torch.zeros((), dtype=torch.float64, device=device)
        # (1/N) Σ ℓ, its gradient accumulated chunk by chunk over this rank's chunks (all-reduced below)
        for sl in distributed.local_chunks(n, chunk_size):
            part = _per_sample(fitted, loss_fn, inputs[sl].to(torch.float64), y[sl], device).sum() / n
            part.backward()
            total += part.detach()
        if distributed.active():
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            distributed.all_reduce([total, *(p.grad for p in params)])
        penalty = weight_decay / 2 * sum((p * p).sum() for p in params)
        if weight_decay:
            penalty.backward()
        return total + penalty.detach()

    group, norm, value = opt.param_groups[0], math.inf, math.inf
    with evaluating(work), Progress(total=max_iterations, desc="minimize", unit="it", show=progress, logger=logger) as bar:
        while _iterations(opt, params) < max_iterations and norm > tolerance:
            previous, before = value, _iterations(opt, params)
            group["max_iter"] = min(_ITERATIONS_PER_CHECK, max_iterations - before)
            group["max_eval"] = 3 * group["max_iter"]  # line-search evaluations included
            opt.step(objective)
            value, norm = float(objective()), flat_norm([p.grad for p in params])
            bar.set_postfix(grad_norm=f"{norm:.3g}")
            bar.update(_iterations(opt, params) - before)
            if callback is not None:
                callback(_iterations(opt, params), {"objective": value, "grad_norm": norm})
            if not value < previous:
                break  # no decrease over a whole round: the precision floor of the objective
    if norm > tolerance:
        logger.warning("minimize stopped at gradient norm %.3g after %d L-BFGS iterations, above the tolerance %g: raise "
                    "max_iterations or weight_decay (a better-conditioned objective), or the tolerance",
                    norm, _iterations(opt, params), tolerance)
    with torch.no_grad():
        for p, q in zip(model.parameters(), work.parameters()):
            p.copy_(q)
    return model.eval()


def _fixed_features(model: nn.Module, X: Tensor, chunk_size: int, device: torch.device) -> Tensor:
    """φ(X) of ``model`` (the input of its last linear layer) in eval mode, without gradients, chunk by chunk."""
    with torch.no_grad(), evaluating(model):
        return torch.cat([features(model, X[sl].to(device=device, dtype=torch.float64)) for sl in chunks(len(X), chunk_size)])


def _iterations(opt: torch.optim.LBFGS, params: list[Tensor]) -> int:
    return opt.state[params[0]].get("n_iter", 0)


_ITERATIONS_PER_CHECK = 25


@dataclass
class OfficialRetrain:
    """A model retrained by :func:`official_retrain` and its test accuracy (%) after every epoch."""

    model: nn.Module
    test_acc_per_epoch: list[float]

    @property
    def final_acc(self) -> float:
        """The test accuracy after the last epoch (the number the official script ends on)."""
        return self.test_acc_per_epoch[-1]

    def summary(self, prefix: str = "retrain_acc") -> dict:
        """``{prefix}_min``, ``_median``, ``_max`` over the epochs and ``{prefix}_per_epoch``."""
        accs = self.test_acc_per_epoch
        return {f"{prefix}_min": min(accs), f"{prefix}_median": statistics.median(accs), f"{prefix}_max": max(accs),
                f"{prefix}_per_epoch": list(accs)}


def official_retrain(
    model: nn.Module,
    X: Tensor,
    y: Tensor,
    X_test: Tensor,
    y_test: Tensor,
    *,
    epochs: int = 100,
    lr: float = 0.1,
    batch_size: int = 10_000,
    seed: int = 0,
    chunk_size: int = 2048,
    device: str | torch.device | None = None,
    progress: bool | None = None,
) -> OfficialRetrain:
    """Retrain ``model`` (fresh) on (X, y) the way the official GC script retrains its victim, and
    measure the test accuracy on (X_test, y_test) after every epoch.

    The model is cast to float64, and so is every batch. Each epoch draws a fresh permutation
    (seeded by ``seed``) and cuts it into consecutive batches of ``batch_size`` (the last one
    smaller, as a shuffling DataLoader does; :func:`train` balances its batches instead); each batch
    takes one step of plain SGD at ``lr`` on the batch's mean loss. There is no momentum, no weight
    decay and no learning-rate schedule. The script's model is an ``nn.Linear`` fed normalised
    inputs; a :func:`poisonreach.models.create` model normalises its pixel-space inputs itself, so
    the same model sees the same inputs. The test accuracy after each epoch (the script prints
    one per epoch) is kept, since with these settings it swings from epoch to epoch. A batch's
    gradient is accumulated over chunks of ``chunk_size`` rows (a memory bound, which changes the
    step only by rounding: a batch of 10,000 float64 images is 63 MB, allocated anew each time).
    """
    n = check_inputs(X)
    check_inputs(X_test)
    check_number("seed", seed, integer=True)
    for name, value in (("epochs", epochs), ("batch_size", batch_size), ("chunk_size", chunk_size)):
        check_number(name, value, low=1, integer=True)
    check_number("lr", lr, low=0, low_open=True)
    progress_flag("progress", progress)
    device = _device(model, device)
    model.to(device=device, dtype=torch.float64)
    outputs = num_outputs(model, X[:1].to(torch.float64), device)
    y = check_labels(y, n, outputs, strict=True)
    y = y.to(torch.float64) if y.is_floating_point() else y
    loss_fn = losses.resolve(outputs, y)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.0, weight_decay=0.0)
    shuffle = torch.Generator().manual_seed(int(seed))
    X_test = dense(X_test).to(torch.float64)  # 10,000 MNIST images: 63 MB
    accs = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(int(seed))
        with Progress(range(epochs), desc="official retrain", unit="epoch", show=progress, logger=logger) as bar:
            for _ in bar:
                model.train()
                for idx in torch.randperm(n, generator=shuffle).split(batch_size):
                    opt.zero_grad(set_to_none=True)
                    for part in idx.split(chunk_size):  # the batch's mean loss, its gradient summed over chunks
                        (_per_sample(model, loss_fn, X[part].to(torch.float64), y[part], device).sum() / len(idx)).backward()
                    opt.step()
                accs.append(accuracy(model, X_test, y_test, chunk_size=1000))
                bar.set_postfix(test_acc=f"{accs[-1]:.2f}")
    return OfficialRetrain(model.eval(), accs)


def predict_logits(
    model: nn.Module, X: Tensor, *, chunk_size: int = 256, device: str | torch.device | None = None
) -> Tensor:
    """The model's outputs on X, on the CPU: eval mode, no gradient, ``chunk_size`` inputs at a time (a memory bound, not a result).

    The model's train/eval modes are restored afterwards; ``device`` is as in :func:`train`.
    """
    check_inputs(X)
    check_number("chunk_size", chunk_size, low=1, integer=True)
    device = _device(model, device)
    with evaluating(model), torch.no_grad():
        return torch.cat([model(chunk.to(device)).cpu() for chunk in X.split(chunk_size)])


def accuracy(
    model: nn.Module, X: Tensor, y: Tensor, *, chunk_size: int = 256, device: str | torch.device | None = None
) -> float:
    """Percentage (0–100) of X the model classifies as y.

    One output predicts class 1 when the logit is positive, several predict their argmax. Soft
    labels count as their most probable class (P(y = 1) > 0.5 for one column).
    """
    if isinstance(y, Tensor) and losses.task_of(y) == "regression":
        raise PoisonReachError(
            "accuracy is undefined for regression targets (float labels of shape (N,)); "
            "pass class indices as int64, or measure the squared error instead"
        )
    n = check_inputs(X)
    y = check_labels(y, n, num_outputs=None, strict=False)
    predicted = _classes(predict_logits(model, X, chunk_size=chunk_size, device=device), threshold=0.0)
    truth = y.long().cpu() if not y.is_floating_point() else _classes(y.cpu(), threshold=0.5)
    return 100.0 * (predicted == truth).sum().item() / n


def agreement(
    model: nn.Module, other: nn.Module, X: Tensor, *, chunk_size: int = 256, device: str | torch.device | None = None
) -> float:
    """Percentage (0–100) of X on which two classifiers predict the same class (the rule of
    :func:`accuracy`: argmax, or logit > 0 for one output).

    This is how close a retrained victim came to a target *in what it does*. The parameter distance
    ‖w − w_t‖ misleads as a measure of that: flat directions move w without changing one
    prediction, e.g. the weights of an input that is zero on every point (MNIST's border pixels, in
    a model that does not shift its inputs), which no gradient ever touches, so they stay wherever
    the initialisation put them, or a shift common to all classes' logits, which softmax ignores;
    and a small step across a decision boundary changes many predictions.
    """
    n = check_inputs(X)
    a = predict_logits(model, X, chunk_size=chunk_size, device=device).reshape(n, -1)
    b = predict_logits(other, X, chunk_size=chunk_size, device=device).reshape(n, -1)
    if a.shape != b.shape:
        raise PoisonReachError(f"agreement needs two models with the same outputs, got {a.shape[1]} and {b.shape[1]} outputs")
    return 100.0 * (_classes(a, threshold=0.0) == _classes(b, threshold=0.0)).sum().item() / n


def training_gradient_norm(
    model: nn.Module,
    X: Tensor,
    y: Tensor,
    loss: str | losses.LossFn | None = None,
    *,
    weight_decay: float = 0.0,
    parameters: str = "all",
    chunk_size: int = 256,
    device: str | torch.device | None = None,
) -> float:
    """‖∇_w (1/N) Σ_{z ∈ (X, y)} ℓ(z; w) + λw‖₂ at the model's parameters: how far a model trained on
    (X, y) is from a stationary point of its training objective (0 at convergence).

    Pass the data the model was trained on (for a victim, clean ∪ poisons) and the protocol's
    ``weight_decay`` λ (the optimizers add λw to the gradient, so the objective is the mean loss plus
    λ/2·‖w‖²), and the parameters it trained (``parameters``: ``all``, every trainable parameter, or
``last``, the last linear layer, as :func:`minimize` takes them). The model is evaluated in eval mode, the fixed w
    (dropout off, batch-norm running statistics), as everywhere the library takes gradients at w.
    The sum runs over chunks of ``chunk_size`` rows (:func:`poisonreach.gradients.gradient_sum`), a
    memory bound that changes the result only by rounding; the norm is taken in float64.

    Why it matters: the paper's retrain-from-scratch protocol reads "the victim reached w" off the
    model training returns, and a planted target (the victim of a known poison set) is reachable by
    construction only if that training actually reached a minimiser. Adadelta with the rate decayed
    by 0.7 per epoch stops wherever the schedule ends; this number says where that was.
    """
    n = check_inputs(X)
    check_number("chunk_size", chunk_size, low=1, integer=True)
    check_number("weight_decay", weight_decay, low=0)
    device = _device(model, device)
    outputs = num_outputs(model, X, device)
    y = check_labels(y, n, outputs, strict=not callable(loss))
    loss_fn = losses.resolve(outputs, y, loss)
    check_choice("parameters", parameters, TRAINED_PARAMETERS)
    params = select_parameters(model, parameters)
    rows = distributed.shard(n, chunk_size)  # data parallel: this rank's chunks, the sum all-reduced
    with evaluating(model):
        total = gradient_sum(model, params, select_rows(X, rows), y[rows], loss_fn, chunk_size=chunk_size, device=device, all_reduce=True)
    return flat_norm([g / n + weight_decay * p.detach() for g, p in zip(total, params)])


def mean_squared_error(
    model: nn.Module, X: Tensor, y: Tensor, *, chunk_size: int = 256, device: str | torch.device | None = None
) -> float:
    """Mean of (h(x) − y)² over X for a regression model with one output (the test metric of C.3)."""
    n = check_inputs(X)
    if not isinstance(y, Tensor) or losses.task_of(y) != "regression" or len(y) != n:
        raise PoisonReachError(f"mean_squared_error needs float regression targets of shape ({n},)")
    outputs = predict_logits(model, X, chunk_size=chunk_size, device=device).reshape(n, -1)
    if outputs.shape[1] != 1:
        raise PoisonReachError(f"mean_squared_error needs a model with one output, got {outputs.shape[1]}")
    return float(((outputs[:, 0] - y.cpu().to(outputs.dtype)) ** 2).mean())


def _classes(scores: Tensor, threshold: float) -> Tensor:
    """Class indices from scores (N, C): argmax, or ``score > threshold`` for a single column."""
    scores = scores.reshape(len(scores), -1)
    return (scores[:, 0] > threshold).long() if scores.shape[1] == 1 else scores.argmax(1)


def _batch_loss(
    model: nn.Module,
    loss_fn: losses.LossFn,
    x: Tensor,
    y: Tensor,
    w: Tensor | None,
    device: torch.device,
    augment: Augment | None = None,
    worst_of: int = 1,
    draws: torch.Generator | None = None,
) -> Tensor:
    """mean_i w_i·ℓ_i over the batch; with ``augment``, ℓ_i = max over ``worst_of`` augmentations."""
    if augment is None:
        per_sample = _per_sample(model, loss_fn, x, y, device)
    else:
        # one forward pass over all copies: BatchNorm sees the copies together, as MaxUp trains
        copies = torch.cat([augment(x, draws) for _ in range(worst_of)])
        per_sample = _per_sample(model, loss_fn, copies, y.repeat(worst_of, *([1] * (y.dim() - 1))), device)
        per_sample = per_sample.view(worst_of, len(x)).amax(dim=0)
    return (per_sample if w is None else per_sample * w.to(device)).mean()


def _per_sample(model: nn.Module, loss_fn: losses.LossFn, x: Tensor, y: Tensor, device: torch.device) -> Tensor:
    per_sample = loss_fn(model(x.to(device)), y.to(device))
    if per_sample.shape != (len(x),):
        raise PoisonReachError(
            f"the loss returned shape {tuple(per_sample.shape)} for a batch of {len(x)}: "
            "it must return one loss per sample, shape (N,) (use reduction='none')"
        )
    return per_sample


def _device(model: nn.Module, device: str | torch.device | None) -> torch.device:
    if device is None:
        param = next(model.parameters(), None)
        return param.device if param is not None else torch.device("cpu")
    device = torch.device(device)
    model.to(device)
    return device


def _data_parallel(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` under ``DistributedDataParallel`` in a data-parallel job, else itself."""
    if not distributed.active():
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


def make_optimizer(name: str, params, *, lr: float, momentum: float, weight_decay: float) -> torch.optim.Optimizer:
    """The optimizer :func:`train` uses, by name (also for batched training of many models)."""
    if name == "adadelta":
        return torch.optim.Adadelta(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)


def _check_weights(weights: Tensor | None, n: int) -> Tensor | None:
    if weights is None:
        return None
    w = torch.as_tensor(weights, dtype=torch.float32)
    if w.shape != (n,):
        raise PoisonReachError(f"weights must have shape ({n},), one per sample, got {tuple(w.shape)}")
    if not torch.isfinite(w).all() or (w < 0).any():
        raise PoisonReachError("weights must be finite and non-negative")
    if not (w > 0).any():
        raise PoisonReachError("weights are all zero, so there is nothing to train on: give some samples weight > 0")
    return w


