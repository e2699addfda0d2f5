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
    single = module(images[2], ids=torch.tensor([2]))
    assert single.shape == (3, 12, 10)
    expected = de.deform(images, 0.02, 4, seed=7)[2]  # image 2 of the batch has id 2
    assert torch.equal(single, expected)


def test_fixed_seed_in_a_per_sample_pipeline_gives_each_sample_its_own_field(generator):
    """Without ids a fixed-seed module numbers the images it sees: call k gets id k."""
    images = torch.rand(5, 1, 16, 16, generator=generator)
    module = de.Diffeo(0.004, 3, seed=11)
    outputs = torch.stack([module(image) for image in images])  # one sample per call
    expected = torch.cat(
        [de.deform(images[k : k + 1], 0.004, 3, seed=11, ids=torch.tensor([k])) for k in range(5)]
    )
    assert torch.equal(outputs, expected)
    same = torch.stack([module(images[0]) for _ in range(3)])
    assert not torch.equal(same[0], same[1]) and not torch.equal(same[1], same[2])
    module.reset()
    assert torch.equal(module(images[0]), expected[0])
    batch_then = module(images[1:3])  # ids continue at 1, 2
    want = de.deform(images[1:3], 0.004, 3, seed=11, ids=torch.tensor([1, 2]))
    assert torch.equal(batch_then, want)


def test_fixed_seed_counter_interleaves_dataloader_workers(generator):
    images = torch.rand(6, 1, 12, 12, generator=generator)

    class Data(torch.utils.data.Dataset):
        def __init__(self):
            self.transform = de.Diffeo(0.004, 3, seed=2)

        def __len__(self):
            return 6

        def __getitem__(self, index):
            return self.transform(images[index])

    loader = torch.utils.data.DataLoader(Data(), batch_size=None, num_workers=2)
    got = torch.stack(list(loader))
    # worker w serves samples w, w + 2, ...; its k-th call gets id k * 2 + w = the index
    expected = [
        de.deform(images[k : k + 1], 0.004, 3, seed=2, ids=torch.tensor([k])) for k in range(6)
    ]
    assert torch.equal(got, torch.cat(expected))


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


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: de.Diffeo(0.1, 0), ValueError, "cut"),
        (lambda: de.DiffeoPair(0.1, 3, seed=-3), ValueError, "seed"),
        (lambda: de.Diffeo(-1, 3), ValueError, "T: expected a temperature >= 0"),
        (lambda: de.Diffeo(float("nan"), 3), ValueError, "T"),
        (lambda: de.Diffeo("0.1", 3), TypeError, "T"),
        (lambda: de.Diffeo(0.1, 3.0), TypeError, "cut"),
        (lambda: de.Diffeo(0.1, 3, interp="x"), ValueError, "interp"),
        (lambda: de.Diffeo(0.1, 3, backend="x"), ValueError, "backend"),
        (lambda: de.Diffeo(0.1, 3, seed=1.5), TypeError, "seed"),
        (lambda: de.Diffeo(0.1, 3, out_dtype="float32"), TypeError, "out_dtype"),
        (lambda: de.DiffeoPair(-1, 3), ValueError, "T"),
        (lambda: de.DiffeoPair(0.1, 3, interp="x"), ValueError, "interp"),
        (lambda: de.DiffeoPair(0.1, 3, backend="x"), ValueError, "backend"),
        (lambda: de.DiffeoPair(0.1, 3, noise=1e39), ValueError, "noise: 1e\\+39 overflows"),
        (lambda: de.DiffeoPair(0.1, 3, noise="loud"), ValueError, "noise"),
    ],
)
def test_bad_transform_parameters_are_refused_at_construction(make, error, match):
    with pytest.raises(error, match=match):
        make()


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
