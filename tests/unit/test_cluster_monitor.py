"""cluster.monitor: the local Prometheus' configuration and its place in the cluster's plan."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from cluster import launcher, monitor, services
from cluster.settings import ClusterSettings


def settings(tmp_path: Path, **overrides: object) -> ClusterSettings:
    return ClusterSettings(run_dir=tmp_path, gateways=2, workers=3, **overrides)  # type: ignore[arg-type]


def test_config_scrapes_every_process_with_the_committed_rules(tmp_path: Path) -> None:
    cluster = settings(tmp_path, prometheus_port=9191, prometheus_scrape_interval="1s")
    doc = monitor.config(cluster)
    jobs = doc["scrape_configs"]
    targets = {job["job_name"]: job["static_configs"][0]["targets"] for job in jobs}
    assert targets == {
        "gateway": ["127.0.0.1:9000", "127.0.0.1:9001"],
        "worker": ["127.0.0.1:9100", "127.0.0.1:9101", "127.0.0.1:9102"],
        "redis": ["127.0.0.1:9121"],
        "prometheus": ["127.0.0.1:9191"],
    }
    assert doc["global"]["scrape_interval"] == "1s"
    assert [Path(p).name for p in doc["rule_files"]] == ["recording.yml", "alerts.yml"]
    assert all(Path(p).is_absolute() and Path(p).exists() for p in doc["rule_files"])


def test_written_config_passes_promtool(tmp_path: Path) -> None:
    cluster = settings(tmp_path)
    monitor.write_config(cluster)
    path = monitor.config_path(cluster)
    assert yaml.safe_load(path.read_text()) == monitor.config(cluster)
    promtool = shutil.which("promtool")
    assert promtool, "promtool missing: apt-get install prometheus"
    result = subprocess.run(
        [promtool, "check", "config", str(path)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("on", [False, True])
def test_prometheus_runs_last_and_stops_first_only_when_asked(tmp_path: Path, on: bool) -> None:
    names = [svc.name for svc in services.plan(settings(tmp_path, monitor=on))]
    assert ("prometheus" in names) is on
    assert ("redis-exporter" in names) is on
    if on:
        assert names[-2:] == ["redis-exporter", "prometheus"]
        prometheus = services.plan(settings(tmp_path, monitor=True))[-1]
        assert prometheus.binds == [("127.0.0.1", 9090)]
        assert "--web.listen-address=127.0.0.1:9090" in prometheus.argv
    assert launcher.STOP_ORDER[0] == "prometheus"
