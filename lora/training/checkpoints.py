"""Checkpoints, in one place: what a checkpoint is, whether it is intact, and whether a run may resume from it.

A checkpoint is a `checkpoints/checkpoint-<step>` folder of a run folder. The Trainer writes it under
`checkpoints/.incomplete/` and `publish_checkpoint` renames it into place once every process has written its part
(lora/training/sft.py), so a `checkpoint-<step>` folder is always complete; resuming still checks it
(`checkpoint_problem`: every file resuming reads is there and reads back) and `--resume auto` falls back to the
newest intact one.

Whether a run may resume from an intact checkpoint (`ResumePoint`): its adapter must be the one the recipe
attaches (rank, alpha, DoRA, rsLoRA, target layers: a mismatch would fail deep inside the Trainer), and what is left
to train decides how the run goes on: steps left -> train them; none left in an unfinished folder -> finish the run
from the checkpoint without training (the Trainer, resumed at its last step, would train one step past the end);
none left over a finished adapter -> refused, the finished adapter is kept.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from lora.core.errors import OutputError, RecipeError
from lora.core.files import file_problem, fsync_path, remove_tree

__all__ = [
    "CHECKPOINT_REQUIRED_FILES",
    "CHECKPOINT_STAGING_DIR",
    "checkpoint_problem",
    "checkpoint_step",
    "complete_checkpoints_newest_first",
    "find_resume_point",
    "is_complete_checkpoint",
    "latest_complete_checkpoint",
    "logged_history",
    "newest_intact_checkpoint",
    "publish_checkpoint",
    "restore_without_training",
    "ResumePoint",
    "SHARDED_OPTIMIZER_GLOBS",
    "TRAINER_STATE_FILE",
]

CHECKPOINT_STAGING_DIR = ".incomplete"
TRAINER_STATE_FILE = "trainer_state.json"
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
# What resuming reads from a checkpoint of a single-process or DDP run (FSDP/DeepSpeed keep optimizer states in
# their own folders instead of optimizer.pt): without optimizer.pt or scheduler.pt the Trainer silently restarts
# them, so a resume would not continue the run it claims to.
CHECKPOINT_REQUIRED_FILES = (TRAINER_STATE_FILE, ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, "scheduler.pt")
SHARDED_OPTIMIZER_GLOBS = ("optimizer.pt", "optimizer.bin", "optimizer_*", "global_step*")


def publish_checkpoint(staging: Path, final: Path) -> None:
    """Rename a fully written checkpoint folder into place (replacing an older one of the same step).

    The files are flushed to disk first, so that after a power cut the renamed folder cannot hold empty files.
    """
    staging, final = Path(staging), Path(final)
    for path in [p for p in staging.rglob("*") if p.is_file()] + [staging]:
        fsync_path(path)
    if final.exists():  # e.g. resumed from an older checkpoint: this step was saved once before
        superseded = staging.parent / f"superseded-{final.name}"
        remove_tree(superseded)
        os.replace(final, superseded)
        os.replace(staging, final)
        remove_tree(superseded)
    else:
        os.replace(staging, final)
    fsync_path(final.parent)
    with contextlib.suppress(OSError):
        staging.parent.rmdir()  # the staging folder, when no other checkpoint is being written


def checkpoint_step(path: Path) -> int | None:
    """The step of a `checkpoint-<step>` folder, or None for any other name."""
    prefix, _, step = Path(path).name.partition("-")
    return int(step) if prefix == "checkpoint" and step.isdigit() else None


def is_complete_checkpoint(path: Path) -> bool:
    """A folder the Trainer finished writing (trainer_state.json is written last); intact: `checkpoint_problem`."""
    return Path(path).is_dir() and (Path(path) / TRAINER_STATE_FILE).is_file()


def latest_complete_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The complete `checkpoint-<step>` folder with the highest step, or None when there is none."""
    return next(iter(complete_checkpoints_newest_first(checkpoint_dir)), None)


