"""deploy/prometheus: configs and rules pass promtool, alerts pass their unit tests, and every
metric the rules read is one the services export."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

from gateway.metrics import GatewayMetrics
from worker.metrics import WorkerMetrics

PROMETHEUS_DIR = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
RULE_FILES = sorted((PROMETHEUS_DIR / "rules").glob("*.yml"))
# Series Prometheus makes itself, not the services.
BUILT_IN = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    path = shutil.which("promtool")
    assert path, "promtool missing: apt-get install prometheus (cluster/system-deps.sh)"
    return subprocess.run(
        [path, *args], cwd=PROMETHEUS_DIR, capture_output=True, text=True, timeout=60, check=False
    )


@pytest.mark.parametrize("config", ["prometheus.yml", "kubernetes.yml"])
def test_configs_pass_promtool(config: str) -> None:
    result = promtool("check", "config", config)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 rule files found" in result.stdout


def test_rules_pass_promtool() -> None:
    result = promtool("check", "rules", *(str(p) for p in RULE_FILES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_unit_tests_pass() -> None:
    result = promtool("test", "rules", "tests/alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def exported_series() -> set[str]:
    """Every series name the gateway and worker registries can expose (histogram parts too)."""
    names: set[str] = set()
    registries: list[CollectorRegistry] = [GatewayMetrics().registry, WorkerMetrics().registry]
    for registry in registries:
        for family in registry.collect():
            names.add(family.name)
            suffixes = {
                "counter": ("_total",),
                "histogram": ("_bucket", "_count", "_sum"),
            }.get(family.type, ())
            names.update(family.name + suffix for suffix in suffixes)
    return names


def rule_metric_names() -> set[str]:
    """Names of raw series in rule expressions: identifiers followed by a selector or range."""
    recorded = set()
    expressions = []
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                expressions.append(rule["expr"])
                if "record" in rule:
                    recorded.add(rule["record"])
    found: set[str] = set()
    for expr in expressions:
        found.update(re.findall(r"(?<![\w:])([a-z_][a-z0-9_]*)\s*[{\[]", expr))
    return found - recorded - {"rate", "sum", "max", "vector", "histogram_quantile", "scalar"}


def test_rules_read_only_exported_metrics() -> None:
    names = rule_metric_names()
    assert "worker_stream_worst_gap_seconds_bucket" in names
    assert names - BUILT_IN <= exported_series(), names - BUILT_IN - exported_series()
