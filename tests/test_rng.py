"""Philox in PyTorch against Triton's own ``tl.philox`` and Box-Muller, run in the interpreter."""

import pytest
import torch

from diffeo_engine import rng

triton = pytest.importorskip("triton")
tl = triton.language


@triton.jit
def _philox_kernel(c0_ptr, c1_ptr, c2_ptr, c3_ptr, words_ptr, normals_ptr, seed, N: tl.constexpr):
    offs = tl.arange(0, N)
    c0 = tl.load(c0_ptr + offs)
    c1 = tl.load(c1_ptr + offs)
    c2 = tl.load(c2_ptr + offs)
    c3 = tl.load(c3_ptr + offs)
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, c2, c3)
    tl.store(words_ptr + offs, r0.to(tl.int64))
    tl.store(words_ptr + N + offs, r1.to(tl.int64))
    tl.store(words_ptr + 2 * N + offs, r2.to(tl.int64))
    tl.store(words_ptr + 3 * N + offs, r3.to(tl.int64))
    n0, n1 = tl.random.pair_uniform_to_normal(
        tl.random.uint_to_uniform_float(r0), tl.random.uint_to_uniform_float(r1)
    )
    n2, n3 = tl.random.pair_uniform_to_normal(
        tl.random.uint_to_uniform_float(r2), tl.random.uint_to_uniform_float(r3)
    )
    tl.store(normals_ptr + offs, n0)
    tl.store(normals_ptr + N + offs, n1)
    tl.store(normals_ptr + 2 * N + offs, n2)
    tl.store(normals_ptr + 3 * N + offs, n3)


def _as_int32(words: torch.Tensor) -> torch.Tensor:
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


@pytest.mark.parametrize("seed", [0, 1, 987654321, 2**32 + 5, 2**63 - 1])
def test_philox_bit_identical_to_triton(seed, generator):
    n = 512
    counters = [torch.randint(0, 2**32, (n,), generator=generator) for _ in range(4)]
    counters[0][:4] = torch.tensor([0, 1, 2**31, 2**32 - 1])  # edge words
    words = torch.full((4 * n,), -7, dtype=torch.int64)  # poisoned
    normals = torch.full((4 * n,), float("nan"))
    _philox_kernel[(1,)](*(_as_int32(c) for c in counters), words, normals, seed, N=n)

    ours = rng.philox4x32(seed, *counters)
    for lane in range(4):
        assert torch.equal(ours[lane], words[lane * n : (lane + 1) * n])

    uniforms = [rng.uniform_from_uint32(w) for w in ours]
    expected = [*rng.box_muller(uniforms[0], uniforms[1]), *rng.box_muller(*uniforms[2:])]
    for lane in range(4):
        torch.testing.assert_close(
            expected[lane], normals[lane * n : (lane + 1) * n], rtol=1e-6, atol=1e-6
        )


def test_philox_known_answer():
    """Random123's published known-answer vectors for Philox4x32-10."""
    zero = torch.zeros(1, dtype=torch.int64)
    out = rng.philox4x32(0, zero, zero, zero, zero)
    assert [int(w) for w in out] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    ones = torch.full((1,), 0xFFFFFFFF, dtype=torch.int64)
    out = rng.philox4x32(2**64 - 1, ones, ones, ones, ones)
    assert [int(w) for w in out] == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]
    pi = [torch.tensor(w) for w in (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344)]
    out = rng.philox4x32(0x299F31D0_A4093822, *pi)
    assert [int(w) for w in out] == [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


def test_noise_lanes_follow_the_documented_layout():
    """z[c, y, x] is lane x & 3 of Philox at (counter x >> 2, stream 2 + c*H + y)."""
    seed, ids, (C, H, W) = 11, torch.tensor([3, -5]), (2, 3, 7)
    z = rng.noise_normals(seed, ids, (C, H, W))
    for b, image_id in enumerate(ids.tolist()):
        for c in range(C):
            for y in range(H):
                for x in range(W):
                    words = rng.philox4x32(
                        seed,
                        torch.tensor(x >> 2),
                        torch.tensor(2 + c * H + y),
                        torch.tensor(image_id & 0xFFFFFFFF),
                        torch.tensor((image_id >> 32) & 0xFFFFFFFF),
                    )
                    u = [rng.uniform_from_uint32(w) for w in words]
                    normals = [*rng.box_muller(u[0], u[1]), *rng.box_muller(u[2], u[3])]
                    assert z[b, c, y, x] == normals[x & 3]


def test_normals_are_standard(generator):
    z = rng.noise_normals(5, torch.arange(64), (1, 32, 32)).flatten()
    assert abs(float(z.mean())) < 0.02
    assert abs(float(z.std()) - 1) < 0.02


def test_streams_do_not_touch_global_rng():
    state = torch.get_rng_state()
    rng.coefficient_normals(1, torch.arange(3), 4)
    rng.noise_normals(1, torch.arange(3), (1, 4, 4))
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize("seed", [-1, 2**63, 1.5, "1"])
def test_bad_seed(seed):
    with pytest.raises((ValueError, TypeError), match="seed"):
        rng.noise_normals(seed, torch.arange(2), (1, 2, 2))
