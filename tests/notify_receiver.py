"""A local HTTP receiver for completion callbacks: records every POST, can fail the first ones."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Post:
    """One request the receiver got, and the status it answered."""

    path: str
    headers: dict[str, str]
    body: bytes
    status: int


@dataclass
class Receiver:
    """Answers 503 to the first ``fail_first`` POSTs of each path, then 200."""

    fail_first: int = 0
    posts: list[Post] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    server: ThreadingHTTPServer | None = None

    def start(self) -> Receiver:
        """Listen on a free loopback port in a background thread."""
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with receiver.lock:
                    seen = sum(1 for p in receiver.posts if p.path == self.path)
                    status = 503 if seen < receiver.fail_first else 200
                    receiver.posts.append(
                        Post(
                            self.path, {k.lower(): v for k, v in self.headers.items()}, body, status
                        )
                    )
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass  # quiet test output

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def url(self, path: str) -> str:
        """The URL of a path on this receiver."""
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def posts_to(self, path: str) -> list[Post]:
        """The POSTs received on one path so far."""
        with self.lock:
            return [p for p in self.posts if p.path == path]

    def wait_for(self, path: str, count: int, timeout: float = 30) -> list[Post]:
        """The POSTs to a path once there are ``count`` of them; AssertionError after timeout."""
        deadline = time.monotonic() + timeout
        while len(self.posts_to(path)) < count:
            assert time.monotonic() < deadline, f"{path}: {len(self.posts_to(path))} POSTs"
            time.sleep(0.05)
        return self.posts_to(path)

    def stop(self) -> None:
        """Stop listening."""
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
