"""Everything written to `outputs/<recipe>/`, written so that a crash never leaves a folder that looks finished.

Protocol: while a run is going, the folder holds `checkpoints/` and a `run_summary.json` with status "running".
At the end every final file is written to a temporary name and renamed into place; `adapter_config.json` (the
file that makes the folder loadable by peft) is renamed in after all the others, and only then does
`run_summary.json` say "completed". A folder whose summary says "completed" is a finished adapter.

Checkpoints follow the same rule: the Trainer writes each one under `checkpoints/.incomplete/`, and once every
process has written its part the folder is renamed to `checkpoints/checkpoint-<step>`. A `checkpoint-<step>`
folder is therefore always complete; `--resume auto` still checks each one before using it (every file it needs
present, safetensors/zip/JSON files readable: `checkpoint_problem`) and falls back to the newest intact one.

Replacing: `run_summary.json` is written first thing, and it is the marker of a folder this tool wrote; no other
folder is ever written into or replaced. `--overwrite` builds the new run in a hidden sibling
(`.<name>.overwrite`) and swaps it in only once it has finished (`move_into_place`, as merge.py publishes), so a
run that fails leaves the previous one untouched.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from lora.core.errors import OutputError
from lora.core.files import file_problem, fsync_path, move_into_place, new_file_mode, remove_tree
from lora.recipes.outputs import SUMMARY_FILE, is_finished, is_run_folder, read_summary

__all__ = [
    "abandon_output_dir",
    "CHECKPOINT_DIR",
    "checkpoint_problem",
    "CHECKPOINT_REQUIRED_FILES",
    "CHECKPOINT_STAGING_DIR",
    "checkpoint_step",
    "complete_checkpoints_newest_first",
    "finish_output_dir",
    "is_complete_checkpoint",
    "latest_complete_checkpoint",
    "LOSS_CURVE_FILE",
    "newest_intact_checkpoint",
    "OutputPlan",
    "plan_output_dir",
    "plot_loss_curve",
    "prepare_output_dir",
    "publish_checkpoint",
    "publish_folder",
    "replacement_dir",
    "SHARDED_OPTIMIZER_GLOBS",
    "TRAINER_STATE_FILE",
]

CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_STAGING_DIR = ".incomplete"
LOSS_CURVE_FILE = "loss_curve.png"
TRAINER_STATE_FILE = "trainer_state.json"


@dataclass(frozen=True)
class OutputPlan:
    """Where a run writes, decided before anything is written.

    Attributes:
        output_dir: where the finished adapter ends up.
        work_dir: where this run writes while it goes: `output_dir` itself, or (--overwrite over an existing run) a
            hidden sibling that replaces `output_dir` only once the new run has finished.
        keeps_finished_record: `output_dir` holds a finished run that --resume continues; its run_summary.json
            stays as it is until the new final files are staged.
    """

    output_dir: Path
    work_dir: Path
    keeps_finished_record: bool = False

    @property
    def replaces(self) -> bool:
        return self.work_dir != self.output_dir


def replacement_dir(output_dir: Path) -> Path:
    """The hidden sibling an --overwrite run is built in (a fixed name, so every process of a run agrees on it;
    recipe names cannot start with "." so it never is another recipe's folder)."""
    return output_dir.with_name(f".{output_dir.name}.overwrite")


def plan_output_dir(output_dir: Path, *, overwrite: bool, resume: bool,
                    has_checkpoint_to_resume: bool = False) -> OutputPlan:
    """Decide where a run writes; reads only, so every process can call it and get the same answer.

    Args:
        output_dir: the folder the adapter goes to (absolute).
        overwrite: --overwrite: replace a previous run of this tool, once the new one has finished.
        resume: --resume was given.
        has_checkpoint_to_resume: --resume found an intact checkpoint to continue from.

    Raises:
        OutputError: `output_dir` is a file or a folder this tool did not write (never written into nor replaced),
            holds a finished or an interrupted run and neither --overwrite nor --resume was asked for, or --resume
            has nothing to continue in a finished folder.
    """
    output_dir = Path(output_dir)
    if overwrite and resume:
        raise OutputError("--overwrite trains again from step 0 and --resume continues a run: pass only one of them.")
    if output_dir.exists() and not output_dir.is_dir():
        raise OutputError(f"the output folder {output_dir} is a file; choose another --output-dir.")
    if not output_dir.exists() or not any(output_dir.iterdir()):
        return OutputPlan(output_dir, output_dir)
    if not is_run_folder(output_dir):
        entries = sorted(p.name + ("/" if p.is_dir() else "") for p in output_dir.iterdir())
        shown = ", ".join(entries[:8]) + (f" and {len(entries) - 8} more" if len(entries) > 8 else "")
        raise OutputError(
            f"{output_dir} is not a run folder of lora/finetune.py (it has no {SUMMARY_FILE} written by it; it "
            f"holds: {shown}), so it is neither written into nor replaced. Choose another --output-dir, or empty "
            "that folder yourself."
        )
    if overwrite:
        return OutputPlan(output_dir, replacement_dir(output_dir))
    finished = is_finished(output_dir)
    if resume and finished and not has_checkpoint_to_resume:
        # Refused rather than training from step 0: the user asked to continue, and a fresh run over a finished
        # adapter is what --overwrite is for (which keeps the old adapter until the new one is complete).
        summary = read_summary(output_dir) or {}
        raise OutputError(
            f"{output_dir} holds a finished adapter ({summary.get('steps', '?')} steps) and no intact checkpoint to "
            "resume from, so --resume has nothing to continue. Pass --overwrite to train again from step 0 (the "
            "finished adapter is replaced only when the new run has finished), or --output-dir DIR to write "
            "elsewhere."
        )
    if resume:
        return OutputPlan(output_dir, output_dir, keeps_finished_record=finished)
    if finished:
        raise OutputError(
            f"{output_dir} already holds a finished adapter. Pass --overwrite to replace it (only once the new run "
            "has finished), or --output-dir DIR to write elsewhere."
        )
    if any((output_dir / CHECKPOINT_DIR).glob("checkpoint-*")):
        raise OutputError(
            f"{output_dir} holds checkpoints of an interrupted run. Pass --resume auto to continue it, "
            f"or --overwrite to start again."
        )
    return OutputPlan(output_dir, output_dir)


def prepare_output_dir(plan: OutputPlan) -> None:
    """Create the folder this run writes in (main process only); a replacement left by a killed run is cleared."""
    if plan.replaces and plan.work_dir.exists():
        if not is_run_folder(plan.work_dir) and any(plan.work_dir.iterdir()):
            raise OutputError(f"{plan.work_dir} is in the way of --overwrite and was not written by this tool; "
                              "move it away.")
        remove_tree(plan.work_dir)  # an --overwrite run killed before it finished: never swapped in
    plan.work_dir.mkdir(parents=True, exist_ok=True)


def finish_output_dir(plan: OutputPlan) -> None:
    """Swap a finished replacement in for the previous run (a no-op when the run wrote in place)."""
    if plan.replaces:
        move_into_place(plan.work_dir, plan.output_dir)


def abandon_output_dir(plan: OutputPlan) -> None:
    """After a failed run: drop an unfinished replacement, so the previous run stays exactly as it was."""
    if plan.replaces:
        remove_tree(plan.work_dir)


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


# What resuming reads from a checkpoint of a single-process or DDP run (FSDP/DeepSpeed keep optimizer states in
# their own folders instead of optimizer.pt): without optimizer.pt or scheduler.pt the Trainer silently restarts
# them, so a resume would not continue the run it claims to.
CHECKPOINT_REQUIRED_FILES = (TRAINER_STATE_FILE, "adapter_config.json", "adapter_model.safetensors", "scheduler.pt")
SHARDED_OPTIMIZER_GLOBS = ("optimizer.pt", "optimizer.bin", "optimizer_*", "global_step*")


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


def plot_loss_curve(losses: list[tuple[int, float]], eval_losses: list[tuple[int, float]], path: Path, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.5), dpi=100)
    if losses:
        axis.plot(*zip(*losses), label="train loss")
    if eval_losses:
        axis.plot(*zip(*eval_losses), marker="o", label="validation loss")
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("loss (answer tokens)")
    axis.set_title(title, fontsize=9)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def publish_folder(staging_dir: Path, output_dir: Path, last: str = "adapter_config.json") -> None:
    """Move every file of `staging_dir` into `output_dir` by rename, `last` after all the others."""
    staging_dir, output_dir = Path(staging_dir), Path(output_dir)
    files = sorted(p for p in staging_dir.rglob("*") if p.is_file())
    for path in sorted(files, key=lambda p: p.name == last):
        target = output_dir / path.relative_to(staging_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        path.chmod(new_file_mode())  # safetensors and temporary files are written 0600; outputs are meant to be shared
        os.replace(path, target)
    shutil.rmtree(staging_dir, ignore_errors=True)
    checkpoints = output_dir / CHECKPOINT_DIR
    if checkpoints.is_dir() and not any(checkpoints.iterdir()):
        checkpoints.rmdir()
