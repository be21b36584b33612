"""The one encoding rule: every bundled row, both templates, the tiny and the real SmolLM2 tokenizer, trains on the
ids the tokenizer gives the whole text, and the prompt's ids are a prefix of them (lm-eval splits the same way)."""

from __future__ import annotations

import pytest

from conftest import REPO_ROOT
from lora.models.loading import load_tokenizer
from lora.models.quantisation import QuantisationSettings
from lora.prompts.rows import load_rows
from lora.prompts.templates import (
    IGNORE_INDEX,
    adds_special_tokens,
    answer_suffix,
    boundary_report,
    encode_completion,
    encode_prompt,
    prompt_text,
)
from lora.training.sft_data import encode_example
from tiny_model import with_chat_template

BUNDLED = sorted((REPO_ROOT / "data").glob("t*/*.jsonl"))
TEMPLATES = ("plain", "chat")
# FinLoRA's own row format: the context ends in "Answer: " and the target is the bare answer.
FINLORA_ROW = {"context": "Instruction: What is the sentiment of this news? Please choose an answer from "
                          "{negative/neutral/positive}.\nInput: Profit fell.\nAnswer: ", "target": "neutral"}


@pytest.fixture(scope="module", params=["tiny", "smollm2"])
def tokenizer(request, tiny_model_dir):
    if request.param == "tiny":
        return load_tokenizer(str(tiny_model_dir))
    return load_tokenizer(str(request.getfixturevalue("smollm2_dir")))  # converted once per machine, as the runner does


def whole_text_ids(row, template, tokenizer) -> list[int]:
    text = prompt_text(row["context"], template, tokenizer) + row["target"] + answer_suffix(template, tokenizer)
    return tokenizer(text, add_special_tokens=adds_special_tokens(template))["input_ids"]


def test_bundled_data_is_there():
    # three FinLoRA-style tasks (train + test each) and the RL task arith (training prompts, format lesson, test)
    assert {path.parent.name for path in BUNDLED} == {"train", "test"} and len(BUNDLED) == 9


