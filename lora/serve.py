"""Serve several LoRA/DoRA adapters on one base model over an OpenAI-style HTTP API (FastAPI + uvicorn).

Run (from any folder; the server listens on 127.0.0.1:8000 unless told otherwise):
    .venv/bin/python lora/serve.py --base-model HuggingFaceTB/SmolLM2-135M-Instruct \
        --adapter sentiment=outputs/sentiment --adapter ner=outputs/ner [--quant-bits 4|8] [--port 8000]
    .venv/bin/python lora/serve.py --adapter sentiment=outputs/sentiment     # base taken from the adapter's records
    export LORA_SERVE_API_KEY=$(python -c 'import secrets; print(secrets.token_urlsafe(32))')
    .venv/bin/python lora/serve.py --host 0.0.0.0 --adapter sentiment=outputs/sentiment   # other machines, with a key
    curl -s HOST:8000/v1/models -H "Authorization: Bearer $LORA_SERVE_API_KEY"

Then:
    curl -s localhost:8000/v1/models
    curl -s localhost:8000/v1/completions -H 'Content-Type: application/json' \
        -d '{"model": "sentiment", "prompt": "Shares rose 5%.", "max_tokens": 16, "temperature": 0}'
    curl -s localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \
        -d '{"model": "sentiment", "messages": [{"role": "user", "content": "Shares rose 5%."}], "temperature": 0}'
    curl -s localhost:8000/v1/adapters -H 'Content-Type: application/json' -d '{"name": "v2", "path": "v2"}'
    curl -s -X DELETE localhost:8000/v1/adapters/v2

Endpoints: POST /v1/completions (`model` = an adapter's name or the base's name as given to --base-model; `prompt` a
string or a list of strings; `max_tokens`; `temperature`, 0 = greedy; `top_p`; `stop`), POST /v1/chat/completions
(`messages`: [{"role": "system"|"user"|"assistant", "content": "..."}], the other fields as above), GET /v1/models,
POST /v1/adapters {"name", "path"} (loads onto the running base, no restart), DELETE /v1/adapters/{name}, GET
/health. A prompt is rendered as the adapter was trained and is scored (lora.prompts.templates.encode_prompt): under
the prompt_template of its recipe.json, so a prompt to a "chat" adapter becomes the user turn of the chat template
(send the plain text, not a rendered chat prompt), and the base and "plain" adapters get it as written; messages are
rendered with the tokenizer's chat template and its generation prompt for any model, the answer ending at the
template's end of turn. Errors come back as {"error": {"message", "type", "code"}} with a 4xx status and the server
keeps serving: 404 unknown model (the message lists the known ones) or route, 405 wrong method, 409 name taken or
--max-adapters reached, 400 malformed JSON, a string holding a lone UTF-16 surrogate, a too-long prompt, an adapter
path not under --adapter-root, a message whose role is not system/user/assistant or whose content is not a string,
messages to a base whose tokenizer has no chat template, an adapter that does not fit the base, was trained with the
chat template on a base whose tokenizer has none, or is a DoRA adapter without (or with runtime-normalised)
magnitudes, 401 no or wrong API key, 413 body too large, 422 a field of the wrong type, 503 queue full.

Batching: prompts arriving within --batch-window-ms share one `generate` call where peft allows it (LoRA adapters
and the base together; each DoRA adapter on its own, since peft 0.21 refuses mixed batches with DoRA). A DoRA
adapter's norm ||W0 + s·BA|| is computed once at load and cached (peft's DoraCaching: about one extra dense weight
matrix of memory per adapted layer), not per token.

Guards: with an API key (--api-key KEY or the environment variable LORA_SERVE_API_KEY; prefer the variable, a
flag shows in `ps`) every route but /health needs `Authorization: Bearer KEY` (401 otherwise). Listening beyond
loopback (--host 0.0.0.0) without a key is refused unless --allow-unauthenticated-remote says so. POST /v1/adapters
loads only folders under --adapter-root (default: outputs/ beside the registry); paths are relative to it, and a
path outside it reads exactly like a missing one. Bodies over --max-request-bytes (default 1 MiB) get 413 before
they are parsed; at most --max-adapters adapters (default 16, --adapter ones included) are loaded at once, a load
over it gets 409; prompts are tokenised off the event loop, so a long one never stalls /health or other clients.
Unknown routes (404) and wrong methods (405) answer in the same error format.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

if __name__ == "__main__":  # run as a script: the project's packages import from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora.core.errors import exit_on_user_error
from lora.serving.app import DEFAULT_ADAPTER_ROOT, check_port_free, create_app, resolve_served_base, served_quantisation
from lora.serving.guards import (
    API_KEY_ENV,
    DEFAULT_MAX_BODY_BYTES,
    MIN_MAX_BODY_BYTES,
    check_bind_is_guarded,
    is_loopback,
    resolve_api_key,
)
from lora.serving.host import (
    DEFAULT_MAX_ADAPTERS,
    BadRequestError,
)


def parse_adapter_spec(spec: str) -> tuple[str, Path]:
    """`NAME=PATH` from the command line -> (name, existing folder); a `UserError` naming the flag otherwise."""
    name, separator, path = spec.partition("=")
    if not separator or not name or not path:
        raise BadRequestError(f'--adapter "{spec}": expected NAME=PATH, e.g. --adapter sentiment=outputs/sentiment.')
    folder = Path(path).expanduser().resolve()
    if not folder.is_dir():
        raise BadRequestError(f'--adapter "{spec}": the folder {folder} does not exist.')
    return name, folder


def port_number(text: str) -> int:
    """--port: a TCP port number (argparse turns the error into exit code 2 naming the flag)."""
    if not text.strip().isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port; expected a whole number from 1 to 65535")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-model", help="hub id or model folder; default: the base recorded in the first adapter")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                        help="an adapter folder to serve under NAME (repeatable)")
    parser.add_argument("--quant-bits", type=int, choices=(4, 8), default=None, help="load the base 4-bit or 8-bit")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    parser.add_argument("--port", type=port_number, default=8000, help="TCP port, 1-65535 (default 8000)")
    parser.add_argument("--api-key", default=None,
                        help=f"clients must send `Authorization: Bearer KEY` (default: ${API_KEY_ENV}, else no key)")
    parser.add_argument("--allow-unauthenticated-remote", action="store_true",
                        help="accept a non-loopback --host without an API key (trusts every client that reaches it)")
    parser.add_argument("--adapter-root", default=str(DEFAULT_ADAPTER_ROOT),
                        help="POST /v1/adapters loads only folders under this one (default: outputs/ beside the "
                        "registry)")
    parser.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                        help=f"larger request bodies get 413 (default {DEFAULT_MAX_BODY_BYTES})")
    parser.add_argument("--max-adapters", type=int, default=DEFAULT_MAX_ADAPTERS,
                        help="the most adapters served at once, --adapter ones included; POST /v1/adapters over it "
                        f"gets 409 (default {DEFAULT_MAX_ADAPTERS})")
    parser.add_argument("--batch-window-ms", type=float, default=10.0, help="how long a batch waits for company")
    parser.add_argument("--max-batch-size", type=int, default=16, help="the most prompts per batched generate")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return parser


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    adapters = [parse_adapter_spec(spec) for spec in args.adapter]
    names = [name for name, _ in adapters]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise BadRequestError(f"--adapter names must be unique; given more than once: {', '.join(duplicates)}.")
    if not args.base_model and not adapters:
        raise BadRequestError("give --base-model ID_OR_FOLDER, or at least one --adapter NAME=PATH to take it from.")
    api_key = resolve_api_key(args.api_key, os.environ)
    check_bind_is_guarded(args.host, api_key, args.allow_unauthenticated_remote)
    adapter_root = Path(args.adapter_root).expanduser().resolve()
    if args.adapter_root != str(DEFAULT_ADAPTER_ROOT) and not adapter_root.is_dir():
        raise BadRequestError(f"--adapter-root {args.adapter_root}: the folder {adapter_root} does not exist.")
    if args.max_request_bytes < MIN_MAX_BODY_BYTES:
        raise BadRequestError(
            f"--max-request-bytes {args.max_request_bytes} is too small: give at least {MIN_MAX_BODY_BYTES} "
            f"(default {DEFAULT_MAX_BODY_BYTES})."
        )
    if args.max_adapters < max(len(adapters), 1):
        raise BadRequestError(
            f"--max-adapters {args.max_adapters}: give at least {max(len(adapters), 1)} (the number of --adapter "
            f"folders, and at least 1; default {DEFAULT_MAX_ADAPTERS})."
        )
    check_port_free(args.host, args.port)

    import torch
    import uvicorn

    from lora.serving.host import build_host

    if args.threads:
        torch.set_num_threads(args.threads)
    # bitsandbytes logs this once per 8-bit forward, i.e. once per generated token: it would drown the access log.
    logging.getLogger("bitsandbytes.autograd._functions").addFilter(
        lambda record: "inputs will be cast" not in record.getMessage()
    )
    base_name, base_path, origin = resolve_served_base(args.base_model, adapters)
    quantisation = served_quantisation(adapters, args.quant_bits, args.dtype)
    host = build_host(base_name, base_path=base_path, quantisation=quantisation, max_adapters=args.max_adapters)
    print(f"serve: base {base_name} ({origin}), context {host.context_length} tokens", flush=True)
    for name, folder in adapters:
        adapter = host.load_adapter(name, folder)
        notes = "".join(f"; note: {note}" for note in adapter.notes)
        print(f"serve: adapter {name} ({adapter.kind}) from {folder}{notes}", flush=True)
    missing = "" if adapter_root.is_dir() else " (it does not exist yet: every load is refused until it does)"
    print(f"serve: POST /v1/adapters loads folders under {adapter_root}{missing}", flush=True)
    if not is_loopback(args.host) and not api_key:
        print(f"serve: warning: listening on {args.host} without an API key: any client that reaches it can "
              f"generate and load adapters from {adapter_root}", flush=True)
    app = create_app(host, adapter_root=adapter_root, api_key=api_key, max_body_bytes=args.max_request_bytes,
                     window_ms=args.batch_window_ms, max_batch_rows=args.max_batch_size)
    print(f"serve: http://{args.host}:{args.port}/v1 (models: {', '.join(host.model_names())})", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


if __name__ == "__main__":
    sys.exit(main())
