"""What the monitoring files ask of the services: the series names in the dashboard's and the
recording rules' PromQL, and the series the gateway and worker registries can expose."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from gateway.metrics import GatewayMetrics
from worker.metrics import WorkerMetrics

REPO_ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = REPO_ROOT / "deploy" / "prometheus"
GRAFANA_DIR = REPO_ROOT / "deploy" / "grafana"
RULE_FILES = sorted((PROMETHEUS_DIR / "rules").glob("*.yml"))
PROMQL_WORDS = frozenset(
    {"sum", "min", "max", "rate", "histogram_quantile", "vector", "scalar", "on", "or", "by"}
)
BUILT_IN = frozenset({"up"})
"""Series Prometheus makes itself, not the services."""


def metric_names(expr: str) -> set[str]:
    """Series names in a PromQL expression: identifiers outside label matchers, ranges and
    `by (...)` lists that are not functions, keywords or recorded (`level:name:op`) series."""
    stripped = re.sub(r"\{[^}]*\}|by \([^)]*\)|\[[^\]]*\]|\"[^\"]*\"", " ", expr)
    words = set(re.findall(r"(?<![\w:.$])([a-z_][a-z0-9_]*)(?![\w(:])", stripped))
    return words - PROMQL_WORDS


def recording_rules() -> dict[str, str]:
    """Recorded series name -> its expression, over every rule file."""
    rules: dict[str, str] = {}
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                if "record" in rule:
                    rules[rule["record"]] = rule["expr"]
    return rules


def alert_rules() -> dict[str, str]:
    alerts: dict[str, str] = {}
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                if "alert" in rule:
                    alerts[rule["alert"]] = rule["expr"]
    return alerts


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every query of every panel of the committed dashboard."""
    board = json.loads((GRAFANA_DIR / "tts.json").read_text())
    return [
        (panel["title"], target["expr"])
        for panel in board["panels"]
        if panel["type"] != "row"
        for target in panel["targets"]
    ]


def exported_series() -> set[str]:
    """Every series name the gateway and worker registries can expose (histogram parts too)."""
    names: set[str] = set()
    for registry in (GatewayMetrics().registry, WorkerMetrics().registry):
        for family in registry.collect():
            names.add(family.name)
            suffixes = {
                "counter": ("_total",),
                "histogram": ("_bucket", "_count", "_sum"),
            }.get(family.type, ())
            names.update(family.name + suffix for suffix in suffixes)
    return names
