import math

import pytest
import torch

from sharding.gaussian import Gaussian, _SampleAndKL, sample_and_kl, stream_sample_and_kl
from sharding.kernels import native
from tests.trainer.conftest import unit_kl


def test_kl_closed_form_matches_monte_carlo():
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(3, 4, generator=g)
    logvar = torch.randn(3, 4, generator=g) * 0.5
    q = Gaussian(mean, logvar)
    samples = torch.stack([q.sample(g) for _ in range(200_000)])  # [S, 3, 4]
    var = logvar.exp()
    log_q = -0.5 * (((samples - mean) ** 2) / var + logvar + torch.log(torch.tensor(2 * torch.pi))).sum(-1)
    log_p = -0.5 * (samples**2 + torch.log(torch.tensor(2 * torch.pi))).sum(-1)
    mc = (log_q - log_p).mean(0)
    _, kl = sample_and_kl(torch.cat([mean, logvar], dim=-1), 4, torch.zeros(3, 4))  # rows [mean | logvar]
    torch.testing.assert_close(kl, mc, atol=0.03, rtol=0.01)


def test_kl_is_zero_at_the_prior_and_for_point_estimates():
    _, kl = sample_and_kl(torch.zeros(2, 10), 5, torch.zeros(2, 5))  # mean 0, logvar 0: the prior itself
    assert kl.abs().max() == 0
    point = torch.randn(2, 5)
    sample, kl = sample_and_kl(point, 5, None)
    assert sample is point and kl.abs().max() == 0


def test_sample_is_reparameterised():
    mean = torch.zeros(4, 3, requires_grad=True)
    logvar = torch.zeros(4, 3, requires_grad=True)
    Gaussian(mean, logvar).sample(torch.Generator().manual_seed(1)).sum().backward()
    assert mean.grad is not None and logvar.grad is not None and logvar.grad.abs().sum() > 0


def test_fused_sample_and_kl_matches_autograd_of_the_composition():
    g = torch.Generator().manual_seed(2)
    rows = torch.randn(5, 6, dtype=torch.float64, generator=g)  # [mean | logvar], dim 3
    weights_sample = torch.randn(5, 3, dtype=torch.float64, generator=g)
    weights_kl = torch.randn(5, dtype=torch.float64, generator=g)

    fused_rows = rows.clone().requires_grad_(True)
    eps = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    sample, kl = sample_and_kl(fused_rows, 3, eps)
    ((sample * weights_sample).sum() + (kl * weights_kl).sum()).backward()

    plain_rows = rows.clone().requires_grad_(True)
    q = Gaussian(plain_rows[:, :3], plain_rows[:, 3:])
    plain_sample = q.mean + torch.exp(0.5 * q.logvar) * eps
    ((plain_sample * weights_sample).sum() + (unit_kl(q) * weights_kl).sum()).backward()

    torch.testing.assert_close(sample, plain_sample)
    torch.testing.assert_close(kl, unit_kl(q))
    torch.testing.assert_close(fused_rows.grad, plain_rows.grad)


@pytest.mark.parametrize("prior_var", [1.0, 0.05])
def test_fused_sample_and_kl_passes_gradcheck(prior_var):
    rows = torch.randn(4, 4, dtype=torch.float64, requires_grad=True)
    eps = torch.randn(4, 2, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: _SampleAndKL.apply(x, eps, prior_var), (rows,))


def test_kl_to_a_narrow_prior_is_the_closed_form():
    # KL(N(m, s^2) || N(0, v)) = 0.5 (s^2/v + m^2/v - 1 - log s^2 + log v), per dimension.
    mean, logvar, v = torch.tensor([[0.3, -1.0]]), torch.tensor([[-2.0, 0.5]]), 0.1
    _, kl = sample_and_kl(torch.cat([mean, logvar], dim=1), 2, torch.zeros(1, 2), prior_var=v)
    expected = sum(
        0.5 * (math.exp(lv) / v + m * m / v - 1 - lv + math.log(v))
        for m, lv in zip(mean[0].tolist(), logvar[0].tolist(), strict=True)
    )
    assert kl.item() == pytest.approx(expected, rel=1e-6)


SPANS = [(100, 77, 5 * 128), (37, 78, 0), (163, 79, 1234 * 128)]  # (rows, stream seed, first value)


def _stream_noise(rows: int, dim: int, spans) -> torch.Tensor:
    eps, start = torch.empty(rows, dim), 0
    for count, seed, first in spans:
        assert native.normal_into(eps[start : start + count], seed, first)
        start += count
    return eps


def test_stream_kernel_gathers_and_samples_the_rows_with_the_streams_noise():
    """The kernel gathers rows ``local`` of the table into the leaf it returns and samples them: the sample,
    KL and gradient of ``sample_and_kl`` given the streams' noise; an id outside the table is refused."""
    assert native.library() is not None, "the C kernels did not build (is cc installed?)"
    dim, g = 128, torch.Generator().manual_seed(3)
    table = torch.cat([torch.randn(1000, dim, generator=g), torch.randn(1000, dim, generator=g) - 2], dim=1)
    local = torch.randperm(1000, generator=g)[:300]
    weights = torch.randn(300, dim + 1, generator=g)

    fused = stream_sample_and_kl(table, local, dim, SPANS)
    assert fused is not None
    rows, packed = fused
    (packed * weights).sum().backward()
    assert rows.is_leaf and torch.equal(rows.detach(), table[local])

    torch_rows = table[local].requires_grad_(True)
    sample, kl = sample_and_kl(torch_rows, dim, _stream_noise(300, dim, SPANS))
    (torch.cat([sample, kl.unsqueeze(1)], dim=1) * weights).sum().backward()

    assert packed.shape == (300, dim + 1)
    torch.testing.assert_close(packed[:, :dim], sample, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(packed[:, dim], kl, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rows.grad, torch_rows.grad, rtol=1e-5, atol=1e-5)

    with torch.no_grad():
        rows, _ = stream_sample_and_kl(table, local, dim, SPANS)
    assert not rows.requires_grad
    with pytest.raises(IndexError, match="outside"):
        stream_sample_and_kl(table, torch.cat([local[:-1], torch.tensor([1000])]), dim, SPANS)


def test_stream_kernel_declines_what_it_cannot_take(monkeypatch):
    table, local = torch.randn(1000, 256), torch.arange(300)
    assert stream_sample_and_kl(table[:, :128], local, 64, SPANS) is None  # not contiguous
    assert stream_sample_and_kl(table.double(), local, 128, SPANS) is None
    assert stream_sample_and_kl(table, local.to(torch.int32), 128, SPANS) is None
    assert stream_sample_and_kl(table, local[:299], 128, SPANS) is None  # the spans do not cover the rows
    assert stream_sample_and_kl(table, local, 64, SPANS) is None  # the rows are not [mean | logvar] of dim 64
    native.library.cache_clear()
    monkeypatch.setenv("NVKG_NATIVE", "0")
    try:
        assert stream_sample_and_kl(table, local, 128, SPANS) is None
    finally:
        native.library.cache_clear()
