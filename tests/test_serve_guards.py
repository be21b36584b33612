"""lora/serve.py guarded: API key, adapter root, body size limit, tokenising off the event loop, one error format,
and a bounded load with faults mixed in. Every request goes to a real uvicorn server on 127.0.0.1.

Run: .venv/bin/pytest tests/test_serve_guards.py -q
"""

from __future__ import annotations

import asyncio
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from peft import LoraConfig, get_peft_model
from serving_helpers import SharedServer, one_torch_thread  # noqa: F401  (an autouse fixture)
from transformers import AutoModelForCausalLM, AutoTokenizer

from lora.core.errors import UserError
from lora.serve import main
from lora.serving.guards import API_KEY_ENV, check_bind_is_guarded, resolve_api_key
from lora.serving.host import AdapterHost

KEY = "test-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
PROMPT = "Shares of the company rose after revenue beat"
# ~700 KB: under the 1 MiB body limit, far over the tiny model's 512-token context, about a second to tokenise.
LONG_PROMPT = "Shares rose 5% after revenue beat. " * 20_000


def _write_lora(base_dir: Path, out_dir: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                        task_type="CAUSAL_LM")
    get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), config).save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def folders(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    """The adapter root with two adapters, and outside it a real adapter plus a symlink to it from inside."""
    work = tmp_path_factory.mktemp("guards")
    root, elsewhere = work / "outputs", work / "elsewhere"
    paths = {
        "root": root,
        "lora": _write_lora(tiny_model_dir, root / "lora", seed=1),
        "hot": _write_lora(tiny_model_dir, root / "hot", seed=2),
        "outside": _write_lora(tiny_model_dir, elsewhere / "secret_adapter", seed=3),
    }
    (root / "link").symlink_to(paths["outside"], target_is_directory=True)
    return paths


def _make_host(tiny_model_dir, folders) -> AdapterHost:
    served = AdapterHost("tiny-base", AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                         AutoTokenizer.from_pretrained(tiny_model_dir))
    served.load_adapter("lora", folders["lora"])
    return served


@pytest.fixture(scope="module")
def shared_server(tiny_model_dir, folders):
    from lora.serving.app import create_app

    with SharedServer(lambda: _make_host(tiny_model_dir, folders),
                      lambda host: create_app(host, adapter_root=folders["root"], api_key=KEY, window_ms=10)) as shared:
        yield shared


@pytest.fixture
def server(shared_server, request):
    """The module's server, made again after a test that failed (see serving_helpers.SharedServer)."""
    with shared_server.serving(request.node) as url:
        yield url


@pytest.fixture
def host(server, shared_server) -> AdapterHost:
    return shared_server.host


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server, timeout=60, headers=AUTH) as http:
        yield http


def _completion(model: str = "lora", prompt: str = PROMPT, **fields) -> dict:
    return {"model": model, "prompt": prompt, "max_tokens": 4, "temperature": 0, **fields}


def _error(response: httpx.Response) -> dict:
    """The server's error object; fails unless the body is exactly {"error": {message, type, code}}."""
    assert response.headers["content-type"] == "application/json", response.text
    body = response.json()
    assert list(body) == ["error"] and set(body["error"]) == {"message", "type", "code"}, body
    return body["error"]


def _model_ids(client) -> list[str]:
    return [card["id"] for card in client.get("/v1/models").json()["data"]]


# ---- authentication ------------------------------------------------------------------------------------------

ROUTES = [("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/adapters"),
          ("DELETE", "/v1/adapters/lora"), ("GET", "/no/such/route")]
BAD_CREDENTIALS = [{}, {"Authorization": "Bearer wrong-key"}, {"Authorization": f"Basic {KEY}"},
                   {"Authorization": KEY}, {"Authorization": "Bearer"}, {"Authorization": f"Bearer {KEY}x"},
                   # only the whole key opens the server: never a prefix, a suffix or the key in another case
                   {"Authorization": f"Bearer {KEY[:-1]}"}, {"Authorization": f"Bearer {KEY[:1]}"},
                   {"Authorization": f"Bearer {KEY[1:]}"}, {"Authorization": f"Bearer {KEY.upper()}"}]


