"""One rule for where an answer ends: the evaluation harness, GRPO and the server stop at the same tokens.

Each component is asked through its own code path (the harness's generate mode, the GRPO trainer the runner builds,
the server's batched generate), on a tiny model whose three kinds of end token all differ: the tokenizer's EOS, an
extra end id the model declares in its generation config, and the chat template's end-of-turn token.
"""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model

from conftest import REPO_ROOT
from lora.adapters.attach import attach_adapter
from lora.models.loading import load_base_model, load_tokenizer
from lora.models.quantisation import QuantisationSettings
from lora.prompts.rows import load_rows
from lora.prompts.templates import answer_suffix
from lora.recipes.registry import resolve_recipe
from lora.serving.host import AdapterHost
from tiny_model import build_tiny_llama, build_tiny_tokenizer

SENTIMENT = REPO_ROOT / "data/train/sentiment_train.jsonl"
END_OF_TURN = "<|end|>"  # closes the assistant turn of this test's chat template
DECLARED_END = "<|eot|>"  # an end id only the model's generation config names
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}" + END_OF_TURN + "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Llama whose EOS, pad, declared end id and chat end-of-turn are four different tokens."""
    directory = tmp_path_factory.mktemp("three-ends")
    tokenizer = build_tiny_tokenizer()
    tokenizer.add_tokens([END_OF_TURN, DECLARED_END], special_tokens=True)
    tokenizer.chat_template = CHAT_TEMPLATE
    model = build_tiny_llama(len(tokenizer))
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(DECLARED_END)]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return load_tokenizer(str(model_dir))


def record_generate_stops(model) -> list[set[int]]:
    """Wrap `model.generate` (still calling it) to record the token ids each call stops at."""
    seen: list[set[int]] = []
    generate = model.generate

    def recording_generate(*args, **kwargs):
        stops = kwargs["generation_config"].eos_token_id
        seen.append(set(stops if isinstance(stops, list) else [stops]))
        return generate(*args, **kwargs)

    model.generate = recording_generate
    return seen


def harness_stops(model_dir, tokenizer, template: str, tmp_path) -> set[int]:
    from eval.harness.evaluation import evaluate_tasks

    rows = load_rows(str(SENTIMENT))[:2]
    data = tmp_path / "sentiment.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    model = load_base_model(str(model_dir), QuantisationSettings.unquantised())
    seen = record_generate_stops(model)
    evaluate_tasks(model, tokenizer, ["sentiment"], prompt_template=template, mode="generate", progress=False,
                   data_overrides={"sentiment": str(data)})
    assert seen and all(stops == seen[0] for stops in seen)
    return seen[0]


def grpo_stops(model_dir, tokenizer, template: str, tmp_path) -> dict[str, set[int]]:
    """What TRL samples until, where it cuts a completion, and which last tokens the rewards count as finished."""
    from lora.training.grpo import build_grpo_trainer

    registry = tmp_path / "finetune_configs.json"
    registry.write_text(json.dumps({"rl": {
        "base_model": str(model_dir), "dataset_path": str(SENTIMENT), "trainer": "grpo", "quant_bits": None,
        "prompt_template": template, "reward_functions": ["format"], "lora_r": 4, "lora_alpha": 8,
        "batch_size": 2, "num_generations": 2, "max_steps": 1,
    }}))
    recipe = resolve_recipe("rl", registry)
    model = attach_adapter(recipe, load_base_model(str(model_dir), QuantisationSettings.unquantised()))
    rows = load_rows(str(SENTIMENT))[:8]
    trainer, _ = build_grpo_trainer(recipe, model, tokenizer, rows, tmp_path / "checkpoints")
    sampling = trainer.generation_config.eos_token_id
    # The "format" reward scores a bare label 1 exactly when the completion counts as finished: probe every token.
    reward = trainer.reward_funcs[0]
    vocabulary = range(len(tokenizer))
    scores = reward(prompts=[""] * len(vocabulary), completions=["positive"] * len(vocabulary),
                    completion_ids=[[5, token] for token in vocabulary], target=["positive"] * len(vocabulary))
    return {
        "sampling": set(sampling if isinstance(sampling, list) else [sampling]),
        "cut": set(trainer.eos_token_ids),
        "reward": {token for token, score in zip(vocabulary, scores) if score == 1.0},
    }


def server_stops(model_dir, tokenizer, template: str, tmp_path) -> set[int]:
    """The stops of a served adapter whose recipe.json records `template`, as the server's batched generate uses."""
    base = load_base_model(str(model_dir), QuantisationSettings.unquantised())
    adapter_dir = tmp_path / "adapter"
    torch.manual_seed(0)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                 task_type="CAUSAL_LM"))
    peft_model.save_pretrained(adapter_dir)
    base = peft_model.unload()
    (adapter_dir / "recipe.json").write_text(json.dumps({"base_model": str(model_dir), "quant_bits": None,
                                                         "prompt_template": template}))
    host = AdapterHost("base", base, load_tokenizer(str(model_dir)))
    host.load_adapter("adapter", adapter_dir)
    seen = record_generate_stops(host.model)
    # The server renders the prompt under the adapter's template (the user turn of the chat template for "chat").
    results = host.run_batch([host.prepare_row("adapter", "Input: Shares rose.\nAnswer: ", 2)])
    assert not isinstance(results[0], Exception), results[0]
    assert len(seen) == 1
    return seen[0]


