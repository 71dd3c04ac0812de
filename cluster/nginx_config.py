"""Render nginx's configuration for a local cluster from `nginx/cluster.conf.template`.

The template holds everything at http level and is shared with docker-compose.yml (where the
official image's envsubst fills it). Here it is filled from ClusterSettings, and a small main
configuration around it keeps every path (pid, logs, temp files) inside the run directory, so
the system's nginx configuration is never read or touched.
"""

from __future__ import annotations

import grp
import os
import re
import resource
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from cluster.settings import REPO_ROOT, ClusterSettings

TEMPLATE_PATH = REPO_ROOT / "nginx" / "cluster.conf.template"
PLACEHOLDER = re.compile(r"\$\{(TTS_[A-Z0-9_]+)\}")
# nginx 1.25.1 added `http2 on;`, which serves HTTP/1.1 and prior-knowledge h2c on one port.
HTTP2_DIRECTIVE_SINCE = (1, 25, 1)


@dataclass(frozen=True)
class NginxPaths:
    prefix: Path
    main_conf: Path
    cluster_conf: Path
    pid_file: Path
    error_log: Path
    access_log: Path


def nginx_binary() -> str:
    """nginx from PATH, or Debian's /usr/sbin/nginx (not on a normal user's PATH)."""
    found = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(found).exists():
        raise RuntimeError("nginx is not installed (as root: apt-get install nginx)")
    return found


def nginx_version(binary: str) -> tuple[int, int, int]:
    result = subprocess.run([binary, "-v"], capture_output=True, text=True, check=True)
    match = re.search(r"nginx/(\d+)\.(\d+)\.(\d+)", result.stderr + result.stdout)
    if match is None:
        raise RuntimeError(f"cannot read nginx's version from {result.stderr!r}")
    major, minor, patch = (int(part) for part in match.groups())
    return major, minor, patch


def render_template(template: str, values: dict[str, str]) -> str:
    """Fill every ${TTS_*} placeholder; a placeholder without a value is an error."""
    missing = sorted({name for name in PLACEHOLDER.findall(template) if name not in values})
    if missing:
        raise KeyError(f"no value for template placeholders: {', '.join(missing)}")
    return PLACEHOLDER.sub(lambda match: values[match.group(1)], template)


def template_values(
    settings: ClusterSettings, version: tuple[int, int, int], access_log: Path
) -> dict[str, str]:
    """The placeholder values for a local cluster."""
    if version >= HTTP2_DIRECTIVE_SINCE:
        h2c_listen, http2 = "", "http2 on;"
    else:
        h2c_listen = f"listen {settings.public_host}:{settings.h2c_port} http2;"
        http2 = ""
    return {
        "TTS_ACCESS_LOG": str(access_log),
        "TTS_RESOLVER": "",
        "TTS_RATE_PER_ADDR": settings.rate_per_addr,
        "TTS_RATE_PER_KEY": settings.rate_per_key,
        "TTS_BURST_PER_ADDR": str(settings.burst_per_addr),
        "TTS_BURST_PER_KEY": str(settings.burst_per_key),
        "TTS_GATEWAY_SERVERS": _server_lines(settings.gateway_ports()),
        "TTS_WORKER_SERVERS": _server_lines(settings.worker_ports()),
        "TTS_PUBLIC_ADDR": settings.public_host,
        "TTS_PUBLIC_PORT": str(settings.public_port),
        "TTS_PUBLIC_H2C_LISTEN": h2c_listen,
        "TTS_HTTP2": http2,
        "TTS_INTERNAL_ADDR": "127.0.0.1",
        "TTS_INTERNAL_PORT": str(settings.internal_port),
        "TTS_MAX_BODY": settings.max_body,
        "TTS_READ_TIMEOUT": settings.read_timeout,
        "TTS_WORKER_READ_TIMEOUT": settings.worker_read_timeout,
    }


def _server_lines(ports: list[int]) -> str:
    # max_fails=1 fail_timeout=5s: a refused connection takes a server out for 5 s.
    return "\n".join(f"    server 127.0.0.1:{port} max_fails=1 fail_timeout=5s;" for port in ports)


def main_config(settings: ClusterSettings, paths: NginxPaths) -> str:
    """The top-level nginx.conf: foreground master, paths under the run dir, then the template."""
    temp = paths.prefix / "temp"
    lines = [
        "daemon off;",
        f"worker_processes {settings.nginx_worker_processes};",
        f"pid {paths.pid_file};",
        f"error_log {paths.error_log} warn;",
    ]
    if os.geteuid() == 0:
        lines.append(f"user {_unprivileged_user()};")
    lines += [
        f"events {{ worker_connections {_worker_connections()}; }}",
        "http {",
        "    default_type application/octet-stream;",
        "    sendfile on;",
        "    tcp_nodelay on;",
        f"    client_body_temp_path {temp / 'client_body'};",
        f"    proxy_temp_path {temp / 'proxy'};",
        f"    fastcgi_temp_path {temp / 'fastcgi'};",
        f"    uwsgi_temp_path {temp / 'uwsgi'};",
        f"    scgi_temp_path {temp / 'scgi'};",
        f"    include {paths.cluster_conf};",
        "}",
    ]
    return "\n".join(lines) + "\n"


def _worker_connections() -> int:
    """As many as the open-file limit allows (a normal user cannot raise it), at most 4096."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 4096
    return max(256, min(4096, soft - 64))


def _unprivileged_user() -> str:
    """Run nginx's worker processes as nobody when started as root (Debian's group: nogroup)."""
    try:
        grp.getgrnam("nogroup")
    except KeyError:
        return "nobody"
    return "nobody nogroup"


def paths_for(settings: ClusterSettings) -> NginxPaths:
    prefix = settings.run_dir / "nginx"
    return NginxPaths(
        prefix=prefix,
        main_conf=prefix / "nginx.conf",
        cluster_conf=prefix / "cluster.conf",
        pid_file=prefix / "nginx.pid",
        error_log=settings.log_dir / "nginx-error.log",
        access_log=settings.log_dir / "nginx-access.log",
    )


def write_config(settings: ClusterSettings) -> NginxPaths:
    """Render both files under `<run_dir>/nginx/`, check them with `nginx -t`, return the paths."""
    paths = paths_for(settings)
    (paths.prefix / "temp").mkdir(parents=True, exist_ok=True)
    paths.error_log.parent.mkdir(parents=True, exist_ok=True)
    values = template_values(settings, nginx_version(nginx_binary()), paths.access_log)
    paths.cluster_conf.write_text(render_template(TEMPLATE_PATH.read_text(), values))
    paths.main_conf.write_text(main_config(settings, paths))
    check = subprocess.run(nginx_command(paths, "-t", "-q"), capture_output=True, text=True)
    if check.returncode != 0:
        raise RuntimeError(f"nginx rejects {paths.main_conf}:\n{check.stderr}")
    return paths


def nginx_command(paths: NginxPaths, *extra: str) -> list[str]:
    return [
        nginx_binary(),
        "-p", str(paths.prefix),
        "-c", str(paths.main_conf),
        "-e", str(paths.error_log),
        *extra,
    ]
