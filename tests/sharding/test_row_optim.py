import pytest
import torch

from sharding.kernels import native
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


def _random_steps(optimizer: type, compiled: bool, rows: int, width: int, touched: int) -> list[torch.Tensor]:
    """Five updates of random unique rows of a table; the table and state after them."""
    g = torch.Generator().manual_seed(3)
    param = torch.randn(rows, width, generator=g)
    parts = {"parts": 2} if optimizer is RowAdagrad else {}  # Adagrad: [mean | logvar] halves
    opt = optimizer(param, lr=0.05, compiled=compiled, **parts)
    for _ in range(5):
        ids = torch.randperm(rows, generator=g)[:touched].sort().values
        opt.step(param, ids, torch.randn(touched, width, generator=g))
    return [param, *(v for v in opt.state_dict().values() if torch.is_tensor(v))]


@pytest.mark.parametrize("optimizer", [RowAdam, RowAdagrad])
@pytest.mark.parametrize("size", [(50, 12, 17), (4000, 256, 700)])  # one thread; split over the threads
def test_compiled_row_update_equals_the_torch_ops(optimizer, size):
    assert native.library() is not None, "the C kernel did not build (is cc installed?)"
    compiled, reference = _random_steps(optimizer, True, *size), _random_steps(optimizer, False, *size)
    start = torch.randn(*size[:2], generator=torch.Generator().manual_seed(3))
    assert not torch.equal(compiled[0], start)
    for ours, theirs in zip(compiled, reference, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("optimizer", [RowAdam, RowAdagrad])
def test_compiled_row_update_refuses_an_id_outside_the_table(optimizer):
    param = torch.zeros(4, 8)
    opt = optimizer(param, lr=0.1)
    with pytest.raises(IndexError, match="outside the table's 4 rows"):
        opt.step(param, torch.tensor([1, 4]), torch.ones(2, 8))
    assert torch.equal(param, torch.zeros(4, 8))


def test_kernel_is_built_once_into_the_cache_and_then_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("NVKG_NATIVE_CACHE", str(tmp_path))
    native.library.cache_clear()
    try:
        assert native.library() is not None
        built = sorted(tmp_path.iterdir())
        assert [p.suffix for p in built] == [".so", ".sha256"]
        native.library.cache_clear()
        stamp = built[0].stat().st_mtime_ns
        assert native.library() is not None
        assert built[0].stat().st_mtime_ns == stamp  # loaded, not rebuilt
    finally:
        native.library.cache_clear()


def test_without_a_compiler_updates_fall_back_to_torch_ops(tmp_path, monkeypatch):
    monkeypatch.setenv("NVKG_NATIVE_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "no-such-compiler")
    native.library.cache_clear()
    try:
        with pytest.warns(UserWarning, match="no C compiler"):
            assert native.library() is None
        param = torch.zeros(3, 4)
        RowAdam(param, lr=0.1).step(param, torch.tensor([2]), torch.ones(1, 4))
        assert torch.all(param[2] < 0) and torch.equal(param[:2], torch.zeros(2, 4))
    finally:
        native.library.cache_clear()


def test_a_failed_build_warns_with_the_compiler_and_leaves_nothing_in_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NVKG_NATIVE_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a "compiler" that exits 1
    native.library.cache_clear()
    try:
        with pytest.warns(UserWarning, match="failed, torch ops are used instead"):
            assert native.library() is None
        assert list(tmp_path.iterdir()) == []
    finally:
        native.library.cache_clear()


def test_a_cache_others_can_write_is_refused_and_torch_ops_are_used(tmp_path, monkeypatch):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # world-writable, not sticky: anyone could swap the cache directory for their own
    monkeypatch.setenv("NVKG_NATIVE_CACHE", str(shared / "native"))
    native.library.cache_clear()
    try:
        with pytest.warns(UserWarning, match="writable by everyone"):
            assert native.library() is None
        assert not (shared / "native").exists() or not any((shared / "native").iterdir())
    finally:
        native.library.cache_clear()


def test_a_replaced_library_is_not_loaded(tmp_path, monkeypatch):
    """A library of the expected name that is not the one built here (a plant, or a torn copy) is refused
    before it is loaded, so its constructor never runs; torch ops take over."""
    monkeypatch.setenv("NVKG_NATIVE_CACHE", str(tmp_path))
    native.library.cache_clear()
    try:
        assert native.library() is not None
        (library,) = tmp_path.glob("*.so")
        planted = library.with_name("planted.tmp")
        planted.write_bytes(b"\x7fELF planted")
        planted.replace(library)  # a new file under the name (writing into the loaded one would fault it)
        native.library.cache_clear()
        with pytest.warns(UserWarning, match="does not match the sha256"):
            assert native.library() is None
        param = torch.zeros(3, 4)
        RowAdam(param, lr=0.1).step(param, torch.tensor([2]), torch.ones(1, 4))
        assert torch.all(param[2] < 0)
    finally:
        native.library.cache_clear()


def test_the_cache_is_created_private_and_made_private(tmp_path, monkeypatch):
    monkeypatch.setenv("NVKG_NATIVE_CACHE", str(tmp_path / "new" / "native"))
    native.library.cache_clear()
    try:
        assert native.library() is not None
        assert (tmp_path / "new" / "native").stat().st_mode & 0o777 == 0o700
        (tmp_path / "new" / "native").chmod(0o775)  # as a umask of 002 would have made it
        native.library.cache_clear()
        assert native.library() is not None
        assert (tmp_path / "new" / "native").stat().st_mode & 0o777 == 0o700
    finally:
        native.library.cache_clear()


def _torch_merge(runs: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    unique, inverse = torch.unique(torch.cat([ids for ids, _ in runs]), return_inverse=True)
    grad = torch.cat([g for _, g in runs])
    return unique, grad.new_zeros(len(unique), grad.shape[1]).index_add_(0, inverse, grad)


@pytest.mark.parametrize("num_runs", [1, 2, 5])
def test_merged_gradient_rows_equal_torch_unique_and_index_add(num_runs):
    if native.library() is None:
        pytest.skip("no C compiler")
    g = torch.Generator().manual_seed(num_runs)
    runs = []
    for _ in range(num_runs):
        ids = torch.randperm(50, generator=g)[: int(torch.randint(0, 30, (), generator=g))].sort().values
        grad = torch.randn(len(ids), 7, generator=g)
        grad[:, 0] = -0.0  # index_add_ into zeros makes it +0
        runs.append((ids, grad))
    merged = native.merge_rows(runs)
    assert merged is not None
    expected_ids, expected_grad = _torch_merge(runs)
    assert torch.equal(merged[0], expected_ids)
    # The same additions in the same order: bit for bit, the sign of a zero included.
    assert torch.equal(merged[1].view(torch.int32), expected_grad.view(torch.int32))


def test_merge_refuses_runs_it_cannot_merge():
    if native.library() is None:
        pytest.skip("no C compiler")
    grad = torch.ones(3, 2)
    assert native.merge_rows([(torch.tensor([0, 2, 2]), grad)]) is None  # not strictly ascending
    assert native.merge_rows([(torch.tensor([3, 1, 2]), grad)]) is None
    assert native.merge_rows([(torch.tensor([0, 1, 2]), torch.ones(3, 2, dtype=torch.float64))]) is None
    many = [(torch.tensor([i]), torch.ones(1, 2)) for i in range(native.MERGE_MAX_RUNS + 1)]
    assert native.merge_rows(many) is None
    assert native.merge_rows(many[:-1]) is not None


@pytest.mark.parametrize(
    ("n", "high"),
    [(4096, 40_559), (100_000, 86_000_000), (3_000, 2**40), (5_000, 3), (10, 1), (1, 7), (0, 7)],
)
def test_unique_ids_equals_torch_unique(n, high):
    """A step's batch ids (and a Freebase-sized range, ids past 2^32, all one id, none) as torch.unique gives
    them: ascending distinct ids and each position's index among them."""
    if native.library() is None:
        pytest.skip("no C compiler")
    ids = torch.randint(0, high, (n,), generator=torch.Generator().manual_seed(n))
    got = native.unique_ids(ids)
    assert got is not None
    want = torch.unique(ids, return_inverse=True)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_unique_ids_refuses_what_it_cannot_sort():
    if native.library() is None:
        pytest.skip("no C compiler")
    assert native.unique_ids(torch.tensor([3, -1, 2])) is None  # a negative id
    assert native.unique_ids(torch.tensor([0, 2**62, 5])) is None  # (id, position) past 64 bits
    assert native.unique_ids(torch.tensor([[1, 2]])) is None
    assert native.unique_ids(torch.tensor([1, 2], dtype=torch.int32)) is None
    assert native.unique_ids(torch.arange(6)[::2]) is None  # not contiguous


@pytest.mark.parametrize("optimizer", [RowAdam, RowAdagrad])
def test_a_gradient_of_the_wrong_shape_never_reaches_the_kernel(optimizer):
    """Fewer gradient rows than ids would have the kernel read past the gradient's end (and torch's fused
    Adam does not check): refused with both shapes, compiled or not, before anything is written."""
    for compiled in (True, False):
        param = torch.zeros(10, 8)
        opt = optimizer(param, lr=0.1, compiled=compiled)
        with pytest.raises(ValueError, match=r"gradient \[2, 8\] for ids \[3\] of rows \[10, 8\]"):
            opt.step(param, torch.tensor([1, 2, 3]), torch.ones(2, 8))
        assert torch.equal(param, torch.zeros(10, 8))
