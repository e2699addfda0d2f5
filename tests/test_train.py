"""The trainer: losses by hand, learning a separable problem, determinism, weight files."""

import pytest
import torch
from torch import nn

from diffeo_engine.data.scale_detection import ScaleDetection
from diffeo_engine.models import get_model
from diffeo_engine.models.train import evaluate, hinge_loss, load_weights, save_weights, train


def _separable(n=128, seed=0):
    """Gaussian points labelled by a hyperplane, those within 0.5 of it left out."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(4 * n, 5, generator=g)
    w = torch.tensor([1.0, -2.0, 0.5, 0.0, 1.5])
    X = X[(X @ w).abs() > 0.5][:n]
    return X, torch.where(X @ w > 0, 1.0, -1.0)


def _linear(seed=0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Linear(5, 1)


def test_hinge_loss_by_hand():
    out = torch.tensor([2.0, 0.5, -1.0, 0.0])
    y = torch.tensor([1.0, 1.0, 1.0, -1.0])
    assert float(hinge_loss(out, y)) == pytest.approx((0 + 0.5 + 2 + 1) / 4)
    assert float(hinge_loss(out[:, None], y)) == pytest.approx(3.5 / 4)


@pytest.mark.parametrize("loss", ["hinge", "cross_entropy"])
def test_train_reduces_loss_on_separable_problem(loss):
    X, y = _separable()
    if loss == "cross_entropy":
        model, targets = nn.Linear(5, 2), (y > 0).long()
    else:
        model, targets = _linear(), y
    before = evaluate(model, (X, targets), loss=loss)
    history = train(model, (X, targets), loss=loss, epochs=30, batch_size=16, lr=0.1, momentum=0.9)
    after = evaluate(model, (X, targets), loss=loss)
    assert after[0] < 0.25 * before[0]
    assert after[1] <= 0.02
    assert len(history.loss) == 30 and history.steps == 30 * 8 and history.stopped == "epochs"
    assert history.loss[-1] < history.loss[0]


def test_train_is_deterministic_and_leaves_global_rng():
    X, y = _separable()
    state = torch.random.get_rng_state()
    a, b = _linear(), _linear()
    ha = train(a, (X, y), steps=25, batch_size=10, lr=0.05, seed=4)
    hb = train(b, (X, y), steps=25, batch_size=10, lr=0.05, seed=4)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a.weight, b.weight) and ha.loss == hb.loss
    assert ha.steps == 25 and ha.stopped == "steps" and ha.epoch == [1, 2]  # 13 batches/epoch
    c = _linear()
    train(c, (X, y), steps=25, batch_size=10, lr=0.05, seed=5)
    assert not torch.equal(a.weight, c.weight)


def test_train_stop_loss_and_test_data():
    X, y = _separable(256)
    model = _linear()
    history = train(
        model,
        (X[:192], y[:192]),
        epochs=200,
        batch_size=16,
        lr=0.5,
        momentum=0.9,
        test_data=(X[192:], y[192:]),
        stop_loss=0.0,
        schedule="cosine",
    )
    assert history.stopped == "stop_loss" and history.loss[-1] == 0.0
    assert len(history.test_error) == len(history.loss)
    assert history.lr[-1] < 0.5


def test_train_scale_detection_dataset():
    data = ScaleDetection(16, 4, task=2, seed=0)
    model = get_model("scale_detection_cnn1d", seed=0, width=16, depth=4)
    history = train(model, data, epochs=3, batch_size=8, lr=0.05, momentum=0.9)
    assert len(history.loss) == 3 and history.loss[-1] < history.loss[0]


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_weights_round_trip(tmp_path, suffix):
    model = get_model("vgg11_bn", seed=0, width=4)
    model.train()(torch.randn(4, 3, 32, 32))  # moves the BatchNorm running statistics
    path = tmp_path / f"w{suffix}"
    kind = save_weights(model, path)
    assert kind == ("safetensors" if suffix == ".safetensors" else "torch")
    if kind == "torch":
        state = torch.load(path, weights_only=True)
        assert set(state) == set(model.state_dict())
    other = load_weights(get_model("vgg11_bn", seed=1, width=4), path)
    for (k, v), (k2, v2) in zip(model.state_dict().items(), other.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)


def test_bad_arguments():
    X, y = _separable(8)
    with pytest.raises(ValueError, match="loss"):
        train(_linear(), (X, y), loss="mse")
    with pytest.raises(ValueError, match="epochs, steps"):
        train(_linear(), (X, y), epochs=1, steps=1)
    with pytest.raises(ValueError, match="lr"):
        train(_linear(), (X, y), lr=0)
    with pytest.raises(ValueError, match="targets: the hinge loss expects labels"):
        train(_linear(), (X, (y > 0).float()))
    with pytest.raises(ValueError, match="targets: cross-entropy"):
        train(nn.Linear(5, 2), (X, y), loss="cross_entropy")
    with pytest.raises(TypeError, match="data"):
        train(_linear(), X)
    with pytest.raises(ValueError, match="data: expected as many"):
        train(_linear(), (X, y[:3]))
    with pytest.raises(ValueError, match="path"):
        load_weights(_linear(), "/nonexistent/file.pt")
    with pytest.raises(ValueError, match="format"):
        save_weights(_linear(), "x.bin", format="pickle")


def test_penalty_enters_the_gradient_not_the_recorded_loss():
    """One SGD step on a linear hinge model with a ridge term, against the step by hand."""
    X, y = _separable(8)
    model = _linear(3)
    w0, b0 = model.weight.detach().clone(), model.bias.detach().clone()
    ridge = 0.3

    def penalty(net):
        return ridge * net.weight.pow(2).sum()

    history = train(model, (X, y), steps=1, batch_size=8, lr=0.1, penalty=penalty, seed=0)
    # the step by hand (one batch of all 8 samples: the order does not change the mean)
    w, b = w0.clone().requires_grad_(), b0.clone().requires_grad_()
    hinge = torch.relu(1 - (X @ w[0] + b[0]) * y).mean()
    (hinge + ridge * w.pow(2).sum()).backward()
    assert torch.allclose(model.weight, w0 - 0.1 * w.grad, atol=1e-6)
    assert torch.allclose(model.bias, b0 - 0.1 * b.grad, atol=1e-6)
    assert history.loss[0] == pytest.approx(float(hinge.detach()), rel=1e-5)  # without the penalty
    assert history.penalty[0] == pytest.approx(ridge * float(w0.pow(2).sum()), rel=1e-5)


def test_post_interpolation_trains_on_after_the_loss_vanishes():
    X, y = _separable(256)
    kw = dict(epochs=200, batch_size=16, lr=0.5, momentum=0.9, seed=2, stop_loss=0.0)
    first = train(_linear(), (X, y), **kw)
    n_star = first.interpolation_epoch
    assert first.stopped == "stop_loss" and len(first.loss) == n_star and n_star >= 1
    later = train(_linear(), (X, y), post_interpolation=3.0, **kw)
    assert later.interpolation_epoch == n_star  # the same run up to there
    assert later.loss[:n_star] == first.loss
    # stops at the first epoch >= 3 n* whose loss is zero
    zero = [e for e, v in zip(later.epoch, later.loss) if v == 0.0 and e >= 3 * n_star]
    assert later.stopped == "stop_loss" and later.epoch[-1] == zero[0]
    with pytest.raises(ValueError, match="post_interpolation"):
        train(_linear(), (X, y), post_interpolation=2.0)


def test_keep_best_restores_the_best_test_epoch():
    X, y = _separable(256, seed=5)
    test = (X[192:], y[192:])
    snapshots = []

    def remember(record):
        snapshots.append(record["test_error"])

    model = _linear(1)
    history = train(model, (X[:192], y[:192]), epochs=8, batch_size=16, lr=2.0, seed=1,
                    test_data=test, keep_best=True, callback=remember)  # fmt: skip
    best = min(range(len(snapshots)), key=lambda i: (snapshots[i], i))
    assert history.best_epoch == best + 1
    assert evaluate(model, test)[1] == pytest.approx(snapshots[best])
    with pytest.raises(ValueError, match="keep_best"):
        train(_linear(), (X, y), keep_best=True)


def test_adam_optimizer_matches_torch_adam():
    X, y = _separable(32)
    a, b = _linear(7), _linear(7)
    train(a, (X, y), steps=3, batch_size=32, lr=0.01, optimizer="adam", seed=0)
    opt = torch.optim.Adam(b.parameters(), lr=0.01)
    for _ in range(3):  # one batch of all samples per step
        opt.zero_grad()
        hinge_loss(b(X), y).backward()
        opt.step()
    assert torch.allclose(a.weight, b.weight, atol=1e-6)
    with pytest.raises(ValueError, match="optimizer"):
        train(_linear(), (X, y), optimizer="rmsprop")
    with pytest.raises(ValueError, match="momentum"):
        train(_linear(), (X, y), optimizer="adam", momentum=0.9)


def test_decay_parameters_limit_the_weight_decay():
    X, y = _separable(16)
    model = nn.Sequential(nn.Linear(5, 3), nn.ReLU(), nn.Linear(3, 1))
    with torch.no_grad():
        model[2].weight.fill_(0.0)  # no gradient reaches the first layer: decay alone
    before = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    train(model, (X, y[:, None].squeeze(1)), steps=1, batch_size=16, lr=0.5, weight_decay=0.2,
          decay_parameters=[model[0].weight], seed=0)  # fmt: skip
    assert torch.allclose(model[0].weight, before[0] * (1 - 0.5 * 0.2), atol=1e-7)
    assert torch.equal(model[0].bias, before[1])  # not decayed, no gradient
    with pytest.raises(ValueError, match="decay_parameters"):
        train(model, (X, y), decay_parameters=[nn.Parameter(torch.zeros(2))])
