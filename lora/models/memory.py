"""Memory estimates of a recipe before any model loads: base weights at their quantised size, trainable parameters
with their gradients and AdamW state, activations per token, and the transient peaks; `python lora/memory_estimate.py`
and `lora/finetune.py --dry-run` print them.

Under a sharding engine (FSDP, DeepSpeed ZeRO: `engine`, an object with `num_processes`, `shards_parameters`,
`shards_gradients`, `shards_optimizer` and `label`, as lora.training.engines.Engine) each process holds 1/N of what
is sharded, plus the whole weights of the layers being gathered for a forward or backward (`gathered`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "activation_bytes",
    "activation_bytes_per_token",
    "base_weight_bytes",
    "BLOCKSIZE_4BIT",
    "BYTES_PER_TRAINABLE_PARAMETER",
    "CUDA_CONTEXT_BYTES",
    "describe_memory",
    "detected_device_memory",
    "DOUBLE_QUANT_BLOCKS",
    "DTYPE_BYTES",
    "estimate_memory",
    "format_estimate",
    "FRAMEWORK_OVERHEAD",
    "GB",
    "LinearLayer",
    "load_model_config",
    "MemoryEstimate",
    "model_shape_from_config",
    "ModelShape",
    "trainable_parameter_count",
    "transient_bytes",
]

GB = 1e9
BLOCKSIZE_4BIT = 64  # weights per absmax constant
DOUBLE_QUANT_BLOCKS = 256  # absmax constants per second-level constant
FRAMEWORK_OVERHEAD = 0.05
CUDA_CONTEXT_BYTES = 0.5e9
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
BYTES_PER_TRAINABLE_PARAMETER = 4 + 4 + 8  # fp32 weight + fp32 gradient + AdamW exp_avg and exp_avg_sq


@dataclass
class LinearLayer:
    name: str
    in_features: int
    out_features: int
    has_bias: bool


@dataclass
class ModelShape:
    """What the estimate needs to know about an architecture, read from a meta-device instance."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    kv_size: int  # num_key_value_heads x head_dim
    vocab_size: int
    linears: list[LinearLayer]  # every linear layer except the output head: what bitsandbytes quantises
    other_parameters: int  # embeddings, output head, norms, biases: kept unquantised
    config_dtype: str | None


@dataclass
class MemoryEstimate:
    """Bytes per process; `total` includes the framework overhead but not the CUDA context."""

    base_weights: float
    adapter_states: float
    activations: float
    activations_other_setting: float  # the same recipe with gradient checkpointing toggled
    transient: float
    framework_overhead: float
    total: float
    total_other_setting: float
    trainable_parameters: int
    tokens: int
    gradient_checkpointing: bool
    gathered: float = 0.0  # sharded weights gathered whole for the layers being computed (0 when not sharded)
    base_weights_whole: float = 0.0  # the unsharded base, which every process loads before the engine shards it
    engine_label: str = "one process"
    num_processes: int = 1


