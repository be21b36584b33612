"""What a run record says about the software that made it: library versions and the git commit."""

from __future__ import annotations

import importlib.metadata
import subprocess
from pathlib import Path

__all__ = ["LIBRARIES", "git_commit", "library_versions"]

# What a training run and an evaluation record both name: the libraries whose versions change the numbers.
LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets", "trl")


def library_versions() -> dict[str, str | None]:
    """{library: installed version} for every name in LIBRARIES; None (JSON null) for one that is not installed."""
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
