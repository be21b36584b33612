"""From a resolved recipe to library objects: quantisation config, tokenizer, base model, LoRA/DoRA config.

Pure builder functions in the style of TRL's `get_quantization_config` / `get_peft_config`. The bitsandbytes CPU
neutralisers are imported first so that no quantised layer is ever built without them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

import lora.bnb_cpu_fixes  # noqa: F401  (must run before any quantised model is built)
from lora.errors import ModelSourceError, RecipeError
from lora.quantised_layers import count_quantised_layers, quantisation_mismatch, requested_bits

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The container dtype of packed 4-bit weights: uint8 by default; FSDP can only shard them in the dtype of the other
# (unquantised) parameters, e.g. bfloat16.
STORAGE_DTYPES = {"uint8": torch.uint8, **DTYPES}


def torch_dtype(name: str):
    return "auto" if name == "auto" else DTYPES[name]


def build_quantization_config(recipe):
    """`BitsAndBytesConfig` for 4-bit/8-bit recipes, None for an unquantised base."""
    from transformers import BitsAndBytesConfig

    # Callers outside the runner (eval, serve, merge) pass partial dicts read from an adapter's recipe.json.
    storage = recipe.get("bnb_4bit_quant_storage", "uint8")
    if stores_4bit_as_float(recipe) and storage != recipe.get("dtype", "float32"):
        raise RecipeError(
            f'recipe "{getattr(recipe, "name", "?")}": bnb_4bit_quant_storage is {storage} but dtype is '
            f'{recipe["dtype"]}; FSDP/ZeRO-3 can only shard a 4-bit base whose unquantised parameters have the '
            f'storage dtype: set dtype "{recipe["bnb_4bit_quant_storage"]}" (or the storage back to "uint8").'
        )
    if recipe["quant_bits"] == 4:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=recipe["bnb_4bit_quant_type"],
            bnb_4bit_use_double_quant=recipe["bnb_4bit_use_double_quant"],
            bnb_4bit_compute_dtype=DTYPES[recipe["bnb_4bit_compute_dtype"]],
            bnb_4bit_quant_storage=STORAGE_DTYPES[storage],
        )
    if recipe["quant_bits"] == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=recipe["llm_int8_threshold"])
    return None


def device_map_for_this_process():
    """Each process holds its own full copy on its own device (never `device_map="auto"` under DDP)."""
    if torch.cuda.is_available():
        return {"": int(os.environ.get("LOCAL_RANK", 0))}
    return None


def load_tokenizer(model_path: str, trust_remote_code: bool = False):
    """The model's tokenizer, with a pad token (EOS when it has none) and right padding for training.

    The vocabulary never grows: a new pad token would add an embedding row, and the saved adapter would then carry
    the whole embedding matrix and no longer load onto the plain base (what FinLoRA's Llama pad token does to
    SmolLM2 under axolotl). Padding is masked out of the loss and attention, so reusing EOS costs nothing.
    """
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise ModelSourceError(f"cannot load a tokenizer from {model_path}: {error}") from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelSourceError(
                f"the tokenizer in {model_path} has neither a pad token nor an EOS token; the runner will not add "
                f"one (a new token grows the vocabulary and the adapter would no longer fit the base). Name an "
                f'existing token as "pad_token" (or "eos_token") in {Path(model_path) / "tokenizer_config.json"}.'
            )
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def load_base_model(
    model_path: str,
    quant_bits: int | None,
    *,
    quantization_config=None,
    dtype: str = "float32",
    trust_remote_code: bool = False,
):
    """A causal LM, quantised per `quantization_config` (built from quant_bits defaults when not given).

    A quantised request is checked on the loaded layers: a 4-bit (8-bit) request that produced no 4-bit (8-bit)
    bitsandbytes layer is an error, never a silently unquantised base.
    """
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if quantization_config is None and quant_bits == 4:
        quantization_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    elif quantization_config is None and quant_bits == 8:
        quantization_config = BitsAndBytesConfig(load_in_8bit=True)
    check_weight_files(model_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            model_path,
            dtype=torch_dtype(dtype),
            quantization_config=quantization_config,
            device_map=device_map_for_this_process(),
            trust_remote_code=trust_remote_code,
        )
    except OSError as error:
        raise ModelSourceError(f"cannot load model weights from {model_path}: {error}") from None
    problem = quantisation_mismatch(requested_bits(quantization_config), count_quantised_layers(model))
    if problem:
        raise ModelSourceError(
            f"{model_path}: {problem}. bitsandbytes quantises torch.nn.Linear layers only; train this model "
            f"unquantised (quant_bits null) or with a base whose layers are nn.Linear."
        )
    lora.bnb_cpu_fixes.disable_cpu_weight_repacking(model)
    return model


def check_weight_files(model_path: str) -> None:
    """Raise when a safetensors weights file of a local model folder is truncated or corrupt (read from its header,
    before minutes of loading; the loader itself would fail with a bare library error that names no file).

    Raises:
        ModelSourceError: naming the file and how to get a whole copy.
    """
    from lora.artifacts import file_problem

    folder = Path(model_path)
    for path in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
        problem = file_problem(path)
        if problem:
            raise ModelSourceError(
                f"cannot load model weights from {model_path}: {path} is damaged: {problem}. Copy or download the "
                "model again (a model converted by this project: delete the folder and run python "
                "lora/model_source.py MODEL_ID)."
            )


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
    from lora.errors import did_you_mean

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


def stores_4bit_as_float(recipe) -> bool:
    """A 4-bit base whose packed weights live in a float dtype: the layout FSDP and ZeRO-3 can shard.

    Sharding flattens the parameters of a block into one tensor of a single dtype, so such a base keeps every
    unquantised parameter in the recipe's `dtype` (equal to the storage dtype) instead of peft's float32 upcast.
    """
    return recipe["quant_bits"] == 4 and recipe.get("bnb_4bit_quant_storage", "uint8") != "uint8"


def attach_adapter(recipe, model):
    """Freeze the base, prepare it for k-bit training, attach LoRA/DoRA, and switch DoRA to the fast path."""
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import set_seed

    check_target_modules(recipe, model)
    # No KV cache while training: it is useless there, and its presence switches off transformers' detection of
    # packed sequences (attention would then leak across packed examples).
    model.config.use_cache = False
    if recipe.quantised and not stores_4bit_as_float(recipe):
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
        from lora.fast_dora import enable_fast_dora

        enable_fast_dora(peft_model)
    return peft_model


# adapter_config.json key -> the recipe field that must equal it for init_adapter to continue that adapter.
INIT_ADAPTER_FIELDS = {"r": "lora_r", "lora_alpha": "lora_alpha", "use_dora": "use_dora", "use_rslora": "use_rslora"}


def check_init_adapter(recipe, base_model_id: str) -> None:
    """Fail before any model loads unless `init_adapter` is a complete peft LoRA/DoRA adapter trained on this base
    with this recipe's rank, alpha, DoRA and rsLoRA settings (a mismatch would load, or fail, far from its cause).
    A DoRA export normalised for an inference runtime is refused like every other tool refuses it."""
    from lora.adapter_io import (
        ADAPTER_CONFIG,
        ADAPTER_WEIGHTS,
        AdapterError,
        read_adapter_records,
        refuse_if_normalised,
    )

    folder = Path(recipe["init_adapter"])
    where = f'recipe "{recipe.name}": field "init_adapter" ({folder})'
    if not (folder / ADAPTER_CONFIG).is_file() or not (folder / ADAPTER_WEIGHTS).is_file():
        from lora.recipes import read_registry, runnable_names

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

    from lora.adapter_io import read_adapter_records, read_adapter_weights

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
