"""Everything written to `outputs/<recipe>/`, written so that a crash never leaves a folder that looks finished.

Protocol: while a run is going, the folder holds `checkpoints/` and a `run_summary.json` with status "running".
At the end every final file is written to a temporary name and renamed into place; `adapter_config.json` (the
file that makes the folder loadable by peft) is renamed in after all the others, and only then does
`run_summary.json` say "completed". A folder whose summary says "completed" is a finished adapter.

Checkpoints follow the same rule: the Trainer writes each one under `checkpoints/.incomplete/`, and once every
process has written its part the folder is renamed to `checkpoints/checkpoint-<step>`. A `checkpoint-<step>`
folder is therefore always complete; `--resume auto` still checks for `trainer_state.json` (the Trainer's last
file) so that folders copied or written by other tools are only used when whole.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from lora.errors import OutputError

SUMMARY_FILE = "run_summary.json"
RECIPE_FILE = "recipe.json"
CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_STAGING_DIR = ".incomplete"
LOSS_CURVE_FILE = "loss_curve.png"
TRAINER_STATE_FILE = "trainer_state.json"
LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets", "trl")


def default_output_dir(recipe) -> Path:
    return recipe.registry_path.parent / "outputs" / recipe.name


def read_summary(output_dir: Path) -> dict | None:
    path = Path(output_dir) / SUMMARY_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def is_finished(output_dir: Path) -> bool:
    summary = read_summary(output_dir)
    completed = bool(summary) and summary.get("status") == "completed"
    return completed and (Path(output_dir) / "adapter_config.json").exists()


def prepare_output_dir(output_dir: Path, *, overwrite: bool, resume: bool) -> None:
    """Create the folder, or refuse to clobber a finished run / an interrupted run's checkpoints."""
    output_dir = Path(output_dir)
    has_checkpoints = any((output_dir / CHECKPOINT_DIR).glob("checkpoint-*"))
    if overwrite and output_dir.exists():
        shutil.rmtree(output_dir)
    elif is_finished(output_dir) and not resume:
        raise OutputError(
            f"{output_dir} already holds a finished adapter. Pass --overwrite to replace it, "
            f"or --output-dir DIR to write elsewhere."
        )
    elif has_checkpoints and not resume:
        raise OutputError(
            f"{output_dir} holds checkpoints of an interrupted run. Pass --resume auto to continue it, "
            f"or --overwrite to start again."
        )
    output_dir.mkdir(parents=True, exist_ok=True)


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write JSON to a temporary sibling and rename it into place, with the mode any other output file gets."""
    path = Path(path)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as handle:
        json.dump(payload, handle, indent=2, default=str)
        handle.write("\n")
        temp_name = handle.name
    os.chmod(temp_name, new_file_mode())  # mkstemp creates 0600 whatever the umask says
    os.replace(temp_name, path)


def new_file_mode() -> int:
    """The mode open() gives a new file under this process's umask (0644 under the usual 022)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


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


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def publish_checkpoint(staging: Path, final: Path) -> None:
    """Rename a fully written checkpoint folder into place (replacing an older one of the same step).

    The files are flushed to disk first, so that after a power cut the renamed folder cannot hold empty files.
    """
    staging, final = Path(staging), Path(final)
    for path in [p for p in staging.rglob("*") if p.is_file()] + [staging]:
        _fsync(path)
    if final.exists():  # e.g. resumed from an older checkpoint: this step was saved once before
        superseded = staging.parent / f"superseded-{final.name}"
        remove_tree(superseded)
        os.replace(final, superseded)
        os.replace(staging, final)
        remove_tree(superseded)
    else:
        os.replace(staging, final)
    _fsync(final.parent)
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
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        return None
    candidates = [p for p in checkpoint_dir.iterdir() if checkpoint_step(p) is not None and is_complete_checkpoint(p)]
    return max(candidates, key=checkpoint_step, default=None)


def library_versions() -> dict[str, str | None]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit(repo_dir: Path) -> str | None:
    """The commit of the code that ran (with '+dirty' when the tree had changes), or None outside git."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo_dir, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo_dir, capture_output=True, text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit}+dirty" if dirty else commit


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
