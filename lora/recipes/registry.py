"""The recipe registry: load `finetune_configs.json`, resolve `extends` and FinLoRA aliases, apply overrides,
validate against `recipe_schema.json`, and report every problem at once.

A registry is a JSON object of named recipes. Names starting with "_" are shared bases: they may be incomplete,
are not listed and cannot be run, and exist to be `extends`-ed. Relative paths inside a registry resolve against
the registry file's folder, never the working directory.
"""

from __future__ import annotations

import copy
import errno
import functools
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema

from lora.core.compute_dtype import resolve_auto_dtypes
from lora.core.errors import RecipeError, closest, did_you_mean
from lora.core.strict_json import JSONInputError, parse_json, schema_validator
from lora.recipes.data_fields import data_field_problems
from lora.recipes.quantisation_fields import other_width_problems
from lora.recipes.trainers import trainer_problems

__all__ = [
    "ALIASES",
    "check_recipe_name",
    "DEFAULT_REGISTRY",
    "EVAL_TASKS_PATH",
    "format_recipe_table",
    "list_recipes",
    "load_schema",
    "MAX_RECIPE_NAME_LENGTH",
    "parse_override",
    "PATH_FIELDS",
    "read_registry",
    "recipe_as_written",
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
# A recipe name becomes a folder name (outputs/<recipe>/): letters, digits, "_" and "-", with "." only inside,
# so that no name is a path ("/", "..", an absolute path) nor a hidden folder (the runner's own temporary ones).
RECIPE_NAME_PATTERN = re.compile(r"[A-Za-z0-9_-]([A-Za-z0-9_.-]*[A-Za-z0-9_-])?")
MAX_RECIPE_NAME_LENGTH = 128


def load_schema() -> dict:
    return json.loads(SCHEMA_PATH.read_text())


@functools.lru_cache(maxsize=4)
def _compiled_schema(stamp: tuple[int, int]) -> tuple[dict, jsonschema.protocols.Validator]:
    """The schema and its validator, built once per version of the schema file (`stamp`: mtime and size)."""
    schema = load_schema()
    return schema, schema_validator(schema)


def _schema_and_validator() -> tuple[dict, jsonschema.protocols.Validator]:
    stat = SCHEMA_PATH.stat()
    return _compiled_schema((stat.st_mtime_ns, stat.st_size))


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
    """Read a registry file; returns its absolute path and the raw recipes.

    Raises:
        RecipeError: a missing file or symlink loop, text that is not UTF-8, and JSON this tool refuses (NaN or
            Infinity, a key given twice, nesting past the reader's limit; lora/core/strict_json.py) with line:column.
    """
    registry_path = _resolve_path(Path(path).expanduser()) if path else DEFAULT_REGISTRY
    if registry_path is None:
        raise RecipeError(f"registry file {path} is a symlink loop (a link that leads back to itself); give the "
                          "registry's real path.")
    if not registry_path.is_file():
        raise RecipeError(f"registry file {registry_path} does not exist (expected a JSON object of named recipes).")
    try:
        raw = parse_json(registry_path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as error:
        raise RecipeError(f"registry {registry_path}: byte {error.start} is not UTF-8 (save the file as "
                          "UTF-8).") from None
    except JSONInputError as error:
        raise RecipeError(f"registry {registry_path}:{error.line}:{error.column}: {error.message}.") from None
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


def _resolve_path(path: Path) -> Path | None:
    """`path` made absolute with its symlinks followed, or None when they form a loop."""
    try:
        return path.resolve()
    except RuntimeError:  # pathlib's "Symlink loop from ..." (Python 3.11/3.12)
        return None
    except OSError as error:  # Python 3.13 raises ELOOP as an OSError
        if error.errno == errno.ELOOP:
            return None
        raise


def recipe_as_written(registry: Path | str | None, name: str) -> dict[str, Any]:
    """The fields `name` and its ancestors set, merged, as the registry writes them (aliases renamed, relative paths
    still relative, descriptions left out): what a recipe is, the same wherever the registry file lies."""
    merged = _RegistryView(*read_registry(registry)).merged(name).fields
    return {key: value for key, value in merged.items() if key not in ("description", "extends")}


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


@dataclass
class _Merged:
    """A recipe's `extends` chain merged, most general first: what every recipe extending it starts from."""

    fields: dict[str, Any]
    spellings: dict[str, str]
    problems: list[str]
    quant_fields: set[str]  # fields set in the layer that chose quant_bits or a more specific one


class _RegistryView:
    """One read registry, resolving any number of its recipes in time linear in the registry's size: every
    `extends` chain is merged once per link (memoised), the schema validator is compiled once."""

    def __init__(self, registry_path: Path, raw_registry: dict[str, dict]):
        self.path, self.raw = registry_path, raw_registry
        self.schema, self.validator = _schema_and_validator()
        self.defaults = {key: spec.get("default") for key, spec in self.schema["properties"].items()
                         if key != "extends"}
        self._merged: dict[str, _Merged] = {}

    def merged(self, name: str) -> _Merged:
        """The fields of `name` and its ancestors (aliases renamed per layer, the most specific layer winning)."""
        chain, seen, current = [], set(), name
        while current is not None and current not in self._merged:
            if current in seen or current not in self.raw:
                return self._broken_chain(name)  # a cycle or a missing parent: reported from `name`, not memoised
            chain.append(current)
            seen.add(current)
            parent = self.raw[current].get("extends")
            current = parent if isinstance(parent, str) else None
        base = self._merged[current] if current is not None else _Merged({}, {}, [], set())
        for link in reversed(chain):
            spellings, problems = dict(base.spellings), list(base.problems)
            layer = _rename_aliases(copy.deepcopy(self.raw[link]), problems, spellings)
            fields = {key: value for key, value in base.fields.items() if key != "extends"}
            fields.update(layer)  # only the recipe's own `extends` is kept in the record
            quant_fields = set(layer) if "quant_bits" in layer else base.quant_fields | set(layer)
            base = self._merged[link] = _Merged(fields, spellings, problems, quant_fields)
        return base

    def _broken_chain(self, name: str) -> _Merged:
        chain, current, problems = [], name, []
        while current is not None:
            if current in chain:
                problems.append(f'"extends" forms a cycle: {" -> ".join(chain + [current])}')
                break
            if current not in self.raw:
                problems.append(f'field "extends": no recipe named "{current}" in the registry'
                                f"{did_you_mean(current, self.raw)}")
                break
            chain.append(current)
            parent = self.raw[current].get("extends")
            current = parent if isinstance(parent, str) else None
        spellings: dict[str, str] = {}
        layers = [_rename_aliases(copy.deepcopy(self.raw[link]), problems, spellings) for link in reversed(chain)]
        fields = {key: value for layer in layers[:-1] for key, value in layer.items() if key != "extends"}
        fields.update(layers[-1] if layers else {})
        return _Merged(fields, spellings, problems, _fields_set_with_quant_bits(layers))


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
        # a branch is of the wrong type when the value itself fails its "type" (path [branch, "type"]), not when an
        # item inside it does: [1] for a list of names is the list branch, with a complaint about its item
        mistyped = {sub.relative_schema_path[0] for sub in error.context
                    if sub.validator == "type" and len(sub.relative_schema_path) == 2}
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
    elif error.validator == "type":
        hint = _number_hint(error.instance, error.validator_value, field_schema)
    text = f"{json.dumps(error.instance)} is not allowed" if error.validator == "enum" else error.message
    message = f'field "{location}": {text}{hint}'
    if expected and error.validator in ("type", "oneOf", "minLength"):
        message += f" — expected: {expected}"
    return message


def _number_hint(value: Any, expected: str | list[str], field_schema: dict) -> str:
    """Why a value of the wrong type is not the number it may look like, with the nearest valid one."""
    types = [expected] if isinstance(expected, str) else list(expected)
    if isinstance(value, str) and not _is_finite_text(value) and {"number", "integer"} & set(types):
        return (f" (NaN and Infinity are not numbers a recipe accepts; give a finite number, e.g. the default "
                f"{json.dumps(field_schema.get('default'))})")
    if "integer" in types and isinstance(value, float) and math.isfinite(value):
        nearest = round(value)
        if "minimum" in field_schema:
            nearest = max(nearest, field_schema["minimum"])
        if "maximum" in field_schema:
            nearest = min(nearest, field_schema["maximum"])
        return f" (a whole number without a decimal point or exponent; nearest valid value: {nearest})"
    return ""


def _is_finite_text(text: str) -> bool:
    """False for text that reads as NaN or an infinity (`NaN`, `-Infinity`, `1e999`), True otherwise."""
    try:
        return math.isfinite(float(text))
    except ValueError:
        return True


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
    problems.extend(other_width_problems(fields.get("quant_bits"), quant_layer_fields))
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
    problems.extend(data_field_problems(fields, given, EVAL_TASKS_PATH))
    return problems


def _known_eval_tasks() -> list[str]:
    """Task names of the evaluation registry (eval/tasks.json), read as plain JSON to keep --dry-run light (once
    per version of the file, not once per recipe of a --list)."""
    try:
        stat = EVAL_TASKS_PATH.stat()
    except OSError:
        return []
    return list(_eval_task_names(str(EVAL_TASKS_PATH), stat.st_mtime_ns, stat.st_size))


@functools.lru_cache(maxsize=4)
def _eval_task_names(path: str, mtime_ns: int, size: int) -> tuple[str, ...]:
    try:
        return tuple(parse_json(Path(path).read_text(encoding="utf-8"))["tasks"])
    except (OSError, ValueError, KeyError, TypeError):  # the task registry reports its own problems when read
        return ()


def _normalise(fields: dict[str, Any], given: set[str]) -> None:
    """quant_bits 16/32/"none"/null all mean an unquantised base; 16 implies bfloat16 unless dtype is given."""
    bits = fields["quant_bits"]
    if bits in (16, 32, "none", None):
        if bits == 16 and "dtype" not in given:
            fields["dtype"] = "bfloat16"
        fields["quant_bits"] = None


def parse_override(assignment: str) -> tuple[str, Any]:
    """`key=value` with a JSON-typed value (`lora_r=16`, `use_dora=true`); other values are strings.

    The value is read by the same strict JSON rule as the registry, so `NaN`, `Infinity` or `1e999` stay the
    strings they are and the schema refuses them for a number field (`_describe_schema_error` says why).
    """
    key, sep, text = assignment.partition("=")
    key = key.strip()
    if not sep or not key:
        raise RecipeError(f'--set "{assignment}": expected key=value, e.g. --set lora_r=16')
    try:
        value = parse_json(text)
    except JSONInputError:
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
    return _resolve(_RegistryView(registry_path, raw_registry), name, overrides)


def _copied(value: Any) -> Any:
    return copy.deepcopy(value) if isinstance(value, (list, dict)) else value


def _resolve(view: _RegistryView, name: str, overrides: list[str] | None = None) -> Recipe:
    """`resolve_recipe` within an already-read registry (see there)."""
    registry_path, schema = view.path, view.schema
    override_values = dict(parse_override(item) for item in overrides or [])
    merged = view.merged(name)
    problems, spellings = list(merged.problems), dict(merged.spellings)
    override_layer = _rename_aliases(override_values, problems, spellings)
    fields = {**merged.fields, **override_layer}
    quant_fields = set(override_layer) if "quant_bits" in override_layer else merged.quant_fields | set(override_layer)
    for error in sorted(view.validator.iter_errors(fields), key=lambda e: [str(p) for p in e.absolute_path]):
        problems.append(_describe_schema_error(error, schema, spellings))
    given = set(fields)
    resolved = {key: _copied(value) for key, value in view.defaults.items()}
    # The memoised layers are shared by every recipe extending them: the recipe gets its own lists and objects.
    resolved.update({key: _copied(value) for key, value in fields.items()})
    problems.extend(_cross_field_problems(resolved, given, quant_fields, spellings))
    # Paths resolve against the registry's folder: the one-file fields and each entry of a `datasets` mixture.
    path_holders = [(key, resolved, key) for key in PATH_FIELDS]
    path_holders += [(f"datasets[{index}].path", entry, "path") for index, entry in
                     enumerate(resolved.get("datasets") or []) if isinstance(entry, dict)]
    for label, holder, key in path_holders:
        if isinstance(holder.get(key), str) and holder[key]:
            path = _resolve_path(registry_path.parent / Path(holder[key]).expanduser())
            if path is None:
                problems.append(f'field "{label}": {holder[key]} is a symlink loop (a link that leads back to itself, '
                                "directly or through others); point it at the real file or folder")
            else:
                holder[key] = str(path)
    if problems:
        listing = "\n".join(f"  - {problem}" for problem in problems)
        raise RecipeError(f'recipe "{name}" in {registry_path} has {len(problems)} problem(s):\n{listing}')
    _normalise(resolved, given)
    resolved["run_name"] = resolved["run_name"] or name  # trackers name the run after the recipe by default
    auto_dtypes = resolve_auto_dtypes(resolved)
    return Recipe(name=name, fields=resolved, registry_path=registry_path, overrides=override_values,
                  spellings=spellings, auto_dtypes=auto_dtypes)


def list_recipes(registry: Path | str | None = None) -> list[dict[str, Any]]:
    """One row per runnable recipe for `--list` (unresolvable recipes show their problem instead of failing).

    The registry is read once and every recipe resolved within it, so the time grows linearly with its size.
    """
    view = _RegistryView(*read_registry(registry))
    rows = []
    for name in runnable_names(view.raw):
        try:
            recipe = _resolve(view, name)
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
                "dataset": (_display_path(recipe["dataset_path"], view.path.parent) if recipe["dataset_path"]
                            else f"{len(recipe['datasets'])} datasets (mixture)"),
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
