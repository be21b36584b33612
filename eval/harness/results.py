"""Result tables across runs: read eval/*.json folders, build the markdown table and the bar chart that
`python eval/compare.py` prints and saves.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from lora.core.errors import UserError

__all__ = [
    "bar_chart",
    "collect_columns",
    "column_name",
    "eval_folder",
    "markdown_table",
    "read_results",
    "RESULT_SUFFIX",
    "SKIPPED_SUFFIXES",
    "table_rows",
]

RESULT_SUFFIX = ".json"
SKIPPED_SUFFIXES = (".predictions.jsonl",)


def read_results(folder: Path) -> dict[str, dict]:
    """{task: result} from an eval folder's <task>.json files (other JSON files are ignored)."""
    results = {}
    for path in sorted(folder.glob(f"*{RESULT_SUFFIX}")):
        try:
            result = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise UserError(f"{path}:{error.lineno}:{error.colno} is not valid JSON: {error.msg}.") from None
        if isinstance(result, dict) and "task" in result and "n" in result:
            results[result["task"]] = result
    return results


def eval_folder(path: Path, subfolder: str = "eval") -> Path | None:
    """The folder holding results: `path/subfolder` for a run folder, `path` itself for an eval folder."""
    if (path / subfolder).is_dir() and read_results(path / subfolder):
        return path / subfolder
    if subfolder == "eval" and read_results(path):
        return path
    return None


def column_name(path: Path) -> str:
    return path.parent.name if path.name in ("eval", "eval_before", "eval_base") else path.name


def collect_columns(paths: list[Path], base: Path | None) -> list[tuple[str, dict[str, dict]]]:
    """[(column name, {task: result})]: the base first (when there is one), then every run with results."""
    columns = []
    if base is not None:
        folder = eval_folder(base)
        if folder is None:
            raise UserError(f"--base {base}: no evaluation results there (expected <task>.json files or an eval/ "
                            "subfolder; run python eval/evaluate.py --base-model ... first).")
        columns.append((f"base: {column_name(folder)}", read_results(folder)))
    runs = []
    for path in paths:
        folder = eval_folder(path)
        if folder is None:
            print(f"note: {path} skipped: no evaluation results in it.", file=sys.stderr)
            continue
        runs.append((path, folder))
    if base is None:
        for path, _ in runs:
            before = eval_folder(path, "eval_before") or eval_folder(path, "eval_base")
            if before is not None:
                columns.append((f"base: {path.name} {before.name}", read_results(before)))
                break
    columns += [(column_name(folder), read_results(folder)) for _, folder in runs]
    if not runs:
        raise UserError("no evaluation results in any of the given folders. Train with eval_tasks in the recipe, "
                        "or run python eval/evaluate.py --adapter FOLDER first.")
    return columns


def table_rows(columns: list[tuple[str, dict]], metric: str | None) -> list[tuple[str, str, list[float | None]]]:
    """[(task, metric, [value per column])] over every task any column has, in first-seen order."""
    tasks = list(dict.fromkeys(task for _, results in columns for task in results))
    rows = []
    for task in tasks:
        first = next(results[task] for _, results in columns if task in results)
        name = metric or first.get("headline_metric", "accuracy")
        values = [results.get(task, {}).get(name) for _, results in columns]
        rows.append((task, name, [value if isinstance(value, (int, float)) else None for value in values]))
    return rows


def markdown_table(columns: list[tuple[str, dict]], rows, has_base: bool) -> str:
    header = ["task", "metric", "n", *[name for name, _ in columns]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for task, metric, values in rows:
        counts = {results[task]["n"] for _, results in columns if task in results}
        cells = [task, metric, "/".join(str(n) for n in sorted(counts))]
        base_value = values[0] if has_base else None
        for index, value in enumerate(values):
            if value is None:
                cells.append("-")
            elif has_base and index > 0 and base_value is not None:
                cells.append(f"{value:.3f} ({value - base_value:+.3f})")
            else:
                cells.append(f"{value:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bar_chart(columns: list[tuple[str, dict]], rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = 0.8 / max(1, len(columns))
    figure, axis = plt.subplots(figsize=(max(6.0, 1.2 * len(rows) * len(columns) + 2), 4.5))
    for index, (name, _) in enumerate(columns):
        heights = [values[index] if values[index] is not None else 0.0 for _, _, values in rows]
        positions = [row + (index - (len(columns) - 1) / 2) * width for row in range(len(rows))]
        bars = axis.bar(positions, heights, width, label=name)
        axis.bar_label(bars, labels=[f"{h:.2f}" if v[index] is not None else "n/a"
                                     for h, (_, _, v) in zip(heights, rows, strict=True)], fontsize=7)
    axis.set_xticks(range(len(rows)), [f"{task}\n({metric})" for task, metric, _ in rows])
    if all(v is None or 0 <= v <= 1 for _, _, values in rows for v in values):
        axis.set_ylim(0, 1.1)
    axis.set_ylabel("score")
    axis.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    axis.set_title("evaluation: base vs adapters")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
