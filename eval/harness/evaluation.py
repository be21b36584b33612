"""Score a loaded model (plain or peft) on named tasks: the one entry point the CLI and the training runner share.

    from eval.harness.evaluation import evaluate_tasks
    results = evaluate_tasks(model, tokenizer, ["sentiment"], prompt_template="plain", out_dir=Path("out/eval"))

Prompts and label tokens come from lora.prompts.templates, so a model is scored on exactly the text it was trained on.
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

from eval.harness import metrics
from eval.harness.tasks import Task, TaskError, expand_task_names, infer_task, load_tasks, resolve_task
from lora.core.errors import DataError
from lora.core.provenance import library_versions
from lora.prompts import parsing
from lora.prompts.data_formats import read_scoring_rows
from lora.prompts.rows import data_file_problem, file_sha256
from lora.prompts.templates import check_template, encode_completion, encode_prompt, template_for

__all__ = [
    "MODES",
    "canonical_label",
    "choose_mode",
    "count_unparsed",
    "evaluate_tasks",
    "model_identity",
    "note",
    "prepare_tasks",
    "prompt_token_budget",
    "row_locations",
    "score_task",
    "task_targets",
    "write_task_outputs",
]

MODES = ("choice", "generate")


def note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr, flush=True)


def choose_mode(task: Task, requested: str | None) -> str:
    """The task's scoring mode: the requested one, or the task's default for None or "auto" (a recipe's eval_mode)."""
    requested = None if requested == "auto" else requested
    if requested is not None and requested not in MODES:
        raise TaskError(f'mode "{requested}" is neither "choice" nor "generate".')
    if requested == "choice" and not task.allows_choice:
        note(f'task "{task.name}" is a {task.kind} task: no fixed answer set to score, using generate mode.')
        return "generate"
    return requested or task.default_mode


def canonical_label(target: str, task: Task) -> str:
    """The task label a target row means (case and surrounding text forgiven); DataError when there is none."""
    for label in task.labels:
        if target.strip().lower() == label.lower():
            return label
    label = parsing.match_label(target, task.labels)
    if label is None:
        raise DataError(
            f'target "{target}" is not one of the labels of task "{task.name}" '
            f"({', '.join(task.labels)}). Point --data at a file of this task, or evaluate it as a new task name."
        )
    return label


class _Progress:
    """A tqdm bar over examples, or nothing."""

    def __init__(self, enabled: bool, total: int, description: str):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=description, unit="ex", file=sys.stderr, dynamic_ncols=True)

    def update(self, count: int) -> None:
        if self.bar is not None:
            self.bar.update(count)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def prompt_token_budget(model, task: Task) -> int:
    """How many prompt tokens to keep (the left end goes, as in training): the task's limit, and room in the
    model's context for the answer."""
    context = getattr(model.config, "max_position_embeddings", None) or 1_000_000
    answer_room = max(task.max_new_tokens, 32)
    return max(1, min(task.max_prompt_tokens, context - answer_room))


def model_identity(model) -> dict:
    """"model" and "adapter" for the records when the caller does not say (the runner passes a peft model)."""
    peft_config = getattr(model, "peft_config", None)
    if peft_config:
        config = next(iter(peft_config.values()))
        return {"model": config.base_model_name_or_path, "adapter": "(attached peft adapter)"}
    return {"model": getattr(model.config, "_name_or_path", None) or type(model).__name__, "adapter": None}


def count_unparsed(task: Task, raws: list[str], predictions: list) -> int:
    """Generated answers from which no answer could be read (no label, no number, no entity, nothing)."""
    if task.kind == "entities":
        return sum(not p and parsing.normalise_text(parsing.answer_text(raw)) not in parsing.NO_ENTITIES
                   for raw, p in zip(raws, predictions, strict=True))
    return sum(p is None or p == "" for p in predictions)


