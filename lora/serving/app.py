"""The server's FastAPI app: routes, request models, error format and guards wired together (`python lora/serve.py`
parses the flags and runs it; its docstring lists the endpoints, batching and guards), plus how the served base is
chosen and quantised.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from lora.adapters.folders import read_adapter_records
from lora.adapters.inference import quantisation_for_adapter
from lora.core.errors import UserError
from lora.models.quantisation import QuantisationSettings
from lora.recipes.outputs import outputs_root
from lora.recipes.registry import DEFAULT_REGISTRY
from lora.serving.batcher import GenerationBatcher, ServerBusyError
from lora.serving.guards import (
    DEFAULT_MAX_BODY_BYTES,
    RequestGuard,
    error_response,
    resolve_client_adapter_path,
)
from lora.serving.host import (
    ADAPTER_NAME_RULE,
    AdapterConflictError,
    AdapterHost,
    AdapterLimitError,
    BadRequestError,
    ServedAdapter,
    UnknownModelError,
)

__all__ = [
    "AdapterLoadRequest",
    "check_port_free",
    "LONE_SURROGATE",
    "ChatCompletionRequest",
    "ChatMessage",
    "CompletionRequest",
    "create_app",
    "DEFAULT_ADAPTER_ROOT",
    "GenerationSettings",
    "MAX_PROMPTS_PER_REQUEST",
    "MAX_STOP_SEQUENCES",
    "resolve_served_base",
    "ROUTES",
    "served_quantisation",
]

MAX_PROMPTS_PER_REQUEST = 64
MAX_STOP_SEQUENCES = 4
# The registry's outputs folder (where lora/finetune.py writes adapters) is what clients may load from by default.
DEFAULT_ADAPTER_ROOT = outputs_root(DEFAULT_REGISTRY)
ROUTES = ("GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions, POST /v1/adapters, "
          "DELETE /v1/adapters/{name}")
_STATUS_BY_ERROR = {UnknownModelError: 404, AdapterConflictError: 409, AdapterLimitError: 409, ServerBusyError: 503}
LONE_SURROGATE = "lone_surrogate"  # the problem type of a string that is not text (answered 400, not 422)


def _whole_text(value: str) -> str:
    # JSON lets a string escape half of a UTF-16 pair ("\ud800"); Python keeps it, but no tokenizer, file or JSON
    # response can hold it, so it failed deep inside as a 500. It is a malformed request: say so at the door.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        raise PydanticCustomError(LONE_SURROGATE, "a lone UTF-16 surrogate at character {position}",
                                  {"position": error.start}) from None
    return value


Text = Annotated[str, AfterValidator(_whole_text)]


class GenerationSettings(BaseModel):
    """The sampling fields both completion routes take (OpenAI's names; any other field is an error)."""

    model_config = ConfigDict(extra="forbid")
    model: Text
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: Text | list[Text] | None = None
    n: int = Field(1, ge=1, le=1, description="only 1 completion per prompt is supported")
    stream: bool = Field(False, description="streaming is not supported")
    user: Text | None = None

    @field_validator("stop")
    @classmethod
    def _stop_sequences(cls, stop):
        stops = [stop] if isinstance(stop, str) else (stop or [])
        if len(stops) > MAX_STOP_SEQUENCES or any(not sequence for sequence in stops):
            raise ValueError(f"give at most {MAX_STOP_SEQUENCES} non-empty stop sequences")
        return stop

    @field_validator("stream")
    @classmethod
    def _no_streaming(cls, stream):
        if stream:
            raise ValueError("streaming is not supported; send stream: false")
        return stream


class CompletionRequest(GenerationSettings):
    """POST /v1/completions: one prompt or a list of them."""

    prompt: Text | list[Text]

    @field_validator("prompt")
    @classmethod
    def _prompt_count(cls, prompt):
        if isinstance(prompt, list) and not 1 <= len(prompt) <= MAX_PROMPTS_PER_REQUEST:
            raise ValueError(f"give 1 to {MAX_PROMPTS_PER_REQUEST} prompts per request")
        return prompt


class ChatMessage(BaseModel):
    """One message of POST /v1/chat/completions. Its role and content are checked by the rule chat rows are
    (lora.prompts.chat.check_conversation: system, user or assistant; a string) and refused with a 400 naming them."""

    model_config = ConfigDict(extra="forbid")
    role: Any
    content: Any

    @field_validator("role", "content")
    @classmethod
    def _text_when_a_string(cls, value):
        return _whole_text(value) if isinstance(value, str) else value


class ChatCompletionRequest(GenerationSettings):
    """POST /v1/chat/completions: OpenAI-style messages, rendered with the tokenizer's chat template."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=1024)


class AdapterLoadRequest(BaseModel):
    """POST /v1/adapters: serve the adapter folder `path` (as the server's machine sees it) under `name`."""

    model_config = ConfigDict(extra="forbid")
    name: Text
    path: Text = Field(max_length=4096, description="a folder under the server's --adapter-root, relative to it")


def create_app(host: AdapterHost, *, adapter_root: str | Path, api_key: str | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, window_ms: float = 10.0, max_batch_rows: int = 16):
    """The FastAPI application serving `host` (its batching worker starts and stops with the app's lifespan).

    Args:
        host: the loaded base model with its adapters.
        adapter_root: POST /v1/adapters loads only folders under this one.
        api_key: when set, every route but /health needs `Authorization: Bearer <api_key>`.
        max_body_bytes: larger request bodies get 413 before they are parsed.
        window_ms: how long a batch waits for more requests before it runs.
        max_batch_rows: the most prompts one batched `generate` round takes.
    """
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException

    adapter_root = Path(os.path.realpath(adapter_root))

    batcher = GenerationBatcher(host, window_ms=window_ms, max_batch_rows=max_batch_rows)

    @asynccontextmanager
    async def lifespan(app):
        await batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="lora-recipes adapter server", lifespan=lifespan)
    app.add_middleware(RequestGuard, api_key=api_key, max_body_bytes=max_body_bytes)
    app.state.host = host
    app.state.batcher = batcher

    @app.exception_handler(UserError)
    async def user_error(request: Request, error: UserError):
        status = next((code for kind, code in _STATUS_BY_ERROR.items() if isinstance(error, kind)), 400)
        return error_response(status, str(error), type(error).__name__)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException):
        # Starlette's own answers (no such route, wrong method) in this server's format rather than {"detail": ...}.
        where = f"{request.method} {request.url.path[:200]}"
        if error.status_code == 404:
            message = f"no route {where}. This server serves {ROUTES}."
            if request.url.path.startswith("/v1/adapters/"):
                message += f" Adapter names are {ADAPTER_NAME_RULE}."
        elif error.status_code == 405:
            allowed = (error.headers or {}).get("Allow", "")
            message = f"{where}: method not allowed here (allowed: {allowed}). This server serves {ROUTES}."
        else:
            message = f"{where}: {error.detail}"
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "http_error")
        return error_response(error.status_code, message, code, error.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError):
        problems = error.errors()
        # pydantic reports a lone surrogate it meets itself (a key, a length-checked field) as string_unicode.
        not_text = [problem for problem in problems if problem.get("type") in (LONE_SURROGATE, "string_unicode")]
        if not_text:
            return error_response(400, f"{_where(not_text[0])}: holds a lone UTF-16 surrogate (a \\ud800-\\udfff "
                                  "escape without its pair), which is not text; send valid Unicode.", "invalid_text")
        if any(problem.get("type") == "json_invalid" for problem in problems):
            detail = "; ".join(str(problem.get("ctx", {}).get("error", problem.get("msg"))) for problem in problems)
            return error_response(400, f"the request body is not valid JSON: {detail}.", "json_invalid")
        return error_response(422, "; ".join(_describe_problem(problem) for problem in problems), "invalid_request")

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception):
        return error_response(500, f"internal error ({type(error).__name__}: {error}).", "internal_error")

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": host.model_names(), **host.stats}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": _model_cards(host)}

    @app.post("/v1/adapters", status_code=201)
    async def load_adapter(body: AdapterLoadRequest):
        folder = await run_in_threadpool(resolve_client_adapter_path, adapter_root, body.path)
        adapter = await batcher.call_on_model_thread(host.load_adapter, body.name, folder)
        return {**_adapter_card(host, adapter), "notes": list(adapter.notes)}

    @app.delete("/v1/adapters/{name}")
    async def unload_adapter(name: str):
        await batcher.call_on_model_thread(host.unload_adapter, name)
        return {"id": name, "object": "model", "deleted": True}

    async def generate(body, prompts: list) -> tuple[list[tuple[str, str]], dict]:
        """(text, finish_reason) per prompt, and the usage figures: the part both completion routes share."""
        host.require_model(body.model)
        # Off the event loop: a long prompt takes seconds to tokenise, and /health and every other client wait
        # for the loop. The prompt is rendered as the model was trained (its recipe's prompt_template).
        rows = [await run_in_threadpool(host.prepare_row, body.model, prompt, body.max_tokens, body.temperature,
                                        body.top_p) for prompt in prompts]
        generated = await batcher.generate(rows)
        stops = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
        answers = []
        for result in generated:
            text, stopped = _cut_at_stop(host.decode(result.token_ids), stops)
            answers.append((text, "stop" if stopped else result.finish_reason))
        prompt_tokens = sum(len(row.prompt_ids) for row in rows)
        completion_tokens = sum(len(result.token_ids) for result in generated)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                 "total_tokens": prompt_tokens + completion_tokens}
        return answers, usage

    @app.post("/v1/completions")
    async def complete(body: CompletionRequest):
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        answers, usage = await generate(body, prompts)
        return {
            "id": f"cmpl-{uuid.uuid4().hex[:24]}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": body.model,
            "choices": [{"index": index, "text": text, "finish_reason": finish_reason, "logprobs": None}
                        for index, (text, finish_reason) in enumerate(answers)],
            "usage": usage,
        }

    @app.post("/v1/chat/completions")
    async def chat_complete(body: ChatCompletionRequest):
        messages = [{"role": message.role, "content": message.content} for message in body.messages]
        [(text, finish_reason)], usage = await generate(body, [messages])
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": finish_reason, "logprobs": None}],
            "usage": usage,
        }

    return app


