"""The GPU benchmarks' dry runs on the CPU with tiny random-weight models: each runs to the end,
its checks pass, and the figures it reports are sound (every stream served, audio of the
requested length, positive throughput and arithmetic). The GPU runs themselves are not CI's."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from testbed import cosyvoice3_models, cosyvoice_models

ROOT = Path(__file__).resolve().parents[2]
TOKENS = 40


def _run(*args: str) -> str:
    done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done.stdout


@pytest.mark.parametrize("model", ["cosyvoice2", "cosyvoice3"])
def test_the_stream_sweep_serves_every_stream_and_its_checks_pass(model: str,
                                                                  tmp_path: Path) -> None:
    build = {"cosyvoice2": cosyvoice_models, "cosyvoice3": cosyvoice3_models}[model]
    model_dir = build.build_model_dir(tmp_path / "tiny")
    out = tmp_path / "results.json"
    printed = _run("benchmarks/gpu_cosyvoice.py", "--model", model, "--model-dir",
                   str(model_dir), "--device", "cpu", "--dtype", "float32", "--concurrency",
                   "1,2", "--tokens", str(TOKENS), "--modes", "inproc", "--check",
                   "--timeline", "2", "--out", str(out))
    assert "check, audio stages on fixed tokens:" in printed
    assert printed.count("-> ok") == 2
    results = json.loads(out.read_text())["results"]
    assert [(r["concurrency"], r["ok"], r["failed"]) for r in results] == [(1, 1, 0), (2, 2, 0)]
    for row in results:
        assert row["audio_s_per_s"] > 0
        assert 0 < row["ttfa_p50_ms"] <= row["ttfa_p99_ms"]
        first_calls = [e for e in row["stages"]["timeline"] if e["stage"] == "run"]
        assert first_calls[0]["first_chunks"] >= 1
        assert first_calls[0]["steps_before"] >= 1
    assert f"audio per request {TOKENS / 25:.1f} s" in printed


def test_live_options_are_swept_side_by_side_in_one_engine(tmp_path: Path) -> None:
    """Each level runs once per value of each `--live-option`, in one warm engine, the other
    options at their defaults: later chunks of two hops take fewer audio calls for the same
    requests, the gather variants run at the default two hops (not the last value swept), and
    ratio lines compare each option's values with its first."""
    model_dir = cosyvoice_models.build_model_dir(tmp_path / "tiny")
    out = tmp_path / "results.json"
    printed = _run("benchmarks/gpu_cosyvoice.py", "--model-dir", str(model_dir), "--device",
                   "cpu", "--dtype", "float32", "--concurrency", "1,2", "--tokens", "130",
                   "--live-option", "later_chunk_hops=2,1",
                   "--live-option", "first_chunk_gather_steps=0,4", "--out", str(out))
    results = json.loads(out.read_text())["results"]
    hops = ["later_chunk_hops=2", "later_chunk_hops=1"]
    gathers = ["first_chunk_gather_steps=0", "first_chunk_gather_steps=4"]
    assert [(r["name"], r["concurrency"], r["ok"]) for r in results] == [
        (name, c, c) for c in (1, 2) for name in hops + gathers]
    calls = {(r["name"], r["concurrency"]): r["stages"]["run"]["calls"] for r in results}
    assert calls[(hops[0], 1)] < calls[(hops[1], 1)]
    assert calls[(gathers[0], 1)] == calls[(hops[0], 1)]
    for c in (1, 2):
        assert re.search(rf"{hops[1]} / {hops[0]}  c={c} +audio-s/s x\d+\.\d\d", printed)
        assert re.search(rf"{gathers[1]} / {gathers[0]}  c={c} +audio-s/s x\d+\.\d\d", printed)
    assert f"{gathers[0]} / {hops[0]}" not in printed


