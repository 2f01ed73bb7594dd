"""Deep Partition Aggregation (Levine and Feizi 2021, "Deep Partition Aggregation: Provable Defense
against General Poisoning Attacks", ICLR), the certified training defense of section 5.4 / Table 4.

DPA hashes every training point to one of k partitions, trains one base model per partition and
predicts by plurality vote, ties going to the smaller class index. A point inserted into or removed
from the training set changes one partition, hence at most one vote, so with vote counts n_c the
prediction a = argmax_c n_c cannot change under any poisoning of symmetric difference |T ⊖ U| ≤ ρ,

    ρ = ⌊(n_a − max_{c≠a}(n_c + [c < a])) / 2⌋                  (DPA, Theorem 1)

(the runner-up b is the maximiser, ties to the smaller index, so ρ = ⌊(n_a − n_b − [b < a]) / 2⌋).
The published certification script computes the same number from a stable descending sort.

The hash is the one of the published partitioning script: every feature is scaled by 255 and
truncated towards zero to an integer (for 8-bit images in [0, 1] that is the original pixel value,
exactly, in float32 and float64), the integers are summed over the sample and taken modulo k. Data
outside [0, 1] (tabular sets) go through the same rule: negative features truncate towards zero and
the remainder is taken non-negative. Any rule that depends on the sample alone keeps the certificate
valid; outside 8-bit pixel space the partitions may just be less balanced. Labels are not hashed.

Within a partition the points are put in a canonical order, by label and then pixel values
(lexicographically), as the published script does, so every base model depends on the *set* of its
points and not on where they stood in the training set: permuting the training set gives the same
ensemble.

Base model i starts from ``model`` with every ``reset_parameters()`` called under the seed
``seed·k + i`` (the published code seeds base model i with i; ours is that for seed 0) and is
trained with :func:`poisonreach.training.train`'s protocol and ``seed = seed·k + i``. The model of
an empty partition is its initialisation, and it votes too: the theorem only needs every base model
to be a deterministic function of its partition. :func:`certify` turns an ensemble's votes on test
points into a :class:`Certificate` (predictions, radii, certified accuracy).

Batched training. The k trainings are independent, and the loss Σ_i mean-loss_i of stacked models
has per-model gradients equal to each model's own; Adadelta, SGD and Adam update element-wise, so one
optimizer over the stacked parameters takes exactly the k independent steps. The stacked models run
through ``torch.func.vmap`` (``randomness="different"`` for dropout). Per epoch model i takes
⌈n_i / batch_size⌉ steps over its own shuffled partition, with batches of near-equal size as in
``train``; models are grouped by that step count, so within a group every model has a real batch at
every step and no optimizer ever sees a padded step (an Adam or momentum step on a zero gradient
would still move the parameters, and Adam's step count would drift). Smaller batches in a step are
padded with masked samples that add nothing to the loss. Without dropout the result equals k calls
of ``train`` up to floating-point rounding; with dropout the masks are drawn for a whole group at
once from a generator seeded by the group's first model, so they differ from ``train``'s (same
distribution, same seed gives the same ensemble). Models with batch normalisation would mix padded
samples into their batch statistics: they are trained one by one with ``train`` instead.
"""

from __future__ import annotations

import copy
import math
import sys
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap

from .. import losses, training
from ..errors import PoisonReachError
from ..estimator import Estimator, keywords
from ..validation import Number, check_inputs, check_labels, check_number, num_outputs

# float32 holds every integer below 2**24 exactly, so vote counts stay exact as floats.
MAX_MODELS = 2**24


