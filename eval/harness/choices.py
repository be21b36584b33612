"""Batched model calls: log-likelihood of label continuations (`choice`) and greedy generation (`generate`).

Both take token ids already built by lora.prompts.templates (so prompts are byte-identical to training) and pad by
hand, so the
tokenizer's padding side (right, for training) does not matter.

Choice scoring shares work twice:
- Across labels: one row per example holds the prompt followed by every label's tokens but the last; a 4D attention
  mask lets each label see the prompt and its own earlier tokens only, and position ids restart after the prompt
  for every label. The logit at the prompt's last token scores every label's first token, so single-token labels
  cost one prompt forward. Rows are LEFT padded so that all the positions we need sit at the end of every row and
  `logits_to_keep` skips the vocabulary projection elsewhere.
- Across examples: the token prefix every prompt of the task starts with (the instruction, a chat template's
  system turn) is run once; its key/value cache is then reused by every batch, which only runs its own tokens.
Attention kernels that cannot take a 4D mask (flash-attention) fall back to one row per (example, label).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lora.prompts.generation import batches_by_length, compute_dtype, model_device

__all__ = [
    "attention_implementation",
    "common_prefix_length",
    "FOUR_D_MASK_ATTENTION",
    "MIN_SHARED_PREFIX",
    "score_choices",
    "score_choices_one_row_per_label",
    "score_row_choices",
]

FOUR_D_MASK_ATTENTION = ("sdpa", "eager")
MIN_SHARED_PREFIX = 4  # below this many common tokens a prefix cache is not worth its bookkeeping


def attention_implementation(model) -> str:
    return getattr(model.config, "_attn_implementation", None) or "eager"


def common_prefix_length(prompts: list[list[int]]) -> int:
    """Tokens every prompt starts with, leaving each prompt at least one token of its own (whose logit we need)."""
    if len(prompts) < 2:
        return 0
    shortest = min(len(p) for p in prompts)
    length = 0
    first = prompts[0]
    while length < shortest - 1 and all(p[length] == first[length] for p in prompts):
        length += 1
    return length


def _prefix_cache_tensors(model, prefix: list[int]):
    """Per-layer (keys, values) of the shared prefix, or None when the model's cache is not a plain one."""
    from transformers.cache_utils import DynamicLayer

    device = model_device(model)
    cache = model(input_ids=torch.tensor([prefix], device=device), use_cache=True, logits_to_keep=1).past_key_values
    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer) is not DynamicLayer for layer in layers):
        return None  # sliding-window or other special caches: no prefix reuse (correct, just slower)
    return [(layer.keys, layer.values) for layer in layers]


def _cache_for_batch(prefix_tensors, batch_size: int):
    from transformers.cache_utils import DynamicCache

    return DynamicCache(ddp_cache_data=[(keys.expand(batch_size, -1, -1, -1), values.expand(batch_size, -1, -1, -1))
                                        for keys, values in prefix_tensors])


def _shared_prefix_batch(prompts: list[list[int]], choices: list[list[int]], pad_id: int, dtype, device,
                         cached: int = 0):
    """input_ids, 4D additive mask, position ids and the number of trailing positions to keep.

    `cached` tokens of every prompt are already in a key/value cache: the rows hold the rest, their positions
    continue after it and the mask gains `cached` leading columns that every real token may attend to.
    """
    tails = [choice[:-1] for choice in choices]
    suffix = [token for tail in tails for token in tail]
    # segment 0: prompt; segment k + 1: label k's tokens; -1: padding
    suffix_segments = [k + 1 for k, tail in enumerate(tails) for _ in tail]
    length = max(len(p) for p in prompts) + len(suffix)
    ids, segments, positions = [], [], []
    for prompt in prompts:
        pad = length - len(prompt) - len(suffix)
        ids.append([pad_id] * pad + prompt + suffix)
        segments.append([-1] * pad + [0] * len(prompt) + suffix_segments)
        suffix_positions = [cached + len(prompt) + j for tail in tails for j in range(len(tail))]
        positions.append([0] * pad + list(range(cached, cached + len(prompt))) + suffix_positions)
    segments_t = torch.tensor(segments, device=device)
    query_segment, key_segment = segments_t[:, :, None], segments_t[:, None, :]
    causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    allowed = causal & (key_segment != -1) & ((key_segment == 0) | (key_segment == query_segment))
    allowed |= torch.eye(length, dtype=torch.bool, device=device)  # padding rows attend to themselves: no NaN
    if cached:
        prefix_columns = (segments_t != -1)[:, :, None].expand(-1, -1, cached)  # padding rows see only themselves
        allowed = torch.cat([prefix_columns, allowed], dim=2)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)
    keep = 1 + len(suffix)
    return (
        torch.tensor(ids, device=device),
        mask[:, None],
        torch.tensor(positions, device=device),
        keep,
    )


def _label_logprobs_from_shared(log_probs: torch.Tensor, choices: list[list[int]]) -> torch.Tensor:
    """[batch, labels] summed log-probabilities from the kept positions (prompt end, then each label's tail)."""
    totals = []
    offset = 1  # position 0 of the kept block is the prompt's last token
    for choice in choices:
        predictors = [0] + list(range(offset, offset + len(choice) - 1))
        token_ids = torch.tensor(choice, device=log_probs.device)
        picked = log_probs[:, predictors, :].gather(2, token_ids[None, :, None].expand(log_probs.shape[0], -1, 1))
        totals.append(picked.squeeze(2).sum(1))
        offset += len(choice) - 1
    return torch.stack(totals, dim=1)


