import math

import pytest
import torch

from sharding.gaussian import (
    Gaussian,
    StreamSample,
    _SampleAndKL,
    sample_and_kl,
    stream_sample_and_kl,
    stream_sample_of,
)
from sharding.kernels import native
from sharding.row_optim import RowAdagrad, RowAdam
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


@pytest.mark.parametrize("copy_rows", [False, True])
def test_stream_kernel_samples_the_rows_with_the_streams_noise(copy_rows):
    """The kernel samples rows ``local`` of the table: the sample, KL and gradient of ``sample_and_kl`` given
    the streams' noise, its backward reading the rows in the table; the leaf it returns holds the rows only
    when asked (else zeros); an id outside the table is refused."""
    assert native.library() is not None, "the C kernels did not build (is cc installed?)"
    dim, g = 128, torch.Generator().manual_seed(3)
    table = torch.cat([torch.randn(1000, dim, generator=g), torch.randn(1000, dim, generator=g) - 2], dim=1)
    local = torch.randperm(1000, generator=g)[:300]
    weights = torch.randn(300, dim + 1, generator=g)

    fused = stream_sample_and_kl(table, local, dim, SPANS, copy_rows=copy_rows)
    assert fused is not None
    rows, packed = fused
    (packed * weights).sum().backward()
    assert rows.is_leaf and torch.equal(rows.detach(), table[local] if copy_rows else torch.zeros(300, 2 * dim))

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


def test_stream_kernel_backward_refuses_a_table_changed_since_the_forward():
    """The backward reads the rows in the table: a torch op that changed the table in place between the
    forward and the backward would give the gradient at other values, and autograd refuses it."""
    table, local = torch.randn(1000, 256), torch.arange(300)
    fused = stream_sample_and_kl(table, local, 128, SPANS)
    assert fused is not None
    table[local[0]] += 1.0
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        fused[1].sum().backward()


@pytest.mark.parametrize("kind", ["adagrad", "adam"])
def test_a_backward_after_a_compiled_row_update_is_refused(kind):
    """The compiled row updates write the table as torch's in-place ops would count it: a graph that read
    the rows before an update refuses a backward after it (it would read the updated rows)."""
    table, local = torch.randn(1000, 256), torch.arange(300)
    fused = stream_sample_and_kl(table, local, 128, SPANS)
    assert fused is not None
    _optimizer(kind, table).step(table, local[:10], torch.ones(10, 256))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        fused[1].sum().backward()
    fused = stream_sample_and_kl(table, local, 128, SPANS)
    assert fused is not None
    _, packed = fused
    assert _optimizer(kind, table).step_sampled(table, [(stream_sample_of(packed), torch.ones(300, 129))]) is not None
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        packed.sum().backward()


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


