"""`python -m cluster up|down|status|logs`: the local cluster behind `make up`."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from pydantic import ValidationError

from cluster import launcher
from cluster.settings import ClusterSettings


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m cluster", description=__doc__)
    parser.add_argument("command", choices=["up", "down", "status", "logs"])
    parser.add_argument(
        "--workers", help="number of workers, or auto: one per worker device (CLUSTER_WORKERS)"
    )
    parser.add_argument(
        "--worker-devices",
        help="devices given to the workers in turn, e.g. cuda:0,cuda:1, or auto "
        "(CLUSTER_WORKER_DEVICES)",
    )
    parser.add_argument("--gateways", type=int, help="number of gateways (CLUSTER_GATEWAYS)")
    parser.add_argument("--engine", help="engine every worker loads (CLUSTER_ENGINE)")
    parser.add_argument("--run-dir", type=Path, help="pid files, logs, data (CLUSTER_RUN_DIR)")
    parser.add_argument(
        "--monitor",
        action="store_true",
        default=None,
        help="also start Prometheus scraping every process (CLUSTER_MONITOR)",
    )
    parser.add_argument("--follow", action="store_true", help="logs: keep following (tail -F)")
    parser.add_argument("--lines", type=int, default=40, help="logs: lines per service")
    return parser.parse_args(argv)


def build_settings(args: argparse.Namespace) -> ClusterSettings:
    overrides = {
        name: value
        for name in ("workers", "worker_devices", "gateways", "engine", "run_dir", "monitor")
        if (value := getattr(args, name)) not in (None, "")
    }
    return ClusterSettings(**overrides)


def print_ready(settings: ClusterSettings) -> None:
    url = settings.public_url
    print(f"\nThe service is up at {url}  (logs: {settings.log_dir}, stop: make down)\n")
    print("Try it:")
    print(
        f"  curl -sS {url}/v1/audio/speech -H 'Content-Type: application/json' \\\n"
        "       -d '{\"model\": \"tts-1\", \"input\": \"Hello from the cluster.\", "
        "\"voice\": \"alloy\", \"response_format\": \"wav\"}' -o hello.wav"
    )
    if settings.monitor:
        prometheus = settings.prometheus_url
        print(f"\nPrometheus: {prometheus}  (targets /targets, alerts /alerts, rules /rules)")
        print("Grafana: import deploy/grafana/tts.json with this Prometheus as its data source")


def print_status(rows: list[launcher.ServiceStatus]) -> None:
    if not rows:
        print("no cluster is running (make up starts one)")
        return
    print(f"{'service':<12} {'pid':>8} {'port':>6}  state")
    for row in rows:
        state = "ready" if row.ready else ("running, not ready" if row.alive else "stopped")
        print(f"{row.name:<12} {row.pid:>8} {row.port:>6}  {state}")


def show_logs(settings: ClusterSettings, lines: int, follow: bool) -> None:
    paths = sorted(settings.log_dir.glob("*.log")) if settings.log_dir.is_dir() else []
    if not paths:
        print(f"no logs under {settings.log_dir}")
        return
    if follow:
        os.execvp("tail", ["tail", "-n", str(lines), "-F", *map(str, paths)])
    for path in paths:
        print(f"==> {path} <==")
        print("\n".join(path.read_text(errors="replace").splitlines()[-lines:]))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        settings = build_settings(args)
        if args.command == "up":
            started = launcher.up(settings)
            if not started:
                print("the cluster is already running; nothing started")
            print_ready(settings)
        elif args.command == "down":
            stopped = launcher.down(settings)
            print(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")
        elif args.command == "status":
            print_status(launcher.status(settings))
        else:
            show_logs(settings, args.lines, args.follow)
    except (launcher.ClusterError, RuntimeError, ValidationError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