def model_shape_from_config(config) -> ModelShape:
    """Instantiate the architecture on the meta device (no memory) and read its layer shapes."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    head_module = model.get_output_embeddings()
    linears, linear_weights = [], set()
    for name, module in model.named_modules():
        if module is head_module:
            continue
        if isinstance(module, torch.nn.Linear):
            linears.append(LinearLayer(name, module.in_features, module.out_features, module.bias is not None))
        elif isinstance(module, Conv1D):  # GPT-2 style: weight is (in, out)
            linears.append(LinearLayer(name, *module.weight.shape, module.bias is not None))
        else:
            continue
        linear_weights.add(id(module.weight))
    other = sum(p.numel() for p in model.parameters() if id(p) not in linear_weights)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = text.hidden_size
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    dtype = getattr(text, "dtype", None) or getattr(text, "torch_dtype", None)
    return ModelShape(
        hidden_size=hidden,
        intermediate_size=getattr(text, "intermediate_size", None) or 4 * hidden,
        num_layers=text.num_hidden_layers,
        num_heads=heads,
        kv_size=(getattr(text, "num_key_value_heads", None) or heads) * head_dim,
        vocab_size=text.vocab_size,
        linears=linears,
        other_parameters=other,
        config_dtype=str(dtype).replace("torch.", "") if dtype is not None else None,
    )


def _short_name(layer: LinearLayer) -> str:
    """The projection's own name ("q_proj"), as recipes' lora_target_modules name it."""
    return layer.name.rsplit(".", 1)[-1]


def _targets(recipe, shape: ModelShape) -> list[LinearLayer]:
    wanted = recipe["lora_target_modules"]
    if wanted == "all-linear":
        return shape.linears
    return [layer for layer in shape.linears if _short_name(layer) in wanted]


def base_weight_bytes(recipe, shape: ModelShape) -> float:
    """The frozen base as the runner holds it (see the module docstring)."""
    linear_params = sum(layer.in_features * layer.out_features for layer in shape.linears)
    unquantised = shape.other_parameters
    bits = recipe["quant_bits"]
    if bits == 4:
        if recipe["bnb_4bit_use_double_quant"]:
            constants = linear_params / BLOCKSIZE_4BIT * (1 + 4 / DOUBLE_QUANT_BLOCKS)
        else:
            constants = linear_params / BLOCKSIZE_4BIT * 4
        return linear_params / 2 + constants + _unquantised_bytes(recipe, shape) * unquantised
    if bits == 8:
        row_scales = 4 * sum(layer.out_features for layer in shape.linears)
        return linear_params + row_scales + _unquantised_bytes(recipe, shape) * unquantised
    return _weight_dtype_bytes(recipe, shape) * (linear_params + unquantised)


def _unquantised_bytes(recipe, shape: ModelShape) -> int:
    """Bytes per unquantised weight (and per residual-stream value): peft upcasts them to float32 for a quantised
    base, except a 4-bit base stored in a float dtype for FSDP/ZeRO-3, which keeps the recipe's dtype."""
    sharded_layout = recipe["quant_bits"] == 4 and recipe["bnb_4bit_quant_storage"] != "uint8"
    return 4 if recipe.quantised and not sharded_layout else _weight_dtype_bytes(recipe, shape)


def _weight_dtype_bytes(recipe, shape: ModelShape) -> int:
    dtype = recipe["dtype"]
    if dtype == "auto":
        dtype = shape.config_dtype if shape.config_dtype in DTYPE_BYTES else "float32"
    return DTYPE_BYTES[dtype]


def trainable_parameter_count(recipe, shape: ModelShape) -> int:
    rank = recipe["lora_r"]
    count = 0
    for layer in _targets(recipe, shape):
        count += rank * (layer.in_features + layer.out_features)
        if recipe["use_dora"]:
            count += layer.out_features
    return count


def activation_bytes_per_token(recipe, shape: ModelShape, mask_bytes: int = 1) -> tuple[float, float, float]:
    """(one decoder layer, one checkpointed layer input, the output head and loss), in bytes per token.

    `mask_bytes`: bytes per element of peft's dropout mask: 1 on CUDA (a bool mask), 4 on CPU (PyTorch's CPU
    dropout keeps a float mask of the input's dtype); fast DoRA keeps a bool mask on both.
    """
    stream = _unquantised_bytes(recipe, shape)
    hidden, intermediate = shape.hidden_size, shape.intermediate_size
    norms = 2 * 4 * hidden  # RMSNorm computes in float32 and keeps its input for backward
    attention = stream * (2 * hidden + 2 * shape.kv_size) + 4 * shape.num_heads  # q, k, v, output, log-sum-exp
    mlp = 3 * stream * intermediate  # gate, up, act(gate)
    lora = 0.0
    per_layer_targets = [t for t in _targets(recipe, shape) if _layer_index(t.name) == _first_layer_index(shape)]
    for layer in per_layer_targets:
        lora += 4 * recipe["lora_r"]  # A's output
        lora += _dropout_and_dora_bytes_per_token(recipe, layer, stream, mask_bytes)
    lora += _adapter_input_bytes_per_token(recipe, per_layer_targets, stream)
    eight_bit_inputs = 0.0
    if recipe["quant_bits"] == 8:
        layer_linears = [t for t in shape.linears if _layer_index(t.name) == _first_layer_index(shape)]
        eight_bit_inputs = stream * sum(layer.in_features for layer in layer_linears)
    per_layer = norms + attention + mlp + lora + eight_bit_inputs
    loss = shape.vocab_size * (12 if stream == 4 else 14)
    return per_layer, stream * hidden, loss


