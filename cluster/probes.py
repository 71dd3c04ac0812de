"""Readiness probes and port checks used while starting a cluster."""

from __future__ import annotations

import socket

import httpx


def http_ready(url: str, timeout: float = 2.0) -> bool:
    """True when `url` answers 200; any connection error or other status is "not yet"."""
    try:
        return httpx.get(url, timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def redis_ready(port: int, timeout: float = 1.0) -> bool:
    """True when a Redis on 127.0.0.1:`port` answers PING (and is not still loading its AOF)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def port_free(host: str, port: int) -> bool:
    """True when nothing listens on host:port (checked by binding it, as the service would)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True
