"""DoRA magnitude normalisation for TensorRT-LLM: magnitude := m / ||W0 + s·B A||_row, with W0 as training saw it
(4-bit dequantised with the recorded settings) or unquantised. The output is marked as normalised so that peft,
merge, eval and serve refuse it. `python lora/normalize_dora.py` is the command.
"""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

import torch

import lora.models.bnb_cpu_fixes  # noqa: F401  (before any model loads)
from lora.adapters.folders import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    NORMALISED_CONFIG_KEY,
    NORMALISED_RECORD,
    AdapterError,
    copy_tokenizer_files,
    local_base_model_folder,
    read_adapter_records,
    read_adapter_weights,
    refuse_if_normalised,
)
from lora.adapters.inference import load_base_for_adapter, quantisation_for_adapter
from lora.core.files import claim_output_folder, refuse_output_over_inputs
from lora.models.quantisation import QuantisationSettings

__all__ = [
    "base_weights_of",
    "direction_row_norm",
    "group_dora_modules",
    "module_scale",
    "normalise_magnitudes",
    "normalize_dora_adapter",
    "W0_CHOICES",
    "w0_quantisation",
]

W0_CHOICES = ("unquantised", "nf4")
_ADAPTER_KEY = re.compile(
    r"^base_model\.model\.(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_magnitude_vector)$"
)


def group_dora_modules(weights: dict[str, torch.Tensor]) -> dict[str, dict[str, str]]:
    """Module name (as in the base model) -> {"A": key, "B": key, "m": key} for every module with a magnitude.

    Raises:
        AdapterError: a magnitude belongs to a module without linear LoRA factors (embedding or convolution DoRA,
            which the row-scaling convention does not cover).
    """
    modules: dict[str, dict[str, str]] = {}
    for key in weights:
        match = _ADAPTER_KEY.match(key)
        if match:
            part = {"lora_A.weight": "A", "lora_B.weight": "B", "lora_magnitude_vector": "m"}[match["part"]]
            modules.setdefault(match["module"], {})[part] = key
    dora = {name: parts for name, parts in modules.items() if "m" in parts}
    for name, parts in dora.items():
        if "A" not in parts or "B" not in parts or weights[parts["A"]].ndim != 2:
            raise AdapterError(
                f'module "{name}" has a DoRA magnitude but no linear LoRA factors (embedding or convolution DoRA); '
                "only linear layers can be exported with normalised magnitudes."
            )
    return dora


def module_scale(adapter_config: dict, module_name: str, rank: int) -> tuple[float, float]:
    """(alpha, s) for one module, the way peft computes it: alpha_pattern first, then rsLoRA or plain alpha/r.

    `rank` is read from the saved A factor, which is what rank_pattern produced at training time.
    """
    from peft.utils.other import get_pattern_key

    alpha_pattern = adapter_config.get("alpha_pattern") or {}
    alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module_name), adapter_config["lora_alpha"])
    scale = alpha / math.sqrt(rank) if adapter_config.get("use_rslora") else alpha / rank
    return float(alpha), float(scale)


