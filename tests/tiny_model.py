"""A tiny Llama and its byte-level BPE tokenizer, built locally in seconds (the tests never touch a hub)."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

# Enough finance-flavoured text for the BPE merges to be meaningful; bytes cover everything else.
_CORPUS = [
    "Instruction: What is the sentiment of this news? Please choose an answer from {negative/neutral/positive}.",
    "Input: Shares of the company rose after quarterly revenue beat expectations.",
    "Input: The bank reported a loss and cut its dividend.",
    "Input: The board will meet on Tuesday to review the annual budget.",
    "Answer: positive negative neutral",
    "Extract the organisations, people and locations. Revenue, net income, margin, EBITDA, per share, percent.",
    "0 1 2 3 4 5 6 7 8 9 10 100 1000 million billion USD EUR",
]

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tiny_tokenizer(vocab_size: int = 512, *, adds_bos: bool = False) -> PreTrainedTokenizerFast:
    """The tiny byte-level BPE tokenizer; `adds_bos` makes it put a BOS token of its own before every text, as
    Llama-family tokenizers do (it and SmolLM2's add none, which would leave special-token handling unchecked)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="</s>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    if adds_bos:
        fast.add_special_tokens({"bos_token": "<s>"})
        fast._tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", fast.bos_token_id)])
    return fast


def build_tiny_llama(vocab_size: int, seed: int = 0, hidden_size: int = 64, layers: int = 2,
                     bias: bool = False) -> LlamaForCausalLM:
    """A tiny Llama; `bias` gives its attention and MLP projections biases (as Qwen's q/k/v have)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        eos_token_id=0,
        pad_token_id=1,
        bos_token_id=None,
        attention_bias=bias,
        mlp_bias=bias,
    )
    return LlamaForCausalLM(config).eval()


def with_chat_template(tokenizer, template: str | None):
    """A copy of `tokenizer` with another chat template (None: without one); the original is left as it is."""
    import copy

    other = copy.deepcopy(tokenizer)
    other.chat_template = template
    return other


def save_tiny_model(directory: Path, seed: int = 0) -> Path:
    """Write a tiny Llama + tokenizer as a standard local model folder and return it."""
    directory = Path(directory)
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_llama(len(tokenizer), seed=seed)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
