"""Fine-tune a LoRA or DoRA adapter on a (quantised) base model from a named recipe in finetune_configs.json.

    python lora/finetune.py --list                                  # the recipes
    python lora/finetune.py smollm2_sentiment_4bit_dora --dry-run   # resolved recipe as JSON (stdout) and a memory
                                                                    # estimate (stderr); no model loaded
    python lora/finetune.py smollm2_sentiment_4bit_dora             # train -> outputs/smollm2_sentiment_4bit_dora/
    python lora/finetune.py RECIPE --set lora_r=16 --set use_dora=false --output-dir /tmp/run
    python lora/finetune.py RECIPE --registry path/to/finetune_configs.json
    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no \\
        lora/finetune.py RECIPE                                      # several processes (also on CPU: gloo)
    accelerate launch --config_file accelerate_configs/fsdp_qlora_single_machine.yaml lora/finetune.py RECIPE \\
        --dry-run                                                    # what FSDP (or ZeRO) will do with RECIPE

Stages: resolve the recipe -> check data -> load base (4-bit/8-bit/unquantised) -> attach LoRA/DoRA -> score
before -> train -> score after -> write the adapter and its run record (lora/training/run_folder.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

if __name__ == "__main__":  # run as a script: the project's packages import from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# torch, transformers and bitsandbytes are imported inside run_recipe, so --list and --dry-run answer at once.
from lora.core.errors import UserError, exit_on_user_error
from lora.recipes.registry import format_recipe_table, list_recipes, resolve_recipe
from lora.training.run import Scoring, recipe_notes, run_recipe
from lora.training.run_record import TaskFacts


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python lora/finetune.py",
        description="Fine-tune a LoRA/DoRA adapter from a named recipe in finetune_configs.json.",
    )
    parser.add_argument("recipe", nargs="?", help="recipe name (see --list)")
    parser.add_argument("--list", action="store_true", help="print the recipes as a table and exit")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the resolved recipe as JSON (stdout) and a memory estimate (stderr); load nothing")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe field (JSON-typed value, re-validated); repeatable")
    parser.add_argument("--registry", help="registry file (default: finetune_configs.json at the repo root)")
    parser.add_argument("--output-dir",
                        help="where to write the adapter (default: outputs/<recipe>/ beside the registry)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--resume", metavar="auto|PATH",
                        help="continue from the latest checkpoint in the output folder (auto) or from PATH")
    return parser.parse_args(argv)


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        print(format_recipe_table(list_recipes(args.registry)))
        return 0
    if not args.recipe:
        raise UserError("name a recipe to run (python lora/finetune.py RECIPE), or pass --list to see them.")
    recipe = resolve_recipe(args.recipe, args.registry, args.overrides)
    if args.dry_run:
        from lora.training.engines import check_engine_support, describe_engine, detect_engine

        engine = detect_engine()  # under accelerate launch: the engine its config names; exit 2 if it cannot run
        check_engine_support(recipe, engine)
        if os.environ.get("RANK", "0") != "0":
            return 0  # under a launcher the main process alone answers
        print(json.dumps(recipe.to_record(), indent=2))
        from lora.prompts.rows import data_file_problem

        for key in ("dataset_path", "validation_path"):
            problem = data_file_problem(recipe[key]) if recipe[key] else None
            if problem:
                print(f"note: {key}: {problem}; a real run would stop here.", file=sys.stderr)
        from lora.models.memory import describe_memory  # stdout stays pure JSON; the estimate goes to stderr

        for note in recipe_notes(recipe) + describe_engine(recipe, engine):
            print(f"note: {note}", file=sys.stderr)
        print(describe_memory(recipe, engine)[0], file=sys.stderr)
        return 0
    from lora.recipes.outputs import default_output_dir

    output_dir = Path(args.output_dir).resolve() if args.output_dir else default_output_dir(recipe)
    run_recipe(recipe, output_dir, scoring=harness_scoring(), overwrite=args.overwrite, resume=args.resume)
    return 0


def harness_scoring() -> Scoring:
    """The evaluation harness as the run's before/after scoring, with what eval/tasks.json says of each task."""
    from eval.harness.evaluation import evaluate_tasks
    from eval.harness.tasks import load_tasks

    facts = {name: TaskFacts(metrics=tuple(task.metrics or ()), homepage=task.source.get("homepage", "") or "",
                             description=task.description or "")
             for name, task in load_tasks().items()}
    return Scoring(evaluate=evaluate_tasks, task_facts=facts)


if __name__ == "__main__":
    sys.exit(main())