@pytest.mark.parametrize("template", ["plain", "chat"])
def test_harness_grpo_and_server_stop_at_the_same_tokens(model_dir, tokenizer, template, tmp_path):
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    declared, end_of_turn = tokenizer.convert_tokens_to_ids([DECLARED_END, END_OF_TURN])
    assert len({eos, pad, declared, end_of_turn}) == 4  # the test means something only when they all differ

    for part in ("harness", "grpo", "server"):
        (tmp_path / part).mkdir()
    harness = harness_stops(model_dir, tokenizer, template, tmp_path / "harness")
    grpo = grpo_stops(model_dir, tokenizer, template, tmp_path / "grpo")
    server = server_stops(model_dir, tokenizer, template, tmp_path / "server")
    found = {"harness": harness, **{f"grpo {part}": stops for part, stops in grpo.items()}, "server": server}

    # EOS and every end id the model declares; under the chat template also the end of turn an adapter learnt to
    # emit. Never the pad token: padding is not an answer's end.
    expected = {eos, declared} | ({end_of_turn} if template == "chat" else set())
    assert found == dict.fromkeys(found, expected)


def _cut_answer(tokenizer, template: str, generation_config, text_after_prompt: str) -> str:
    """What an answer generated as `text_after_prompt` is cut to under the one stop rule."""
    from lora.prompts.generation import cut_at_stop, stop_token_ids

    stops = stop_token_ids(tokenizer, template, generation_config)
    tokens = tokenizer(text_after_prompt, add_special_tokens=False)["input_ids"]
    kept, stopped = cut_at_stop(tokens, stops)
    assert stopped
    return tokenizer.decode(kept)


def test_a_turn_end_of_several_tokens_stops_at_the_end_of_the_turn_not_inside_the_answer(tmp_path):
    # The turn ends with "<|end|>" and a newline (two tokens), as most chat templates write it.
    from transformers import GenerationConfig

    tokenizer = build_tiny_tokenizer()
    tokenizer.add_tokens([END_OF_TURN], special_tokens=True)
    tokenizer.chat_template = CHAT_TEMPLATE.replace(END_OF_TURN, END_OF_TURN + "\n")
    tokenizer.save_pretrained(tmp_path)
    tokenizer = load_tokenizer(str(tmp_path))
    assert len(tokenizer(answer_suffix("chat", tokenizer), add_special_tokens=False)["input_ids"]) == 2
    answer = "positive\nbecause revenue beat\n\nexpectations"
    assert _cut_answer(tokenizer, "chat", GenerationConfig(), answer + END_OF_TURN + "\nmore") == answer


def test_smollm2s_real_chat_template_stops_at_the_end_of_the_turn_not_at_the_first_newline(smollm2_dir):
    from transformers import GenerationConfig

    tokenizer = load_tokenizer(str(smollm2_dir))
    generation_config = GenerationConfig.from_pretrained(smollm2_dir)
    assert answer_suffix("chat", tokenizer) == "<|im_end|>\n"  # a turn end of two tokens
    answer = "neutral\nThe headline reports no change.\nAnswer: neutral"
    for template in ("chat", "plain"):
        assert _cut_answer(tokenizer, template, generation_config, answer + "<|im_end|>\n<|im_start|>user") == answer


# ---- the small rules generation is built from, each at its edges --------------------------------------------------


def test_stop_strings_are_the_stop_tokens_as_text_in_order_without_repeats():
    from transformers import GenerationConfig

    from lora.prompts.generation import stop_strings, stop_token_ids

    tokenizer = build_tiny_tokenizer()
    assert stop_strings(tokenizer, "plain") == ["</s>"] and stop_strings(tokenizer, "chat") == ["</s>"]
    declared = GenerationConfig(eos_token_id=[tokenizer.pad_token_id, tokenizer.eos_token_id])
    assert stop_token_ids(tokenizer, "plain", declared) == [tokenizer.eos_token_id, tokenizer.pad_token_id]
    assert stop_strings(tokenizer, "plain", declared) == ["</s>", "<pad>"]
    # a chat template whose turns end with a token other than EOS: that token stops chat answers, not plain ones
    tokenizer.chat_template = tokenizer.chat_template.replace("</s>{% endif %}", "<pad>{% endif %}")
    assert stop_strings(tokenizer, "chat") == ["</s>", "<pad>"] and stop_strings(tokenizer, "plain") == ["</s>"]


