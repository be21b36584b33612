"""Choice (label log-likelihood) vs generate (greedy + parsing) on the same task, model and rows, in one run.

    python bench/eval_choice_vs_generate.py                  # SmolLM2-135M-Instruct, sentiment, 200 rows
    python bench/eval_choice_vs_generate.py --limit 48 --batch-size 16 --template chat
    python bench/eval_choice_vs_generate.py --adapter outputs/sentiment_smollm2_135m_4bits_r8_dora
    python bench/eval_choice_vs_generate.py --base-model DIR --quant-bits 4 --task fpb

Prints a markdown table: examples/s, seconds, accuracy, weighted F1 and unparsed answers per mode, the speed-up of
each mode over generate, and how often choice and generate pick the same label. All modes run on the same loaded
model and rows, after one untimed warm-up batch:
- choice (shared prefix): what evaluate.py does; the labels share each prompt, and the token prefix all prompts of
  the task start with is run once and its key/value cache reused;
- choice without the cross-example prefix cache (to show its share);
- choice with one row per (example, label), the plain way (skip with --skip-one-row-per-label);
- generate: greedy, the task's max_new_tokens, stopping at EOS / end of turn, FinLoRA parsing.
The numbers are side by side from one process; absolute speeds depend on the machine and its load (printed), the
ratios much less.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eval.harness import model_plan as evaluate_cli  # noqa: E402
from lora.core.errors import UserError, exit_on_user_error  # noqa: E402

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python bench/eval_choice_vs_generate.py", description=__doc__.split("\n")[0])
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--adapter", help="adapter folder (base, quantisation and template from its recipe.json)")
    what.add_argument("--base-model", help=f"base model id or folder (default {DEFAULT_MODEL})")
    parser.add_argument("--task", default="sentiment", help="a classification task of eval/tasks.json")
    parser.add_argument("--data", help="a FinLoRA-format JSONL file for --task")
    parser.add_argument("--limit", type=int, default=200, help="rows to score (default 200)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--quant-bits", choices=sorted(evaluate_cli.QUANT_CHOICES))
    parser.add_argument("--template", help="prompt template for a base model (default plain)")
    parser.add_argument("--skip-one-row-per-label", action="store_true", help="time only shared-prefix choice")
    return parser.parse_args(argv)


def timed(function):
    started = time.perf_counter()
    value = function()
    return value, time.perf_counter() - started


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cli = ["--tasks", args.task, "--limit", str(args.limit), "--no-progress"]
    cli += ["--adapter", args.adapter] if args.adapter else ["--base-model", args.base_model or DEFAULT_MODEL]
    cli += ["--quant-bits", args.quant_bits] if args.quant_bits else []
    cli += ["--prompt-template", args.template] if args.template else []
    cli += ["--data", f"{args.task}={args.data}"] if args.data else []
    cli_args = evaluate_cli.parse_args(cli)
    plan = evaluate_cli.model_plan(cli_args)
    template = cli_args.prompt_template or plan["settings"].get("prompt_template", "plain")

    import torch

    from eval.harness import choices as scoring
    from eval.harness.evaluation import prepare_tasks, score_task

    data = {args.task: args.data} if args.data else None
    prepared = prepare_tasks([args.task], data_overrides=data, limit=args.limit)
    if not prepared:
        return 2
    task, rows = prepared[0]
    if not task.allows_choice:
        raise UserError(f'task "{task.name}" is a {task.kind} task; choice mode needs a classification task.')
    model, tokenizer = evaluate_cli.load_model(plan, cli_args.quant_bits)
    model.eval()

    def run(mode: str, one_row_per_label: bool = False, prefix_cache: bool = True, subset=rows):
        originals = scoring.FOUR_D_MASK_ATTENTION, scoring.MIN_SHARED_PREFIX
        if one_row_per_label:
            scoring.FOUR_D_MASK_ATTENTION = ()  # forces the fallback path
        if not prefix_cache:
            scoring.MIN_SHARED_PREFIX = sys.maxsize
        try:
            return score_task(model, tokenizer, task, subset, prompt_template=template, mode=mode,
                              batch_size=args.batch_size, progress=False)
        finally:
            scoring.FOUR_D_MASK_ATTENTION, scoring.MIN_SHARED_PREFIX = originals

    run("choice", subset=rows[: args.batch_size])  # warm-up: first-call allocations and kernel selection
    measured = {}
    result, seconds = timed(lambda: run("choice"))
    measured["choice (shared prefix)"] = (*result, seconds)
    result, seconds = timed(lambda: run("choice", prefix_cache=False))
    measured["choice (labels share the prompt, no prefix cache)"] = (*result, seconds)
    if not args.skip_one_row_per_label:
        result, seconds = timed(lambda: run("choice", one_row_per_label=True))
        measured["choice (one row per label)"] = (*result, seconds)
    result, seconds = timed(lambda: run("generate"))
    measured["generate"] = (*result, seconds)

    generate_seconds = measured["generate"][2]
    choice_predictions = [r["prediction"] for r in measured["choice (shared prefix)"][1]]
    generate_predictions = [r["prediction"] for r in measured["generate"][1]]
    agreement = sum(c == g for c, g in zip(choice_predictions, generate_predictions, strict=True)) / len(rows)

    bits = f"{plan['quant_bits']}-bit" if plan.get("quant_bits") else "unquantised"
    what = f"adapter {plan['adapter']}" if plan["adapter"] else plan["model"]
    print(f"model: {what} ({bits} base), task {task.name} ({len(rows)} rows), template {template!r}, "
          f"batch size {args.batch_size}, generate max_new_tokens {task.max_new_tokens}")
    print(f"machine: {platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.1f}, torch {torch.__version__}\n")
    print("| mode | examples/s | seconds | accuracy | weighted F1 | unparsed | speed-up vs generate |")
    print("|---|---|---|---|---|---|---|")
    for mode, (result, _, seconds) in measured.items():
        unparsed = result.get("unparsed", 0)
        print(f"| {mode} | {len(rows) / seconds:.2f} | {seconds:.1f} | {result['accuracy']:.3f} | "
              f"{result['weighted_f1']:.3f} | {unparsed} | {generate_seconds / seconds:.1f}x |")
    print(f"\nchoice and generate pick the same label for {agreement:.1%} of the rows.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
