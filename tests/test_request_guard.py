"""The guards of lora/serve.py spoken to directly over ASGI, with no server or model: what the middleware hands the
application, what it answers, and the rules for keys, hosts and adapter paths, each at its edges.

The application behind the guard is a plain ASGI callable that records what it receives; the guard's answers are
real Starlette responses, read back from the messages they send."""

from __future__ import annotations

import asyncio
import json

import pytest

from lora.core.errors import UserError
from lora.serving.guards import (
    API_KEY_ENV,
    RequestGuard,
    check_bind_is_guarded,
    error_response,
    is_loopback,
    resolve_api_key,
    resolve_client_adapter_path,
)

KEY = "k3y!with~edges"  # holds both ends of printable ASCII without the space: '!' (33) and '~' (126)
LIMIT = 1024
DISCONNECT = {"type": "http.disconnect"}


class RecordingApp:
    """The application behind the guard: reads what `receive` gives it (twice, as a route that waits for a
    disconnect would) and answers 200."""

    def __init__(self):
        self.received: list[dict] = []

    async def __call__(self, scope, receive, send):
        self.received.append(await receive())
        self.received.append(await receive())
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


def _call(guard, messages, *, path="/v1/completions", headers=()):
    """Send one HTTP request through `guard`: its body as the ASGI `messages`, then disconnects. Returns the
    status, the response headers, the decoded JSON body (None for the app's plain answer) and how many times the
    guard or the app called `receive`."""
    scope = {"type": "http", "method": "POST", "path": path,
             "headers": [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers]}
    pending, sent, receive_calls = list(messages), [], [0]

    async def receive():
        receive_calls[0] += 1
        return pending.pop(0) if pending else DISCONNECT

    async def send(message):
        sent.append(message)

    asyncio.run(guard(scope, receive, send))
    if not sent:
        return None, {}, None, receive_calls[0]
    start, body = sent[0], b"".join(message.get("body", b"") for message in sent[1:])
    headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in start["headers"]}
    content = json.loads(body) if headers.get("content-type") == "application/json" else None
    return start["status"], headers, content, receive_calls[0]


def _guard(api_key=None):
    app = RecordingApp()
    return RequestGuard(app, api_key=api_key, max_body_bytes=LIMIT), app


def _request(body: bytes, more_body=False):
    return {"type": "http.request", "body": body, "more_body": more_body}


# ---- what the application receives ------------------------------------------------------------------------------


def test_the_application_gets_the_whole_body_once_as_one_final_message_then_the_real_receive():
    guard, app = _guard()
    status, _, _, _ = _call(guard, [_request(b"ab", True), _request(b"", True), _request(b"cd")])
    assert status == 200
    assert app.received == [_request(b"abcd"), DISCONNECT]  # not the body a second time


def test_asgi_messages_without_body_or_more_body_mean_an_empty_final_chunk():
    guard, app = _guard()
    status, _, _, receive_calls = _call(guard, [{"type": "http.request"}])
    assert status == 200 and app.received == [_request(b""), DISCONNECT]
    assert receive_calls == 2  # one message read by the guard (the body ended there), one by the app


def test_a_client_that_disconnects_before_its_body_ends_reaches_no_route_and_gets_no_answer():
    guard, app = _guard()
    status, _, _, _ = _call(guard, [_request(b"{\"prompt\": ", True), DISCONNECT])
    assert status is None and app.received == []