def test_left_padding_uses_the_pad_token_else_the_first_stop_token_else_zero():
    import copy

    from lora.prompts.generation import left_pad, padding_token_id

    tokenizer = build_tiny_tokenizer()
    assert padding_token_id(tokenizer, [7, 9]) == tokenizer.pad_token_id
    no_pad = copy.deepcopy(tokenizer)
    no_pad.pad_token = None
    assert padding_token_id(no_pad, [7, 9]) == 7 and padding_token_id(no_pad, []) == 0
    input_ids, attention_mask = left_pad([[5, 6, 7], [8]], pad_id=3, device=torch.device("cpu"))
    assert input_ids.tolist() == [[5, 6, 7], [3, 3, 8]] and input_ids.dtype == torch.long
    assert attention_mask.tolist() == [[1, 1, 1], [0, 0, 1]] and attention_mask.dtype == torch.long


def test_the_compute_dtype_is_the_embeddings_float_dtype_or_float32():
    from lora.prompts.generation import compute_dtype

    model = build_tiny_llama(vocab_size=32)
    assert compute_dtype(model) == torch.float32
    assert compute_dtype(model.to(torch.bfloat16)) == torch.bfloat16

    class IntegerEmbeddings(torch.nn.Module):  # what a base with quantised embeddings would show
        def get_input_embeddings(self):
            embedding = torch.nn.Embedding(4, 2)
            embedding.weight = torch.nn.Parameter(torch.zeros(4, 2, dtype=torch.int8), requires_grad=False)
            return embedding

    assert compute_dtype(IntegerEmbeddings()) == torch.float32


def test_generation_is_greedy_at_temperature_zero_and_openai_style_sampling_above_it():
    from lora.prompts.generation import build_generation_config

    greedy = build_generation_config(max_new_tokens=7, pad_id=1, stop_ids=[0, 5])
    assert (greedy.do_sample, greedy.num_beams, greedy.max_new_tokens) == (False, 1, 7)
    assert (greedy.pad_token_id, greedy.eos_token_id, greedy.use_cache) == (1, [0, 5], True)
    assert build_generation_config(max_new_tokens=7, pad_id=1, stop_ids=[]).eos_token_id is None
    for temperature, top_p in ((0.5, 1.0), (1.3, 0.9)):
        sampled = build_generation_config(max_new_tokens=7, pad_id=1, stop_ids=[0], temperature=temperature,
                                          top_p=top_p)
        # no top-k cut (transformers' default would keep only the 50 likeliest tokens)
        assert (sampled.do_sample, sampled.temperature, sampled.top_p, sampled.top_k) == (True, temperature, top_p, 0)
    assert build_generation_config(max_new_tokens=7, pad_id=1, stop_ids=[0], temperature=0.7).top_p == 1.0


def test_a_tokenizers_own_bos_is_never_a_stop_token():
    from lora.prompts.generation import stop_token_ids

    tokenizer = build_tiny_tokenizer(adds_bos=True)
    for template in ("plain", "chat"):
        assert stop_token_ids(tokenizer, template) == [tokenizer.eos_token_id], template


def test_the_model_declares_no_end_ids_one_or_several():
    from transformers import GenerationConfig

    from lora.prompts.generation import declared_end_ids

    assert declared_end_ids(None) == [] and declared_end_ids(GenerationConfig()) == []
    assert declared_end_ids(GenerationConfig(eos_token_id=3)) == [3]
    assert declared_end_ids(GenerationConfig(eos_token_id=[3, 4])) == [3, 4]


def test_batches_group_similar_lengths_longest_first_and_cuts_say_whether_a_stop_token_ended_the_answer():
    from lora.prompts.generation import batches_by_length, cut_at_stop

    assert batches_by_length([3, 5, 5, 1, 4], 2) == [[1, 2], [4, 0], [3]]  # ties keep their order
    assert batches_by_length([], 4) == []
    assert cut_at_stop([4, 5, 6, 5], [5, 9]) == ([4], True)
    assert cut_at_stop([4, 6], [5, 9]) == ([4, 6], False)
    assert cut_at_stop([9], [5, 9]) == ([], True)


def test_greedy_generation_reports_each_batch_and_returns_answers_in_prompt_order():
    from lora.prompts.generation import generate_batch, generate_greedy

    model = build_tiny_llama(vocab_size=64, seed=3)
    prompts = [[5, 6, 7], [8], [9, 10], [11, 12, 13, 14], [15]]
    reported = []
    answers = generate_greedy(model, prompts, max_new_tokens=4, pad_id=1, stop_ids=[0], batch_size=2,
                              on_batch=reported.append)
    assert reported == [2, 2, 1]
    for prompt, answer in zip(prompts, answers, strict=True):  # the same as each prompt generated alone
        assert answer == generate_batch(model, [prompt], max_new_tokens=4, pad_id=1, stop_ids=[0])[0].token_ids
