"""One training run of a resolved recipe, from its data to its published adapter folder (lora/finetune.py's work).

Stages: resolve the recipe -> check data -> load base (4-bit/8-bit/unquantised) -> attach LoRA/DoRA -> score
before -> train -> score after -> write the adapter and its run record (lora/training/run_folder.py).

The before/after scores come from the `Scoring` the command hands in (the evaluation harness): the training library
does not import eval/.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

# torch, transformers and bitsandbytes are imported inside run_recipe, so --list and --dry-run answer at once;
# lora.models.loading installs the bitsandbytes CPU fixes before any model is built.
from lora.core.errors import UserError
from lora.training.run_record import TaskFacts

__all__ = ["RunResult", "Scoring", "TrainingError", "milestone", "recipe_notes", "run_recipe"]


class TrainingError(UserError):
    """Training stopped for a reason the user can act on (e.g. the loss became NaN)."""


def milestone(message: str) -> None:
    """One-line progress messages, printed by the main process only."""
    from accelerate import PartialState

    if PartialState().is_main_process:
        print(f"[finetune] {message}", flush=True)


def recipe_notes(recipe) -> list[str]:
    """What a recipe's settings resolve to or cost, said by --dry-run and at the start of a run."""
    notes = [f'{key} "auto" -> {choice["value"]} ({choice["reason"]})' for key, choice in recipe.auto_dtypes.items()
             if key != "bnb_4bit_compute_dtype" or recipe["quant_bits"] == 4]
    if recipe["use_dora"] and recipe["lora_dropout"] > 0:
        notes.append(f"lora_dropout {recipe['lora_dropout']} with DoRA runs every adapted layer's base GEMM a second "
                     "time on the dropped-out input (DoRA's exact math needs base(dropout(x))), in forward and in "
                     "backward: measured 2.2x the step time of lora_dropout 0 and 1.2x its peak memory on "
                     "SmolLM2-135M 4-bit (AMD EPYC, batch 8). Set lora_dropout 0 (--set lora_dropout=0) to avoid it.")
    return notes


@dataclass(frozen=True)
class Scoring:
    """How a run scores its recipe's eval_tasks before and after training, handed in by the command.

    `evaluate(model, tokenizer, task_names, *, prompt_template, limit, mode, out_dir)` returns {task: result};
    `task_facts` says which metrics each task declares (for the run record, trackers and the model card).
    """

    evaluate: Callable[..., dict]
    task_facts: Mapping[str, TaskFacts] = field(default_factory=dict)


@dataclass
class RunResult:
    summary: dict
    model: object  # the trained peft model, still in memory
    tokenizer: object


