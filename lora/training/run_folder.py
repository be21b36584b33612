"""Everything written to `outputs/<recipe>/`, written so that a crash never leaves a folder that looks finished.

Protocol: one run writes an output folder at a time (`hold_output_dir`: a lock beside it, taken by the main
process; a second run exits 2 naming the holder). Under that lock, a replacement a killed run left half done is
completed or undone first (lora.core.files.finish_interrupted_replacement), and the command says which.

While a run is going, the folder holds `checkpoints/` and a `run_summary.json` with status "running". At the end
every final file is staged and renamed into place; `adapter_config.json` (the file that makes the folder loadable by
peft) is renamed in after all the others, and only then does `run_summary.json` say "completed". A folder whose
summary says "completed" is a finished adapter. Checkpoints (lora/training/checkpoints.py) appear atomically too.

Replacing: `run_summary.json` is written first thing, and it is the marker of a folder this tool wrote; no other
folder is ever written into or replaced. A run that replaces a finished one (`--overwrite`, or `--resume` of a
finished run, which starts from its checkpoints and logs) is built in a hidden sibling (`.<name>.overwrite`) and
swapped in only once it has finished (`move_into_place`, journalled): a run that fails or is killed leaves the
previous one untouched, and a kill during the swap is completed by the next run.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora.core.errors import OutputError, UserError
from lora.core.files import finish_interrupted_replacement, move_into_place, new_file_mode, remove_tree
from lora.core.locks import hold_output_lock
from lora.recipes.outputs import SUMMARY_FILE, is_finished, is_run_folder, read_summary
from lora.training.checkpoints import CHECKPOINT_STAGING_DIR, checkpoint_step

__all__ = [
    "abandon_output_dir",
    "CHECKPOINT_DIR",
    "disk_full_error",
    "finish_output_dir",
    "hold_output_dir",
    "human_size",
    "link_or_copy",
    "LOSS_CURVE_FILE",
    "on_main_process",
    "OutputPlan",
    "plan_output_dir",
    "plot_loss_curve",
    "prepare_output_dir",
    "publish_folder",
    "replacement_dir",
    "settle_output_dir",
    "STAGING_PREFIX",
]

CHECKPOINT_DIR = "checkpoints"
LOSS_CURVE_FILE = "loss_curve.png"
STAGING_PREFIX = ".staging-"  # the final files of a run, before they are renamed into the folder
CARRIED_OVER = (CHECKPOINT_DIR, "logs")  # what a resumed finished run starts from (lora.training.tracking.LOGS_DIR)


@dataclass(frozen=True)
class OutputPlan:
    """Where a run writes, decided before anything is written.

    Attributes:
        output_dir: where the finished adapter ends up.
        work_dir: where this run writes while it goes: `output_dir` itself, or (replacing a finished run) a hidden
            sibling that replaces `output_dir` only once the new run has finished.
        continues_finished: `output_dir` holds a finished run that --resume continues: the replacement starts with
            its checkpoints and tracker logs.
    """

    output_dir: Path
    work_dir: Path
    continues_finished: bool = False

    @property
    def replaces(self) -> bool:
        return self.work_dir != self.output_dir


def replacement_dir(output_dir: Path) -> Path:
    """The hidden sibling a replacing run is built in (a fixed name, so every process of a run agrees on it;
    recipe names cannot start with "." so it never is another recipe's folder)."""
    return output_dir.with_name(f".{output_dir.name}.overwrite")


@contextlib.contextmanager
def hold_output_dir(output_dir: Path, state) -> Iterator[list[str]]:
    """Hold `output_dir` for one run, from before its folder is looked at until the run has published.

    The main process takes the output's lock (lora.core.locks) and then finishes a replacement a killed run left
    half done; the other processes of an `accelerate launch` take nothing and learn the outcome from it, so that a
    refused run stops on every process instead of leaving some waiting at the next collective.

    Args:
        output_dir: the folder the adapter goes to.
        state: accelerate's PartialState of this run.

    Yields:
        What was done to settle the folder (lines to print: `settle_output_dir`).

    Raises:
        OutputError: another run holds the folder (its process named), or an interrupted replacement cannot be
            resolved without the user.
    """
    with contextlib.ExitStack() as stack:

        def take_and_settle() -> list[str]:
            stack.enter_context(hold_output_lock(output_dir))
            try:
                return settle_output_dir(output_dir)
            except OSError as error:
                raise OutputError(f"{error}. Nothing was changed; {output_dir} is left for you to sort out before "
                                  "the next run.") from None

        yield on_main_process(state, take_and_settle)


def on_main_process(state, action: Callable[[], Any]) -> Any:
    """Run `action` on the main process only and hand its result to every process; when it fails, every process
    raises (a UserError as the same OutputError on each, a bug re-raised on the main one), so that no process is left
    waiting at the next collective for one that stopped."""
    outcome: list = [None, None]  # [result, why it failed]
    failure = None
    if state.is_main_process:
        try:
            outcome[0] = action()
        except UserError as error:
            outcome[1] = str(error)
        except Exception as error:  # a bug: stop every process, then show its traceback
            failure, outcome[1] = error, f"the main process failed: {error!r}"
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(outcome)
    if failure is not None:
        raise failure
    if outcome[1]:
        raise OutputError(outcome[1])
    return outcome[0]


def settle_output_dir(output_dir: Path) -> list[str]:
    """Finish what a killed run left half done beside `output_dir` (main process, holding the output's lock).

    A replacement killed between its renames is completed (or undone when its new build is gone), and a replacement
    folder no journal names is removed: it was never finished, so it is never published.

    Returns:
        One line per thing done, to tell the user.

    Raises:
        OSError: an interrupted replacement cannot be resolved without the user (the message says why).
    """
    output_dir = Path(output_dir)
    done = [line for line in [finish_interrupted_replacement(output_dir)] if line]
    stale = replacement_dir(output_dir)
    if stale.is_dir() and not stale.is_symlink() and (is_run_folder(stale) or not any(stale.iterdir())):
        remove_tree(stale)
        done.append(f"removed {stale}, the unfinished replacement of a run that was stopped (it was never published)")
    return done


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
    if resume and finished:
        # Built beside and swapped in like --overwrite: the finished adapter and its record stay whole until the
        # continued run has finished (a kill at any moment leaves the one or the other, never a mix).
        return OutputPlan(output_dir, replacement_dir(output_dir), continues_finished=True)
    if resume:
        return OutputPlan(output_dir, output_dir)
    if finished:
        raise OutputError(
            f"{output_dir} already holds a finished adapter. Pass --overwrite to replace it (only once the new run "
            "has finished), or --output-dir DIR to write elsewhere."
        )
    if any(checkpoint_step(path) is not None for path in (output_dir / CHECKPOINT_DIR).glob("checkpoint-*")):
        raise OutputError(
            f"{output_dir} holds checkpoints of an interrupted run. Pass --resume auto to continue it, "
            f"or --overwrite to start again."
        )
    return OutputPlan(output_dir, output_dir)


def prepare_output_dir(plan: OutputPlan) -> None:
    """Create the folder this run writes in (main process only, holding the output's lock).

    A replacement folder a killed run left was removed when the folder was settled (`settle_output_dir`); anything
    else in its place was not written by this tool and is refused. Final files a killed run was staging are removed.
    """
    if plan.replaces and (plan.work_dir.exists() or plan.work_dir.is_symlink()):
        raise OutputError(f"{plan.work_dir} is in the way of replacing {plan.output_dir} and was not written by this "
                          "tool; move it away.")
    plan.work_dir.mkdir(parents=True, exist_ok=True)
    for leftover in plan.work_dir.glob(f"{STAGING_PREFIX}*"):
        remove_tree(leftover)
    if plan.continues_finished:
        for name in CARRIED_OVER:
            if (plan.output_dir / name).is_dir():
                # Checkpoint files are never changed once written (a new checkpoint is a new folder), so they are
                # shared by hard link; tracker logs may be appended to, so they are copied.
                link = name == CHECKPOINT_DIR
                shutil.copytree(plan.output_dir / name, plan.work_dir / name, symlinks=True,
                                ignore=shutil.ignore_patterns(CHECKPOINT_STAGING_DIR),
                                copy_function=link_or_copy if link else shutil.copy2)


def link_or_copy(source: str, target: str) -> None:
    """Hard-link `source` to `target`, or copy it with its times where the file system cannot link."""
    try:
        os.link(source, target)
    except OSError:  # a file system without hard links
        shutil.copy2(source, target)


def finish_output_dir(plan: OutputPlan) -> None:
    """Swap a finished replacement in for the previous run (a no-op when the run wrote in place)."""
    if plan.replaces:
        move_into_place(plan.work_dir, plan.output_dir)


def abandon_output_dir(plan: OutputPlan) -> None:
    """After a failed run: drop an unfinished replacement, so the previous run stays exactly as it was."""
    if plan.replaces:
        remove_tree(plan.work_dir)
    for leftover in plan.work_dir.glob(f"{STAGING_PREFIX}*") if plan.work_dir.is_dir() else []:
        remove_tree(leftover)


_DISK_FULL_WORDS = ("no space left", "storagefull", "unexpected pos", "file write failed", "disk quota")


def disk_full_error(error: BaseException, plan: OutputPlan) -> OutputError | None:
    """The user's words for a write that failed because the disk is full (ENOSPC, or torch's and safetensors' own
    wording of it), or None for any other error. Call it before the unfinished replacement is removed: what it
    had written is part of the space the run needs."""
    chain, seen = [], error
    while seen is not None and seen not in chain:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    by_errno = any(isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT) for e in chain)
    by_words = any(word in str(e).lower() for e in chain for word in _DISK_FULL_WORDS)
    if not (by_errno or by_words):
        return None
    folder = plan.work_dir if plan.work_dir.exists() else plan.work_dir.parent
    usage = shutil.disk_usage(folder)
    written = _tree_size(plan.work_dir)
    earlier = _tree_size(plan.output_dir) if plan.replaces else 0
    needed = max(written, earlier)
    # a replacement needs the room its predecessor takes; a first run, what it had written
    reason = ("what the run it replaces takes" if plan.replaces and earlier >= written
              else "what it had written when the disk filled")
    if not by_errno and usage.free >= max(needed, 1 << 20):
        return None  # torch's wording alone, with room left on the disk: some other write error
    mount = folder.resolve()
    while not os.path.ismount(mount) and mount != mount.parent:
        mount = mount.parent
    kept = (f"the previous run in {plan.output_dir} is unchanged" if plan.replaces
            else f"the checkpoints written so far stay in {plan.work_dir / CHECKPOINT_DIR}")
    return OutputError(
        f"the disk holding {plan.work_dir} (mounted at {mount}) is full: {human_size(usage.free)} free of "
        f"{human_size(usage.total)}, and this run's folder needs at least {human_size(needed)} "
        f"({reason}; each checkpoint adds its adapter and optimizer state). Nothing was published and {kept}. Free "
        f"space on that disk, or pass --output-dir on another one. ({error})"
    )


def _tree_size(folder: Path) -> int:
    if not folder.is_dir():
        return 0
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file() and not path.is_symlink())


def human_size(count: int) -> str:
    """A byte count in the largest unit below 1024 (bytes, KiB, MiB, GiB), for messages."""
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count} bytes"


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