def partition(X: Tensor, num_partitions: int, *, chunk_size: int = 4096) -> Tensor:
    """The partition (int64, in [0, k)) of every row of X: Σ_features trunc(255·x) mod k.

    Computed in X's dtype, ``chunk_size`` rows at a time; see the module docstring for the rule.
    """
    check_inputs(X)
    check_number("num_partitions", num_partitions, low=1, integer=True)
    features = X[0].numel()
    if max(float(chunk.abs().max()) for chunk in X.split(chunk_size)) * 255 * features >= 2**62:
        raise PoisonReachError(
            "the pixel sums of X would overflow int64: DPA hashes data in pixel space, scale X into a "
            "moderate range (e.g. [0, 1]) first"
        )
    # .long() truncates towards zero, as the published script's .int(); remainder() is non-negative.
    sums = torch.cat([(chunk.reshape(len(chunk), -1) * 255).long().sum(1) for chunk in X.split(chunk_size)])
    return sums.remainder(num_partitions).cpu()


def canonical_order(X: Tensor, y: Tensor) -> Tensor:
    """Indices that sort the samples by label, then by pixel values, lexicographically; equal samples
    keep their relative order (they are interchangeable)."""
    if len(X) < 2:  # nothing to sort (and an empty partition has no key width)
        return torch.arange(len(X))
    keys = torch.cat([y.reshape(len(y), -1).double(), X.reshape(len(X), -1).double()], dim=1).cpu()
    _, rank = torch.unique(keys, dim=0, sorted=True, return_inverse=True)  # rank of each row's key
    return torch.sort(rank, stable=True).indices


def certified_radius(votes: Tensor) -> tuple[Tensor, Tensor]:
    """The DPA prediction a and certified radius ρ (DPA Theorem 1) for vote counts (N, C).

    a = argmax_c n_c (the first maximum); the runner-up b maximises n_c + [c < a] over c ≠ a (the
    first maximum); ρ = ⌊(n_a − n_b − [b < a]) / 2⌋ ≥ 0 insertions or deletions of training points.
    """
    if not isinstance(votes, Tensor) or votes.dim() != 2 or votes.shape[1] < 2:
        raise PoisonReachError(f"votes must be a tensor (N, C) with C >= 2 classes, got {getattr(votes, 'shape', votes)!r}")
    if votes.is_floating_point() and not torch.equal(votes, votes.round()):
        raise PoisonReachError("votes must be whole vote counts; pass the output of the ensemble unchanged")
    votes = votes.long().cpu()
    if (votes < 0).any():
        raise PoisonReachError("votes must be non-negative counts")
    rows = torch.arange(len(votes))
    top = votes.argmax(1)  # torch returns the first maximal index: ties go to the smaller class
    classes = torch.arange(votes.shape[1])
    challenger = votes + (classes < top[:, None]).long()
    challenger[rows, top] = -1  # the top class is not its own runner-up; every other entry is >= 0
    second = challenger.argmax(1)
    gap = votes[rows, top] - votes[rows, second] - (second < top).long()
    return top, torch.div(gap, 2, rounding_mode="floor")