@pytest.mark.parametrize(("method", "path"), ROUTES)
def test_every_route_but_health_needs_the_bearer_key(server, client, method, path):
    for headers in BAD_CREDENTIALS:
        response = httpx.request(method, server + path, headers=headers, json=_completion(), timeout=60)
        assert response.status_code == 401, (headers, response.text)
        assert response.headers["www-authenticate"] == "Bearer"
        error = _error(response)
        assert error["code"] == "invalid_api_key" and KEY not in response.text
    assert "lora" in _model_ids(client)  # the unauthenticated DELETE unloaded nothing
    assert httpx.get(server + "/health", timeout=60).status_code == 200  # probes need no key
    lowercase_scheme = httpx.get(server + "/v1/models", headers={"Authorization": f"bearer {KEY}"}, timeout=60)
    assert lowercase_scheme.status_code == 200


def test_a_non_loopback_host_without_a_key_is_refused(monkeypatch, capsys):
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    for host in ("0.0.0.0", "::", "192.168.1.20", "my-machine.example"):
        assert main(["--base-model", "unused", "--host", host]) == 2
        message = capsys.readouterr().err
        assert f"--host {host}" in message and "--api-key" in message and API_KEY_ENV in message
        assert "--allow-unauthenticated-remote" in message


def test_loopback_a_key_or_the_explicit_flag_allow_binding():
    for host in ("127.0.0.1", "127.0.0.9", "::1", "[::1]", "localhost"):
        check_bind_is_guarded(host, None, False)
    check_bind_is_guarded("0.0.0.0", KEY, False)
    check_bind_is_guarded("0.0.0.0", None, True)


def test_api_key_comes_from_the_flag_then_the_environment(monkeypatch, capsys):
    assert resolve_api_key("from-flag", {API_KEY_ENV: "from-env"}) == "from-flag"
    assert resolve_api_key(None, {API_KEY_ENV: "from-env"}) == "from-env"
    assert resolve_api_key(None, {API_KEY_ENV: ""}) is None and resolve_api_key(None, {}) is None
    for bad_key, source in (("", "--api-key"), ("two words", "--api-key")):
        with pytest.raises(UserError, match=source):
            resolve_api_key(bad_key, {})
    # With the key in the environment the remote-host guard lets main go on: it stops later, at the bind
    # (192.0.2.1 is a documentation address no machine has), before any model loads.
    monkeypatch.setenv(API_KEY_ENV, KEY)
    assert main(["--base-model", "unused", "--host", "192.0.2.1", "--port", "8000"]) == 2
    assert "cannot listen on 192.0.2.1:8000" in capsys.readouterr().err


# ---- where adapters may come from ------------------------------------------------------------------------------


def test_adapters_load_from_under_the_root_by_relative_or_absolute_path(client, folders):
    for name, path in (("hot-relative", "hot"), ("hot-absolute", str(folders["hot"]))):
        loaded = client.post("/v1/adapters", json={"name": name, "path": path})
        assert loaded.status_code == 201, loaded.text
        assert loaded.json()["root"] == str(folders["hot"].resolve())
        assert client.delete(f"/v1/adapters/{name}").status_code == 200
    assert _model_ids(client) == ["tiny-base", "lora"]


def test_a_path_outside_the_root_reads_exactly_like_a_missing_one(client, folders):
    refused = {
        "existing adapter outside": str(folders["outside"]),
        "climbing out": "../elsewhere/secret_adapter",
        "symlink out of the root": "link",
        "missing outside": "/nonexistent/adapter",
        "missing inside": "not_trained_yet",
        "an existing system folder": "/etc",
        "a file": "/etc/hostname",
        "the root itself": "",
        "home folder": "~",
        "NUL byte": "hot\x00",
    }
    answers = {}
    for case, path in refused.items():
        response = client.post("/v1/adapters", json={"name": "probe", "path": path})
        answers[case] = (response.status_code, response.json())
    assert answers["existing adapter outside"][0] == 400, answers
    assert all(answer == answers["existing adapter outside"] for answer in answers.values()), answers
    assert "does not exist under this server's adapter root" in _error(response)["message"]
    assert _model_ids(client) == ["tiny-base", "lora"]


