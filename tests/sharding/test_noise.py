"""The training noise: the counter-based stream, compiled (noise.c) and in torch ops (CUDA, no compiler)."""

import math

import pytest
import torch

from sharding import rng
from sharding.kernels import native
from sharding.rng import counter_normal, row_normal, rows_normal, seed_of, splitmix64

KEY, DIM = (7, 3, 11), 10


def draw(lo: int, hi: int, key: tuple[int, ...] = KEY) -> torch.Tensor:
    out = torch.empty(hi - lo, DIM)
    row_normal((lo, hi), DIM, key, out)
    return out


@pytest.fixture(params=["compiled", "torch"])
def generator(request, monkeypatch):
    """Each test runs on the compiled stream and on the torch fallback (kernels switched off)."""
    native.library.cache_clear()
    if request.param == "torch":
        monkeypatch.setenv("NVKG_NATIVE", "0")
    else:
        assert native.library() is not None, "the C kernels did not build (is cc installed?)"
    yield request.param
    native.library.cache_clear()


def test_a_rows_noise_does_not_depend_on_the_range_it_is_drawn_in(generator):
    whole = draw(0, 8000)  # above 3,277 rows (32,768 values) the chunks are split over the threads
    for lo, hi in [(0, 1), (1, 2), (25, 26), (51, 77), (255, 513), (1000, 2999), (1001, 7999), (7999, 8000)]:
        assert torch.equal(draw(lo, hi), whole[lo:hi]), (lo, hi)


def test_noise_is_standard_normal(generator):
    x = draw(0, 100_000).double().flatten()  # one million values
    n = x.numel()
    assert abs(x.mean().item()) < 5 / math.sqrt(n)
    assert abs(x.var().item() - 1) < 5 * math.sqrt(2 / n)
    kurtosis = (x - x.mean()).pow(4).mean().item() / x.var().item() ** 2
    assert abs(kurtosis - 3) < 5 * math.sqrt(24 / n)
    for k, expected in [(1, 0.682689), (2, 0.954500), (3, 0.997300)]:  # mass within k sigma
        share = (x.abs() < k).double().mean().item()
        assert abs(share - expected) < 5 * math.sqrt(expected * (1 - expected) / n), k
    neighbours = torch.corrcoef(torch.stack([x[:-1], x[1:]]))[0, 1].item()  # includes Box-Muller pairs
    assert abs(neighbours) < 5 / math.sqrt(n)


def test_streams_of_different_keys_are_unrelated(generator):
    a, b = draw(0, 20_000).flatten(), draw(0, 20_000, key=(7, 3, 12)).flatten()
    assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < 5 / math.sqrt(a.numel())


def test_the_torch_stream_is_the_compiled_one():
    """Same integers (any mismatch there would be of order 1), floats equal to a few ulp (the kernel fuses
    multiply-adds): a run without the kernels, or on CUDA, draws the noise the CPU kernels draw."""
    native.library.cache_clear()
    assert native.library() is not None
    for seed, first, count in [(seed_of(*KEY), 0, 50_000), (123, 777, 5_003), (2**63 - 1, 10**12 + 3, 3_000)]:
        compiled = torch.empty(count)
        assert native.normal_into(compiled, seed, first)
        drawn = counter_normal(seed, torch.arange(first, first + count))
        torch.testing.assert_close(drawn, compiled, rtol=0, atol=1e-6)


def test_splitmix64_in_torch_is_numpys():
    import numpy as np

    x = np.array([0, 1, 2**63 + 5, 2**64 - 1, 12345678901234567], dtype=np.uint64)
    got = rng.splitmix64_torch(torch.from_numpy(x.view(np.int64))).numpy().view(np.uint64)
    assert np.array_equal(got, splitmix64(x))


def test_rows_in_any_order_are_the_rows_of_the_range(generator):
    rows = torch.tensor([5, 0, 4099, 17, 5])
    whole = draw(0, 4100)
    torch.testing.assert_close(rows_normal(rows, DIM, KEY, torch.device("cpu")), whole[rows], rtol=0, atol=0)


def test_meta_device_catches_no_tensor_in_the_torch_stream():
    """Every tensor of the torch stream follows its input's device: none is made on the default device."""
    with torch.device("meta"):
        out = counter_normal(7, torch.arange(10, device="cpu"))
    assert out.device.type == "cpu"


def test_splitmix64_and_the_seeds_of_every_stream_are_pinned():
    """splitmix64's published first output for state 0, and seeds as every earlier run drew them: a change
    here changes every run's numbers (and the Parquet partition of every fact)."""
    import numpy as np

    assert int(splitmix64(np.zeros(1, dtype=np.uint64))[0]) == 0xE220A8397B1DCDAF
    assert seed_of(0) == 7070836379803831727
    assert seed_of(7, 3, 11) == 8055240834621979715
    assert seed_of(0, 0, 0, -1) == 8253454752062652499  # a step's relation stream
    assert seed_of(1, 2, 3, 4, 0x401E) == 1308931474230934346


def test_the_kernels_refuse_a_negative_position_in_the_stream():
    """The chunk arithmetic assumes positions >= 0: a negative one would skip chunks or copy a negative
    length, so it is refused before the kernel runs."""
    assert native.library() is not None, "the C kernels did not build (is cc installed?)"
    with pytest.raises(ValueError, match="negative"):
        native.normal_into(torch.empty(1000), 1, -600)
    with pytest.raises(ValueError, match="negative"):
        native.normal_rows_into(torch.empty(3, 4), 1, torch.tensor([-1, 0, 2]))
    with pytest.raises(ValueError, match="not one row of each"):
        native.normal_rows_into(torch.empty(2, 4), 1, torch.tensor([0, 1, 2]))
