import torch

from trainer.gaussian import Gaussian


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
    torch.testing.assert_close(q.kl_to_unit(), mc, atol=0.03, rtol=0.01)


def test_kl_is_zero_at_the_prior_and_for_point_estimates():
    assert Gaussian(torch.zeros(2, 5), torch.zeros(2, 5)).kl_to_unit().abs().max() == 0
    assert Gaussian(torch.randn(2, 5), None).kl_to_unit().abs().max() == 0


def test_sample_is_reparameterised():
    mean = torch.zeros(4, 3, requires_grad=True)
    logvar = torch.zeros(4, 3, requires_grad=True)
    Gaussian(mean, logvar).sample(torch.Generator().manual_seed(1)).sum().backward()
    assert mean.grad is not None and logvar.grad is not None and logvar.grad.abs().sum() > 0
