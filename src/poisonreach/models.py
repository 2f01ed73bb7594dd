"""Target models of the paper (Section 5, Appendix C.1) behind one last-layer contract.

Every model built here by name is a :class:`Classifier`: ``forward(x) = head(features(x))``, where
``features(x)`` is φ(x), the input of the last linear layer ``head``. Attacks and the threshold τ
reach the last layer through this contract; :func:`last_linear` and :func:`features` extend it to
models built elsewhere. :func:`create` also builds the user's own classes, named
``module.path:Class`` (:mod:`poisonreach.user_models`), and checks that they end in an
``nn.Linear`` (:func:`check_last_linear`).

Models take inputs in pixel space (images (N, C, H, W) in [0, 1], or tabular (N, d)) and normalise
them inside, so that poisons are optimised and projected in the space the data lives in.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn

from . import io, user_models
from .errors import CorruptFileError, PoisonReachError
from .validation import evaluating, is_int

Stats = float | Sequence[float] | Tensor
FORMAT = "poisonreach-model/1"


class Normalize(nn.Module):
    """``(x - mean) / std``, with mean and std broadcast over channels (images) or features."""

    def __init__(self, mean: Tensor, std: Tensor):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x: Tensor) -> Tensor:
        primal, tangent = fwAD.unpack_dual(x)
        if tangent is not None:
            # Forward mode (GC's Jacobian–vector products): torch runs a broadcast op between a dual
            # and a plain tensor through a Python decomposition, about 1 ms a call, most of a
            # Gauss–Newton step on small chunks. The map is affine: its tangent is d/std.
            return fwAD.make_dual((primal - self.mean) / self.std, tangent / self.std)
        return (x - self.mean) / self.std


class Classifier(nn.Module):
    """A normaliser, a body and a last linear layer ``head``: ``forward(x) = head(features(x))``."""

    def __init__(self, normalize: Normalize, body: nn.Module, head: nn.Linear):
        super().__init__()
        self.normalize = normalize
        self.body = body
        self.head = head

    def features(self, x: Tensor) -> Tensor:
        """φ(x): the flattened input of ``head``."""
        return self.body(self.normalize(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class BasicBlock(nn.Module):
    """Two 3×3 convolutions with a residual connection (He et al. 2016)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            # The identity cannot be added when the shape changes: project with a strided 1×1 conv.
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