def _sampled(table: torch.Tensor, local: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    fused = stream_sample_and_kl(table, local, dim, [(len(local), 11, 0)])
    assert fused is not None
    return fused


def _optimizer(kind: str, table: torch.Tensor, parts: int = 2, **options):
    return RowAdagrad(table, 0.1, parts=parts, **options) if kind == "adagrad" else RowAdam(table, 0.1, **options)


def _states(opt) -> list[torch.Tensor]:
    return [v for v in opt.state_dict().values() if torch.is_tensor(v)]


@pytest.mark.parametrize("kind", ["adagrad", "adam"])
@pytest.mark.parametrize(("dim", "parts"), [(128, 2), (24, 4), (6, 2)])  # 4: two roles' mean and logvar parts
def test_the_row_optimiser_forms_the_sampled_gradient_as_it_updates(kind, dim, parts):
    """One pass (``step_sampled``) updates the rows and the optimiser's state as the kernel's backward followed
    by the row update does; the rows the step did not touch stay as they were."""
    assert native.library() is not None, "the C kernels did not build (is cc installed?)"
    g = torch.Generator().manual_seed(5)
    start = torch.cat([torch.randn(500, dim, generator=g), torch.randn(500, dim, generator=g) - 2], dim=1)
    local = torch.randperm(500, generator=g)[:200]
    formed_table, fused_table = start.clone(), start.clone()
    formed, fused = _optimizer(kind, formed_table, parts), _optimizer(kind, fused_table, parts)
    for step in range(3):
        grad_out = torch.randn(200, dim + 1, generator=g)
        rows, packed = _sampled(formed_table, local, dim)
        packed.backward(grad_out)
        formed.step(formed_table, local, rows.grad)
        _, packed = _sampled(fused_table, local, dim)
        updated = fused.step_sampled(fused_table, [(stream_sample_of(packed), grad_out)])
        assert updated is not None and torch.equal(updated, local), step
    torch.testing.assert_close(fused_table, formed_table, rtol=1e-5, atol=1e-5)
    for ours, theirs in zip(_states(fused), _states(formed), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert fused.state_dict().get("num_steps") == formed.state_dict().get("num_steps")
    untouched = torch.ones(500, dtype=torch.bool).index_fill_(0, local, False)
    assert torch.equal(fused_table[untouched], start[untouched])
    assert not torch.equal(fused_table[local], start[local])


@pytest.mark.parametrize("kind", ["adagrad", "adam"])
@pytest.mark.parametrize("requests", [1, 3])  # one split by position; several merged by ranges of ids
def test_the_sampled_update_does_not_depend_on_the_thread_count(kind, requests):
    dim, g = 64, torch.Generator().manual_seed(6)
    start = torch.randn(3000, 2 * dim, generator=g)
    local = [torch.randperm(3000, generator=g)[:2000].sort().values for _ in range(requests)]
    grads = [torch.randn(2000, dim + 1, generator=g) for _ in range(requests)]
    results, threads = [], torch.get_num_threads()
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            table = start.clone()
            opt = _optimizer(kind, table)
            runs = [
                (stream_sample_of(_sampled(table, ids, dim)[1]), grad) for ids, grad in zip(local, grads, strict=True)
            ]
            updated = opt.step_sampled(table, runs)
            assert updated is not None and torch.equal(updated, torch.cat(local).unique())
            results.append([table, *_states(opt)])
    finally:
        torch.set_num_threads(threads)
    for tensors in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(tensors, results[0], strict=True))


@pytest.mark.parametrize("kind", ["adagrad", "adam"])
def test_the_sampled_update_merges_requests_as_the_formed_update_does(kind):
    """Rows drawn for several requests (each its ascending distinct rows, some shared): their gradients are
    summed per row before the update, as ``merge_rows`` then the row update do."""
    dim, g = 16, torch.Generator().manual_seed(8)
    start = torch.randn(300, 2 * dim, generator=g)
    requests = [torch.randperm(300, generator=g)[:n].sort().values for n in (120, 90, 150)]
    formed_table, fused_table = start.clone(), start.clone()
    formed, fused = _optimizer(kind, formed_table), _optimizer(kind, fused_table)
    grads = [torch.randn(len(ids), dim + 1, generator=g) for ids in requests]
    runs, formed_runs = [], []
    for ids, grad_out in zip(requests, grads, strict=True):
        rows, packed = _sampled(formed_table, ids, dim)
        packed.backward(grad_out)
        formed_runs.append((ids, rows.grad))
        _, packed = _sampled(fused_table, ids, dim)
        runs.append((stream_sample_of(packed), grad_out))
    merged = native.merge_rows(formed_runs)
    assert merged is not None
    formed.step(formed_table, *merged)
    updated = fused.step_sampled(fused_table, runs)
    assert updated is not None and torch.equal(updated, merged[0])
    torch.testing.assert_close(fused_table, formed_table, rtol=1e-5, atol=1e-5)
    for ours, theirs in zip(_states(fused), _states(formed), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert fused.step_sampled(fused_table, [*runs[::-1], (runs[0][0], runs[0][1])]) is not None  # any run order
    unsorted = StreamSample(fused_table, requests[0].flip(0), runs[0][0].eps)
    assert fused.step_sampled(fused_table, [(unsorted, grads[0]), runs[1]]) is None  # several: each ascending


@pytest.mark.parametrize("kind", ["adagrad", "adam"])
def test_the_sampled_update_declines_what_it_cannot_take_and_refuses_a_row_outside_the_table(kind):
    dim, g = 8, torch.Generator().manual_seed(7)
    table, other = torch.randn(50, 2 * dim, generator=g), torch.randn(50, 2 * dim, generator=g)
    local, grad_out = torch.arange(10), torch.randn(10, dim + 1, generator=g)
    _, packed = _sampled(table, local, dim)
    sample = stream_sample_of(packed)
    assert sample is not None and stream_sample_of(packed.detach()) is None
    opt = _optimizer(kind, table)
    assert _optimizer(kind, other).step_sampled(other, [(sample, grad_out)]) is None  # another table's
    assert opt.step_sampled(table, [(sample, grad_out[:, :dim])]) is None  # not [sample | KL]
    assert _optimizer(kind, table, compiled=False).step_sampled(table, [(sample, grad_out)]) is None
    assert opt.step_sampled(table, [(sample, grad_out)] * 65) is None  # more runs than the merge takes
    wide = torch.randn(4, 2 * 2100, generator=g)  # a row wider than the kernel's buffer
    _, packed = _sampled(wide, torch.arange(4), 2100)
    assert _optimizer(kind, wide).step_sampled(wide, [(stream_sample_of(packed), torch.ones(4, 2101))]) is None
    before = table.clone()
    outside = StreamSample(table, torch.tensor([3, 50]), sample.eps[:2])
    with pytest.raises(IndexError, match="outside the table's 50 rows"):
        opt.step_sampled(table, [(outside, grad_out[:2])])
    assert torch.equal(table, before)
    assert opt.state_dict().get("num_steps", 0) == 0  # a declined or refused update is no step
