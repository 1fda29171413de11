"""The Prometheus exporter, the Grafana dashboard's queries, and a real Prometheus scraping a real run."""

import json
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.sharding.conftest import free_port
from tests.trainer.conftest import make_config
from trainer.loop import train
from trainer.metrics import MetricsExporter

ROOT = Path(__file__).parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "nvkg.json"


@pytest.fixture
def exporter(tmp_path):
    exp = MetricsExporter(job="run-a", rank=1, host="127.0.0.1", port=free_port() - 1, discovery_dir=str(tmp_path))
    exp.observe_step(nll=10.0, kl=2.5, kl_weight=0.5, positives=100, seconds=0.5, lr=0.01, step=7)
    exp.observe_variance(0.25)
    exp.observe_epoch(3, {"filtered": {"mrr": 0.5, "hits@1": 0.4, "hits@3": 0.6, "hits@10": 0.8}})
    exp.observe_restart()
    yield exp
    exp.close()


def _scrape(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        return response.read().decode()


def test_exporter_serves_labelled_series_on_loopback(exporter, tmp_path):
    text = _scrape(exporter.address)
    assert exporter.address.startswith("127.0.0.1:")
    assert 'nvkg_negative_elbo{job="run-a",worker="1"} 12.5' in text
    assert 'nvkg_expected_log_likelihood{job="run-a",worker="1"} -10.0' in text
    assert 'nvkg_positives_per_second{job="run-a",worker="1"} 200.0' in text
    assert 'nvkg_eval_hits_ratio{job="run-a",k="10",split="valid",worker="1"} 0.8' in text
    assert 'nvkg_restarts_total{job="run-a",worker="1"} 1.0' in text
    (target,) = json.loads((tmp_path / "nvkg-run-a-worker1.json").read_text())
    assert target == {"targets": [exporter.address], "labels": {"job": "run-a", "worker": "1"}}


def _expressions(node) -> list[str]:
    if isinstance(node, dict):
        found = [v for k, v in node.items() if k in ("expr", "definition") and isinstance(v, str)]
        return found + [e for v in node.values() for e in _expressions(v)]
    if isinstance(node, list):
        return [e for v in node for e in _expressions(v)]
    return []


def test_dashboard_queries_only_metrics_the_trainer_exports(exporter):
    exported = {sample.name for metric in exporter.registry.collect() for sample in metric.samples}
    expressions = _expressions(json.loads(DASHBOARD.read_text()))
    used = {name for expr in expressions for name in re.findall(r"\bnvkg_[a-z0-9_]+", expr)}
    assert len(expressions) >= 12 and used, expressions
    assert used <= exported, used - exported
    for required in ("nvkg_negative_elbo", "nvkg_kl_divergence", "nvkg_positives_per_second", "nvkg_eval_mrr",
                     "nvkg_entity_variance_mean", "nvkg_restarts_total"):  # fmt: skip
        assert required in used


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
    port, prom_port = free_port(), free_port()
    config = {
        "global": {"scrape_interval": "1s"},
        "scrape_configs": [
            {"job_name": "nvkg", "honor_labels": True, "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}
        ],
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
        for metric in ("nvkg_negative_elbo", "nvkg_kl_divergence"):
            query = urllib.parse.urlencode({"query": f'max_over_time({metric}{{job="run"}}[10m])'})
            deadline = time.monotonic() + 30
            while True:
                with urllib.request.urlopen(f"http://127.0.0.1:{prom_port}/api/v1/query?{query}", timeout=10) as r:
                    result = json.loads(r.read())["data"]["result"]
                if result or time.monotonic() > deadline:
                    break
                time.sleep(1)
            assert result and float(result[0]["value"][1]) > 0, (metric, result)
            assert result[0]["metric"]["worker"] == "0"
    finally:
        server.terminate()
        server.wait(timeout=30)
