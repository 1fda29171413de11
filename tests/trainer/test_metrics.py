"""The Prometheus exporter, the Grafana dashboard's queries against what a real run serves, the restart
count across resumes, and a real Prometheus scraping a real run."""

import json
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from sharding.exchange import LocalExchange
from tests.sharding.conftest import free_port
from tests.trainer.conftest import make_config
from trainer import checkpoint
from trainer.config import RunConfig
from trainer.loop import Training, train
from trainer.metrics import MetricsExporter

ROOT = Path(__file__).parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "nvkg.json"


@pytest.fixture
def exporter(tmp_path):
    exp = MetricsExporter(
        run="run-a", rank=1, host="127.0.0.1", port=free_port() - 1, discovery_dir=str(tmp_path), restarts=3
    )
    exp.observe_step(nll=10.0, kl=2.5, kl_weight=0.5, positives=100, seconds=0.5, lr=0.01, step=7)
    exp.observe_variance(0.25)
    exp.observe_epoch(3, {"filtered": {"mrr": 0.5, "hits@1": 0.4, "hits@3": 0.6, "hits@10": 0.8}})
    exp.observe_duration("evaluation", 42.0)
    yield exp
    exp.close()


def _scrape(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        return response.read().decode()


def test_exporter_serves_labelled_series_on_loopback(exporter, tmp_path):
    text = _scrape(exporter.address)
    assert exporter.address.startswith("127.0.0.1:")
    assert 'nvkg_negative_elbo{run="run-a",worker="1"} 12.5' in text
    assert 'nvkg_expected_log_likelihood{run="run-a",worker="1"} -10.0' in text
    assert 'nvkg_positives_per_second{run="run-a",worker="1"} 200.0' in text
    assert 'nvkg_eval_hits_ratio{k="10",run="run-a",split="valid",worker="1"} 0.8' in text
    assert 'nvkg_restarts_total{run="run-a",worker="1"} 3.0' in text
    # 0.5 s falls in the 0.5 bucket, not the 0.25 one; 42 s between 25 and 60.
    assert 'nvkg_step_duration_seconds_bucket{le="0.25",run="run-a",worker="1"} 0.0' in text
    assert 'nvkg_step_duration_seconds_bucket{le="0.5",run="run-a",worker="1"} 1.0' in text
    assert 'nvkg_evaluation_duration_seconds_bucket{le="25.0",run="run-a",worker="1"} 0.0' in text
    assert 'nvkg_evaluation_duration_seconds_bucket{le="60.0",run="run-a",worker="1"} 1.0' in text
    assert 'nvkg_evaluation_duration_seconds_sum{run="run-a",worker="1"} 42.0' in text
    # The process's own series come back from the private registry, with the worker's labels.
    resident = re.search(r'^process_resident_memory_bytes\{run="run-a",worker="1"\} (\S+)$', text, re.M)
    assert resident and float(resident.group(1)) > 10e6
    assert re.search(r'^python_info\{.*run="run-a".*worker="1"\} 1\.0$', text, re.M)
    assert re.search(r'^python_gc_collections_total\{generation="0",run="run-a",worker="1"\} ', text, re.M)
    assert "job=" not in text
    # No target labels in the discovery file: the series carry run and worker (no exported_* collisions).
    port = exporter.address.rsplit(":", 1)[1]
    (target,) = json.loads((tmp_path / f"nvkg-run-a-worker1-port{port}.json").read_text())
    assert target == {"targets": [exporter.address]}


def test_two_runs_of_one_name_keep_their_own_discovery_files(tmp_path):
    """Run directories of one name (the run label) in two places: one run's end must not unlist the other."""
    first = MetricsExporter(run="r", rank=0, host="127.0.0.1", port=free_port(), discovery_dir=str(tmp_path))
    second = MetricsExporter(run="r", rank=0, host="127.0.0.1", port=free_port(), discovery_dir=str(tmp_path))
    assert len(list(tmp_path.glob("nvkg-r-worker0-port*.json"))) == 2
    second.close()
    (left,) = tmp_path.glob("nvkg-r-worker0-port*.json")
    assert json.loads(left.read_text()) == [{"targets": [first.address]}]
    first.close()
    assert not list(tmp_path.glob("*.json"))


def test_a_run_that_fails_takes_its_endpoint_and_discovery_file_with_it(tmp_path):
    from trainer.config import load_config
    from trainer.loop import train

    overrides = ["data.dataset=nations", "model.dim=4", "train.epochs=3", "train.progress=false", "optim.lr=1e30",
                 "train.on_divergence=stop", f"metrics.port={free_port()}", f"metrics.discovery_dir={tmp_path / 'sd'}",
                 f"data.cache_dir={tmp_path / 'c'}"]  # fmt: skip
    config = load_config(None, overrides)
    with pytest.raises(ValueError, match="diverged"):
        train(config, tmp_path / "run")
    assert not list((tmp_path / "sd").glob("*.json"))


def _expressions(node) -> list[str]:
    if isinstance(node, dict):
        found = [v for k, v in node.items() if k in ("expr", "definition") and isinstance(v, str)]
        return found + [e for v in node.values() for e in _expressions(v)]
    if isinstance(node, list):
        return [e for v in node for e in _expressions(v)]
    return []


@contextmanager
def _live_run(config: RunConfig, out: Path, dataset) -> Iterator[Training]:
    """A run set up (resuming when ``out`` has a checkpoint) and trained to its last epoch, its endpoint
    still serving until the block ends."""
    run = Training.set_up(config, out, dataset, LocalExchange(), None)
    try:
        while run.state.epoch < config.train.epochs:
            run.end_epoch(run.train_epoch(run.state.epoch))
        yield run
    finally:
        run.close()


def _served(address: str) -> dict[str, set[str]]:
    """Sample name -> its label names, as the endpoint serves them (parsed by prometheus-client's parser)."""
    served: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(_scrape(address)):
        for sample in family.samples:
            served.setdefault(sample.name, set()).update(sample.labels)
    return served


SELECTOR = re.compile(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\{([^}]*)\}")
MATCHER = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)\s*"')
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
METRIC = re.compile(r"\b(?:nvkg|process|python)_[a-z0-9_]+")
LABEL_VALUES = re.compile(r"label_values\(\s*([a-zA-Z_:][a-zA-Z0-9_:]*)\s*,\s*([a-zA-Z_]+)\s*\)")


