"""One training run of a resolved recipe, from its data to its published adapter folder (lora/finetune.py's work).

Stages: resolve the recipe -> check data -> load base (4-bit/8-bit/unquantised) -> attach LoRA/DoRA -> score
before -> train -> score after -> write the adapter and its run record (lora/training/run_folder.py).

The before/after scores come from the `Scoring` the command hands in (the evaluation harness): the training library
does not import eval/.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

# torch, transformers and bitsandbytes are imported inside run_recipe, so --list and --dry-run answer at once;
# lora.models.loading installs the bitsandbytes CPU fixes before any model is built.
from lora.core.errors import UserError
from lora.training.run_record import TaskFacts, format_losses

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
               resume: str | None = None, callbacks: Sequence = ()) -> RunResult:
    """Train one resolved recipe into output_dir; returns the run summary and the trained model.

    `scoring` None trains without before/after scores, whatever the recipe's eval_tasks say. `callbacks` are extra
    `TrainerCallback`s added to the trainer (a sweep's objective reports, lora.sweeps).

    One run writes `output_dir` at a time (a second exits 2 naming the first). With `overwrite` over a previous
    run, or `resume` of a finished one, the new run is built in a hidden sibling folder and swapped in only once it
    has finished: a run that fails for any reason leaves the previous one exactly as it was.
    """
    from lora.adapters.attach import check_init_adapter
    from lora.core.files import refuse_output_over_inputs
    from lora.models.source import resolve_model_source
    from lora.prompts.templates import check_template
    from lora.recipes.outputs import is_finished
    from lora.recipes.registry import PATH_FIELDS
    from lora.training.checkpoints import find_resume_point
    from lora.training.data_mixture import check_data_files
    from lora.training.engines import check_engine_support, detect_engine, start_processes
    from lora.training.run_folder import (
        CHECKPOINT_DIR,
        abandon_output_dir,
        disk_full_error,
        hold_output_dir,
        on_main_process,
        plan_output_dir,
        prepare_output_dir,
    )
    from lora.training.tracking import prepare_trackers

    # The engine (one process, DDP, FSDP, ZeRO) from accelerate launch's environment: a recipe it cannot run exits 2
    # here, before anything loads; then the process group (lora/training/engines.py).
    engine = detect_engine()
    check_engine_support(recipe, engine)
    state = start_processes(engine)
    check_template(recipe["prompt_template"])
    # A missing file, a bad row, one too long to tokenise or a format the trainer cannot read: refused before any
    # model loads.
    check_data_files(recipe)
    source = resolve_model_source(recipe["base_model"], relative_to=recipe.registry_path.parent)
    refuse_output_over_inputs(output_dir, [*((f"the recipe's {key}", recipe[key]) for key in PATH_FIELDS),
                                           *((f"the recipe's datasets[{index}]", entry["path"])
                                             for index, entry in enumerate(recipe["datasets"] or [])),
                                           ("the base model folder", source.path)])
    if recipe["init_adapter"]:
        check_init_adapter(recipe, portable_base_model_id(recipe, source))
    # One run per output folder, held until it has published; a swap a killed run left half done is settled first.
    with hold_output_dir(output_dir, state) as settled:
        for line in settled:
            milestone(line)
        state.wait_for_everyone()  # the folder is settled before any process reads it
        resume_point = find_resume_point(recipe, resume, output_dir / CHECKPOINT_DIR,
                                         finished=is_finished(output_dir))
        # Every process reads the same folder state, so all agree on the plan; only the main process acts on it.
        plan = plan_output_dir(output_dir, overwrite=overwrite, resume=bool(resume),
                               has_checkpoint_to_resume=resume_point.checkpoint is not None)
        # A tracker not installed: exit 2 now, before any model loads. Offline logs go into the folder the run is
        # built in (a hidden sibling when replacing), so they are swapped into place with the rest of the run.
        prepare_trackers(recipe, plan.work_dir / CHECKPOINT_DIR)
        for note in resume_point.notes:
            milestone(note)
        state.wait_for_everyone()
        on_main_process(state, lambda: prepare_output_dir(plan))
        state.wait_for_everyone()
        try:
            return train_and_publish(recipe, source, plan, resume_point, state, scoring, engine, callbacks)
        except BaseException as error:
            disk_full = disk_full_error(error, plan) if isinstance(error, Exception) else None
            if state.is_main_process:
                abandon_output_dir(plan)
            if disk_full is not None:
                raise disk_full from None
            raise


def train_and_publish(recipe, source, plan, resume_point, state, scoring: Scoring | None,
                      engine=None, callbacks: Sequence = ()) -> RunResult:
    """Load, score, train, score again and write the adapter into plan.work_dir, then swap it into place."""
    from lora.adapters.attach import attach_adapter
    from lora.adapters.folders import ADAPTER_WEIGHTS
    from lora.core.files import write_json_atomic
    from lora.core.provenance import git_commit, library_versions
    from lora.models.loading import load_base_model, load_tokenizer
    from lora.models.quantisation import QuantisationSettings, count_quantised_layers
    from lora.prompts.rows import file_sha256
    from lora.recipes.outputs import SUMMARY_FILE
    from lora.recipes.registry import REPO_ROOT
    from lora.training.checkpoints import logged_history, restore_without_training
    from lora.training.data_mixture import encoding_report
    from lora.training.early_stopping import attach_early_stopping
    from lora.training.engines import describe_engine, detect_engine
    from lora.training.run_folder import CHECKPOINT_DIR, finish_output_dir
    from lora.training.sft import gathered_state_dict, peak_memory_bytes
    from lora.training.tracking import finish_tracking
    from lora.training.trainers import trainer_module

    started = time.perf_counter()
    engine = engine or detect_engine()
    output_dir = plan.work_dir
    task_facts = scoring.task_facts if scoring else {}
    summary = {
        "status": "running",
        "recipe": recipe.name,
        "base_model": recipe["base_model"],
        "model_source": source.origin,
        "weights_from": source.provenance,
        "dataset_sha256": file_sha256(recipe["dataset_path"]) if recipe["dataset_path"] else None,
        "init_adapter_sha256": (file_sha256(Path(recipe["init_adapter"]) / ADAPTER_WEIGHTS)
                                if recipe["init_adapter"] else None),
        "world_size": state.num_processes,
        "engine": engine.to_record(),
        "auto_dtypes": recipe.auto_dtypes,
        "library_versions": library_versions(),
        "git_commit": git_commit(REPO_ROOT),
    }
    # Written first, so that the folder is known as this tool's from the start (only such a folder is ever
    # replaced). A finished run that --resume continues is continued in a replacement: its own record stays.
    if state.is_main_process:
        write_json_atomic(output_dir / SUMMARY_FILE, summary)

    milestone(f"recipe {recipe.name}: {recipe['base_model']} ({source.origin}), "
              f"{'DoRA' if recipe['use_dora'] else 'LoRA'} r={recipe['lora_r']}"
              f"{' from ' + recipe['init_adapter'] if recipe['init_adapter'] else ''}, "
              f"{str(recipe['quant_bits']) + '-bit' if recipe.quantised else recipe['dtype']} base, "
              f"{state.num_processes} process(es)")
    for note in recipe_notes(recipe):
        milestone(f"note: {note}")
    for line in describe_engine(recipe, engine) if engine.kind != "single" else []:
        milestone(line)
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
    if getattr(data, "record", None):
        summary["datasets"] = data.record  # each file's sha256, rows read and rows used
    scores_before = score_tasks(scoring, recipe, model, tokenizer, output_dir / "eval_before", "before training")
    trainer, history = builder.build_recipe_trainer(recipe, model, tokenizer, data, output_dir / CHECKPOINT_DIR)
    stopping = attach_early_stopping(trainer, recipe, scoring, output_dir / CHECKPOINT_DIR,
                                     resume_from=resume_point.checkpoint)
    for callback in callbacks:  # e.g. a sweep's objective reports (lora.sweeps)
        trainer.add_callback(callback)
    encoding = encoding_report(recipe, tokenizer, data)
    if encoding["unclean_boundaries"]:
        milestone(f"note: {encoding['unclean_boundaries']} of {encoding['rows']} rows do not split cleanly between "
                  f"prompt and answer under prompt_template {recipe['prompt_template']!r} (the answer's first token "
                  "merges with the prompt's end; run_summary.json lists them)")
    summary["encoding"] = encoding
    milestone(f"training: {trainer.args.max_steps if trainer.args.max_steps > 0 else recipe['num_epochs']} "
              f"{'steps' if trainer.args.max_steps > 0 else 'epoch(s)'}, "
              f"batch {recipe['batch_size']} x {recipe['gradient_accumulation_steps']} accumulation")
    checkpoint = resume_point.checkpoint
    # The run record covers the whole run: what the checkpoint logged before this process took over, too.
    history.losses[:0], history.eval_losses[:0] = logged_history(checkpoint)
    if resume_point.nothing_left:
        restore_without_training(trainer, checkpoint)
        training_loss = None
    else:
        training_loss = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None).training_loss
    if stopping is not None and not history.stopped_on_non_finite_loss:
        summary["early_stopping"] = stopping.publish_best(trainer)  # the best evaluated step's adapter is published
    answer_tokens = trainer.total_answer_tokens()

    if history.stopped_on_non_finite_loss:
        summary.update(status="failed", reason="non-finite loss", losses=history.losses)
        finish_tracking(trainer, summary, task_facts)
        if plan.replaces:
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
        train_loss=training_loss,
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
    if hasattr(history, "preference_record"):
        summary["preferences"] = history.preference_record()
    # scores and key figures to the trackers, before the folder is published
    finish_tracking(trainer, summary, task_facts)
    full_state = gathered_state_dict(trainer)  # a collective under FSDP/ZeRO-3: every process calls it
    if state.is_main_process:
        write_final_outputs(recipe, model, tokenizer, trainer, history, summary, output_dir, full_state, task_facts)
        finish_output_dir(plan)
    state.wait_for_everyone()
    speed = f"{summary['tokens_per_second']:.0f} tokens/s" if summary["tokens_per_second"] else "no step trained"
    milestone(f"done in {summary['wall_time_seconds']:.0f} s: loss {format_losses(summary)}, {speed}; adapter in "
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


def score_tasks(scoring, recipe, model, tokenizer, out_dir: Path, when: str) -> dict:
    """Scores on the recipe's eval_tasks (eval/harness/evaluation.py), or {} when the recipe lists none or the run
    has no scoring (a sweep's trials are scored on their validation set instead)."""
    if not recipe["eval_tasks"] or scoring is None:
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
    from lora.core.files import remove_tree, write_json_atomic
    from lora.recipes.outputs import SUMMARY_FILE
    from lora.training.run_folder import STAGING_PREFIX, publish_folder

    staging = output_dir / f"{STAGING_PREFIX}{time.time_ns()}"
    staging.mkdir()
    try:
        _stage_final_files(recipe, model, tokenizer, trainer, history, summary, staging, full_state, task_facts)
    except BaseException:
        remove_tree(staging)  # a failed or interrupted staging leaves nothing behind in the run folder
        raise
    # The replacement is complete: from here the folder's files are being replaced, so its record stops saying
    # "completed" (over a finished run this folder is the hidden replacement, swapped in as a whole afterwards).
    write_json_atomic(output_dir / SUMMARY_FILE, {**summary, "status": "running"})
    publish_folder(staging, output_dir, last="adapter_config.json")
    write_json_atomic(output_dir / SUMMARY_FILE, summary)


def _stage_final_files(recipe, model, tokenizer, trainer, history, summary, staging: Path, full_state,
                       task_facts) -> None:
    from lora.core.files import write_json_atomic
    from lora.recipes.outputs import RECIPE_FILE
    from lora.training.checkpoints import TRAINER_STATE_FILE
    from lora.training.model_card import write_model_card
    from lora.training.run_folder import LOSS_CURVE_FILE, plot_loss_curve

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
