"""deploy/prometheus: configs and rules pass promtool, alerts pass their unit tests, and every
series the rules read is one the services export."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from tests.support.monitoring import (
    BUILT_IN,
    PROMETHEUS_DIR,
    RULE_FILES,
    alert_rules,
    exported_series,
    metric_names,
    recording_rules,
)


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


def test_metric_names_finds_series_only() -> None:
    expr = (
        'max(gateway_worker_ready) / sum by (le, code) (rate(worker_x_bucket{code="a b"}[5m]))'
        " or on() vector(0) > tts:recorded:rate5m"
    )
    assert metric_names(expr) == {"gateway_worker_ready", "worker_x_bucket"}


def test_rules_read_only_exported_or_recorded_series() -> None:
    recorded = set(recording_rules())
    known = exported_series() | BUILT_IN
    for name, expr in {**recording_rules(), **alert_rules()}.items():
        assert metric_names(expr) <= known, (name, metric_names(expr) - known)
        for used in set(recorded_names(expr)):
            assert used in recorded, (name, used)


def recorded_names(expr: str) -> list[str]:
    return re.findall(r"\btts(?:_instance)?:[a-z0-9_]+:[a-z0-9_]+", expr)