@dataclass
class Certificate:
    """DPA certificates of N test points.

    votes: (N, C) int64 vote counts; labels: the true classes; predictions: the DPA predictions;
    radii: int64, the number of training points that can be inserted or removed without changing the
    prediction (DPA Theorem 1), −1 where the prediction is wrong.
    """

    votes: Tensor
    labels: Tensor
    predictions: Tensor
    radii: Tensor

    @classmethod
    def from_votes(cls, votes: Tensor, labels: Tensor) -> "Certificate":
        top, radius = certified_radius(votes)
        if isinstance(labels, Tensor) and labels.is_floating_point():
            raise PoisonReachError("certificates need the true class of each point as int64; for soft labels pass y.argmax(1)")
        labels = check_labels(labels, len(top), votes.shape[1], strict=True).cpu()
        radii = torch.where(top == labels, radius, torch.full_like(radius, -1))
        return cls(votes=votes.long(), labels=labels, predictions=top, radii=radii)

    @property
    def accuracy(self) -> float:
        """Percentage of points classified correctly (= certified accuracy at radius 0)."""
        return self.certified_accuracy(0)

    def certified_accuracy(self, radius: int) -> float:
        """Percentage of points classified correctly with a certified radius ≥ ``radius``."""
        check_number("radius", radius, low=0, integer=True)
        return 100.0 * (self.radii >= radius).sum().item() / len(self.radii)

    def certified_accuracy_curve(self) -> list[float]:
        """Certified accuracy at every radius 0, 1, …, max radius (non-increasing)."""
        counts = torch.bincount(self.radii[self.radii >= 0], minlength=1)
        at_least = counts.flip(0).cumsum(0).flip(0)  # points with radius ≥ r, for r = 0..max
        return (100.0 * at_least.double() / len(self.radii)).tolist()

    @property
    def median_radius(self) -> int:
        """The largest r with certified accuracy ≥ 50 % (−1 when fewer than half are correct): the
        ⌈N/2⌉-th largest radius. The published script prints this plus one (it counts r = 0..R)."""
        return int(self.radii.sort(descending=True).values[math.ceil(len(self.radii) / 2) - 1])

    def to_dict(self) -> dict:
        """The summary as plain values (JSON)."""
        return {
            "num_points": len(self.radii),
            "num_classes": self.votes.shape[1],
            "num_models": int(self.votes[0].sum()),
            "accuracy": self.accuracy,
            "median_radius": self.median_radius,
            "certified_accuracy_curve": self.certified_accuracy_curve(),
        }


class Ensemble(nn.Module):
    """k base models of one architecture, stored stacked, voting by plurality.

    ``bases`` is a copy of ``model`` whose every parameter and buffer holds the k base models' values
    stacked along a new first dimension, so ``state_dict()`` saves the whole ensemble and
    ``Ensemble(model, k, num_classes).load_state_dict(...)`` restores it. ``forward(x)`` returns the
    vote counts (N, num_classes) as floats: torch's argmax returns the first maximum, so
    ``votes.argmax(1)`` (what :func:`poisonreach.training.accuracy` takes) is the DPA prediction with
    ties going to the smaller class. The base models always vote in eval mode; a base model with one
    output votes for class 1 when its logit is positive. ``group_size`` base models run at once
    (``torch.func.vmap``), which bounds the memory of a forward pass.
    """

    def __init__(self, model: nn.Module, num_models: int, num_classes: int, *, group_size: int = 64):
        super().__init__()
        check_number("num_models", num_models, low=1, high=MAX_MODELS, integer=True)
        check_number("num_classes", num_classes, low=2, integer=True)
        check_number("group_size", group_size, low=1, integer=True)
        self.num_models = num_models
        self.num_classes = num_classes
        self.group_size = group_size
        self.bases = copy.deepcopy(model)
        for name, tensor in list(self.bases.named_parameters()) + list(self.bases.named_buffers()):
            owner, leaf = _owner(self.bases, name)
            stacked = tensor.detach().unsqueeze(0).repeat(num_models, *([1] * tensor.dim()))
            # setattr keeps a buffer's persistence; parameters stay parameters (no gradient: votes are counts)
            setattr(owner, leaf, nn.Parameter(stacked, requires_grad=False) if isinstance(tensor, nn.Parameter) else stacked)
        # the structure without storage: functional_call supplies each base model's tensors
        object.__setattr__(self, "_skeleton", copy.deepcopy(model).to("meta").eval())

    def stacked_state(self) -> dict[str, Tensor]:
        """Every parameter and buffer of the base models, stacked: name → tensor (k, ...)."""
        return dict(self.bases.named_parameters()) | dict(self.bases.named_buffers())

    def base_model(self, i: int) -> nn.Module:
        """A standalone copy of base model i, in eval mode, on the ensemble's device."""
        check_number("i", i, low=0, high=self.num_models - 1, integer=True)
        state = self.stacked_state()
        device = next(iter(state.values())).device
        model = copy.deepcopy(self._skeleton).to_empty(device=device)
        with torch.no_grad():
            for name, t in model.named_parameters():
                t.copy_(state[name][i])
            for name, t in model.named_buffers():
                t.copy_(state[name][i])
        return model.eval()

    def set_base_models(self, indices: Tensor, state: dict[str, Tensor]) -> None:
        """Overwrite the base models ``indices`` with stacked ``state`` (name → (len(indices), ...))."""
        with torch.no_grad():
            for name, t in self.stacked_state().items():
                t[indices.to(t.device)] = state[name].to(device=t.device, dtype=t.dtype)

    def forward(self, x: Tensor) -> Tensor:
        # Buffers equal in every base model (the normaliser's mean and std) enter once, unbatched:
        # batched, they would turn x into one normalised copy per base model before the first layer.
        shared = {n: t[0] for n, t in self.bases.named_buffers() if torch.equal(t, t[:1].expand_as(t))}
        stacked = {n: t for n, t in self.stacked_state().items() if n not in shared}
        names = list(stacked)
        votes = torch.zeros(len(x), self.num_classes, device=x.device)

        def outputs(tensors: tuple[Tensor, ...]) -> Tensor:
            return functional_call(self._skeleton, {**dict(zip(names, tensors)), **shared}, (x,))

        with torch.no_grad():
            for start in range(0, self.num_models, self.group_size):
                out = vmap(outputs)(tuple(t[start : start + self.group_size] for t in stacked.values()))
                out = out.reshape(out.shape[0], len(x), -1)
                if out.shape[-1] > self.num_classes:
                    raise PoisonReachError(
                        f"the base models have {out.shape[-1]} outputs but the ensemble counts {self.num_classes} "
                        "classes: create the Ensemble with num_classes equal to the model's outputs"
                    )
                classes = (out[..., 0] > 0).long() if out.shape[-1] == 1 else out.argmax(-1)
                votes.scatter_add_(1, classes.T, torch.ones(classes.T.shape, device=x.device))
        return votes

    def extra_repr(self) -> str:
        return f"num_models={self.num_models}, num_classes={self.num_classes}"