def test_adapter_names_from_clients_are_plain_names(client, folders):
    for name in ("../x", "a/b", ".", "..", "", "x" * 65, "a b", "v1.2", "é"):
        response = client.post("/v1/adapters", json={"name": name, "path": "hot"})
        assert response.status_code == 400 and "not allowed" in _error(response)["message"], (name, response.text)
    for path in ("/v1/adapters/a/b", "/v1/adapters/..%2Flora", "/v1/adapters/lora/x"):
        response = client.delete(path)
        assert response.status_code == 404, (path, response.text)
        assert "Adapter names are 1-64 letters" in _error(response)["message"]
    assert _model_ids(client) == ["tiny-base", "lora"]


# ---- limits and the error format -------------------------------------------------------------------------------


def test_oversize_bodies_get_413_before_they_are_parsed(client):
    two_mib = json.dumps(_completion(prompt="x" * (2 << 20)))
    declared = client.post("/v1/completions", content=two_mib, headers={"Content-Type": "application/json"})
    assert declared.status_code == 413 and _error(declared)["code"] == "request_too_large"
    assert "--max-request-bytes" in _error(declared)["message"]
    not_json = client.post("/v1/completions", content=b"{" * (2 << 20), headers={"Content-Type": "application/json"})
    assert not_json.status_code == 413  # not the parser's 400: the body never reached it

    def chunks():  # no Content-Length: the server has to count what arrives
        for _ in range(40):
            yield b" " * 65536

    chunked = client.post("/v1/completions", content=chunks(), headers={"Content-Type": "application/json"})
    assert chunked.status_code == 413 and "more than 1048576 bytes" in _error(chunked)["message"]
    assert client.post("/v1/completions", json=_completion()).status_code == 200


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "code"),
    [
        ("GET", "/v2/models", None, 404, "not_found"),
        ("POST", "/v1/models", None, 405, "method_not_allowed"),
        ("GET", "/v1/completions", None, 405, "method_not_allowed"),
        ("PUT", "/v1/adapters", None, 405, "method_not_allowed"),
        ("POST", "/v1/completions", b'{"model": ', 400, "json_invalid"),
        ("POST", "/v1/completions", b"[]", 422, "invalid_request"),
        ("POST", "/v1/completions", json.dumps(_completion(max_tokens="ten")).encode(), 422, "invalid_request"),
        ("POST", "/v1/completions", json.dumps(_completion(model="lorra")).encode(), 404, "UnknownModelError"),
    ],
)
def test_every_error_is_in_the_servers_format(client, method, path, body, status, code):
    response = client.request(method, path, content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == status, response.text
    error = _error(response)
    assert error["code"] == code and error["type"] == "invalid_request_error" and error["message"]
    if status == 405:
        assert response.headers["allow"] and response.headers["allow"] in error["message"]


def test_health_answers_while_a_long_prompt_is_being_tokenised(server, client, host):
    tokenising, tokenised = threading.Event(), threading.Event()
    encode_prompt = host.encode_prompt

    def observed_encode(text: str, max_new_tokens: int, **options):
        long = len(text) > 100_000
        if long:
            tokenising.set()
        try:
            return encode_prompt(text, max_new_tokens, **options)
        finally:
            if long:
                tokenised.set()

    host.encode_prompt = observed_encode  # the real method, watched: when did the long prompt's encoding run?
    try:
        with ThreadPoolExecutor(max_workers=1) as pool:
            long_request = pool.submit(httpx.post, server + "/v1/completions", json=_completion(prompt=LONG_PROMPT),
                                       headers=AUTH, timeout=120)
            assert tokenising.wait(timeout=120), long_request.result().text
            health = httpx.get(server + "/health", timeout=120)
            answered_while_tokenising = not tokenised.is_set()
            rejected = long_request.result()
    finally:
        del host.encode_prompt
    assert health.status_code == 200
    assert answered_while_tokenising, "/health waited for the long prompt's tokenisation"
    assert rejected.status_code == 400 and "maximum context length" in _error(rejected)["message"]


# ---- a bounded load with faults mixed in -----------------------------------------------------------------------

# kind -> (how to send it, the statuses it may get); "hot" is loaded and unloaded while the load runs.
LOAD_KINDS = {
    "lora": (lambda http: http.post("/v1/completions", json=_completion("lora")), {200}),
    "base": (lambda http: http.post("/v1/completions", json=_completion("tiny-base", prompt=[PROMPT, "The bank"])),
             {200}),
    "hot": (lambda http: http.post("/v1/completions", json=_completion("hot")), {200, 404}),
    "bad key": (lambda http: http.get("/v1/models", headers={"Authorization": "Bearer nope"}), {401}),
    "oversize": (lambda http: http.post("/v1/completions", json=_completion(prompt="y" * (3 << 19))), {413}),
    "unknown route": (lambda http: http.get("/v1/chat"), {404}),
    "adapter outside the root": (lambda http: http.post("/v1/adapters", json={"name": "x", "path": "../elsewhere"}),
                                 {400}),
    "bad JSON": (lambda http: http.post("/v1/completions", content=b"{", headers={"Content-Type": "application/json"}),
                 {400}),
    "wrong type": (lambda http: http.post("/v1/completions", json=_completion(max_tokens=[1])), {422}),
}
CLIENTS, ROUNDS, CHURNS = 6, 6, 3


async def _load_with_faults(url: str) -> dict:
    outcomes: list[tuple[str, int, dict | None]] = []
    health_answers: list[tuple[int, bool]] = []
    long_prompt = {"sent": False, "answered": False, "status": None}
    done = asyncio.Event()

    async def record(kind: str, sending) -> None:
        response = await sending
        body = response.json() if response.headers.get("content-type") == "application/json" else None
        outcomes.append((kind, response.status_code, body))

    async def client_task(http: httpx.AsyncClient, index: int) -> None:
        kinds = list(LOAD_KINDS)
        for round_ in range(ROUNDS):
            kind = kinds[(index * ROUNDS + round_) % len(kinds)]
            await record(kind, LOAD_KINDS[kind][0](http))

    async def churn_task(http: httpx.AsyncClient) -> None:
        for _ in range(CHURNS):
            await record("load hot", http.post("/v1/adapters", json={"name": "hot", "path": "hot"}))
            await record("hot loaded", http.post("/v1/completions", json=_completion("hot")))
            await record("unload hot", http.delete("/v1/adapters/hot"))

    async def long_prompt_task(http: httpx.AsyncClient) -> None:
        long_prompt["sent"] = True
        response = await http.post("/v1/completions", json=_completion(prompt=LONG_PROMPT))
        long_prompt.update(answered=True, status=response.status_code)

    async def health_task(http: httpx.AsyncClient) -> None:
        while not done.is_set():
            response = await http.get("/health")
            health_answers.append((response.status_code, long_prompt["sent"] and not long_prompt["answered"]))
            await asyncio.sleep(0.01)

    async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=60) as http, \
            httpx.AsyncClient(base_url=url, timeout=60) as probe:
        prober = asyncio.create_task(health_task(probe))
        await asyncio.gather(long_prompt_task(http), churn_task(http), *(client_task(http, i) for i in range(CLIENTS)))
        done.set()
        await prober
    return {"outcomes": outcomes, "health": health_answers, "long_prompt": long_prompt}


