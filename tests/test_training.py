import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

from poisonreach import models, training
from poisonreach.errors import PoisonReachError


def params(model):
    return [p.detach().clone() for p in model.parameters()]


def same(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def tiny(n=40, shape=(1, 8, 8), classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, *shape, generator=g), torch.randint(0, classes, (n,), generator=g)


def fit(name, X, y, classes, **kwargs):
    return training.train(models.create(name, X.shape[1:], classes), X, y, progress=False, **kwargs)


@pytest.mark.parametrize("name", ["lr", "nn", "cnn"])
def test_training_is_a_function_of_the_seed(name):
    X, y = tiny()
    a = params(fit(name, X, y, 3, epochs=2, batch_size=16, seed=1))
    b = params(fit(name, X, y, 3, epochs=2, batch_size=16, seed=1))
    c = params(fit(name, X, y, 3, epochs=2, batch_size=16, seed=2))
    assert same(a, b)
    assert not same(a, c)


def test_train_leaves_the_global_rng_alone_and_returns_the_model_in_eval_mode():
    X, y = tiny()
    model = models.create("cnn", (1, 8, 8), 3)
    state = torch.get_rng_state()
    assert training.train(model, X, y, epochs=1, progress=False) is model
    assert torch.equal(torch.get_rng_state(), state)
    assert not any(m.training for m in model.modules())


def test_lr_learns_digits():
    digits = load_digits()
    X = torch.tensor(digits.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16
    y = torch.tensor(digits.target)
    order = torch.randperm(len(X), generator=torch.Generator().manual_seed(0))
    train_idx, test_idx = order[:1300], order[1300:]
    mean, std = X[train_idx].mean().item(), X[train_idx].std().item()
    model = models.create("lr", (1, 8, 8), 10, mean=mean, std=std)
    # The paper's Adadelta schedule; digits has 20× fewer samples than MNIST, so smaller batches
    # give the decaying learning rate enough steps.
    training.train(model, X[train_idx], y[train_idx], epochs=5, batch_size=16, progress=False)
    assert training.accuracy(model, X[test_idx], y[test_idx]) > 90


def test_binary_lr_with_one_logit_separates_a_separable_set():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(200, 2, generator=g)
    X[:, 0] += torch.where(X[:, 0] > 0, 1.0, -1.0)  # a margin of 2 around x₀ = 0
    y = (X[:, 0] > 0).long()
    model = fit("lr", X, y, 2, epochs=10, optimizer="sgd", lr=0.5, gamma=1.0)
    assert model.head.out_features == 1
    assert training.accuracy(model, X, y) == 100.0


def test_linreg_fits_a_linear_function():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(256, 3, generator=g)
    w, b = torch.tensor([1.0, -2.0, 0.5]), 0.3
    model = fit("linreg", X, X @ w + b, 1, epochs=20, batch_size=16, optimizer="sgd", lr=0.1, gamma=1.0)
    torch.testing.assert_close(model.head.weight[0], w, atol=1e-3, rtol=0)
    torch.testing.assert_close(model.head.bias[0], torch.tensor(b), atol=1e-3, rtol=0)


def test_unit_weights_equal_no_weights():
    X, y = tiny()
    plain = params(fit("nn", X, y, 3, epochs=2, batch_size=16))
    weighted = params(fit("nn", X, y, 3, epochs=2, batch_size=16, weights=torch.ones(len(X))))
    assert same(plain, weighted)


def test_soft_labels_equal_to_one_hot_labels_give_the_same_model():
    X, y = tiny()
    hard = params(fit("lr", X, y, 3, epochs=2, batch_size=16))
    soft = params(fit("lr", X, nn.functional.one_hot(y, 3).float(), 3, epochs=2, batch_size=16))
    for a, b in zip(hard, soft):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_other_optimizers_lower_the_loss(optimizer):
    X, y = tiny(n=64)
    model = models.create("lr", (1, 8, 8), 3)
    before = nn.functional.cross_entropy(training.predict_logits(model, X), y)
    training.train(model, X, y, epochs=5, lr=0.05, optimizer=optimizer, weight_decay=1e-4, progress=False)
    assert nn.functional.cross_entropy(training.predict_logits(model, X), y) < before


def test_batchnorm_never_sees_a_batch_of_one():
    # 65 samples in batches of at most 64: a 64 + 1 split would make BatchNorm raise.
    X, y = tiny(n=65, shape=(4,))
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    training.train(model, X, y, epochs=1, progress=False)


def test_resnet_trains_on_tiny_images():
    X, y = tiny(n=4, shape=(3, 16, 16), classes=2)
    a = params(fit("resnet18", X, y, 2, epochs=1, batch_size=2, device="cpu"))
    b = params(fit("resnet18", X, y, 2, epochs=1, batch_size=2))
    assert same(a, b)


def test_progress_bar_goes_to_stderr(capsys):
    X, y = tiny()
    training.train(models.create("lr", (1, 8, 8), 3), X, y, epochs=2, progress=True)
    assert "loss=" in capsys.readouterr().err
    training.train(models.create("lr", (1, 8, 8), 3), X, y, epochs=2, progress=False)
    assert capsys.readouterr().err == ""


def test_predict_logits_is_chunked_and_keeps_the_mode():
    X, _ = tiny(n=10)
    model = models.create("cnn", (1, 8, 8), 3)  # in train mode: dropout would make outputs random
    logits = training.predict_logits(model, X, chunk_size=3)
    assert model.training
    torch.testing.assert_close(logits, model.eval()(X))


def test_accuracy_thresholds_one_logit_and_takes_the_argmax_of_several():
    X = torch.tensor([[-2.0], [-0.5], [0.5], [2.0]])
    one = nn.Linear(1, 1)
    two = nn.Linear(1, 2)
    with torch.no_grad():
        one.weight.fill_(1.0), one.bias.zero_()
        two.weight.copy_(torch.tensor([[-1.0], [1.0]])), two.bias.zero_()
    y = torch.tensor([0, 0, 1, 0])
    assert training.accuracy(one, X, y) == 75.0
    assert training.accuracy(two, X, y) == 75.0
    soft = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.3, 0.7]])
    assert training.accuracy(two, X, soft) == 100.0
    assert training.accuracy(one, X, soft[:, 1:]) == 100.0


