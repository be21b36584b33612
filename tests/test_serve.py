"""lora/serve.py: several LoRA/DoRA adapters on one tiny base, over real HTTP (uvicorn on a free loopback port).

Run: .venv/bin/pytest tests/test_serve.py -q
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from serving_helpers import SharedServer, one_torch_thread  # noqa: F401  (an autouse fixture)
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import bnb_defaults
from lora.models.loading import load_base_model
from lora.serve import main
from lora.serving.app import create_app, resolve_served_base
from lora.serving.host import AdapterHost, GenerationRow
from tiny_model import build_tiny_llama, build_tiny_tokenizer

PROMPTS = ["Shares of the company rose after revenue beat", "The bank cut its dividend"]
TARGETS = ["q_proj", "v_proj", "down_proj"]
MAX_TOKENS = 10


def _write_adapter(base_model, out_dir: Path, *, use_dora: bool, seed: int, base_name: str) -> Path:
    """A random (non-zero B) r=4 adapter saved by peft, with the recipe.json the runner would write next to it."""
    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=use_dora, init_lora_weights=False,
                        task_type="CAUSAL_LM")
    peft_model = get_peft_model(base_model, config)
    for module in peft_model.modules():
        if "default" in getattr(module, "lora_magnitude_vector", {}):
            # peft starts m at ||W0 + s·BA||, where DoRA equals LoRA; move it so that the magnitudes matter.
            module.lora_magnitude_vector["default"].weight.data *= 1 + 0.5 * torch.rand_like(
                module.lora_magnitude_vector["default"].weight
            )
    peft_model.save_pretrained(out_dir)
    peft_model.unload()
    recipe = {"base_model": base_name, "quant_bits": None, "use_dora": use_dora, "use_rslora": False, "lora_r": 4,
              "lora_alpha": 8, "prompt_template": "plain"}
    (out_dir / "recipe.json").write_text(json.dumps(recipe))
    return out_dir


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    """LoRA and DoRA adapters for the tiny base, plus broken variants that the server must refuse."""
    root = tmp_path_factory.mktemp("adapters")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    paths = {
        "lora": _write_adapter(base, root / "lora", use_dora=False, seed=1, base_name=str(tiny_model_dir)),
        "dora": _write_adapter(base, root / "dora", use_dora=True, seed=2, base_name=str(tiny_model_dir)),
    }
    wide_base = build_tiny_llama(len(build_tiny_tokenizer()), seed=3, hidden_size=128)
    paths["wide"] = _write_adapter(wide_base, root / "wide", use_dora=False, seed=3, base_name="another/model")

    normalised = shutil.copytree(paths["dora"], root / "normalised")
    config = json.loads((normalised / "adapter_config.json").read_text())
    (normalised / "adapter_config.json").write_text(json.dumps({**config, "dora_magnitudes_normalised": True}))

    no_magnitudes = shutil.copytree(paths["dora"], root / "no_magnitudes")
    weights = load_file(no_magnitudes / "adapter_model.safetensors")
    save_file({key: value for key, value in weights.items() if "magnitude" not in key},
              no_magnitudes / "adapter_model.safetensors")
    paths.update(normalised=normalised, no_magnitudes=no_magnitudes)
    return paths


def _load_host(tiny_model_dir: Path, adapters: dict[str, Path]) -> AdapterHost:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    host = AdapterHost("tiny-base", model, AutoTokenizer.from_pretrained(tiny_model_dir))
    host.load_adapter("lora", adapters["lora"])
    host.load_adapter("dora", adapters["dora"])
    return host


def _reference_texts(tiny_model_dir: Path, adapter_dir: Path | None, quant_bits: int | None = None) -> list[str]:
    """Greedy completions of PROMPTS, one at a time, by a stock single-adapter peft model (or the bare base)."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = load_base_model(str(tiny_model_dir), bnb_defaults(quant_bits)).eval()
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir).eval()
    texts = []
    for prompt in PROMPTS:
        input_ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        with torch.no_grad():
            output = model.generate(input_ids=input_ids, max_new_tokens=MAX_TOKENS, do_sample=False,
                                    pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        new_tokens = output[0, input_ids.shape[1]:].tolist()
        if tokenizer.eos_token_id in new_tokens:
            new_tokens = new_tokens[: new_tokens.index(tokenizer.eos_token_id)]
        texts.append(tokenizer.decode(new_tokens, skip_special_tokens=True))
    return texts


@pytest.fixture(scope="module")
def shared_server(tiny_model_dir, adapters):
    with SharedServer(lambda: _load_host(tiny_model_dir, adapters),
                      lambda host: create_app(host, adapter_root=adapters["lora"].parent, window_ms=20)) as shared:
        yield shared


@pytest.fixture
def server(shared_server, request):
    """A real uvicorn server on a free 127.0.0.1 port, in a background thread, shared by the module's tests until
    one of them fails; yields its base URL."""
    with shared_server.serving(request.node) as url:
        yield url


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server, timeout=60) as http:
        yield http