def test_bounded_load_with_faults_mixed_in_gets_no_5xx_and_health_answers_throughout(server, client):
    before = client.post("/v1/completions", json=_completion("lora")).json()["choices"]
    result = asyncio.run(asyncio.wait_for(_load_with_faults(server), timeout=180))

    outcomes = result["outcomes"]
    assert len(outcomes) == CLIENTS * ROUNDS + 3 * CHURNS
    assert [status for _, status, _ in outcomes if status >= 500] == []
    expected = {**{kind: statuses for kind, (_, statuses) in LOAD_KINDS.items()}, "load hot": {201},
                "hot loaded": {200}, "unload hot": {200}}
    unexpected = [(kind, status, body) for kind, status, body in outcomes if status not in expected[kind]]
    assert unexpected == []
    assert all(set(body) == {"error"} for _, status, body in outcomes if status >= 400)
    assert {kind for kind, _, _ in outcomes} >= set(LOAD_KINDS)

    health = result["health"]
    assert health and all(status == 200 for status, _ in health)
    assert any(during_long_prompt for _, during_long_prompt in health), "no /health answer while the long prompt ran"
    assert result["long_prompt"]["status"] == 400

    assert _model_ids(client) == ["tiny-base", "lora"]
    assert client.post("/v1/completions", json=_completion("lora")).json()["choices"] == before

