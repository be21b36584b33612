"""Chat datasets: the loss covers exactly the assistant turns (their end-of-turn token included) under two template
families; a chat row is scored with the prompt it trained after; bad chat rows exit 2 naming file:line."""

from __future__ import annotations

import json
import re

import pytest

from conftest import REPO_ROOT
from lora.core.errors import DataError
from lora.models.loading import load_tokenizer
from lora.prompts.chat import conversation_as_row, encode_conversation
from lora.prompts.data_formats import read_data_file, read_scoring_rows
from lora.prompts.templates import IGNORE_INDEX, encode_completion

# SmolLM2 / ChatML: "<|im_start|>role\ncontent<|im_end|>\n"
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Llama 3: "<|start_header_id|>role<|end_header_id|>\n\ncontent<|eot_id|>", after a BOS
LLAMA3 = (
    "{{ '<|begin_of_text|>' }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
FAMILIES = {
    "chatml": (CHATML, ["<|im_start|>", "<|im_end|>"], "\n{}<|im_end|>\n"),
    "llama3": (LLAMA3, ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
               "\n\n{}<|eot_id|>"),
}
CONVERSATION = [
    {"role": "system", "content": "You label financial news."},
    {"role": "user", "content": "Input: Shares rose after revenue beat expectations."},
    {"role": "assistant", "content": "positive"},
    {"role": "user", "content": "Input: The bank cut its dividend."},
    {"role": "assistant", "content": "negative"},
]


def tokenizer_with(tiny_model_dir, family: str):
    template, specials, _ = FAMILIES[family]
    tokenizer = load_tokenizer(str(tiny_model_dir))
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    tokenizer.chat_template = template
    return tokenizer


def labelled_runs(encoded: dict) -> list[list[int]]:
    runs, current = [], []
    for label in encoded["labels"]:
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(label)
    return runs + ([current] if current else [])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_loss_covers_exactly_every_assistant_turn_with_its_end_of_turn(tiny_model_dir, family):
    tokenizer = tokenizer_with(tiny_model_dir, family)
    encoded = encode_conversation(CONVERSATION, tokenizer)
    assert encoded["input_ids"] == tokenizer(tokenizer.apply_chat_template(CONVERSATION, tokenize=False),
                                             add_special_tokens=False)["input_ids"]  # one tokenisation of the whole
    turn = FAMILIES[family][2]
    expected = [tokenizer(turn.format(reply), add_special_tokens=False)["input_ids"] for reply in ("positive",
                                                                                                   "negative")]
    assert labelled_runs(encoded) == expected
    assert [tokenizer.decode(run) for run in labelled_runs(encoded)] == [turn.format("positive"),
                                                                         turn.format("negative")]
    # labels equal the ids where they are set (no shift: the Trainer shifts)
    assert all(label in (IGNORE_INDEX, token) for label, token in zip(encoded["labels"], encoded["input_ids"]))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_chat_row_is_scored_with_the_prompt_it_trained_after(tiny_model_dir, family):
    tokenizer = tokenizer_with(tiny_model_dir, family)
    trained = encode_conversation(CONVERSATION, tokenizer)
    row = conversation_as_row(CONVERSATION, "x")
    assert row["target"] == "negative" and row["context"] == CONVERSATION[:4]
    scored = encode_completion(row["context"], row["target"], "plain", tokenizer)  # a conversation: chat template
    assert scored.input_ids == trained["input_ids"]
    assert scored.answer_ids == labelled_runs(trained)[-1]
    # one turn: a chat row trains exactly as the FinLoRA row {"context", "target"} under prompt_template "chat"
    single = [{"role": "user", "content": "Input: Shares rose.\nAnswer: "},
              {"role": "assistant", "content": "positive"}]
    finlora = encode_completion(single[0]["content"], "positive", "chat", tokenizer)
    encoded = encode_conversation(single, tokenizer)
    assert encoded["input_ids"] == finlora.input_ids
    assert labelled_runs(encoded) == [finlora.answer_ids]


def write_rows(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


GOOD = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}


@pytest.mark.parametrize(("row", "message"), [
    ({"messages": [{"role": "user", "content": "q"}]}, "no assistant turn"),
    ({"messages": [{"role": "assistent", "content": "q"}]}, 'messages[0].role \'assistent\' is not one of system, '
                                                             'user, assistant (did you mean "assistant"?)'),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ["a"]}]},
     "messages[1].content must be a string, got list"),
    ({"messages": "q"}, '"messages" must be a non-empty list'),
    ({"context": "q", "target": "a"}, "a finlora row"),
])
def test_bad_chat_rows_name_file_and_line(tmp_path, row, message):
    path = write_rows(tmp_path / "chat.jsonl", [GOOD, row])
    with pytest.raises(DataError) as caught:
        read_data_file(path)
    assert f"{path}:2" in str(caught.value) and message in str(caught.value)


