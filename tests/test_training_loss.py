"""The runner's answer-only loss: the output head runs only where an answer token is predicted, and the loss and
adapter gradients still equal the stock Trainer's (padded and packed batches, with and without a token count)."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

from lora.training.sft import RecipeTrainer, next_token_targets
from lora.training.sft_data import build_collator, encode_example

ROWS = [
    {"context": "Instruction: What is the sentiment?\nInput: Shares rose sharply.\nAnswer: ", "target": "positive"},
    {"context": "Instruction: What is the sentiment?\nInput: Costs.\nAnswer: ", "target": "negative"},
    {"context": "Instruction: Name the entities.\nInput: Acme hired Jo in Oslo.\nAnswer: ",
     "target": "Acme, ORG; Jo, PER; Oslo, LOC"},
]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def make_trainer(tiny_model_dir, tmp_path, trainer_class):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    model = get_peft_model(model, config)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", remove_unused_columns=False)
    return trainer_class(model=model, args=args)


def loss_and_gradients(trainer, batch, num_items_in_batch):
    model = trainer.model
    model.train()
    model.zero_grad()
    loss = trainer.compute_loss(model, {k: v.clone() for k, v in batch.items()}, num_items_in_batch=num_items_in_batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("with_count", [False, True], ids=["mean", "token-count"])
def test_answer_only_loss_equals_the_stock_loss(tiny_model_dir, tmp_path, tokenizer, packing, with_count):
    features = [encode_example(row, "plain", tokenizer, max_seq_length=128) for row in ROWS]
    batch = build_collator(tokenizer, packing)([dict(f) for f in features])
    answer_tokens = int((next_token_targets(batch["labels"]) != -100).sum())
    assert answer_tokens < batch["labels"].numel() / 3  # the case worth optimising: prompts dominate
    # A count from a larger accumulated batch (as the Trainer passes with gradient accumulation).
    count = torch.tensor(answer_tokens * 2) if with_count else None

    ours = loss_and_gradients(make_trainer(tiny_model_dir, tmp_path / "a", RecipeTrainer), batch, count)
    stock = loss_and_gradients(make_trainer(tiny_model_dir, tmp_path / "b", Trainer), batch, count)

    torch.testing.assert_close(ours[0], stock[0], rtol=1e-5, atol=1e-6)
    assert ours[1].keys() == stock[1].keys() and ours[1]
    for name, gradient in ours[1].items():
        torch.testing.assert_close(gradient, stock[1][name], rtol=1e-4, atol=1e-7, msg=name)


def test_only_answer_positions_reach_the_output_head(tiny_model_dir, tmp_path, tokenizer):
    features = [encode_example(row, "plain", tokenizer, max_seq_length=128) for row in ROWS]
    batch = build_collator(tokenizer, False)([dict(f) for f in features])
    trainer = make_trainer(tiny_model_dir, tmp_path, RecipeTrainer)
    head_rows = []
    hook = trainer.model.get_output_embeddings().register_forward_hook(
        lambda module, args, output: head_rows.append(args[0].shape[1]))
    try:
        trainer.compute_loss(trainer.model, dict(batch))
    finally:
        hook.remove()
    predicting = (next_token_targets(batch["labels"]) != -100).any(dim=0).sum()
    assert head_rows == [int(predicting)] and head_rows[0] < batch["input_ids"].shape[1]
