"""Attaching LoRA/DoRA to a loaded base from a recipe: target modules, the LoraConfig, starting from a trained
adapter."""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

import lora.models.bnb_cpu_fixes  # noqa: F401  (must run before any quantised model is built)
from lora.core.errors import RecipeError
from lora.models.quantisation import QuantisationSettings

__all__ = [
    "attach_adapter",
    "build_lora_config",
    "check_init_adapter",
    "check_target_modules",
    "find_linear_module_names",
    "INIT_ADAPTER_FIELDS",
    "load_initial_adapter",
]


def find_linear_module_names(model) -> list[str]:
    """Suffixes of every linear layer (plain, 4-bit or 8-bit) except the output head: LoRA's 'all-linear'."""
    import bitsandbytes as bnb

    linear_types = (nn.Linear, bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    head = model.get_output_embeddings()
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, linear_types) and module is not head
    }
    return sorted(names)


def build_lora_config(recipe, model):
    """peft `LoraConfig` for LoRA, DoRA and rsLoRA; 'all-linear' is expanded to the detected layer names."""
    from peft import LoraConfig

    targets = recipe["lora_target_modules"]
    if targets == "all-linear":
        targets = find_linear_module_names(model)
    return LoraConfig(
        r=recipe["lora_r"],
        lora_alpha=recipe["lora_alpha"],
        lora_dropout=recipe["lora_dropout"],
        target_modules=targets,
        use_dora=recipe["use_dora"],
        use_rslora=recipe["use_rslora"],
        bias="none",
        task_type="CAUSAL_LM",
    )


def check_target_modules(recipe, model) -> None:
    """Fail early, naming the available layers, when a listed target module does not exist in the model."""
    from lora.core.errors import did_you_mean

    targets = recipe["lora_target_modules"]
    if targets == "all-linear":
        return
    available = find_linear_module_names(model)
    missing = [name for name in targets if name not in available]
    if missing:
        hints = "; ".join(f'"{name}"{did_you_mean(name, available)}' for name in missing)
        raise RecipeError(
            f'recipe "{recipe.name}": field "lora_target_modules" names layers this model does not have: {hints}. '
            f"Linear layers of {recipe['base_model']}: {', '.join(available)}."
        )


def attach_adapter(recipe, model):
    """Freeze the base, prepare it for k-bit training, attach LoRA/DoRA, and switch DoRA to the fast path."""
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import set_seed

    check_target_modules(recipe, model)
    # No KV cache while training: it is useless there, and its presence switches off transformers' detection of
    # packed sequences (attention would then leak across packed examples).
    model.config.use_cache = False
    if recipe.quantised and not QuantisationSettings.from_recipe(recipe).stores_4bit_as_float:
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=recipe["gradient_checkpointing"],
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif recipe["gradient_checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    set_seed(recipe["seed"])  # the adapter's initial weights follow the recipe's seed, whatever ran before
    peft_model = get_peft_model(model, build_lora_config(recipe, model))
    if recipe["init_adapter"]:
        load_initial_adapter(recipe, peft_model)
    if recipe["use_dora"] and recipe["fast_dora"]:
        from lora.adapters.fast_dora import enable_fast_dora

        enable_fast_dora(peft_model)
    return peft_model


# adapter_config.json key -> the recipe field that must equal it for init_adapter to continue that adapter.
INIT_ADAPTER_FIELDS = {"r": "lora_r", "lora_alpha": "lora_alpha", "use_dora": "use_dora", "use_rslora": "use_rslora"}


def check_init_adapter(recipe, base_model_id: str) -> None:
    """Fail before any model loads unless `init_adapter` is a complete peft LoRA/DoRA adapter trained on this base
    with this recipe's rank, alpha, DoRA and rsLoRA settings (a mismatch would load, or fail, far from its cause).
    A DoRA export normalised for an inference runtime is refused like every other tool refuses it."""
    from lora.adapters.folders import (
        ADAPTER_CONFIG,
        ADAPTER_WEIGHTS,
        AdapterError,
        read_adapter_records,
        refuse_if_normalised,
    )

    folder = Path(recipe["init_adapter"])
    where = f'recipe "{recipe.name}": field "init_adapter" ({folder})'
    if not (folder / ADAPTER_CONFIG).is_file() or not (folder / ADAPTER_WEIGHTS).is_file():
        from lora.recipes.registry import read_registry, runnable_names

        producer = folder.name if folder.name in runnable_names(read_registry(recipe.registry_path)[1]) else None
        hint = (f"train it first: python lora/finetune.py {producer}" if producer
                else "lora/finetune.py writes them to outputs/<recipe>/")
        raise RecipeError(f"{where} is not a finished adapter folder (expected {ADAPTER_CONFIG} and "
                          f"{ADAPTER_WEIGHTS} in it; {hint}).")
    try:
        refuse_if_normalised(folder)
        records = read_adapter_records(folder)
    except AdapterError as error:  # the shared reader's words, said about this recipe's field
        raise RecipeError(f"{where}: {error}") from None
    config = records.adapter_config
    if config.get("peft_type") != "LORA":
        raise RecipeError(f"{where} holds a {config.get('peft_type')} adapter; only LoRA/DoRA adapters can be "
                          f"continued (lora/convert_adapter.py imports other formats as peft LoRA).")
    problems = [f'"{recipe.field_name(field)}" is {recipe[field]!r} but the adapter has {key}={config.get(key)!r} '
                f'(set "{recipe.field_name(field)}": {json.dumps(config.get(key))})'
                for key, field in INIT_ADAPTER_FIELDS.items() if config.get(key, False) != recipe[field]]
    if records.base_model and records.base_model != base_model_id:
        problems.append(f'"base_model" is {base_model_id!r} but the adapter was trained on {records.base_model!r} '
                        f'(set "base_model": {json.dumps(records.base_model)})')
    if problems:
        raise RecipeError(f"{where} does not match the recipe: " + "; ".join(problems) + ".")


def load_initial_adapter(recipe, peft_model) -> None:
    """Overwrite the freshly built adapter "default" with init_adapter's weights, requiring every weight to match.

    The recipe's LoraConfig (dropout included) stays in charge; only the trained tensors come from the folder.
    """
    from peft.utils import set_peft_model_state_dict

    from lora.adapters.folders import read_adapter_records, read_adapter_weights

    def names(targets):  # peft keeps a list/set of module names, or one regular expression
        return targets if isinstance(targets, str) else sorted(set(targets))

    built = names(peft_model.peft_config["default"].target_modules)
    saved = names(read_adapter_records(recipe["init_adapter"]).adapter_config.get("target_modules") or [])
    if built != saved:
        raise RecipeError(
            f'recipe "{recipe.name}": field "init_adapter" ({recipe["init_adapter"]}) adapts {saved} but the '
            f"recipe's lora_target_modules resolve to {built} (set \"lora_target_modules\": {json.dumps(saved)})."
        )
    result = set_peft_model_state_dict(peft_model, read_adapter_weights(recipe["init_adapter"]),
                                       adapter_name="default")
    expected = {name for name in peft_model.state_dict() if "lora_" in name and ".default" in name}
    missing = sorted(expected.intersection(result.missing_keys))
    if missing or result.unexpected_keys:
        raise RecipeError(
            f'recipe "{recipe.name}": field "init_adapter" ({recipe["init_adapter"]}) does not fit the model: '
            f"{len(missing)} adapter weight(s) missing (e.g. {missing[:2]}), {len(result.unexpected_keys)} "
            f"unexpected (e.g. {result.unexpected_keys[:2]})."
        )