def test_chat_rows_score_as_conversation_and_last_answer(tmp_path):
    path = write_rows(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}])
    assert read_scoring_rows(path) == [{"context": CONVERSATION[:4], "target": "negative"}]


def registry_with(tmp_path, recipe):
    path = tmp_path / "finetune_configs.json"
    path.write_text(json.dumps({"r": recipe}))
    return path


def test_a_tokenizer_without_chat_template_exits_2(tmp_path, tiny_model_dir, capsys):
    from lora.finetune import main
    from tiny_model import build_tiny_llama, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = None
    tokenizer.save_pretrained(tmp_path / "model")
    build_tiny_llama(len(tokenizer)).save_pretrained(tmp_path / "model")
    (tmp_path / "model" / "chat_template.jinja").unlink(missing_ok=True)
    data = write_rows(tmp_path / "chat.jsonl", [GOOD] * 4)
    registry = registry_with(tmp_path, {"base_model": str(tmp_path / "model"), "dataset_path": str(data),
                                        "prompt_template": "chat", "quant_bits": None, "max_steps": 1})
    assert main(["r", "--registry", str(registry), "--output-dir", str(tmp_path / "out")]) == 2
    assert "chat template" in capsys.readouterr().err


def test_chat_rows_need_prompt_template_chat(tmp_path, tiny_model_dir, capsys):
    from lora.finetune import main

    data = write_rows(tmp_path / "chat.jsonl", [GOOD] * 4)
    registry = registry_with(tmp_path, {"base_model": str(tiny_model_dir), "dataset_path": str(data),
                                        "quant_bits": None, "max_steps": 1})
    assert main(["r", "--registry", str(registry), "--output-dir", str(tmp_path / "out")]) == 2
    assert f'{data}: chat rows train under the tokenizer\'s chat template' in capsys.readouterr().err


def test_a_chat_recipe_trains_and_scores_through_the_runner(tmp_path, tiny_model_dir):
    from lora.finetune import harness_scoring
    from lora.recipes.registry import resolve_recipe
    from lora.training.run import run_recipe

    plain = [json.loads(line) for line in (REPO_ROOT / "data/train/sentiment_train.jsonl").read_text().splitlines()]
    data = write_rows(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": row["context"]},
                                                              {"role": "assistant", "content": row["target"]}]}
                                                for row in plain[:16]])
    registry = registry_with(tmp_path, {"base_model": str(tiny_model_dir), "dataset_path": str(data),
                                        "prompt_template": "chat", "quant_bits": None, "max_steps": 2,
                                        "batch_size": 8, "eval_tasks": ["sentiment"], "eval_limit": 8})
    result = run_recipe(resolve_recipe("r", registry), tmp_path / "out", scoring=harness_scoring())
    assert result.summary["status"] == "completed"
    assert result.summary["datasets"][0]["format"] == "messages"
    assert result.summary["eval_after"]["sentiment"]["prompt_template"] == "chat"


