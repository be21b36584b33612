"""Benchmark 2, runner throughput: answer tokens trained per second by the runner's training loop, side by side with
the seed-style baseline and with a bare torch loop doing the runner's steps.

    .venv/bin/python bench/runner_throughput.py --write          # CPU, the default recipe (~10 min on 2 cores)
    .venv/bin/python bench/runner_throughput.py --steps 2 --baseline-steps 1      # smoke run, no writing
    python3 bench/runner_throughput.py --set dtype='"bfloat16"' --set bnb_4bit_compute_dtype='"bfloat16"' \
        --tag "bf16 compute" --write                                              # GPU: 4-bit base, bf16 compute

Three variants train the same recipe (model, quantisation, adapter config, data order, batch size, optimizer
settings), each in a process of its own so that its peak memory is its own:

- runner: the Trainer exactly as `lora/finetune.py` builds it (lora.models.loading + lora.prompts.templates +
  lora.training.sft:
  dynamic padding, loss on the answer only with the output head run at answer positions, fast DoRA).
- seed-style: peft's `examples/dora_finetuning/dora_finetuning.py` approach: the stock Trainer, every example
  (prompt + answer) padded to 512 tokens, labels = input_ids (DataCollatorForLanguageModeling: loss on the whole
  sequence except padding), stock peft DoRA. Its gradient checkpointing is left off (as in the recipe), which
  favours the baseline; `--baseline-gradient-checkpointing` turns it on as the seed script has it.
- bare loop: the runner's model and batches (the runner's dataloader), then a plain loop: forward with the same
  answer-only loss, backward, gradient clipping, the Trainer's optimizer (fused AdamW) and LR schedule. Its step
  time against the runner's is the framework's overhead.

Step time is wall-clock (GPU synchronised), the median of the timed steps after warm-up. Answer tokens per step are
the same for all three (same examples in the same order): the mean answer tokens of the recipe's examples times
the batch size. Peak memory: the process's peak resident memory on CPU, torch.cuda.max_memory_allocated on GPU.
Run it on a quiet machine: other jobs on the same cores show up as step time.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

VARIANTS = ("runner", "seed-style", "bare-loop")
SEED_PAD_LENGTH = 512  # peft's dora_finetuning.py default cutoff_len
SECTION_HEADING = "## 2. Runner throughput"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="sentiment_smollm2_135m_4bits_r8_dora")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="recipe override, as lora/finetune.py --set (repeatable)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed first steps of every variant")
    parser.add_argument("--steps", type=int, default=6, help="timed steps of the runner and the bare loop")
    parser.add_argument("--baseline-steps", type=int, default=3, help="timed steps of the (slow) seed-style baseline")
    parser.add_argument("--baseline-gradient-checkpointing", action="store_true",
                        help="as peft's seed script: gradient checkpointing on in the baseline")
    parser.add_argument("--tag", default="", help="names this run's block in BENCHMARKS.md")
    parser.add_argument("--write", action="store_true", help="write the table into BENCHMARKS.md")
    parser.add_argument("--benchmarks-file", type=Path, default=REPO_ROOT / "BENCHMARKS.md")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # internal: one variant, JSON out
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------------------------------------------
# One variant, in its own process


def resolved_recipe(args, **extra):
    from lora.recipes.registry import resolve_recipe

    steps = args.warmup + (args.baseline_steps if args.variant == "seed-style" else args.steps)
    overrides = [*args.overrides, f"max_steps={steps}", "eval_tasks=[]", "save_steps=null", "logging_steps=1000"]
    overrides += [f"{key}={json.dumps(value)}" for key, value in extra.items()]
    return resolve_recipe(args.recipe, overrides=overrides)


def load_model(recipe):
    from lora.adapters.attach import attach_adapter
    from lora.models.loading import load_base_model
    from lora.models.quantisation import QuantisationSettings
    from lora.models.source import resolve_model_source

    source = resolve_model_source(recipe["base_model"], relative_to=recipe.registry_path.parent)
    model = load_base_model(source.path, QuantisationSettings.from_recipe(recipe))
    return source, attach_adapter(recipe, model)


def runner_trainer(recipe, scratch: Path):
    from lora.models.loading import load_tokenizer
    from lora.training.sft import build_trainer
    from lora.training.sft_data import build_collator, build_datasets

    source, model = load_model(recipe)
    tokenizer = load_tokenizer(source.path)
    train, _ = build_datasets(recipe, tokenizer)
    trainer, _ = build_trainer(recipe, model, tokenizer, train, None, build_collator(tokenizer, recipe["packing"]),
                               scratch / "checkpoints")
    return trainer, tokenizer


def seed_style_trainer(args, recipe, scratch: Path):
    """peft's dora_finetuning.py data path and loss on the recipe's model and rows."""
    from datasets import Dataset
    from transformers import DataCollatorForLanguageModeling, Trainer

    from lora.models.loading import load_tokenizer
    from lora.prompts.rows import load_rows
    from lora.prompts.templates import answer_suffix, prompt_text
    from lora.training.sft import build_training_arguments

    source, model = load_model(recipe)
    tokenizer = load_tokenizer(source.path)
    template = recipe["prompt_template"]
    rows = Dataset.from_list(load_rows(recipe["dataset_path"])).shuffle(seed=recipe["seed"])
    texts = rows.map(lambda row: {"text": prompt_text(row["context"], template, tokenizer) + row["target"]
                                  + answer_suffix(template, tokenizer)}, remove_columns=rows.column_names)

    def tokenize(batch):
        encoded = tokenizer(batch["text"], padding="max_length", truncation=True, max_length=SEED_PAD_LENGTH)
        encoded["labels"] = [list(ids) for ids in encoded["input_ids"]]
        return encoded

    train = texts.map(tokenize, batched=True, remove_columns=["text"])
    training_args = build_training_arguments(recipe, scratch / "checkpoints")
    training_args.gradient_checkpointing = args.baseline_gradient_checkpointing
    return Trainer(model=model, args=training_args, train_dataset=train,
                   data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False)), tokenizer


def synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_trainer_steps(trainer) -> list[float]:
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.seconds, self.started = [], None

        def on_step_begin(self, args, state, control, **kwargs):
            synchronize()
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            synchronize()
            self.seconds.append(time.perf_counter() - self.started)

    timer = StepTimer()
    trainer.add_callback(timer)
    trainer.train()
    return timer.seconds


def time_bare_loop(trainer) -> list[float]:
    """The runner's model and batches, trained by a plain loop with the Trainer's optimizer and schedule."""
    import torch
    from transformers import Trainer, get_scheduler

    from lora.training.sft import answer_only_loss

    model, args = trainer.model, trainer.args
    optimizer_class, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = optimizer_class([{"params": parameters, "weight_decay": args.weight_decay}], **optimizer_kwargs)
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=args.get_warmup_steps(
        args.max_steps), num_training_steps=args.max_steps)
    device = next(p.device for p in parameters)
    model.train()
    seconds = []
    for step, batch in enumerate(trainer.get_train_dataloader()):
        if step == args.max_steps:
            break
        synchronize()
        started = time.perf_counter()
        batch = {key: value.to(device) for key, value in batch.items()}
        loss = answer_only_loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, args.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize()
        seconds.append(time.perf_counter() - started)
    return seconds


def answer_tokens_per_example(recipe, tokenizer) -> float:
    from lora.prompts.rows import load_rows
    from lora.prompts.templates import encode_completion

    rows = load_rows(recipe["dataset_path"])
    template = recipe["prompt_template"]
    return statistics.fmean(len(encode_completion(row["context"], row["target"], template, tokenizer).answer_ids)
                            for row in rows)


def peak_memory_bytes() -> int:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_variant(args) -> dict:
    import torch

    import lora.models.bnb_cpu_fixes  # noqa: F401  (before any model loads)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as scratch:
        if args.variant == "seed-style":
            recipe = resolved_recipe(args, fast_dora=False)
            trainer, tokenizer = seed_style_trainer(args, recipe, Path(scratch))
            seconds = time_trainer_steps(trainer)
            tokens_per_row = SEED_PAD_LENGTH
        else:
            recipe = resolved_recipe(args)
            trainer, tokenizer = runner_trainer(recipe, Path(scratch))
            seconds = time_trainer_steps(trainer) if args.variant == "runner" else time_bare_loop(trainer)
            lengths = [len(row["input_ids"]) for row in trainer.train_dataset]
            tokens_per_row = statistics.fmean(lengths)
    timed = seconds[args.warmup:]
    return {
        "variant": args.variant,
        "steps_timed": len(timed),
        "step_seconds": statistics.median(timed),
        "answer_tokens_per_step": answer_tokens_per_example(recipe, tokenizer) * recipe["batch_size"],
        "tokens_per_row": tokens_per_row,
        "peak_memory_bytes": peak_memory_bytes(),
        "threads": torch.get_num_threads(),
    }


# ----------------------------------------------------------------------------------------------------------------
# The comparison


def measure_in_subprocess(args, variant: str) -> dict:
    command = [sys.executable, __file__, "--variant", variant, "--recipe", args.recipe,
               "--warmup", str(args.warmup), "--steps", str(args.steps), "--baseline-steps", str(args.baseline_steps)]
    command += [item for override in args.overrides for item in ("--set", override)]
    if args.baseline_gradient_checkpointing:
        command.append("--baseline-gradient-checkpointing")
    finished = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT)
    if finished.returncode != 0:
        sys.exit(f"variant {variant} failed:\n{finished.stderr[-4000:]}")
    return json.loads(finished.stdout.strip().splitlines()[-1])


def format_table(rows: list[dict]) -> str:
    by_name = {row["variant"]: row for row in rows}
    runner = by_name["runner"]
    lines = [
        "| variant | tokens per example | step (s, median) | answer tokens/s | runner's speed-up over it "
        "| peak memory (MiB) |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        throughput = row["answer_tokens_per_step"] / row["step_seconds"]
        speedup = row["step_seconds"] / runner["step_seconds"]
        lines.append(f"| {row['variant']} | {row['tokens_per_row']:.0f} | {row['step_seconds']:.2f} | "
                     f"{throughput:.2f} | {speedup:.2f}x | {row['peak_memory_bytes'] / 2**20:.0f} |")
    return "\n".join(lines)


def goal_lines(rows: list[dict]) -> list[str]:
    by_name = {row["variant"]: row for row in rows}
    speedup = by_name["seed-style"]["step_seconds"] / by_name["runner"]["step_seconds"]
    overhead = by_name["runner"]["step_seconds"] / by_name["bare-loop"]["step_seconds"] - 1
    return [
        f"- runner vs seed-style baseline: {speedup:.1f}x the answer tokens per second "
        f"(goal >= 4x: {'met' if speedup >= 4 else 'NOT met'})",
        f"- framework overhead, runner vs bare torch loop: {overhead * 100:+.1f}% step time "
        f"(goal <= 10%: {'met' if overhead <= 0.10 else 'NOT met'})",
    ]


def machine_description() -> str:
    import torch
    from benchmarks_md import hardware_name  # bench/ is on sys.path as the script's folder

    hardware = f"{hardware_name()}, {os.cpu_count()} cores"
    import peft
    import transformers

    return f"{hardware}; torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}"


def block_markers(args) -> tuple[str, str]:
    name = "runner_throughput" + (f" {args.tag}" if args.tag else "")
    return f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"


def write_section(args, table: str, rows: list[dict], elapsed: float, load: tuple[float, float]) -> None:
    command_args = [a for a in sys.argv[1:] if a != "--write"]
    command_args = [f"'{a}'" if any(c in a for c in " \"") else a for a in command_args]
    python = ".venv/bin/python" if "cuda" not in machine_description().lower() else "python3"
    recipe_line = f"recipe `{args.recipe}`" + (f" with {', '.join(args.overrides)}" if args.overrides else "")
    begin, end = block_markers(args)
    block = "\n".join([
        begin,
        f"Command: `{python} bench/runner_throughput.py {' '.join(command_args + ['--write'])}`  ",
        f"Machine: {machine_description()}; load average {load[0]:.1f} before, {load[1]:.1f} after  ",
        f"Run: {datetime.date.today().isoformat()}, {recipe_line}; median of {args.steps} timed steps "
        f"({args.baseline_steps} for the seed-style baseline) after {args.warmup} warm-up step(s); "
        f"baseline gradient checkpointing {'on' if args.baseline_gradient_checkpointing else 'off'}; "
        f"{elapsed / 60:.1f} min in all.",
        "",
        table,
        "",
        *goal_lines(rows),
        end,
    ])
    from benchmarks_md import write_block  # bench/ is on sys.path as the script's folder

    write_block(args.benchmarks_file, SECTION_HEADING, begin, end, block)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    started, load_before = time.time(), os.getloadavg()[0]
    rows = []
    for variant in VARIANTS:
        row = measure_in_subprocess(args, variant)
        rows.append(row)
        print(f"{variant}: {row['step_seconds']:.2f} s/step (median of {row['steps_timed']}), "
              f"{row['peak_memory_bytes'] / 2**20:.0f} MiB peak", flush=True)
    elapsed = time.time() - started
    table = format_table(rows)
    print()
    print(table)
    print()
    print("\n".join(goal_lines(rows)))
    if args.write:
        write_section(args, table, rows, elapsed, (load_before, os.getloadavg()[0]))


if __name__ == "__main__":
    main()
