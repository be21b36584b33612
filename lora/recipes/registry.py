"""The recipe registry: load `finetune_configs.json`, resolve `extends` and FinLoRA aliases, apply overrides,
validate against `recipe_schema.json`, and report every problem at once.

A registry is a JSON object of named recipes. Names starting with "_" are shared bases: they may be incomplete,
are not listed and cannot be run, and exist to be `extends`-ed. Relative paths inside a registry resolve against
the registry file's folder, never the working directory.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema

from lora.core.compute_dtype import resolve_auto_dtypes
from lora.core.errors import RecipeError, closest, did_you_mean
from lora.recipes.trainers import trainer_problems

__all__ = [
    "ALIASES",
    "check_recipe_name",
    "DEFAULT_REGISTRY",
    "EIGHT_BIT_FIELDS",
    "EVAL_TASKS_PATH",
    "format_recipe_table",
    "FOUR_BIT_FIELDS",
    "list_recipes",
    "load_schema",
    "MAX_RECIPE_NAME_LENGTH",
    "parse_override",
    "PATH_FIELDS",
    "read_registry",
    "Recipe",
    "RECIPE_NAME_PATTERN",
    "REPO_ROOT",
    "resolve_recipe",
    "runnable_names",
    "SCHEMA_PATH",
]

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_REGISTRY = REPO_ROOT / "finetune_configs.json"
SCHEMA_PATH = Path(__file__).resolve().parent / "recipe_schema.json"
EVAL_TASKS_PATH = REPO_ROOT / "eval" / "tasks.json"
# FinLoRA's spellings -> ours. Everything else FinLoRA uses (base_model, dataset_path, lora_r, lora_alpha,
# quant_bits, learning_rate, num_epochs, batch_size, gradient_accumulation_steps) already has our name.
ALIASES = {
    "peft_use_dora": "use_dora",
    "peft_use_rslora": "use_rslora",
}
PATH_FIELDS = ("dataset_path", "validation_path", "init_adapter")
FOUR_BIT_FIELDS = ("bnb_4bit_quant_type", "bnb_4bit_use_double_quant", "bnb_4bit_compute_dtype")
EIGHT_BIT_FIELDS = ("llm_int8_threshold",)
# A recipe name becomes a folder name (outputs/<recipe>/): letters, digits, "_" and "-", with "." only inside,
# so that no name is a path ("/", "..", an absolute path) nor a hidden folder (the runner's own temporary ones).
RECIPE_NAME_PATTERN = re.compile(r"[A-Za-z0-9_-]([A-Za-z0-9_.-]*[A-Za-z0-9_-])?")
MAX_RECIPE_NAME_LENGTH = 128


def load_schema() -> dict:
    return json.loads(SCHEMA_PATH.read_text())


@dataclass
class Recipe:
    """A resolved, validated recipe: every schema field present (defaults filled), aliases renamed, paths absolute."""

    name: str
    fields: dict[str, Any]
    registry_path: Path
    overrides: dict[str, Any] = field(default_factory=dict)
    spellings: dict[str, str] = field(default_factory=dict)  # our field name -> the FinLoRA alias the user wrote
    auto_dtypes: dict[str, dict[str, str]] = field(default_factory=dict)  # "auto" fields: value chosen and why

    def field_name(self, key: str) -> str:
        """The field as the user wrote it (`peft_use_dora` for use_dora when the recipe used FinLoRA's alias)."""
        return self.spellings.get(key, key)

    def __getitem__(self, key: str) -> Any:
        return self.fields[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)

    @property
    def quantised(self) -> bool:
        return self.fields["quant_bits"] in (4, 8)

    def to_record(self) -> dict[str, Any]:
        """The JSON written to recipe.json: the resolved fields plus where they came from."""
        return {"name": self.name, "registry": str(self.registry_path), "overrides": self.overrides,
                "auto_dtypes": self.auto_dtypes, **self.fields}


def read_registry(path: Path | str | None = None) -> tuple[Path, dict[str, dict]]:
    """Read a registry file; returns its absolute path and the raw recipes."""
    registry_path = Path(path).expanduser().resolve() if path else DEFAULT_REGISTRY
    if not registry_path.is_file():
        raise RecipeError(f"registry file {registry_path} does not exist (expected a JSON object of named recipes).")
    try:
        raw = json.loads(registry_path.read_text())
    except json.JSONDecodeError as error:
        raise RecipeError(
            f"registry {registry_path}:{error.lineno}:{error.colno} is not valid JSON: {error.msg}."
        ) from None
    if not isinstance(raw, dict) or not all(isinstance(v, dict) for v in raw.values()):
        raise RecipeError(f"registry {registry_path} must be a JSON object mapping recipe names to objects.")
    for name in raw:
        check_recipe_name(name, registry_path)
    return registry_path, raw


def check_recipe_name(name: str, registry_path: Path) -> None:
    """Raise unless `name` is a plain name that can only ever mean the folder outputs/<name>/.

    Raises:
        RecipeError: naming the recipe, the rule and the nearest plain name.
    """
    if len(name) <= MAX_RECIPE_NAME_LENGTH and RECIPE_NAME_PATTERN.fullmatch(name):
        return
    nearest = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._-")[:MAX_RECIPE_NAME_LENGTH] or "my_recipe"
    raise RecipeError(
        f"registry {registry_path}: recipe name {json.dumps(name)} is not a plain name (its adapter is written to "
        f"outputs/<name>/): use letters, digits, \"_\" and \"-\", with \".\" only inside, at most "
        f"{MAX_RECIPE_NAME_LENGTH} characters; nearest: {json.dumps(nearest)}."
    )


def runnable_names(raw_registry: dict[str, dict]) -> list[str]:
    return [name for name in raw_registry if not name.startswith("_")]


def _rename_aliases(fields: dict[str, Any], problems: list[str], spellings: dict[str, str]) -> dict[str, Any]:
    """FinLoRA's field names -> ours. `spellings` records, per renamed field, the name the user wrote, so that
    messages can name `peft_use_dora` rather than a `use_dora` the user never typed; a later layer (a more
    specific recipe, an override) that uses our own name takes the spelling back."""
    renamed = {}
    for key, value in fields.items():
        target = ALIASES.get(key, key)
        if target != key and target in fields:
            problems.append(f'field "{key}" is FinLoRA\'s name for "{target}": give only one of them')
            continue
        if target != key:
            spellings[target] = key
        else:
            spellings.pop(key, None)
        renamed[target] = value
    return renamed


def _recipe_layers(
    name: str, raw_registry: dict[str, dict], problems: list[str], spellings: dict[str, str]
) -> list[dict[str, Any]]:
    """The recipe and its `extends` chain as field layers, most general first (aliases renamed in each)."""
    chain, current = [], name
    while current is not None:
        if current in chain:
            problems.append(f'"extends" forms a cycle: {" -> ".join(chain + [current])}')
            break
        if current not in raw_registry:
            problems.append(
                f'field "extends": no recipe named "{current}" in the registry{did_you_mean(current, raw_registry)}'
            )
            break
        chain.append(current)
        parent = raw_registry[current].get("extends")
        current = parent if isinstance(parent, str) else None
    layers = [_rename_aliases(copy.deepcopy(raw_registry[link]), problems, spellings) for link in reversed(chain)]
    for layer in layers[:-1]:
        layer.pop("extends", None)  # only the recipe's own `extends` is kept in the record
    return layers


def _fields_set_with_quant_bits(layers: list[dict[str, Any]]) -> set[str]:
    """Fields set in the layer that chose quant_bits or in a more specific one.

    A recipe that extends a 4-bit recipe and sets quant_bits 8 inherits 4-bit options that simply no longer
    apply; setting a 4-bit option next to (or after) quant_bits 8 is a real conflict.
    """
    start = max((i for i, layer in enumerate(layers) if "quant_bits" in layer), default=0)
    return set().union(*layers[start:]) if layers else set()


def _describe_schema_error(error: jsonschema.ValidationError, schema: dict, spellings: dict[str, str]) -> str:
    # A value of the right shape for one branch of a oneOf (e.g. a misspelt name for report_to) is best described
    # by that branch's own complaint, which carries the allowed names and the nearest one.
    if error.validator == "oneOf" and error.context:
        mistyped = {sub.relative_schema_path[0] for sub in error.context if sub.validator == "type"}
        shaped = [sub for sub in error.context if sub.relative_schema_path[0] not in mistyped]
        if shaped:
            return _describe_schema_error(max(shaped, key=lambda sub: len(sub.absolute_path)), schema, spellings)
    path = [str(part) for part in error.absolute_path]
    location = ".".join([spellings.get(path[0], path[0]), *path[1:]] if path else [])
    if error.validator == "additionalProperties":
        known = list(schema["properties"]) + list(ALIASES)
        unknown = sorted(set(error.instance) - set(schema["properties"]))
        return "; ".join(f'unknown field "{key}"{did_you_mean(key, known)}' for key in unknown)
    if error.validator == "required":
        missing = error.message.split("'")[1]
        return f'field "{missing}" is required — {schema["properties"][missing]["description"]}'
    field_schema = schema["properties"].get(str(error.absolute_path[0]), {}) if error.absolute_path else {}
    expected = field_schema.get("description", "")
    hint = ""
    if error.validator == "enum":
        hint = f" (allowed: {', '.join(json.dumps(v) for v in error.validator_value)}"
        suggestion = _nearest_allowed(error.instance, error.validator_value)
        hint += f"; nearest: {json.dumps(suggestion)})" if suggestion is not None else ")"
    elif error.validator in ("minimum", "maximum"):
        hint = f" (nearest valid value: {error.validator_value})"
    elif error.validator in ("exclusiveMinimum", "exclusiveMaximum"):
        side = ">" if error.validator == "exclusiveMinimum" else "<"
        hint = f" (expected a value {side} {error.validator_value})"
    text = f"{json.dumps(error.instance)} is not allowed" if error.validator == "enum" else error.message
    message = f'field "{location}": {text}{hint}'
    if expected and error.validator in ("type", "oneOf", "minLength"):
        message += f" — expected: {expected}"
    return message


def _nearest_allowed(value: Any, allowed: list[Any]) -> Any:
    numbers = [v for v in allowed if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if isinstance(value, (int, float)) and not isinstance(value, bool) and numbers:
        return min(numbers, key=lambda v: abs(v - value))
    match = closest(str(value), [str(v) for v in allowed])
    return next((v for v in allowed if str(v) == match), None)


def _cross_field_problems(
    fields: dict[str, Any], given: set[str], quant_layer_fields: set[str], spellings: dict[str, str]
) -> list[str]:
    """Checks one field's schema cannot express; `given` = fields the user set (not defaults)."""
    problems = []
    bits = fields.get("quant_bits")
    if bits != 4:
        for key in sorted(quant_layer_fields.intersection(FOUR_BIT_FIELDS)):
            problems.append(f'field "{key}" is a 4-bit option but quant_bits is {json.dumps(bits)} (set quant_bits 4)')
    if bits != 8:
        for key in sorted(quant_layer_fields.intersection(EIGHT_BIT_FIELDS)):
            problems.append(f'field "{key}" is an 8-bit option but quant_bits is {json.dumps(bits)} (set quant_bits 8)')
    if fields.get("validation_path") and fields.get("validation_split", 0) > 0:
        problems.append('give either "validation_path" or "validation_split", not both')
    has_validation = bool(fields.get("validation_path")) or fields.get("validation_split", 0) > 0
    if fields.get("eval_steps") and not has_validation:
        problems.append('field "eval_steps" needs a validation set (validation_path or validation_split)')
    if "fast_dora" in given and fields.get("fast_dora") and not fields.get("use_dora"):
        problems.append(f'field "fast_dora" only applies to DoRA recipes (set {spellings.get("use_dora", "use_dora")} '
                        "true, or drop fast_dora)")
    known_tasks = _known_eval_tasks()
    for task in fields.get("eval_tasks") or []:
        if isinstance(task, str) and known_tasks and task not in known_tasks:
            problems.append(f'field "eval_tasks": unknown task "{task}"{did_you_mean(task, known_tasks)} '
                            f"(tasks are defined in {EVAL_TASKS_PATH.relative_to(REPO_ROOT)})")
    if fields.get("max_steps", -1) == 0:
        problems.append('field "max_steps": 0 would train nothing (use -1 for num_epochs, or a positive count)')
    problems.extend(trainer_problems(fields, given))
    return problems


def _known_eval_tasks() -> list[str]:
    """Task names of the evaluation registry (eval/tasks.json), read as plain JSON to keep --dry-run light."""
    try:
        return list(json.loads(EVAL_TASKS_PATH.read_text())["tasks"])
    except (OSError, ValueError, KeyError):
        return []


def _normalise(fields: dict[str, Any], given: set[str]) -> None:
    """quant_bits 16/32/"none"/null all mean an unquantised base; 16 implies bfloat16 unless dtype is given."""
    bits = fields["quant_bits"]
    if bits in (16, 32, "none", None):
        if bits == 16 and "dtype" not in given:
            fields["dtype"] = "bfloat16"
        fields["quant_bits"] = None


def parse_override(assignment: str) -> tuple[str, Any]:
    """`key=value` with a JSON-typed value (`lora_r=16`, `use_dora=true`); non-JSON values are strings."""
    key, sep, text = assignment.partition("=")
    key = key.strip()
    if not sep or not key:
        raise RecipeError(f'--set "{assignment}": expected key=value, e.g. --set lora_r=16')
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = text
    return key, value


def resolve_recipe(
    name: str,
    registry: Path | str | None = None,
    overrides: list[str] | None = None,
) -> Recipe:
    """Resolve a named recipe: extends -> aliases -> overrides -> validation -> defaults -> absolute paths.

    Raises:
        RecipeError: listing every problem found, each naming the field, what was expected and the nearest
            valid name or value.
    """
    registry_path, raw_registry = read_registry(registry)
    names = runnable_names(raw_registry)
    if name not in raw_registry or name.startswith("_"):
        raise RecipeError(
            f'no recipe named "{name}" in {registry_path}{did_you_mean(name, names)}. '
            f"Known recipes: {', '.join(names) or '(none)'}. `python lora/finetune.py --list` shows them."
        )
    problems: list[str] = []
    spellings: dict[str, str] = {}
    override_values = dict(parse_override(item) for item in overrides or [])
    layers = _recipe_layers(name, raw_registry, problems, spellings)
    layers.append(_rename_aliases(override_values, problems, spellings))
    fields = {key: value for layer in layers for key, value in layer.items()}
    schema = load_schema()
    validator = jsonschema.Draft202012Validator(schema)
    for error in sorted(validator.iter_errors(fields), key=lambda e: [str(p) for p in e.absolute_path]):
        problems.append(_describe_schema_error(error, schema, spellings))
    given = set(fields)
    resolved = {key: copy.deepcopy(spec.get("default")) for key, spec in schema["properties"].items()}
    resolved.pop("extends")
    resolved.update(fields)
    problems.extend(_cross_field_problems(resolved, given, _fields_set_with_quant_bits(layers), spellings))
    if problems:
        listing = "\n".join(f"  - {problem}" for problem in problems)
        raise RecipeError(f'recipe "{name}" in {registry_path} has {len(problems)} problem(s):\n{listing}')
    _normalise(resolved, given)
    resolved["run_name"] = resolved["run_name"] or name  # trackers name the run after the recipe by default
    auto_dtypes = resolve_auto_dtypes(resolved)
    for key in PATH_FIELDS:
        if resolved.get(key):
            resolved[key] = str((registry_path.parent / Path(resolved[key]).expanduser()).resolve())
    return Recipe(name=name, fields=resolved, registry_path=registry_path, overrides=override_values,
                  spellings=spellings, auto_dtypes=auto_dtypes)


def list_recipes(registry: Path | str | None = None) -> list[dict[str, Any]]:
    """One row per runnable recipe for `--list` (unresolvable recipes show their problem instead of failing)."""
    registry_path, raw_registry = read_registry(registry)
    rows = []
    for name in runnable_names(raw_registry):
        try:
            recipe = resolve_recipe(name, registry_path)
        except RecipeError as error:
            rows.append({"name": name, "problem": str(error).splitlines()[-1].strip()})
            continue
        rows.append(
            {
                "name": name,
                "model": recipe["base_model"],
                "quant": f"{recipe['quant_bits']}-bit" if recipe.quantised else recipe["dtype"],
                "adapter": "DoRA" if recipe["use_dora"] else "LoRA",
                "rank": recipe["lora_r"],
                "dataset": _display_path(recipe["dataset_path"], registry_path.parent),
            }
        )
    return rows


def _display_path(path: str, base: Path) -> str:
    try:
        return str(Path(path).relative_to(base))
    except ValueError:
        return path


def format_recipe_table(rows: list[dict[str, Any]]) -> str:
    columns = ["name", "model", "quant", "adapter", "rank", "dataset"]
    cells = [[str(row.get(col, row.get("problem", "") if col == "model" else "")) for col in columns] for row in rows]
    widths = [max([len(col)] + [len(cell[i]) for cell in cells]) for i, col in enumerate(columns)]
    lines = ["  ".join(col.ljust(w) for col, w in zip(columns, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(lines)
