import pytest
import torch
from torch import nn

from poisonreach import models
from poisonreach.errors import PoisonReachError

# Small inputs per model: enough to exercise every layer, fast on one core.
SHAPES = {
    "lr": (1, 8, 8),
    "linreg": (5,),
    "nn": (1, 8, 8),
    "cnn": (1, 8, 8),
    "resnet18": (3, 16, 16),
    "resnet34": (3, 16, 16),
}


def params(model):
    return [p.detach().clone() for p in model.parameters()]


def same(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def test_names_cover_the_paper_models():
    assert models.names() == sorted(SHAPES)


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_forward_shape_and_last_layer_contract(name):
    shape = SHAPES[name]
    model = models.create(name, shape, 10).eval()
    x = torch.rand(2, *shape)
    out = model(x)
    phi = model.features(x)
    assert out.shape == (2, 1 if name == "linreg" else 10)
    assert phi.shape == (2, model.head.in_features)
    assert models.last_linear(model) is model.head
    torch.testing.assert_close(model.head(phi), out, rtol=0, atol=0)
    torch.testing.assert_close(models.features(model, x), phi, rtol=0, atol=0)


@pytest.mark.parametrize(
    "name, num_classes, outputs", [("lr", 2, 1), ("lr", 10, 10), ("linreg", 1, 1), ("nn", 2, 2), ("cnn", 2, 2)]
)
def test_number_of_outputs(name, num_classes, outputs):
    assert models.create(name, SHAPES[name], num_classes).head.out_features == outputs


def test_architectures_follow_the_paper():
    net = models.create("nn", (1, 28, 28), 10)
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(784, 784), (784, 784), (784, 10)]
    assert all(m.negative_slope == 0.2 for m in net.modules() if isinstance(m, nn.LeakyReLU))
    # The PyTorch MNIST example flattens 64 × 12 × 12 = 9216 features on 28 × 28 inputs.
    cnn = models.create("cnn", (1, 28, 28), 10)
    assert [m.in_features for m in cnn.modules() if isinstance(m, nn.Linear)] == [9216, 128]
    lr = models.create("lr", (1, 28, 28), 10)
    torch.testing.assert_close(lr.features(torch.ones(1, 1, 28, 28)), torch.ones(1, 784))
    resnet = models.create("resnet18", (3, 32, 32), 10)
    assert sum(p.numel() for p in resnet.parameters()) == 11_173_962  # the usual CIFAR ResNet-18


@pytest.mark.parametrize("name", ["lr", "nn", "cnn", "resnet18"])
def test_seed_decides_the_initial_weights(name):
    a = models.create(name, SHAPES[name], 10, seed=3)
    b = models.create(name, SHAPES[name], 10, seed=3)
    c = models.create(name, SHAPES[name], 10, seed=4)
    assert same(params(a), params(b))
    assert not same(params(a), params(c))


def test_create_leaves_the_global_rng_alone():
    state = torch.get_rng_state()
    models.create("cnn", (1, 8, 8), 10, seed=5)
    assert torch.equal(torch.get_rng_state(), state)


def test_normalisation_happens_inside_the_model():
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 2.0)
    x = torch.rand(2, 3, 16, 16)
    scaled = models.create("resnet18", (3, 16, 16), 4, mean=mean, std=std).eval()
    plain = models.create("resnet18", (3, 16, 16), 4).eval()
    normalised = (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    torch.testing.assert_close(scaled(x), plain(normalised))

    tab_mean, tab_std = torch.arange(5.0), torch.full((5,), 3.0)
    z = torch.rand(4, 5)
    tab = models.create("linreg", (5,), 1, mean=tab_mean, std=tab_std)
    torch.testing.assert_close(tab.features(z), (z - tab_mean) / tab_std)


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        (("vgg", (1, 8, 8), 10), {}, "unknown model 'vgg'.*lr"),
        (("cnn", (64,), 10), {}, "cnn needs images"),
        (("resnet18", (64,), 10), {}, "resnet18 needs images"),
        (("cnn", (1, 4, 4), 10), {}, "at least 6"),
        (("lr", (0, 8, 8), 10), {}, "input_shape"),
        (("lr", (8, 8), 10), {}, "input_shape"),
        (("lr", (2.5,), 10), {}, "input_shape"),
        (("lr", 784, 10), {}, "input_shape"),
        (("lr", (1, 8, 8), 0), {}, "num_classes"),
        (("lr", (1, 8, 8), 10), {"mean": (0.1, 0.2)}, "mean has 2 values"),
        (("lr", (1, 8, 8), 10), {"std": 0.0}, "std must be finite and positive"),
        (("lr", (1, 8, 8), 10), {"std": "x"}, "std must be a number"),
        (("lr", (1, 8, 8), 10), {"seed": 1.5}, "seed"),
    ],
)
def test_bad_arguments_raise(args, kwargs, match):
    with pytest.raises(PoisonReachError, match=match):
        models.create(*args, **kwargs)


