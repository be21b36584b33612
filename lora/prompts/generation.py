"""Greedy generation on a batch of encoded prompts (left-padded, grouped by length), shared by the evaluation
harness and the server."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def batches_by_length(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first: memory problems show up at once)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def model_device(model) -> torch.device:
    return model.get_input_embeddings().weight.device


def compute_dtype(model) -> torch.dtype:
    """The dtype of the hidden states (embedding dtype; quantised bases keep float embeddings)."""
    dtype = model.get_input_embeddings().weight.dtype
    return dtype if dtype.is_floating_point else torch.float32


@torch.no_grad()
def generate_greedy(
    model,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    pad_id: int,
    stop_ids: Sequence[int],
    batch_size: int = 16,
    on_batch: Callable[[int], None] | None = None,
) -> list[list[int]]:
    """Greedy continuations (new token ids only, cut at the first stop token), left-padded batches."""
    from transformers import GenerationConfig

    device = model_device(model)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        use_cache=True,  # training may have switched the config's cache off (gradient checkpointing)
        pad_token_id=pad_id,
        eos_token_id=list(stop_ids) or None,
    )
    outputs: list[list[int] | None] = [None] * len(prompts)
    for batch in batches_by_length([len(p) for p in prompts], batch_size):
        width = max(len(prompts[i]) for i in batch)
        ids = torch.tensor([[pad_id] * (width - len(prompts[i])) + prompts[i] for i in batch], device=device)
        attention = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in batch],
                                 device=device)
        generated = model.generate(input_ids=ids, attention_mask=attention, generation_config=config)
        for row, i in enumerate(batch):
            new_tokens = generated[row, width:].tolist()
            for position, token in enumerate(new_tokens):
                if token in stop_ids:
                    new_tokens = new_tokens[:position]
                    break
            outputs[i] = new_tokens
        if on_batch:
            on_batch(len(batch))
    return outputs