def run_recipe(recipe, output_dir: Path, *, scoring: Scoring | None, overwrite: bool = False,
               resume: str | None = None) -> RunResult:
    """Train one resolved recipe into output_dir; returns the run summary and the trained model.

    `scoring` None trains without before/after scores, whatever the recipe's eval_tasks say.

    With `overwrite` over a previous run, the new run is built in a hidden sibling folder and swapped in only once
    it has finished: a run that fails for any reason leaves the previous one exactly as it was.
    """
    import torch
    from accelerate import PartialState

    from lora.adapters.attach import check_init_adapter
    from lora.models.source import resolve_model_source
    from lora.prompts.rows import load_rows
    from lora.prompts.templates import check_template
    from lora.recipes.outputs import is_finished
    from lora.training.run_folder import (
        CHECKPOINT_DIR,
        abandon_output_dir,
        plan_output_dir,
        prepare_output_dir,
    )
    from lora.training.tracking import prepare_trackers

    # Sets up the process group under accelerate launch / torchrun. On a machine without CUDA it must be told so
    # (as TrainingArguments(use_cpu=True) does later); a bare PartialState() there makes every rank a main process.
    state = PartialState(cpu=not torch.cuda.is_available())
    check_template(recipe["prompt_template"])
    for key in ("dataset_path", "validation_path"):
        if recipe[key]:
            load_rows(recipe[key])  # fail on a missing file or a bad row before any model loads
    source = resolve_model_source(recipe["base_model"], relative_to=recipe.registry_path.parent)
    if recipe["init_adapter"]:
        check_init_adapter(recipe, portable_base_model_id(recipe, source))
    checkpoint, resume_note = resume_checkpoint(resume, output_dir)
    if checkpoint and is_finished(output_dir):
        check_steps_left(recipe, Path(checkpoint), output_dir)
    # Every process reads the same folder state, so all agree on the plan; only the main process then acts on it.
    plan = plan_output_dir(output_dir, overwrite=overwrite, resume=bool(resume),
                                     has_checkpoint_to_resume=checkpoint is not None)
    # A tracker not installed: exit 2 now, before any model loads. Offline logs go into the folder the run is built
    # in (a hidden sibling under --overwrite), so they are swapped into place with the rest of the run.
    prepare_trackers(recipe, plan.work_dir / CHECKPOINT_DIR)
    if resume_note:
        milestone(resume_note)
    state.wait_for_everyone()
    if state.is_main_process:
        prepare_output_dir(plan)
    state.wait_for_everyone()
    try:
        return train_and_publish(recipe, source, plan, checkpoint, state, scoring)
    except BaseException:
        if state.is_main_process:
            abandon_output_dir(plan)
        raise


