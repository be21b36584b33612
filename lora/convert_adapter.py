"""Convert DoRA checkpoints from NVlabs' official code or torchtune into standard peft adapters.

Run from any folder (exit code 2 on a user error):
    .venv/bin/python lora/convert_adapter.py --from nvlabs -i DoRA-weights/llama_dora_commonsense_r32 -o adapters/x \
        --allow-pickle
    .venv/bin/python lora/convert_adapter.py --from torchtune -i output/epoch_0 -o adapters/y \
        --base-model meta-llama/Llama-3.2-1B --allow-pickle

What each source looks like (read from NVlabs/DoRA and pytorch/torchtune):
- NVlabs: adapter_config.json with `peft_type: "DORA"`, `dora_simple`, `Wdecompose_target_modules`; weights in
  `adapter_model.bin` (a pickle) under peft-style names without an adapter-name segment; the magnitude is
  `<module>.weight_m_wdecomp.weight` of shape [out, 1]. Scaling alpha/r, norm detached when dora_simple is true.
- torchtune: `adapter_model.pt` (a pickle; older versions `adapter_0.pt`) with torchtune's own module names
  (`layers.0.attn.q_proj.lora_a.weight`, `...lora_b.weight`, `...magnitude` of shape [out]) and torchtune's row
  order for q_proj/k_proj, which differs from Hugging Face's (rotary embedding layout); rank from the tensors,
  alpha from the adapter_config.json torchtune writes beside it (or --lora-alpha).

The result is a peft folder (`lora_magnitude_vector` of shape [out], `use_dora: true`, adapter_model.safetensors)
plus conversion.json saying where it came from. Pickle files can run code when loaded, so reading one needs
--allow-pickle, and even then only tensors are accepted (`torch.load(weights_only=True)`). What peft cannot express
is refused: NVlabs magnitude-only modules (`Wdecompose_target_modules`) and a non-detached norm
(`dora_simple: false`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __name__ == "__main__":  # run as a script: the project's packages import from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora.adapters.convert import SOURCES, convert_adapter
from lora.core.errors import exit_on_user_error


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--from", dest="source_format", required=True, choices=SOURCES, help="checkpoint format")
    parser.add_argument("-i", "--in", dest="source", required=True, help="checkpoint folder (or its weights file)")
    parser.add_argument("-o", "--out", required=True, help="peft adapter folder to write")
    parser.add_argument("--base-model", default=None,
                        help="base model id or folder (required for torchtune; optional check for nvlabs)")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="allow reading .bin/.pt pickle files (they can run code; only tensors are accepted)")
    parser.add_argument("--lora-alpha", type=float, default=None,
                        help="lora_alpha of a torchtune checkpoint that has no adapter_config.json")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier conversion (a folder holding conversion.json)")
    args = parser.parse_args(argv)
    convert_adapter(args.source_format, args.source, args.out, args.base_model, args.allow_pickle, args.lora_alpha,
                    args.overwrite)
    return 0


if __name__ == "__main__":
    sys.exit(main())
