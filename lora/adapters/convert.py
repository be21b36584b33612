"""Import of NVlabs DoRA and torchtune LoRA/DoRA checkpoints as standard peft adapters (key renames, torchtune's
Llama q/k row permutation, alpha from the source config), checked against the base they are meant for.
`python lora/convert_adapter.py` is the command.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path

import torch

from lora.adapters.folders import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    TOKENIZER_FILE_NAMES,
    AdapterError,
    copy_tokenizer_files,
)
from lora.core.files import claim_output_folder, refuse_output_over_inputs

__all__ = [
    "check_complete_modules",
    "check_fits_base",
    "CONVERSION_RECORD",
    "convert_adapter",
    "convert_nvlabs",
    "convert_torchtune",
    "find_weights_file",
    "load_tensors",
    "NVLABS_WEIGHT_FILES",
    "PEFT_PREFIX",
    "read_json_if_present",
    "sha256_of",
    "SOURCES",
    "strip_wrappers",
    "TORCHTUNE_LLAMA_TYPES",
    "torchtune_rows_to_hf",
    "torchtune_to_hf_module",
    "TORCHTUNE_TO_HF_MODULES",
    "TORCHTUNE_TO_PEFT_PARTS",
    "TORCHTUNE_WEIGHT_FILES",
]

SOURCES = ("nvlabs", "torchtune")
CONVERSION_RECORD = "conversion.json"
PEFT_PREFIX = "base_model.model."
NVLABS_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
TORCHTUNE_WEIGHT_FILES = ("adapter_model.pt", "adapter_0.pt", "adapter_model.safetensors", "adapter_model.bin")
# torchtune module names -> Hugging Face Llama names (torchtune's convert_weights mapping, read for the facts).
TORCHTUNE_TO_HF_MODULES = {
    "attn.q_proj": "self_attn.q_proj",
    "attn.k_proj": "self_attn.k_proj",
    "attn.v_proj": "self_attn.v_proj",
    "attn.output_proj": "self_attn.o_proj",
    "mlp.w1": "mlp.gate_proj",
    "mlp.w2": "mlp.down_proj",
    "mlp.w3": "mlp.up_proj",
}
TORCHTUNE_TO_PEFT_PARTS = {
    "lora_a.weight": "lora_A.weight",
    "lora_b.weight": "lora_B.weight",
    "magnitude": "lora_magnitude_vector",
}
TORCHTUNE_LLAMA_TYPES = ("llama", "mistral")
_WRAPPER_SEGMENTS = ("_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")


def find_weights_file(source: Path, candidates: tuple[str, ...], what: str) -> Path:
    """The weights file of a checkpoint given as a folder or as the file itself."""
    if source.is_file():
        return source
    if not source.is_dir():
        raise AdapterError(f"{source} does not exist (expected a {what} checkpoint folder or weights file).")
    for name in candidates:
        if (source / name).is_file():
            return source / name
    raise AdapterError(f"{source} holds none of {', '.join(candidates)}: it is not a {what} checkpoint folder.")


def load_tensors(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    """Tensors from a safetensors file, or from a pickle when the user allowed it (tensors only even then)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    if not allow_pickle:
        raise AdapterError(
            f"{path} is a pickle file, and loading a pickle can run arbitrary code hidden in it. Pass --allow-pickle "
            "if you trust where it came from (it is then read with torch.load(weights_only=True), which accepts "
            "tensors only), or convert it to safetensors first."
        )
    import pickle

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
        raise AdapterError(f"{path} could not be read as a tensors-only checkpoint: {error}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise AdapterError(f"{path} does not hold a flat name -> tensor state dict.")
    return dict(state)


def read_json_if_present(path: Path) -> dict:
    """The JSON object in `path`, or {} when the file does not exist."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise AdapterError(f"{path}:{error.lineno}:{error.colno} is not valid JSON: {error.msg}.") from None
    return data if isinstance(data, dict) else {}


def strip_wrappers(key: str) -> str:
    """Drop torch.compile / activation-checkpointing / FSDP wrapper segments from a state-dict key."""
    for segment in _WRAPPER_SEGMENTS:
        key = key.replace(segment, "")
    return key


def convert_nvlabs(tensors: dict[str, torch.Tensor], config: dict, config_path: Path) -> tuple[dict, dict]:
    """NVlabs DoRA state dict + config -> (peft tensors, LoraConfig keyword arguments).

    Raises:
        AdapterError: the checkpoint uses a feature peft cannot express, or is not an NVlabs DoRA checkpoint.
    """
    if str(config.get("peft_type", "")).upper() != "DORA":
        raise AdapterError(
            f'{config_path} has peft_type "{config.get("peft_type")}", not "DORA": this is not an NVlabs DoRA '
            "checkpoint (a peft adapter with use_dora needs no conversion)."
        )
    if config.get("Wdecompose_target_modules"):
        raise AdapterError(
            f"{config_path} lists Wdecompose_target_modules {config['Wdecompose_target_modules']!r}: modules whose "
            "magnitude alone was trained (no LoRA factors). peft's DoRA always pairs a magnitude with LoRA factors, "
            "so these modules cannot be expressed; refusing rather than dropping their trained magnitudes."
        )
    if config.get("dora_simple") is False:
        raise AdapterError(
            f"{config_path} has dora_simple: false, i.e. gradients flowed through the weight norm in training. peft "
            "always detaches the norm, so continued training would silently change the method; refusing."
        )
    for key, allowed in (("bias", ("none", None)), ("enable_lora", (None,)), ("fan_in_fan_out", (False, None))):
        if config.get(key) not in allowed:
            raise AdapterError(f"{config_path}: {key} = {config.get(key)!r} is not supported by this converter.")

    peft_tensors, unknown = {}, []
    for raw_key, tensor in tensors.items():
        key = strip_wrappers(raw_key).replace(".default.", ".")
        if not key.startswith(PEFT_PREFIX):
            key = PEFT_PREFIX + key
        if key.endswith((".lora_A.weight", ".lora_B.weight")):
            peft_tensors[key] = tensor.contiguous()
        elif key.endswith(".weight_m_wdecomp.weight"):
            module = key[: -len(".weight_m_wdecomp.weight")]
            peft_tensors[f"{module}.lora_magnitude_vector"] = tensor.reshape(-1).contiguous()
        else:
            unknown.append(raw_key)
    if unknown:
        raise AdapterError(f"unexpected tensors in the NVlabs checkpoint (not LoRA factors or magnitudes): "
                           f"{', '.join(sorted(unknown)[:5])}.")
    modules = check_complete_modules(peft_tensors, "NVlabs")
    ranks = {peft_tensors[f"{PEFT_PREFIX}{m}.lora_A.weight"].shape[0] for m in modules}
    rank = int(config.get("r") or max(ranks))
    if ranks != {rank}:
        raise AdapterError(f"{config_path} says r = {rank} but the LoRA factors have ranks {sorted(ranks)}.")
    targets = config.get("target_modules") or sorted({m.rsplit(".", 1)[-1] for m in modules})
    lora_kwargs = {
        "r": rank,
        "lora_alpha": config["lora_alpha"],
        "lora_dropout": config.get("lora_dropout") or 0.0,
        "target_modules": targets,
        "use_dora": any(key.endswith(".lora_magnitude_vector") for key in peft_tensors),
        "bias": "none",
        "task_type": config.get("task_type") or "CAUSAL_LM",
    }
    return peft_tensors, lora_kwargs


def check_complete_modules(peft_tensors: dict[str, torch.Tensor], source: str) -> list[str]:
    """Module names (peft prefix removed) that have A, B and a magnitude; refuses anything less."""
    parts: dict[str, set[str]] = {}
    for key in peft_tensors:
        module, _, part = key[len(PEFT_PREFIX):].rpartition(".lora_")
        parts.setdefault(module, set()).add(part)
    complete = {"A.weight", "B.weight", "magnitude_vector"}
    magnitude_only = sorted(m for m, p in parts.items() if p == {"magnitude_vector"})
    if magnitude_only:
        raise AdapterError(
            f"the {source} checkpoint has magnitude-only modules ({', '.join(magnitude_only[:3])}"
            f"{' ...' if len(magnitude_only) > 3 else ''}): peft's DoRA cannot express a magnitude without LoRA "
            "factors; refusing rather than dropping them."
        )
    without_magnitude = sorted(m for m, p in parts.items() if p == {"A.weight", "B.weight"})
    if without_magnitude and len(without_magnitude) < len(parts):
        raise AdapterError(
            f"the {source} checkpoint mixes DoRA modules with plain LoRA modules ({', '.join(without_magnitude[:3])}); "
            "a peft adapter is DoRA for all its modules or for none."
        )
    broken = sorted(m for m, p in parts.items() if p not in (complete, {"A.weight", "B.weight"}))
    if broken:
        raise AdapterError(f"the {source} checkpoint has incomplete modules: {', '.join(broken[:3])}.")
    return sorted(parts)


def torchtune_to_hf_module(name: str) -> str:
    """`layers.3.attn.output_proj` -> `model.layers.3.self_attn.o_proj`; `output` -> `lm_head`."""
    if name == "output":
        return "lm_head"
    match = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
    if not match or match[2] not in TORCHTUNE_TO_HF_MODULES:
        raise AdapterError(
            f'torchtune module "{name}" has no Hugging Face Llama counterpart this converter knows '
            f"(known: layers.N.{{{', '.join(TORCHTUNE_TO_HF_MODULES)}}}, output)."
        )
    return f"model.layers.{match[1]}.{TORCHTUNE_TO_HF_MODULES[match[2]]}"


def torchtune_rows_to_hf(tensor: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """Reorder q/k output rows from torchtune's rotary layout to Hugging Face's (B: [out, r]; magnitude: [out])."""
    trailing = tensor.shape[1:]
    grouped = tensor.reshape(n_heads, head_dim // 2, 2, *trailing)
    return grouped.transpose(1, 2).reshape(n_heads * head_dim, *trailing).contiguous()


def convert_torchtune(
    tensors: dict[str, torch.Tensor], config: dict, base_config, lora_alpha: float | None
) -> tuple[dict, dict]:
    """torchtune adapter state dict -> (peft tensors, LoraConfig keyword arguments)."""
    model_type = getattr(base_config, "model_type", None)
    if model_type not in TORCHTUNE_LLAMA_TYPES:
        raise AdapterError(
            f'the base model is a "{model_type}" model; this converter knows torchtune\'s Llama layout only '
            f"({', '.join(TORCHTUNE_LLAMA_TYPES)}), including its q/k row order."
        )
    n_heads = base_config.num_attention_heads
    n_kv_heads = getattr(base_config, "num_key_value_heads", None) or n_heads
    head_dim = getattr(base_config, "head_dim", None) or base_config.hidden_size // n_heads

    peft_tensors, unknown = {}, []
    for raw_key, tensor in tensors.items():
        key = strip_wrappers(raw_key)
        if key.startswith(PEFT_PREFIX):
            raise AdapterError(
                f'"{raw_key}" is already a peft name: this file is torchtune\'s own peft export, not its native '
                "adapter checkpoint. Load it with peft directly, or convert the native adapter_model.pt instead."
            )
        part = next((p for p in TORCHTUNE_TO_PEFT_PARTS if key.endswith("." + p)), None)
        if part is None:
            unknown.append(raw_key)
            continue
        hf_module = torchtune_to_hf_module(key[: -len(part) - 1])
        if part != "lora_a.weight" and hf_module.endswith(("q_proj", "k_proj")):
            heads = n_heads if hf_module.endswith("q_proj") else n_kv_heads
            tensor = torchtune_rows_to_hf(tensor, heads, head_dim)
        peft_tensors[f"{PEFT_PREFIX}{hf_module}.{TORCHTUNE_TO_PEFT_PARTS[part]}"] = tensor.contiguous()
    if unknown:
        raise AdapterError(f"unexpected tensors in the torchtune checkpoint (not LoRA/DoRA parameters): "
                           f"{', '.join(sorted(unknown)[:5])}.")
    modules = check_complete_modules(peft_tensors, "torchtune")
    ranks = {peft_tensors[f"{PEFT_PREFIX}{m}.lora_A.weight"].shape[0] for m in modules}
    if len(ranks) != 1:
        raise AdapterError(f"the torchtune checkpoint has LoRA factors of several ranks {sorted(ranks)}.")
    alpha = lora_alpha if lora_alpha is not None else config.get("lora_alpha")
    if alpha is None:
        raise AdapterError(
            "the torchtune checkpoint does not say its lora_alpha (no adapter_config.json beside it). Pass "
            "--lora-alpha with the value from the torchtune config (model.lora_alpha)."
        )
    suffixes = sorted({m.rsplit(".", 1)[-1] for m in modules})
    every_layer = all(
        f"model.layers.{i}.{TORCHTUNE_TO_HF_MODULES[k]}" in modules
        for i in range(base_config.num_hidden_layers)
        for k in TORCHTUNE_TO_HF_MODULES
        if TORCHTUNE_TO_HF_MODULES[k].rsplit(".", 1)[-1] in suffixes
    )
    lora_kwargs = {
        "r": int(ranks.pop()),
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        # Suffixes when every layer is adapted (the usual torchtune setup); exact module names otherwise.
        "target_modules": suffixes if every_layer else modules,
        "use_dora": any(k.endswith("lora_magnitude_vector") for k in peft_tensors),
        "bias": "none",
        "task_type": "CAUSAL_LM",
    }
    return peft_tensors, lora_kwargs


def check_fits_base(peft_tensors: dict[str, torch.Tensor], base_path: str) -> None:
    """Compare adapter shapes with the base's weight shapes, read from safetensors headers (no weights loaded)."""
    from safetensors import safe_open

    folder = Path(base_path)
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    shapes = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            shapes.update({name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()})
    if not shapes:
        return  # a hub id or a .bin-only folder: peft checks the shapes when the adapter is loaded
    for key, tensor in peft_tensors.items():
        module, _, part = key[len(PEFT_PREFIX):].rpartition(".lora_")
        base_shape = shapes.get(f"{module}.weight")
        if base_shape is None:
            raise AdapterError(f'the adapter adapts "{module}", which the base model at {base_path} does not have.')
        expected = {"A.weight": (None, base_shape[1]), "B.weight": (base_shape[0], None),
                    "magnitude_vector": (base_shape[0],)}[part]
        if any(e is not None and e != s for e, s in zip(expected, tensor.shape, strict=True)):
            raise AdapterError(f'"{key}" has shape {tuple(tensor.shape)}, which does not fit the base weight '
                               f"{module}.weight {base_shape} at {base_path}: wrong base model?")


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def convert_adapter(
    source_format: str,
    source: str | Path,
    out: str | Path,
    base_model: str | None = None,
    allow_pickle: bool = False,
    lora_alpha: float | None = None,
    overwrite: bool = False,
) -> dict:
    """Convert an NVlabs or torchtune DoRA checkpoint into a peft adapter folder.

    Args:
        source_format: "nvlabs" or "torchtune".
        source: the checkpoint folder (or its weights file).
        out: the peft adapter folder to write (must not exist unless `overwrite`).
        base_model: base model id or folder; required for torchtune (its q/k row order depends on the head
            layout), optional for NVlabs (overrides base_model_name_or_path and enables a shape check).
        allow_pickle: allow reading .bin/.pt pickle files (tensors only).
        lora_alpha: alpha for torchtune checkpoints that carry no adapter_config.json.
        overwrite: replace an existing `out`.

    Returns:
        The conversion record (also written to `out/conversion.json`).
    """
    if source_format not in SOURCES:
        raise AdapterError(f'--from must be one of {", ".join(SOURCES)}, not "{source_format}".')
    source = Path(source).expanduser().resolve()
    out = Path(out).expanduser().absolute()  # resolved by claim_output_folder; messages show it as given
    if not source.exists():
        raise AdapterError(f"{source} does not exist (expected a {source_format} checkpoint folder or weights file).")
    folder = source if source.is_dir() else source.parent
    inputs = [("the checkpoint", source)]  # the base model is checked once resolved, before anything is written
    if not source.is_dir():  # a checkpoint file: its config and tokenizer files are read beside it
        inputs += [("the checkpoint's file", folder / name) for name in (ADAPTER_CONFIG, *TOKENIZER_FILE_NAMES)]
    # Held from here to the end: one writer per output.
    with claim_output_folder(out, overwrite=overwrite, record=CONVERSION_RECORD, made_by="lora/convert_adapter.py",
                             kind="a converted adapter", inputs=inputs, flag="-o/--out") as claim:
        return _convert_into(claim, source_format, source, folder, base_model, allow_pickle, lora_alpha)


def _convert_into(claim, source_format: str, source: Path, folder: Path, base_model: str | None, allow_pickle: bool,
                  lora_alpha: float | None) -> dict:
    """Read and convert the checkpoint, write the peft folder into `claim`'s build folder and publish it."""
    from peft import LoraConfig

    from lora.models.source import resolve_model_source

    out = claim.out
    started = time.monotonic()
    config_path = folder / ADAPTER_CONFIG
    config = read_json_if_present(config_path)
    base_name = base_model or config.get("base_model_name_or_path")

    if source_format == "nvlabs":
        if not config:
            raise AdapterError(f"{folder} holds no {ADAPTER_CONFIG}: an NVlabs checkpoint folder has one (r, "
                               "lora_alpha, target_modules, peft_type DORA).")
        weights_file = find_weights_file(source, NVLABS_WEIGHT_FILES, "NVlabs DoRA")
        peft_tensors, lora_kwargs = convert_nvlabs(load_tensors(weights_file, allow_pickle), config, config_path)
        base_path = resolve_model_source(base_model).path if base_model else None
    else:
        if not base_name:
            raise AdapterError("converting a torchtune checkpoint needs --base-model (the Hugging Face model it was "
                               "trained from): q_proj/k_proj rows are reordered using its head layout.")
        from transformers import AutoConfig

        base_path = resolve_model_source(base_name, folder).path
        weights_file = find_weights_file(source, TORCHTUNE_WEIGHT_FILES, "torchtune")
        peft_tensors, lora_kwargs = convert_torchtune(
            load_tensors(weights_file, allow_pickle), config, AutoConfig.from_pretrained(base_path), lora_alpha
        )
    if base_path:
        refuse_output_over_inputs(out, [("the base model folder", base_path)])
        check_fits_base(peft_tensors, base_path)

    lora_config = LoraConfig(base_model_name_or_path=base_name, **lora_kwargs)
    record = {
        "source_format": source_format,
        "source_file": str(weights_file),
        "source_sha256": sha256_of(weights_file),
        "source_config": str(config_path) if config else None,
        "read_as": "safetensors" if weights_file.suffix == ".safetensors" else "pickle, torch.load(weights_only=True)",
        "base_model": base_name,
        "use_dora": lora_config.use_dora,
        "modules": len({k.rpartition(".lora_")[0] for k in peft_tensors}),
        "seconds": None,
    }
    from safetensors.torch import save_file

    build = claim.new_build()
    lora_config.save_pretrained(str(build))
    save_file(peft_tensors, str(build / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    copy_tokenizer_files(folder, build)
    record["seconds"] = round(time.monotonic() - started, 1)
    (build / CONVERSION_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    claim.publish()
    kind = "DoRA" if lora_config.use_dora else "LoRA"
    print(f"convert: {source_format} {kind} checkpoint {weights_file} -> peft adapter {out} "
          f"({record['modules']} modules, r={lora_config.r}, alpha={lora_config.lora_alpha})", flush=True)
    return record
