"""Rendering nginx's configuration for a local cluster."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from cluster import nginx_config
from cluster.settings import ClusterSettings


def _settings(tmp_path: Path, **overrides: object) -> ClusterSettings:
    return ClusterSettings(run_dir=tmp_path / "run", **overrides)  # type: ignore[arg-type]


def test_missing_placeholder_is_an_error() -> None:
    with pytest.raises(KeyError, match="TTS_B"):
        nginx_config.render_template("a ${TTS_A} b ${TTS_B} $nginx_var", {"TTS_A": "1"})


def test_nginx_variables_are_left_alone() -> None:
    rendered = nginx_config.render_template("$remote_addr ${TTS_A} $request_id", {"TTS_A": "x"})
    assert rendered == "$remote_addr x $request_id"


def test_every_placeholder_of_the_template_gets_a_value(tmp_path: Path) -> None:
    values = nginx_config.template_values(_settings(tmp_path), (1, 22, 1), tmp_path / "a.log")
    template = nginx_config.TEMPLATE_PATH.read_text()
    assert set(nginx_config.PLACEHOLDER.findall(template)) == set(values)


def test_upstreams_list_every_gateway_and_worker(tmp_path: Path) -> None:
    settings = _settings(tmp_path, gateways=3, workers=4, gateway_base_port=9300)
    values = nginx_config.template_values(settings, (1, 22, 1), tmp_path / "a.log")
    assert values["TTS_GATEWAY_SERVERS"].count("server 127.0.0.1:") == 3
    assert "127.0.0.1:9302" in values["TTS_GATEWAY_SERVERS"]
    assert values["TTS_WORKER_SERVERS"].count("server 127.0.0.1:") == 4


@pytest.mark.parametrize(
    ("version", "same_port"), [((1, 22, 1), False), ((1, 25, 1), True), ((1, 28, 0), True)]
)
def test_http2_by_nginx_version(
    tmp_path: Path, version: tuple[int, int, int], same_port: bool
) -> None:
    settings = _settings(tmp_path, h2c_port=18082)
    values = nginx_config.template_values(settings, version, tmp_path / "a.log")
    if same_port:
        assert values["TTS_HTTP2"] == "http2 on;"
        assert values["TTS_PUBLIC_H2C_LISTEN"] == ""
    else:
        assert values["TTS_HTTP2"] == ""
        assert values["TTS_PUBLIC_H2C_LISTEN"] == "listen 127.0.0.1:18082 http2;"


def test_main_config_keeps_every_path_in_the_run_dir(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    paths = nginx_config.paths_for(settings)
    text = nginx_config.main_config(settings, paths)
    assert "daemon off;" in text
    for line in text.splitlines():
        if "_path " in line or line.startswith(("pid ", "error_log ")):
            assert str(settings.run_dir) in line, line


def test_rendered_config_passes_nginx_t(tmp_path: Path) -> None:
    settings = _settings(tmp_path, public_port=18080, internal_port=18081, h2c_port=18082)
    paths = nginx_config.write_config(settings)
    check = subprocess.run(
        nginx_config.nginx_command(paths, "-t"), capture_output=True, text=True, check=False
    )
    assert check.returncode == 0, check.stderr
    assert "http://tts_workers" in paths.cluster_conf.read_text()
