"""Fine-tuning a pretrained network's head: ``minimize(parameters="last")``, the run's
``pretrained`` weights and the converged option ``parameters=last``.

- ``minimize`` with ``parameters="last"`` leaves every layer before the head as it was and finds
  the minimiser of the head's objective, checked against an ``nn.Linear`` fit independently on
  features computed by hand (strong convexity bounds the distance);
- ``training_gradient_norm(parameters="last")`` against autograd of the objective written out;
- RunConfig: the pretrained weights start every model whatever the seed, the canceling attacks get
  the trained parameters, and the combinations that cannot work are refused in one line;
- a digits run: every model of the run keeps the pretrained features, and a victim of the target's
  own planting flips predicts as the target does.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from poisonreach import data, models, training
from poisonreach.errors import PoisonReachError
from poisonreach.experiments.audit import audit
from poisonreach.experiments.config import RunConfig, fresh_model, load_data
from poisonreach.experiments.evaluate import evaluate
from poisonreach.experiments.export import export
from poisonreach.experiments.run import run
from poisonreach.gradients import flat_norm


@pytest.fixture(scope="module")
def digits():
    return data.load("digits", seed=0)


@pytest.fixture(scope="module")
def pretrained(digits):
    """A digits NN trained briefly by the paper's protocol: features worth keeping, a head far from its optimum."""
    spec = dict(name="nn", input_shape=digits.input_shape, num_classes=digits.num_classes, mean=digits.mean, std=digits.std)
    return training.train(models.create(**spec, seed=3), digits.x_train, digits.y_train, epochs=1, progress=False), spec


def _body(model):
    head = set(map(id, models.last_linear(model).parameters()))
    return [p.detach().clone() for p in model.parameters() if id(p) not in head]


def test_minimize_last_fits_the_head_on_the_fixed_features(digits, pretrained):
    X, y = digits.x_train, digits.y_train
    net, wd = pretrained[0], 1e-2
    fitted = training.minimize(copy.deepcopy(net), X, y, weight_decay=wd, tolerance=1e-7, parameters="last", progress=False)
    assert all(torch.equal(p, q) for p, q in zip(_body(fitted), _body(net)))  # the features are the pretrained ones
    assert training.training_gradient_norm(fitted, X, y, weight_decay=wd, parameters="last") <= 2e-6
    # the check can fail: the body was not trained to a stationary point
    assert training.training_gradient_norm(fitted, X, y, weight_decay=wd) > 1e-3

    # independently: the head's problem is multinomial logistic regression on φ(X)
    with torch.no_grad():
        phi = models.features(net.eval(), X)
    alone = nn.Linear(phi.shape[1], digits.num_classes)
    torch.manual_seed(11)
    alone.reset_parameters()  # another start: the minimiser is unique
    alone = training.minimize(alone, phi, y, weight_decay=wd, tolerance=1e-7, progress=False)
    head = models.last_linear(fitted)
    distance = flat_norm([head.weight - alone.weight, head.bias - alone.bias])
    # strong convexity (modulus λ): ‖w_a − w_b‖ ≤ (‖∇_a‖ + ‖∇_b‖) / λ, with float32 rounding of φ
    assert distance <= 2e-6 / wd * 2


def test_the_gradient_norm_of_the_last_layer_is_the_objectives_gradient(digits, pretrained):
    X, y = digits.x_train[:200], digits.y_train[:200]
    net, wd = pretrained[0].eval(), 0.05
    head = models.last_linear(net)
    objective = nn.functional.cross_entropy(net(X), y) + wd / 2 * (head.weight.pow(2).sum() + head.bias.pow(2).sum())
    expected = torch.cat([g.flatten() for g in torch.autograd.grad(objective, [head.weight, head.bias])]).norm()
    assert training.training_gradient_norm(net, X, y, weight_decay=wd, parameters="last") == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize("call", ["minimize", "training_gradient_norm"])
def test_the_trained_parameters_are_checked(digits, pretrained, call):
    with pytest.raises(PoisonReachError, match="parameters must be one of"):
        getattr(training, call)(copy.deepcopy(pretrained[0]), digits.x_train, digits.y_train, parameters="first")


@pytest.fixture
def weights_file(tmp_path, pretrained):
    path = tmp_path / "pretrained.pt"
    models.save_model(pretrained[0], path, **pretrained[1])
    return path


