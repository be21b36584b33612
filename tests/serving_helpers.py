"""For the tests of lora/serve.py: a real uvicorn server in a background thread on a free 127.0.0.1 port, and
one torch thread per module."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

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
