"""The worker exports its GPU memory for the dashboard (names in deploy/grafana/dashboard.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from worker.metrics import WorkerMetrics


def test_gpu_memory_is_read_at_each_scrape(monkeypatch: pytest.MonkeyPatch) -> None:
    held = {"bytes": 1_000}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda index: held["bytes"] + index)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda index: SimpleNamespace(total_memory=144 * 2**30))
    metrics = WorkerMetrics()
    metrics.watch_gpu("cuda:1")
    text = metrics.render().decode()
    assert 'worker_gpu_memory_bytes{device="cuda:1"} 1001.0' in text
    assert 'worker_gpu_memory_limit_bytes{device="cuda:1"} 1.54618822656e+11' in text
    held["bytes"] = 5_000
    assert 'worker_gpu_memory_bytes{device="cuda:1"} 5001.0' in metrics.render().decode()


def test_no_gpu_exports_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    metrics = WorkerMetrics()
    metrics.watch_gpu("cuda")
    assert "worker_gpu_memory" not in metrics.render().decode()
