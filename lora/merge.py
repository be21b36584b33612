"""Merge a LoRA or DoRA adapter into its UNQUANTISED base and save a standard transformers model.

Run from any folder (exit code 2 on a user error, 1 when the self-check fails):
    .venv/bin/python lora/merge.py outputs/<recipe> --out merged/<recipe>
    .venv/bin/python lora/merge.py outputs/<recipe> --out merged/<recipe> --dtype bf16 --base-model ./my-base

The base is always loaded without quantisation, also when the adapter was trained on a 4-bit/8-bit base: merging
into a quantised base re-quantises W0 + ΔW and costs 0.01-0.16 in the logits (see shared/STACK.md). Merging happens
in float32; the merged weights are cast to --dtype only when saved. The tool then checks itself: logits of the
merged model against the unmerged peft model on a few prompts, both in float32; the largest absolute difference is
printed and written to merge_record.json in the output. The output is built in a hidden sibling folder and
renamed into place at the end, so an interrupted merge never leaves a folder that looks finished. `--out` may not
be, contain or lie inside the adapter or the base model; `--overwrite` replaces only an earlier merge (a folder
holding merge_record.json); one command writes an output at a time (lora.core.files.claim_output_folder).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __name__ == "__main__":  # run as a script: the project's packages import from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lora.models.bnb_cpu_fixes  # noqa: F401  (before any model loads)
from lora.adapters.merge import DEFAULT_TOLERANCE, DTYPE_NAMES, MergeCheckFailed, merge_adapter
from lora.core.errors import exit_on_user_error


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("adapter_dir", help="a LoRA/DoRA adapter folder (e.g. outputs/<recipe>)")
    parser.add_argument("--out", required=True,
                        help="folder to write the merged model to (new, or with --overwrite an earlier merge)")
    parser.add_argument("--dtype", choices=sorted(DTYPE_NAMES), default=None,
                        help="dtype of the saved weights (default: the base model's own)")
    parser.add_argument("--base-model", default=None, help="base model id or folder (default: the adapter's records)")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help="largest allowed float32 logit difference, merged vs unmerged (default %(default)s)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier merge in --out (a folder holding merge_record.json)")
    args = parser.parse_args(argv)
    try:
        merge_adapter(args.adapter_dir, args.out, args.dtype, args.base_model, args.tolerance, args.overwrite)
    except MergeCheckFailed as failure:
        print(f"error: merge self-check failed: {failure}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
