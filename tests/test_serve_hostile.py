"""lora/serve.py against inputs that used to crash it (issue 24, items 8, 13 and 14): a base whose tokenizer has no
chat template, strings holding a lone UTF-16 surrogate in every string field of every route, and more adapters than
the server should hold. Every request goes to a real uvicorn server on 127.0.0.1.

Run: .venv/bin/python -m pytest tests/test_serve_hostile.py -q
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import httpx
import pytest
import torch
from peft import LoraConfig, get_peft_model
from serving_helpers import one_torch_thread, serve_in_thread  # noqa: F401  (an autouse fixture)
from transformers import AutoModelForCausalLM, AutoTokenizer

from lora.core.errors import UserError
from lora.serve import main as serve
from lora.serving.app import create_app
from lora.serving.host import DEFAULT_MAX_ADAPTERS, AdapterHost
from tiny_model import build_tiny_llama, build_tiny_tokenizer

PROMPT = "Shares of the company rose after revenue beat"


def _write_lora(base_dir: Path, out_dir: Path, seed: int, template: str | None = None) -> Path:
    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                        task_type="CAUSAL_LM")
    get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), config).save_pretrained(out_dir)
    if template is not None:  # what the runner records: the template the adapter was trained under
        (out_dir / "recipe.json").write_text(json.dumps({"base_model": str(base_dir), "prompt_template": template,
                                                         "quant_bits": None}))
    return out_dir


@pytest.fixture(scope="module")
def plain_base(tmp_path_factory) -> Path:
    """A tiny base whose tokenizer has no chat template, as many base (not instruct) models have."""
    folder = tmp_path_factory.mktemp("no-chat-base")
    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = None
    build_tiny_llama(len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    assert not AutoTokenizer.from_pretrained(folder).chat_template
    return folder


@pytest.fixture(scope="module")
def folders(plain_base, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hostile") / "outputs"
    return {
        "root": root,
        "plain": _write_lora(plain_base, root / "plain", seed=1, template="plain"),
        "chat": _write_lora(plain_base, root / "chat", seed=2, template="chat"),
        **{f"extra{i}": _write_lora(plain_base, root / f"extra{i}", seed=3 + i) for i in range(3)},
    }


@pytest.fixture(scope="module")
def server(plain_base, folders):
    host = AdapterHost("plain-base", AutoModelForCausalLM.from_pretrained(plain_base),
                       AutoTokenizer.from_pretrained(plain_base), max_adapters=3)
    host.load_adapter("plain", folders["plain"])
    with serve_in_thread(create_app(host, adapter_root=folders["root"], window_ms=5)) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server, timeout=60) as http:
        yield http


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# ---- item 8: a base without a chat template ------------------------------------------------------------------------

def test_a_base_without_a_chat_template_serves_plain_adapters(client):
    response = client.post("/v1/completions", json={"model": "plain", "prompt": PROMPT, "max_tokens": 3,
                                                    "temperature": 0})
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_a_chat_adapter_on_such_a_base_is_refused_when_loaded(client):
    response = client.post("/v1/adapters", json={"name": "chatty", "path": "chat"})
    assert response.status_code == 400, response.text
    message = response.json()["error"]["message"]
    assert 'cannot serve adapter "chatty"' in message and "prompt_template 'chat'" in message
    assert "needs a tokenizer with a chat template; this one has none" in message
    assert "chatty" not in [card["id"] for card in client.get("/v1/models").json()["data"]]


def test_a_chat_adapter_on_such_a_base_exits_2_at_startup(plain_base, folders, capsys):
    code = serve(["--base-model", str(plain_base), "--adapter", f"plain={folders['plain']}",
                  "--adapter", f"chat={folders['chat']}", "--port", str(_free_port())])
    error = capsys.readouterr().err
    assert code == 2, error
    assert 'error: cannot serve adapter "chat"' in error and "Traceback" not in error


# ---- item 13: a lone surrogate in any string field is a 400 --------------------------------------------------------

_COMPLETION = '{"model": "plain", "prompt": "hi", "max_tokens": 2, "temperature": 0'


@pytest.mark.parametrize(("route", "body", "field"), [
    ("/v1/completions", '{"model": "plain", "prompt": "\\ud800x", "max_tokens": 2}', "prompt"),
    ("/v1/completions", '{"model": "plain", "prompt": ["ok", "\\udc00"], "max_tokens": 2}', "prompt.1"),
    ("/v1/completions", '{"model": "\\ud800", "prompt": "hi"}', "model"),
    ("/v1/completions", _COMPLETION + ', "stop": "\\ud800"}', "stop"),
    ("/v1/completions", _COMPLETION + ', "stop": ["x", "\\ud800"]}', "stop.1"),
    ("/v1/completions", _COMPLETION + ', "user": "\\ud800"}', "user"),
    ("/v1/completions", _COMPLETION + ', "max_tokens": "\\ud800"}', "max_tokens"),
    ("/v1/completions", _COMPLETION + ', "\\ud800": 1}', "body"),
    ("/v1/adapters", '{"name": "\\ud800", "path": "plain"}', "name"),
    ("/v1/adapters", '{"name": "x", "path": "\\udbff"}', "path"),
])
def test_a_lone_surrogate_in_any_string_field_is_a_400(client, route, body, field):
    response = client.post(route, content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_text"
    assert error["message"].startswith(f"{field}: holds a lone UTF-16 surrogate")
    assert client.get("/health").status_code == 200


def test_a_valid_surrogate_pair_is_text(client):
    body = '{"model": "plain", "prompt": "up \\ud83d\\ude00", "max_tokens": 2, "temperature": 0}'
    response = client.post("/v1/completions", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 200, response.text


# ---- item 14: --max-adapters ---------------------------------------------------------------------------------------

def test_loads_over_max_adapters_get_409_until_one_is_unloaded(client):
    for name in ("extra0", "extra1"):  # with "plain": 3, the server's limit
        assert client.post("/v1/adapters", json={"name": name, "path": name}).status_code == 201
    response = client.post("/v1/adapters", json={"name": "extra2", "path": "extra2"})
    assert response.status_code == 409, response.text
    assert "already serves 3 adapters, its limit (--max-adapters 3)" in response.json()["error"]["message"]
    assert client.delete("/v1/adapters/extra0").status_code == 200
    assert client.post("/v1/adapters", json={"name": "extra2", "path": "extra2"}).status_code == 201
    assert client.delete("/v1/adapters/extra1").status_code == 200
    assert client.delete("/v1/adapters/extra2").status_code == 200


def test_max_adapters_has_a_default_and_a_host_refuses_past_it(plain_base, folders):
    assert 1 <= DEFAULT_MAX_ADAPTERS <= 64
    host = AdapterHost("b", AutoModelForCausalLM.from_pretrained(plain_base), AutoTokenizer.from_pretrained(plain_base),
                       max_adapters=1)
    host.load_adapter("one", folders["plain"])
    with pytest.raises(UserError, match="limit"):
        host.load_adapter("two", folders["extra0"])
    assert list(host.adapters) == ["one"]


@pytest.mark.parametrize("value", ["0", "1"])
def test_max_adapters_below_the_adapters_given_exits_2(folders, capsys, value):
    code = serve(["--adapter", f"a={folders['plain']}", "--adapter", f"b={folders['extra0']}",
                  "--max-adapters", value, "--port", str(_free_port())])
    assert code == 2
    assert f"--max-adapters {value}: give at least 2" in capsys.readouterr().err
