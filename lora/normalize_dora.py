"""Export a DoRA adapter with pre-normalised magnitudes for inference runtimes (TensorRT-LLM convention).

Run from any folder (exit code 2 on a user error); the flags are those of TensorRT-LLM's
examples/dora/normalize_weights.py:
    .venv/bin/python lora/normalize_dora.py -i outputs/<recipe> -o exports/<recipe>-trtllm
    .venv/bin/python lora/normalize_dora.py -i outputs/<recipe> -b ./my-base -o exports/x --w0 nf4

DoRA's forward is y = g ⊙ (x W0ᵀ + s·x Aᵀ Bᵀ) + bias with g = m / ||W0 + s·B A||_row (s = alpha/r, or
alpha/sqrt(r) with rsLoRA). Since the norm is constant at inference, a runtime can take g itself as the "magnitude"
and just scale the rows of (base + LoRA) output. This tool writes exactly that: every `lora_magnitude_vector` is
replaced by g (same key names, same shapes), computed in float32, with each module's own rank and alpha (peft's
rank_pattern / alpha_pattern are honoured, TensorRT-LLM's own script ignores them).

W0 is the base's unquantised weight by default, which is what `lora/merge.py` and a runtime serving the fp16/bf16
base use. `--w0 nf4` uses the 4-bit dequantised weight the adapter saw in training instead (quantised with the
settings in the adapter's recipe.json), for a runtime that serves the same 4-bit base.

The output is marked as normalised (a field in adapter_config.json and dora_normalisation.json beside it): peft
would divide by the norm a second time, so our own tools (merge, eval, serve) refuse to load it. Hand it only to a
runtime that expects normalised magnitudes (TensorRT-LLM with `--dora_plugin=enable`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __name__ == "__main__":  # run as a script: the project's packages import from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lora.models.bnb_cpu_fixes  # noqa: F401  (before any model loads)
from lora.adapters.normalise import W0_CHOICES, normalize_dora_adapter
from lora.core.errors import exit_on_user_error


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-i", "--in-dir", required=True, help="the DoRA adapter folder (peft format)")
    parser.add_argument("-o", "--out-dir", required=True, help="folder to write the normalised adapter to")
    parser.add_argument("-b", "--base-model", default=None,
                        help="base model id or folder (default: the one named in the adapter's records)")
    parser.add_argument("--w0", choices=W0_CHOICES, default="unquantised",
                        help="base weights in the norm: as saved, or 4-bit dequantised like training saw")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier normalised export (a folder holding dora_normalisation.json)")
    args = parser.parse_args(argv)
    normalize_dora_adapter(args.in_dir, args.out_dir, args.base_model, args.w0, args.overwrite)
    return 0


if __name__ == "__main__":
    sys.exit(main())
