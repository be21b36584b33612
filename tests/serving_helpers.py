"""For the tests of lora/serve.py: a real uvicorn server in a background thread on a free 127.0.0.1 port (bound
here and handed to uvicorn, never closed and re-bound), a module's shared server that a failing test cannot poison
for the tests after it, and one torch thread per module."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import httpx
import pytest
import torch
import uvicorn


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One torch thread for a test module (import it there): two OpenMP threads on a 2-core machine shared with
    other test runs can be 50x slower than one."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@contextmanager
def serve_in_thread(app, startup_timeout_s: float = 30) -> Iterator[str]:
    """Run `app` under uvicorn on a free loopback port until the block ends; yields the base URL."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout_s
    while not server.started and time.monotonic() < deadline and thread.is_alive():
        time.sleep(0.05)
    try:
        assert server.started, "the server did not start"
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        listener.close()


class SharedServer:
    """One server (and the adapter host behind it) for the tests of a module, made again from scratch when it can no
    longer be trusted: after a test that failed (it may have left adapters unloaded, a method patched or the batcher
    stuck) and whenever /health does not answer. Use `serving(request.node)` in a function-scoped fixture."""

    def __init__(self, make_host: Callable[[], object], make_app: Callable[[object], object]):
        self._make_host, self._make_app = make_host, make_app
        self._running = None
        self.host = None
        self.url = None
        self.starts = 0

    def _start(self) -> None:
        self.host = self._make_host()
        self._running = serve_in_thread(self._make_app(self.host))
        self.url = self._running.__enter__()
        self.starts += 1

    def stop(self) -> None:
        running, self._running = self._running, None
        if running is not None:
            running.__exit__(None, None, None)

    def healthy(self) -> bool:
        try:
            return httpx.get(self.url + "/health", timeout=30).status_code == 200
        except httpx.HTTPError:
            return False

    @contextmanager
    def serving(self, node) -> Iterator[str]:
        """The URL of a healthy server for the test `node`; the server is dropped afterwards if the test failed."""
        if self._running is None or not self.healthy():
            self.stop()
            self._start()
        yield self.url
        if any(report.failed for report in getattr(node, "phase_reports", {}).values()):
            self.stop()  # the next test gets a fresh host and server

    def __enter__(self) -> SharedServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
