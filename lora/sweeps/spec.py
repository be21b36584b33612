"""A sweep as data: read a sweeps file (sweeps.json beside the registry), validate it against sweep_schema.json and
against the registry, the evaluation tasks and the data it names, and report every problem at once.

A sweep names a base recipe, the fields every trial sets (`set`), a search space over recipe fields, an objective
scored on a validation set (never a task's test file), the number of trials, a compute budget, a sampler and a
pruner. Nothing here imports torch or Optuna: `--dry-run` and `--list` answer at once.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema

from lora.core.errors import RecipeError, UserError, did_you_mean
from lora.recipes.outputs import outputs_root
from lora.recipes.registry import (
    EVAL_TASKS_PATH,
    RECIPE_NAME_PATTERN,
    REPO_ROOT,
    load_schema,
    read_registry,
    recipe_as_written,
    resolve_recipe,
    runnable_names,
)

__all__ = [
    "DEFAULT_SWEEPS",
    "list_sweeps",
    "load_sweep",
    "Objective",
    "Parameter",
    "SCHEMA_PATH",
    "Sweep",
    "SweepError",
    "VALIDATION_LOSS",
]

DEFAULT_SWEEPS = REPO_ROOT / "sweeps.json"
SCHEMA_PATH = Path(__file__).resolve().parent / "sweep_schema.json"
VALIDATION_LOSS = "validation_loss"
PRUNER_FIELDS = {"none": set(), "median": {"n_startup_trials", "n_warmup_steps"},
                 "successive_halving": {"min_resource", "reduction_factor"}}


class SweepError(UserError):
    """A sweeps file or one of its sweeps is invalid, or a sweep name is unknown."""


@dataclass(frozen=True)
class Parameter:
    """One dimension of the search space: a recipe field and the values it may take."""

    name: str
    type: str  # categorical | int | float
    choices: tuple = ()
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False
    grid: tuple = ()

    def grid_points(self) -> list:
        """The values this dimension takes under the grid sampler."""
        if self.type == "categorical":
            return list(self.choices)
        if self.grid:
            return [int(v) if self.type == "int" else float(v) for v in self.grid]
        step = int(self.step or 1)
        return list(range(int(self.low), int(self.high) + 1, step))

    def extremes(self) -> list:
        """Values that show whether the recipe accepts this dimension: every choice, or both ends."""
        if self.type == "categorical":
            return list(self.choices)
        cast = int if self.type == "int" else float
        return [cast(self.low), cast(self.high), *(cast(v) for v in self.grid)]


@dataclass(frozen=True)
class Objective:
    metric: str
    direction: str
    task: str | None
    validation: dict  # {"split": x} or {"path": absolute path}; {} = the base recipe's own
    report_every_steps: int

    @property
    def is_loss(self) -> bool:
        return self.metric == VALIDATION_LOSS

    @property
    def label(self) -> str:
        return self.metric if self.is_loss else f"{self.task}.{self.metric}"


@dataclass
class Sweep:
    """A validated sweep, with its base recipe resolved once (the settings every trial starts from)."""

    name: str
    path: Path  # the sweeps file
    registry_path: Path
    recipe: str
    set: dict[str, Any]
    space: dict[str, Parameter]
    objective: Objective
    trials: int | None
    budget: dict[str, Any]
    sampler: dict[str, Any]
    pruner: dict[str, Any]
    workers: dict[str, Any]
    definition: dict[str, Any] = field(default_factory=dict)  # the sweep as written, for the study's record

    def fixed_fields(self) -> dict[str, Any]:
        """What every trial sets on the base recipe before its own parameters: `set`, the objective's validation
        set, and for a validation-loss objective the evaluation cadence the pruner needs."""
        fixed = dict(self.set)
        if "split" in self.objective.validation:
            fixed["validation_split"] = self.objective.validation["split"]
        elif "path" in self.objective.validation:
            fixed["validation_path"] = self.objective.validation["path"]
        if self.objective.is_loss:
            fixed["eval_steps"] = self.objective.report_every_steps
        return fixed

    def trial_fields(self, params: dict[str, Any]) -> dict[str, Any]:
        """The recipe fields one trial sets on the base recipe (what `--set` reproduces)."""
        return {**self.fixed_fields(), **params}

    def resolve_trial(self, params: dict[str, Any]):
        """The trial's resolved recipe (lora.recipes.registry.Recipe)."""
        return resolve_recipe(self.recipe, self.registry_path, override_strings(self.trial_fields(params)))

    def max_steps_per_trial(self) -> int | None:
        """The most training steps one trial can take, when the recipe counts steps (max_steps > 0)."""
        if "max_steps" in self.space:
            return int(max(self.space["max_steps"].extremes()))
        steps = self.resolve_trial({}).get("max_steps")
        return steps if steps and steps > 0 else None

    def grid_size(self) -> int:
        return math.prod(len(p.grid_points()) for p in self.space.values())

    def target_trials(self) -> int:
        """Trials the study runs in all: `trials`, at most the grid's size under the grid sampler."""
        if self.sampler["type"] == "grid":
            return min(self.trials or self.grid_size(), self.grid_size())
        return self.trials

    def fingerprint(self) -> str:
        """A hash of what decides the trials (not descriptions): a continued study must be the same search. The base
        recipe counts by its fields, not by where its registry lies, so that workers whose checkouts are in different
        folders (several machines sharing one --storage) join the same study."""
        keyed = {key: self.definition.get(key) for key in ("recipe", "set", "space", "objective", "sampler", "pruner")}
        keyed["base_recipe"] = recipe_as_written(self.registry_path, self.recipe)
        return hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:16]

    def default_output_dir(self) -> Path:
        return outputs_root(self.registry_path) / "sweeps" / self.name


