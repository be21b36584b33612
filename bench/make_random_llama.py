"""Write a randomly initialised Llama-shaped model folder (weights from a config, nothing downloaded) + a tokenizer.

    .venv/bin/python bench/make_random_llama.py --size 1b --out outputs/random-llama-1b          # ~1.0 B, bf16
    .venv/bin/python bench/make_random_llama.py --size tiny --out /tmp/random-llama-tiny    # seconds: smoke runs
    python3 bench/make_random_llama.py --size 1b --device cuda --out outputs/random-llama-1b     # on a GPU: init there

The 1b shape is Llama-3.2-1B's (hidden 2048, intermediate 8192, 16 layers, 32 query / 8 key-value heads). The
tokenizer is the SmolLM2 one from the converted cache (~/.cache/lora-recipes/models/SmolLM2-135M-Instruct) when it
is there, else the tests' byte-level BPE tokenizer (tests/tiny_model.py; ~500 tokens, chat template included), so
that it also works on a machine with only this checkout. The vocabulary is the tokenizer's. The model learns
nothing meaningful from random weights: it exists to run the runner end to end at a realistic size. The folder is
written beside itself and renamed into place, so a half-written model never sits at --out.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SMOLLM2_CACHE = Path.home() / ".cache/lora-recipes/models/SmolLM2-135M-Instruct"
SIZES = {
    "1b": dict(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8
    ),
    "tiny": dict(
        hidden_size=128, intermediate_size=448, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    ),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="1b")
    parser.add_argument("--out", type=Path, required=True, help="model folder to write (must not exist)")
    parser.add_argument("--tokenizer", type=Path, default=None, help="a tokenizer folder (default: see above)")
    parser.add_argument("--device", default="cpu", help="where to initialise the weights (cuda is much faster)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def load_tokenizer(folder: Path | None):
    from transformers import PreTrainedTokenizerFast

    folder = folder or (SMOLLM2_CACHE if (SMOLLM2_CACHE / "tokenizer.json").exists() else None)
    if folder is not None:
        return PreTrainedTokenizerFast.from_pretrained(folder), str(folder)
    sys.path.insert(0, str(REPO_ROOT / "tests"))
    from tiny_model import CHAT_TEMPLATE, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer, "tests/tiny_model.py byte-level BPE"


def write_random_llama(size: str, out: Path, tokenizer_folder: Path | None = None, device: str = "cpu", seed=0):
    """Build the model from a config, save it in bf16 with the tokenizer; returns (parameter count, tokenizer)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if out.exists():
        raise SystemExit(f"error: {out} exists; choose a new --out (nothing was written)")
    tokenizer, tokenizer_source = load_tokenizer(tokenizer_folder)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        dtype="bfloat16",
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        **SIZES[size],
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    partial = out.with_name(f".{out.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(out)
    return sum(p.numel() for p in model.parameters()), tokenizer_source


def main(argv=None) -> int:
    args = parse_args(argv)
    parameters, tokenizer_source = write_random_llama(args.size, args.out, args.tokenizer, args.device, args.seed)
    print(f"wrote {args.out}: {parameters / 1e9:.2f} B parameters (random, bf16), tokenizer from {tokenizer_source}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