def complete_checkpoints_newest_first(checkpoint_dir: Path) -> list[Path]:
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        return []
    candidates = [p for p in checkpoint_dir.iterdir() if checkpoint_step(p) is not None and is_complete_checkpoint(p)]
    return sorted(candidates, key=checkpoint_step, reverse=True)


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why a `checkpoint-<step>` folder cannot be resumed from (a missing or unreadable file), or None."""
    checkpoint = Path(checkpoint)
    missing = [name for name in CHECKPOINT_REQUIRED_FILES if not (checkpoint / name).is_file()]
    if not any(any(checkpoint.glob(pattern)) for pattern in SHARDED_OPTIMIZER_GLOBS):
        missing.append("optimizer.pt")
    if missing:
        return f"missing {', '.join(missing)}"
    for path in sorted(p for p in checkpoint.rglob("*") if p.is_file()):
        problem = file_problem(path)
        if problem:
            return problem
    return None


def newest_intact_checkpoint(checkpoint_dir: Path) -> tuple[Path | None, list[str]]:
    """The newest checkpoint that can be resumed from, and one line for each newer one that cannot."""
    skipped = []
    for checkpoint in complete_checkpoints_newest_first(checkpoint_dir):
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            return checkpoint, skipped
        skipped.append(f"{checkpoint.name}: {problem}")
    return None, skipped


@dataclass(frozen=True)
class ResumePoint:
    """Where a resumed run continues, decided before any model loads.

    Attributes:
        checkpoint: the intact checkpoint folder, or None (no checkpoint: the run starts at step 0).
        notes: what to tell the user (which checkpoint, which damaged ones were skipped).
        nothing_left: the checkpoint already reaches the recipe's end (max_steps or num_epochs): the run is
            finished from it without training.
    """

    checkpoint: Path | None = None
    notes: tuple[str, ...] = ()
    nothing_left: bool = False


def find_resume_point(recipe, resume: str | None, checkpoint_dir: Path, *, finished: bool) -> ResumePoint:
    """The checkpoint a run continues from and how, or refuse (every rule of resuming is here).

    Args:
        recipe: the resolved recipe of the new run.
        resume: --resume's value: None (start at step 0), "auto" (the newest intact checkpoint in `checkpoint_dir`;
            each newer, damaged one is skipped with a note naming its bad file) or a checkpoint folder, which must
            be intact.
        checkpoint_dir: the output folder's `checkpoints/`.
        finished: the output folder holds a finished adapter (only a larger max_steps/num_epochs continues it).

    Raises:
        OutputError: PATH is not a complete, intact checkpoint; or a finished adapter's checkpoint already reaches
            the recipe's end (nothing to train: the finished adapter is kept).
        RecipeError: the checkpoint's adapter is not the one the recipe attaches (the fields are named).
    """
    if not resume:
        return ResumePoint()
    if resume != "auto":
        path = Path(resume).expanduser().resolve()
        if not is_complete_checkpoint(path):
            raise OutputError(f"--resume {resume}: not a complete checkpoint folder (expected a checkpoint-<step> "
                              f"folder holding {TRAINER_STATE_FILE}); use --resume auto for the latest one.")
        problem = checkpoint_problem(path)
        if problem:
            raise OutputError(f"--resume {resume}: this checkpoint cannot be resumed from: {problem}. Use --resume "
                              "auto to continue from the newest intact checkpoint of the output folder.")
        checkpoint, notes = path, [f"--resume: continuing from {path}"]
    else:
        checkpoint, skipped = newest_intact_checkpoint(checkpoint_dir)
        notes = [f"--resume auto: skipping damaged {line}" for line in skipped]
        if checkpoint is None:
            return ResumePoint(None, (*notes, f"--resume auto: no intact checkpoint in {checkpoint_dir}; starting "
                                              "from step 0"))
        notes.append(f"--resume auto: continuing from {checkpoint.name}"
                     + (" (the newest intact one)" if skipped else ""))
    check_adapter_matches_recipe(recipe, checkpoint)
    reached = _end_reached(recipe, checkpoint)
    if reached and finished:
        where, end, field = reached
        raise OutputError(
            f"recipe {recipe.name}: {checkpoint_dir.parent} holds a finished adapter and its checkpoint "
            f"{checkpoint.name} is at {where}, where the recipe stops ({end}): there is nothing left to train, so the "
            f"finished adapter is kept as it is. Pass --set {field}=N with a larger N to train it further, or "
            "--overwrite to train again from step 0."
        )
    if reached:
        notes.append(f"{checkpoint.name} is at {reached[0]}, where the recipe stops ({reached[1]}): finishing the "
                     "run from it without training")
    return ResumePoint(checkpoint, tuple(notes), nothing_left=bool(reached))


def _end_reached(recipe, checkpoint: Path) -> tuple[str, str, str] | None:
    """(where the checkpoint is, the recipe's end, the field that moves it) when nothing is left to train."""
    state = json.loads((checkpoint / TRAINER_STATE_FILE).read_text(encoding="utf-8"))
    if recipe["max_steps"] > 0:
        if state.get("global_step", 0) >= recipe["max_steps"]:
            return f"step {state.get('global_step')}", f"max_steps {recipe['max_steps']}", "max_steps"
    elif (state.get("epoch") or 0) >= recipe["num_epochs"]:
        return f"epoch {state.get('epoch')}", f"num_epochs {recipe['num_epochs']}", "num_epochs"
    return None


def check_adapter_matches_recipe(recipe, checkpoint: Path) -> None:
    """Refuse a checkpoint whose adapter the recipe would not rebuild (rank, alpha, DoRA, rsLoRA, target layers).

    Checked before any model loads: resumed into a different adapter, the Trainer fails with a size-mismatch
    traceback (or, for alpha/rsLoRA, silently continues another run than the checkpoint's).
    """
    from lora.adapters.attach import INIT_ADAPTER_FIELDS

    config = json.loads((Path(checkpoint) / ADAPTER_CONFIG_FILE).read_text(encoding="utf-8"))
    fields = [(key, field) for key, field in INIT_ADAPTER_FIELDS.items() if config.get(key, False) != recipe[field]]
    problems = [f'"{recipe.field_name(field)}" is {json.dumps(recipe[field])} but the checkpoint has '
                f"{key}={json.dumps(config.get(key, False))}" for key, field in fields]
    targets, saved = recipe["lora_target_modules"], config.get("target_modules")
    if targets != "all-linear" and isinstance(saved, list) and sorted(set(targets)) != sorted(set(saved)):
        problems.append(f'"{recipe.field_name("lora_target_modules")}" is {json.dumps(sorted(set(targets)))} but the '
                        f"checkpoint has target_modules={json.dumps(sorted(set(saved)))}")
    if problems:
        settings = " ".join(f"--set {field}={json.dumps(config.get(key, False))}" for key, field in fields)
        raise RecipeError(
            f"recipe {recipe.name}: checkpoint {checkpoint} holds another adapter than the recipe attaches: "
            + "; ".join(problems) + ". Resume with the checkpoint's settings"
            + (f" ({settings})" if settings else "") + ", or start again with --overwrite."
        )


def logged_history(checkpoint: Path | None) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(losses, validation losses) the run logged up to `checkpoint`, from its trainer_state.json.

    A resumed run's record covers the whole run: the Trainer logs only every `logging_steps`, so the steps after
    the resume point may log no loss at all.
    """
    if checkpoint is None:
        return [], []
    state = json.loads((Path(checkpoint) / TRAINER_STATE_FILE).read_text(encoding="utf-8"))
    last = state.get("global_step", 0)
    entries = [entry for entry in state.get("log_history", []) if entry.get("step", 0) <= last]
    losses = [(entry["step"], float(entry["loss"])) for entry in entries if "loss" in entry]
    eval_losses = [(entry["step"], float(entry["eval_loss"])) for entry in entries if "eval_loss" in entry]
    return losses, eval_losses


def restore_without_training(trainer, checkpoint: Path) -> None:
    """Bring a trainer to the state of a checkpoint that already reaches the recipe's end, without a training step.

    `Trainer.train(resume_from_checkpoint=...)` at the last step trains one step more (transformers 5 counts the
    epoch's batches from the checkpoint and finds one left), so the adapter weights and the trainer state are
    loaded here instead.
    """
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import TrainerState

    model = trainer.accelerator.unwrap_model(trainer.model)
    result = set_peft_model_state_dict(model, load_file(str(Path(checkpoint) / ADAPTER_WEIGHTS_FILE)),
                                       adapter_name="default")
    if result.unexpected_keys:
        raise ValueError(f"{checkpoint}: weights the attached adapter does not have: {result.unexpected_keys[:5]}")
    trainer.state = TrainerState.load_from_json(str(Path(checkpoint) / TRAINER_STATE_FILE))
