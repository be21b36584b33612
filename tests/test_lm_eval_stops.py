"""The lm-eval export stops a generated answer where our generation does (lora.prompts.generation.stop_token_ids),
on a model that declares an extra end id: lm-eval runs the exported task on a tiny model built to answer
" 42<|eot|> 99", and its answer must be ours, " 42".

The declared end token is an ordinary (non-special) token: lm-eval decodes its generations with special tokens
skipped, so only the exported `until` can cut such a token and what follows it (transformers stops a row at it,
from the model's generation config, but keeps the token).
"""

from __future__ import annotations

import json

import pytest
import torch

from eval.harness.evaluation import evaluate_tasks, prepare_tasks, task_targets
from eval.harness.lm_eval_export import export_tasks
from lora.prompts.generation import stop_strings, stop_token_ids
from lora.prompts.templates import encode_prompt
from tiny_model import build_tiny_llama, build_tiny_tokenizer

DECLARED_END = "<|eot|>"
CONTEXT = "Instruction: Give the number.\nInput: six times seven\nAnswer: "


def chain_model(tokenizer, chain: list[int]):
    """A tiny Llama whose greedy next token is a function of the current token alone: chain[i] -> chain[i + 1].

    Attention and MLP outputs are zeroed, so the last hidden state is the current token's embedding; each chain
    token gets its own embedding direction, which the LM head maps to the next one. A token off the chain has a
    zero embedding, all logits 0, and greedy decoding then picks id 0, the EOS.
    """
    assert len(set(chain)) == len(chain)
    model = build_tiny_llama(len(tokenizer), layers=1)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.zero_()
        model.lm_head.weight.zero_()
        for direction, (token, following) in enumerate(zip(chain, chain[1:])):
            model.model.embed_tokens.weight[token, direction] = 1.0
            model.lm_head.weight[following, direction] = 10.0
        model.model.embed_tokens.weight[chain[-1], len(chain)] = 1.0  # on the chain, but followed by nothing
    return model.eval()


@pytest.fixture(scope="module")
def setup():
    tokenizer = build_tiny_tokenizer()
    tokenizer.add_tokens([DECLARED_END])  # not special: decoding keeps its text
    declared = tokenizer.convert_tokens_to_ids(DECLARED_END)
    prompt = encode_prompt(CONTEXT, "plain", tokenizer)
    answer = tokenizer(" 42", add_special_tokens=False)["input_ids"]
    after = tokenizer(" 99", add_special_tokens=False)["input_ids"]
    model = chain_model(tokenizer, [prompt[-1], *answer, declared, *after])
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, declared]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer, declared


def test_until_holds_the_text_of_every_stop_token(setup):
    model, tokenizer, declared = setup
    assert stop_token_ids(tokenizer, "plain", model.generation_config) == [tokenizer.eos_token_id, declared]
    assert stop_strings(tokenizer, "plain", model.generation_config) == ["</s>", DECLARED_END]


def test_lm_eval_and_our_generation_stop_at_the_same_place(setup, tmp_path):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    model, tokenizer, _ = setup
    data = tmp_path / "numbers.jsonl"
    data.write_text("".join(json.dumps({"context": CONTEXT, "target": "42"}) + "\n" for _ in range(3)))
    prepared = prepare_tasks(["xbrl_tags"], data_overrides={"xbrl_tags": str(data)})
    export = tmp_path / "lm_eval_tasks"
    [name] = export_tasks([(task, rows, task_targets(task, rows)) for task, rows in prepared], export,
                          template="plain", tokenizer=tokenizer, generation_config=model.generation_config)

    evaluate_tasks(model, tokenizer, ["xbrl_tags"], prompt_template="plain", mode="generate",
                   data_overrides={"xbrl_tags": str(data)}, progress=False, out_dir=tmp_path / "ours")
    ours = [json.loads(line)["raw"] for line in (tmp_path / "ours" / "xbrl_tags.predictions.jsonl").read_text()
            .splitlines()]
    assert ours == [" 42"] * 3  # the model answers " 42", then its declared end

    tasks = TaskManager(include_path=str(export), include_defaults=False)  # only ours: indexing lm-eval's takes 20 s
    results = simple_evaluate(model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4), tasks=[name],
                              task_manager=tasks, log_samples=True, bootstrap_iters=0)
    theirs = [sample["resps"][0][0] for sample in sorted(results["samples"][name], key=lambda s: s["doc_id"])]
    assert theirs == ours
    assert results["results"][name]["accuracy,none"] == 1.0
