"""A run's training and validation rows, whatever their files and formats: the recipe's `dataset_path` or its
`datasets` mixture (lora/prompts/mixtures.py), in the formats its trainer reads (lora/recipes/trainers.py), split and
capped by the seed; and the per-file record (sha256, rows read, rows used) the run record keeps.

The order is the one the supervised runner always used: a seeded `datasets` shuffle of the rows, then
`train_test_split` for validation_split, then the first max_train_examples; done on row indices, so that rows of
different formats (chat and FinLoRA in one mixture) never share a table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lora.core.errors import DataError
from lora.prompts.data_formats import read_data_file
from lora.prompts.mixtures import dataset_specs, mix_datasets
from lora.prompts.templates import boundary_report
from lora.recipes.trainers import TRAINERS

__all__ = ["TrainingData", "TrainingRows", "check_data_files", "encoding_report", "training_rows"]


@dataclass
class TrainingRows:
    """Rows as read (chat, FinLoRA or preference), with their file:line, and the per-file record."""

    train: list[dict]
    train_where: list[str]
    validation: list[dict] | None
    record: list[dict] = field(default_factory=list)


@dataclass
class TrainingData:
    """What a trainer's `load_training_data` hands its `build_recipe_trainer` (and run.py's record reads)."""

    train: Any
    validation: Any
    record: list[dict]
    rows: TrainingRows | None = None

    def __iter__(self):  # `train, validation = data`, as the supervised datasets were handed before
        return iter((self.train, self.validation))


def _formats(recipe) -> tuple[str, ...]:
    return TRAINERS[recipe["trainer"]].data_formats


def _check_chat_template_field(recipe, files) -> None:
    for data in files:
        if data.format == "messages" and recipe["prompt_template"] != "chat":
            raise DataError(f'{data.path}: chat rows train under the tokenizer\'s chat template, and the adapter is '
                            f'scored and served under the recipe\'s prompt_template: set "prompt_template": "chat" in '
                            f'recipe {recipe.name} (now "{recipe["prompt_template"]}").')


def check_data_files(recipe) -> None:
    """Read every data file of the recipe (rows checked, formats its trainer reads) before any model loads.

    Raises:
        DataError: a missing file, a bad row (file:line), or a format the recipe's trainer cannot train on.
    """
    mixed = mix_datasets(dataset_specs(recipe), recipe["seed"], formats=_formats(recipe),
                         max_seq_length=recipe["max_seq_length"])
    _check_chat_template_field(recipe, mixed.files)
    if recipe.get("validation_path"):
        _validation_rows(recipe)


def _validation_rows(recipe) -> list[dict]:
    data = read_data_file(recipe["validation_path"], label="validation_path", max_seq_length=recipe["max_seq_length"])
    if data.format not in _formats(recipe):
        raise DataError(f"validation_path {data.path}: holds {data.format} rows; a {recipe['trainer']} recipe "
                        f"validates on {' or '.join(_formats(recipe))} rows.")
    _check_chat_template_field(recipe, [data])
    return data.rows


def training_rows(recipe) -> TrainingRows:
    """The rows the run trains and validates on, and the record of each file's part in them."""
    from datasets import Dataset  # imported here: --dry-run and --list never need it

    mixed = mix_datasets(dataset_specs(recipe), recipe["seed"], formats=_formats(recipe),
                         max_seq_length=recipe["max_seq_length"])
    _check_chat_template_field(recipe, mixed.files)
    order = Dataset.from_dict({"row": list(range(len(mixed.rows)))}).shuffle(seed=recipe["seed"])
    validation = None
    if recipe.get("validation_path"):
        validation = _validation_rows(recipe)
    elif recipe.get("validation_split", 0) > 0:
        split = order.train_test_split(test_size=recipe["validation_split"], seed=recipe["seed"])
        order = split["train"]
        validation = [mixed.rows[i] for i in split["test"]["row"]]
    if recipe["max_train_examples"]:
        order = order.select(range(min(recipe["max_train_examples"], len(order))))
    chosen = list(order["row"])
    return TrainingRows(train=[mixed.rows[i] for i in chosen], train_where=[mixed.where[i] for i in chosen],
                        validation=validation, record=mixed.record([mixed.sources[i] for i in chosen]))


def encoding_report(recipe, tokenizer, data) -> dict:
    """lora.prompts.templates.boundary_report over the run's FinLoRA rows (chat rows split at the template's turn
    boundaries, preference rows at the prompt's end: neither has a FinLoRA context/target boundary).

    Args:
        data: what the trainer's load_training_data returned: a TrainingData, or a list of rows (grpo).
    """
    if isinstance(data, TrainingData) and data.rows is not None:
        rows = data.rows.train
    elif isinstance(data, list):
        rows = data
    else:
        rows = mix_datasets(dataset_specs(recipe), recipe["seed"]).rows
    plain = [row for row in rows if isinstance(row.get("context"), str) and "target" in row]
    return boundary_report(plain, recipe["prompt_template"], tokenizer)
