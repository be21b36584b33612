"""The evaluation task registry: eval/tasks.json, validated against eval/harness/task_schema.json.

A task says where its test rows live, what kind of answer it expects (one label of a fixed set, an entity list, a
number, free text), which metrics to report and how long generation may run. `--data task=PATH` points a task at
another FinLoRA-format JSONL file; a name that is not in the registry then becomes an ad-hoc task whose kind is
inferred from the file (see `infer_task`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from eval.harness.metrics import METRICS, default_metrics, metric_names
from lora.core.errors import UserError, did_you_mean
from lora.core.strict_json import JSONInputError, parse_json, schema_validator

__all__ = [
    "build_task",
    "DEFAULT_MAX_NEW_TOKENS",
    "DEFAULT_METRICS",
    "DEFAULT_TASK_REGISTRY",
    "EVAL_DIR",
    "expand_task_names",
    "infer_task",
    "KINDS",
    "load_suites",
    "load_tasks",
    "MAX_INFERRED_LABEL_WORDS",
    "MAX_INFERRED_LABELS",
    "parse_data_overrides",
    "read_task_registry",
    "resolve_task",
    "Task",
    "TASK_SCHEMA_PATH",
    "TaskError",
]

EVAL_DIR = Path(__file__).resolve().parents[1]
DEFAULT_TASK_REGISTRY = EVAL_DIR / "tasks.json"
TASK_SCHEMA_PATH = Path(__file__).resolve().with_name("task_schema.json")
# Task kinds and the metrics each reports by default: read from the one table of metrics (eval/harness/metrics.py).
KINDS = tuple(METRICS)
DEFAULT_METRICS = {kind: default_metrics(kind) for kind in KINDS}
DEFAULT_MAX_NEW_TOKENS = {"classification": 16, "entities": 96, "numeric": 32, "text": 64}
# An ad-hoc task is a classification task when its targets look like a small label set.
MAX_INFERRED_LABELS = 20
MAX_INFERRED_LABEL_WORDS = 4


class TaskError(UserError):
    """An unknown task or suite, or an invalid task registry."""


@dataclass(frozen=True)
class Task:
    """One evaluation task, resolved: absolute data path, defaults filled in."""

    name: str
    kind: str
    path: Path
    labels: tuple[str, ...] = ()
    entity_types: tuple[str, ...] = ()
    metrics: tuple[str, ...] = ()
    max_new_tokens: int = 16
    max_prompt_tokens: int = 2048
    rel_tol: float = 0.01
    abs_tol: float = 1e-6
    description: str = ""
    source: dict = field(default_factory=dict)

    @property
    def allows_choice(self) -> bool:
        """Log-likelihood scoring needs a closed answer set: classification tasks only."""
        return self.kind == "classification"

    @property
    def default_mode(self) -> str:
        return "choice" if self.allows_choice else "generate"


def read_task_registry(path: Path | str | None = None) -> tuple[Path, dict]:
    """Read and validate a task registry; returns its absolute path and content.

    Raises:
        TaskError: listing every schema problem and every suite that names an unknown task.
    """
    registry_path = Path(path).expanduser().resolve() if path else DEFAULT_TASK_REGISTRY
    if not registry_path.is_file():
        raise TaskError(f"task registry {registry_path} does not exist.")
    try:  # the strict rule every user JSON input follows: no NaN, no repeated key, no runaway nesting
        registry = parse_json(registry_path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as error:
        raise TaskError(f"task registry {registry_path}: byte {error.start} is not UTF-8 (save it as UTF-8).") from None
    except JSONInputError as error:
        where = f"{registry_path}:{error.line}:{error.column}"
        raise TaskError(f"task registry {where}: {error.message}.") from None
    schema = json.loads(TASK_SCHEMA_PATH.read_text())
    validator = schema_validator(schema)  # integers are integers: max_new_tokens 1e2 is a float, refused
    problems = [
        f"{'.'.join(str(p) for p in error.absolute_path) or '(top level)'}: {error.message}"
        for error in sorted(validator.iter_errors(registry), key=lambda e: list(map(str, e.absolute_path)))
    ]
    if not problems:
        problems += _consistency_problems(registry)
    if problems:
        raise TaskError(f"task registry {registry_path} is invalid:\n  - " + "\n  - ".join(problems))
    return registry_path, registry


def _consistency_problems(registry: dict) -> list[str]:
    """What the schema cannot say: labels belong to classification tasks, suites name known tasks."""
    problems = []
    for name, spec in registry["tasks"].items():
        kind = spec["kind"]
        if kind == "classification" and "labels" not in spec:
            problems.append(f'tasks.{name}: a classification task needs "labels"')
        if kind != "classification" and "labels" in spec:
            problems.append(f'tasks.{name}: "labels" only applies to classification tasks (kind is "{kind}")')
        if kind != "entities" and "entity_types" in spec:
            problems.append(f'tasks.{name}: "entity_types" only applies to entities tasks (kind is "{kind}")')
        if kind != "numeric" and ({"rel_tol", "abs_tol"} & set(spec)):
            problems.append(f'tasks.{name}: "rel_tol"/"abs_tol" only apply to numeric tasks (kind is "{kind}")')
        for metric in spec.get("metrics", []):
            if metric not in metric_names(kind):
                problems.append(f'tasks.{name}: metric "{metric}" does not apply to {kind} tasks')
    for suite, members in registry["suites"].items():
        if suite in registry["tasks"]:
            problems.append(f'suites.{suite}: a suite may not share its name with a task')
        for member in members:
            if member not in registry["tasks"]:
                problems.append(f'suites.{suite}: unknown task "{member}"{did_you_mean(member, registry["tasks"])}')
    return problems


def build_task(name: str, spec: dict, base_dir: Path) -> Task:
    kind = spec["kind"]
    return Task(
        name=name,
        kind=kind,
        path=(base_dir / spec["path"]).resolve(),
        labels=tuple(spec.get("labels", ())),
        entity_types=tuple(spec.get("entity_types", ())),
        metrics=tuple(spec.get("metrics", DEFAULT_METRICS[kind])),
        max_new_tokens=spec.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS[kind]),
        max_prompt_tokens=spec.get("max_prompt_tokens", 2048),
        rel_tol=spec.get("rel_tol", 0.01),
        abs_tol=spec.get("abs_tol", 1e-6),
        description=spec.get("description", ""),
        source=spec.get("source", {}),
    )


def load_tasks(registry: Path | str | None = None) -> dict[str, Task]:
    """Every task of a registry, by name."""
    registry_path, content = read_task_registry(registry)
    return {name: build_task(name, spec, registry_path.parent) for name, spec in content["tasks"].items()}


def load_suites(registry: Path | str | None = None) -> dict[str, list[str]]:
    return read_task_registry(registry)[1]["suites"]


def infer_task(name: str, path: Path, rows: list[dict]) -> Task:
    """An ad-hoc task for a file outside the registry: classification when the targets form a small label set
    (at most 20 distinct values of at most 4 words, each seen at least twice, labels sorted for a fixed order),
    numeric when every target is a number, else exact-match text."""
    from lora.prompts.parsing import parse_number

    targets = [row["target"].strip() for row in rows]
    distinct = sorted(set(targets))
    repeated = len(rows) >= 2 * len(distinct)
    if 2 <= len(distinct) <= MAX_INFERRED_LABELS and repeated and all(
        len(t.split()) <= MAX_INFERRED_LABEL_WORDS for t in distinct
    ):
        return Task(name=name, kind="classification", path=path, labels=tuple(distinct),
                    metrics=DEFAULT_METRICS["classification"], description=f"ad-hoc task from {path}")
    if all(parse_number(t) is not None and len(t.split()) == 1 for t in targets):
        return Task(name=name, kind="numeric", path=path, metrics=DEFAULT_METRICS["numeric"],
                    max_new_tokens=DEFAULT_MAX_NEW_TOKENS["numeric"], description=f"ad-hoc task from {path}")
    return Task(name=name, kind="text", path=path, metrics=DEFAULT_METRICS["text"],
                max_new_tokens=DEFAULT_MAX_NEW_TOKENS["text"], description=f"ad-hoc task from {path}")


def expand_task_names(names: list[str], suites: list[str] | None = None, registry: Path | str | None = None,
                      extra_names: tuple[str, ...] = ()) -> list[str]:
    """Task names from `--tasks` plus the members of `--suite`s, deduplicated in order.

    Raises:
        TaskError: for an unknown task or suite, naming the closest one. `extra_names` (tasks given a file
            with --data) are accepted even when the registry does not know them.
    """
    registry_path, content = read_task_registry(registry)
    known_tasks, known_suites = content["tasks"], content["suites"]
    result: list[str] = []
    for suite in suites or []:
        if suite not in known_suites:
            hint = did_you_mean(suite, list(known_suites) + list(known_tasks))
            raise TaskError(f'unknown suite "{suite}"{hint}; suites in {registry_path}: {", ".join(known_suites)}.')
        result += known_suites[suite]
    for name in names:
        if name in known_suites and name not in known_tasks:
            result += known_suites[name]  # `--tasks bundled` is forgiving: a suite name expands
        elif name in known_tasks or name in extra_names:
            result.append(name)
        else:
            hint = did_you_mean(name, list(known_tasks) + list(known_suites))
            raise TaskError(
                f'unknown task "{name}"{hint}. Known tasks: {", ".join(known_tasks)}; suites: '
                f'{", ".join(known_suites)}. To evaluate another FinLoRA-format file use --data {name}=PATH.'
            )
    return list(dict.fromkeys(result))


def resolve_task(name: str, tasks: dict[str, Task], data_overrides: dict[str, str] | None = None) -> Task | None:
    """The registry task with its data path replaced by `--data name=PATH` when given; None for a name the
    registry does not know but `--data` gives a file for (the caller infers that task from its rows).

    Raises:
        TaskError: for a name neither the registry nor `--data` knows, naming the closest task.
    """
    override = (data_overrides or {}).get(name)
    if name in tasks:
        task = tasks[name]
        return replace(task, path=Path(override).expanduser().resolve()) if override else task
    if override:
        return None
    hint = did_you_mean(name, tasks)
    raise TaskError(
        f'unknown task "{name}"{hint}. Known tasks: {", ".join(tasks)}. '
        f"To evaluate another FinLoRA-format file use --data {name}=PATH."
    )


def parse_data_overrides(assignments: list[str]) -> dict[str, str]:
    """`--data task=PATH` flags -> {task: PATH}."""
    overrides = {}
    for assignment in assignments:
        name, sep, path = assignment.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise TaskError(f'--data "{assignment}": expected TASK=PATH, e.g. --data fpb=data/test/fpb_test.jsonl')
        overrides[name.strip()] = path.strip()
    return overrides
