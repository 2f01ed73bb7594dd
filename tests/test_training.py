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


# --------------------------------------------------------------------------------------------------
# the convergence check and prediction agreement
# --------------------------------------------------------------------------------------------------


def full_batch_norm(model, X, y, loss, weight_decay=0.0):
    """‖∇_w mean loss + λw‖ from one autograd call over the whole batch, in eval mode."""
    params = [p for p in model.parameters() if p.requires_grad]
    was = model.training
    model.eval()
    grads = torch.autograd.grad(loss(model(X), y), params)
    model.train(was)
    return torch.sqrt(sum(((g + weight_decay * p).double() ** 2).sum() for g, p in zip(grads, params))).item()


@pytest.mark.parametrize("name", ["lr", "nn", "cnn"])
def test_training_gradient_norm_is_the_full_batch_gradient_norm(name):
    X, y = tiny(n=50, classes=4, seed=3)
    model = fit(name, X, y, 4, epochs=1, batch_size=16, seed=0).train()  # train mode: the norm is taken in eval mode
    expected = full_batch_norm(model, X, y, nn.functional.cross_entropy)
    for chunk_size in (7, 50, 1000):
        assert training.training_gradient_norm(model, X, y, chunk_size=chunk_size) == pytest.approx(expected, rel=1e-5)
    decayed = full_batch_norm(model, X, y, nn.functional.cross_entropy, weight_decay=0.1)
    assert training.training_gradient_norm(model, X, y, weight_decay=0.1, chunk_size=7) == pytest.approx(decayed, rel=1e-5)
    assert decayed != pytest.approx(expected, rel=1e-3)
    assert all(m.training for m in model.modules())  # the modes are restored


def test_training_gradient_norm_of_one_logit_soft_labels_regression_and_a_custom_loss():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(30, 2, generator=g)
    y = (X[:, 0] > 0).long()
    binary = models.create("lr", (2,), 2, seed=0)
    bce = lambda out, t: nn.functional.binary_cross_entropy_with_logits(out.reshape(-1), t.float())  # noqa: E731
    assert training.training_gradient_norm(binary, X, y, chunk_size=4) == pytest.approx(full_batch_norm(binary, X, y, bce), rel=1e-5)
    three = models.create("lr", (2,), 3, seed=1)
    soft = torch.softmax(torch.randn(30, 3, generator=g), 1)
    soft_ce = lambda out, t: -(t * torch.log_softmax(out, 1)).sum(1).mean()  # noqa: E731
    assert training.training_gradient_norm(three, X, soft, chunk_size=4) == pytest.approx(full_batch_norm(three, X, soft, soft_ce), rel=1e-5)
    linreg = models.create("linreg", (2,), 1, seed=2)
    target = X @ torch.tensor([1.0, -2.0])
    half_mse = lambda out, t: 0.5 * ((out.reshape(-1) - t) ** 2).mean()  # noqa: E731
    assert training.training_gradient_norm(linreg, X, target, chunk_size=4) == pytest.approx(full_batch_norm(linreg, X, target, half_mse), rel=1e-5)
    hinge = lambda out, t: torch.relu(1 - (2 * t - 1) * out.reshape(-1))  # noqa: E731
    assert training.training_gradient_norm(binary, X, y, hinge, chunk_size=4) == pytest.approx(
        full_batch_norm(binary, X, y, lambda o, t: hinge(o, t).mean()), rel=1e-5)


def test_training_gradient_norm_reaches_zero_when_training_converges():
    """Full-batch gradient descent on an L2-regularised logistic regression (strongly convex)
    converges; the norm says so only when it is told the weight decay of the objective."""
    X, y = tiny(n=40, shape=(3,), classes=3, seed=1)
    X = X - 0.5
    protocol = dict(optimizer="sgd", lr=0.5, momentum=0.0, gamma=1.0, batch_size=40, weight_decay=0.05)
    early = fit("lr", X, y, 3, epochs=1, **protocol)
    late = fit("lr", X, y, 3, epochs=1500, **protocol)
    assert training.training_gradient_norm(early, X, y, weight_decay=0.05) > 1e-2
    assert training.training_gradient_norm(late, X, y, weight_decay=0.05) < 1e-5
    # the data loss alone is not stationary there: its gradient is −λw
    weights = torch.sqrt(sum((p.detach().double() ** 2).sum() for p in late.parameters())).item()
    assert training.training_gradient_norm(late, X, y) == pytest.approx(0.05 * weights, rel=1e-3)


