"""An adapter on its base, ready for inference: the one loader evaluation, serving, merge and normalisation use.

The base is found the way every tool finds it (the adapter's records, or an explicit --base-model), quantised as the
adapter's recipe.json says training quantised it (`quantisation_for_adapter`), unless the caller asks for another
width or for an unquantised base (merge); the tokenizer is the adapter folder's own when the runner saved one there.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from lora.adapters.folders import AdapterRecords, read_adapter_records, resolve_base_model_path
from lora.core.errors import ModelSourceError, UserError
from lora.models.quantisation import QuantisationSettings

__all__ = [
    "AS_TRAINED",
    "AdapterOnBase",
    "load_adapter_for_inference",
    "load_base_for_adapter",
    "load_inference_base",
    "quantisation_for_adapter",
    "tokenizer_folder",
]

AS_TRAINED = "as trained"  # a quant-bits choice: keep the width training used
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


@dataclass
class AdapterOnBase:
    """A loaded model in eval mode and what it was built from."""

    model: Any  # the base (load_base_for_adapter) or the PeftModel on it (load_adapter_for_inference)
    tokenizer: Any
    base_path: str
    base_origin: str
    quantisation: QuantisationSettings
    records: AdapterRecords | None


def quantisation_for_adapter(records: AdapterRecords | None, bits: int | None | str = AS_TRAINED,
                             dtype: str | None = None) -> QuantisationSettings:
    """How to load the base of an adapter: as its recipe.json says training did, at `bits` when given (4, 8 or None
    for unquantised), with `dtype` for the unquantised parameters when given.

    An adapter without a recipe.json (converted, or made by another tool) records no quantisation: its base loads
    unquantised unless `bits` says otherwise, with the recipe schema's 4-bit/8-bit defaults.
    """
    recorded = dict(records.recipe) if records is not None and records.recipe else {"quant_bits": None}
    settings = QuantisationSettings.from_recipe(recorded)
    if bits != AS_TRAINED:
        settings = settings.with_bits(bits)
    if dtype is not None:
        settings = replace(settings, dtype=dtype)
    return settings


def tokenizer_folder(adapter_dir: str | Path | None, base_path: str) -> str:
    """The adapter's own tokenizer (the runner saves it with the adapter) when it has one, else the base model's."""
    if adapter_dir is not None:
        folder = Path(adapter_dir).expanduser().resolve()
        if any((folder / name).is_file() for name in TOKENIZER_FILES):
            return str(folder)
    return str(base_path)


def load_inference_base(base_name: str, base_path: str, quantisation: QuantisationSettings,
                        adapter_dir: str | Path | None = None):
    """(model in eval mode, tokenizer) of a base, with a user error naming the base when it does not load."""
    from lora.models.loading import load_base_model, load_tokenizer

    try:
        model = load_base_model(base_path, quantisation).eval()
    except (OSError, ValueError, KeyError) as error:
        raise ModelSourceError(f"cannot load the base model {base_name} from {base_path}: {error}") from None
    return model, load_tokenizer(tokenizer_folder(adapter_dir, base_path))


def load_base_for_adapter(adapter_dir: str | Path, *, base_override: str | None = None,
                          quantisation: QuantisationSettings | None = None) -> AdapterOnBase:
    """The base an adapter was trained on, loaded per `quantisation` (default: as trained), without the adapter."""
    records = read_adapter_records(adapter_dir)
    try:
        path, origin = resolve_base_model_path(adapter_dir, base_override)
    except ModelSourceError as error:
        raise ModelSourceError(f"the base model of adapter {records.adapter_dir} cannot be loaded: {error}") from None
    quantisation = quantisation or quantisation_for_adapter(records)
    model, tokenizer = load_inference_base(base_override or records.base_model or path, path, quantisation,
                                           records.adapter_dir)
    return AdapterOnBase(model, tokenizer, path, origin, quantisation, records)


def load_adapter_for_inference(adapter_dir: str | Path, *, base_override: str | None = None,
                               quantisation: QuantisationSettings | None = None,
                               fast_dora: bool = True) -> AdapterOnBase:
    """The adapter attached to its base (see `load_base_for_adapter`), frozen, in eval mode.

    DoRA adapters run through lora.adapters.fast_dora unless `fast_dora` is False (same outputs as peft's DoRA; in
    eval mode the per-row norms are computed once).
    """
    from peft import PeftModel

    loaded = load_base_for_adapter(adapter_dir, base_override=base_override, quantisation=quantisation)
    try:
        model = PeftModel.from_pretrained(loaded.model, str(loaded.records.adapter_dir), is_trainable=False)
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise UserError(
            f"the adapter {loaded.records.adapter_dir} does not fit the base model "
            f"{base_override or loaded.records.base_model} ({loaded.base_path}): {str(error).splitlines()[0]}. "
            "Pass the base it was trained on with --base-model."
        ) from None
    if fast_dora and loaded.records.is_dora:
        from lora.adapters.fast_dora import enable_fast_dora

        enable_fast_dora(model)
    loaded.model = model.eval()
    return loaded
