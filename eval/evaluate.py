"""Evaluate a trained adapter, a recipe's adapter or base model, or any base model on the registry's tasks.

    python eval/evaluate.py --list                                         # tasks, suites, whether data is here
    python eval/evaluate.py --adapter outputs/sentiment_smollm2_135m_4bits_r8_dora     # its recipe's eval_tasks
    python eval/evaluate.py --adapter outputs/RECIPE --suite bundled --limit 50
    python eval/evaluate.py --adapter outputs/RECIPE --suite bundled --with-base       # + base, side by side
    python eval/evaluate.py --recipe sentiment_smollm2_135m_4bits_r8_dora              # = --adapter outputs/RECIPE
    python eval/evaluate.py --recipe sentiment_smollm2_135m_4bits_r8_dora --base-only  # its base, zero-shot
    python eval/evaluate.py --base-model HuggingFaceTB/SmolLM2-135M-Instruct --tasks sentiment --quant-bits 4
    python eval/evaluate.py --base-model DIR --tasks mytask --data mytask=my_test.jsonl --mode generate
    python eval/evaluate.py --adapter outputs/RECIPE --tasks sentiment --export-lm-eval lm_eval_tasks  # for lm-eval

--adapter reads the base model, its quantisation (quant_bits, bnb settings, dtype) and the prompt template from
the adapter's recipe.json, so the adapter is scored on the base and the prompts it was trained with; --quant-bits
overrides the quantisation. Results go to <adapter>/eval/ (or outputs/base_<model>[_<bits>bit]/eval/ for a base
model, or --out): <task>.json and <task>.predictions.jsonl. Exit code 2 with one message for anything the user
can fix (unknown task, malformed data row, a base model or adapter that cannot be loaded).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __name__ == "__main__":  # run as a script: the project's packages import from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eval.harness.model_plan import QUANT_CHOICES, REPO_ROOT, export_for_lm_eval, load_model, model_plan, plan_inputs
from eval.harness.tasks import expand_task_names, load_suites, load_tasks, parse_data_overrides
from lora.core.errors import UserError, exit_on_user_error
from lora.core.files import refuse_output_over_inputs

TABLE_METRICS = ("accuracy", "weighted_f1", "macro_f1", "entity_f1", "unparsed")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python eval/evaluate.py", description=__doc__.split("\n\n")[0])
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--adapter", help="adapter folder written by lora/finetune.py (outputs/<recipe>)")
    what.add_argument("--recipe", help="recipe name: its adapter (outputs/<recipe>), or with --base-only its base")
    parser.add_argument("--base-model", help="base model id or folder: alone, a zero-shot baseline; with --adapter, "
                                             "overrides the base the adapter records")
    parser.add_argument("--base-only", action="store_true", help="with --recipe: score the recipe's base model")
    parser.add_argument("--registry", help="recipe registry for --recipe (default: finetune_configs.json)")
    parser.add_argument("--tasks", default="", help="comma-separated task names (default: the recipe's eval_tasks)")
    parser.add_argument("--suite", action="append", default=[], help="a suite of tasks from eval/tasks.json")
    parser.add_argument("--data", action="append", default=[], metavar="TASK=PATH",
                        help="score TASK on this FinLoRA-format JSONL file (also defines new task names)")
    parser.add_argument("--limit", type=int, help="score only the first N rows of each task")
    parser.add_argument("--batch-size", type=int, default=16, help="examples per forward (default 16)")
    parser.add_argument("--mode", choices=("choice", "generate"),
                        help="choice: label log-likelihood (classification tasks); generate: greedy generation + "
                             "parsing. Default: the recipe's eval_mode, else choice where the task allows it")
    parser.add_argument("--quant-bits", choices=sorted(QUANT_CHOICES),
                        help="load the base 4-bit (NF4), 8-bit or unquantised (none); default: as trained")
    parser.add_argument("--prompt-template", help="for --base-model: plain (default), chat or a {context} string")
    parser.add_argument("--out", help="results folder (default: <adapter>/eval or outputs/base_<model>/eval)")
    parser.add_argument("--with-base", action="store_true",
                        help="with --adapter/--recipe: also score the same base with the adapter switched off "
                             "(results in <adapter>/eval_base) and print base vs adapter")
    parser.add_argument("--task-registry", help="task registry (default: eval/tasks.json)")
    parser.add_argument("--export-lm-eval", metavar="DIR",
                        help="write the tasks as an lm-eval task folder (prompts under the adapter's template) "
                             "for lm_eval --include_path DIR, print the command, and score nothing")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--list", action="store_true", help="list tasks and suites and exit")
    args = parser.parse_args(argv)
    if args.with_base and not (args.adapter or (args.recipe and not args.base_only)):
        parser.error("--with-base needs --adapter or --recipe (it compares the adapter with its own base)")
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be at least 1")
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    return args


def list_tasks(registry: str | None) -> str:
    tasks, suites = load_tasks(registry), load_suites(registry)
    lines = [f"{'task':<18} {'kind':<15} data  path"]
    for task in tasks.values():
        try:
            shown = task.path.relative_to(REPO_ROOT)
        except ValueError:
            shown = task.path
        lines.append(f"{task.name:<18} {task.kind:<15} {'yes' if task.path.is_file() else 'no':<5} {shown}")
    lines.append("")
    lines += [f"suite {name}: {', '.join(members)}" for name, members in suites.items()]
    lines.append("Fetch missing FinLoRA test files on a connected machine: python data/download.py")
    return "\n".join(lines)


def format_results(results: dict[str, dict]) -> str:
    columns = ["task", "mode", "n", *[m for m in TABLE_METRICS if any(m in r for r in results.values())], "ex/s"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for name, result in results.items():
        cells = [name, result["mode"], str(result["n"])]
        for metric in columns[3:-1]:
            value = result.get(metric)
            cells.append("-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value))
        cells.append(f"{result['examples_per_second']:.1f}" if result.get("examples_per_second") else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        print(list_tasks(args.task_registry))
        return 0
    data_overrides = parse_data_overrides(args.data)
    names = [name.strip() for name in args.tasks.split(",") if name.strip()]
    plan = model_plan(args)
    if not names and not args.suite:
        names = list(plan["default_tasks"]) or list(data_overrides)
    if not names and not args.suite:
        raise UserError("no tasks to run: pass --tasks a,b or --suite NAME (python eval/evaluate.py --list).")
    # Unknown names fail here, before minutes of model loading.
    task_names = expand_task_names(names, args.suite, args.task_registry, extra_names=tuple(data_overrides))
    template = args.prompt_template or plan["settings"].get("prompt_template", "plain")
    limit = args.limit or plan["default_limit"]
    mode = args.mode or plan["settings"].get("eval_mode")  # else the recipe's, as the runner scored it

    from eval.harness.evaluation import evaluate_tasks, prepare_tasks
    from lora.prompts.templates import check_template

    check_template(template)
    if args.export_lm_eval:
        return export_for_lm_eval(plan, task_names, args, template, limit)
    # Unreadable rows, missing files and taken result paths fail here too, before the model loads.
    prepared = prepare_tasks(task_names, data_overrides=data_overrides, registry=args.task_registry, limit=limit,
                             quiet=True)
    if not prepared:
        raise UserError(f"nothing to score: no data here for {', '.join(task_names)} (fetch FinLoRA's test files on "
                        "a connected machine: python data/download.py, or give a file: --data TASK=PATH; "
                        "python eval/evaluate.py --list shows which tasks have data).")
    base_out = None
    if args.with_base:
        base_out = plan["out"].with_name(plan["out"].name + "_base") if args.out else plan["adapter"] / "eval_base"
    inputs = [*plan_inputs(plan), *((f'the data file of task "{task.name}"', task.path) for task, _ in prepared)]
    for folder in (plan["out"], base_out):
        if folder is not None:
            refuse_output_over_inputs(folder, inputs)  # results are written file by file over what is there
        if folder is not None and folder.exists() and not folder.is_dir():
            raise UserError(f"results folder {folder} is a file; the results are a folder of <task>.json and "
                            "<task>.predictions.jsonl files. Pass --out pointing at a folder (new or existing).")
    model, tokenizer = load_model(plan, args.quant_bits)

    run_info = {"model": plan["model"], "model_path": plan["path"], "model_origin": plan["origin"],
                "adapter": str(plan["adapter"]) if plan["adapter"] else None, "quant_bits": plan["quant_bits"]}
    results = evaluate_tasks(model, tokenizer, task_names, prompt_template=template, limit=limit,
                             batch_size=args.batch_size, mode=mode, out_dir=plan["out"],
                             data_overrides=data_overrides, progress=not args.no_progress,
                             registry=args.task_registry, run_info=run_info)
    what = f"adapter {plan['adapter']}" if plan["adapter"] else f"base model {plan['model']}"
    bits = f"{plan['quant_bits']}-bit" if plan["quant_bits"] else "unquantised"
    print(f"\n{what} ({bits} base, prompt template {json.dumps(template)})")
    print(format_results(results))
    print(f"\nresults: {plan['out']}/<task>.json and <task>.predictions.jsonl")
    if args.with_base:
        with model.disable_adapter():  # the very same quantised base, adapter layers bypassed
            base_results = evaluate_tasks(model, tokenizer, list(results), prompt_template=template, limit=limit,
                                          batch_size=args.batch_size, mode=mode, out_dir=base_out,
                                          data_overrides=data_overrides, progress=not args.no_progress,
                                          registry=args.task_registry, run_info={**run_info, "adapter": None})
        from eval.harness.results import markdown_table, table_rows

        columns = [(f"base: {plan['model']}", base_results), (plan["adapter"].name, results)]
        print(f"\nbase vs adapter (base results: {base_out})")
        print(markdown_table(columns, table_rows(columns, None), has_base=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
