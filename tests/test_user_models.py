"""The user's own model class, ``module.path:Class`` (poisonreach.user_models): construction, the
last-layer check, saving and reloading without pickles, and every command through the CLI."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from torch import nn

from poisonreach import models, user_models
from poisonreach.cli import main
from poisonreach.errors import PoisonReachError

# A model in the style a user writes: it normalises its pixel-space inputs itself, with the data
# set's statistics, and ends in an nn.Linear; ``Wide`` takes **kwargs and so receives no data argument.
SOURCE = '''
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self, input_shape, num_classes, mean, std, width=16):
        super().__init__()
        self.received = dict(input_shape=input_shape, num_classes=num_classes, mean=mean, std=std, width=width)
        self.register_buffer("mean", torch.tensor(mean).view(-1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(-1, 1, 1))
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(int(torch.tensor(input_shape).prod()), width), nn.ReLU())
        self.out = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.out(self.body((x - self.mean) / self.std))

class Wide(Net):
    def __init__(self, **kwargs):
        self.kwargs = kwargs
        super().__init__((1, 8, 8), 10, (0.0,), (1.0,), **kwargs)

class LogSoftmax(nn.Module):
    def __init__(self, input_shape, num_classes):
        super().__init__()
        self.fc = nn.Linear(int(torch.tensor(input_shape).prod()), num_classes)

    def forward(self, x):
        return self.fc(x.flatten(1)).log_softmax(1)

class Convolutional(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.conv = nn.Conv2d(1, num_classes, 8)

    def forward(self, x):
        return self.conv(x).flatten(1)

class Unused(nn.Module):
    def __init__(self):
        super().__init__()
        self.used = nn.Linear(64, 10)
        self.spare = nn.Linear(64, 10)  # registered last, never called

    def forward(self, x):
        return self.used(x.flatten(1))

class Tabular(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 10)

    def forward(self, x):
        return self.fc(x)

class Strict(nn.Module):
    def __init__(self, depth):
        super().__init__()
        raise ValueError(f"depth {depth} is not supported")

NOT_A_MODEL = 3
'''


@pytest.fixture
def usermod(tmp_path, monkeypatch, request):
    """A module of SOURCE in the working folder, with a name of its own for each test."""
    name = "usermod_" + "".join(c if c.isalnum() else "_" for c in request.node.name)
    (tmp_path / f"{name}.py").write_text(SOURCE)
    monkeypatch.chdir(tmp_path)
    yield name
    sys.modules.pop(name, None)
    user_models._ALLOWED.difference_update({s for s in user_models._ALLOWED if s.startswith(name + ":")})


def create(spec, seed=0, **options):
    return models.create(spec, (1, 8, 8), 10, mean=0.3, std=0.4, seed=seed, options=options)


def test_the_constructor_receives_its_options_and_the_data_arguments_it_names(usermod):
    model = create(f"{usermod}:Net", width=7)
    assert model.received == {"input_shape": (1, 8, 8), "num_classes": 10, "mean": pytest.approx((0.3,)), "std": pytest.approx((0.4,)),
                              "width": 7}
    assert models.last_linear(model) is model.out and model.out.in_features == 7
    assert create(f"{usermod}:Wide", width=5).kwargs == {"width": 5}  # **kwargs only: no data argument


def test_the_weights_depend_on_the_seed_only_and_leave_the_global_state(usermod):
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    a, b, c = create(f"{usermod}:Net", seed=1), create(f"{usermod}:Net", seed=1), create(f"{usermod}:Net", seed=2)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.out.weight, c.out.weight)


@pytest.mark.parametrize("cls, options, message", [
    ("LogSoftmax", {}, "the outputs of {m}:LogSoftmax are not those of its last nn.Linear"),
    ("Convolutional", {}, "Convolutional has no nn.Linear layer"),
    ("Unused", {}, "{m}:Unused never calls its last nn.Linear (Linear(in_features=64, out_features=10, bias=True)) in forward()"),
    ("Tabular", {}, "{m}:Tabular does not take inputs of shape (1, 8, 8)"),
    ("Strict", {"depth": 3}, "constructing {m}:Strict(depth=3) failed (ValueError: depth 3 is not supported)"),
    ("Strict", {}, "constructing {m}:Strict() failed (TypeError"),
    ("Net", {"num_classes": 3}, "model option(s) ['num_classes'] of {m}:Net come from the data set"),
    ("Net", {"depth": 3}, "unknown model option(s) ['depth'] for {m}:Net: its constructor takes ['width']"),
    ("Nope", {}, "module {m} ({path}) has no Nope, named by the model '{m}:Nope': its nn.Module classes are Convolutional, LogSoftmax, Net, Strict, Tabular, Unused, Wide"),
    ("NOT_A_MODEL", {}, "{m}:NOT_A_MODEL is a int, not an nn.Module subclass"),
])
def test_each_bad_model_is_one_line_naming_the_fix(usermod, tmp_path, cls, options, message):
    with pytest.raises(PoisonReachError) as e:
        create(f"{usermod}:{cls}", **options)
    text = str(e.value)
    assert message.format(m=usermod, path=tmp_path / f"{usermod}.py") in text and "\n" not in text, text
    if "nn.Linear" in message:
        assert "τ and the attacks need the model's outputs to be the logits h = W·φ(x) + b of a last nn.Linear layer" in text


@pytest.mark.parametrize("source, message", [
    (None, "cannot import {m} for the model '{m}:Net': no module {m} in {cwd} or on PYTHONPATH"),
    ("import not_installed_anywhere\n", "importing {m} for the model '{m}:Net' failed: it imports not_installed_anywhere"),
    ("def broken(:\n", "importing {m} for the model '{m}:Net' failed (SyntaxError"),
    ("raise RuntimeError('no GPU')\n", "importing {m} for the model '{m}:Net' failed (RuntimeError: no GPU): fix the module"),
])
def test_a_module_that_does_not_import_is_one_line(source, message, tmp_path, monkeypatch, request):
    name = "broken_" + "".join(c if c.isalnum() else "_" for c in request.node.name)
    if source is not None:
        (tmp_path / f"{name}.py").write_text(source)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PoisonReachError) as e:
        models.check_name(f"{name}:Net")
    assert message.format(m=name, cwd=tmp_path) in str(e.value) and "\n" not in str(e.value)
    sys.modules.pop(name, None)


@pytest.mark.parametrize("spec", ["no spaces allowed:Net", "mod:", "mod:Not.A.Name", "1mod:Net"])
def test_a_malformed_spec_is_named(spec):
    with pytest.raises(PoisonReachError, match="neither a built-in name nor module.path:Class"):
        models.check_name(spec)


def test_a_built_in_model_takes_no_options():
    with pytest.raises(PoisonReachError, match=r"model options \['width'\] are for module.path:Class models; lr takes none"):
        models.create("lr", (1, 8, 8), 10, options={"width": 3})


def test_a_saved_user_model_reloads_from_its_spec_and_options_without_a_pickle(usermod, tmp_path):
    spec = f"{usermod}:Net"
    model = create(spec, seed=4, width=9)
    with torch.no_grad():
        model.out.bias.add_(1.0)  # trained weights, not the initial ones
    path = tmp_path / "model.pt"
    models.save_model(model, path, name=spec, input_shape=(1, 8, 8), num_classes=10, mean=0.3, std=0.4, options={"width": 9})
    saved = torch.load(path, weights_only=True)  # plain values and tensors only
    assert saved["spec"] == {"name": spec, "input_shape": [1, 8, 8], "num_classes": 10, "mean": pytest.approx(0.3), "std": pytest.approx(0.4),
                             "options": {"width": 9}}
    with pytest.raises(PoisonReachError, match=rf"holds a model of the user class {spec}, which rebuilding would import and run: "
                                               rf"call poisonreach.user_models.allow\('{spec}'\) first"):
        models.load_model(path)
    user_models.allow(spec)
    back = models.load_model(path)
    assert type(back).__name__ == "Net" and back.out.in_features == 9 and not back.training
    assert all(torch.equal(p, q) for p, q in zip(back.state_dict().values(), model.state_dict().values()))


def test_loading_never_imports_a_module_it_was_not_allowed(tmp_path, monkeypatch):
    """A model file names code; without allow() nothing of it is imported, let alone run."""
    (tmp_path / "canary_module.py").write_text(f"open({str(tmp_path / 'imported')!r}, 'w').close()\nfrom torch.nn import Linear as Net\n")
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "model.pt"
    torch.save({"format": models.FORMAT, "spec": {"name": "canary_module:Net", "input_shape": [4], "num_classes": 2, "mean": 0.0,
                                                   "std": 1.0, "options": {"in_features": 4, "out_features": 2}}, "state_dict": {}}, path)
    with pytest.raises(PoisonReachError, match="which rebuilding would import and run"):
        models.load_model(path)
    assert not (tmp_path / "imported").exists() and "canary_module" not in sys.modules


# every command, through the command line


def digits_npz(path):
    from sklearn.datasets import load_digits
    bunch = load_digits()
    np.savez(path, x=(bunch.images * 255 / 16).round().astype(np.uint8), y=bunch.target)
    return path


FAST = ["--train-size", "200", "--train-epochs", "3", "--threads", "1"]


def test_run_resume_tau_evaluate_and_defend_with_an_own_model_and_npz(usermod, tmp_path, capsys):
    data = f"npz:{digits_npz(tmp_path / 'digits.npz')}"
    own = ["--dataset", data, "--model", f"{usermod}:Net", "--model-option", "width=12"]
    argv = ["run", *own, *FAST, "--attack", "labelflip", "--eps-d", "0.1", "--out", "run", "--quiet"]
    assert main(argv) == 0, capsys.readouterr().err
    config = (tmp_path / "run" / "config.yaml").read_text()
    assert f"model: {usermod}:Net" in config and "width: 12" in config and f"dataset: {data}" in config
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    result = metrics["results"][0]
    assert 0 < metrics["clean_acc"] <= 100 and result["acc_drop"] == metrics["clean_acc"] - result["poisoned_acc"]
    capsys.readouterr()

    # resuming reads every model back (rebuilt from the spec and options the files record)
    assert main(argv[:-1]) == 0
    err = capsys.readouterr().err
    assert "resuming the run in run" in err
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["results"] == metrics["results"]
    # a different model option is a different run
    assert main([*argv[:6], "width=13", *argv[7:]]) == 2
    assert 'model_options: {"width": 12} there, {"width": 13} here' in capsys.readouterr().err

    assert main(["tau", *own, *FAST, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model"] == f"{usermod}:Net"
    # the run's own target file, rebuilt from its spec
    assert main(["tau", *own, *FAST, "--target-file", "run/target_model.pt"]) == 0
    capsys.readouterr()

    # the run's poisons evaluated and defended with the same model give the run's numbers
    assert main(["evaluate", "--poisons", "run/eps_d=0.1", *own, *FAST, "--out", "eval", "--quiet"]) == 0
    record = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert record["poisoned_acc_per_seed"] == [result["poisoned_acc"]] and record["clean_acc_per_seed"] == [metrics["clean_acc"]]
    assert main(["defend", "--poisons", "run/eps_d=0.1", *own, *FAST, "--defense", "maxup", "--option", "m=2", "--quiet"]) == 0
    assert main(["defend", "--run", "run", "--defense", "maxup", "--option", "m=2", "--quiet"]) == 0
    tables = capsys.readouterr().out.split("defense maxup")
    assert tables[1] == tables[2]


def test_a_sweep_cell_with_an_own_model(usermod, tmp_path, capsys):
    from poisonreach.experiments.sweep import run_sweep
    from poisonreach.experiments.sweep_file import parse_sweep

    doc = {"name": "own", "run": {"dataset": f"npz:{digits_npz(tmp_path / 'digits.npz')}", "train_size": 150, "eps_d": [0.1],
                                  "attack": "labelflip", "training": {"epochs": 2}},
           "grid": {"model+model_options": [[f"{usermod}:Net", {"width": 6}], [f"{usermod}:Net", {"width": 8}]]}}
    sweep = parse_sweep(doc, "test", lookup=None)
    rows = run_sweep(sweep, tmp_path / "sweep")
    assert [r["model"] for r in rows] == [f"{usermod}:Net"] * 2 and len({r["cell"] for r in rows}) == 2
    assert all(0 <= r["poisoned_acc"] <= 100 for r in rows)
    bad = {**doc, "grid": {"model": [f"{usermod}:Nope"]}}
    with pytest.raises(PoisonReachError, match="has no Nope"):
        parse_sweep(bad, "test", lookup=None)


def test_the_model_flags_have_help(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--model-option KEY=VALUE a constructor argument of a module.path:Class model" in text
    assert "npz:FILE (arrays x and y, optionally x_test and y_test) or folder:DIR" in text
    assert "your own nn.Module class as module.path:Class" in text


def test_models_are_plain_modules_at_the_boundary(usermod):
    model = create(f"{usermod}:Net")
    assert isinstance(model, nn.Module) and model(torch.rand(3, 1, 8, 8)).shape == (3, 10)
    # the last-layer check runs on any model, for the audit of a model built elsewhere
    models.check_last_linear(model, (1, 8, 8))
    with pytest.raises(PoisonReachError, match="not those of its last nn.Linear"):
        models.check_last_linear(nn.Sequential(nn.Flatten(), nn.Linear(64, 10), nn.Softmax(1)), (1, 8, 8))


def test_weights_trained_elsewhere_load_into_the_class_and_nothing_else(usermod, tmp_path):
    """What an audit of someone's model does: the class from its spec, the weights from a state-dict file."""
    trained = create(f"{usermod}:Net", seed=5, width=6)
    torch.save(trained.state_dict(), tmp_path / "weights.pt")
    fresh = models.load_weights(create(f"{usermod}:Net", seed=0, width=6), tmp_path / "weights.pt")
    assert all(torch.equal(p, q) for p, q in zip(fresh.parameters(), trained.parameters()))
    torch.save({"state_dict": trained.state_dict(), "epoch": 3}, tmp_path / "checkpoint.pt")
    assert torch.equal(models.load_weights(create(f"{usermod}:Net", width=6), tmp_path / "checkpoint.pt").out.bias, trained.out.bias)
    with pytest.raises(PoisonReachError, match=r"do not fit Net \(body.1.weight is \(6, 64\), not \(9, 64\); body.1.bias is \(6,\)"):
        models.load_weights(create(f"{usermod}:Net", width=9), tmp_path / "weights.pt")
    with pytest.raises(PoisonReachError, match=r"do not fit Sequential \(missing 0.weight; missing 0.bias; unexpected mean; 5 more\)"):
        models.load_weights(nn.Sequential(nn.Linear(64, 10)), tmp_path / "weights.pt")
    torch.save({"weights": [1, 2]}, tmp_path / "other.pt")
    with pytest.raises(PoisonReachError, match="holds no state dict of tensors"):
        models.load_weights(trained, tmp_path / "other.pt")


def test_a_pickled_model_is_refused_as_weights(usermod, tmp_path, canary):
    torch.save({"state_dict": {"out.bias": torch.zeros(10)}, "hook": canary}, tmp_path / "unsafe.pt")
    with pytest.raises(PoisonReachError, match="holds Python objects other than tensors"):
        models.load_weights(create(f"{usermod}:Net"), tmp_path / "unsafe.pt")