def _targets(node) -> list[dict]:
    if isinstance(node, dict):
        found = [node] if "expr" in node else []
        return found + [t for v in node.values() for t in _targets(v)]
    if isinstance(node, list):
        return [t for v in node for t in _targets(v)]
    return []


def test_dashboard_queries_only_series_a_real_run_serves(tmp_path, tiny_dataset):
    """Every metric, label matcher, grouping label and legend label of every dashboard query exists in what
    a real run's endpoint serves after training and evaluating; every selector filters on $run."""
    settings = ["train.epochs=2", "train.eval_every=1", "train.checkpoint_every=1", f"metrics.port={free_port()}"]
    config = make_config(*settings)
    with _live_run(config, tmp_path, tiny_dataset) as run:
        assert run.logger.exporter is not None
        served = _served(run.logger.exporter.address)
    dashboard = json.loads(DASHBOARD.read_text())
    expressions = _expressions(dashboard)
    assert len(expressions) >= 17, expressions
    used = set[str]()
    for expr in expressions:
        names = set(METRIC.findall(expr))
        assert names <= set(served), (expr, names - set(served))
        used |= names
        for name, label in LABEL_VALUES.findall(expr):
            assert label in served[name], expr
        selectors = SELECTOR.findall(expr)
        available = set().union(*(served[name] for name, _ in selectors)) if selectors else set()
        for name, matchers in selectors:
            labels = set(MATCHER.findall(matchers))
            assert "run" in labels and labels <= served[name], (expr, name, labels - served[name])
        groupings = [{g.strip() for g in group.split(",")} for group in GROUPING.findall(expr)]
        for group in groupings:
            assert group <= available, (expr, group - available)
        result_labels = (set.intersection(*groupings) if groupings else available) - {"le"}
        for target in (t for t in _targets(dashboard) if t["expr"] == expr):
            legend = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")))
            assert legend <= result_labels, (expr, legend - result_labels)
    for required in (
        "nvkg_negative_elbo", "nvkg_kl_divergence", "nvkg_positives_per_second", "nvkg_eval_mrr",
        "nvkg_entity_variance_mean", "nvkg_restarts_total", "process_resident_memory_bytes",
        "nvkg_step_duration_seconds_bucket", "nvkg_evaluation_duration_seconds_count",
        "nvkg_checkpoint_write_duration_seconds_count",
    ):  # fmt: skip
        assert required in used
    assert not any(re.search(r"\bjob\b", expr) for expr in expressions)


def test_the_run_variable_lists_a_run_from_its_first_scrape(tmp_path):
    """The dashboard's $run choices come from a series every worker serves before its first step (an epoch
    at Freebase scale takes hours, and memory is what to watch in it)."""
    dashboard = json.loads(DASHBOARD.read_text())
    (variable,) = [v for v in dashboard["templating"]["list"] if v["name"] == "run"]
    ((name, label),) = LABEL_VALUES.findall(variable["definition"])
    fresh = MetricsExporter(run="fresh", rank=0, host="127.0.0.1", port=free_port(), discovery_dir=None)
    try:
        served = _served(fresh.address)
    finally:
        fresh.close()
    assert name in served and label in served[name], (name, sorted(served))


def _value(address: str, name: str) -> float:
    (value,) = [
        sample.value
        for family in text_string_to_metric_families(_scrape(address))
        for sample in family.samples
        if sample.name == name
    ]
    return value