def test_the_pretrained_weights_start_every_model_of_the_run(weights_file, pretrained):
    config = RunConfig(dataset="digits", model="nn", pretrained=str(weights_file))
    config.validate()
    _, spec = load_data(config)
    for seed in (0, 7):
        state = fresh_model(config, spec, seed).state_dict()
        assert all(torch.equal(state[k], v) for k, v in pretrained[0].state_dict().items())
    assert not torch.equal(fresh_model(RunConfig(dataset="digits", model="nn"), spec).state_dict()["head.bias"], state["head.bias"])


def test_the_canceling_attacks_cancel_the_parameters_the_victims_train(weights_file):
    last = dict(protocol="converged", training={"parameters": "last"}, eps_d=[0.1])
    assert RunConfig(attack="gc", **last).make_attacks()[0].get_params()["parameters"] == "last"
    assert RunConfig(attack="gm", **last).make_attacks()[0].get_params()["parameters"] == "last"
    assert RunConfig(attack="gc", attack_options={"parameters": "all"}, **last).make_attacks()[0].get_params()["parameters"] == "all"
    assert RunConfig(attack="gc", protocol="converged", eps_d=[0.1]).make_attacks()[0].get_params()["parameters"] == "all"
    assert RunConfig(attack="gc", training={"epochs": 2}, eps_d=[0.1]).trained_parameters == "all"
    with pytest.raises(PoisonReachError, match="honest protocol's training takes"):
        RunConfig(training={"parameters": "last"}).validate()


@pytest.mark.parametrize("change, message", [
    (dict(victim_model="lr"), "cannot start a --victim-model"),
    (dict(protocol="official", model="lr"), "drop --pretrained"),
    (dict(pretrained="no/such/file.pt"), "no pretrained model file at no/such/file.pt"),
])
def test_what_cannot_start_from_pretrained_weights_is_refused(weights_file, change, message):
    config = RunConfig(dataset="digits", model="nn", pretrained=str(weights_file), eps_d=[0.1])
    for key, value in change.items():
        setattr(config, key, value)
    with pytest.raises(PoisonReachError, match=message):
        config.validate()


def test_weights_of_another_architecture_are_refused_before_any_work(tmp_path, weights_file):
    config = RunConfig(dataset="digits", model="lr", pretrained=str(weights_file), eps_d=[0.1])
    with pytest.raises(PoisonReachError, match="do not fit"):
        run(config, tmp_path / "run")
    assert not (tmp_path / "run" / "clean_model.pt").exists()


def test_the_audit_refuses_to_fit_only_the_head(tmp_path):
    config = RunConfig(dataset="digits", protocol="converged", training={"parameters": "last"})
    with pytest.raises(PoisonReachError, match="retrain every parameter"):
        audit(config, tmp_path)


def test_a_fine_tuning_run_keeps_the_features_and_its_planted_target_is_reached(tmp_path, weights_file, pretrained):
    # the attack's least-likely flips are the ones that planted the target (same seed, same draw)
    config = RunConfig(dataset="digits", model="nn", pretrained=str(weights_file), protocol="converged",
                       training={"parameters": "last", "tolerance": 1e-6}, target="labelflip",
                       target_options={"strategy": "least-likely", "eps_d": 0.1}, attack="labelflip",
                       attack_options={"strategy": "least-likely"}, eps_d=[0.1], victim_seeds=[0, 1])
    metrics = run(config, tmp_path)
    entry = metrics["results"][0]
    assert metrics["clean_grad_norm"] <= 1e-6 and metrics["target_grad_norm"] <= 1e-6
    assert entry["victim_grad_norm"] <= 1e-6
    assert entry["target_agreement"] == 100.0 and entry["acc_drop_std"] == 0.0
    for name in ("clean_model.pt", "target_model.pt", "eps_d=0.1/retrained_model.pt"):
        assert all(torch.equal(p, q) for p, q in zip(_body(models.load_model(tmp_path / name)), _body(pretrained[0])))
    # the exported poisons say their victims were fine-tuned, and from which weights
    (victim,) = [m["victim"] for m in export(tmp_path, "npz", tmp_path / "export")]
    assert victim["pretrained"] == str(weights_file) and victim["training"]["parameters"] == "last"
    # and evaluating them with the run's settings fine-tunes the same victims
    record = evaluate(tmp_path / "eps_d=0.1", config)
    assert record["pretrained"] == str(weights_file)
    assert record["poisoned_acc_per_seed"] == [entry["poisoned_acc"]] * 2
