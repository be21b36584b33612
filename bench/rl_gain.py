"""Does reinforcement learning raise held-out accuracy? One design (a grpo or rloo recipe and a seed) per run: score
the starting policy, train with the runner, score the result, append one results row.

    python bench/rl_gain.py run arith_smollm2_135m_4bits_r8_dora_rloo --seed 1       # ~30 min on 2 CPU cores
    python bench/rl_gain.py run RECIPE --seed 2 --set learning_rate=5e-5 --limit 300  # any recipe field
    python bench/rl_gain.py calibrate --adapter outputs/arith_smollm2_135m_4bits_r8_dora_warmstart \\
        --max-operand 10 20 30 50                                                   # data/README.md's table

Scores (both on the same held-out rows, the first --limit of the task's test file, scored by the eval harness's
rule for the task: eval/tasks.json "arith" is exact match of the first number):
  greedy   accuracy of the greedy answer;
  sampled  accuracy over --samples answers per problem at temperature 1 (the policy RL trains; seeded).
The run record's dead-group share (groups whose answers all got the same reward) and first/final entropy come from
the runner's run_summary.json. Rows go to --results (JSON lines) and are printed as a README table row, with the
CPU kind. `calibrate` scores the sampled accuracy of a starting adapter on freshly generated problems at each
operand range (data/make_datasets.py's make_arith_rows), for choosing ARITH_MAX_OPERAND.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from eval.harness.evaluation import task_targets  # noqa: E402
from eval.harness.metrics import numbers_match  # noqa: E402
from eval.harness.tasks import load_tasks  # noqa: E402
from lora.core.compute_dtype import cpu_flags, cpu_kind, cpu_model_name  # noqa: E402
from lora.core.files import write_json_atomic  # noqa: E402
from lora.prompts import parsing  # noqa: E402
from lora.prompts.rows import load_rows  # noqa: E402

TASK = "arith"
GENERATION_BATCH = 64


def load_policy(adapter: str | None, recipe=None):
    """(model, tokenizer) in eval mode: the adapter on its recorded base, or the recipe's bare base (a fresh adapter
    equals its base) quantised as the recipe says."""
    if adapter:
        from lora.adapters.inference import load_adapter_for_inference

        loaded = load_adapter_for_inference(adapter)
        return loaded.model, loaded.tokenizer
    from lora.adapters.inference import load_inference_base
    from lora.models.quantisation import QuantisationSettings
    from lora.models.source import resolve_model_source

    source = resolve_model_source(recipe["base_model"], recipe.registry_path.parent)
    return load_inference_base(source.name, source.path, QuantisationSettings.from_recipe(recipe))


def score(model, tokenizer, rows: list[dict], *, template: str, samples: int, seed: int) -> dict:
    """Greedy accuracy and sampled accuracy (`samples` answers per row, temperature 1) by the task's own rule."""
    import torch

    from lora.prompts.generation import generate_batch, padding_token_id, stop_token_ids
    from lora.prompts.templates import encode_prompt

    task = load_tasks()[TASK]
    targets = task_targets(task, rows)
    stops = stop_token_ids(tokenizer, template, model.generation_config)
    pad = padding_token_id(tokenizer, stops)
    prompts = [encode_prompt(row["context"], template, tokenizer) for row in rows]

    def correct(indices: list[int], temperature: float) -> list[bool]:
        results = []
        for start in range(0, len(indices), GENERATION_BATCH):
            batch = indices[start:start + GENERATION_BATCH]
            outputs = generate_batch(model, [prompts[i] for i in batch], max_new_tokens=task.max_new_tokens,
                                     pad_id=pad, stop_ids=stops, temperature=temperature)
            for i, output in zip(batch, outputs):
                text = tokenizer.decode(output.token_ids, skip_special_tokens=True)
                predicted = parsing.parse_number(parsing.answer_text(text))
                results.append(numbers_match(targets[i], predicted, task.rel_tol, task.abs_tol))
        return results

    torch.manual_seed(seed)
    greedy = correct(list(range(len(rows))), 0.0)
    sampled = correct([i for i in range(len(rows)) for _ in range(samples)], 1.0)
    return {"greedy": sum(greedy) / len(greedy), "sampled": sum(sampled) / len(sampled), "n": len(rows),
            "samples": samples}


