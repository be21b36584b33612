"""Reading a saved adapter folder: its peft config, the runner's recipe.json, its base model, its weights.

Shared by merge.py, normalize_dora.py, convert_adapter.py, serve.py and the eval harness, so that every tool agrees
on three things: where an adapter's base model comes from, that a merge or a "reference" forward always uses the
UNQUANTISED base, and that an adapter whose DoRA magnitudes were pre-normalised for an inference runtime
(TensorRT-LLM convention, see normalize_dora.py) is refused instead of silently computing wrong outputs.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora.core.errors import UserError
from lora.core.strict_json import JSONInputError, parse_json

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "AdapterError",
    "AdapterRecords",
    "copy_tokenizer_files",
    "local_base_model_folder",
    "NORMALISED_CONFIG_KEY",
    "NORMALISED_RECORD",
    "read_adapter_records",
    "read_adapter_weights",
    "RECIPE_RECORD",
    "refuse_if_normalised",
    "refuse_non_finite_weights",
    "resolve_base_model_path",
    "TOKENIZER_FILE_NAMES",
]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
RECIPE_RECORD = "recipe.json"
# The normalised marker: a field in adapter_config.json (travels with the config when only it is copied) and a
# sidecar record (says how the magnitudes were computed). Either one is enough for our loaders to refuse.
NORMALISED_CONFIG_KEY = "dora_magnitudes_normalised"
NORMALISED_RECORD = "dora_normalisation.json"
# The tokenizer files an adapter folder may carry (the runner saves them beside the adapter).
TOKENIZER_FILE_NAMES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                        "added_tokens.json", "chat_template.jinja", "vocab.json", "merges.txt")


class AdapterError(UserError):
    """An adapter folder is missing, incomplete, or not usable by the tool that was asked to load it."""


@dataclass(frozen=True)
class AdapterRecords:
    """What an adapter folder says about itself.

    Attributes:
        adapter_dir: the folder (absolute).
        adapter_config: adapter_config.json as a dict.
        recipe: recipe.json (the runner's resolved recipe) as a dict, or None for adapters not made by the runner.
        is_dora: the adapter carries DoRA magnitudes (`use_dora: true`).
        is_normalised: its magnitudes were pre-normalised for a runtime (m / ||W0 + s·BA||); peft must not load it.
    """

    adapter_dir: Path
    adapter_config: dict[str, Any]
    recipe: dict[str, Any] | None
    is_dora: bool
    is_normalised: bool

    @property
    def base_model(self) -> str | None:
        """The base model id or path the adapter was trained on (adapter_config first, then recipe.json)."""
        name = self.adapter_config.get("base_model_name_or_path")
        if not name and self.recipe:
            name = self.recipe.get("base_model")
        return name or None

    @property
    def trained_quant_bits(self) -> int | None:
        """4 or 8 when training saw a bitsandbytes-quantised base (from recipe.json), else None."""
        bits = (self.recipe or {}).get("quant_bits")
        return bits if bits in (4, 8) else None


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:  # the strict rule of every JSON input (lora/core/strict_json.py): no NaN, no repeated key, no runaway nesting
        data = parse_json(path.read_text())
    except JSONInputError as error:
        detail = error.message.removeprefix("not valid JSON: ")
        raise AdapterError(f"{path}:{error.line}:{error.column} is not valid JSON ({what}): {detail}.") from None
    if not isinstance(data, dict):
        raise AdapterError(f"{path} must hold a JSON object ({what}).")
    return data


def read_adapter_records(adapter_dir: str | Path) -> AdapterRecords:
    """Read an adapter folder's adapter_config.json and (when present) recipe.json.

    Args:
        adapter_dir: a folder written by `save_pretrained()` of a peft model (or by the recipe runner).

    Returns:
        The folder's `AdapterRecords`.

    Raises:
        AdapterError: the folder does not exist or holds no adapter_config.json, or a record is not valid JSON.
    """
    folder = Path(adapter_dir).expanduser().resolve()
    if not folder.is_dir():
        raise AdapterError(f"adapter folder {folder} does not exist.")
    config_path = folder / ADAPTER_CONFIG
    if not config_path.is_file():
        raise AdapterError(
            f"{folder} holds no {ADAPTER_CONFIG}: it is not a peft adapter folder. Pass the output folder of a "
            "training run (outputs/<recipe>/), or convert a foreign checkpoint first with lora/convert_adapter.py."
        )
    adapter_config = _read_json(config_path, "peft adapter config")
    recipe_path = folder / RECIPE_RECORD
    recipe = _read_json(recipe_path, "the runner's resolved recipe") if recipe_path.is_file() else None
    is_normalised = bool(adapter_config.get(NORMALISED_CONFIG_KEY)) or (folder / NORMALISED_RECORD).is_file()
    return AdapterRecords(
        adapter_dir=folder,
        adapter_config=adapter_config,
        recipe=recipe,
        is_dora=bool(adapter_config.get("use_dora")),
        is_normalised=is_normalised,
    )


def refuse_if_normalised(adapter_dir: str | Path) -> None:
    """Raise when the adapter's DoRA magnitudes were pre-normalised for an inference runtime.

    peft (and so merge, eval and serve) computes m / ||W0 + s·BA|| itself; fed a magnitude that is already divided
    by that norm it divides twice and produces wrong outputs without any error. So we refuse.

    Raises:
        AdapterError: the adapter is marked as normalised (or the folder is not an adapter).
    """
    records = read_adapter_records(adapter_dir)
    if records.is_normalised:
        raise AdapterError(
            f"{records.adapter_dir} is a NORMALISED DoRA adapter (magnitudes already divided by ||W0 + s·BA||, the "
            "TensorRT-LLM convention written by lora/normalize_dora.py). peft, merge, eval and serve would divide "
            "by the norm a second time and give wrong outputs. Use the original adapter folder it was made from "
            f"(see {NORMALISED_RECORD} in it: \"source_adapter\"), and give the normalised one only to a runtime "
            "that expects it (TensorRT-LLM with --dora_plugin=enable)."
        )


def refuse_non_finite_weights(adapter_dir: str | Path) -> None:
    """Raise when an adapter tensor holds NaN or infinite values (a diverged run, a damaged conversion): every
    output of a model carrying it would be NaN, and merging it would publish a broken model.

    Raises:
        AdapterError: naming the first such tensor and how many of its values are not finite.
    """
    import torch

    for name, tensor in read_adapter_weights(adapter_dir).items():
        bad = int((~torch.isfinite(tensor)).sum()) if tensor.is_floating_point() else 0
        if bad:
            raise AdapterError(
                f"{Path(adapter_dir).expanduser().resolve() / ADAPTER_WEIGHTS}: tensor {name} holds {bad} NaN or "
                f"infinite value(s) of {tensor.numel()}; the adapter is broken (a diverged run?). Use an earlier "
                "checkpoint of the run (checkpoint-*/ in its folder) or train again with a lower learning_rate."
            )


def _relative_base_folder(records: AdapterRecords) -> Path:
    """Where a relative base_model path resolves: the registry's folder for runner outputs, else the adapter's."""
    registry = (records.recipe or {}).get("registry")
    return Path(registry).parent if registry else records.adapter_dir


def resolve_base_model_path(adapter_dir: str | Path, override: str | None = None) -> tuple[str, str]:
    """Where to load an adapter's base model from.

    Args:
        adapter_dir: the adapter folder.
        override: a base model id or folder given on the command line (`--base-model`); wins over the records.

    Returns:
        (path for `from_pretrained()`, one-sentence origin for records and logs).

    Raises:
        AdapterError: the adapter names no base model and no override was given.
        ModelSourceError: the named base cannot be found (from `lora.models.source.resolve_model_source`).
    """
    from lora.models.source import resolve_model_source

    records = read_adapter_records(adapter_dir)
    if override:
        source = resolve_model_source(override, None)
        return source.path, source.origin
    if not records.base_model:
        raise AdapterError(
            f"{records.adapter_dir}/{ADAPTER_CONFIG} names no base model (base_model_name_or_path is empty and "
            "there is no recipe.json). Pass --base-model ID_OR_FOLDER."
        )
    source = resolve_model_source(records.base_model, _relative_base_folder(records))
    return source.path, source.origin


def local_base_model_folder(adapter_dir: str | Path, override: str | None = None) -> Path | None:
    """The local folder an adapter's base model is named by (`override` first, as `resolve_base_model_path` reads
    them), or None when it is named by a hub id; reads no network, so commands can check their outputs against it
    before any model loads."""
    records = read_adapter_records(adapter_dir)
    name = override or records.base_model
    if not name:
        return None
    path = Path(name).expanduser()
    if not path.is_absolute() and not override:
        path = _relative_base_folder(records) / path
    return path.absolute() if path.is_dir() else None


def read_adapter_weights(adapter_dir: str | Path) -> dict[str, Any]:
    """The adapter's tensors (adapter_model.safetensors) as a dict of CPU tensors.

    Raises:
        AdapterError: the folder holds no adapter_model.safetensors.
    """
    from safetensors.torch import load_file

    path = Path(adapter_dir).expanduser().resolve() / ADAPTER_WEIGHTS
    if not path.is_file():
        raise AdapterError(
            f"{path.parent} holds no {ADAPTER_WEIGHTS}. Adapters in pickle form (adapter_model.bin) or in another "
            "project's format can be converted with lora/convert_adapter.py."
        )
    return load_file(str(path), device="cpu")


def copy_tokenizer_files(source: Path, destination: Path) -> None:
    """Copy the tokenizer files an adapter folder carries (the runner saves them next to the adapter)."""
    for name in TOKENIZER_FILE_NAMES:
        if (source / name).is_file():
            shutil.copy2(source / name, destination / name)
