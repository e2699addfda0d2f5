"""The model registry and the papers' networks, checked against hand computations."""

import fnmatch
import importlib.util
import math

import pytest
import torch
from torch import nn

from diffeo_engine.models import ConstantFilterCNN, ScaleDetectionCNN, get_model, list_models
from diffeo_engine.models.registry import register_model

IMAGE_MODELS = ["fcn", "fcn_ntk", "lenet", "alexnet"] + [
    f"vgg{d}{bn}" for d in (11, 13, 16, 19) for bn in ("", "_bn")
] + ["resnet18", "resnet34", "resnet50"]  # fmt: skip
SIZED = {"fcn", "fcn_ntk", "lenet", "alexnet"}  # these need input_size


def test_registry_lists_every_family():
    names = list_models()
    assert names == sorted(names)
    for name in [*IMAGE_MODELS, "constant_filter_cnn", "scale_detection_cnn1d"]:
        assert name in names
    assert "scale_detection_cnn2d" in names
    assert list_models("vgg*_bn") == ["vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn"]


@pytest.mark.parametrize("name", IMAGE_MODELS)
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_image_models_forward(name, shape):
    kwargs = dict(in_channels=shape[0], num_classes=7)
    if name in SIZED:
        kwargs["input_size"] = shape[1]
    if name.startswith(("vgg", "resnet")):
        kwargs["width"] = 8  # a thin net: same graph, fast
    model = get_model(name, seed=0, **kwargs).eval()
    with torch.no_grad():
        out = model(torch.randn(2, *shape))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


def test_layer_names_are_meaningful_and_relus_not_shared():
    vgg = get_model("vgg11_bn", width=8)
    names = dict(vgg.named_modules())
    assert isinstance(names["features.0"], nn.Conv2d)
    assert isinstance(names["features.1"], nn.BatchNorm2d)
    assert isinstance(names["features.2"], nn.ReLU)
    resnet = get_model("resnet18", width=8)
    names = dict(resnet.named_modules())
    assert {"layer1.0", "layer4.1", "layer1.0.relu1", "fc"} <= set(names)
    assert fnmatch.filter(names, "layer?.?") == [
        f"layer{i}.{j}" for i in range(1, 5) for j in (0, 1)
    ]
    # every module appears once: a hook on any fires once per forward
    ids = [id(m) for _, m in resnet.named_modules(remove_duplicate=False)]
    assert len(ids) == len(set(ids))
    calls = []
    resnet.layer1[0].relu1.register_forward_hook(lambda *a: calls.append(1))
    resnet.eval()(torch.randn(1, 3, 32, 32))
    assert len(calls) == 1


def test_seed_makes_weights_reproducible_without_touching_global_rng():
    state = torch.random.get_rng_state()
    a = get_model("lenet", seed=5)
    b = get_model("lenet", seed=5)
    c = get_model("lenet", seed=6)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a.features[0].weight, b.features[0].weight)
    assert not torch.equal(a.features[0].weight, c.features[0].weight)


# ----------------------------------------------------------------------------- constant filter


def _one_hot(L, p):
    x = torch.zeros(1, 1, L, dtype=torch.float64)
    x[0, 0, p] = 1.0
    return x