def machine() -> str:
    """The CPU's model name and kind (e.g. "AMD EPYC ..., AVX512-BF16 without AMX"), for the results row."""
    return f"{cpu_model_name()} ({cpu_kind(cpu_flags())})"


def start_key(recipe, rows: list[dict], template: str, args) -> str:
    """What decides the start's scores: its adapter weights (or the bare base), the rows, template, seed, samples and
    threads (the order of float sums)."""
    from lora.adapters.folders import ADAPTER_WEIGHTS
    from lora.prompts.rows import file_sha256

    start = recipe["init_adapter"]
    return json.dumps({
        "start": file_sha256(Path(start) / ADAPTER_WEIGHTS) if start else f"{recipe['base_model']} fresh adapter",
        "quant_bits": recipe["quant_bits"], "rows": file_sha256(load_tasks()[TASK].path), "n": len(rows),
        "template": template, "seed": args.seed, "samples": args.samples, "threads": torch_threads(),
    }, sort_keys=True)


def start_scores(recipe, rows: list[dict], template: str, args) -> dict:
    """The starting policy's scores. Two designs from the same start (the same adapter weights, rows, template, seed
    and samples) score the same start identically, so a start already scored is read from start_scores.json beside
    the results instead of being scored again (about a quarter of a run's time on 2 cores); the row says by which
    command it was scored."""
    key = start_key(recipe, rows, template, args)
    cache_file = args.results.parent / "start_scores.json"
    cached = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    if key in cached:
        return cached[key]
    model, tokenizer = load_policy(recipe["init_adapter"], recipe)
    scores = score(model, tokenizer, rows, template=template, samples=args.samples, seed=args.seed)
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    # Read again: a run beside this one may have added its start meanwhile; replaced whole, never half written.
    cached = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    write_json_atomic(cache_file, {**cached, key: {**scores, "scored_by": f"{args.recipe} --seed {args.seed}"}})
    return scores


def run_design(args, argv: list[str] | None = None) -> dict:
    from lora.recipes.registry import resolve_recipe

    overrides = [f"seed={args.seed}", *args.set, "eval_tasks=[]"]  # scored here, start and end alike
    recipe = resolve_recipe(args.recipe, args.registry, overrides)
    out = Path(args.output_dir or REPO_ROOT / "outputs" / "rl_gain" / f"{args.recipe}_seed{args.seed}").resolve()
    rows = load_rows(load_tasks()[TASK].path)[: args.limit]
    template = recipe["prompt_template"]
    started = time.perf_counter()
    before = start_scores(recipe, rows, template, args)
    print(f"[rl_gain] start: greedy {before['greedy']:.3f}, sampled {before['sampled']:.3f}"
          f"{' (scored before, by ' + before['scored_by'] + ')' if before.get('scored_by') else ''}", flush=True)
    command = [sys.executable, str(REPO_ROOT / "lora/finetune.py"), args.recipe, "--output-dir", str(out),
               "--overwrite", *(["--registry", args.registry] if args.registry else []),
               *[item for override in overrides for item in ("--set", override)]]
    subprocess.run(command, check=True)
    summary = json.loads((out / "run_summary.json").read_text())
    model, tokenizer = load_policy(str(out))
    after = score(model, tokenizer, rows, template=template, samples=args.samples, seed=args.seed)
    rewards = summary.get("rewards") or {}
    row = {
        "recipe": args.recipe, "trainer": recipe["trainer"], "adapter": "DoRA" if recipe["use_dora"] else "LoRA",
        "seed": args.seed, "overrides": args.set, "steps": summary.get("steps"),
        "greedy": [before["greedy"], after["greedy"]], "sampled": [before["sampled"], after["sampled"]],
        "n": before["n"], "samples": args.samples, "start_scored_by": before.get("scored_by"),
        "reward": [rewards.get("first_reward"), rewards.get("final_reward")],
        "dead_group_share": rewards.get("dead_group_share"),
        "entropy": [rewards.get("first_entropy"), rewards.get("final_entropy")],
        "train_seconds": summary.get("train_seconds"), "bench_seconds": time.perf_counter() - started,
        "cpu": machine(), "threads": torch_threads(),
        "command": " ".join(["python", "bench/rl_gain.py", *(argv or sys.argv[1:])]),
    }
    return row


