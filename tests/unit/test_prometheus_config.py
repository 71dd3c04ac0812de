"""deploy/prometheus: configs and rules pass promtool, alerts pass their unit tests, and every
series the rules read is one the services export."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import yaml

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


def test_local_config_passes_promtool() -> None:
    result = promtool("check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 rule files found" in result.stdout


def test_kubernetes_config_passes_promtool(tmp_path: Path) -> None:
    """Debian's promtool has no Kubernetes service discovery: the pod discovery block is
    checked for its shape here, and everything else (relabelling, rules) by promtool with
    static targets in its place."""
    doc = yaml.safe_load((PROMETHEUS_DIR / "kubernetes.yml").read_text())
    (pods,) = [job for job in doc["scrape_configs"] if "kubernetes_sd_configs" in job]
    assert pods.pop("kubernetes_sd_configs") == [{"role": "pod", "namespaces": {"names": ["tts"]}}]
    pods["static_configs"] = [{"targets": ["10.0.0.1:8000"]}]
    relabelled = {rule.get("target_label") for rule in pods["relabel_configs"]}
    assert {"job", "namespace", "pod", "instance", "__address__"} <= relabelled
    doc["rule_files"] = [str(PROMETHEUS_DIR / path) for path in doc["rule_files"]]
    checked = tmp_path / "kubernetes.yml"
    checked.write_text(yaml.safe_dump(doc))
    result = promtool("check", "config", str(checked))
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
