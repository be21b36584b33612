"""Grid search against pruned TPE search over the same space, on the bundled sentiment task with the default model.

    nice -n 10 .venv/bin/python bench/sweep_vs_grid.py                      # 30 steps per trial (sweeps.json)
    nice -n 10 .venv/bin/python bench/sweep_vs_grid.py --max-steps 20       # a smaller budget per trial
    .venv/bin/python bench/sweep_vs_grid.py --report                        # the table of what has run so far

Runs the two sweeps of sweeps.json, `sentiment_grid` (learning rate x rank x DoRA on/off, every combination, no
pruning) and `sentiment_tpe` (the same space, TPE with median pruning, at most half the grid's training steps), each
choosing on 20% of the training rows held out for validation. Then scores on the bundled test set (200 rows) the best
trial of each and the default recipe trained at the same budget (its learning rate, rank and DoRA on the same
training rows and steps). Everything resumes: the studies continue where they stopped (a killed run's trial is run
again) and test scores already written are kept. Results go to outputs/bench/sweep_vs_grid/steps-N/ (summary.md).

Goal: the pruned search's best matches the grid's best within one test-set standard error, sqrt(p(1-p)/n), with at
most half the grid's training steps.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from lora.core.compute_dtype import cpu_model_name  # noqa: E402
from lora.sweeps.spec import load_sweep  # noqa: E402
from lora.sweeps.study import open_study, run_worker, study_counts  # noqa: E402

SWEEPS = ("sentiment_grid", "sentiment_tpe")
DEFAULT_RECIPE = "sentiment_smollm2_135m_4bits_r8_dora"


def bench_sweeps_file(out: Path, max_steps: int) -> Path:
    """sweeps.json's two sweeps with `max_steps` per trial, the TPE budget half the grid's steps."""
    sweeps = json.loads((REPO_ROOT / "sweeps.json").read_text())
    chosen = {name: sweeps[name] for name in SWEEPS}
    for spec in chosen.values():
        spec["set"] = {**spec.get("set", {}), "max_steps": max_steps}
        spec["objective"]["report_every_steps"] = min(spec["objective"]["report_every_steps"], max_steps)
    grid = load_sweep("sentiment_grid", REPO_ROOT / "sweeps.json")
    chosen["sentiment_tpe"]["budget"] = {"total_steps": grid.grid_size() * max_steps // 2}
    path = out / "sweeps.json"
    path.write_text(json.dumps(chosen, indent=2))
    return path


def best_trial(study):
    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    return max(complete, key=lambda t: t.value) if complete else None


def test_score(adapter: Path, cache: dict, out: Path) -> dict | None:
    """Accuracy on the bundled test set (eval/evaluate.py, choice mode), cached by adapter folder."""
    key = str(adapter)
    if key not in cache:
        target = out / "test_scores" / adapter.parent.name / adapter.name
        subprocess.run([sys.executable, str(REPO_ROOT / "eval/evaluate.py"), "--adapter", str(adapter), "--tasks",
                        "sentiment", "--out", str(target)], check=True, cwd=REPO_ROOT)
        result = json.loads((target / "sentiment.json").read_text())
        cache[key] = {"accuracy": result["accuracy"], "n": result["n"], "weighted_f1": result.get("weighted_f1")}
        (out / "test_scores.json").write_text(json.dumps(cache, indent=2))
    return cache[key]


def default_at_budget(out: Path, max_steps: int) -> Path:
    """The default recipe trained like a trial (same held-out rows, same steps), without test scoring."""
    from lora.core.locks import hold_output_lock
    from lora.recipes.outputs import is_finished
    from lora.recipes.registry import resolve_recipe
    from lora.training.run import run_recipe

    folder = out / "default_at_budget"
    with hold_output_lock(folder):
        if not is_finished(folder):
            recipe = resolve_recipe(DEFAULT_RECIPE, None, [f"max_steps={max_steps}", "validation_split=0.2"])
            run_recipe(recipe, folder, scoring=None, overwrite=folder.exists())
    return folder


def standard_error(accuracy: float, n: int) -> float:
    return math.sqrt(accuracy * (1 - accuracy) / n)


def report(out: Path, sweeps_file: Path, max_steps: int, seconds: dict, score_tests: bool) -> str:
    cache = json.loads((out / "test_scores.json").read_text()) if (out / "test_scores.json").is_file() else {}
    rows, facts = [], {}
    for name in SWEEPS:
        sweep = load_sweep(name, sweeps_file, REPO_ROOT / "finetune_configs.json")
        folder = out / name
        if not (folder / "study.sqlite3").is_file():
            continue
        study = open_study(sweep, folder, must_exist=True)
        counts = study_counts(study.get_trials(deepcopy=False))
        best = best_trial(study)
        test = None
        if best is not None and score_tests and counts.running == 0:
            test = test_score(folder / best.user_attrs["folder"], cache, out)
        elif best is not None:
            test = cache.get(str(folder / best.user_attrs["folder"]))
        facts[name] = {"best": best, "steps": counts.steps_spent, "test": test}
        params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in (best.params.items() if best else []))
        rows.append(f"| {name} ({sweep.sampler['type']}, pruner {sweep.pruner['type']}) | "
                    f"{counts.complete} complete, {counts.pruned} pruned, {counts.failed} failed"
                    f"{', ' + str(counts.running) + ' running' if counts.running else ''} | {counts.steps_spent} | "
                    f"{best.value:.3f} (trial {best.number}: {params})" if best else "-")
        rows[-1] += (f" | {test['accuracy']:.3f} +- {standard_error(test['accuracy'], test['n']):.3f}"
                     if test else " | -") + f" | {seconds.get(name, '-')} |"
    default_folder = out / "default_at_budget"
    default_test = cache.get(str(default_folder))
    lines = [
        f"Machine: {cpu_model_name()}; {max_steps} steps per trial (batch 8), validation = 20% of the 600 training "
        "rows (120 rows, choice-mode accuracy); test = the bundled 200-row test set.",
        "",
        "| search | trials | training steps | best validation accuracy (trial: parameters) | its test accuracy +- 1 SE "
        "| wall (s, this run) |",
        "|---|---|---|---|---|---|",
        *rows,
    ]
    if default_test:
        lines.append(f"| default recipe (lr 3e-4, r 8, DoRA) at the same budget | 1 | {max_steps} | - | "
                     f"{default_test['accuracy']:.3f} +- {standard_error(default_test['accuracy'], 200):.3f} | - |")
    grid, tpe = facts.get("sentiment_grid"), facts.get("sentiment_tpe")
    if grid and tpe and grid["test"] and tpe["test"]:
        se = standard_error(grid["test"]["accuracy"], grid["test"]["n"])
        matched = tpe["test"]["accuracy"] >= grid["test"]["accuracy"] - se
        half = tpe["steps"] <= grid["steps"] / 2
        tpe_acc, grid_acc = tpe["test"]["accuracy"], grid["test"]["accuracy"]
        lines += ["", f"Goal: pruned TPE's best within one test SE ({se:.3f}) of the grid's best: "
                      f"{'met' if matched else 'not met'} ({tpe_acc:.3f} vs {grid_acc:.3f}); at most half the grid's "
                      f"steps: {'met' if half else 'not met'} ({tpe['steps']} vs {grid['steps']})."]
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-steps", type=int, default=30, help="training steps per trial")
    parser.add_argument("--out", help="results folder (default: outputs/bench/sweep_vs_grid/steps-N)")
    parser.add_argument("--only", choices=[*SWEEPS, "tests"], help="run one stage only")
    parser.add_argument("--report", action="store_true", help="only print the table of what has run so far")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's; 1 can be faster on a busy "
                                                     "machine)")
    args = parser.parse_args()
    if args.threads:
        import os

        import torch

        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the test-set scoring subprocesses
    out = Path(args.out) if args.out else REPO_ROOT / "outputs/bench/sweep_vs_grid" / f"steps-{args.max_steps}"
    out.mkdir(parents=True, exist_ok=True)
    sweeps_file = bench_sweeps_file(out, args.max_steps)
    seconds = {}
    if not args.report:
        for name in SWEEPS:
            if args.only in (None, name):
                began = time.perf_counter()
                run_worker(load_sweep(name, sweeps_file, REPO_ROOT / "finetune_configs.json"), out / name)
                seconds[name] = round(time.perf_counter() - began)
        if args.only in (None, "tests"):
            cache = json.loads((out / "test_scores.json").read_text()) if (out / "test_scores.json").is_file() else {}
            test_score(default_at_budget(out, args.max_steps), cache, out)
    print(report(out, sweeps_file, args.max_steps, seconds, score_tests=not args.report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