def direction_row_norm(w0: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """||W0 + s·B A|| per output row, in float32 ([out])."""
    return torch.linalg.vector_norm(w0.float() + scale * (lora_b.float() @ lora_a.float()), dim=1)


def w0_quantisation(records, w0: str) -> QuantisationSettings:
    """How to load W0: 4-bit exactly as training quantised it (recipe.json), or unquantised float32."""
    if w0 == "nf4":
        return quantisation_for_adapter(records, bits=4, dtype=None)
    return QuantisationSettings.unquantised("float32")


def base_weights_of(model, module_names: list[str], base_path: str) -> dict[str, torch.Tensor]:
    """Float32 W0 ([out, in]) of each named module of a loaded base (4-bit layers dequantised).

    Raises:
        AdapterError: a module the adapter names does not exist in the base model (wrong base).
    """
    import bitsandbytes as bnb

    weights = {}
    for name in module_names:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise AdapterError(
                f'the adapter adapts "{name}", which the base model at {base_path} does not have: the adapter was '
                "trained on another base. Pass the right one with -b/--base-model."
            ) from None
        if isinstance(module, bnb.nn.Linear4bit):
            weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
        else:
            weight = module.weight.data
        weights[name] = weight.detach().float().clone()
    return weights


def normalise_magnitudes(
    weights: dict[str, torch.Tensor], adapter_config: dict, base_weights: dict[str, torch.Tensor],
    modules: dict[str, dict[str, str]],
) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """Replace each magnitude m by m / ||W0 + s·B A||_row; returns the new tensors and a per-module record."""
    normalised = dict(weights)
    per_module = {}
    for name, parts in sorted(modules.items()):
        lora_a, lora_b, magnitude = weights[parts["A"]], weights[parts["B"]], weights[parts["m"]]
        w0 = base_weights[name]
        if adapter_config.get("fan_in_fan_out"):
            w0 = w0.T  # Conv1D stores [in, out]; peft's DoRA norm is over output rows either way
        if w0.shape != (lora_b.shape[0], lora_a.shape[1]) or magnitude.shape != (lora_b.shape[0],):
            raise AdapterError(
                f'module "{name}": base weight {tuple(w0.shape)} does not fit the adapter (B {tuple(lora_b.shape)}, '
                f"A {tuple(lora_a.shape)}, magnitude {tuple(magnitude.shape)}): it was trained on another base."
            )
        alpha, scale = module_scale(adapter_config, name, lora_a.shape[0])
        norm = direction_row_norm(w0, lora_a, lora_b, scale)
        normalised[parts["m"]] = (magnitude.float() / norm).to(magnitude.dtype).contiguous()
        per_module[name] = {"rank": int(lora_a.shape[0]), "alpha": alpha, "scale": scale}
    return normalised, per_module


def normalize_dora_adapter(
    adapter_dir: str | Path,
    out: str | Path,
    base_model: str | None = None,
    w0: str = "unquantised",
    overwrite: bool = False,
) -> dict:
    """Write a copy of a DoRA adapter whose magnitudes are m / ||W0 + s·BA||_row, marked as normalised.

    Args:
        adapter_dir: a peft DoRA adapter folder.
        out: the folder to write (must not exist unless `overwrite`).
        base_model: the base model id or folder (default: the one the adapter's records name).
        w0: "unquantised" (the saved base weights) or "nf4" (the 4-bit dequantised weights training saw).
        overwrite: replace an existing `out`.

    Returns:
        The normalisation record (also written to `out/dora_normalisation.json`).

    Raises:
        AdapterError: not a DoRA adapter, already normalised, or it does not fit the base.
    """
    adapter_dir = Path(adapter_dir).expanduser().resolve()
    out = Path(out).expanduser().absolute()  # resolved by claim_output_folder; messages show it as given
    if w0 not in W0_CHOICES:
        raise AdapterError(f'--w0 must be one of {", ".join(W0_CHOICES)}, not "{w0}".')
    records = read_adapter_records(adapter_dir)
    refuse_if_normalised(adapter_dir)
    if not records.is_dora:
        raise AdapterError(
            f"{adapter_dir} is a LoRA adapter (use_dora is false): it has no magnitudes, so there is nothing to "
            "normalise. Runtimes load LoRA adapters as they are."
        )
    if w0 == "nf4" and records.recipe is not None and records.trained_quant_bits != 4:
        trained = f"{records.trained_quant_bits}-bit" if records.trained_quant_bits else "unquantised"
        raise AdapterError(
            f"--w0 nf4 asks for the 4-bit weights training saw, but {adapter_dir}/recipe.json says the adapter was "
            f"trained on an {trained} base. Use --w0 unquantised."
        )
    inputs = (("the adapter folder", adapter_dir),
              ("the base model folder", local_base_model_folder(adapter_dir, base_model)))
    # Held from here to the end: one writer per output, and `out` checked before the base model loads.
    with claim_output_folder(out, overwrite=overwrite, record=NORMALISED_RECORD, made_by="lora/normalize_dora.py",
                             kind="a normalised DoRA adapter", inputs=inputs, flag="-o/--out-dir") as claim:
        started = time.monotonic()
        record = _normalise_into(claim, adapter_dir, records, base_model, w0)
    print(f"normalize: wrote {out} ({time.monotonic() - started:.1f} s); it is marked as normalised, so merge, "
          "eval and serve refuse it", flush=True)
    return record


def _normalise_into(claim, adapter_dir: Path, records, base_model: str | None, w0: str) -> dict:
    """Compute the normalised magnitudes, write them into `claim`'s build folder and publish it; returns the record."""
    weights = read_adapter_weights(adapter_dir)
    modules = group_dora_modules(weights)
    if not modules:
        raise AdapterError(f"{adapter_dir}/{ADAPTER_WEIGHTS} holds no lora_magnitude_vector tensors to normalise.")

    quantisation = w0_quantisation(records, w0)
    base = load_base_for_adapter(adapter_dir, base_override=base_model, quantisation=quantisation)
    base_path, origin = base.base_path, base.base_origin
    refuse_output_over_inputs(claim.out, [("the base model folder", base_path)])  # a hub id: its cache folder
    print(f"normalize: {len(modules)} DoRA modules, W0 = {w0} weights of {base_path}", flush=True)
    base_weights = base_weights_of(base.model, sorted(modules), base_path)
    del base
    normalised, per_module = normalise_magnitudes(weights, records.adapter_config, base_weights, modules)

    w0_record = {"kind": "unquantised", "dtype": "float32"}
    if w0 == "nf4":
        w0_record = {"kind": "4-bit dequantised (as seen in training)", "quant_type": quantisation.quant_type,
                     "double_quant": quantisation.double_quant, "blocksize": 64}
    record = {
        "convention": "TensorRT-LLM examples/dora/normalize_weights.py: magnitude := m / ||W0 + s*B@A||_row",
        "apply_as": "y = magnitude * (x @ W0.T + s * x @ A.T @ B.T) + bias   (rows of base + LoRA output scaled)",
        "source_adapter": str(adapter_dir),
        "base_model": base_model or records.base_model,
        "base_model_path": base_path,
        "base_model_origin": origin,
        "w0": w0_record,
        "adapter_trained_on_quant_bits": records.trained_quant_bits,
        "norm_dtype": "float32",
        "use_rslora": bool(records.adapter_config.get("use_rslora")),
        "modules": per_module,
        "warning": "peft, merge, eval and serve must not load this adapter: they would divide by the norm twice.",
    }
    config = dict(records.adapter_config)
    config[NORMALISED_CONFIG_KEY] = True

    from safetensors.torch import save_file

    build = claim.new_build()
    save_file({key: tensor.contiguous() for key, tensor in normalised.items()}, str(build / ADAPTER_WEIGHTS),
              metadata={"format": "pt", NORMALISED_CONFIG_KEY: "true"})
    (build / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (build / NORMALISED_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    copy_tokenizer_files(adapter_dir, build)
    claim.publish()
    return record