def train_and_publish(recipe, source, plan, checkpoint: str | None, state, scoring: Scoring | None) -> RunResult:
    """Load, score, train, score again and write the adapter into plan.work_dir, then swap it into place."""
    from lora.adapters.attach import attach_adapter
    from lora.adapters.folders import ADAPTER_WEIGHTS
    from lora.core.files import write_json_atomic
    from lora.core.provenance import git_commit, library_versions
    from lora.models.loading import load_base_model, load_tokenizer
    from lora.models.quantisation import QuantisationSettings, count_quantised_layers
    from lora.prompts.rows import file_sha256, load_rows
    from lora.prompts.templates import boundary_report
    from lora.recipes.outputs import SUMMARY_FILE
    from lora.recipes.registry import REPO_ROOT
    from lora.training.run_folder import CHECKPOINT_DIR, finish_output_dir
    from lora.training.sft import gathered_state_dict, peak_memory_bytes
    from lora.training.tracking import finish_tracking
    from lora.training.trainers import trainer_module

    started = time.perf_counter()
    output_dir = plan.work_dir
    task_facts = scoring.task_facts if scoring else {}
    summary = {
        "status": "running",
        "recipe": recipe.name,
        "base_model": recipe["base_model"],
        "model_source": source.origin,
        "weights_from": source.provenance,
        "dataset_sha256": file_sha256(recipe["dataset_path"]),
        "init_adapter_sha256": (file_sha256(Path(recipe["init_adapter"]) / ADAPTER_WEIGHTS)
                                if recipe["init_adapter"] else None),
        "world_size": state.num_processes,
        "auto_dtypes": recipe.auto_dtypes,
        "library_versions": library_versions(),
        "git_commit": git_commit(REPO_ROOT),
    }
    # Written first, so that the folder is known as this tool's from the start (only such a folder is ever
    # replaced). A finished run that --resume continues keeps its record until the new final files are staged.
    if state.is_main_process and not plan.keeps_finished_record:
        write_json_atomic(output_dir / SUMMARY_FILE, summary)

    milestone(f"recipe {recipe.name}: {recipe['base_model']} ({source.origin}), "
              f"{'DoRA' if recipe['use_dora'] else 'LoRA'} r={recipe['lora_r']}"
              f"{' from ' + recipe['init_adapter'] if recipe['init_adapter'] else ''}, "
              f"{str(recipe['quant_bits']) + '-bit' if recipe.quantised else recipe['dtype']} base, "
              f"{state.num_processes} process(es)")
    for note in recipe_notes(recipe):
        milestone(f"note: {note}")
    tokenizer = load_tokenizer(source.path, trust_remote_code=recipe["trust_remote_code"])
    model = load_base_model(source.path, QuantisationSettings.from_recipe(recipe),
                            trust_remote_code=recipe["trust_remote_code"])
    base_layers = count_quantised_layers(model)  # before peft adds its own nn.Linear adapters
    summary["base_layers"] = base_layers
    model = attach_adapter(recipe, model)
    model.peft_config["default"].base_model_name_or_path = portable_base_model_id(recipe, source)
    trainable, total = model.get_nb_trainable_parameters()
    milestone(f"model loaded: {total / 1e6:.1f} M parameters, {trainable / 1e6:.3f} M trainable; base linear "
              f"layers: {base_layers['linear4bit']} 4-bit, {base_layers['linear8bit']} 8-bit, "
              f"{base_layers['plain_linear']} unquantised")

    # The recipe's trainer picks its module from the table of trainers (lora/training/trainers.py): the data is
    # read first, so that a bad file stops the run before the (slow) scores are taken.
    builder = trainer_module(recipe["trainer"])
    data, description = builder.load_training_data(recipe, tokenizer)
    milestone(f"data: {description}")
    scores_before = score_tasks(scoring, recipe, model, tokenizer, output_dir / "eval_before", "before training")
    trainer, history = builder.build_recipe_trainer(recipe, model, tokenizer, data, output_dir / CHECKPOINT_DIR)
    encoding = boundary_report(load_rows(recipe["dataset_path"]), recipe["prompt_template"], tokenizer)
    if encoding["unclean_boundaries"]:
        milestone(f"note: {encoding['unclean_boundaries']} of {encoding['rows']} rows do not split cleanly between "
                  f"prompt and answer under prompt_template {recipe['prompt_template']!r} (the answer's first token "
                  "merges with the prompt's end; run_summary.json lists them)")
    summary["encoding"] = encoding
    milestone(f"training: {trainer.args.max_steps if trainer.args.max_steps > 0 else recipe['num_epochs']} "
              f"{'steps' if trainer.args.max_steps > 0 else 'epoch(s)'}, "
              f"batch {recipe['batch_size']} x {recipe['gradient_accumulation_steps']} accumulation")
    train_output = trainer.train(resume_from_checkpoint=checkpoint)
    answer_tokens = trainer.total_answer_tokens()

    if history.stopped_on_non_finite_loss:
        summary.update(status="failed", reason="non-finite loss", losses=history.losses)
        finish_tracking(trainer, summary, task_facts)
        if plan.replaces or plan.keeps_finished_record:
            kept = f"the previous run in {plan.output_dir} is unchanged"
        else:
            kept = f"checkpoints in {output_dir / CHECKPOINT_DIR} are kept"
            if state.is_main_process:
                write_json_atomic(output_dir / SUMMARY_FILE, summary)
        raise TrainingError(
            f"recipe {recipe.name}: the loss became {history.losses[-1][1]} at step {history.losses[-1][0]}; "
            f"training stopped and no adapter was written ({kept}). Lower learning_rate (now "
            f"{recipe['learning_rate']}) or check the data."
        )

    scores_after = score_tasks(scoring, recipe, model, tokenizer, output_dir / "eval", "after training")
    train_seconds = history.wall_time_s
    summary.update(
        status="completed",
        steps=trainer.state.global_step,
        epochs=trainer.state.epoch,
        first_loss=history.losses[0][1] if history.losses else None,
        final_loss=history.losses[-1][1] if history.losses else None,
        train_loss=train_output.training_loss,
        final_validation_loss=history.eval_losses[-1][1] if history.eval_losses else None,
        tokens_seen=int(trainer.state.num_input_tokens_seen),
        answer_tokens_seen=answer_tokens,
        tokens_per_second=trainer.state.num_input_tokens_seen / train_seconds if train_seconds else None,
        answer_tokens_per_second=answer_tokens / train_seconds if train_seconds else None,
        train_seconds=train_seconds,
        wall_time_seconds=time.perf_counter() - started,
        peak_memory=peak_memory_bytes(),
        trainable_parameters=trainable,
        total_parameters=total,
        eval_before=scores_before,
        eval_after=scores_after,
    )
    if hasattr(history, "reward_record"):
        summary["rewards"] = history.reward_record()
    # scores and key figures to the trackers, before the folder is published
    finish_tracking(trainer, summary, task_facts)
    full_state = gathered_state_dict(trainer)  # a collective under FSDP/ZeRO-3: every process calls it
    if state.is_main_process:
        write_final_outputs(recipe, model, tokenizer, trainer, history, summary, output_dir, full_state, task_facts)
        finish_output_dir(plan)
    state.wait_for_everyone()
    milestone(f"done in {summary['wall_time_seconds']:.0f} s: loss {summary['first_loss']:.4f} -> "
              f"{summary['final_loss']:.4f}, {summary['tokens_per_second']:.0f} tokens/s; adapter in "
              f"{plan.output_dir}")
    for task, after in scores_after.items():
        before = scores_before.get(task, {})
        milestone(f"eval {task}: accuracy {before.get('accuracy', float('nan')):.3f} -> {after['accuracy']:.3f} "
                  f"(n={after.get('n')}, {after.get('mode')} scoring)")
    return RunResult(summary, model, tokenizer)


