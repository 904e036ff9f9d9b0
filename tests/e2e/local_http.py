"""Loopback HTTP helpers shared by the unit and the end-to-end tests."""
from __future__ import annotations

import socket
from http.server import BaseHTTPRequestHandler


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class QuietHandler(BaseHTTPRequestHandler):
    """A request handler that logs nothing and serves bytes (404 for None); a client that hung up is no error."""

    def send_body(self, body: bytes | None) -> None:
        try:
            self.send_response(200 if body is not None else 404)
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, *args):
        pass