def _complete(client, model: str, prompt=PROMPTS, **fields) -> httpx.Response:
    body = {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, **fields}
    return client.post("/v1/completions", json=body)


def _texts(response: httpx.Response) -> list[str]:
    assert response.status_code == 200, response.text
    return [choice["text"] for choice in response.json()["choices"]]


def _model_ids(client) -> list[str]:
    return [card["id"] for card in client.get("/v1/models").json()["data"]]


@pytest.mark.parametrize(("model", "adapter_key"), [("lora", "lora"), ("dora", "dora"), ("tiny-base", None)])
def test_each_model_completes_like_a_single_adapter_peft_model(client, tiny_model_dir, adapters, model, adapter_key):
    expected = _reference_texts(tiny_model_dir, adapters[adapter_key] if adapter_key else None)
    response = _complete(client, model)
    assert _texts(response) == expected
    body = response.json()
    assert body["object"] == "text_completion" and body["model"] == model
    assert [choice["index"] for choice in body["choices"]] == [0, 1]
    assert body["usage"]["completion_tokens"] > 0


def test_adapters_change_the_output(client):
    # Otherwise the equality above would hold for a server that ignored the adapters.
    assert len({tuple(_texts(_complete(client, model))) for model in ("lora", "dora", "tiny-base")}) == 3


def test_stop_sequence_cuts_the_text(client):
    full = _texts(_complete(client, "lora", prompt=PROMPTS[0]))[0]
    stop = full[3:5]
    response = _complete(client, "lora", prompt=PROMPTS[0], stop=[stop])
    assert _texts(response) == [full[: full.index(stop)]]
    assert response.json()["choices"][0]["finish_reason"] == "stop"


def test_concurrent_requests_across_adapters_equal_sequential_ones(client, server):
    models = ["lora", "dora", "tiny-base", "lora", "dora", "tiny-base"]
    sequential = [_texts(_complete(client, model, prompt=PROMPTS[i % 2])) for i, model in enumerate(models)]

    async def send_all():
        async with httpx.AsyncClient(base_url=server, timeout=60) as http:
            bodies = [{"model": model, "prompt": PROMPTS[i % 2], "max_tokens": MAX_TOKENS, "temperature": 0}
                      for i, model in enumerate(models)]
            return await asyncio.gather(*(http.post("/v1/completions", json=body) for body in bodies))

    concurrent = [_texts(response) for response in asyncio.run(send_all())]
    assert concurrent == sequential


