import pytest
import torch

from bench import step_profile


@pytest.fixture(scope="module")
def profiled(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(3)  # neither 1 nor 2: what the profile must put back
    try:
        run = step_profile.set_up("kinships", tmp_path_factory.mktemp("step"))
        per_threads = step_profile.profile(run, epochs=step_profile.WARM_UP + 2)
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(threads)
    return run, per_threads


def test_each_kernel_is_timed_once_a_step_and_the_timers_are_taken_out(profiled):
    run, per_threads = profiled
    assert [len(per_threads[t]) for t in (1, 2)] == [1, 1]  # the warm-up dropped, then one epoch each
    for row in (*per_threads[1], *per_threads[2]):
        # The relation table's update goes through the same class's step: only the entity table's counts.
        assert row["calls_per_step"] == {column: 1.0 for column in step_profile.KERNELS}
        assert all(row[column] > 0 for column in step_profile.KERNELS) and row["rest_ms"] > 0
        assert 0 < row["distinct_rows"] <= run.dataset.num_entities
    assert "step" not in vars(run.model.entities)
    for owner, name in step_profile.timed_functions(run).values():
        assert getattr(owner, name).__name__ != "timed"


def test_the_bounds_are_the_products_and_the_traffic_at_the_measured_rates(profiled):
    run, per_threads = profiled
    bounds = {"gemm_gflops": 100.0, "copy_gbps": 10.0, "row_bytes": step_profile.row_bytes(run)}
    # mean and log-variance of 128 numbers each, and row-wise Adagrad's two accumulators (one per half)
    assert bounds["row_bytes"] == (2 * 128 + 2) * 4
    rows = step_profile.summarise(per_threads, bounds)
    two = rows[1]
    assert bounds["products_mflop_per_step"] == 3 * 1024 * 64 * 128 * 2 / 1e6  # 3 B K D multiply-adds
    assert bounds["products_floor_ms"] == pytest.approx(bounds["products_mflop_per_step"] / 100.0)
    assert bounds["traffic_mb_per_step"] == pytest.approx(two["distinct_rows"] * bounds["row_bytes"] * 2 / 1e6)
    assert "| 1 / 2 |" in step_profile.markdown(rows, bounds, "kinships")


def test_a_step_without_the_compiled_kernel_is_refused(tmp_path, monkeypatch):
    run = step_profile.set_up("kinships", tmp_path)
    monkeypatch.setitem(vars(run.model), "writes_gradients", False)  # as without a compiler or on CUDA
    with pytest.raises(RuntimeError, match="does not run the compiled Bernoulli kernel"):
        step_profile.profile(run, epochs=4)