def test_restart_count_survives_resumes(tmp_path, tiny_dataset):
    settings = ["train.checkpoint_every=1", f"metrics.port={free_port()}"]
    for restarts, epochs in enumerate((1, 2, 3)):
        with _live_run(make_config(f"train.epochs={epochs}", *settings), tmp_path, tiny_dataset) as run:
            assert run.logger.exporter is not None
            assert run.state.restarts == restarts
            assert _value(run.logger.exporter.address, "nvkg_restarts_total") == restarts
            # ... and each resumed run went on to its new last epoch.
            assert _value(run.logger.exporter.address, "nvkg_epoch") == epochs
    assert checkpoint.read_index(tmp_path / checkpoint.LATEST)["state"]["restarts"] == 2


def test_a_restart_that_dies_before_its_next_checkpoint_still_counts(tmp_path, tiny_dataset):
    config = make_config("train.epochs=1", "train.checkpoint_every=1")
    train(config, tmp_path, tiny_dataset)
    for expected in (1, 2):  # two starts that die before writing a checkpoint
        run = Training.set_up(config, tmp_path, tiny_dataset, LocalExchange(), None)
        assert run.state.restarts == expected
        run.logger.close()
    assert checkpoint.read_restarts(tmp_path) == 2
    assert checkpoint.read_index(tmp_path / checkpoint.LATEST)["state"]["restarts"] == 0  # not rewritten


def test_provisioning_points_grafana_at_the_dashboards():
    provider = yaml.safe_load((ROOT / "deploy/grafana/provisioning/dashboards/nvkg.yaml").read_text())
    compose = yaml.safe_load((ROOT / "deploy/docker-compose.yml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./grafana/dashboards:{provider['providers'][0]['options']['path']}:ro" in mounts
    datasource = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/prometheus.yaml").read_text())
    assert datasource["datasources"][0]["type"] == "prometheus"


def test_a_busy_port_is_a_clear_error(tmp_path, tiny_dataset):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ValueError, match=rf"metrics.port={port}: cannot serve 127.0.0.1:{port}"):
            train(make_config("train.epochs=1", f"metrics.port={port}"), tmp_path, tiny_dataset)


def _wait_ready(url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        assert time.monotonic() < deadline, f"{url} not ready after {timeout:.0f}s"
        time.sleep(0.5)


@pytest.mark.skipif(shutil.which("prometheus") is None, reason="Prometheus server not installed (.ci/run installs it)")
def test_prometheus_scrapes_elbo_and_kl_of_a_real_run(tmp_path):
    """A default scrape config (no honor_labels): the trainer's run and worker labels arrive as they are."""
    port, prom_port = free_port(), free_port()
    config = {
        "global": {"scrape_interval": "1s"},
        "scrape_configs": [{"job_name": "nvkg", "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    server = subprocess.Popen(
        ["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{prom_port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        _wait_ready(f"http://127.0.0.1:{prom_port}/-/ready")  # so it scrapes from the run's first seconds
        run = subprocess.run(
            [sys.executable, "-m", "trainer", "train", "--config", "configs/default.yaml",
             "--out", str(tmp_path / "run"), "--set", "train.epochs=150", "--set", "train.eval_every=50",
             "--set", f"metrics.port={port}", "--set", "train.progress=false"],
            cwd=ROOT, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert run.returncode == 0, run.stderr
        for metric in ("nvkg_negative_elbo", "nvkg_kl_divergence", "process_resident_memory_bytes"):
            query = urllib.parse.urlencode({"query": f'max_over_time({metric}{{run="run"}}[10m])'})
            deadline = time.monotonic() + 30
            while True:
                with urllib.request.urlopen(f"http://127.0.0.1:{prom_port}/api/v1/query?{query}", timeout=10) as r:
                    result = json.loads(r.read())["data"]["result"]
                if result or time.monotonic() > deadline:
                    break
                time.sleep(1)
            assert result and float(result[0]["value"][1]) > 0, (metric, result)
            labels = result[0]["metric"]
            assert (labels["worker"], labels["job"]) == ("0", "nvkg") and "exported_run" not in labels, labels
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_no_step_series_shows_a_value_before_the_first_step():
    fresh = MetricsExporter(run="fresh", rank=0, host="127.0.0.1", port=free_port(), discovery_dir=None)
    try:
        families = text_string_to_metric_families(_scrape(fresh.address))
        served = {sample.name for family in families for sample in family.samples}
        assert "nvkg_restarts_total" in served  # labelled at start, so a panel lists the run from the start
        assert not served & {"nvkg_negative_elbo", "nvkg_kl_divergence", "nvkg_positives_per_second", "nvkg_step"}
        for step in range(2):
            fresh.observe_step(nll=1.0 + step, kl=0.5, kl_weight=1.0, positives=8, seconds=0.1, lr=0.1, step=step)
        assert _value(fresh.address, "nvkg_negative_elbo") == 2.5
        assert _value(fresh.address, "nvkg_steps_total") == 2.0
    finally:
        fresh.close()