def _resnet_body(in_channels: int, blocks: Sequence[int]) -> nn.Sequential:
    """CIFAR-style ResNet trunk: 3×3 stride-1 stem without max-pool, four stages, global average pool."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, 64, 3, padding=1, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(),
    ]
    channels = 64
    for stage, (width, count) in enumerate(zip((64, 128, 256, 512), blocks)):
        for i in range(count):
            stride = 2 if stage > 0 and i == 0 else 1
            layers.append(BasicBlock(channels, width, stride))
            channels = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers)


def _image(name: str, input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    if len(input_shape) != 3:
        raise PoisonReachError(
            f"{name} needs images: input_shape must be (C, H, W), got {input_shape}; "
            "use 'lr', 'linreg' or 'nn' for tabular data"
        )
    channels, height, width = input_shape
    return channels, height, width


def _linear(input_shape: tuple[int, ...], outputs: int) -> tuple[nn.Module, nn.Linear]:
    return nn.Flatten(), nn.Linear(math.prod(input_shape), outputs)


def _lr(input_shape: tuple[int, ...], num_classes: int) -> tuple[nn.Module, nn.Linear]:
    # Binary logistic regression has one logit (Example 2); multiclass has one per class.
    return _linear(input_shape, 1 if num_classes <= 2 else num_classes)


def _linreg(input_shape: tuple[int, ...], num_classes: int) -> tuple[nn.Module, nn.Linear]:
    # Least squares (Example 1) has one output whatever num_classes says.
    return _linear(input_shape, 1)


def _nn(input_shape: tuple[int, ...], num_classes: int) -> tuple[nn.Module, nn.Linear]:
    """Three fully connected layers, hidden width 784, LeakyReLU(0.2) (Appendix C.1)."""
    body = nn.Sequential(
        nn.Flatten(),
        nn.Linear(math.prod(input_shape), 784),
        nn.LeakyReLU(0.2),
        nn.Linear(784, 784),
        nn.LeakyReLU(0.2),
    )
    return body, nn.Linear(784, num_classes)


def _cnn(input_shape: tuple[int, ...], num_classes: int) -> tuple[nn.Module, nn.Linear]:
    """The PyTorch MNIST example network: two 3×3 convolutions, max-pooling, two linear layers."""
    channels, height, width = _image("cnn", input_shape)
    if min(height, width) < 6:
        raise PoisonReachError(f"cnn needs images of at least 6×6 pixels, got {height}×{width}; use 'nn' or 'lr'")
    # Each unpadded 3×3 convolution removes 2 pixels, then max-pooling halves (e.g. 28→26→24→12).
    flat = 64 * ((height - 4) // 2) * ((width - 4) // 2)
    body = nn.Sequential(
        nn.Conv2d(channels, 32, 3),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Dropout(0.25),
        nn.Flatten(),
        nn.Linear(flat, 128),
        nn.ReLU(),
        nn.Dropout(0.5),
    )
    return body, nn.Linear(128, num_classes)


def _resnet(name: str, blocks: Sequence[int]) -> Callable[[tuple[int, ...], int], tuple[nn.Module, nn.Linear]]:
    def build(input_shape: tuple[int, ...], num_classes: int) -> tuple[nn.Module, nn.Linear]:
        channels, _, _ = _image(name, input_shape)
        return _resnet_body(channels, blocks), nn.Linear(512, num_classes)

    return build


_BUILDERS: dict[str, Callable[[tuple[int, ...], int], tuple[nn.Module, nn.Linear]]] = {
    "lr": _lr,
    "linreg": _linreg,
    "nn": _nn,
    "cnn": _cnn,
    "resnet18": _resnet("resnet18", (2, 2, 2, 2)),
    "resnet34": _resnet("resnet34", (3, 4, 6, 3)),
}


def names() -> list[str]:
    """The model names :func:`create` accepts (besides ``module.path:Class`` specs)."""
    return sorted(_BUILDERS)


def check_name(name: str, options: dict | None = None) -> None:
    """Raise a PoisonReachError unless ``name`` is a built-in model or an importable user class
    that takes ``options`` (built-in models take none)."""
    if user_models.is_spec(name):
        user_models.check_options(name, options or {})
    elif name not in _BUILDERS:
        raise PoisonReachError(f"unknown model {name!r}: the model must be one of {names()}, or your own class as module.path:Class")
    elif options:
        raise PoisonReachError(f"model options {sorted(options)} are for module.path:Class models; {name} takes none")


def _check_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(input_shape) if isinstance(input_shape, (tuple, list, torch.Size)) else None
    if (
        shape is None
        or len(shape) not in (1, 3)
        or not all(is_int(s) and s >= 1 for s in shape)
    ):
        raise PoisonReachError(
            f"input_shape must be the shape of one sample without the batch dimension, (C, H, W) for images "
            f"or (d,) for tabular data, with positive integers; got {input_shape!r}"
        )
    return tuple(int(s) for s in shape)


def _stats(value: Stats, input_shape: tuple[int, ...], what: str, *, positive: bool = False) -> Tensor:
    """``value`` as a buffer broadcasting over the channels (images) or the features (tabular)."""
    try:
        t = torch.as_tensor(value, dtype=torch.float32).flatten()
    except (TypeError, ValueError, RuntimeError) as e:
        raise PoisonReachError(f"{what} must be a number or a sequence of numbers, got {value!r}") from e
    if t.numel() not in (1, input_shape[0]):
        raise PoisonReachError(
            f"{what} has {t.numel()} values but input_shape {input_shape} has {input_shape[0]} "
            f"{'channels' if len(input_shape) == 3 else 'features'}: give one value or one per "
            f"{'channel' if len(input_shape) == 3 else 'feature'}"
        )
    if not torch.isfinite(t).all() or (positive and not (t > 0).all()):
        raise PoisonReachError(f"{what} must be finite{' and positive' if positive else ''}, got {value!r}")
    return t.reshape(-1, 1, 1) if len(input_shape) == 3 else t


def create(
    name: str,
    input_shape: Sequence[int],
    num_classes: int,
    *,
    mean: Stats = 0.0,
    std: Stats = 1.0,
    seed: int = 0,
    options: dict | None = None,
) -> nn.Module:
    """A freshly initialised model from :func:`names`, or of the user class ``module.path:Class``
    called with ``options`` (:mod:`poisonreach.user_models`), for inputs of shape ``input_shape``
    (no batch).

    The weights depend on ``seed`` only, and the global random state is left as it was, so the same
    seed gives the same initial model: retraining "from scratch" on poisoned data starts from the
    model the clean one started from. ``mean`` and ``std`` normalise the inputs inside the model and
    are one number or one per channel (images) or feature (tabular); a user class receives them
    only if its constructor names them.
    """
    check_name(name, options)
    shape = _check_shape(input_shape)
    if not is_int(num_classes) or num_classes < 1:
        raise PoisonReachError(f"num_classes must be a positive integer, got {num_classes!r}")
    if not is_int(seed):
        raise PoisonReachError(f"seed must be an integer, got {seed!r}")
    mean_t, std_t = _stats(mean, shape, "mean"), _stats(std, shape, "std", positive=True)
    user = user_models.is_spec(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        if user:
            model = user_models.build(name, options or {}, input_shape=shape, num_classes=int(num_classes),
                                      mean=tuple(mean_t.flatten().tolist()), std=tuple(std_t.flatten().tolist()))
        else:
            model = Classifier(Normalize(mean_t, std_t), *_BUILDERS[name](shape, int(num_classes)))
    if user:
        check_last_linear(model, shape, name)
    return model


# what τ and the attacks read from a model, said by every error about its last layer
LAST_LAYER_NEED = ("τ and the attacks need the model's outputs to be the logits h = W·φ(x) + b of a last nn.Linear layer, "
                   "nothing applied after it")


def last_linear(model: nn.Module) -> nn.Linear:
    """The last linear layer: ``model.head`` if it is one, else the last ``nn.Linear`` registered."""
    head = getattr(model, "head", None)
    if isinstance(head, nn.Linear):
        return head
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise PoisonReachError(
            f"{type(model).__name__} has no nn.Linear layer: {LAST_LAYER_NEED}; end the model with one (or set model.head to it)"
        )
    return linears[-1]


def _capture(model: nn.Module, layer: nn.Linear, x: Tensor) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
    """``model(x)`` and the (input, output) of each call of ``layer`` during it."""
    calls: list[tuple[Tensor, Tensor]] = []
    handle = layer.register_forward_hook(lambda module, inputs, output: calls.append((inputs[0], output)))
    try:
        return model(x), calls
    finally:
        handle.remove()


def check_last_linear(model: nn.Module, input_shape: Sequence[int], name: str | None = None) -> None:
    """Raise one PoisonReachError unless ``model`` takes inputs of ``input_shape`` and returns the
    output of :func:`last_linear` as it is: τ reads the logits h = Wφ + b (reachability's
    ⟨(W, b), ∇ℓ⟩ = ⟨h, ∇_h l⟩) and the attacks differentiate through that layer. Checked on two
    seeded random inputs in [0, 1], in eval mode."""
    name = name or type(model).__name__
    layer = last_linear(model)
    x = torch.rand((2, *input_shape), generator=torch.Generator().manual_seed(0))
    try:
        with evaluating(model), torch.no_grad():
            out, calls = _capture(model, layer, x.to(next(model.parameters()).device))
    except Exception as e:  # the user's forward(): a shape mismatch is the usual cause
        raise PoisonReachError(f"{name} does not take inputs of shape {tuple(input_shape)} ({type(e).__name__}: "
                               f"{str(e).splitlines()[0] if str(e) else ''}): build it for this data set") from None
    if not calls:
        raise PoisonReachError(f"{name} never calls its last nn.Linear ({layer}) in forward(): {LAST_LAYER_NEED}")
    last = calls[-1][1]
    if not isinstance(out, Tensor) or out.shape != last.shape or not torch.equal(out, last):
        raise PoisonReachError(f"the outputs of {name} are not those of its last nn.Linear ({layer}): {LAST_LAYER_NEED}; "
                               "return that layer's output from forward() (a softmax or other layer after it belongs in the loss)")


def features(model: nn.Module, x: Tensor) -> Tensor:
    """φ(x), the input of the last linear layer, keeping the autograd graph.

    Uses ``model.features`` only together with a linear ``model.head`` (the :class:`Classifier`
    contract): torchvision models also have ``.features``, but there it is the convolutional trunk.
    Other models are run with a hook that records the input of :func:`last_linear`.
    """
    layer = last_linear(model)
    if callable(getattr(model, "features", None)) and getattr(model, "head", None) is layer:
        return model.features(x)
    _, calls = _capture(model, layer, x)
    if not calls:
        raise PoisonReachError(
            f"the last nn.Linear of {type(model).__name__} is not used in forward(): set model.head to the "
            "layer that produces the outputs"
        )
    return calls[-1][0]


def affine_features(model: nn.Module, shape: tuple[int, ...], device: torch.device) -> tuple[Tensor, Tensor]:
    """(s, t) with φ(x) = s ⊙ x + t, φ the input of the last linear layer, pixel by pixel (a linear
    model's normalisation, float64); a model whose φ is anything else (a hidden layer, a
    convolution) gets a clear error: what needs this (Theorems 5/6, the box-aware threshold) holds
    for linear models only."""
    probe = torch.stack([torch.zeros(shape), torch.ones(shape), torch.rand(shape, generator=torch.Generator().manual_seed(0))]).to(device)
    with torch.no_grad():
        phi = features(model, probe).flatten(1).double()
    t, s = phi[0], phi[1] - phi[0]
    flat = probe[2].flatten().double()
    if phi.shape[1] != flat.numel() or not torch.allclose(phi[2], s * flat + t, rtol=1e-5, atol=1e-5) or not bool((s != 0).all()):
        raise PoisonReachError(
            f"this needs a linear model (its last nn.Linear acting on the normalised pixels, as --model lr); "
            f"{type(model).__name__} transforms its inputs first"
        )
    return s, t


def is_linear(model: nn.Module, shape: tuple[int, ...]) -> bool:
    """Whether the model is linear in its inputs (:func:`affine_features` accepts it)."""
    try:
        affine_features(model, shape, next(model.parameters()).device)
    except PoisonReachError:
        return False
    return True


def _spec(name: str, input_shape: Sequence[int], num_classes: int, mean: Stats, std: Stats, options: dict | None) -> dict:
    """The arguments of :func:`create` as plain Python values, loadable without executing code."""

    def plain(value: Stats) -> float | list[float]:
        values = torch.as_tensor(value, dtype=torch.float64).flatten().tolist()
        return values[0] if len(values) == 1 else values

    return {
        "name": name,
        "input_shape": [int(s) for s in input_shape],
        "num_classes": int(num_classes),
        "mean": plain(mean),
        "std": plain(std),
        **({"options": io.plain(options)} if options else {}),  # a user class's, which rebuild it
    }


def _build(spec: dict, state_dict: dict[str, Tensor]) -> nn.Module:
    model = create(
        spec["name"], tuple(spec["input_shape"]), spec["num_classes"], mean=spec["mean"], std=spec["std"], options=spec.get("options")
    )
    model.load_state_dict(state_dict)
    return model


def save_model(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    name: str,
    input_shape: Sequence[int],
    num_classes: int,
    mean: Stats,
    std: Stats,
    options: dict | None = None,
) -> None:
    """Write ``model`` with the :func:`create` arguments that rebuild it; :func:`load_model` reads it.

    The file holds only plain values and tensors, so it loads with ``weights_only=True``; a user
    class is recorded by its ``module.path:Class`` spec and ``options``, never pickled. It is
    written to a temporary file next to ``path`` and then renamed, so readers never see half a file.
    """
    path = Path(path)
    spec = _spec(name, input_shape, num_classes, mean, std, options)
    state_dict = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    try:
        # Fail now rather than write a file that load_model would reject.
        _build(spec, state_dict)
    except RuntimeError as e:
        raise PoisonReachError(
            f"cannot save to {path}: the model does not match create({name!r}, {tuple(input_shape)}, "
            f"{num_classes}): {e}; pass the arguments the model was created with"
        ) from e
    io.save_tensors(path, {"format": FORMAT, "spec": spec, "state_dict": state_dict})


def load_model(path: str | os.PathLike) -> nn.Module:
    """The model :func:`save_model` wrote to ``path``, on the CPU and in eval mode.

    Loads with ``weights_only=True``: reading a model file never executes code from it. A model of
    a user class is rebuilt by importing its module and calling the class with the saved options,
    so only classes passed to :func:`poisonreach.user_models.allow` are: the file names code, and
    the caller decides whether it runs.
    """
    path = Path(path)
    if not path.is_file():
        raise PoisonReachError(f"no model file at {path}: check the path, or train and save the model first")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CorruptFileError(f"{path} is not a readable model file ({e}); save the model again") from e
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("spec"), dict):
        raise CorruptFileError(f"{path} is not a {FORMAT} file written by save_model; save the model again")
    name = data["spec"].get("name")
    user = user_models.is_spec(name)
    if user and not user_models.allowed(name):
        raise PoisonReachError(f"{path} holds a model of the user class {name}, which rebuilding would import and run: "
                               f"call poisonreach.user_models.allow({name!r}) first if you trust it (a run allows the classes "
                               "its configuration names)")
    try:
        model = _build(data["spec"], data["state_dict"])
    except PoisonReachError as e:
        if user:  # the user's module or constructor, not the file: its own message names the fix
            raise PoisonReachError(f"cannot rebuild the model in {path}: {e}") from None
        raise CorruptFileError(f"{path} holds an invalid model ({e}); save the model again") from e
    except (KeyError, TypeError, RuntimeError) as e:
        raise CorruptFileError(f"{path} holds an invalid model ({e}); save the model again") from e
    return model.eval()


def load_weights(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """``model`` with the weights saved in ``path``: a state dict written by ``torch.save`` (alone,
    under ``"state_dict"``, or a :func:`save_model` file), read with ``weights_only=True``, so a
    file holding Python objects is refused unopened. Every key and shape must match the model's;
    otherwise one PoisonReachError names the first differences."""
    data = io.load_tensors(path)
    state = data.get("state_dict", data) if isinstance(data, dict) else None
    if not isinstance(state, dict) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise PoisonReachError(f"{path} holds no state dict of tensors: save the weights with torch.save(model.state_dict(), FILE)")
    own = model.state_dict()
    problems = [f"missing {k}" for k in own if k not in state] + [f"unexpected {k}" for k in state if k not in own]
    problems += [f"{k} is {tuple(state[k].shape)}, not {tuple(v.shape)}" for k, v in own.items() if k in state and state[k].shape != v.shape]
    if problems:
        raise PoisonReachError(f"the weights in {path} do not fit {type(model).__name__} ({'; '.join(problems[:3])}"
                               f"{f'; {len(problems) - 3} more' if len(problems) > 3 else ''}): build the model with the options "
                               "they were trained with")
    model.load_state_dict(state)
    return model