def portable_base_model_id(recipe, source) -> str:
    """What adapter_config.json names as base: the hub id, or the absolute folder when the recipe named one."""
    named_folder = (recipe.registry_path.parent / Path(recipe["base_model"]).expanduser()).resolve()
    return str(named_folder) if named_folder.is_dir() else recipe["base_model"]


def resume_checkpoint(resume: str | None, output_dir: Path) -> tuple[str | None, str | None]:
    """The checkpoint folder to continue from (None: step 0), and the line that tells the user so.

    `auto`: the newest checkpoint of the output folder that is complete and whose files read back; each newer,
    damaged one is skipped with a message naming its bad file. PATH: that checkpoint, which must be intact.

    Raises:
        UserError: PATH is not a complete, intact checkpoint folder.
    """
    from lora.training.run_folder import (
        CHECKPOINT_DIR,
        TRAINER_STATE_FILE,
        checkpoint_problem,
        is_complete_checkpoint,
        newest_intact_checkpoint,
    )

    if not resume:
        return None, None
    if resume != "auto":
        path = Path(resume).expanduser().resolve()
        if not is_complete_checkpoint(path):
            raise UserError(f"--resume {resume}: not a complete checkpoint folder (expected a checkpoint-<step> "
                            f"folder holding {TRAINER_STATE_FILE}); use --resume auto for the latest one.")
        problem = checkpoint_problem(path)
        if problem:
            raise UserError(f"--resume {resume}: this checkpoint cannot be resumed from: {problem}. Use --resume "
                            "auto to continue from the newest intact checkpoint of the output folder.")
        return str(path), f"--resume: continuing from {path}"
    checkpoints = output_dir / CHECKPOINT_DIR
    latest, skipped = newest_intact_checkpoint(checkpoints)
    for line in skipped:
        milestone(f"--resume auto: skipping damaged {line}")
    if latest is None:
        return None, f"--resume auto: no intact checkpoint in {checkpoints}; starting from step 0"
    return str(latest), f"--resume auto: continuing from {latest.name}" + (" (the newest intact one)" if skipped
                                                                            else "")


