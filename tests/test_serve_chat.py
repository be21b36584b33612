"""The server applies the chat rule: an adapter trained under prompt_template "chat" is served with the prompt it
learnt (POST /v1/completions renders the prompt as the user turn of the chat template, as training and scoring do),
and POST /v1/chat/completions renders OpenAI-style messages with the tokenizer's chat template. Over real HTTP.

Run: .venv/bin/pytest tests/test_serve_chat.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from serving_helpers import one_torch_thread, serve_in_thread  # noqa: F401  (an autouse fixture)
from transformers import AutoModelForCausalLM, AutoTokenizer

from lora.serving.app import create_app
from lora.serving.host import AdapterHost, BadRequestError

# No trailing space: the references tokenise texts as they are (the server leaves trailing whitespace to the answer).
PROMPT = "Input: Shares of the company rose after revenue beat expectations.\nAnswer:"
MAX_TOKENS = 8


def _write_adapter(base_model, out_dir: Path, *, seed: int, template: str, base_name: str) -> Path:
    """A random (non-zero B) LoRA adapter with the recipe.json the runner writes, recording `template`."""
    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False,
                        task_type="CAUSAL_LM")
    peft_model = get_peft_model(base_model, config)
    peft_model.save_pretrained(out_dir)
    peft_model.unload()
    (out_dir / "recipe.json").write_text(json.dumps({"base_model": base_name, "quant_bits": None, "use_dora": False,
                                                     "lora_r": 4, "lora_alpha": 8, "prompt_template": template}))
    return out_dir


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("chat-adapters")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    return {template: _write_adapter(base, root / template, seed=seed, template=template,
                                     base_name=str(tiny_model_dir))
            for seed, template in enumerate(["chat", "plain", "Question: {context}\nReply:"], start=5)}


def _host(tiny_model_dir, adapters) -> AdapterHost:
    host = AdapterHost("tiny-base", AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                       AutoTokenizer.from_pretrained(tiny_model_dir))
    for name, template in (("chat", "chat"), ("plain", "plain"), ("format", "Question: {context}\nReply:")):
        host.load_adapter(name, adapters[template])
    return host


@pytest.fixture(scope="module")
def client(tiny_model_dir, adapters):
    app = create_app(_host(tiny_model_dir, adapters), adapter_root=Path(adapters["chat"]).parent, window_ms=5)
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=60) as http:
        yield http


def _reference(tiny_model_dir, adapter_dir: Path | None, text: str) -> str:
    """Greedy completion of the text by a stock single-adapter peft model, the tokenizer's ids of that text as they
    are (its own special tokens written by the template), stopped at the EOS (the tiny template's end of turn)."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir).eval()
    input_ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        output = model.generate(input_ids=input_ids, max_new_tokens=MAX_TOKENS, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    new_tokens = output[0, input_ids.shape[1]:].tolist()
    if tokenizer.eos_token_id in new_tokens:
        new_tokens = new_tokens[: new_tokens.index(tokenizer.eos_token_id)]
    return tokenizer.decode(new_tokens, skip_special_tokens=True)


def _chat_text(tiny_model_dir, messages: list[dict]) -> str:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def _completion(client, model: str, prompt: str) -> str:
    response = client.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS,
                                                    "temperature": 0})
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def _chat(client, model: str, messages, **fields) -> httpx.Response:
    body = {"model": model, "messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0, **fields}
    # json.dumps escapes every non-ASCII character, so a lone surrogate travels as the "\ud800" a client can send
    return client.post("/v1/chat/completions", content=json.dumps(body), headers={"Content-Type": "application/json"})


def test_a_chat_adapter_completes_the_prompt_as_the_user_turn_of_the_chat_template(client, tiny_model_dir, adapters):
    user_turn = _chat_text(tiny_model_dir, [{"role": "user", "content": PROMPT}])
    expected = _reference(tiny_model_dir, adapters["chat"], user_turn)
    as_written = _reference(tiny_model_dir, adapters["chat"], PROMPT)
    assert expected != as_written  # the test tells the two renderings apart
    assert _completion(client, "chat", PROMPT) == expected


def test_plain_and_format_string_adapters_and_the_base_complete_as_they_were_trained(client, tiny_model_dir, adapters):
    assert _completion(client, "plain", PROMPT) == _reference(tiny_model_dir, adapters["plain"], PROMPT)
    assert _completion(client, "tiny-base", PROMPT) == _reference(tiny_model_dir, None, PROMPT)
    template = "Question: {context}\nReply:"  # the tiny tokenizer adds no BOS: the text's ids as they are
    assert _completion(client, "format", PROMPT) == _reference(tiny_model_dir, adapters[template],
                                                               template.replace("{context}", PROMPT))


def test_chat_completions_render_the_messages_with_the_chat_template(client, tiny_model_dir, adapters):
    messages = [{"role": "system", "content": "Answer with one word."}, {"role": "user", "content": "Shares rose."},
                {"role": "assistant", "content": "positive"}, {"role": "user", "content": PROMPT}]
    rendered = _chat_text(tiny_model_dir, messages)
    for model, adapter in (("chat", adapters["chat"]), ("plain", adapters["plain"]), ("tiny-base", None)):
        response = _chat(client, model, messages)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["object"] == "chat.completion" and body["model"] == model
        assert body["choices"][0]["message"] == {"role": "assistant",
                                                 "content": _reference(tiny_model_dir, adapter, rendered)}
        assert body["usage"]["prompt_tokens"] == len(AutoTokenizer.from_pretrained(tiny_model_dir)(
            rendered, add_special_tokens=False)["input_ids"])
    # One user turn to a chat adapter is the prompt /v1/completions sends it: the rule chat rows train under.
    one_turn = _chat(client, "chat", [{"role": "user", "content": PROMPT}]).json()["choices"][0]["message"]["content"]
    assert one_turn == _completion(client, "chat", PROMPT)


BAD_CHATS = {
    "unknown role": ([{"role": "bot", "content": "hi"}], 400, "messages[0].role 'bot' is not one of system, user, "
                                                              "assistant"),
    "tool role": ([{"role": "user", "content": "hi"}, {"role": "tool", "content": "x"}], 400, "messages[1].role"),
    "content not a string": ([{"role": "user", "content": 3}], 400, "messages[0].content must be a string, got int"),
    "content parts": ([{"role": "user", "content": [{"type": "text", "text": "hi"}]}], 400,
                      "messages[0].content must be a string, got list"),
    "lone surrogate": ([{"role": "user", "content": "\ud800"}], 400, "lone UTF-16 surrogate"),
    "no messages": ([], 422, "messages"),
    "message without content": ([{"role": "user"}], 422, "content"),
}


@pytest.mark.parametrize("case", list(BAD_CHATS))
def test_bad_chat_requests_get_a_4xx_and_the_server_keeps_serving(client, case):
    messages, status, message_part = BAD_CHATS[case]
    response = _chat(client, "chat", messages)
    assert response.status_code == status, response.text
    assert message_part in response.json()["error"]["message"]
    assert _chat(client, "chat", [{"role": "user", "content": "hi"}]).status_code == 200


def test_unknown_model_and_streaming_are_refused(client):
    assert _chat(client, "chatt", [{"role": "user", "content": "hi"}]).status_code == 404
    response = _chat(client, "chat", [{"role": "user", "content": "hi"}], stream=True)
    assert response.status_code == 422 and "streaming" in response.json()["error"]["message"]


def test_a_base_without_a_chat_template_refuses_messages_with_a_400(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = None
    host = AdapterHost("tiny-base", AutoModelForCausalLM.from_pretrained(tiny_model_dir), tokenizer)
    with pytest.raises(BadRequestError, match="chat template"):
        host.prepare_row("tiny-base", [{"role": "user", "content": "hi"}], MAX_TOKENS)
    assert host.prepare_row("tiny-base", PROMPT, MAX_TOKENS).prompt_ids  # plain prompts still served
