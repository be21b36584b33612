"""What a sweep shows: its trials as a table (markdown and CSV) sorted by the objective, PNG plots drawn by Optuna's
matplotlib visualisations, and the best trial as a recipe entry ready to paste into the registry."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import warnings
from pathlib import Path

from lora.sweeps.spec import Sweep
from lora.sweeps.study import study_counts

__all__ = ["best_recipe_entry", "RESULTS_CSV", "RESULTS_MD", "trial_rows", "write_results"]

RESULTS_MD = "results.md"
RESULTS_CSV = "results.csv"
PLOTS = ("optimization_history.png", "param_importances.png", "objective_vs_parameters.png")


def _objective_value(trial) -> float | None:
    """The trial's value; for a pruned or running trial the last value it reported."""
    if trial.value is not None:
        return trial.value
    if trial.intermediate_values:
        return trial.intermediate_values[max(trial.intermediate_values)]
    return None


def trial_rows(study, sweep: Sweep) -> list[dict]:
    """One row per trial of the study (surplus starts left out), best objective first, trials without one last."""
    rows = []
    for trial in study.get_trials(deepcopy=False):
        if trial.user_attrs.get("surplus"):
            continue
        rows.append({
            "trial": trial.number,
            **{name: trial.params.get(name) for name in sweep.space},
            "objective": _objective_value(trial),
            "steps": trial.user_attrs.get("steps"),
            "wall_seconds": trial.user_attrs.get("wall_seconds"),
            "state": trial.state.name.lower() + (f" (retry of {trial.system_attrs['failed_trial']})"
                                                 if "failed_trial" in trial.system_attrs else ""),
        })
    sign = -1 if sweep.objective.direction == "maximize" else 1

    def key(row):
        value = row["objective"]
        missing = value is None or (isinstance(value, float) and math.isnan(value))
        return (missing, sign * value if not missing else 0.0, row["trial"])

    return sorted(rows, key=key)


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e-2 or abs(value) >= 1e4 else f"{value:.4f}".rstrip("0").rstrip(".")
    return json.dumps(value) if isinstance(value, bool) else str(value)


def _markdown(study, sweep: Sweep, rows: list[dict]) -> str:
    counts = study_counts(study.get_trials(deepcopy=False))
    columns = list(rows[0]) if rows else ["trial", *sweep.space, "objective", "steps", "wall_seconds", "state"]
    header = [("wall time (s)" if c == "wall_seconds" else sweep.objective.label if c == "objective" else c)
              for c in columns]
    lines = [
        f"# Sweep `{sweep.name}`",
        "",
        f"Base recipe `{sweep.recipe}`; objective {sweep.objective.label} on the validation set "
        f"({sweep.objective.direction}); sampler {sweep.sampler['type']}, pruner {sweep.pruner['type']}. "
        f"{counts.complete} complete, {counts.pruned} pruned, {counts.failed} failed, {counts.running} running; "
        f"{counts.steps_spent} training steps in all.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    lines += ["| " + " | ".join(_cell(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return buffer.getvalue()


def _write_text(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


def _plots(study, output_dir: Path) -> tuple[list[Path], list[str]]:
    """Optimisation history, parameter importances and the objective against each parameter, as PNGs; a plot
    Optuna cannot draw yet (e.g. importances before two complete trials) is left out with a note."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import optuna
    from optuna.visualization import matplotlib as optuna_plots

    written, notes = [], []
    drawers = zip(PLOTS, (optuna_plots.plot_optimization_history, optuna_plots.plot_param_importances,
                          optuna_plots.plot_slice))
    for name, draw in drawers:
        path = output_dir / name
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
                axes = draw(study)
        except (ValueError, RuntimeError, ZeroDivisionError, optuna.exceptions.OptunaError) as error:
            notes.append(f"{name} not drawn: {error}")
            continue
        figure = np.asarray(axes).flat[0].figure
        figure.set_size_inches(max(6.4, figure.get_size_inches()[0]), 4.8)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a colour bar's axes are not tight_layout's kind: laid out anyway
            figure.tight_layout()
        temporary = path.with_name(f".{path.stem}.{os.getpid()}.png")
        figure.savefig(temporary, dpi=100)
        plt.close(figure)
        os.replace(temporary, path)
        written.append(path)
    return written, notes


def write_results(study, sweep: Sweep, output_dir: Path) -> tuple[list[Path], list[str]]:
    """Write results.md, results.csv and the plots into the sweep's folder; returns the files and any notes."""
    output_dir = Path(output_dir)
    rows = trial_rows(study, sweep)
    _write_text(output_dir / RESULTS_MD, _markdown(study, sweep, rows))
    _write_text(output_dir / RESULTS_CSV, _csv(rows))
    plots, notes = _plots(study, output_dir) if rows else ([], ["no trial yet: no plots"])
    return [output_dir / RESULTS_MD, output_dir / RESULTS_CSV, *plots], notes


def best_recipe_entry(study, sweep: Sweep) -> str:
    """The best complete trial as a registry entry (`"name": {...}`) that extends the sweep's base recipe.

    Raises:
        ValueError: no trial of the study has completed yet.
    """
    complete = [t for t in study.get_trials(deepcopy=False) if t.value is not None and t.state.name == "COMPLETE"]
    if not complete:
        raise ValueError("no trial of the study has completed yet")
    pick = max if sweep.objective.direction == "maximize" else min
    best = pick(complete, key=lambda t: t.value)
    fields = {key: value for key, value in sweep.trial_fields(best.params).items()}
    entry = {
        "description": (f"Best trial ({best.number}) of sweep {sweep.name}: {sweep.objective.label} "
                        f"{best.value:.4f} on the validation set after {best.user_attrs.get('steps')} steps."),
        "extends": sweep.recipe,
        **fields,
    }
    body = json.dumps({f"{sweep.name}_best": entry}, indent=2)
    return body[1:-1].strip("\n")  # the entry itself, to paste inside the registry's object