def check_steps_left(recipe, checkpoint: Path, output_dir: Path) -> None:
    """Refuse to resume a finished run from a checkpoint that already reaches the end the recipe asks for.

    Resumed at its last step, the Trainer does not stop there: it trains one step past max_steps (seen with
    transformers 5), and that adapter would replace the finished one. Continuing a finished run is for training it
    further (a larger max_steps or num_epochs); with nothing left to train, the finished adapter stays as it is.

    Raises:
        UserError: naming the checkpoint's step, the recipe's end and the ways on.
    """
    from lora.training.run_folder import (
        TRAINER_STATE_FILE,
    )

    trainer_state = json.loads((checkpoint / TRAINER_STATE_FILE).read_text())
    if recipe["max_steps"] > 0:
        done = trainer_state.get("global_step", 0) >= recipe["max_steps"]
        where, end, more = f"step {trainer_state.get('global_step')}", f"max_steps {recipe['max_steps']}", "max_steps"
    else:
        done = trainer_state.get("epoch", 0) >= recipe["num_epochs"]
        where, end, more = f"epoch {trainer_state.get('epoch')}", f"num_epochs {recipe['num_epochs']}", "num_epochs"
    if done:
        raise UserError(
            f"recipe {recipe.name}: {output_dir} holds a finished adapter and its checkpoint {checkpoint.name} is at "
            f"{where}, where the recipe stops ({end}): there is nothing left to train, so the finished adapter is "
            f"kept as it is. Pass --set {more}=N with a larger N to train it further, or --overwrite to train again "
            "from step 0."
        )


def score_tasks(scoring, recipe, model, tokenizer, out_dir: Path, when: str) -> dict:
    """Scores on the recipe's eval_tasks (eval/harness/evaluation.py), or {} when the recipe lists none."""
    if not recipe["eval_tasks"]:
        return {}
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return {}
    milestone(f"scoring {', '.join(recipe['eval_tasks'])} {when}")
    return scoring.evaluate(model, tokenizer, recipe["eval_tasks"], prompt_template=recipe["prompt_template"],
                          limit=recipe["eval_limit"], mode=recipe["eval_mode"], out_dir=out_dir)


def write_final_outputs(recipe, model, tokenizer, trainer, history, summary: dict, output_dir: Path,
                        full_state: dict | None = None, task_facts: Mapping[str, TaskFacts] | None = None) -> None:
    """Stage every final file, then publish them with adapter_config.json last and the summary after it."""
    from lora.core.files import write_json_atomic
    from lora.recipes.outputs import RECIPE_FILE, SUMMARY_FILE
    from lora.training.model_card import write_model_card
    from lora.training.run_folder import LOSS_CURVE_FILE, TRAINER_STATE_FILE, plot_loss_curve, publish_folder

    staging = output_dir / f".staging-{time.time_ns()}"
    staging.mkdir()
    # Only adapter weights are trained; saying so stops peft from looking the base's config up on the hub to
    # decide whether embedding layers changed (a warning on every offline save).
    # Only the trained adapter: a grpo run from init_adapter also holds TRL's frozen "ref" copy of the start.
    model.save_pretrained(staging, state_dict=full_state, save_embedding_layers=False, selected_adapters=["default"])
    tokenizer.save_pretrained(staging)
    write_json_atomic(staging / RECIPE_FILE, recipe.to_record())
    trainer.state.save_to_json(str(staging / TRAINER_STATE_FILE))
    plot_loss_curve(history.losses, history.eval_losses, staging / LOSS_CURVE_FILE,
                              f"{recipe.name} ({recipe['base_model']})")
    write_model_card(staging / "README.md", recipe, summary, model.peft_config["default"].base_model_name_or_path,
                     task_facts or {})
    # The replacement is complete: from here the folder's files are being replaced, so its record stops saying
    # "completed" (a finished run continued by --resume kept that record until now).
    write_json_atomic(output_dir / SUMMARY_FILE, {**summary, "status": "running"})
    publish_folder(staging, output_dir, last="adapter_config.json")
    write_json_atomic(output_dir / SUMMARY_FILE, summary)
