"""Accelerator memory a recipe needs, estimated from the model's config alone (no weights are loaded).

    python lora/memory_estimate.py sentiment_smollm2_135m_4bits_r8_dora           # the estimate as a table
    python lora/memory_estimate.py RECIPE --set batch_size=16 --set max_seq_length=1024 --json
    python lora/finetune.py RECIPE --dry-run      # resolved recipe as JSON on stdout, this estimate on stderr

The model is built on PyTorch's "meta" device from its config (every parameter shape, no storage), so the counts
are exact for any architecture transformers knows. What is counted, per process, for this runner (transformers
Trainer without autocast, peft, bitsandbytes):

- base weights: quantised linear layers (every linear layer except the output head) at 4 bits plus their
  block-wise absmax constants (one per 64 weights: fp32, or 8-bit with a second fp32 level per 256 blocks when
  double quantisation is on) or at 8 bits plus one fp32 scale per output row; everything else (embeddings, output
  head, norms, biases) in float32, because peft's `prepare_model_for_kbit_training` upcasts it (in the recipe's
  dtype when the 4-bit storage is a float dtype, the layout for FSDP/ZeRO-3). Unquantised recipes keep every
  weight in the recipe's dtype.
- adapter: LoRA A/B (and the DoRA magnitude vectors) in float32, their float32 gradients, and AdamW's two float32
  moments: 16 bytes per trainable parameter.
- activations at batch_size x max_seq_length tokens (dynamic padding makes max_seq_length the worst case): per
  decoder layer, what autograd keeps for backward with a frozen base: two RMSNorm inputs in float32, SDPA's
  q/k/v/output and log-sum-exp (memory-efficient attention, no seq x seq matrix), the gated MLP's gate, up and
  activation, each LoRA target's input cast to float32 (plus the dropout mask), DoRA's two extra outputs, and the
  input that each 8-bit matmul keeps. The residual stream is float32 for quantised recipes (the upcast embeddings
  make it so). With gradient checkpointing only each layer's input is kept, plus the larger of one recomputed
  layer and the loss's tensors (they are not alive at the same time). The output head's logits cost 12 bytes
  per vocabulary entry and token (the logits, log-softmax output and its gradient in float32; 14 when the head
  is half precision and the loss upcasts).
- transient: one quantised weight dequantised for a matmul (bitsandbytes does this in forward and backward).
- framework overhead: 5% of the above for the caching allocator's fragmentation and kernel workspaces. The CUDA
  context itself (0.3-0.6 GB, outside PyTorch's allocator; nvidia-smi includes it) is printed separately and not
  included in the total.

Checked against FinLoRA's published measurements for Llama-3.1-8B-Instruct (tests/test_memory_estimate.py).
Not modelled: FSDP/ZeRO-3 sharding (divide weights by the number of processes), eager attention (adds a seq x seq
matrix per head), optimizer choices other than AdamW, and activation offloading.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

if __name__ == "__main__":  # run as a script: the project's packages import from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora.core.errors import exit_on_user_error
from lora.models.memory import describe_memory


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    from lora.recipes.registry import resolve_recipe

    parser = argparse.ArgumentParser(prog="python lora/memory_estimate.py", description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("--registry")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--json", action="store_true", help="print the numbers (bytes) as JSON")
    args = parser.parse_args(argv)
    recipe = resolve_recipe(args.recipe, args.registry, args.overrides)
    text, estimate = describe_memory(recipe)
    if args.json:
        print(json.dumps(asdict(estimate) if estimate else {"error": text}, indent=2))
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
