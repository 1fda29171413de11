import torch

from sharding.row_optim import RowAdagrad, RowAdam


def test_row_adam_equals_torch_adam_when_every_row_is_updated():
    g = torch.Generator().manual_seed(0)
    init = torch.randn(6, 4, generator=g)
    reference = init.clone().requires_grad_(True)
    torch_adam = torch.optim.Adam([reference], lr=0.05)
    ours = init.clone()
    row_adam = RowAdam(ours, lr=0.05)
    for step in range(5):
        grad = torch.randn(6, 4, generator=g)
        reference.grad = grad.clone()
        torch_adam.step()
        ids = None if step % 2 else torch.arange(6)  # both the all-rows and the indexed path
        row_adam.step(ours, ids, grad)
    torch.testing.assert_close(ours, reference.detach(), rtol=1e-6, atol=1e-7)


def test_row_adam_leaves_untouched_rows_alone():
    param = torch.ones(5, 2)
    opt = RowAdam(param, lr=0.1)
    opt.step(param, torch.tensor([1, 3]), torch.ones(2, 2))
    assert torch.equal(param[[0, 2, 4]], torch.ones(3, 2))
    assert torch.all(param[[1, 3]] < 1)
    assert torch.all(opt.exp_avg[[0, 2, 4]] == 0)


def test_row_adagrad_keeps_one_accumulator_per_row():
    param = torch.zeros(3, 4)
    opt = RowAdagrad(param, lr=1.0)
    grad = torch.tensor([[1.0, 1.0, 1.0, 1.0], [2.0, 0.0, 0.0, 0.0]])
    opt.step(param, torch.tensor([0, 2]), grad)
    assert opt.sum_sq.shape == (3, 1)
    torch.testing.assert_close(opt.sum_sq[:, 0], torch.tensor([1.0, 0.0, 1.0]))
    torch.testing.assert_close(param[0], -torch.ones(4))
    torch.testing.assert_close(param[2], torch.tensor([-2.0, 0.0, 0.0, 0.0]))
    assert torch.equal(param[1], torch.zeros(4))


def test_row_adagrad_scales_each_row_part_separately():
    param = torch.zeros(1, 4)
    opt = RowAdagrad(param, lr=1.0, parts=2)  # [mean | logvar] halves
    opt.step(param, None, torch.tensor([[3.0, 3.0, 0.5, 0.5]]))
    torch.testing.assert_close(opt.sum_sq, torch.tensor([[9.0, 0.25]]))
    torch.testing.assert_close(param, -torch.ones(1, 4))
