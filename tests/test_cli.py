"""The command line as a new user meets it: one-line errors with the right exit status,
pictures that are written and show something, and a --help that does not load torch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from diffeo_engine import cli

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def run_cli(argv, capsys):
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line(err: str, *words: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for word in words:
        assert word in lines[0], lines[0]


@pytest.fixture
def mnist_like(tmp_path) -> Path:
    """Twelve 28x28 grey uint8 images in a .npy (MNIST's shape), a smooth random pattern."""
    g = torch.Generator().manual_seed(3)
    small = torch.rand(12, 1, 7, 7, generator=g)
    images = torch.nn.functional.interpolate(small, size=(28, 28), mode="bilinear")
    path = tmp_path / "mnist_like.npy"
    np.save(path, (images[:, 0] * 255).round().to(torch.uint8).numpy())
    return path


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")


@pytest.mark.parametrize(
    ("argv", "code", "words"),
    [
        (["demo", "--device", "gpu"], 2, ["--device", "'gpu'", "cuda"]),
        pytest.param(["demo", "--device", "cuda"], 2, ["--device", "CUDA"], marks=NO_CUDA),
        pytest.param(["bench", "--device", "cuda"], 2, ["--device", "CUDA"], marks=NO_CUDA),
        pytest.param(["reproduce", "--device", "cuda"], 2, ["CUDA"], marks=NO_CUDA),
        pytest.param(
            ["sensitivity", "--model", "lenet", "--data", "x.npy", "--device", "cuda"],
            2,
            ["CUDA"],
            marks=NO_CUDA,
        ),
        pytest.param(
            ["generate", "--input", "x.npy", "--out", "g", "--device", "cuda"],
            2,
            ["CUDA"],
            marks=NO_CUDA,
        ),
        pytest.param(["verify", "g", "--device", "cuda"], 2, ["CUDA"], marks=NO_CUDA),
        pytest.param(
            ["show", "x.png", "--out", "s.png", "--device", "cuda"], 2, ["CUDA"], marks=NO_CUDA
        ),
        (["reproduce", "--device", "gpu"], 2, ["'gpu'"]),
        (["bench", "--device", "gpu"], 2, ["'gpu'"]),
        (["show", "x.png", "--out", "s.png", "--device", "gpu"], 2, ["'gpu'"]),
        (["demo", "--batch-size", "0"], 2, ["--batch-size"]),
        (["demo", "--cut", "abc"], 2, ["--cut"]),
        (["demo", "--cut", "1"], 2, ["cut"]),
        (["demo", "--T", "1e30"], 2, ["T: 1e+30", "displacement"]),
        (["demo", "--T", "1e39"], 2, ["T"]),
        (["demo", "--out", "picture.txt"], 2, ["--out", ".png"]),
        (["show", "missing.png", "--out", "s.png"], 2, ["missing.png"]),
        (["show", "--out", "s.png"], 2, ["required"]),
        (["nosuch"], 2, ["invalid choice"]),
        (["sensitivity", "--data", "x.npy"], 2, ["--model"]),
    ],
)
def test_bad_input_is_one_line_with_exit_status_2(argv, code, words, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    got, out, err = run_cli(argv, capsys)
    assert got == code
    assert_one_line(err, *words)
    assert out == ""
    assert not any(p.name.endswith((".png", ".txt")) for p in tmp_path.iterdir())


def sensitivity_argv(data, out, *extra):
    return ["sensitivity", "--model", "lenet", "--data", data, "--out", out, "--no-progress",
            "--no-plot", "--batch-size", "6", *extra]  # fmt: skip


def test_sensitivity_refuses_an_out_that_is_a_file_before_any_work(mnist_like, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.write_text("keep me")
    code, out, err = run_cli(sensitivity_argv(mnist_like, taken), capsys)
    assert code == 2
    assert_one_line(err, "--out", "not a folder")
    assert out == "" and taken.read_text() == "keep me"  # nothing measured, nothing written


@pytest.mark.parametrize(
    "argv",
    [
        ["reproduce", "--quick", "--out", "{file}"],
        ["generate", "--input", "{file}", "--out", "{file}", "--T", "0.001", "--cut", "3",
         "--per-image", "1", "--seed", "0"],
        ["bench", "--smoke", "--out", "{file}/inside.json"],
        ["demo", "--out", "{file}/d.png"],
        ["demo", "--out", "{folder}"],
    ],
)  # fmt: skip
def test_every_output_path_is_checked_before_any_work(argv, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.write_text("keep me")
    argv = [a.format(file=taken, folder=tmp_path) for a in argv]
    code, out, err = run_cli(argv, capsys)
    assert code == 2 and out == ""
    assert_one_line(err, "--out")
    assert taken.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--dist-timeout", "-5"], ["--dist-timeout", "-5"]),
        (["--noise", "abc"], ["--noise", "'abc'"]),
        (["--batch-size", "0"], ["--batch-size"]),
    ],
)
def test_sensitivity_bad_flags_are_one_line(mnist_like, tmp_path, capsys, extra, words):
    code, out, err = run_cli(sensitivity_argv(mnist_like, tmp_path / "o", *extra), capsys)
    assert code == 2 and out == ""
    assert_one_line(err, *words)
    assert not (tmp_path / "o").exists()


def test_sensitivity_weights_that_are_not_a_state_dict(mnist_like, tmp_path, capsys):
    pickled = tmp_path / "object.pt"
    torch.save({"net": torch.nn.Linear(2, 2)}, pickled)  # a module, not tensors: unpickling
    listed = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], listed)
    for path in (pickled, listed):
        code, _, err = run_cli(
            sensitivity_argv(mnist_like, tmp_path / "o", "--weights", path), capsys
        )
        assert code == 2
        assert_one_line(err, "--weights", str(path))


