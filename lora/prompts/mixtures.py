"""Dataset mixtures: a recipe's `datasets` (several files, each with a weight or an example cap and its own format)
drawn into one set of training rows, deterministically by the seed.

    "datasets": [{"path": "data/train/sentiment_train.jsonl", "weight": 2},
                 {"path": "data/train/entities_train.jsonl", "weight": 1},
                 {"path": "chat.jsonl", "max_examples": 100, "format": "messages"}]

The rule: an entry with `max_examples` gives that many rows (or all it has); an entry with neither field gives all
its rows; the entries with a `weight` share the rest in proportion to their weights, as many rows as possible
without repeating one: the largest total T with weight_i / sum(weights) * T <= rows_i for every weighted file, and
each file gives floor(weight_i / sum(weights) * T) rows. Which rows: a seeded shuffle of each file (random.Random
(seed)), its first rows taken. A recipe with `dataset_path` (one file, e.g. FinLoRA's merged multi-task files) reads
that file as before: every row, in file order.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

from lora.prompts.data_formats import DataFile, read_data_file

__all__ = ["DatasetSpec", "MixedRows", "dataset_specs", "mix_datasets", "mixture_counts"]


@dataclass(frozen=True)
class DatasetSpec:
    """One entry of a recipe's `datasets` (or its `dataset_path` as the only entry)."""

    path: str
    format: str = "auto"
    weight: float | None = None
    max_examples: int | None = None

    def describe(self) -> dict:
        share = {"weight": self.weight} if self.weight is not None else {}
        if self.max_examples is not None:
            share["max_examples"] = self.max_examples
        return share


@dataclass
class MixedRows:
    """The mixed rows, the index of the file each came from, where each sits (file:line), and the files as read."""

    rows: list[dict]
    sources: list[int]
    where: list[str]
    files: list[DataFile]
    specs: list[DatasetSpec]

    def record(self, used_sources: list[int]) -> list[dict]:
        """For the run record: per file, its sha256, the rows read and the rows the run trains on."""
        return [{"path": str(data.path), "format": data.format, **spec.describe(), "sha256": data.sha256,
                 "rows_read": len(data.rows), "rows_used": used_sources.count(index)}
                for index, (data, spec) in enumerate(zip(self.files, self.specs, strict=True))]


def dataset_specs(recipe) -> list[DatasetSpec]:
    """The recipe's data files: its `datasets` entries, or its `dataset_path` alone."""
    if recipe.get("datasets"):
        return [DatasetSpec(path=entry["path"], format=entry.get("format", "auto"), weight=entry.get("weight"),
                            max_examples=entry.get("max_examples")) for entry in recipe["datasets"]]
    return [DatasetSpec(path=recipe["dataset_path"])]


def mixture_counts(available: list[int], specs: list[DatasetSpec]) -> list[int]:
    """How many rows each file gives (the rule in this module's docstring)."""
    counts = [min(spec.max_examples, rows) if spec.max_examples is not None else rows
              for spec, rows in zip(specs, available, strict=True)]
    weighted = [i for i, spec in enumerate(specs) if spec.weight is not None]
    if weighted:
        total_weight = sum(specs[i].weight for i in weighted)
        largest = min(available[i] * total_weight / specs[i].weight for i in weighted)
        for i in weighted:
            # the small epsilon keeps an exact share (e.g. 2/3 * 900 = 600) from rounding down to 599
            counts[i] = min(available[i], math.floor(specs[i].weight / total_weight * largest + 1e-9))
    return counts


def mix_datasets(specs: list[DatasetSpec], seed: int, *, formats: tuple[str, ...] | None = None,
                 relative_to: Path | None = None, max_seq_length: int | None = None) -> MixedRows:
    """Read every file of `specs` and draw the mixture; one file without weight or cap is read as it is.

    Args:
        formats: the formats the trainer accepts (None: any); another format is a DataError naming the file.
        relative_to: the folder relative paths resolve against (the registry's; recipes resolve them already).
        max_seq_length: when given (training data), rows too long to tokenise are refused (read_data_file).
    """
    from lora.core.errors import DataError

    files = []
    for index, spec in enumerate(specs):
        path = Path(spec.path) if relative_to is None else relative_to / spec.path
        label = f"datasets[{index}]" if len(specs) > 1 or spec.weight or spec.max_examples else "dataset_path"
        data = read_data_file(path, spec.format, label=label, max_seq_length=max_seq_length)
        if formats is not None and data.format not in formats:
            raise DataError(f"{label} {path}: holds {data.format} rows, which this trainer cannot train on (it "
                            f"reads {' or '.join(formats)} rows; see the README's data formats).")
        files.append(data)
    if len(specs) == 1 and specs[0].weight is None and specs[0].max_examples is None:
        return MixedRows(rows=list(files[0].rows), sources=[0] * len(files[0].rows), where=list(files[0].where),
                         files=files, specs=specs)
    counts = mixture_counts([len(data.rows) for data in files], specs)
    rng = random.Random(seed)
    rows, sources, where = [], [], []
    for index, (data, count) in enumerate(zip(files, counts, strict=True)):
        order = list(range(len(data.rows)))
        rng.shuffle(order)
        rows.extend(data.rows[i] for i in order[:count])
        where.extend(data.where[i] for i in order[:count])
        sources.extend([index] * count)
    return MixedRows(rows=rows, sources=sources, where=where, files=files, specs=specs)