def override_strings(fields: dict[str, Any]) -> list[str]:
    """Recipe fields as `--set key=JSON` assignments (lora.recipes.registry.parse_override reads them back)."""
    return [f"{key}={json.dumps(value)}" for key, value in fields.items()]


def read_sweeps(path: Path | str | None) -> tuple[Path, dict[str, dict]]:
    sweeps_path = Path(path).expanduser().resolve() if path else DEFAULT_SWEEPS
    if not sweeps_path.is_file():
        raise SweepError(f"sweeps file {sweeps_path} does not exist (expected a JSON object of named sweeps; "
                         f"see {DEFAULT_SWEEPS.name} at the repository root).")
    try:
        raw = json.loads(sweeps_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise SweepError(f"sweeps file {sweeps_path}:{error.lineno}:{error.colno} is not valid JSON: "
                         f"{error.msg}.") from None
    if not isinstance(raw, dict):
        raise SweepError(f"sweeps file {sweeps_path} must be a JSON object mapping sweep names to objects.")
    return sweeps_path, {name: spec for name, spec in raw.items() if not name.startswith("$")}


def list_sweeps(path: Path | str | None = None) -> list[dict[str, str]]:
    """One row per sweep of a sweeps file for `--list`: name, base recipe, sampler, pruner, trials."""
    _, raw = read_sweeps(path)
    rows = []
    for name, spec in raw.items():
        spec = spec if isinstance(spec, dict) else {}
        rows.append({"name": name, "recipe": str(spec.get("recipe", "")),
                     "sampler": str((spec.get("sampler") or {}).get("type", "tpe")),
                     "pruner": str((spec.get("pruner") or {}).get("type", "none")),
                     "trials": str(spec.get("trials") or "grid"),
                     "space": ", ".join(spec.get("space") or {})})
    return rows


def _schema_problem(error: jsonschema.ValidationError) -> str:
    path = ".".join(str(part) for part in error.absolute_path)
    where = f'field "{path}"' if path else "the sweep"
    if error.validator == "additionalProperties":
        known = list(error.schema.get("properties", {}))
        unknown = sorted(set(error.instance) - set(known))
        prefix = f"{path}." if path else ""
        return "; ".join(f'unknown field "{prefix}{key}"{did_you_mean(key, known)} (known: {", ".join(known)})'
                         for key in unknown)
    if error.validator == "required":
        missing = error.message.split("'")[1]
        described = error.schema.get("properties", {}).get(missing, {}).get("description", "")
        if not described and missing in ("metric", "direction"):
            described = {"metric": "validation_loss or a task metric", "direction": "maximize or minimize"}[missing]
        prefix = f"{path}." if path else ""
        return f'field "{prefix}{missing}" is required' + (f" — {described}" if described else "")
    if error.validator == "enum":
        allowed = error.validator_value
        nearest = did_you_mean(str(error.instance), [str(v) for v in allowed])
        return (f"{where}: {json.dumps(error.instance)} is not allowed (allowed: "
                f"{', '.join(json.dumps(v) for v in allowed)}){nearest}")
    hint = ""
    if error.validator in ("minimum", "maximum"):
        hint = f" (nearest valid value: {error.validator_value})"
    described = error.schema.get("description", "")
    message = f"{where}: {error.message}{hint}"
    return message + (f" — expected: {described}" if described and error.validator == "type" else "")


def _parameter_problems(name: str, spec: dict, sampler: str) -> list[str]:
    where = f'field "space.{name}"'

    def at(key: str) -> str:
        return f'field "space.{name}.{key}"'

    kind = spec.get("type")
    problems = []
    if kind == "categorical":
        if "choices" not in spec:
            problems.append(f'{where}: a categorical parameter needs "choices" (a list of values)')
        problems += [f'{where}: "{key}" applies to int/float parameters, not categorical (drop it)'
                     for key in ("low", "high", "step", "log", "grid") if key in spec]
        return problems
    if "choices" in spec:
        problems.append(f'{where}: "choices" applies to categorical parameters (set "type": "categorical", or give '
                        '"low" and "high")')
    for key in ("low", "high"):
        if key not in spec:
            problems.append(f'{where}: a {kind} parameter needs "{key}"')
    low, high = spec.get("low"), spec.get("high")
    if kind == "int":
        for key in ("low", "high", "step"):
            value = spec.get(key)
            if value is not None and not float(value).is_integer():
                problems.append(f'{at(key)}: {value} is not a whole number (an int parameter; nearest: '
                                f"{round(value)})")
    if low is not None and high is not None and low > high:
        problems.append(f'{where}: low {low} is above high {high} (swap them)')
    if spec.get("log"):
        if low is not None and low <= 0:
            problems.append(f'{at("low")}: {low} on a log scale must be > 0 (e.g. {high / 1000 if high else 1e-5})')
        if "step" in spec:
            problems.append(f'{where}: "step" and "log" cannot be combined (Optuna samples a log scale '
                            "continuously; drop one)")
    for point in spec.get("grid", []):
        if low is not None and high is not None and not low <= point <= high:
            problems.append(f'{at("grid")}: {point} is outside low..high ({low}..{high})')
    if sampler == "grid" and kind == "float" and not spec.get("grid"):
        problems.append(f'{where}: the grid sampler needs the points of a float parameter: add "grid": [...] '
                        f"(e.g. [{low}, {high}])")
    return problems


def _objective_problems(objective: dict, sweeps_dir: Path) -> tuple[list[str], dict]:
    """Problems of the objective, and its validation set with a file resolved to an absolute path."""
    from lora.prompts.rows import data_file_problem, file_sha256

    problems = []
    metric, task = objective.get("metric"), objective.get("task")
    tasks = _task_registry()
    if metric == VALIDATION_LOSS:
        if task is not None:
            problems.append('field "objective.task": validation_loss needs no task (drop it, or name a task metric '
                            "such as accuracy)")
        if objective.get("direction") == "maximize":
            problems.append('field "objective.direction": a loss is minimised (set "minimize")')
    elif task is None:
        problems.append(f'field "objective.task" is required for metric "{metric}" (a task of eval/tasks.json, e.g. '
                        f'"sentiment"), or use metric "{VALIDATION_LOSS}"')
    elif task not in tasks:
        problems.append(f'field "objective.task": unknown task "{task}"{did_you_mean(task, tasks)} (tasks are defined '
                        f"in {EVAL_TASKS_PATH.relative_to(REPO_ROOT)})")
    else:
        metrics = tasks[task].get("metrics") or ["accuracy"]
        if metric not in metrics:
            problems.append(f'field "objective.metric": task "{task}" has no metric "{metric}" (its metrics: '
                            f'{", ".join(metrics)}; or "{VALIDATION_LOSS}"){did_you_mean(metric, metrics)}')
    validation = dict(objective.get("validation") or {})
    if "path" in validation:
        given = validation["path"]
        path = (sweeps_dir / Path(given).expanduser()).resolve()
        problem = data_file_problem(path)
        if problem:
            problems.append(f'field "objective.validation.path": {problem}')
        else:
            for name, spec in tasks.items():
                test_path = (EVAL_TASKS_PATH.parent / spec.get("path", "")).resolve()
                if test_path == path or (test_path.is_file() and file_sha256(test_path) == file_sha256(path)):
                    problems.append(f'field "objective.validation.path": {given} is the test file of task "{name}"; '
                                    "a sweep never chooses on the data results are reported on. Use a validation "
                                    'file or "split": 0.2 (rows held out of the training set)')
                    break
        validation["path"] = str(path)
    return problems, validation


def _task_registry() -> dict[str, dict]:
    try:
        return json.loads(EVAL_TASKS_PATH.read_text())["tasks"]
    except (OSError, ValueError, KeyError):
        return {}


def _recipe_problems(sweep_spec: dict, registry_path: Path, raw_registry: dict, space: dict[str, Parameter],
                     fixed: dict[str, Any]) -> list[str]:
    """Whether the base recipe resolves with `set`, and with every parameter's values; each problem names its
    sweep field."""
    recipe_name = sweep_spec["recipe"]
    names = runnable_names(raw_registry)
    if recipe_name not in names:
        return [f'field "recipe": no runnable recipe named "{recipe_name}" in {registry_path}'
                f"{did_you_mean(recipe_name, names)}"]
    problems = []
    try:
        resolve_recipe(recipe_name, registry_path, override_strings(fixed))
    except RecipeError as error:
        return [f'field "set" (with the base recipe and objective): {line.strip()[2:]}'
                for line in str(error).splitlines()[1:]] or [f'field "set": {error}']
    fields = load_schema()["properties"]
    for name, parameter in space.items():
        if name not in fields or name == "extends":
            problems.append(f'field "space.{name}": no recipe field "{name}"{did_you_mean(name, list(fields))}')
            continue
        if name in fixed:
            problems.append(f'field "space.{name}": also fixed by "set" (a field is searched or set, not both)')
            continue
        for value in parameter.extremes():
            try:
                resolve_recipe(recipe_name, registry_path, override_strings({**fixed, name: value}))
            except RecipeError as error:
                detail = "; ".join(line.strip()[2:] for line in str(error).splitlines()[1:])
                problems.append(f'field "space.{name}": the value {json.dumps(value)} makes the recipe invalid: '
                                f"{detail}")
                break
    return problems


def load_sweep(name: str, sweeps: Path | str | None = None, registry: Path | str | None = None) -> Sweep:
    """Read, validate and resolve one sweep of a sweeps file.

    Args:
        name: the sweep's name in the file.
        sweeps: the sweeps file (default: sweeps.json at the repository root).
        registry: the recipe registry (default: finetune_configs.json beside the sweeps file).

    Raises:
        SweepError: listing every problem, each naming the sweep's field, what was expected and the nearest
            valid name or value.
    """
    sweeps_path, raw = read_sweeps(sweeps)
    if name not in raw:
        raise SweepError(f'no sweep named "{name}" in {sweeps_path}{did_you_mean(name, raw)}. Known sweeps: '
                         f"{', '.join(raw) or '(none)'}. `python lora/sweep.py --list` shows them.")
    if not (len(name) <= 100 and RECIPE_NAME_PATTERN.fullmatch(name)):
        raise SweepError(f'sweeps file {sweeps_path}: sweep name {json.dumps(name)} is not a plain name (its trials '
                         'go to outputs/sweeps/<name>/): use letters, digits, "_" and "-", with "." only inside.')
    spec = raw[name]
    schema = json.loads(SCHEMA_PATH.read_text())
    validator = jsonschema.Draft202012Validator({**schema["$defs"]["sweep"], "$defs": schema["$defs"]})
    problems = [_schema_problem(error)
                for error in sorted(validator.iter_errors(spec), key=lambda e: [str(p) for p in e.absolute_path])]
    default_registry = sweeps_path.parent / "finetune_configs.json"
    if not problems:
        sampler = {"seed": 0, "n_startup_trials": 5, **spec.get("sampler", {"type": "tpe"})}
        pruner = {"type": "none", **spec.get("pruner", {})}
        objective_spec = {"report_every_steps": 10, **spec["objective"]}
        for param_name, param_spec in spec["space"].items():
            problems += _parameter_problems(param_name, param_spec, sampler["type"])
        problems += [f'field "pruner.{key}" does not apply to the {pruner["type"]} pruner (drop it)'
                     for key in sorted(set(pruner) - {"type"} - PRUNER_FIELDS[pruner["type"]])]
        if sampler["type"] == "grid" and "n_startup_trials" in spec.get("sampler", {}):
            problems.append('field "sampler.n_startup_trials" applies to the tpe sampler only (drop it)')
        if sampler["type"] == "tpe" and not spec.get("trials"):
            problems.append('field "trials" is required with the tpe sampler (how many trials to run, e.g. 12)')
        objective_problems, validation = _objective_problems(objective_spec, sweeps_path.parent)
        problems += objective_problems
        space = {key: Parameter(name=key, type=value["type"], choices=tuple(value.get("choices", ())),
                                low=value.get("low"), high=value.get("high"), step=value.get("step"),
                                log=value.get("log", False), grid=tuple(value.get("grid", ())))
                 for key, value in spec["space"].items()}
        objective = Objective(metric=objective_spec["metric"], direction=objective_spec["direction"],
                              task=objective_spec.get("task"), validation=validation,
                              report_every_steps=objective_spec["report_every_steps"])
        if not problems:
            try:
                registry_path, raw_registry = read_registry(registry or default_registry)
            except RecipeError as error:
                raise SweepError(f'sweep "{name}" in {sweeps_path}: {error}') from None
            sweep = Sweep(name=name, path=sweeps_path, registry_path=registry_path, recipe=spec["recipe"],
                          set=dict(spec.get("set", {})), space=space, objective=objective,
                          trials=spec.get("trials"), budget={"total_steps": None, "timeout_minutes": None,
                                                             **spec.get("budget", {})},
                          sampler=sampler, pruner=pruner,
                          workers={"heartbeat_seconds": 10, "grace_seconds": 60, "max_retry": 2,
                                   **spec.get("workers", {})},
                          definition=spec)
            problems += _recipe_problems(spec, registry_path, raw_registry, space, sweep.fixed_fields())
            if not problems:
                problems += _resolved_problems(sweep)
            if not problems:
                return sweep
    listing = "\n".join(f"  - {problem}" for problem in problems)
    raise SweepError(f'sweep "{name}" in {sweeps_path} has {len(problems)} problem(s):\n{listing}')


def _resolved_problems(sweep: Sweep) -> list[str]:
    """Checks that need the base recipe resolved: a validation set, an SFT recipe, steps for a step budget."""
    recipe = sweep.resolve_trial({})
    problems = []
    if recipe["trainer"] != "sft":
        problems.append(f'field "recipe": "{sweep.recipe}" is a {recipe["trainer"]} recipe; sweeps run sft recipes '
                        "(their objective is scored on a validation set)")
    if not recipe["validation_path"] and not recipe["validation_split"]:
        problems.append('field "objective.validation": the objective needs a validation set and the base recipe has '
                        'none: add "validation": {"split": 0.2} (rows held out of the training set) or '
                        '{"path": "FILE.jsonl"}')
    if sweep.budget["total_steps"] and sweep.max_steps_per_trial() is None:
        problems.append('field "budget.total_steps": the trials count epochs, not steps; set a positive max_steps '
                        '(e.g. "set": {"max_steps": 30}) or drop total_steps')
    return problems