@pytest.mark.parametrize("p", [0, 5, 37, 63])
def test_constant_filter_stride2_sums_blocks(p):
    """f = s = 2: weights 1, layer k holds the one-hot at p // 2^k (value 1)."""
    L, depth = 64, 6
    net = ConstantFilterCNN(depth, 2, 2).double()
    x = _one_hot(L, p)
    h = net.input_relu(x)
    for k, layer in enumerate(net.features, start=1):
        h = layer(h)
        expected = torch.zeros(L // 2**k, dtype=torch.float64)
        expected[p // 2**k] = 1.0
        assert torch.equal(h[0, 0], expected)


@pytest.mark.parametrize("p", [0, 10, 31])
def test_constant_filter_stride1_is_binomial(p):
    """f = 2, s = 1, weights 1/2, circular: out_k[i] = 2^-k sum_j C(k, j) [i + j = p mod L]."""
    L, depth = 32, 5
    net = ConstantFilterCNN(depth, 2, 1).double()
    h = _one_hot(L, p)
    for k, layer in enumerate(net.features, start=1):
        h = layer(h)
        expected = torch.zeros(L, dtype=torch.float64)
        for i in range(L):
            for j in range(k + 1):
                if (i + j) % L == p:
                    expected[i] += math.comb(k, j) / 2**k
        torch.testing.assert_close(h[0, 0], expected, rtol=0, atol=1e-15)


def test_constant_filter_weights_and_input_relu():
    net = get_model("constant_filter_cnn", depth=3, filter_size=4, stride=2)
    for layer in net.features:
        assert torch.equal(layer.weight, torch.full((1, 1, 4), 0.5))
        assert not layer.weight.requires_grad
    x = torch.tensor([[[1.0, -2.0, 3.0, -4.0, 0.5, -0.5, 2.0, 1.0]]])
    torch.testing.assert_close(net(x), net(x.clamp(min=0)))  # the input ReLU rectifies
    plain = get_model("constant_filter_cnn", depth=1, filter_size=2, stride=2, rectify_input=False)
    y = plain(x)  # relu((x0 + x1) * 1)
    torch.testing.assert_close(y, torch.tensor([[[0.0, 0.0, 0.0, 3.0]]]))
    assert net(torch.zeros(2, 1, 8)).shape == (2, 1, 1)
    assert get_model("constant_filter_cnn", depth=2, padding="none")(torch.ones(1, 1, 9)).shape == (
        1,
        1,
        2,
    )


# ----------------------------------------------------------------------------- scale detection


@pytest.mark.parametrize("dim", [1, 2])
@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_scale_detection_cnn_shapes_and_layer(dim, activation):
    name = f"scale_detection_cnn{dim}d"
    net = get_model(name, seed=0, width=8, depth=4, activation=activation)
    L = 32
    x = torch.randn(3, 1, *(L,) * dim)
    assert net(x).shape == (3,)
    # one layer by hand: circular pad (0 left, 1 right), conv / sqrt(fan_in) + b, gain * act
    layer = net.features[0]
    pad = (0, 1) * dim
    xp = torch.nn.functional.pad(x, pad, mode="circular")
    conv = torch.nn.functional.conv1d if dim == 1 else torch.nn.functional.conv2d
    fan_in = 2**dim
    pre = conv(xp, layer.weight / math.sqrt(fan_in), layer.bias, stride=2)
    act = torch.relu if activation == "relu" else torch.tanh
    gain = math.sqrt(2) if activation == "relu" else 1.7159
    torch.testing.assert_close(layer(x), gain * act(pre))
    assert layer(x).shape == (3, 8, *(L // 2,) * dim)
    multi = get_model(name, width=8, depth=2, out_dim=3, readout="mean_field", pooling="max")
    assert multi(x).shape == (3, 3)


def test_mean_field_readout():
    net = ScaleDetectionCNN(1, width=6, depth=2, readout="mean_field", alpha=0.5)
    x = torch.randn(4, 1, 16)
    y = net.pool(net.features(x)).flatten(1)
    expected = 0.5 * (y @ net.readout.beta / 6 + net.readout.bias)
    torch.testing.assert_close(net(x), expected[:, 0])


# ----------------------------------------------------------------------------- validation


def test_unknown_name_lists_available():
    with pytest.raises(ValueError, match="unknown model 'vgg12'.*available: .*vgg11"):
        get_model("vgg12")
    with pytest.raises(TypeError, match="name"):
        get_model(3)
    with pytest.raises(ValueError, match="name"):
        get_model("keras:resnet")


def test_bad_arguments_name_the_argument():
    with pytest.raises(TypeError, match="depht: not an argument of model 'vgg11'"):
        get_model("vgg11", depht=3)
    with pytest.raises(ValueError, match="activation"):
        get_model("scale_detection_cnn1d", activation="gelu")
    with pytest.raises(TypeError, match="width"):
        get_model("scale_detection_cnn1d", width=2.5)
    with pytest.raises(ValueError, match="depth"):
        get_model("constant_filter_cnn", depth=0)
    with pytest.raises(ValueError, match="input_size"):
        get_model("lenet", input_size=8)
    with pytest.raises(ValueError, match="seed"):
        get_model("lenet", seed=-1)
    with pytest.raises(ValueError, match="x: expected"):
        get_model("constant_filter_cnn")(torch.zeros(2, 8))


def test_register_model():
    @register_model("_test_tiny")
    def tiny(width: int = 2):
        return nn.Linear(width, 1)

    assert "_test_tiny" in list_models()
    assert get_model("_test_tiny", width=3).in_features == 3
    with pytest.raises(ValueError, match="already registered"):
        register_model("_test_tiny")(lambda: nn.Identity())
    with pytest.raises(ValueError, match="name"):
        register_model("a:b")(tiny)


@pytest.mark.parametrize("package", ["torchvision", "timm"])
def test_external_packages(package):
    if importlib.util.find_spec(package) is None:
        with pytest.raises(ImportError, match=f"pip install {package}"):
            get_model(f"{package}:resnet18")
    else:  # built without weights: nothing is downloaded
        model = get_model(f"{package}:resnet18", num_classes=3)
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3)


class _AuthorsBlock(nn.Module):
    """Port of the authors' ``ConvBlockNT_1d`` (UmbertoTomasini/scale_detection_1d)."""

    def __init__(self, input_ch, h, filter_size, stride):
        super().__init__()
        self.w = nn.Parameter(torch.randn(h, input_ch, filter_size))
        self.b = nn.Parameter(torch.randn(h))
        self.stride, self.f = stride, filter_size
        if filter_size % 2:
            self.left = self.right = (filter_size - 1) // 2
        else:
            self.left, self.right = filter_size // 2 - 1, filter_size // 2

    def forward(self, x):
        y = torch.nn.functional.pad(x, (self.left, self.right), mode="circular")
        y = torch.nn.functional.conv1d(y, self.w / self.w[0].numel() ** 0.5, bias=self.b,
                                       stride=self.stride)  # fmt: skip
        return self.f**0.5 * torch.relu(y)


class _AuthorsNet(nn.Module):
    """Port of the authors' ``ConvNetGAPMF_1d``, strides chosen by ``idx_strides``."""

    def __init__(self, alpha_tilde, n_blocks, input_ch, h, idx_strides, filter_size, stride_int):
        super().__init__()
        bb, blocks = 0, []
        for aa in range(1, n_blocks):
            if aa == idx_strides[bb]:
                blocks.append(_AuthorsBlock(h, h, filter_size, stride_int))
                if bb < len(idx_strides) - 1:
                    bb += 1
            else:
                blocks.append(_AuthorsBlock(h, h, filter_size, 1))
        self.conv = nn.Sequential(_AuthorsBlock(input_ch, h, filter_size, stride_int), *blocks)
        self.beta = nn.Parameter(torch.randn(h, 1))
        self.alpha_tilde = alpha_tilde
        self.biasFinal = nn.Parameter(torch.randn(1))

    def forward(self, x):
        y = self.conv(x).mean(dim=-1)
        return (self.biasFinal + (y @ self.beta) / self.beta.size(0)) * self.alpha_tilde


@pytest.mark.parametrize("strided", ["first", "all"])
def test_scale_detection_cnn_equals_port_of_authors_net(strided):
    depth, width = 5, 6
    # the released scripts pass idx_strides = list(range(nbl)): only the first layer strides
    idx = list(range(depth)) if strided == "first" else list(range(1, depth))
    theirs = _AuthorsNet(1.0, depth, 1, width, idx, 2, 2).double()
    ours = ScaleDetectionCNN(1, width=width, depth=depth, readout="mean_field",
                             strided=strided).double()  # fmt: skip
    with torch.no_grad():
        for mine, block in zip(ours.features, theirs.conv):
            mine.weight.copy_(block.w)
            mine.bias.copy_(block.b)
        ours.readout.beta.copy_(theirs.beta)
        ours.readout.bias.copy_(theirs.biasFinal)
        x = torch.randn(7, 1, 64, dtype=torch.float64)
        strides = [layer.stride for layer in ours.features]
        assert strides == ([2] + [1] * (depth - 1) if strided == "first" else [2] * depth)
        assert torch.allclose(ours(x), theirs(x)[:, 0], rtol=1e-12, atol=1e-12)


def test_pooling_cnn_pair_has_the_same_weights_and_output():
    pool = get_model("pooling_cnn", seed=3, downsample="pool")
    stride = get_model("pooling_cnn", seed=3, downsample="stride")
    for a, b in zip(pool.parameters(), stride.parameters()):
        assert torch.equal(a, b)  # same seed, same shapes: the nets differ only in downsampling
    x = torch.randn(2, 1, 28, 28)
    assert pool(x).shape == stride(x).shape == (2, 10)
    relus = [n for n, m in pool.named_modules() if isinstance(m, nn.ReLU)]
    assert relus == ["features.1", "features.4", "features.7"]
    assert [m.stride for m in stride.features if isinstance(m, nn.Conv2d)] == [(2, 2)] * 3
    with pytest.raises(ValueError, match="downsample"):
        get_model("pooling_cnn", downsample="avg")


class _AuthorsDenseBlock(nn.Module):
    """Port of Petrini et al.'s ``DenseBlock`` (leonardopetrini/diffeo-sota,
    ``models/simplenets.py``), for the comparison only."""

    def __init__(self, input_dim, h, last=False):
        super().__init__()
        self.w = nn.Parameter(torch.randn(input_dim, h))
        self.b = nn.Parameter(torch.randn(h))
        self.last = last

    def forward(self, x):
        x = torch.flatten(x, start_dim=1)
        input_dim = x.size(1)
        if self.last:
            return x @ self.w / input_dim
        return torch.relu(x @ self.w / input_dim**0.5 + self.b)


def test_fcn_ntk_equals_port_of_authors_densenet_l4():
    seed = int(torch.randint(0, 2**20, ()).item())
    torch.manual_seed(seed)
    theirs = nn.Sequential(
        _AuthorsDenseBlock(784, 64), _AuthorsDenseBlock(64, 64), _AuthorsDenseBlock(64, 64),
        _AuthorsDenseBlock(64, 10, last=True),
    ).double()  # fmt: skip
    ours = get_model("fcn_ntk", seed=seed + 1).double()
    dense = [m for m in ours.modules() if type(m).__name__ == "NTKDense"]
    assert len(dense) == 4 and ours.classifier.bias is None
    with torch.no_grad():
        for mine, block in zip(dense, theirs):
            mine.weight.copy_(block.w)
            if mine.bias is not None:
                mine.bias.copy_(block.b)
        x = torch.rand(5, 1, 28, 28, dtype=torch.float64)
        assert torch.allclose(ours(x), theirs(x), rtol=1e-12, atol=1e-12)
    # drawn N(0, 1), as theirs: the scaling is in the forward pass
    big = get_model("fcn_ntk", seed=seed, width=512)
    w = big.features[2].weight.detach()
    assert abs(float(w.std()) - 1) < 0.02 and abs(float(w.mean())) < 0.02


def test_weight_norm_penalty_equals_port_of_authors_w_norm():
    from diffeo_engine.models.scale_detection import weight_norm_penalty

    def w_norm(weights, p, H, nbl):  # port of ScaleDetection_SGD.py's w_norm
        nrm = 0.0
        for par in weights:
            nrm += par.abs().pow(p).sum()
        return nrm / ((H ** (p / 2)) * nbl)

    seed = int(torch.randint(0, 2**20, ()).item())
    for width, depth, p in ((6, 5, 2), (9, 3, 1)):
        net = get_model("scale_detection_cnn1d", seed=seed, width=width, depth=depth,
                        readout="mean_field").double()  # fmt: skip
        expected = w_norm([layer.weight for layer in net.features], p, width, depth)
        got = weight_norm_penalty(net, p)
        assert math.isclose(float(got.detach()), float(expected.detach()), rel_tol=1e-12)
        got.backward()  # a term of the loss: its gradient reaches the weights only
        grad = net.features[1].weight.grad
        if p == 2:
            expected_grad = 2 * net.features[1].weight / (width * depth)
            assert torch.allclose(grad, expected_grad, rtol=1e-12)
        assert net.features[1].bias.grad is None and net.readout.beta.grad is None
    with pytest.raises(TypeError, match="model"):
        weight_norm_penalty(nn.Linear(2, 2))
