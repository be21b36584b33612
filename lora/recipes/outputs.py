"""Where a recipe's outputs live (outputs/ beside the registry) and how a folder is known as a run folder of this
tool (its run_summary.json)."""

from __future__ import annotations

import json
from pathlib import Path

__all__ = [
    "default_output_dir",
    "is_finished",
    "is_run_folder",
    "outputs_root",
    "read_summary",
    "RECIPE_FILE",
    "SUMMARY_FILE",
]

SUMMARY_FILE = "run_summary.json"
RECIPE_FILE = "recipe.json"


def outputs_root(registry_path: Path) -> Path:
    """The folder that holds every recipe's run folder: `outputs/` beside the registry file."""
    return Path(registry_path).parent / "outputs"


def default_output_dir(recipe) -> Path:
    return outputs_root(recipe.registry_path) / recipe.name


def read_summary(output_dir: Path) -> dict | None:
    path = Path(output_dir) / SUMMARY_FILE
    try:
        summary = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return summary if isinstance(summary, dict) else None


def is_finished(output_dir: Path) -> bool:
    summary = read_summary(output_dir)
    completed = bool(summary) and summary.get("status") == "completed"
    return completed and (Path(output_dir) / "adapter_config.json").exists()


def is_run_folder(folder: Path) -> bool:
    """Whether `folder` was written by this runner: its run_summary.json (written first thing) names a recipe."""
    summary = read_summary(folder)
    return bool(summary) and "recipe" in summary and "status" in summary