def test_a_body_of_exactly_the_limit_passes_and_one_byte_more_is_413():
    for declared in (True, False):
        length = [("Content-Length", str(LIMIT))] if declared else []
        guard, app = _guard()
        status, _, _, _ = _call(guard, [_request(b"x" * (LIMIT // 2), True), _request(b"x" * (LIMIT // 2))],
                                headers=length)
        assert status == 200 and app.received[0]["body"] == b"x" * LIMIT, declared
        guard, app = _guard()
        status, _, error, _ = _call(guard, [_request(b"x" * LIMIT, True), _request(b"x")])
        assert status == 413 and app.received == [], declared
        assert error["error"]["message"].startswith(f"the request body is more than {LIMIT} bytes;")


def test_a_declared_oversize_body_is_refused_without_reading_it_and_the_answer_names_both_sizes():
    guard, app = _guard()
    status, _, error, receive_calls = _call(guard, [_request(b"x")], headers=[("Content-Length", "5000000")])
    assert status == 413 and receive_calls == 0 and app.received == []
    assert error == {"error": {
        "message": f"the request body is 5000000 bytes; this server accepts at most {LIMIT} bytes "
                   "(its --max-request-bytes). Send fewer or shorter prompts.",
        "type": "invalid_request_error", "code": "request_too_large"}}


def test_a_websocket_or_lifespan_scope_passes_through_untouched():
    seen = []

    async def app(scope, receive, send):
        seen.append((scope["type"], await receive()))
        await send({"type": "lifespan.startup.complete"})

    sent = []

    async def receive():
        return {"type": "lifespan.startup"}

    async def send(message):
        sent.append(message)

    asyncio.run(RequestGuard(app, api_key=KEY)({"type": "lifespan"}, receive, send))
    assert seen == [("lifespan", {"type": "lifespan.startup"})] and sent == [{"type": "lifespan.startup.complete"}]


# ---- the key -----------------------------------------------------------------------------------------------------


def test_without_a_key_every_request_passes():
    guard, app = _guard(api_key=None)
    assert _call(guard, [_request(b"{}")])[0] == 200 and app.received[0] == _request(b"{}")


def test_each_missing_or_wrong_credential_gets_its_own_401_and_reaches_no_route():
    hint = f"send the header `Authorization: Bearer KEY` with the server's key (--api-key or ${API_KEY_ENV})."
    cases = {
        (): f"this server needs an API key: {hint}",
        (("Authorization", ""),): f"this server needs an API key: {hint}",
        (("Authorization", f"Basic {KEY}"),): f"the Authorization header is not a bearer token: {hint}",
        (("Authorization", "Bearer "),): f"the Authorization header is not a bearer token: {hint}",
        (("Authorization", f"Bearer {KEY[:-1]}"),): "the API key is not valid for this server.",  # a prefix
        (("Authorization", f"Bearer {KEY}x"),): "the API key is not valid for this server.",
    }
    for headers, message in cases.items():
        guard, app = _guard(api_key=KEY)
        status, response_headers, error, receive_calls = _call(guard, [_request(b"{}")], headers=headers)
        assert status == 401 and app.received == [] and receive_calls == 0, headers
        assert response_headers["www-authenticate"] == "Bearer", headers
        assert error == {"error": {"message": message, "type": "invalid_request_error",
                                   "code": "invalid_api_key"}}, headers


def test_the_right_key_passes_with_any_case_of_scheme_and_extra_spaces_and_health_needs_none():
    for header in (f"Bearer {KEY}", f"bearer {KEY}", f"BEARER  {KEY}", f"Bearer {KEY} "):
        guard, app = _guard(api_key=KEY)
        assert _call(guard, [_request(b"{}")], headers=[("Authorization", header)])[0] == 200, header
    guard, app = _guard(api_key=KEY)
    assert _call(guard, [_request(b"")], path="/health")[0] == 200


def test_keys_are_printable_ascii_without_spaces_at_both_ends_of_the_range():
    for key in ("!", "~", KEY, "".join(map(chr, range(33, 127)))):
        assert resolve_api_key(key, {}) == key
        assert resolve_api_key(None, {API_KEY_ENV: key}) == key
    for key in ("", " ", "a b", "tab\tkey", "del\x7f", "é", "\x00"):
        with pytest.raises(UserError) as refused:
            resolve_api_key(key, {})
        assert str(refused.value) == (
            "--api-key: an API key must be 1 or more printable ASCII characters without spaces, e.g. the output "
            "of `python -c 'import secrets; print(secrets.token_urlsafe(32))'`.")
    with pytest.raises(UserError, match=rf"^\${API_KEY_ENV}: an API key must be"):
        resolve_api_key(None, {API_KEY_ENV: "two words"})


# ---- hosts, adapter paths and the error format -----------------------------------------------------------------


def test_loopback_hosts_in_every_spelling_and_others_not():
    for host in ("localhost", "LOCALHOST", "127.0.0.1", "127.1.2.3", "::1", "[::1]"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "::", "[::]", "10.0.0.1", "example.com", ""):
        assert not is_loopback(host), host


def test_the_bind_refusal_says_every_way_out():
    with pytest.raises(UserError) as refused:
        check_bind_is_guarded("0.0.0.0", None, False)
    assert str(refused.value) == (
        "--host 0.0.0.0 accepts connections from other machines, and without an API key any of them could generate "
        f"and load adapters. Set a key (--api-key KEY, or the environment variable {API_KEY_ENV}), keep the default "
        "--host 127.0.0.1, or pass --allow-unauthenticated-remote if every client that can reach the port is "
        "trusted.")


def test_an_adapter_path_refusal_is_one_message_that_says_how_to_name_the_folder(tmp_path):
    root = tmp_path.resolve()
    (root / "adapter").mkdir()
    assert resolve_client_adapter_path(root, "adapter") == root / "adapter"
    for path in ("missing", "..", str(tmp_path.parent), ""):
        with pytest.raises(UserError) as refused:
            resolve_client_adapter_path(root, path)
        assert str(refused.value) == (
            "no such adapter folder: the path does not exist under this server's adapter root (--adapter-root) or "
            'leads outside it. Give the folder relative to the root, e.g. {"path": "my_recipe"}.'), path


def _error_body(response) -> dict:
    return json.loads(response.body)


def test_error_bodies_are_openais_shape_with_the_fault_told_by_the_status():
    for status, kind in ((400, "invalid_request_error"), (499, "invalid_request_error"), (500, "server_error"),
                         (503, "server_error")):
        response = error_response(status, "what went wrong", "some_code", {"Retry-After": "1"})
        assert response.status_code == status and response.headers["retry-after"] == "1"
        assert _error_body(response) == {"error": {"message": "what went wrong", "type": kind, "code": "some_code"}}


def test_an_unencodable_character_a_client_sent_is_quoted_not_a_crash():
    response = error_response(400, "unknown model 'x\udc80y'", "UnknownModelError")
    assert _error_body(response)["error"]["message"] == "unknown model 'x\\udc80y'"