def test_a_chat_row_its_template_cannot_render_is_named_by_file_and_line_or_as_a_validation_row(tmp_path,
                                                                                                  tiny_model_dir):
    """A template that renders a conversation's start differently from the whole (here: it counts the messages
    first), so assistant turns cannot be located: the error names the training row's file:line, "validation row"
    for a validation file's, and "row" for a row encoded on its own; a conversation longer than max_seq_length
    loses its left end."""
    from lora.core.errors import DataError
    from lora.models.loading import load_tokenizer
    from lora.training.sft_data import build_datasets, encode_row
    from tiny_model import with_chat_template

    tokenizer = load_tokenizer(str(tiny_model_dir))
    counting = with_chat_template(tokenizer, ("{{ messages|length }}{% for m in messages %}[{{ m['role'] }}]"
                                              "{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}"
                                              "[assistant]{% endif %}"))
    chat = write_rows(tmp_path / "chat.jsonl", [GOOD] * 4)
    plain = write_rows(tmp_path / "plain.jsonl", [{"context": "Is it good?", "target": "yes"}] * 4)
    recipe = {"prompt_template": "chat", "seed": 3, "validation_split": 0.0, "max_train_examples": None,
              "max_seq_length": 64, "trainer": "sft", "datasets": None}
    in_file = rf"{re.escape(str(chat))}:[1-4]: "  # which row comes first depends on the seed's shuffle
    for dataset, validation, named in ((chat, None, in_file), (plain, chat, "validation row: ")):
        with pytest.raises(DataError) as refused:
            build_datasets({**recipe, "dataset_path": str(dataset), "validation_path": validation and str(validation)},
                           counting)
        assert re.match(named + "the tokenizer's chat template renders", str(refused.value)), str(refused.value)
    with pytest.raises(DataError) as refused:
        encode_row(GOOD, "chat", counting, 64)
    assert str(refused.value).startswith("row: ")
    with pytest.raises(DataError) as refused:
        encode_row(GOOD, "chat", with_chat_template(tokenizer, None), 64, "rows.jsonl:2")
    assert str(refused.value).startswith("rows.jsonl:2: chat rows")
    long = {"messages": [{"role": "user", "content": "q " * 40}, {"role": "assistant", "content": "a"}]}
    whole = encode_row(long, "chat", tokenizer, 1000)
    cut = encode_row(long, "chat", tokenizer, 12)
    assert cut["input_ids"] == whole["input_ids"][-12:] and cut["labels"] == whole["labels"][-12:]


def test_a_conversation_the_chat_template_refuses_exits_2_naming_file_and_line(tmp_path, capsys):
    """Llama 2's and Mistral's templates raise on a system turn: the run stops with the row's file:line and what to
    change, not jinja's traceback, and publishes nothing."""
    from lora.finetune import main
    from tiny_model import build_tiny_llama, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] not in ['user', 'assistant'] %}"
        "{{ raise_exception('Only user and assistant roles are supported') }}{% endif %}[{{ m['role'] }}]"
        "{{ m['content'] }}{% if m['role'] == 'assistant' %}</s>{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}")
    tokenizer.save_pretrained(tmp_path / "model")
    build_tiny_llama(len(tokenizer)).save_pretrained(tmp_path / "model")
    with_system = {"messages": [{"role": "system", "content": "Be brief."}, *GOOD["messages"]]}
    data = write_rows(tmp_path / "chat.jsonl", [GOOD, with_system, GOOD])
    registry = registry_with(tmp_path, {"base_model": str(tmp_path / "model"), "dataset_path": str(data),
                                        "prompt_template": "chat", "quant_bits": None, "max_steps": 1})
    assert main(["r", "--registry", str(registry), "--output-dir", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert (f"error: {data}:2: the base model's chat template refuses this conversation (Only user and assistant "
            "roles are supported). Write the rows as it accepts them") in error, error
    assert "Traceback" not in error and not (tmp_path / "out" / "adapter_config.json").exists()