# Projections of one decoder layer that read the same input tensor.
_SAME_INPUT = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _peft_dropout_applies(recipe) -> bool:
    """Whether peft's own dropout runs (it keeps each layer's dropped-out input); fast DoRA fuses its own."""
    return recipe["lora_dropout"] > 0 and not (recipe["use_dora"] and recipe["fast_dora"])


def _adapter_input_bytes_per_token(recipe, layer_targets: list[LinearLayer], stream: int) -> float:
    """The float32 input the adapters keep for A's gradient, per token.

    Each layer keeps its own when peft's dropout runs (a dropped-out copy each) or when the stream is not float32
    (peft casts the input per layer); otherwise layers reading the same input share one tensor."""
    if _peft_dropout_applies(recipe) or stream != 4:
        return 4 * sum(layer.in_features for layer in layer_targets)
    inputs = {}
    for layer in layer_targets:
        short = _short_name(layer)
        group = next((names for names in _SAME_INPUT if short in names), short)
        inputs[group] = layer.in_features
    return 4 * sum(inputs.values())


# Llama's MLP keeps these projections' outputs for backward anyway (counted in `mlp`), so fast DoRA keeping its
# output y costs nothing more there.
_OUTPUT_KEPT_BY_THE_NEXT_OP = ("gate_proj", "up_proj")


def _dropout_and_dora_bytes_per_token(recipe, layer: LinearLayer, stream: int, mask_bytes: int) -> float:
    """What one adapted layer keeps for backward beyond LoRA's input and A's output, per token.

    Fast DoRA (lora.adapters.fast_dora) keeps its output y without dropout, and with dropout a bool mask and one
    float32 sum base(x_d) + s·lora(x_d); stock peft DoRA keeps the base and adapter outputs, and its dropout the
    mask (`mask_bytes`; the dropped-out input is counted with the adapter's input). Stock DoRA also keeps
    weight-sized tensors per layer (its weight-norm graph), not counted here: on small batches the estimate is
    low for it (measured 0.63-0.89 of what autograd kept on the tiny test models)."""
    dropout = recipe["lora_dropout"] > 0
    if not recipe["use_dora"]:
        return mask_bytes * layer.in_features if dropout else 0
    if not recipe["fast_dora"]:
        return 2 * stream * layer.out_features + (mask_bytes * layer.in_features if dropout else 0)
    if dropout:
        return 1 * layer.in_features + 4 * layer.out_features
    return 0 if _short_name(layer) in _OUTPUT_KEPT_BY_THE_NEXT_OP else stream * layer.out_features


def _layer_index(name: str) -> int | None:
    parts = name.split(".")
    return next((int(part) for part in parts if part.isdigit()), None)


def _first_layer_index(shape: ModelShape) -> int | None:
    return next((index for index in (_layer_index(t.name) for t in shape.linears) if index is not None), None)


def activation_bytes(recipe, shape: ModelShape, gradient_checkpointing: bool, mask_bytes: int = 1) -> float:
    tokens = recipe["batch_size"] * recipe["max_seq_length"]
    per_layer, layer_input, loss = activation_bytes_per_token(recipe, shape, mask_bytes)
    if gradient_checkpointing:
        # Every layer's input stays; the loss's tensors are freed before backward reaches the layers, and then
        # one layer at a time is recomputed: the peak is the larger of the two on top of the layer inputs.
        return tokens * (shape.num_layers * layer_input + max(per_layer, loss))
    return tokens * (shape.num_layers * per_layer + loss)


def transient_bytes(recipe, shape: ModelShape) -> float:
    """One quantised weight dequantised for a matmul (in the compute dtype), the largest one."""
    if not recipe.quantised or not shape.linears:
        return 0.0
    largest = max(layer.in_features * layer.out_features for layer in shape.linears)
    compute = DTYPE_BYTES[recipe["bnb_4bit_compute_dtype"]] if recipe["quant_bits"] == 4 else 4
    return largest * compute


