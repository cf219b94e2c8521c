"""A real S3-protocol server on loopback for the tests and benchmarks: moto's
standalone server (``moto[server]``) in its own process, and a small HTTP proxy in
front of it that can answer ``503 SlowDown`` or a redirect a given number of times
before it forwards, the way a throttled or misconfigured endpoint answers.

No credentials are needed by moto; the tests set dummy ones in the environment, as
the standard AWS chain reads them.
"""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

DUMMY_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}

SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)


def free_port() -> int:
    """A TCP port free on loopback now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class MotoServer:
    """moto's S3 server in a child process, at ``endpoint``."""

    endpoint: str
    process: subprocess.Popen[bytes]

    def stop(self) -> None:
        """End the server process."""
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_moto(env: dict[str, str] | None = None) -> MotoServer:
    """Start ``moto_server`` on a free loopback port; ready when it answers HTTP."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"moto_server exited with {process.returncode}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            conn.request("GET", "/moto-api/")
            conn.getresponse().read()
            conn.close()
            return MotoServer(f"http://127.0.0.1:{port}", process)
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise RuntimeError("moto_server did not answer within 30 s")


@contextmanager
def moto_server(env: dict[str, str] | None = None) -> Iterator[MotoServer]:
    """A moto server for the length of the block."""
    server = start_moto(env)
    try:
        yield server
    finally:
        server.stop()


@dataclass
class FaultyProxy:
    """An HTTP proxy on loopback in front of an S3 endpoint.

    ``throttle(n)``: the next n requests are answered ``503 SlowDown`` (S3's XML
    error) instead of being forwarded; ``redirect(url)``: every request is answered
    ``307`` to that URL until ``redirect(None)``. ``requests`` counts every request
    the proxy received, ``forwarded`` those it passed on, with the time of each.
    """

    upstream: str
    server: ThreadingHTTPServer | None = None
    requests: list[tuple[float, str, str]] = field(default_factory=list)
    forwarded: int = 0
    _throttle: int = 0
    _redirect: str | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def endpoint(self) -> str:
        """The proxy's URL."""
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def throttle(self, n: int) -> None:
        """Answer the next n requests with 503 SlowDown."""
        with self._lock:
            self._throttle = n

    def redirect(self, url: str | None) -> None:
        """Answer every request with a 307 to url (None: forward again)."""
        with self._lock:
            self._redirect = url

    def reset(self) -> None:
        """Forget the counts and any pending fault."""
        with self._lock:
            self.requests.clear()
            self.forwarded = 0
            self._throttle = 0
            self._redirect = None

    def _decide(self, method: str, path: str) -> tuple[str, str | None]:
        with self._lock:
            self.requests.append((time.monotonic(), method, path))
            if self._redirect is not None:
                return "redirect", self._redirect
            if self._throttle > 0:
                self._throttle -= 1
                return "throttle", None
            self.forwarded += 1
            return "forward", None

    def start(self) -> FaultyProxy:
        """Listen on a free loopback port, serving from a daemon thread."""
        proxy = self
        host, port = self.upstream.removeprefix("http://").split(":")

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                action, target = proxy._decide(self.command, self.path)
                if action == "throttle":
                    self._answer(503, SLOW_DOWN, {"Content-Type": "application/xml"})
                    return
                if action == "redirect":
                    self._answer(307, b"", {"Location": f"{target}{self.path}"})
                    return
                conn = http.client.HTTPConnection(host, int(port), timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
                conn.request(self.command, self.path, body=body, headers=headers)
                response = conn.getresponse()
                data = response.read()
                keep = {
                    k: v
                    for k, v in response.getheaders()
                    if k.lower() not in ("connection", "transfer-encoding", "content-length")
                }
                conn.close()
                self._answer(response.status, data, keep)

            def _answer(self, status: int, data: bytes, headers: dict[str, str]) -> None:
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        """Stop listening."""
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