@pytest.mark.skipif(
    __import__("importlib").util.find_spec("timm") is not None, reason="timm is installed"
)
def test_timm_model_without_timm_is_one_line(mnist_like, tmp_path, capsys):
    code, _, err = run_cli(
        ["sensitivity", "--model", "timm:resnet18", "--data", mnist_like, "--out", tmp_path / "o"],
        capsys,
    )
    assert code == 2
    assert_one_line(err, "timm", "pip install timm")


@pytest.mark.slow
def test_lenet_on_mnist_needs_no_model_args_and_says_it_is_untrained(mnist_like, tmp_path, capsys):
    code, out, err = run_cli(sensitivity_argv(mnist_like, tmp_path / "o", "--limit", "6"), capsys)
    assert code == 0, err
    assert "in_channels=1, input_size=28" in err
    assert "untrained lenet" in err
    assert "6 images for 10 jackknife groups" in err
    assert (tmp_path / "o" / "sensitivity.json").is_file()
    assert "wrote" in out


def test_sensitivity_help_lists_the_model_names(capsys):
    assert cli.main(["sensitivity", "--help"]) == 0
    text = capsys.readouterr().out
    for name in ("lenet", "resnet18", "vgg11", "alexnet", "--resize"):
        assert name in text


def test_an_interrupt_is_one_line_and_exit_status_130(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_run_demo", interrupted)
    code, _, err = run_cli(["demo"], capsys)
    assert code == 130
    assert_one_line(err, "interrupted")


def test_a_failure_is_one_line_with_status_1_and_debug_shows_the_traceback(monkeypatch, capsys):
    def broken(args):
        raise RuntimeError("the device\nfell over")

    monkeypatch.setattr(cli, "_run_demo", broken)
    code, _, err = run_cli(["demo"], capsys)
    assert code == 1
    assert_one_line(err, "RuntimeError: the device fell over", "--debug")
    with pytest.raises(RuntimeError, match="fell over"):
        cli.main(["demo", "--debug"])


@pytest.mark.slow
def test_ctrl_c_in_a_real_run_is_one_line_and_130(tmp_path):
    """A real SIGINT into a running ``reproduce``: no traceback, status 130. The child gets
    SIGINT's default action back first: a test run started in the background (``cmd &``,
    ``nohup``) ignores SIGINT, a child inherits that, and Python then never interrupts."""
    process = subprocess.Popen(
        [sys.executable, "-m", "diffeo_engine", "reproduce", "--out", str(tmp_path / "r")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=tmp_path,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not (tmp_path / "r").exists() and time.monotonic() < deadline:
        time.sleep(0.2)  # the output folder appears once the work has begun
    time.sleep(1.0)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if "interrupted" in line]


def test_help_does_not_import_torch_or_the_commands():
    code = (
        "import sys; from diffeo_engine import cli\n"
        "assert cli.main(['--help']) == 0\n"
        "print('LOADED', sorted(m for m in ('torch', 'diffeo_engine.generate', "
        "'diffeo_engine.reproduce', 'diffeo_engine.benchmark') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=ENV, check=True
    ).stdout
    assert "LOADED []" in out
    for name in cli.COMMANDS:
        assert name in out


def read_png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"), dtype=np.float64)


def assert_a_real_picture(path: Path) -> None:
    pixels = read_png(path)
    height, width, _ = pixels.shape
    assert 600 <= width <= 3000 and 600 <= height <= 3000
    assert pixels.std() > 20  # not blank
    # many distinct colours: photos of images, a colour map and a legend, not a flat plot
    assert len(np.unique(pixels.reshape(-1, 3)[::7], axis=0)) > 500


@pytest.mark.slow
def test_demo_out_draws_the_perturbation_and_the_phase_picture(tmp_path, capsys):
    out = tmp_path / "d.png"
    code, text, err = run_cli(["demo", "--out", out, "--batch-size", "2", "--size", "24"], capsys)
    assert code == 0, err
    assert f"wrote {out}" in text
    assert_a_real_picture(out)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["png", "folder", "npy"])
def test_show_draws_a_users_image(tmp_path, capsys, kind, mnist_like):
    from PIL import Image

    g = torch.Generator().manual_seed(5)
    rgb = (torch.rand(3, 5, 5, generator=g)[None] * 255).to(torch.float32)
    rgb = torch.nn.functional.interpolate(rgb, size=(20, 30), mode="bilinear")[0]
    array = rgb.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    if kind == "png":
        source = tmp_path / "photo.png"
        Image.fromarray(array).save(source)
        extra = []
    elif kind == "folder":
        source = tmp_path / "photos"
        source.mkdir()
        Image.fromarray(array).save(source / "a.png")
        Image.fromarray(array[::-1].copy()).save(source / "b.png")
        extra = ["--index", "1"]
    else:
        source, extra = mnist_like, ["--index", "3", "--cut", "4"]
    out = tmp_path / "s.png"
    code, _, err = run_cli(["show", source, "--out", out, *extra], capsys)
    assert code == 0, err
    assert_a_real_picture(out)


def test_show_index_out_of_range_is_one_line(mnist_like, tmp_path, capsys):
    code, _, err = run_cli(["show", mnist_like, "--out", tmp_path / "s.png", "--index", "12"],
                           capsys)  # fmt: skip
    assert code == 2
    assert_one_line(err, "--index", "[0, 12)")


def test_train_load_weights_refuses_what_is_not_a_state_dict(tmp_path):
    from diffeo_engine.models.train import load_weights

    model = torch.nn.Linear(2, 2)
    pickled, listed, damaged = tmp_path / "o.pt", tmp_path / "l.pt", tmp_path / "d.pt"
    torch.save({"net": torch.nn.Linear(2, 2)}, pickled)
    torch.save([torch.zeros(2)], listed)
    torch.save(model.state_dict(), damaged)
    data = damaged.read_bytes()
    damaged.write_bytes(data[: len(data) // 2])
    for path, match in ((pickled, "pickled Python objects"), (listed, "holds a list"),
                        (damaged, "not a saved state dict")):  # fmt: skip
        with pytest.raises(ValueError, match=match) as info:
            load_weights(model, path)
        assert "\n" not in str(info.value)


def test_sensitivity_metric_and_estimator_flags_reach_the_meter(mnist_like, tmp_path, capsys):
    out = tmp_path / "o"
    argv = sensitivity_argv(mnist_like, out, "--metric", "cosine", "--estimator", "median")
    code, _, err = run_cli(argv, capsys)
    assert code == 0, err
    settings = json.loads((out / "sensitivity.json").read_text())["settings"]
    assert settings["metric"] == "cosine" and settings["estimator"] == "median"