def _owner(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The submodule that holds the tensor ``name`` and the tensor's own name in it."""
    path, _, leaf = name.rpartition(".")
    return (module.get_submodule(path) if path else module), leaf


def _has_batch_norm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


class DeepPartitionAggregation(Estimator):
    """A certified training defense: k base models on hash partitions, a plurality vote, and per-point
    certificates (Levine and Feizi 2021; section 5.4 of our paper). See the module docstring.

    Parameters
    ----------
    num_partitions: k, the number of partitions and base models (the paper: 1200 and 3000 on MNIST).
    epochs, lr, batch_size, optimizer, gamma, momentum, weight_decay: each base model's training, as
        in :func:`poisonreach.training.train`, whose defaults (the target models' protocol, appendix
        C.1: Adadelta, lr 1.0 decayed by 0.7 per epoch, batches of 64, 14 epochs) these are: the
        paper's base classifiers are its target models. (The DPA paper trains Network-in-Network
        base models with its own SGD schedule for 200 epochs.)
    group_size: base models trained, and run, at once; bounds memory (each model's parameters,
        gradients and optimizer state). It changes nothing but dropout masks, drawn per group.
    chunk_size: test points per forward pass in :meth:`certify`.
    seed: base model i is initialised and trained with seed ``seed·k + i``.
    device: where to train and predict (None: where ``model``'s parameters are); data stay on the
        CPU and are moved batch by batch.
    progress: a tqdm bar over base models; None shows it only on a terminal.
    """

    name = "dpa"
    constraints = {
        "num_partitions": Number(low=1, high=MAX_MODELS, integer=True),
        **training.HYPERPARAMETERS,
        "group_size": Number(low=1, integer=True),
        "seed": Number(low=0, integer=True),
    }
    # Each base model's training: train's hyperparameters, with its defaults.
    shared = tuple(p for p in keywords(training.train) if p.name in training.HYPERPARAMETERS) + Estimator.shared

    def __init__(self, num_partitions: int, *, group_size: int = 64, chunk_size: int = 256, **shared):
        self._set_params(locals())

    # -- partitions and base models ---------------------------------------------------------------

    def partition(self, X: Tensor) -> Tensor:
        """The partition of every training point: Σ trunc(255·x) mod k (the published hash)."""
        return partition(X, self.num_partitions)

    def members(self, X: Tensor, y: Tensor) -> list[Tensor]:
        """The indices of the points in each partition, in canonical (content) order."""
        ids = self.partition(X)
        sizes = torch.bincount(ids, minlength=self.num_partitions).tolist()
        # ordered one partition at a time: the sort keys then hold one partition, not the data set
        return [m[canonical_order(X[m], y[m])] for m in torch.sort(ids, stable=True).indices.split(sizes)]

    def model_seed(self, i: int) -> int:
        """The seed of base model i's initialisation and training."""
        return self.seed * self.num_partitions + i

    def initial_model(self, model: nn.Module, i: int) -> nn.Module:
        """A copy of ``model`` with every submodule's ``reset_parameters()`` called under base model
        i's seed; tensors of modules without that method keep ``model``'s values."""
        base = copy.deepcopy(model)
        devices = sorted({p.device for p in base.parameters() if p.device.type == "cuda"}, key=str)
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.model_seed(i))
            for m in base.modules():
                if callable(getattr(m, "reset_parameters", None)):
                    m.reset_parameters()
        return base

    # -- training ---------------------------------------------------------------------------------

    def train(self, model: nn.Module, X: Tensor, y: Tensor, loss=None) -> Ensemble:
        """Train the k base models on the partitions of (X, y); ``model`` is the untrained template.

        y: int64 classes or soft labels (N, C); DPA votes over classes, so not regression targets.
        """
        n = check_inputs(X)
        template_device = next(model.parameters()).device
        device = torch.device(self.device) if self.device is not None else template_device
        outputs = num_outputs(model, X, template_device)
        y = check_labels(y, n, outputs, strict=not callable(loss))
        if losses.task_of(y) == "regression":
            raise PoisonReachError(
                "DPA votes over classes: pass class indices (int64) or soft labels (N, C), not regression targets"
            )
        loss_fn = losses.resolve(outputs, y, loss)
        members = self.members(X, y)
        ensemble = Ensemble(model, self.num_partitions, max(outputs, 2), group_size=self.group_size).to(device)
        bar = self._progress(total=self.num_partitions, desc=f"DPA k={self.num_partitions}", unit="model", file=sys.stderr)
        with bar:
            if _has_batch_norm(model):
                self._train_one_by_one(model, X, y, loss, members, ensemble, device, bar)
            else:
                for group in self._groups(members):
                    state = self._train_group(model, X, y, loss_fn, [members[i] for i in group], group, device)
                    ensemble.set_base_models(torch.tensor(group), state)
                    bar.update(len(group))
        return ensemble.eval()

    def _steps(self, size: int) -> int:
        return math.ceil(size / self.batch_size)

    def _groups(self, members: list[Tensor]) -> list[list[int]]:
        """Base models with the same number of steps per epoch, at most ``group_size`` per group."""
        by_steps: dict[int, list[int]] = {}
        for i, m in enumerate(members):
            by_steps.setdefault(self._steps(len(m)), []).append(i)
        return [
            ids[start : start + self.group_size]
            for _, ids in sorted(by_steps.items())
            for start in range(0, len(ids), self.group_size)
        ]

    def _train_group(self, model, X, y, loss_fn, members: list[Tensor], group: list[int], device) -> dict[str, Tensor]:
        """Train the base models ``group`` at once (see the module docstring); their stacked state."""
        bases = [self.initial_model(model, i).to(device) for i in group]
        params, buffers = stack_module_state(bases)
        del bases
        steps = self._steps(len(members[0]))
        if steps == 0:  # empty partitions: their models keep their initialisation
            return {k: v.detach() for k, v in (params | buffers).items()}
        skeleton = copy.deepcopy(model).to("meta").train()

        def per_sample(p: dict, b: dict, x: Tensor, t: Tensor) -> Tensor:
            return loss_fn(functional_call(skeleton, (p, b), (x,)), t)

        batched_loss = vmap(per_sample, randomness="different")
        opt = training.make_optimizer(self.optimizer, params.values(), lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=self.gamma)
        # each model shuffles its partition with its own generator, exactly as train(seed=...) does
        shuffles = [torch.Generator().manual_seed(self.model_seed(i)) for i in group]
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.model_seed(group[0]))  # dropout masks, drawn for the whole group
            for _ in range(self.epochs):
                batches = [m[torch.randperm(len(m), generator=g)].tensor_split(steps) for m, g in zip(members, shuffles)]
                for step in range(steps):
                    index, mask = _pad([b[step] for b in batches])
                    per_model = batched_loss(params, buffers, X[index].to(device), y[index].to(device))
                    mask = mask.to(device)
                    # each model's mean over its real samples, summed: model i's gradient is its own
                    total = ((per_model * mask).sum(1) / mask.sum(1)).sum()
                    opt.zero_grad(set_to_none=True)
                    total.backward()
                    opt.step()
                scheduler.step()
        return {k: v.detach() for k, v in (params | buffers).items()}

    def _train_one_by_one(self, model, X, y, loss, members, ensemble: Ensemble, device, bar) -> None:
        """Batch-norm models: each base model trained by ``train`` on its own partition."""
        for i, m in enumerate(members):
            base = self.initial_model(model, i)
            if len(m):
                training.train(
                    base, X[m], y[m], epochs=self.epochs, lr=self.lr, batch_size=self.batch_size, seed=self.model_seed(i),
                    optimizer=self.optimizer, gamma=self.gamma, momentum=self.momentum, weight_decay=self.weight_decay,
                    loss=loss, device=device, progress=False,
                )
            state = dict(base.named_parameters()) | dict(base.named_buffers())
            ensemble.set_base_models(torch.tensor([i]), {k: v.detach().unsqueeze(0) for k, v in state.items()})
            bar.update(1)

    # -- certification ----------------------------------------------------------------------------

    def certify(self, ensemble: Ensemble, X: Tensor, y: Tensor) -> Certificate:
        """:func:`certify` with this defense's ``chunk_size`` and ``device``."""
        return certify(ensemble, X, y, chunk_size=self.chunk_size, device=self.device)


def certify(
    ensemble: Ensemble, X: Tensor, y: Tensor, *, chunk_size: int = 256, device: str | torch.device | None = None
) -> Certificate:
    """Vote counts, predictions and certified radii (DPA Theorem 1) of the test points (X, y), which
    go through the ensemble ``chunk_size`` at a time on ``device`` (None: where the ensemble is)."""
    if not isinstance(ensemble, Ensemble):
        raise PoisonReachError(f"certify needs the Ensemble that DeepPartitionAggregation.train returned, got {type(ensemble).__name__}")
    check_number("chunk_size", chunk_size, low=1, integer=True)
    votes = training.predict_logits(ensemble, X, chunk_size=chunk_size, device=device)
    return Certificate.from_votes(votes, y)


def _pad(batches: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Index rows (G, B) for batches of unequal sizes, the shorter repeating their first index, and
    the float mask of real samples."""
    width = max(len(b) for b in batches)
    index = torch.stack([torch.cat([b, b[:1].expand(width - len(b))]) for b in batches])
    mask = torch.stack([torch.arange(width) < len(b) for b in batches]).float()
    return index, mask
