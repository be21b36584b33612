"""The shared server of the serving tests is made again after a failing test and when /health stops answering, so
one failure stays one failure (tests/serving_helpers.py)."""

from __future__ import annotations

from types import SimpleNamespace

import httpx
from fastapi import FastAPI, Response
from serving_helpers import SharedServer


def _node(failed: bool):
    return SimpleNamespace(phase_reports={"setup": SimpleNamespace(failed=False),
                                          "call": SimpleNamespace(failed=failed)})


def _make_app(state: dict):
    app = FastAPI()

    @app.get("/health")
    def health():
        return Response(status_code=200 if state["healthy"] else 503)

    return app


def test_a_failed_test_or_an_unhealthy_server_gets_the_next_test_a_fresh_one():
    hosts = []

    def make_host():
        hosts.append({"healthy": True})
        return hosts[-1]

    with SharedServer(make_host, _make_app) as shared:
        with shared.serving(_node(failed=False)) as first:
            assert httpx.get(first + "/health").status_code == 200
        with shared.serving(_node(failed=False)) as second:
            assert second == first and shared.starts == 1  # shared while tests pass
        with shared.serving(_node(failed=True)):
            shared.host["healthy"] = True  # whatever the failing test did to its host stays with it
        with shared.serving(_node(failed=False)) as third:
            assert shared.starts == 2 and len(hosts) == 2 and httpx.get(third + "/health").status_code == 200
            shared.host["healthy"] = False  # a server that stopped answering /health, the test itself passing
        with shared.serving(_node(failed=False)) as fourth:
            assert shared.starts == 3 and httpx.get(fourth + "/health").status_code == 200
    assert not shared.healthy()  # stopped at the end