def test_accuracy_is_undefined_for_regression():
    X = torch.rand(4, 3)
    with pytest.raises(PoisonReachError, match="regression"):
        training.accuracy(models.create("linreg", (3,), 1), X, torch.rand(4))


X0, Y0 = tiny(n=8)
NAN = X0.clone()
NAN[0, 0, 0, 0] = float("nan")
INF = X0.clone()
INF[1, 0, 0, 0] = float("inf")


@pytest.mark.parametrize(
    "X, y, kwargs, match",
    [
        (X0, Y0[:7], {}, "8 samples but y has 7"),
        (NAN, Y0, {}, "NaN or infinite"),
        (INF, Y0, {}, "NaN or infinite"),
        (X0.numpy(), Y0, {}, "torch.Tensor"),
        ((X0 * 255).byte(), Y0, {}, "floating point"),
        (X0, Y0, {"epochs": 0}, "epochs"),
        (X0, Y0, {"batch_size": 0}, "batch_size"),
        (X0, Y0, {"lr": 0.0}, "lr"),
        (X0, Y0, {"lr": float("nan")}, "lr"),
        (X0, Y0, {"gamma": 0.0}, "gamma"),
        (X0, Y0, {"momentum": 1.0}, "momentum"),
        (X0, Y0, {"weight_decay": -1.0}, "weight_decay"),
        (X0, Y0, {"optimizer": "lbfgs"}, "optimizer must be one of"),
        (X0, Y0, {"seed": None}, "seed"),
        (X0, Y0, {"progress": "yes"}, "progress"),
        (X0, Y0, {"weights": torch.ones(7)}, r"shape \(8,\)"),
        (X0, Y0, {"weights": -torch.ones(8)}, "non-negative"),
        (X0, Y0, {"weights": torch.zeros(8)}, "all zero"),
        (X0, Y0 + 3, {}, r"\[0, 3\)"),
        (X0, torch.rand(8, 2), {}, "2 columns but the model has 3"),
        (X0, torch.rand(8), {}, "one output"),
        (X0, Y0.bool(), {}, "integers"),
        (X0, Y0, {"loss": lambda out, y: out.sum()}, "one loss per sample"),
        (X0, Y0, {"loss": "hinge"}, "unknown loss"),
    ],
)
def test_bad_training_input_raises(X, y, kwargs, match):
    with pytest.raises(PoisonReachError, match=match):
        training.train(models.create("lr", (1, 8, 8), 3), X, y, **{"progress": False, **kwargs})


def test_evaluating_switches_to_eval_mode_and_restores_every_submodule():
    from poisonreach.validation import evaluating

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5), torch.nn.Linear(2, 1))
    model[1].eval()  # mixed modes: each must come back as it was
    with evaluating(model):
        assert not any(m.training for m in model.modules())
    assert [m.training for m in model.modules()] == [True, True, False, True]
    model.eval()
    with evaluating(model):  # already in eval mode: left alone
        assert not any(m.training for m in model.modules())
    assert not any(m.training for m in model.modules())
    with pytest.raises(RuntimeError):
        with evaluating(model.train()):
            raise RuntimeError("boom")
    assert all(m.training for m in model.modules())  # restored on error too


def test_momentum_bound_is_open_at_one():
    X, y = torch.rand(8, 2), torch.randint(0, 2, (8,))
    with pytest.raises(PoisonReachError, match="momentum must be < 1, got 1.0"):
        training.train(torch.nn.Linear(2, 2), X, y, epochs=1, optimizer="sgd", momentum=1.0, progress=False)
    training.train(torch.nn.Linear(2, 2), X, y, epochs=1, optimizer="sgd", momentum=0.99, progress=False)