def score_task(model, tokenizer, task: Task, rows: list[dict], *, prompt_template: str, mode: str, batch_size: int,
               progress: bool) -> tuple[dict, list[dict]]:
    """Metrics and per-example predictions of one task on `rows` (already limited)."""
    # torch: imported only once there is a model
    from eval.harness.choices import score_row_choices
    from lora.prompts.generation import generate_greedy, padding_token_id, stop_token_ids

    keep = prompt_token_budget(model, task)
    # Chat rows' prompts are conversations, rendered with the chat template whatever the adapter's template is
    # (lora.prompts.templates.template_for): their answers end at its end of turn.
    stop_template = template_for(rows[0]["context"], prompt_template) if rows else prompt_template
    stop_ids = stop_token_ids(tokenizer, stop_template, getattr(model, "generation_config", None))
    pad_id = padding_token_id(tokenizer, stop_ids)
    bar = _Progress(progress, len(rows), f"{task.name} ({mode})")
    try:
        if mode == "choice":
            pairs = [[encode_completion(row["context"], label, prompt_template, tokenizer, close=False)
                      for label in task.labels] for row in rows]
            unclean = sum(not all(pair.clean for pair in row_pairs) for row_pairs in pairs)
            scores = score_row_choices(model, [[(pair.prompt_ids[-keep:], pair.answer_ids) for pair in row_pairs]
                                               for row_pairs in pairs],
                                       pad_id=pad_id, batch_size=batch_size, on_batch=bar.update)
            raws = [None] * len(rows)
        else:
            prompts = [encode_prompt(row["context"], prompt_template, tokenizer)[-keep:] for row in rows]
            outputs = generate_greedy(model, prompts, max_new_tokens=task.max_new_tokens, pad_id=pad_id,
                                      stop_ids=stop_ids, batch_size=batch_size, on_batch=bar.update)
            raws = [tokenizer.decode(ids, skip_special_tokens=True) for ids in outputs]
            scores = [None] * len(rows)
    finally:
        bar.close()

    records = []
    targets = task_targets(task, rows)
    if task.kind == "classification":
        if mode == "choice":
            # max() keeps the first of equal scores: ties go to the label listed first in the task
            predictions = [task.labels[max(range(len(task.labels)), key=s.__getitem__)] for s in scores]
        else:
            predictions = [parsing.parse_label(raw, task.labels) for raw in raws]
        result = metrics.classification_scores(targets, predictions, task.labels)
        result["labels"] = list(task.labels)
        correct = [t == p for t, p in zip(targets, predictions, strict=True)]
    elif task.kind == "entities":
        predictions = [parsing.parse_entities(parsing.answer_text(raw), task.entity_types) for raw in raws]
        result = metrics.entity_scores(targets, predictions)
        correct = [Counter(t) == Counter(p) for t, p in zip(targets, predictions, strict=True)]
    elif task.kind == "numeric":
        predictions = [parsing.parse_number(parsing.answer_text(raw)) for raw in raws]
        result = metrics.numeric_scores(targets, predictions, task.rel_tol, task.abs_tol)
        correct = [metrics.numbers_match(t, p, task.rel_tol, task.abs_tol)
                   for t, p in zip(targets, predictions, strict=True)]
    else:
        predictions = [parsing.normalise_text(parsing.answer_text(raw)) for raw in raws]
        result = metrics.text_scores(targets, predictions)
        correct = [t == p for t, p in zip(targets, predictions, strict=True)]

    if mode == "generate":
        result["unparsed"] = count_unparsed(task, raws, predictions)
    else:
        result["unclean_boundaries"] = unclean  # rows where a label's first token merged with the prompt's end
    for i, row in enumerate(rows):
        record = {"id": row.get("id", i), "target": row["target"], "prediction": predictions[i],
                  "raw": raws[i], "correct": bool(correct[i])}
        if scores[i] is not None:
            record["scores"] = dict(zip(task.labels, scores[i], strict=True))
        records.append(record)
    return result, records


def prepare_tasks(task_names: list[str], *, data_overrides: dict[str, str] | None = None,
                  registry: Path | str | None = None, limit: int | None = None,
                  quiet: bool = False) -> list[tuple[Task, list[dict]]]:
    """Resolve tasks, read and check their rows (first `limit`), before any model work.

    Suite names expand to their tasks. Tasks without a data file are left out with a one-line note (unless
    `quiet`); names the registry does not know but `data_overrides` gives a file for become ad-hoc tasks inferred
    from their rows.

    Raises:
        TaskError: unknown task. DataError: a file given in `data_overrides` is missing or a folder, a malformed
            row (file:line) or a target the task cannot score.
    """
    registry_tasks = load_tasks(registry)
    prepared = []
    names = expand_task_names(task_names, registry=registry, extra_names=tuple(data_overrides or {}))
    for name in names:
        task = resolve_task(name, registry_tasks, data_overrides)
        path = Path(data_overrides[name]).expanduser().resolve() if task is None else task.path
        if name in (data_overrides or {}) and data_file_problem(path):
            # A file the user named is an error; only a registry task's optional data may be absent.
            raise DataError(f'--data {name}={data_overrides[name]}: {data_file_problem(path)}.')
        if not path.is_file():
            if not quiet:
                note(f'task "{name}" skipped: no data at {path} (fetch it: python data/download.py {name}, '
                     f"or give a file: --data {name}=PATH).")
            continue
        rows = read_scoring_rows(path)  # FinLoRA rows, or chat rows as (conversation so far, last answer)
        task = task or infer_task(name, path, rows)
        rows = rows[:limit] if limit else rows
        task_targets(task, rows)  # a bad target fails now, not after minutes of scoring
        prepared.append((task, rows))
    return prepared