def test_last_linear_and_features_on_a_user_model():
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3)).eval()
    x = torch.rand(5, 2, 3, requires_grad=True)
    assert models.last_linear(model) is model[3]
    phi = models.features(model, x)
    torch.testing.assert_close(phi, model[2](model[1](model[0](x))))
    phi.sum().backward()  # the graph back to the inputs is kept: attacks differentiate through φ
    assert x.grad is not None
    assert not model[3]._forward_hooks  # the hook is removed


def test_features_ignores_a_features_trunk_without_head():
    class Like(nn.Module):  # torchvision's VGG: .features is the conv trunk, not φ
        def __init__(self):
            super().__init__()
            self.features = nn.Linear(3, 4)
            self.classifier = nn.Linear(4, 2)

        def forward(self, x):
            return self.classifier(torch.relu(self.features(x)))

    model = Like()
    x = torch.rand(2, 3)
    torch.testing.assert_close(models.features(model, x), torch.relu(model.features(x)))


def test_last_linear_errors():
    with pytest.raises(PoisonReachError, match="no nn.Linear"):
        models.last_linear(nn.Sequential(nn.Conv2d(1, 2, 3)))

    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.spare = nn.Linear(2, 2)

        def forward(self, x):
            return x

    with pytest.raises(PoisonReachError, match="not used in forward"):
        models.features(Unused(), torch.rand(1, 2))


def test_save_load_round_trip(tmp_path):
    spec = dict(name="cnn", input_shape=(3, 8, 8), num_classes=5, mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.4))
    model = models.create(spec["name"], spec["input_shape"], spec["num_classes"], mean=spec["mean"], std=spec["std"])
    with torch.no_grad():
        model.head.weight.add_(1.0)  # differs from any freshly created model
    path = tmp_path / "sub" / "model.pt"
    models.save_model(model, path, **spec)
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.pt"]  # no temporary file left

    raw = torch.load(path, weights_only=True)
    assert raw["spec"] == {
        "name": "cnn", "input_shape": [3, 8, 8], "num_classes": 5,
        "mean": pytest.approx([0.4, 0.5, 0.6]), "std": pytest.approx([0.2, 0.3, 0.4]),
    }
    loaded = models.load_model(path)
    assert not loaded.training
    x = torch.rand(4, 3, 8, 8)
    torch.testing.assert_close(loaded(x), model.eval()(x), rtol=0, atol=0)


def test_save_rejects_a_spec_that_does_not_match(tmp_path):
    model = models.create("lr", (1, 8, 8), 10)
    with pytest.raises(PoisonReachError, match="does not match"):
        models.save_model(model, tmp_path / "m.pt", name="lr", input_shape=(1, 8, 8), num_classes=2, mean=0, std=1)
    assert not list(tmp_path.iterdir())


def test_load_errors_name_the_path(tmp_path):
    missing = tmp_path / "missing.pt"
    with pytest.raises(PoisonReachError, match="missing.pt"):
        models.load_model(missing)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a model")
    with pytest.raises(PoisonReachError, match="garbage.pt"):
        models.load_model(garbage)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(PoisonReachError, match="foreign.pt"):
        models.load_model(foreign)
    bad_spec = tmp_path / "bad_spec.pt"
    torch.save({"format": models.FORMAT, "spec": {"name": "lr"}, "state_dict": {}}, bad_spec)
    with pytest.raises(PoisonReachError, match="bad_spec.pt"):
        models.load_model(bad_spec)
