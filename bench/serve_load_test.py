"""Load test for lora/serve.py: concurrent completions across adapters on loopback; throughput, latency, errors.

    # tiny Llama + a LoRA and a DoRA adapter built in a temp folder; server started, loaded, stopped (~1 min)
    .venv/bin/python bench/serve_load_test.py --tiny --requests 200 --concurrency 16 --compare-unbatched
    # SmolLM2-135M-Instruct (converted offline by lora/model_source.py) + two quick random adapters (LoRA, DoRA)
    .venv/bin/python bench/serve_load_test.py --smollm2 --requests 48 --concurrency 8 --max-tokens 16
    # a server started here on your base and adapters
    .venv/bin/python bench/serve_load_test.py --base-model DIR --adapter a=PATH --adapter b=PATH
    # a server that is already running (loopback only)
    .venv/bin/python bench/serve_load_test.py --url http://127.0.0.1:8000 --requests 100

Sends a fixed number of requests (--requests), at most --concurrency at a time, round-robin over every served model
(the base included) and a few prompts, greedy. Reports wall time, requests/s, completion tokens/s, latency
percentiles and the error count (anything but HTTP 200, or no answer within --request-timeout). Exit code 1 when
any request failed. A server that needs an API key gets it from --api-key or $LORA_SERVE_API_KEY (which the
servers started here inherit). With --compare-unbatched a second server (--max-batch-size 1) serves the same load,
so the gain from batching is a ratio measured side by side. The server is started on a free 127.0.0.1 port and stopped
at the end; --url must point at a loopback address.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import httpx  # noqa: E402

from lora.serving.guards import API_KEY_ENV  # noqa: E402

PROMPTS = [
    "Instruction: What is the sentiment of this news? Answer: ",
    "Shares of the company rose after quarterly revenue beat expectations, and",
    "The bank reported a loss and cut its dividend. Analysts said",
    "The board will meet on Tuesday to review the annual budget.",
]
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
SMOLLM2_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


@dataclass
class Outcome:
    model: str
    ok: bool
    latency_s: float
    completion_tokens: int
    error: str = ""


# ---- building something to serve ---------------------------------------------------------------------------------


def write_quick_adapter(base_dir: Path, out_dir: Path, *, use_dora: bool, seed: int, targets: list[str],
                        rank: int = 8, noise: float = 0.02) -> Path:
    """A small untrained adapter with non-zero weights, saved by peft (with a recipe.json like the runner's).

    B starts at small noise instead of zero (so the adapter changes outputs a little); DoRA magnitudes start at
    peft's ||W0 + s·BA|| and are perturbed by a few percent for the same reason.
    """
    import json

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, use_dora=use_dora, task_type="CAUSAL_LM")
    model = get_peft_model(base, config)
    with torch.no_grad():
        for module in model.modules():
            if "default" in getattr(module, "lora_B", {}):
                module.lora_B["default"].weight.normal_(0, noise)
            if "default" in getattr(module, "lora_magnitude_vector", {}):
                module.lora_magnitude_vector["default"].weight.mul_(1 + 0.05 * torch.randn_like(
                    module.lora_magnitude_vector["default"].weight))
    model.save_pretrained(out_dir)
    recipe = {"base_model": str(base_dir), "quant_bits": None, "use_dora": use_dora, "use_rslora": False,
              "lora_r": rank, "lora_alpha": 2 * rank, "note": "untrained load-test adapter (random weights)"}
    (out_dir / "recipe.json").write_text(json.dumps(recipe, indent=2) + "\n")
    return out_dir


def tiny_setup(work_dir: Path) -> tuple[str, list[str]]:
    sys.path.insert(0, str(REPO_ROOT / "tests"))
    from tiny_model import save_tiny_model

    base = save_tiny_model(work_dir / "tiny-llama")
    targets = ["q_proj", "v_proj", "down_proj"]
    lora = write_quick_adapter(base, work_dir / "tiny-lora", use_dora=False, seed=1, targets=targets, rank=4)
    dora = write_quick_adapter(base, work_dir / "tiny-dora", use_dora=True, seed=2, targets=targets, rank=4)
    return str(base), [f"tiny-lora={lora}", f"tiny-dora={dora}"]


def smollm2_setup(work_dir: Path) -> tuple[str, list[str]]:
    from lora.models.source import resolve_model_source

    base = Path(resolve_model_source(SMOLLM2_ID).path)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    lora = write_quick_adapter(base, work_dir / "smol-lora", use_dora=False, seed=1, targets=targets)
    dora = write_quick_adapter(base, work_dir / "smol-dora", use_dora=True, seed=2, targets=targets)
    return str(base), [f"smol-lora={lora}", f"smol-dora={dora}"]


# ---- the server ------------------------------------------------------------------------------------------------


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(base_model: str, adapter_specs: list[str], args, log_path: Path, max_batch_size: int):
    """Start lora/serve.py on a free loopback port; return (process, url) once /health answers."""
    port = free_loopback_port()
    command = [sys.executable, str(REPO_ROOT / "lora" / "serve.py"), "--base-model", base_model,
               "--host", "127.0.0.1", "--port", str(port), "--max-batch-size", str(max_batch_size),
               "--batch-window-ms", str(args.batch_window_ms)]
    for spec in adapter_specs:
        command += ["--adapter", spec]
    if args.quant_bits:
        command += ["--quant-bits", str(args.quant_bits)]
    if args.server_threads:
        command += ["--threads", str(args.server_threads)]
    log = log_path.open("w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + args.startup_timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with code {process.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    stop_server(process)
    raise SystemExit(f"the server did not answer within {args.startup_timeout} s:\n{log_path.read_text()[-3000:]}")


def stop_server(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=30)


# ---- the load ----------------------------------------------------------------------------------------------------


async def one_request(http: httpx.AsyncClient, model: str, prompt: str, args) -> Outcome:
    body = {"model": model, "prompt": prompt, "max_tokens": args.max_tokens, "temperature": 0}
    started = time.perf_counter()
    try:
        response = await http.post("/v1/completions", json=body, timeout=args.request_timeout)
    except httpx.HTTPError as error:
        return Outcome(model, False, time.perf_counter() - started, 0, f"{type(error).__name__}: {error}")
    latency = time.perf_counter() - started
    if response.status_code != 200:
        return Outcome(model, False, latency, 0, f"HTTP {response.status_code}: {response.text[:200]}")
    return Outcome(model, True, latency, response.json()["usage"]["completion_tokens"])


async def run_load(url: str, models: list[str], args) -> tuple[list[Outcome], float, tuple[int, int]]:
    """Warm every model up once, then send args.requests requests, args.concurrency at a time.

    Returns:
        The outcomes, the wall time of the measured part, and how many `generate` calls and rows the server ran
        for it (from /health; zeros for a server without those counters).
    """
    limits = httpx.Limits(max_connections=args.concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, headers=auth_headers(args)) as http:
        for model in models:
            await one_request(http, model, PROMPTS[0], args)
        gate = asyncio.Semaphore(args.concurrency)

        async def gated(index: int) -> Outcome:
            async with gate:
                return await one_request(http, models[index % len(models)], PROMPTS[index % len(PROMPTS)], args)

        calls_before, rows_before = await generate_counters(http)
        started = time.perf_counter()
        outcomes = await asyncio.gather(*(gated(index) for index in range(args.requests)))
        wall_s = time.perf_counter() - started
        calls_after, rows_after = await generate_counters(http)
        return list(outcomes), wall_s, (calls_after - calls_before, rows_after - rows_before)


def summarise(label: str, outcomes: list[Outcome], wall_s: float, args) -> dict:
    latencies = sorted(outcome.latency_s * 1000 for outcome in outcomes if outcome.ok)
    cuts = statistics.quantiles(latencies, n=100, method="inclusive") if len(latencies) >= 2 else latencies * 99
    tokens = sum(outcome.completion_tokens for outcome in outcomes)
    return {
        "setup": label,
        "requests": len(outcomes),
        "concurrency": args.concurrency,
        "max_tokens": args.max_tokens,
        "wall_s": wall_s,
        "req_per_s": len(outcomes) / wall_s,
        "tokens_per_s": tokens / wall_s,
        "p50_ms": cuts[49] if cuts else float("nan"),
        "p90_ms": cuts[89] if cuts else float("nan"),
        "p99_ms": cuts[98] if cuts else float("nan"),
        "errors": sum(not outcome.ok for outcome in outcomes),
    }


def markdown_table(rows: list[dict]) -> str:
    lines = ["| setup | requests | concurrency | max_tokens | wall s | req/s | completion tok/s | p50 ms | p90 ms | "
             "p99 ms | errors | prompts per generate |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(
            f"| {row['setup']} | {row['requests']} | {row['concurrency']} | {row['max_tokens']} | {row['wall_s']:.1f} "
            f"| {row['req_per_s']:.2f} | {row['tokens_per_s']:.1f} | {row['p50_ms']:.0f} | {row['p90_ms']:.0f} | "
            f"{row['p99_ms']:.0f} | {row['errors']} | {row.get('rows_per_generate', float('nan')):.1f} |"
        )
    return "\n".join(lines)


def auth_headers(args) -> dict[str, str]:
    """The bearer header for a server with an API key (flag, else the environment variable serve.py reads)."""
    api_key = args.api_key or os.environ.get(API_KEY_ENV)
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def served_models(url: str, wanted: list[str] | None, args) -> list[str]:
    response = httpx.get(f"{url}/v1/models", timeout=10, headers=auth_headers(args))
    if response.status_code == 401:
        raise SystemExit(f"the server at {url} needs an API key: pass --api-key KEY or set ${API_KEY_ENV}")
    available = [card["id"] for card in response.json()["data"]]
    if not wanted:
        return available
    unknown = [name for name in wanted if name not in available]
    if unknown:
        raise SystemExit(f"--models names models the server does not serve: {unknown}; it serves {available}")
    return wanted


async def generate_counters(http: httpx.AsyncClient) -> tuple[int, int]:
    health = (await http.get("/health", timeout=10)).json()
    return health.get("generate_calls", 0), health.get("rows", 0)


def measure(label: str, url: str, args) -> tuple[dict, list[Outcome]]:
    models = served_models(url, args.models, args)
    outcomes, wall_s, (calls, rows) = asyncio.run(run_load(url, models, args))
    base = served_models(url, None, args)[0]
    names = ["base" if name == base else name for name in models]
    row = summarise(f"{label}; {', '.join(names)}", outcomes, wall_s, args)
    row["rows_per_generate"] = rows / calls if calls else float("nan")
    return row, outcomes


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Load test for lora/serve.py on loopback.")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--tiny", action="store_true", help="tiny Llama + a LoRA and a DoRA adapter made here")
    what.add_argument("--smollm2", action="store_true", help="SmolLM2-135M-Instruct + two quick random adapters")
    what.add_argument("--base-model", help="start a server on this base (with --adapter NAME=PATH ...)")
    what.add_argument("--url", help="an already running server on a loopback address")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH")
    parser.add_argument("--quant-bits", type=int, choices=(4, 8), default=None)
    parser.add_argument("--models", nargs="*", help="models to spread the load over (default: all served)")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--batch-window-ms", type=float, default=10.0)
    parser.add_argument("--server-threads", type=int, default=None, help="torch threads of the server process")
    parser.add_argument("--compare-unbatched", action="store_true", help="also run a --max-batch-size 1 server")
    parser.add_argument("--api-key", default=None, help=f"for a server that needs one (default: ${API_KEY_ENV})")
    parser.add_argument("--request-timeout", type=float, default=300.0)
    parser.add_argument("--startup-timeout", type=float, default=600.0)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not 1 <= args.requests <= 100_000 or not 1 <= args.concurrency <= 1024:
        raise SystemExit("--requests must be 1..100000 and --concurrency 1..1024")
    rows, failures = [], []
    with tempfile.TemporaryDirectory(prefix="serve-load-") as work:
        work_dir = Path(work)
        if args.url:
            if urlparse(args.url).hostname not in LOOPBACK:
                raise SystemExit(f"--url must be a loopback address ({', '.join(sorted(LOOPBACK))}), got {args.url}")
            row, outcomes = measure("running server", args.url.rstrip("/"), args)
            rows.append(row)
            failures += [outcome for outcome in outcomes if not outcome.ok]
        else:
            if args.tiny:
                base_model, specs = tiny_setup(work_dir)
            elif args.smollm2:
                base_model, specs = smollm2_setup(work_dir)
            else:
                base_model, specs = args.base_model, args.adapter
            batch_sizes = [args.max_batch_size] + ([1] if args.compare_unbatched else [])
            for batch_size in batch_sizes:
                process, url = start_server(base_model, specs, args, work_dir / f"server-{batch_size}.log", batch_size)
                try:
                    row, outcomes = measure(f"max batch {batch_size}", url, args)
                finally:
                    stop_server(process)
                rows.append(row)
                failures += [outcome for outcome in outcomes if not outcome.ok]
    print(markdown_table(rows))
    if len(rows) == 2:
        print(f"\nbatching: {rows[0]['req_per_s'] / rows[1]['req_per_s']:.2f}x the requests/s of max batch 1")
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    print(f"machine: {os.cpu_count()} CPUs, load average {load} (1/5/15 min) at the end of the run")
    for failure in failures[:5]:
        print(f"error ({failure.model}): {failure.error}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
