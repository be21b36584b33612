"""The guards in front of lora/serve.py: API key, request size, where clients may load adapters from, one error format.

- `RequestGuard` is a plain ASGI middleware: it answers 401 to a request without the right
  `Authorization: Bearer KEY` header (every path but /health), and 413 to a body over the size limit, before any
  route or JSON parser sees the request. A body is read into memory (at most the limit) and then handed on.
- `resolve_client_adapter_path` turns the `path` of POST /v1/adapters into a folder inside the adapter root, or
  one error that reads the same whether the path is missing, outside the root, or a symlink out of it, so that a
  client learns nothing about the rest of the server's disk.
- `error_response` is the one shape of every error the server sends: OpenAI's {"error": {message, type, code}}.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
from collections.abc import Mapping
from pathlib import Path

from lora.serving.host import BadRequestError

__all__ = [
    "API_KEY_ENV",
    "check_bind_is_guarded",
    "DEFAULT_MAX_BODY_BYTES",
    "error_response",
    "is_loopback",
    "LOOPBACK_NAMES",
    "MIN_MAX_BODY_BYTES",
    "RequestGuard",
    "resolve_api_key",
    "resolve_client_adapter_path",
    "UNGUARDED_PATHS",
]

API_KEY_ENV = "LORA_SERVE_API_KEY"
DEFAULT_MAX_BODY_BYTES = 1 << 20  # 1 MiB: 64 prompts of ~16 KB each; a context-filling prompt is far smaller
MIN_MAX_BODY_BYTES = 1024
UNGUARDED_PATHS = frozenset({"/health"})  # liveness probes carry no credentials
LOOPBACK_NAMES = ("localhost",)


def error_response(status: int, message: str, code: str, headers: dict[str, str] | None = None):
    """The JSON response for an error, in OpenAI's format (`type` says whose fault it is)."""
    from fastapi.responses import JSONResponse

    kind = "invalid_request_error" if status < 500 else "server_error"
    # A message may quote what a client sent; a lone surrogate in it would make the response itself unencodable.
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    body = {"error": {"message": message, "type": kind, "code": code}}
    return JSONResponse(status_code=status, content=body, headers=headers)


class RequestGuard:
    """ASGI middleware: bearer-token check (when `api_key` is set) and a body size limit, before routing.

    Args:
        app: the ASGI application to guard.
        api_key: the key clients must send as `Authorization: Bearer KEY`; None lets every request through.
        max_body_bytes: the largest request body accepted; larger ones get 413 without being parsed.
    """

    def __init__(self, app, *, api_key: str | None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES):
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        if self.api_key is not None and scope["path"] not in UNGUARDED_PATHS:
            problem = self._authorisation_problem(headers.get(b"authorization"))
            if problem:
                # Answered before the body is read: uvicorn discards whatever body follows.
                await error_response(401, problem, "invalid_api_key", {"WWW-Authenticate": "Bearer"})(
                    scope, receive, send
                )
                return
        declared = headers.get(b"content-length", b"").decode("latin-1")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            await self._too_large(f"{int(declared)} bytes")(scope, receive, send)
            return
        body, more_body = bytearray(), True
        while more_body:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client went away before sending its whole body: nobody to answer
            body += message.get("body", b"")
            more_body = message.get("more_body", False)
            if len(body) > self.max_body_bytes:  # a chunked body, or one longer than its Content-Length said
                await self._too_large(f"more than {self.max_body_bytes} bytes")(scope, receive, send)
                return
        await self.app(scope, _replay(bytes(body), receive), send)

    def _authorisation_problem(self, header: bytes | None) -> str | None:
        hint = f"send the header `Authorization: Bearer KEY` with the server's key (--api-key or ${API_KEY_ENV})."
        if not header:
            return f"this server needs an API key: {hint}"
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer" or not token.strip():
            return f"the Authorization header is not a bearer token: {hint}"
        if not hmac.compare_digest(token.strip(), self.api_key):
            return "the API key is not valid for this server."
        return None

    def _too_large(self, size: str):
        message = (
            f"the request body is {size}; this server accepts at most {self.max_body_bytes} bytes "
            "(its --max-request-bytes). Send fewer or shorter prompts."
        )
        return error_response(413, message, "request_too_large")


def _replay(body: bytes, receive):
    """An ASGI `receive` that hands out the already-read body once, then defers to the real one (disconnects)."""
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


def resolve_client_adapter_path(root: Path, client_path: str) -> Path:
    """The adapter folder a client asked for, as a real path inside `root` (which must be resolved already).

    A relative `client_path` is taken relative to the root; an absolute one must lead inside it. Symlinks are
    followed before the check, so a link inside the root that points elsewhere is outside too.

    Raises:
        BadRequestError: one message for a path that is missing, not a folder, outside the root or unreadable,
            so that the answer never tells a client whether some path outside the root exists.
    """
    try:
        resolved = Path(os.path.realpath(root / client_path))
        if resolved != root and resolved.is_relative_to(root) and resolved.is_dir():
            return resolved
    except (OSError, ValueError):  # an embedded NUL byte, a name too long for the file system
        pass
    raise BadRequestError(
        "no such adapter folder: the path does not exist under this server's adapter root (--adapter-root) or "
        'leads outside it. Give the folder relative to the root, e.g. {"path": "my_recipe"}.'
    )


def is_loopback(host: str) -> bool:
    """True when binding `host` accepts connections from this machine only."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name other than localhost: it may resolve to any interface
        return False


def resolve_api_key(flag_value: str | None, environ: Mapping[str, str]) -> str | None:
    """The key clients must send: `--api-key` when given, else $LORA_SERVE_API_KEY when set and non-empty, else None.

    Raises:
        BadRequestError: the key (naming where it came from) is empty or holds spaces or non-ASCII characters,
            which no client could send in an Authorization header as given.
    """
    if flag_value is not None:
        api_key, source = flag_value, "--api-key"
    elif environ.get(API_KEY_ENV):  # an empty variable counts as unset, as shells make it easy to export one
        api_key, source = environ[API_KEY_ENV], f"${API_KEY_ENV}"
    else:
        return None
    if not api_key or not all(33 <= ord(char) <= 126 for char in api_key):
        raise BadRequestError(
            f"{source}: an API key must be 1 or more printable ASCII characters without spaces, e.g. the output "
            "of `python -c 'import secrets; print(secrets.token_urlsafe(32))'`."
        )
    return api_key


def check_bind_is_guarded(host: str, api_key: str | None, allow_unauthenticated_remote: bool) -> None:
    """Refuse (`BadRequestError`) to listen beyond loopback without a key unless the user said they accept it."""
    if is_loopback(host) or api_key or allow_unauthenticated_remote:
        return
    raise BadRequestError(
        f"--host {host} accepts connections from other machines, and without an API key any of them could "
        f"generate and load adapters. Set a key (--api-key KEY, or the environment variable {API_KEY_ENV}), keep "
        "the default --host 127.0.0.1, or pass --allow-unauthenticated-remote if every client that can reach "
        "the port is trusted."
    )