def torch_threads() -> int:
    """The threads torch computed with (OMP_NUM_THREADS=1 on a shared machine), not the machine's core count."""
    import torch

    return torch.get_num_threads()


def table_row(row: dict) -> str:
    def pair(values, digits=3):
        return " -> ".join("n/a" if v is None else f"{v:.{digits}f}" for v in values)

    dead = "n/a" if row["dead_group_share"] is None else f"{row['dead_group_share']:.2f}"
    return (f"| {row['recipe']} ({' '.join(row['overrides']) or 'as documented'}) | {row['seed']} | "
            f"{pair(row['greedy'])} | {pair(row['sampled'])} | {pair(row['reward'], 2)} | {dead} | "
            f"{pair(row['entropy'], 2)} | {row['steps']} | {row['bench_seconds'] / 60:.0f} min |")


def load_make_datasets():
    spec = importlib.util.spec_from_file_location("make_datasets", REPO_ROOT / "data" / "make_datasets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def calibrate(args) -> list[dict]:
    datasets = load_make_datasets()
    names = datasets.build_full_names()
    model, tokenizer = load_policy(args.adapter)
    results = []
    for top in args.max_operand:
        rows = datasets.make_arith_rows(random.Random(args.seed), names, args.problems, set(), top)
        scores = score(model, tokenizer, rows, template=args.template, samples=args.samples, seed=args.seed)
        results.append({"max_operand": top, **scores, "adapter": args.adapter, "cpu": machine()})
        print(f"| 2-{top} | {scores['greedy']:.2f} | {scores['sampled']:.2f} |", flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="score, train one recipe, score again, append a results row")
    run.add_argument("recipe")
    run.add_argument("--seed", type=int, default=1)
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override (repeatable)")
    run.add_argument("--registry", default=None)
    run.add_argument("--output-dir", default=None)
    run.add_argument("--limit", type=int, default=300, help="held-out rows scored (default: the whole test file)")
    run.add_argument("--samples", type=int, default=4, help="sampled answers per row at temperature 1")
    run.add_argument("--results", type=Path, default=REPO_ROOT / "outputs" / "rl_gain" / "results.jsonl")
    calib = commands.add_parser("calibrate", help="sampled accuracy of a starting adapter per operand range")
    calib.add_argument("--adapter", required=True)
    calib.add_argument("--max-operand", type=int, nargs="+", required=True)
    calib.add_argument("--problems", type=int, default=100)
    calib.add_argument("--samples", type=int, default=4)
    calib.add_argument("--seed", type=int, default=0)
    calib.add_argument("--template", default="plain")
    args = parser.parse_args(argv)
    if args.command == "calibrate":
        print(json.dumps(calibrate(args), indent=1))
        return 0
    row = run_design(args, argv)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    with args.results.open("a") as handle:
        handle.write(json.dumps(row) + "\n")
    print(f"| run | seed | greedy | sampled ({args.samples}x, T=1) | reward | dead groups | entropy | steps | wall |")
    print(table_row(row))
    print(f"(appended to {args.results}; CPU: {row['cpu']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
