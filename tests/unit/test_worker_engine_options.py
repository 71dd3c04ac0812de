"""Engine options reach the engine or fail start-up by name; the model version is content."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from worker.app import _engine_options
from worker.engines import create_engine, declares_option
from worker.model_version import content_version
from worker.settings import WorkerSettings


def test_worker_threads_reach_the_cosyvoice_engine(tmp_path: Path) -> None:
    settings = WorkerSettings(engine="cosyvoice", model_dir=tmp_path, threads=3)
    assert declares_option("cosyvoice", "threads")
    options = _engine_options(settings)
    assert options["threads"] == 3
    engine = create_engine("cosyvoice", **options)
    assert engine.threads == 3  # type: ignore[attr-defined]


def test_an_unknown_engine_option_fails_naming_it(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"no option thread\b.*threads"):
        create_engine("cosyvoice", model_dir=str(tmp_path), thread=2)


def _model_dir(root: Path) -> Path:
    root.mkdir()
    (root / "llm.pt").write_bytes(b"weights" * 1000)
    (root / "conf.yaml").write_text("a: 1\n")
    (root / "tokenizer").mkdir()
    (root / "tokenizer" / "vocab.json").write_text("{}")
    return root


def test_model_version_is_the_contents_not_times_or_paths(tmp_path: Path) -> None:
    one = _model_dir(tmp_path / "one")
    two = tmp_path / "elsewhere" / "two"
    shutil.copytree(one, two)  # another host's copy: other path, other modification times
    (two / "llm.pt").touch()
    assert content_version(one) == content_version(two)
    assert content_version(one, ["llm.pt", "tokenizer"]) == content_version(
        two, ["llm.pt", "tokenizer"]
    )
    weights = bytearray((two / "llm.pt").read_bytes())
    weights[1234] ^= 1
    (two / "llm.pt").write_bytes(bytes(weights))
    assert content_version(one) != content_version(two)
    (two / "llm.pt").write_bytes((one / "llm.pt").read_bytes())
    (two / "tokenizer" / "vocab.json").write_text('{"a": 1}')
    assert content_version(one, ["tokenizer"]) != content_version(two, ["tokenizer"])


def test_a_missing_model_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        content_version(_model_dir(tmp_path / "m"), ["flow.pt"])
