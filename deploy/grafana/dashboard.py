"""The service's Grafana dashboard, built with grafana-foundation-sdk; writes tts.json.

`python deploy/grafana/dashboard.py` rewrites deploy/grafana/tts.json; `--check` exits 1 when
the committed file differs from what this code builds (the test suite runs it). Queries read
the raw series the gateways and workers export (`job` is `gateway` or `worker`, as the scrape
configs in deploy/prometheus set it); `$__rate_interval` is Grafana's own rate window.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders import common as common_builder
from grafana_foundation_sdk.builders import dashboard as dashboard_builder
from grafana_foundation_sdk.builders import prometheus, stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models.dashboard import DataSourceRef

OUTPUT = Path(__file__).with_name("tts.json")
DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
RATE = "[$__rate_interval]"
API_ROUTES = 'route!~"/healthz|/readyz|/metrics"'

REDIS_EXPORTER_METRICS = frozenset(
    {
        "redis_memory_used_bytes",
        "redis_memory_max_bytes",
        "redis_evicted_keys_total",
        "redis_keyspace_hits_total",
        "redis_keyspace_misses_total",
    }
)
"""Series of prometheus-redis-exporter (`job="redis"`) that the Redis panels read."""

OPTIONAL_METRICS = frozenset({"worker_gpu_memory_bytes", "worker_gpu_memory_limit_bytes"})
"""Series only some engines export (GPU memory: the cosyvoice engine); panels that read them
may be empty on a Piper cluster."""


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str


def _quantiles(metric: str, by: str = "") -> list[Query]:
    group = f"le, {by}" if by else "le"
    label = f"{{{{{by}}}}} " if by else ""
    return [
        Query(
            f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket{RATE})))",
            f"{label}p{round(q * 100)}",
        )
        for q in (0.5, 0.99)
    ]


def _series(
    title: str, description: str, unit: str, queries: list[Query], *, width: int = 12
) -> timeseries.Panel:
    panel = (
        timeseries.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .min(0)
        .span(width)
        .height(8)
        .fill_opacity(10)
        .legend(
            common_builder.VizLegendOptions()
            .display_mode(common.LegendDisplayMode.TABLE)
            .placement(common.LegendPlacement.BOTTOM)
            .show_legend(True)
            .calcs(["mean", "max", "lastNotNull"])
        )
    )
    for index, query in enumerate(queries):
        panel = panel.with_target(
            prometheus.Dataquery()
            .expr(query.expr)
            .legend_format(query.legend)
            .ref_id(chr(ord("A") + index))
        )
    return panel


def _stat(title: str, description: str, unit: str, query: Query) -> stat.Panel:
    return (
        stat.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .span(6)
        .height(4)
        .reduce_options(common_builder.ReduceDataOptions().calcs(["lastNotNull"]))
        .with_target(
            prometheus.Dataquery().expr(query.expr).legend_format(query.legend).ref_id("A")
        )
    )


def build() -> dict[str, Any]:
    """The dashboard as Grafana's JSON model."""
    ready = Query('sum(up{job="worker"}) or on() vector(0)', "workers up")
    board = (
        dashboard_builder.Dashboard("Text-to-speech service")
        .uid("tts-service")
        .description("Traffic, latency, stutter, saturation and cache of the speech service.")
        .tags(["tts"])
        .refresh("30s")
        .time("now-1h", "now")
        .timezone("browser")
        .with_variable(
            dashboard_builder.DatasourceVariable("datasource")
            .label("Prometheus")
            .type("prometheus")
        )
        .with_row(dashboard_builder.Row("Overview"))
        .with_panel(
            _stat(
                "Requests/s",
                "API requests answered by the gateways (probes and scrapes left out).",
                "reqps",
                Query(f"sum(rate(gateway_requests_total{{{API_ROUTES}}}{RATE}))", "requests/s"),
            )
        )
        .with_panel(
            _stat(
                "Cache hit ratio",
                "HIT / (HIT + MISS) over the gateways' lookups; bypasses left out.",
                "percentunit",
                Query(
                    f'sum(rate(gateway_cache_lookups_total{{result="hit"}}{RATE}))'
                    f' / sum(rate(gateway_cache_lookups_total{{result=~"hit|miss"}}{RATE}))',
                    "hit ratio",
                ),
            )
        )
        .with_panel(
            _stat(
                "Streams without underrun",
                "Share of worker streams never more than 100 ms behind playback.",
                "percentunit",
                Query(
                    f"sum(rate(worker_streams_without_underrun_total{RATE}))"
                    f" / sum(rate(worker_stream_worst_gap_seconds_count{RATE}))",
                    "without underrun",
                ),
            )
        )
        .with_panel(_stat("Workers up", "Workers answering /metrics.", "none", ready))
        .with_row(dashboard_builder.Row("Traffic and errors"))
        .with_panel(
            _series(
                "Requests by route and status",
                "Requests/s the gateways answered, by route and HTTP status.",
                "reqps",
                [
                    Query(
                        f"sum by (route, status) (rate(gateway_requests_total{RATE}))",
                        "{{route}} {{status}}",
                    )
                ],
            )
        )
        .with_panel(
            _series(
                "Errors by code",
                "Failed requests/s by the contract's error code and status (gateways), and "
                "the workers' own refusals and failures.",
                "reqps",
                [
                    Query(
                        f'sum by (code, status) (rate(gateway_requests_total{{code!=""}}{RATE}))',
                        "gateway {{status}} {{code}}",
                    ),
                    Query(
                        f'sum by (code, status) (rate(worker_requests_total{{code!=""}}{RATE}))',
                        "worker {{status}} {{code}}",
                    ),
                ],
            )
        )
        .with_row(dashboard_builder.Row("Latency and throughput"))
        .with_panel(
            _series(
                "Time to first audio",
                "Gateway: arrival to the first audio byte handed to the client, by cache "
                "result. Worker: arrival to the engine's first chunk.",
                "s",
                [
                    *_quantiles("gateway_time_to_first_byte_seconds", by="cache"),
                    *(
                        Query(q.expr, f"worker {q.legend}")
                        for q in _quantiles("worker_time_to_first_audio_seconds")
                    ),
                ],
            )
        )
        .with_panel(
            _series(
                "Real-time factor",
                "Synthesis wall time over audio duration per completed stream; above 1 is "
                "slower than real time.",
                "none",
                _quantiles("worker_real_time_factor"),
                width=6,
            )
        )
        .with_panel(
            _series(
                "Audio-seconds per second",
                "Seconds of audio the workers produce per second of wall time: about how "
                "many real-time listeners they feed.",
                "none",
                [Query(f"sum(rate(worker_audio_seconds_total{RATE}))", "audio-s/s")],
                width=6,
            )
        )
        .with_row(dashboard_builder.Row("Workers"))
        .with_panel(
            _series(
                "Active streams and queue per worker",
                "Syntheses holding a slot, requests waiting for one, and the slot count.",
                "none",
                [
                    Query("sum by (instance) (worker_active_streams)", "{{instance}} active"),
                    Query("sum by (instance) (worker_queued_requests)", "{{instance}} queued"),
                    Query("sum by (instance) (worker_max_concurrency)", "{{instance}} slots"),
                ],
                width=8,
            )
        )
        .with_panel(
            _series(
                "Queue wait",
                "Time admitted requests waited for a synthesis slot.",
                "s",
                _quantiles("worker_queue_wait_seconds"),
                width=8,
            )
        )
        .with_panel(
            _series(
                "Refused busy (503)",
                "Requests/s workers refused because every slot and queue place was taken.",
                "reqps",
                [
                    Query(
                        f'sum by (instance) (rate(worker_requests_total{{code="busy"}}{RATE}))',
                        "{{instance}}",
                    )
                ],
                width=8,
            )
        )
        .with_row(dashboard_builder.Row("Stutter"))
        .with_panel(
            _series(
                "Worst gap behind playback",
                "Per stream, its longest wait behind a listener's playback (wall time between "
                "chunks beyond the audio already sent); above 100 ms is an underrun.",
                "s",
                _quantiles("worker_stream_worst_gap_seconds"),
            )
        )
        .with_panel(
            _series(
                "Streams with an underrun",
                "Streams/s that fell more than 100 ms behind playback, per worker.",
                "ops",
                [
                    Query(
                        f"sum by (instance) (rate(worker_stream_worst_gap_seconds_count{RATE}))"
                        f" - sum by (instance) (rate(worker_streams_without_underrun_total{RATE}))",
                        "{{instance}}",
                    )
                ],
            )
        )
        .with_row(dashboard_builder.Row("Cache and Redis"))
        .with_panel(
            _series(
                "Cache lookups",
                "Audio requests by cache outcome (hit, miss, bypass).",
                "reqps",
                [
                    Query(
                        f"sum by (result) (rate(gateway_cache_lookups_total{RATE}))",
                        "{{result}}",
                    )
                ],
                width=8,
            )
        )
        .with_panel(
            _series(
                "Redis errors",
                "Redis calls that failed or ran past the cache budget (served as misses), "
                "and calls skipped while Redis is considered down.",
                "ops",
                [
                    Query(
                        f"sum by (operation) (rate(gateway_cache_errors_total{RATE}))",
                        "failed {{operation}}",
                    ),
                    Query(
                        f"sum by (operation) (rate(gateway_cache_skipped_total{RATE}))",
                        "skipped {{operation}}",
                    ),
                ],
                width=8,
            )
        )
        .with_panel(
            _series(
                "Workers ready (seen by gateways)",
                "1 when a gateway's last poll found a ready worker behind nginx.",
                "none",
                [Query("min by (instance) (gateway_worker_ready)", "{{instance}}")],
                width=8,
            )
        )
        .with_panel(
            _series(
                "Redis memory",
                "Memory Redis uses against its maxmemory (cached audio is evicted first).",
                "bytes",
                [
                    Query("sum(redis_memory_used_bytes)", "used"),
                    Query("sum(redis_memory_max_bytes)", "maxmemory"),
                ],
            )
        )
        .with_panel(
            _series(
                "Redis evictions and lookups",
                "Keys evicted under maxmemory, and Redis' own keyspace hits and misses.",
                "ops",
                [
                    Query(f"sum(rate(redis_evicted_keys_total{RATE}))", "evicted"),
                    Query(f"sum(rate(redis_keyspace_hits_total{RATE}))", "hits"),
                    Query(f"sum(rate(redis_keyspace_misses_total{RATE}))", "misses"),
                ],
            )
        )
        .with_row(dashboard_builder.Row("GPU"))
        .with_panel(
            _series(
                "GPU memory per worker",
                "Memory the engine holds on its GPU, where the engine exports it "
                "(cosyvoice); empty for CPU engines.",
                "bytes",
                [
                    Query("sum by (instance) (worker_gpu_memory_bytes)", "{{instance}} used"),
                    Query(
                        "sum by (instance) (worker_gpu_memory_limit_bytes)",
                        "{{instance}} total",
                    ),
                ],
                width=24,
            )
        )
    )
    encoded = json.dumps(board.build(), cls=JSONEncoder, sort_keys=True)
    model: dict[str, Any] = json.loads(encoded)
    # Stable, unique panel ids (links and alerts refer to panels by id).
    for index, panel in enumerate(model["panels"], start=1):
        panel["id"] = index
    return model


def render() -> str:
    return json.dumps(build(), indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="exit 1 if tts.json is stale")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not OUTPUT.exists() or OUTPUT.read_text() != text:
            print(f"{OUTPUT} is stale: run python {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