# FSDP gathers one wrapped decoder layer for its computation and prefetches the next; ZeRO-3 gathers module by module
# with a prefetch bucket: about two layers' weights whole on every process.
GATHERED_LAYERS = 2


def estimate_memory(recipe, shape: ModelShape, on_cuda: bool = True, engine=None) -> MemoryEstimate:
    """The estimate for one process of a resolved recipe on a model of this shape (on a CUDA device, or on CPU),
    under `engine` (None: one process or DDP, where every process holds everything)."""
    mask_bytes = 1 if on_cuda else 4
    checkpointing = bool(recipe["gradient_checkpointing"])
    trainable = trainable_parameter_count(recipe, shape)
    processes = max(1, getattr(engine, "num_processes", 1))
    shard = {kind: (1 / processes if getattr(engine, f"shards_{kind}", False) else 1.0)
             for kind in ("parameters", "gradients", "optimizer")}
    base = base_weight_bytes(recipe, shape)
    gathered = 0.0
    if shard["parameters"] < 1 and shape.num_layers:
        # the decoder layers' share of the base (embeddings and head are not in a layer), two of them whole
        layers_share = base * (1 - shape.other_parameters / max(1, _parameter_count(shape)))
        gathered = min(GATHERED_LAYERS, shape.num_layers) * layers_share / shape.num_layers * (1 - shard["parameters"])
    parts = {
        "base_weights": base * shard["parameters"],
        "adapter_states": trainable * (4 * shard["parameters"] + 4 * shard["gradients"] + 8 * shard["optimizer"]),
        "activations": activation_bytes(recipe, shape, checkpointing, mask_bytes),
        "transient": transient_bytes(recipe, shape) + gathered,
    }
    other_activations = activation_bytes(recipe, shape, not checkpointing, mask_bytes)
    subtotal = sum(parts.values())
    other_subtotal = subtotal - parts["activations"] + other_activations
    return MemoryEstimate(
        **parts,
        activations_other_setting=other_activations,
        framework_overhead=FRAMEWORK_OVERHEAD * subtotal,
        total=(1 + FRAMEWORK_OVERHEAD) * subtotal,
        total_other_setting=(1 + FRAMEWORK_OVERHEAD) * other_subtotal,
        trainable_parameters=trainable,
        tokens=recipe["batch_size"] * recipe["max_seq_length"],
        gradient_checkpointing=checkpointing,
        gathered=gathered,
        base_weights_whole=base,
        engine_label=getattr(engine, "label", "one process"),
        num_processes=processes,
    )


def _parameter_count(shape: ModelShape) -> int:
    return sum(layer.in_features * layer.out_features for layer in shape.linears) + shape.other_parameters


def load_model_config(recipe):
    """The base model's config without loading weights or downloading anything but (online) its config.json.

    Returns:
        (config, where) or (None, why not).
    """
    from transformers import AutoConfig

    base = recipe["base_model"]
    folder = (recipe.registry_path.parent / Path(base).expanduser()).resolve()
    candidates = []
    if (folder / "config.json").is_file():
        candidates.append((str(folder), f"local folder {folder}"))
    else:
        candidates.extend(_cached_config_candidates(base))
    for path, where in candidates:
        try:
            return AutoConfig.from_pretrained(path, trust_remote_code=recipe["trust_remote_code"]), where
        except (OSError, ValueError, KeyError) as error:
            return None, f"the config at {where} could not be read ({error})"
    return None, (f'no config.json for "{base}" on this machine (not a local folder, not in the Hugging Face cache, '
                  "and the hub was not asked); run once online, or point base_model at a local folder")


def _cached_config_candidates(base: str) -> list[tuple[str, str]]:
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    from lora.models.source import converted_folder_if_complete, lora_recipes_cache

    candidates = []
    try:
        cached = try_to_load_from_cache(base, "config.json")
    except HFValidationError:
        cached = None
    if isinstance(cached, str):
        candidates.append((str(Path(cached).parent), "Hugging Face cache"))
    converted = converted_folder_if_complete(lora_recipes_cache() / "models" / base.rsplit("/", 1)[-1])
    if converted is not None:
        candidates.append((str(converted), f"converted copy {converted}"))
    return candidates


