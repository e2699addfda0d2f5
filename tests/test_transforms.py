"""The nn.Module transforms and the first CLI."""

import subprocess
import sys

import pytest
import torch
from torch import nn

import diffeo_engine as de
from diffeo_engine import cli


def test_diffeo_module_with_a_seed_equals_deform(generator):
    images = torch.rand(4, 3, 12, 10, generator=generator)
    module = de.Diffeo(0.02, 4, seed=7)
    torch.testing.assert_close(module(images), de.deform(images, 0.02, 4, seed=7), rtol=0, atol=0)
    single = module(images[2])
    assert single.shape == (3, 12, 10)
    expected = de.deform(images[2:3], 0.02, 4, seed=7)[0]
    assert torch.equal(single, expected)


def test_diffeo_module_without_seed_is_random_and_composes(generator):
    images = torch.rand(2, 1, 9, 9, generator=generator)
    pipeline = nn.Sequential(de.Diffeo(0.05, 3), nn.Flatten())
    a, b = pipeline(images), pipeline(images)
    assert a.shape == (2, 81)
    assert not torch.equal(a, b)
    assert "T=0.05" in repr(pipeline)


def test_diffeo_pair_is_a_perturbation(generator):
    images = torch.rand(3, 2, 8, 8, generator=generator)
    pair = de.DiffeoPair(0.02, 3, seed=4)
    assert isinstance(pair, de.Perturbation)
    tau_x, noisy = pair(images, torch.tensor([5, 6, 7]))
    want = de.perturb(images, 0.02, 3, seed=4, ids=torch.tensor([5, 6, 7]))
    assert torch.equal(tau_x, want[0]) and torch.equal(noisy, want[1])


def test_bad_transform_parameters():
    with pytest.raises(ValueError, match="cut"):
        de.Diffeo(0.1, 0)
    with pytest.raises(ValueError, match="seed"):
        de.DiffeoPair(0.1, 3, seed=-3)


def test_cli_demo_prints_what_it_did(capsys):
    assert cli.main(["demo", "--batch-size", "3", "--size", "16", "--cut", "4"]) == 0
    out = capsys.readouterr().out
    assert "perturbed 3 images of 3x16x16" in out
    assert "typical displacement" in out


def test_cli_reports_bad_input_as_an_error(capsys):
    assert cli.main(["demo", "--cut", "1"]) == 2
    assert "cut" in capsys.readouterr().err


def test_console_script_help_lists_commands():
    out = subprocess.run(
        [sys.executable, "-m", "diffeo_engine", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "demo" in out