def _where(problem: dict) -> str:
    """The field a problem is in ("prompt.1"), without pydantic's names of union branches ("list[str]")."""
    parts = [str(part) for part in problem.get("loc", ()) if part != "body" and "[" not in str(part)]
    return ".".join(parts) or "body"


def _describe_problem(problem: dict) -> str:
    return f"{_where(problem)}: {problem.get('msg', 'invalid')}"


def _cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """The text up to the earliest stop sequence (excluded, as OpenAI does), and whether one was found."""
    positions = [text.find(stop) for stop in stops if stop in text]
    return (text[: min(positions)], True) if positions else (text, False)


def _model_cards(host: AdapterHost) -> list[dict]:
    base = {"id": host.base_name, "object": "model", "created": 0, "owned_by": "lora-recipes", "root": host.base_path,
            "parent": None, "kind": "base"}
    return [base, *(_adapter_card(host, adapter) for adapter in list(host.adapters.values()))]


def _adapter_card(host: AdapterHost, adapter: ServedAdapter) -> dict:
    return {"id": adapter.name, "object": "model", "created": adapter.created, "owned_by": "lora-recipes",
            "root": str(adapter.path), "parent": host.base_name, "kind": adapter.kind}


def check_port_free(bind_host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in bind_host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does, so TIME_WAIT is no clash
        try:
            probe.bind((bind_host, port))
        except OSError as error:
            message = f"cannot listen on {bind_host}:{port} ({error.strerror}); pass another --port."
            raise BadRequestError(message) from None


def resolve_served_base(base_model: str | None, adapters: list[tuple[str, Path]]) -> tuple[str, str, str]:
    """(name requests use, folder or hub id to load, one-line origin) of the base to serve.

    `--base-model` when given; otherwise the base recorded in the first adapter (adapter_config.json, then its
    recipe.json), resolved the way every tool of this project resolves it (lora/adapters/folders.py).
    """
    from lora.adapters.folders import read_adapter_records, resolve_base_model_path
    from lora.models.source import resolve_model_source

    if base_model:
        source = resolve_model_source(base_model)
        return base_model, source.path, source.origin
    path, origin = resolve_base_model_path(adapters[0][1])
    return read_adapter_records(adapters[0][1]).base_model, path, origin


def served_quantisation(adapters: list[tuple[str, Path]], quant_bits: int | None, dtype: str) -> QuantisationSettings:
    """How the server loads its base: unquantised without --quant-bits; at --quant-bits' width otherwise, with the
    4-bit settings (quant type, double quantisation, compute dtype) the first adapter was trained with, so that its
    dequantised base weights are the ones it learned on."""
    records = read_adapter_records(adapters[0][1]) if adapters else None
    return quantisation_for_adapter(records, bits=quant_bits, dtype=dtype)