def test_lora_and_base_rows_share_one_generate_and_each_dora_adapter_gets_its_own(tiny_model_dir, adapters):
    host = _load_host(tiny_model_dir, adapters)
    prompt_ids = host.encode_prompt(PROMPTS[0], MAX_TOKENS)
    models = ["lora", "tiny-base", "dora", "lora", "tiny-base"]
    one_by_one = {model: host.run_batch([GenerationRow(model, prompt_ids, MAX_TOKENS)])[0] for model in set(models)}
    calls_before = host.stats["generate_calls"]
    batched = host.run_batch([GenerationRow(model, prompt_ids, MAX_TOKENS) for model in models])
    assert host.stats["generate_calls"] - calls_before == 2  # LoRA + base mixed in one call, DoRA in another
    assert [row.token_ids for row in batched] == [one_by_one[model].token_ids for model in models]


def test_dora_norm_is_computed_once_at_load_and_caching_changes_no_output(tiny_model_dir, adapters):
    host = _load_host(tiny_model_dir, adapters)
    dora_layers = [module.lora_magnitude_vector["dora"] for module in host.model.modules()
                   if "dora" in getattr(module, "lora_magnitude_vector", {})]
    assert len(dora_layers) == 2 * len(TARGETS)
    cached_norms = [layer._dora_cache["weight-norm-dora"] for layer in dora_layers]  # filled by the load itself

    prompt_ids = host.encode_prompt(PROMPTS[0], MAX_TOKENS)
    served = host.run_batch([GenerationRow("dora", prompt_ids, MAX_TOKENS)])[0]
    assert all(layer._dora_cache["weight-norm-dora"] is norm for layer, norm in zip(dora_layers, cached_norms))

    from peft.helpers import DoraCaching

    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapters["dora"]).eval()
    input_ids = torch.tensor([prompt_ids + served.token_ids])
    with torch.no_grad():
        uncached_logits = reference(input_ids=input_ids).logits
        host.model.set_adapter("dora", inference_mode=True)
        with DoraCaching():
            cached_logits = host.model(input_ids=input_ids).logits
    assert torch.allclose(cached_logits, uncached_logits, rtol=0, atol=1e-6)


def test_list_load_and_unload_adapters_in_flight(client, adapters):
    cards = client.get("/v1/models").json()["data"]
    assert [(card["id"], card["kind"]) for card in cards] == [("tiny-base", "base"), ("lora", "lora"), ("dora", "dora")]

    loaded = client.post("/v1/adapters", json={"name": "lora-copy", "path": str(adapters["lora"])})
    assert loaded.status_code == 201, loaded.text
    assert loaded.json()["kind"] == "lora" and loaded.json()["parent"] == "tiny-base"
    assert "lora-copy" in _model_ids(client)
    assert _texts(_complete(client, "lora-copy")) == _texts(_complete(client, "lora"))

    assert client.delete("/v1/adapters/lora-copy").json() == {"id": "lora-copy", "object": "model", "deleted": True}
    assert _model_ids(client) == ["tiny-base", "lora", "dora"]
    gone = _complete(client, "lora-copy")
    assert gone.status_code == 404 and '"lora", "dora"' in gone.json()["error"]["message"]
    assert client.delete("/v1/adapters/lora-copy").status_code == 404
    assert client.delete("/v1/adapters/tiny-base").status_code == 400


def test_unloading_every_adapter_then_loading_again(tiny_model_dir, adapters):
    host = _load_host(tiny_model_dir, adapters)
    prompt_ids = host.encode_prompt(PROMPTS[1], MAX_TOKENS)
    base_before = host.run_batch([GenerationRow("tiny-base", prompt_ids, MAX_TOKENS)])[0]
    dora_before = host.run_batch([GenerationRow("dora", prompt_ids, MAX_TOKENS)])[0]
    host.unload_adapter("lora")
    host.unload_adapter("dora")
    assert host.model_names() == ["tiny-base"]
    assert host.run_batch([GenerationRow("tiny-base", prompt_ids, MAX_TOKENS)])[0] == base_before
    host.load_adapter("dora", adapters["dora"])
    assert host.run_batch([GenerationRow("dora", prompt_ids, MAX_TOKENS)])[0] == dora_before


