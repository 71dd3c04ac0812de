"""A stand-in upstream (gateway or worker) for testing nginx's rules, run as a process.

`python -m tests.e2e.stub_upstream PORT MODE` serves HTTP/1.1 with keep-alive:
- MODE "ok": every route answers 200 JSON describing the request it received;
- MODE "busy": every route but /readyz, /stream and /release answers 503 "busy";
- GET /stream sends one chunk, then the rest only after GET /release.
"""

from __future__ import annotations

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

RELEASE = threading.Event()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    mode = "ok"
    port = 0

    def log_message(self, format: str, *args: object) -> None:
        sys.stderr.write(f"{self.command} {self.path}\n")

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _json(self, status: int, payload: object, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Request-ID", "set-by-upstream")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def _answer(self) -> None:
        body = self._read_body()
        if self.path == "/readyz":
            self._json(200, {"ready": True})
            return
        if self.path == "/release":
            RELEASE.set()
            self._json(200, {"released": True})
            return
        if self.path == "/stream":
            self._stream()
            return
        if self.mode == "busy":
            self._json(
                503, {"error": {"code": "busy", "message": "full"}}, {"Retry-After": "1"}
            )
            return
        self._json(
            200,
            {
                "port": self.port,
                "method": self.command,
                "path": self.path,
                "body_bytes": len(body),
                "request_id": self.headers.get("X-Request-ID"),
            },
        )

    def _stream(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("X-Stub-Port", str(self.port))
        self.end_headers()
        for chunk in (b"first", b"second"):
            self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            self.wfile.flush()
            RELEASE.wait(timeout=30)
        self.wfile.write(b"0\r\n\r\n")
        RELEASE.clear()

    do_GET = _answer  # noqa: N815
    do_POST = _answer  # noqa: N815
    do_DELETE = _answer  # noqa: N815


def main() -> None:
    port, mode = int(sys.argv[1]), sys.argv[2]
    Handler.mode = mode
    Handler.port = port
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main()
