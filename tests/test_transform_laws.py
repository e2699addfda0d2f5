"""The laws of T and cut in the transforms: Beta variates against scipy, the published
transform's sampling (pcsl-epfl/diffeomorphism transform.py, ported here as the test's own
reference), ranges, the coin of p, determinism and replay records.

Significance of every statistical test, fixed before any run: 0.001 (each runs on a fixed
seed, so an outcome is reproducible).
"""

import itertools
import math

import pytest
import torch

import diffeo_engine as de
from diffeo_engine.transforms import laws

ALPHA = 0.001
stats = pytest.importorskip("scipy.stats", reason="the laws are compared with scipy.stats")


@pytest.mark.parametrize(("a", "b"), [(0.5, 0.5), (2.0, 5.0), (0.3, 3.0), (1.0, 1.0), (40.0, 60.0)])
def test_beta_variates_follow_the_beta_law(a, b):
    x = laws.beta_variates(a, b, seed=11, ids=torch.arange(4000), stream=laws.T_STREAMS)
    assert x.dtype == torch.float64 and bool(((x >= 0) & (x <= 1)).all())
    assert stats.kstest(x.numpy(), stats.beta(a, b).cdf).pvalue > ALPHA


def test_a_huge_s_pins_the_beta_law_as_published():
    """transform.py: s = 1e10, r = x / (1 - x) applies the fraction x."""
    x = 0.3
    law = laws.Beta(1e10, x / (1 - x))
    values = laws.beta_variates(*law.shapes, seed=0, ids=torch.arange(50), stream=laws.CUT_STREAMS)
    torch.testing.assert_close(values, torch.full_like(values, x), rtol=0, atol=1e-4)


def _published_T_and_cut(b_T, b_cut, cutmin, cutmax, n):
    """transform.py's mapping from its two Beta draws to (T, cut), with diff.py's range."""
    cut = int(b_cut * (cutmax + 1 - cutmin) + cutmin)
    log = math.log(cut)
    T1, T2 = 1 / (math.pi * n**2 * log), 4 / (math.pi**3 * cut**2 * log)
    return b_T * (T2 - T1) + T1, cut


def test_the_published_law_maps_its_beta_draws_as_transform_py():
    sT, rT, scut, rcut, cutmin, cutmax, n = 2.0, 0.7, 3.0, 1.5, 2, 9, 28
    aug = de.Diffeo(sT=sT, rT=rT, scut=scut, rcut=rcut, cutmin=cutmin, cutmax=cutmax, seed=4)
    ids = torch.arange(300)
    params = aug.sample_params((n, n), ids)
    alpha = lambda s, r: (s - s / (r + 1), s / (r + 1))  # noqa: E731 (transform.py's shapes)
    b_T = laws.beta_variates(*alpha(sT, rT), seed=4, ids=ids, stream=laws.T_STREAMS)
    b_cut = laws.beta_variates(*alpha(scut, rcut), seed=4, ids=ids, stream=laws.CUT_STREAMS)
    for k in range(300):
        T, cut = _published_T_and_cut(float(b_T[k]), float(b_cut[k]), cutmin, cutmax, n)
        assert int(params.cut[k]) == cut
        assert float(params.T[k]) == pytest.approx(T, rel=1e-6)
    assert set(params.cut.tolist()) == set(range(cutmin, cutmax + 1))


def test_the_published_cut_law_has_the_discrete_beta_probabilities():
    scut, rcut, cutmin, cutmax = 4.0, 0.5, 3, 12
    aug = de.Diffeo(0.001, cut=None, scut=scut, rcut=rcut, cutmin=cutmin, cutmax=cutmax, seed=2)
    cuts = aug.sample_params((32, 32), torch.arange(6000)).cut
    a, b = scut - scut / (rcut + 1), scut / (rcut + 1)
    edges = [(k - cutmin) / (cutmax + 1 - cutmin) for k in range(cutmin, cutmax + 2)]
    probabilities = [
        stats.beta(a, b).cdf(hi) - stats.beta(a, b).cdf(lo) for lo, hi in itertools.pairwise(edges)
    ]
    counts = torch.bincount(cuts - cutmin, minlength=cutmax + 1 - cutmin).tolist()
    expected = [p * len(cuts) for p in probabilities]
    assert stats.chisquare(counts, expected).pvalue > ALPHA


def test_the_published_T_law_matches_torch_distributions_beta_as_transform_py_draws_it():
    """Two samples: ours (Philox) and the published sampler's (torch.distributions.Beta on
    torch's global generator, ported), for a fixed cut; Kolmogorov-Smirnov two-sample."""
    sT, rT, n, cut = 1.5, 3.0, 32, 5
    ours = de.Diffeo(cut=cut, sT=sT, rT=rT, seed=8).sample_params((n, n), torch.arange(3000)).T
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(1234)
    beta = torch.distributions.Beta(sT - sT / (rT + 1), sT / (rT + 1))
    theirs = [_published_T_and_cut(float(beta.sample()), 0.0, cut, cut, n)[0] for _ in range(3000)]
    torch.random.set_rng_state(generator_state)
    assert stats.ks_2samp(ours.double().numpy(), theirs).pvalue > ALPHA