def detected_device_memory() -> tuple[str, float | None]:
    """(device description, bytes) of the first CUDA device, or of system RAM when there is none."""
    import os

    import torch

    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        return f"CUDA device 0 ({properties.name})", float(properties.total_memory)
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return "no CUDA device; CPU", None
    return "no CUDA device; CPU RAM", float(ram)


def format_estimate(recipe, estimate: MemoryEstimate, where: str, device: tuple[str, float | None]) -> str:
    checkpointing = "on" if estimate.gradient_checkpointing else "off"
    other = "off" if estimate.gradient_checkpointing else "on"
    quant = f"{recipe['quant_bits']}-bit" if recipe.quantised else recipe["dtype"]
    sharded = f", 1/{estimate.num_processes} per process under {estimate.engine_label}" if estimate.gathered else ""
    rows = [
        (f"base weights ({quant}{sharded})", estimate.base_weights),
        (f"adapter + grads + AdamW ({estimate.trainable_parameters / 1e6:.2f} M trainable)", estimate.adapter_states),
        (f"activations ({recipe['batch_size']} x {recipe['max_seq_length']} tokens, checkpointing {checkpointing})",
         estimate.activations),
        ("transient (one dequantised weight" + (f", {GATHERED_LAYERS} layers gathered whole)" if estimate.gathered
                                                else ")"), estimate.transient),
        (f"framework overhead ({FRAMEWORK_OVERHEAD:.0%})", estimate.framework_overhead),
    ]
    width = max(len(label) for label, _ in rows) + 2
    engine = f", {estimate.engine_label} x {estimate.num_processes}" if estimate.num_processes > 1 else ""
    lines = [f"memory estimate for {recipe.name} per process{engine} (model config from {where}):"]
    lines += [f"  {label:<{width}}{value / GB:8.2f} GB" for label, value in rows]
    lines.append(f"  {'total':<{width}}{estimate.total / GB:8.2f} GB"
                 f"   (gradient checkpointing {other}: {estimate.total_other_setting / GB:.2f} GB)")
    if estimate.gathered:
        # Measured on CPU processes (README): the loading peak, not the sharded steady state, sets the peak there.
        lines.append(f"  before sharding, each process loads the whole base ({estimate.base_weights_whole / GB:.2f} GB"
                     " at its quantised size): budget for that peak too")
    lines.append(f"  plus the CUDA context (~{CUDA_CONTEXT_BYTES / GB:.1f} GB, outside PyTorch's allocator) on a GPU")
    name, capacity = device
    if capacity is not None:
        verdict = "fits" if estimate.total <= capacity else "WARNING: exceeds"
        lines.append(f"  {verdict} {name}: {capacity / GB:.1f} GB")
        if estimate.total > capacity:
            hints = []
            if not estimate.gradient_checkpointing and estimate.total_other_setting <= capacity:
                hints.append("set gradient_checkpointing true")
            hints.append("lower batch_size (raise gradient_accumulation_steps) or max_seq_length")
            if recipe["quant_bits"] != 4:
                hints.append("use quant_bits 4")
            lines.append(f"  to fit: {'; or '.join(hints)}")
    return "\n".join(lines)


def describe_memory(recipe, engine=None) -> tuple[str, MemoryEstimate | None]:
    """The estimate as printable text (and the numbers), or a one-line note when the config is unknown; `engine`
    as in `estimate_memory`."""
    config, where = load_model_config(recipe)
    if config is None:
        return f"memory estimate: not available: {where}.", None
    try:
        shape = model_shape_from_config(config)
    except (ValueError, KeyError, TypeError, AttributeError, RuntimeError, ImportError) as error:
        note = f"cannot build {type(config).__name__} on the meta device ({error})"
        return f"memory estimate: not available: {note}.", None
    device = detected_device_memory()
    estimate = estimate_memory(recipe, shape, on_cuda=device[0].startswith("CUDA"), engine=engine)
    return format_estimate(recipe, estimate, where, device), estimate