def row_locations(path: Path) -> list[str]:
    """"file:line" of each row load_rows returns (it skips blank lines, so row i is not always line i + 1)."""
    with path.open(encoding="utf-8") as handle:
        return [f"{path}:{number}" for number, line in enumerate(handle, start=1) if line.strip()]


def task_targets(task: Task, rows: list[dict]) -> list:
    """Targets in the form predictions take: a label, a list of (name, TYPE), a number, or normalised text."""
    if task.kind == "classification":
        labels = []
        for i, row in enumerate(rows):
            try:
                labels.append(canonical_label(row["target"], task))
            except DataError as error:
                raise DataError(f"{row_locations(task.path)[i]}: {error}") from None
        return labels
    if task.kind == "entities":
        return [parsing.parse_entities(row["target"], task.entity_types) for row in rows]
    if task.kind == "numeric":
        numbers = [parsing.parse_number(row["target"]) for row in rows]
        for i, number in enumerate(numbers):
            if number is None:
                where = row_locations(task.path)[i]
                raise DataError(f'{where}: target "{rows[i]["target"]}" of numeric task "{task.name}" holds no number.')
        return numbers
    return [parsing.normalise_text(row["target"]) for row in rows]


def evaluate_tasks(
    model,
    tokenizer,
    task_names: list[str],
    *,
    prompt_template: str,
    limit: int | None = None,
    batch_size: int = 16,
    mode: str | None = None,
    out_dir: Path | None = None,
    data_overrides: dict[str, str] | None = None,
    progress: bool = True,
    registry: Path | str | None = None,
    run_info: dict | None = None,
) -> dict[str, dict]:
    """Score an already-loaded model (a peft model or a plain one) on named tasks.

    The model is put in eval mode and every module's previous train/eval mode is restored afterwards.

    Args:
        task_names: registry task names, or any name given a file in `data_overrides`.
        prompt_template: the recipe's template ("plain", "chat" or a "{context}" format string).
        limit: score only the first N rows of each task.
        mode: "choice", "generate", or None / "auto" for each task's default (choice for classification).
        out_dir: where to write <task>.json and <task>.predictions.jsonl (nothing is written when None).
        data_overrides: {task: jsonl path} replacing (or, for new names, defining) a task's data.
        registry: a task registry other than eval/tasks.json.
        run_info: extra fields recorded in each <task>.json (e.g. {"model": ..., "adapter": ...}).

    Returns:
        {task: metrics} with at least "accuracy", "n", "mode" (and "weighted_f1"/"macro_f1" for classification).
        Tasks whose data file is absent are skipped with a one-line note and left out.

    Raises:
        TaskError: unknown task name. DataError: malformed data (file:line or file row N).
    """
    check_template(prompt_template, tokenizer)
    prepared = prepare_tasks(task_names, data_overrides=data_overrides, registry=registry, limit=limit)
    previous_modes = [(module, module.training) for module in model.modules()]
    model.eval()
    results = {}
    try:
        for task, rows in prepared:
            name, path = task.name, task.path
            task_mode = choose_mode(task, mode)
            started = time.perf_counter()
            with warnings.catch_warnings():
                # bitsandbytes 8-bit warns on every matmul that fp32 inputs are cast to fp16: expected, not news
                warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")
                result, records = score_task(model, tokenizer, task, rows, prompt_template=prompt_template,
                                             mode=task_mode, batch_size=batch_size, progress=progress)
            seconds = time.perf_counter() - started
            result = {
                "task": name, "kind": task.kind, "mode": task_mode, "n": len(rows), **result,
                "headline_metric": task.metrics[0] if task.metrics else "accuracy",
                "data": str(path), "data_sha256": file_sha256(path), "limit": limit,
                "prompt_template": prompt_template, "batch_size": batch_size,
                "seconds": round(seconds, 3), "examples_per_second": round(len(rows) / seconds, 3) if seconds else None,
                **model_identity(model), **(run_info or {}), "versions": library_versions(),
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            }
            if out_dir is not None:
                write_task_outputs(Path(out_dir), name, result, records)
            results[name] = result
    finally:
        for module, was_training in previous_modes:
            module.training = was_training
    return results


def write_task_outputs(out_dir: Path, name: str, result: dict, records: list[dict]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    with (out_dir / f"{name}.predictions.jsonl").open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
