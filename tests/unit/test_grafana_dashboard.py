"""deploy/grafana: the committed dashboard is what its generator builds, and reads only
series the services export."""

from __future__ import annotations

import importlib.util
import json
import sys
from types import ModuleType
from typing import Any

from tests.support.monitoring import (
    BUILT_IN,
    GRAFANA_DIR,
    dashboard_queries,
    exported_series,
    metric_names,
)


def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("tts_dashboard", GRAFANA_DIR / "dashboard.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


def panels() -> list[dict[str, Any]]:
    board = json.loads((GRAFANA_DIR / "tts.json").read_text())
    return [p for p in board["panels"] if p["type"] != "row"]


def test_committed_json_is_current() -> None:
    assert generator().main(["--check"]) == 0, "run: .venv/bin/python deploy/grafana/dashboard.py"


def test_panels_cover_the_operator_questions() -> None:
    titles = {p["title"] for p in panels()}
    for wanted in (
        "Requests by route and status",
        "Errors by code",
        "Time to first audio",
        "Real-time factor",
        "Audio-seconds per second",
        "Active streams and queue per worker",
        "Worst gap behind playback",
        "Cache hit ratio",
        "Redis errors",
        "Redis memory",
        "GPU memory per worker",
    ):
        assert wanted in titles
    board = json.loads((GRAFANA_DIR / "tts.json").read_text())
    ids = [panel["id"] for panel in board["panels"]]
    assert len(set(ids)) == len(ids)
    assert all(isinstance(i, int) and i > 0 for i in ids)
    for panel in panels():
        assert panel["targets"], panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}


def test_queries_read_only_exported_metrics() -> None:
    module = generator()
    known = exported_series() | BUILT_IN | module.OPTIONAL_METRICS | module.REDIS_EXPORTER_METRICS
    for title, expr in dashboard_queries():
        names = metric_names(expr)
        assert names, (title, expr)
        assert names <= known, (title, names - known)