@torch.no_grad()
def score_choices(
    model,
    prompts: list[list[int]],
    choices: list[list[int]],
    *,
    pad_id: int,
    batch_size: int = 16,
    on_batch: Callable[[int], None] | None = None,
    share_prefix: bool = True,
) -> list[list[float]]:
    """Summed log-probability of each label continuation after each prompt: [example][label].

    Args:
        prompts: token ids of each prompt.
        choices: token ids of each label, the same after every prompt (see `score_row_choices` for labels encoded
            with their prompt, as lora.prompts.templates does); none may be empty.
        on_batch: called with the number of examples done after each forward (progress bars).
        share_prefix: run the prompts' common token prefix once and reuse its cache (same scores, less work).
    """
    if any(not choice for choice in choices):
        raise ValueError("every label must encode to at least one token")
    if attention_implementation(model) not in FOUR_D_MASK_ATTENTION:
        return score_choices_one_row_per_label(model, prompts, choices, pad_id=pad_id, batch_size=batch_size,
                                               on_batch=on_batch)
    device, dtype = model_device(model), compute_dtype(model)
    cached = common_prefix_length(prompts) if share_prefix else 0
    prefix_tensors = _prefix_cache_tensors(model, prompts[0][:cached]) if cached >= MIN_SHARED_PREFIX else None
    cached = cached if prefix_tensors is not None else 0
    scores: list[list[float] | None] = [None] * len(prompts)
    for batch in batches_by_length([len(p) for p in prompts], batch_size):
        rows = [prompts[i][cached:] for i in batch]
        ids, mask, positions, keep = _shared_prefix_batch(rows, choices, pad_id, dtype, device, cached)
        cache = _cache_for_batch(prefix_tensors, len(batch)) if cached else None
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                       use_cache=cached > 0, logits_to_keep=keep).logits
        log_probs = torch.log_softmax(logits[:, -keep:].float(), dim=-1)
        for row, total in zip(batch, _label_logprobs_from_shared(log_probs, choices).tolist(), strict=True):
            scores[row] = total
        if on_batch:
            on_batch(len(batch))
    return scores


@torch.no_grad()
def score_row_choices(
    model,
    rows: list[list[tuple[list[int], list[int]]]],
    *,
    pad_id: int,
    batch_size: int = 16,
    on_batch: Callable[[int], None] | None = None,
) -> list[list[float]]:
    """`score_choices` for labels encoded with each row's prompt (lora.prompts.templates.encode_completion):
    [example][label].

    Args:
        rows: per example, per label, (prompt ids, label ids) as the whole text "prompt + label" splits.

    The label ids almost never depend on the prompt, so examples are grouped by their labels' ids and each group
    is one `score_choices` call. An example whose labels split the prompt differently (a token straddling an
    unclean boundary) is scored one label at a time, each after its own prompt ids.
    """
    scores: list[list[float] | None] = [None] * len(rows)
    groups: dict[tuple, list[int]] = {}
    for index, pairs in enumerate(rows):
        if len({tuple(prompt) for prompt, _ in pairs}) == 1:
            groups.setdefault(tuple(tuple(label) for _, label in pairs), []).append(index)
            continue
        scores[index] = [score_choices(model, [prompt], [label], pad_id=pad_id, share_prefix=False)[0][0]
                         for prompt, label in pairs]
        if on_batch:
            on_batch(1)
    for labels, members in groups.items():
        prompts = [rows[i][0][0] for i in members]
        for index, total in zip(members, score_choices(model, prompts, [list(label) for label in labels], pad_id=pad_id,
                                                       batch_size=batch_size, on_batch=on_batch), strict=True):
            scores[index] = total
    return scores


@torch.no_grad()
def score_choices_one_row_per_label(model, prompts, choices, *, pad_id: int, batch_size: int = 16, on_batch=None):
    """The plain way: one right-padded row per (example, label) pair, a 2D padding mask. Slower (the prompt is
    run once per label); used for attention kernels without 4D masks, and in tests as the reference."""
    device = model_device(model)
    pairs = [(i, k) for i in range(len(prompts)) for k in range(len(choices))]
    scores = [[0.0] * len(choices) for _ in prompts]
    per_batch = max(1, batch_size)
    lengths = [len(prompts[i]) + len(choices[k]) for i, k in pairs]
    done_examples = 0
    for batch in batches_by_length(lengths, per_batch):
        rows = [prompts[pairs[j][0]] + choices[pairs[j][1]] for j in batch]
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [pad_id] * (width - len(r)) for r in rows], device=device)
        attention = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
        log_probs = torch.log_softmax(model(input_ids=ids, attention_mask=attention).logits.float(), dim=-1)
        for row_index, j in enumerate(batch):
            i, k = pairs[j]
            start = len(prompts[i])
            targets = torch.tensor(choices[k], device=device)
            predicted = log_probs[row_index, start - 1 : start - 1 + len(choices[k])]
            scores[i][k] = predicted.gather(1, targets[:, None]).sum().item()
        if on_batch:
            done = len({pairs[j][0] for j in batch})
            done_examples += done
            on_batch(done)
    return scores