@pytest.mark.parametrize("template", TEMPLATES)
@pytest.mark.parametrize("path", BUNDLED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_trained_ids_are_the_whole_texts_ids_with_the_prompt_as_prefix(tokenizer, path, template):
    rows = load_rows(path) + [FINLORA_ROW]
    for row in rows:
        example = encode_example(row, template, tokenizer, max_seq_length=4096)
        whole = whole_text_ids(row, template, tokenizer)
        prompt = encode_prompt(row["context"], template, tokenizer)
        assert example["input_ids"] == whole, row
        assert whole[: len(prompt)] == prompt, row
        assert example["labels"] == [IGNORE_INDEX] * len(prompt) + whole[len(prompt):], row
    assert boundary_report(rows, template, tokenizer)["unclean_boundaries"] == 0


def test_the_space_before_the_answer_is_part_of_its_first_token(smollm2_dir):
    tokenizer = load_tokenizer(str(smollm2_dir))
    example = encode_example(FINLORA_ROW, "plain", tokenizer, max_seq_length=4096)
    answer = [token for token in example["labels"] if token != IGNORE_INDEX]
    # the case: ":" then "Ġneutral", never ":" "Ġ" "neutral"
    assert tokenizer.convert_ids_to_tokens(answer) == ["Ġneutral", "<|im_end|>"]
    assert tokenizer.convert_ids_to_tokens(example["input_ids"][len(example["input_ids"]) - 3:-2]) == [":"]


def test_a_boundary_that_cannot_be_split_is_reported_and_still_trains_on_the_whole_text(tiny_model_dir):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    row = {"context": "Answer: posit", "target": "ive"}  # the prompt ends inside the word the answer finishes
    pair = encode_completion(row["context"], row["target"], "plain", tokenizer)
    assert not pair.clean
    assert pair.input_ids == whole_text_ids(row, "plain", tokenizer)
    assert tokenizer.decode(pair.answer_ids).startswith(" posit")  # the straddling token is trained as answer
    assert encode_prompt(row["context"], "plain", tokenizer)[: pair.answer_start] == pair.prompt_ids
    report = boundary_report([FINLORA_ROW, row], "plain", tokenizer)
    assert report["unclean_boundaries"] == 1 and report["unclean_rows"] == [1] and report["rows"] == 2


@pytest.mark.parametrize("template", TEMPLATES)
def test_lm_eval_splits_prompt_and_label_as_we_do(tiny_model_dir, template):
    from lm_eval.models.huggingface import HFLM

    from lora.models.loading import load_base_model

    tokenizer = load_tokenizer(str(tiny_model_dir))
    base = load_base_model(str(tiny_model_dir), QuantisationSettings.unquantised())
    lm = HFLM(pretrained=base, tokenizer=tokenizer, batch_size=1)
    for row in load_rows(REPO_ROOT / "data/test/sentiment_test.jsonl")[:20]:
        text = prompt_text(row["context"], template, tokenizer)
        for label in ("negative", "neutral", "positive"):
            pair = encode_completion(row["context"], label, template, tokenizer, close=False)
            assert lm._encode_pair(text, label) == (pair.prompt_ids, pair.answer_ids)


# ---- special tokens, template checks and the boundary record, each at its edges -------------------------------


@pytest.fixture(scope="module")
def bos_tokenizer():
    from tiny_model import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer(adds_bos=True)
    assert tokenizer("x")["input_ids"][0] == tokenizer.bos_token_id
    return tokenizer


def test_plain_and_format_templates_get_the_tokenizers_bos_and_chat_prompts_only_the_templates_own(bos_tokenizer):
    from lora.prompts.templates import encode_prompt_text, encode_text_pair

    bos = bos_tokenizer.bos_token_id
    conversation = [{"role": "user", "content": "Profit fell."}]
    for context, template, starts_with_bos in (("Answer: ", "plain", True), ("x", "Q: {context} A:", True),
                                               ("x", "chat", False), (conversation, "plain", False)):
        prompt = encode_prompt(context, template, bos_tokenizer)
        pair = encode_completion(context, "neutral", template, bos_tokenizer)
        assert (prompt[0] == bos) == starts_with_bos and prompt.count(bos) == int(starts_with_bos), (context, template)
        assert pair.input_ids[: len(prompt)] == prompt and pair.clean, (context, template)
    # the rule's own switch, both ways, on the prompt side and on the whole text
    assert encode_prompt_text("Answer: ", bos_tokenizer)[0] == bos  # a served or generated prompt: on by default
    assert bos not in encode_prompt_text("Answer: ", bos_tokenizer, add_special_tokens=False)
    for adds in (True, False):
        pair = encode_text_pair("Answer: ", "neutral", bos_tokenizer, add_special_tokens=adds)
        assert (pair.input_ids[0] == bos) == adds and pair.prompt_ids == encode_prompt_text(
            "Answer: ", bos_tokenizer, add_special_tokens=adds)


def test_a_template_is_plain_chat_or_a_format_string_and_chat_needs_a_chat_template(bos_tokenizer):
    from lora.core.errors import DataError
    from lora.prompts.templates import check_template

    for template in ("plain", "chat", "Q: {context}\nA:"):
        check_template(template)  # no tokenizer yet: only the name is checked
        check_template(template, bos_tokenizer)
    for template in ("plan", "Q: {CONTEXT}", "Q: {text}", ""):
        with pytest.raises(DataError) as refused:
            check_template(template, bos_tokenizer)
        assert str(refused.value) == (
            f'prompt_template "{template}" is neither "plain", "chat" nor a format string containing {{context}}.')
    without_chat = with_chat_template(bos_tokenizer, None)
    for template in ("plain", "Q: {context}"):
        check_template(template, without_chat)
    with pytest.raises(DataError) as refused:
        check_template("chat", without_chat)
    assert str(refused.value) == (
        'prompt_template "chat" needs a tokenizer with a chat template; this one has none (use "plain").')


def test_the_boundary_record_states_the_rule_and_lists_the_first_ten_unclean_rows(tiny_model_dir):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    straddling = {"context": "Answer: posit", "target": "ive"}  # the prompt ends inside the answer's word
    rows = [FINLORA_ROW] + [straddling] * 12
    assert boundary_report(rows, "plain", tokenizer) == {
        "rule": "whole text tokenised at once; the prompt's trailing whitespace belongs to the answer (as lm-eval)",
        "rows": 13,
        "unclean_boundaries": 12,
        "unclean_rows": list(range(1, 11)),
    }


def test_a_conversation_context_is_rendered_up_to_the_assistants_turn_under_any_template(tiny_model_dir):
    tokenizer = load_tokenizer(str(tiny_model_dir))  # its chat template: <|role|>content, then <|assistant|>
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Profit fell."}]
    for template in ("plain", "chat", "Q: {context}"):
        assert prompt_text(conversation, template, tokenizer) == "<|system|>Be brief.<|user|>Profit fell.<|assistant|>"
        pair = encode_completion(conversation, "negative", template, tokenizer)
        assert tokenizer.decode(pair.answer_ids) == "negative</s>"  # closed by the chat turn's end, not another rule
    assert prompt_text("Profit fell.", "chat", tokenizer) == "<|user|>Profit fell.<|assistant|>"


def test_the_answer_starts_where_the_prompts_ids_stop_agreeing_with_the_whole_texts():
    from lora.prompts.templates import common_prefix_length

    for part, whole, expected in (([], [1, 2], 0), ([1, 2], [1, 2, 3], 2), ([1, 9], [1, 2, 3], 1),
                                  ([7], [1, 2], 0), ([1, 2, 3], [1, 2], 2), ([4, 5], [4, 5], 2)):
        assert common_prefix_length(part, whole) == expected, (part, whole)


def test_an_answer_closes_with_the_chat_turns_end_and_with_eos_when_the_turn_does_not_continue_the_prompt(
    tiny_model_dir,
):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    assert answer_suffix("chat", tokenizer) == "</s>" and answer_suffix("plain", tokenizer) == tokenizer.eos_token
    # a template that accepts only the roles it knows (as Llama 2's and Mistral's raise on others)
    strict = with_chat_template(tokenizer, (
        "{% for m in messages %}{% if m['role'] not in ['user', 'assistant'] %}{{ raise_exception('role') }}"
        "{% endif %}[{{ m['role'] }}]{{ m['content'] }}{% if m['role'] == 'assistant' %}<|end|>{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}"))
    assert answer_suffix("chat", strict) == "<|end|>"
    # a generation prompt the rendered assistant turn does not start with: the marker split would not be the
    # turn's end, so the answer closes with EOS as plain templates do
    mismatched = with_chat_template(tokenizer, (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% if m['role'] == 'assistant' %}<|end|>"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"))
    assert answer_suffix("chat", mismatched) == tokenizer.eos_token
    no_eos = with_chat_template(tokenizer, None)
    no_eos.eos_token = None  # a tokenizer with a pad token and no EOS: nothing closes a plain answer
    assert answer_suffix("plain", no_eos) == ""


def test_a_format_string_template_puts_the_context_where_it_says(tiny_model_dir):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    template = "Headline: {context}\nSentiment:"
    assert prompt_text("Profit fell.", template, tokenizer) == "Headline: Profit fell.\nSentiment:"
    assert prompt_text("x", "{context}{context}", tokenizer) == "xx"
