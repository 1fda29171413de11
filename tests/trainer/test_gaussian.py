import torch

from tests.trainer.conftest import unit_kl
from trainer.gaussian import Gaussian, _SampleAndKL, sample_and_kl


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


def test_fused_sample_and_kl_passes_gradcheck():
    rows = torch.randn(4, 4, dtype=torch.float64, requires_grad=True)
    eps = torch.randn(4, 2, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: _SampleAndKL.apply(x, eps), (rows,))