def _post_raw(client, path: str, content: str) -> httpx.Response:
    return client.post(path, content=content, headers={"Content-Type": "application/json"})


BAD_REQUESTS = {
    "unknown model": (lambda c, a: _complete(c, "lorra"), 404, 'did you mean "lora"'),
    "malformed JSON": (lambda c, a: _post_raw(c, "/v1/completions", '{"model": "lora", "prompt": '), 400, "JSON"),
    "prompt too long": (lambda c, a: _complete(c, "lora", prompt="rose " * 600), 400, "maximum context length"),
    "completion too long": (lambda c, a: _complete(c, "lora", max_tokens=600), 400, "maximum context length"),
    "wrong field type": (lambda c, a: _complete(c, "lora", max_tokens="ten"), 422, "max_tokens"),
    "unknown field": (lambda c, a: _complete(c, "lora", best_of=2), 422, "best_of"),
    "adapter for another base": (
        lambda c, a: c.post("/v1/adapters", json={"name": "wide", "path": str(a["wide"])}), 400, "size mismatch"),
    "normalised DoRA adapter": (
        lambda c, a: c.post("/v1/adapters", json={"name": "norm", "path": str(a["normalised"])}), 400, "NORMALISED"),
    "DoRA adapter without magnitudes": (
        lambda c, a: c.post("/v1/adapters", json={"name": "nomag", "path": str(a["no_magnitudes"])}), 400,
        "lora_magnitude_vector"),
    "adapter folder missing": (
        lambda c, a: c.post("/v1/adapters", json={"name": "gone", "path": "/nonexistent/adapter"}), 400, "not exist"),
    "adapter name taken": (
        lambda c, a: c.post("/v1/adapters", json={"name": "lora", "path": str(a["lora"])}), 409, "already loaded"),
    "adapter name with a dot": (
        lambda c, a: c.post("/v1/adapters", json={"name": "v1.2", "path": str(a["lora"])}), 400, "not allowed"),
    "load body not JSON": (lambda c, a: _post_raw(c, "/v1/adapters", "name=x"), 400, "JSON"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_get_a_4xx_and_the_server_keeps_serving(client, adapters, case):
    send, status, message_part = BAD_REQUESTS[case]
    before = _texts(_complete(client, "lora"))
    response = send(client, adapters)
    assert response.status_code == status, response.text
    assert message_part in response.json()["error"]["message"]
    assert _model_ids(client) == ["tiny-base", "lora", "dora"]
    assert _texts(_complete(client, "lora")) == before
    assert client.get("/health").json()["status"] == "ok"


def test_sampled_completions_are_served(client):
    response = _complete(client, "lora", temperature=0.8, top_p=0.9)
    assert response.status_code == 200, response.text
    assert 0 < response.json()["usage"]["completion_tokens"] <= 2 * MAX_TOKENS


def test_temperature_above_zero_samples_and_zero_is_greedy(client):
    # The tiny random model spreads its probability over hundreds of tokens: 8 samples of the same prompt agree
    # on every token only if the server does not sample at all. Greedy answers are one answer, always.
    prompts = [PROMPTS[0]] * 8
    for temperature in (0.7, 1.5):
        sampled = _texts(_complete(client, "lora", prompt=prompts, temperature=temperature))
        assert len(set(sampled)) > 1, sampled
    greedy = _texts(_complete(client, "lora", prompt=prompts, temperature=0))
    assert len(set(greedy)) == 1 and greedy[0] == _texts(_complete(client, "lora", prompt=PROMPTS[0]))[0]


def test_base_comes_from_the_first_adapter_when_not_given(tiny_model_dir, adapters):
    name, path, _ = resolve_served_base(None, [("dora", adapters["dora"]), ("lora", adapters["lora"])])
    assert name == str(tiny_model_dir) and Path(path) == Path(tiny_model_dir).resolve()


@pytest.mark.parametrize(
    ("argv", "message_part"),
    [
        (["--base-model", "x", "--adapter", "no-equals-sign"], "expected NAME=PATH"),
        (["--base-model", "x", "--adapter", "a=/nonexistent/adapter"], "does not exist"),
        (["--adapter", "a={lora}", "--adapter", "a={dora}"], "unique"),
        ([], "--base-model"),
    ],
)
def test_command_line_user_errors_exit_2_before_loading_anything(adapters, capsys, argv, message_part):
    argv = [part.format(**adapters) for part in argv]
    assert main(argv) == 2
    assert message_part in capsys.readouterr().err


@pytest.mark.parametrize("quant_bits", [4, 8])
def test_quantised_base_serves_lora_and_dora_like_single_adapter_peft_models(tiny_model_dir, adapters, quant_bits):
    host = AdapterHost("tiny-base", load_base_model(str(tiny_model_dir), bnb_defaults(quant_bits)),
                       AutoTokenizer.from_pretrained(tiny_model_dir), quant_bits=quant_bits)
    host.load_adapter("lora", adapters["lora"])
    host.load_adapter("dora", adapters["dora"])
    models = ["lora", "dora", "tiny-base"]
    rows = [GenerationRow(model, host.encode_prompt(prompt, MAX_TOKENS), MAX_TOKENS) for model in models
            for prompt in PROMPTS]
    served = [host.decode(row.token_ids) for row in host.run_batch(rows)]
    expected = [text for model in models for text in _reference_texts(
        tiny_model_dir, adapters[model] if model != "tiny-base" else None, quant_bits)]
    assert served == expected


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _start_serve_command(command: list[str], log_path: Path, env: dict, cwd: Path, tries: int = 3):
    """lora/serve.py on a free loopback port; returns (process, base URL) once the server listens.

    The command takes a port number (not a socket, and not 0), so the port is picked here and bound by the server
    seconds later: another process may take it in between. The server is known to be ours only once its own log
    says it listens on the port (not when something answers there); if it could not bind, it is started again on
    another port.
    """
    for _ in range(tries):
        port = _free_loopback_port()
        with log_path.open("w") as log:
            process = subprocess.Popen(command + ["--port", str(port)], cwd=cwd, stdout=log,
                                       stderr=subprocess.STDOUT, env=env)
        listening = f"Uvicorn running on http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while process.poll() is None and listening not in log_path.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        if process.poll() is None and listening in log_path.read_text():
            return process, f"http://127.0.0.1:{port}"
        process.kill()
        process.wait(timeout=60)
        text = log_path.read_text()
        if "address already in use" not in text.lower() and "cannot listen on" not in text:
            pytest.fail(f"lora/serve.py did not start:\n{text[-3000:]}")
    pytest.fail(f"every port tried was taken before lora/serve.py could bind it ({tries} tries)")


@pytest.mark.slow
def test_serve_command_starts_from_any_folder_serves_and_stops(tiny_model_dir, adapters, repo_root, tmp_path):
    command = [sys.executable, str(repo_root / "lora" / "serve.py"), "--base-model", str(tiny_model_dir),
               "--adapter", f"lora={adapters['lora']}", "--adapter", f"dora={adapters['dora']}", "--threads", "1"]
    log_path = tmp_path / "server.log"
    key = "end-to-end-key"
    process, url = _start_serve_command(command, log_path, {**os.environ, "LORA_SERVE_API_KEY": key}, tmp_path)
    try:
        assert httpx.get(f"{url}/health", timeout=60).status_code == 200
        assert httpx.get(f"{url}/v1/models", timeout=60).status_code == 401  # the key came from the environment
        with httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {key}"}) as http:
            assert _model_ids(http) == [str(tiny_model_dir), "lora", "dora"]
            assert _texts(_complete(http, "dora")) == _reference_texts(tiny_model_dir, adapters["dora"])
    finally:
        process.terminate()
        process.wait(timeout=60)
    assert "serve: adapter dora (dora)" in log_path.read_text()