def test_live_hops_beyond_the_engines_graphs_are_refused(tmp_path: Path) -> None:
    """A warm engine's graphs hold later chunks of up to the hops it was built with: a live
    value beyond them is refused before the engine loads, naming the option that builds them."""
    model_dir = cosyvoice_models.build_model_dir(tmp_path / "tiny")
    done = subprocess.run(
        [sys.executable, "benchmarks/gpu_cosyvoice.py", "--model-dir", str(model_dir),
         "--device", "cpu", "--dtype", "float32", "--live-option", "later_chunk_hops=2,4"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert "--engine-option later_chunk_hops=N" in done.stderr
    assert "engine loaded" not in done.stdout


def test_the_report_is_written_after_every_level(tmp_path: Path) -> None:
    """A sweep stopped at its time limit keeps the levels it finished: the report on disk holds
    every row as soon as it is made."""
    spec = importlib.util.spec_from_file_location("gpu_cosyvoice",
                                                  ROOT / "benchmarks" / "gpu_cosyvoice.py")
    assert spec is not None
    assert spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "results.json"
    rows = bench.SavedRows({"model": "cosyvoice2"}, out)
    assert json.loads(out.read_text()) == {"model": "cosyvoice2", "results": []}
    rows.append({"concurrency": 1})
    rows.append({"concurrency": 4})
    assert json.loads(out.read_text())["results"] == [{"concurrency": 1}, {"concurrency": 4}]


@pytest.mark.parametrize(("model", "parts"), [("cosyvoice2", ("encoder", "solver", "vocoder")),
                                             ("cosyvoice3", ("flow", "vocoder"))])
def test_the_audio_stage_profile_counts_its_arithmetic(model: str, parts: tuple[str, ...],
                                                       tmp_path: Path) -> None:
    build = {"cosyvoice2": cosyvoice_models, "cosyvoice3": cosyvoice3_models}[model]
    model_dir = build.build_model_dir(tmp_path / "tiny")
    printed = _run("benchmarks/gpu_cosyvoice_audio.py", "--model", model, "--model-dir",
                   str(model_dir), "--device", "cpu", "--dtype", "float32", "--rows", "1,2",
                   "--tokens", str(TOKENS), "--profile-call", "99")
    counted = re.search("GFLOP per utterance: " + ", ".join(f"{p} ([\\d.]+)" for p in parts) + "$",
                        printed, flags=re.MULTILINE)
    assert counted is not None, printed
    assert all(float(value) > 0 for value in counted.groups())
    calls = re.findall(r"rows +(\d+): (\d+) calls, +([\d.]+) ms per call \((.*)\);", printed)
    assert [c[0] for c in calls] == ["1", "2"], printed
    for _, _, per_call, split in calls:
        assert [part.split()[0] for part in split.split(", ")] == [*parts, "rest"]
        assert float(per_call) > 0
    assert len(re.findall(rf"achieved: {parts[0]} [\d.]+ TFLOP/s", printed)) == 2


def test_the_estimator_breakdown_times_every_part(tmp_path: Path) -> None:
    model_dir = cosyvoice_models.build_model_dir(tmp_path / "tiny")
    printed = _run("benchmarks/gpu_cosyvoice_estimator.py", "--model-dir", str(model_dir),
                   "--device", "cpu", "--dtype", "float32", "--shapes", "1:56:100,2:50:0")
    calls = re.findall(r"rows +(\d+), +(\d+) new after +(\d+): estimator call +([\d.]+) ms "
                       r"\((\d+) kernels\)", printed)
    assert [c[:3] for c in calls] == [("1", "56", "100"), ("2", "50", "0")], printed
    assert all(float(c[3]) > 0 and int(c[4]) > 0 for c in calls)
    parts = dict(re.findall(r"^ {4}(\S.*?) +([\d.]+|nan) ms$", printed, flags=re.MULTILINE))
    for part in ("keys from the store", "keys as whole pages + cat", "k + v projections",
                 "k/v stacked projection", "sdpa (default)", "sdpa math", "transformer block",
                 "resnet block"):
        assert float(parts[part]) > 0, part