def test_training_gradient_norm_refuses_bad_input():
    X, y = tiny()
    model = models.create("lr", X.shape[1:], 3)
    with pytest.raises(PoisonReachError, match="chunk_size"):
        training.training_gradient_norm(model, X, y, chunk_size=0)
    with pytest.raises(PoisonReachError, match="weight_decay"):
        training.training_gradient_norm(model, X, y, weight_decay=-1)
    with pytest.raises(PoisonReachError):
        training.training_gradient_norm(model, X, y[:-1])


def test_agreement_counts_equal_predictions():
    X, y = tiny(n=60, classes=3, seed=2)
    a = models.create("lr", X.shape[1:], 3, seed=0)
    b = models.create("lr", X.shape[1:], 3, seed=1)
    same_class = (training.predict_logits(a, X).argmax(1) == training.predict_logits(b, X).argmax(1)).float().mean().item()
    assert training.agreement(a, b, X, chunk_size=7) == pytest.approx(100 * same_class)
    assert 0 < training.agreement(a, b, X) < 100
    assert training.agreement(a, a, X) == 100.0
    # one logit: class 1 when the logit is positive; the negated model disagrees everywhere
    binary = models.create("lr", X.shape[1:], 2, seed=0)
    negated = models.create("lr", X.shape[1:], 2, seed=0)
    with torch.no_grad():
        for p in negated.parameters():
            p.neg_()
    assert training.agreement(binary, negated, X) == 0.0
    with pytest.raises(PoisonReachError, match="same outputs"):
        training.agreement(a, binary, X)


def test_agreement_ignores_the_flat_directions_the_parameter_distance_sees():
    """The rationale of target_agreement: a large move along a flat direction, a weight column of
    an always-zero input plus a logit shift common to all classes, changes no prediction."""
    X, y = tiny(n=60, shape=(5,), classes=3, seed=4)
    X[:, 2] = 0  # an input that is zero everywhere (a border pixel)
    model = fit("lr", X, y, 3, epochs=2, seed=0)
    moved = fit("lr", X, y, 3, epochs=2, seed=0)
    head = models.last_linear(moved)
    with torch.no_grad():
        head.weight[:, 2] += torch.tensor([5.0, -3.0, 7.0])
        head.bias += 4.0
    from poisonreach.targets import parameter_distance
    assert parameter_distance(moved, model) > 5
    assert training.agreement(moved, model, X) == 100.0


def test_train_callback_reports_each_epochs_mean_loss_and_changes_nothing():
    X, y = tiny(n=50)
    seen = []
    model = fit("lr", X, y, 3, epochs=3, batch_size=16, seed=4, callback=lambda step, values: seen.append((step, values)))
    assert same(params(model), params(fit("lr", X, y, 3, epochs=3, batch_size=16, seed=4)))  # the hook only reads
    assert [step for step, _ in seen] == [1, 2, 3] and all(set(v) == {"loss"} for _, v in seen)
    # with steps too small to move the model, the epoch's mean loss is the mean loss at the start
    start = models.create("lr", X.shape[1:], 3)
    expected = nn.functional.cross_entropy(start(X), y).item()
    seen.clear()
    training.train(start, X, y, epochs=1, batch_size=16, optimizer="sgd", lr=1e-12, momentum=0.0, progress=False,
                   callback=lambda step, values: seen.append(values["loss"]))
    assert seen == [pytest.approx(expected, rel=1e-6)]


def test_minimize_callback_reports_the_objective_and_gradient_norm_of_each_round():
    X, y = tiny(n=60)
    seen = []
    model = training.minimize(models.create("lr", X.shape[1:], 3), X, y, weight_decay=1e-2, tolerance=1e-6, progress=False,
                              callback=lambda step, values: seen.append((step, values)))
    steps = [s for s, _ in seen]
    assert steps == sorted(steps) and steps[0] > 0 and all(set(v) == {"objective", "grad_norm"} for _, v in seen)
    double = models.create("lr", X.shape[1:], 3).double()
    double.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    objective = nn.functional.cross_entropy(double(X.double()), y).item() + 1e-2 / 2 * sum((p * p).sum().item() for p in double.parameters())
    assert seen[-1][1]["objective"] == pytest.approx(objective, rel=1e-6)
    assert seen[-1][1]["grad_norm"] <= 1e-6