def test_ranges_are_uniform():
    aug = de.Diffeo((0.001, 0.004), (2, 6), seed=3)
    params = aug.sample_params((16, 16), torch.arange(5000))
    T = (params.T.double() - 0.001) / 0.003
    assert stats.kstest(T.numpy(), "uniform").pvalue > ALPHA
    counts = torch.bincount(params.cut - 2, minlength=5).tolist()
    assert stats.chisquare(counts).pvalue > ALPHA
    assert min(params.cut.tolist()) == 2 and max(params.cut.tolist()) == 6


def test_the_coin_of_p():
    ids = torch.arange(4000)
    applied = de.Diffeo(0.01, 3, p=0.3, seed=1).sample_params((8, 8), ids).applied
    assert stats.binomtest(int(applied.sum()), 4000, 0.3).pvalue > ALPHA
    assert de.Diffeo(0.01, 3, p=1.0, seed=1).sample_params((8, 8), ids).applied.all()
    none = de.Diffeo(0.01, 3, p=0.0, seed=1).sample_params((8, 8), ids)
    assert not none.applied.any() and not none.T.any()


def test_a_sample_parameters_depend_on_seed_and_id_only():
    aug = de.Diffeo(sT=1.0, rT=2.0, scut=2.0, rcut=1.0, cutmin=2, cutmax=10, p=0.7, seed=5)
    batch = aug.sample_params((20, 20), [7, 3, 2**40, 11])
    alone = [aug.sample_params((20, 20), i) for i in (11, 2**40, 3, 7)]
    for k, single in zip([3, 2, 1, 0], alone):
        assert single.ids.tolist() == [batch.ids[k].item()]
        assert torch.equal(single.T, batch.T[k : k + 1])
        assert torch.equal(single.cut, batch.cut[k : k + 1])
        assert torch.equal(single.applied, batch.applied[k : k + 1])
    other_seed = de.Diffeo(sT=1.0, rT=2.0, scut=2.0, rcut=1.0, cutmin=2, cutmax=10, seed=6)
    assert not torch.equal(other_seed.sample_params((20, 20), [7, 3, 2**40, 11]).T, batch.T)


def test_records_survive_plain_python_and_slicing():
    aug = de.Diffeo((0.0, 0.01), (2, 5), p=0.5, seed=9)
    params = aug.sample_params((12, 12), [4, 5, 6])
    again = de.DiffeoParams.from_dict(params.as_dict())
    for name in ("T", "cut", "ids", "applied"):
        assert torch.equal(getattr(again, name), getattr(params, name))
    assert again.seed == 9 and len(params[1:]) == 2 and params[1].ids.tolist() == [5]
    with pytest.raises(ValueError, match="cut: expected 3 values"):
        de.DiffeoParams.from_dict({**params.as_dict(), "cut": [2, 3]})


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (
            lambda: de.Diffeo(0.01, (5, 3)),
            ValueError,
            r"cut: expected a range \(low, high\) with low <= high",
        ),
        (lambda: de.Diffeo((0.02, 0.01), 3), ValueError, "T: expected a range"),
        (lambda: de.Diffeo((0.01, -1.0), 3), ValueError, "T: expected a temperature >= 0"),
        (lambda: de.Diffeo(0.01, (2, 3.5)), TypeError, "cut"),
        (lambda: de.Diffeo(0.01, (0, 3)), ValueError, "cut"),
        (lambda: de.Diffeo(sT=0, rT=1, cut=3), ValueError, "sT: expected a finite number > 0"),
        (lambda: de.Diffeo(sT=1, rT=-1, cut=3), ValueError, "rT"),
        (lambda: de.Diffeo(sT=1, cut=3), ValueError, "sT: only with the Beta law"),
        (lambda: de.Diffeo(0.01, sT=1, rT=1, cut=3), ValueError, "T: give either T or"),
        (lambda: de.Diffeo(cut=3), ValueError, "T: expected a temperature"),
        (lambda: de.Diffeo(0.01), ValueError, "cut: expected an integer, a range"),
        (lambda: de.Diffeo(0.01, scut=1, rcut=1, cutmin=5, cutmax=3), ValueError, "cutmax"),
        (lambda: de.Diffeo(0.01, scut=1, rcut=1, cutmin=2), ValueError, "scut: only with"),
        (
            lambda: de.Diffeo(0.01, 3, scut=1, rcut=1, cutmin=2, cutmax=4),
            ValueError,
            "cut: give either",
        ),
        (lambda: de.Diffeo(sT=1, rT=1, cut=(1, 3)), ValueError, "log 1 = 0"),
        (lambda: de.Diffeo(sT=1, rT=1, scut=1, rcut=1, cutmin=1, cutmax=3), ValueError, "cutmin"),
        (lambda: de.Diffeo(0.01, 3, p=1.5), ValueError, r"p: expected a probability in \[0, 1\]"),
        (lambda: de.Diffeo(0.01, 3, p=-0.1), ValueError, "p: expected"),
        (lambda: de.Diffeo(0.01, 3, p="half"), TypeError, "p"),
        (lambda: de.Diffeo([0.1], 3), TypeError, "T"),
        (lambda: de.DiffeoPair(0.01, (5, 3)), ValueError, "cut: expected a range"),
        (lambda: de.DiffeoPair(sT=-1, rT=1, cut=3), ValueError, "sT"),
        (lambda: laws.beta_variates(0, 1, seed=0, ids=[1], stream=0), ValueError, "alpha"),
    ],
)
def test_bad_laws_are_refused_naming_the_argument(make, error, match):
    with pytest.raises(error, match=match):
        make()
