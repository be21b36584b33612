"""The shipped Accelerate config files, read and checked by accelerate itself: the config classes `accelerate launch`
loads them with, its launch-time validation, the environment it would hand to the processes, and the FSDP and
DeepSpeed plugins built from that environment. None of this needs a GPU or the deepspeed package (DeepSpeed's
plugin builds its config without it; only starting a DeepSpeed run needs `pip install deepspeed`). The FSDP and
ZeRO-3 runs themselves need GPUs; the 2-process CPU config runs for real in tests/test_multiprocess.py.

Also the recipe side of FSDP/ZeRO-3 QLoRA: a 4-bit base stored in a float dtype keeps every frozen parameter in
that one dtype, which is what lets FSDP flatten and shard it.
"""

from __future__ import annotations

import json
import os
from unittest import mock

import pytest
import torch
import yaml
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DeepSpeedPlugin, DistributedType, FullyShardedDataParallelPlugin
from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

from conftest import REPO_ROOT
from lora.adapters.attach import attach_adapter
from lora.core.errors import RecipeError
from lora.models.loading import load_base_model
from lora.models.quantisation import QuantisationSettings
from lora.recipes.registry import resolve_recipe

CONFIG_DIR = REPO_ROOT / "accelerate_configs"
# file -> (distributed type, machines, processes)
EXPECTED = {
    "cpu_2proc.yaml": (DistributedType.MULTI_GPU, 1, 2),
    "ddp_single_machine.yaml": (DistributedType.MULTI_GPU, 1, 8),
    "ddp_multi_machine.yaml": (DistributedType.MULTI_GPU, 2, 16),
    "fsdp_qlora_single_machine.yaml": (DistributedType.FSDP, 1, 8),
    "fsdp_qlora_multi_machine.yaml": (DistributedType.FSDP, 2, 16),
    "deepspeed_zero3_single_machine.yaml": (DistributedType.DEEPSPEED, 1, 8),
    "deepspeed_zero3_multi_machine.yaml": (DistributedType.DEEPSPEED, 2, 16),
}


def test_every_shipped_config_is_listed_here():
    assert sorted(p.name for p in CONFIG_DIR.glob("*.yaml")) == sorted(EXPECTED)


def _validated_launch_args(name: str):
    """What `accelerate launch --config_file accelerate_configs/NAME lora/finetune.py RECIPE` would run with."""
    parser = launch_command_parser()
    args = parser.parse_args(["--config_file", str(CONFIG_DIR / name), str(REPO_ROOT / "lora/finetune.py"), "RECIPE"])
    return _validate_launch_command(args)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_loads_with_accelerates_classes_and_passes_launch_validation(name):
    distributed_type, machines, processes = EXPECTED[name]
    config = load_config_from_file(str(CONFIG_DIR / name))  # rejects unknown top-level keys
    assert isinstance(config, ClusterConfig)
    assert (config.distributed_type, config.num_machines, config.num_processes) == (distributed_type, machines,
                                                                                    processes)
    assert config.mixed_precision == "no" and not config.use_cpu  # dtypes come from the recipe
    if machines > 1:
        assert config.machine_rank == 0 and config.main_process_ip and config.main_process_port
        assert config.rdzv_backend == "static" and config.same_network

    # Keys inside fsdp_config / deepspeed_config that accelerate does not know are silently ignored by the
    # launcher: every one must be a real `accelerate launch` option.
    options = {action.dest for action in launch_command_parser()._actions}
    raw = yaml.safe_load((CONFIG_DIR / name).read_text())
    nested = list(raw.get("fsdp_config", {})) + list(raw.get("deepspeed_config", {}))
    assert [key for key in nested if key not in options] == []

    args, _, _ = _validated_launch_args(name)
    assert (args.num_processes, args.num_machines) == (processes, machines)
    assert args.use_fsdp == (distributed_type == DistributedType.FSDP)
    assert args.use_deepspeed == (distributed_type == DistributedType.DEEPSPEED)
    assert args.multi_gpu == (distributed_type == DistributedType.MULTI_GPU)


@pytest.mark.parametrize("name", ["fsdp_qlora_single_machine.yaml", "fsdp_qlora_multi_machine.yaml"])
def test_fsdp_configs_build_accelerates_fsdp_plugin(name):
    args, _, _ = _validated_launch_args(name)
    env = {k: v for k, v in prepare_multi_gpu_env(args).items() if k.startswith(("FSDP_", "ACCELERATE_"))}
    assert env["ACCELERATE_USE_FSDP"] == "true"
    # Loading on rank 0 only and broadcasting (what lets a large base load once) needs a CUDA device to build the
    # plugin; check the flags as handed over, then build the plugin without them on this machine.
    assert env["FSDP_CPU_RAM_EFFICIENT_LOADING"] == "true" and env["FSDP_SYNC_MODULE_STATES"] == "true"
    env.update(FSDP_CPU_RAM_EFFICIENT_LOADING="false", FSDP_SYNC_MODULE_STATES="false")
    with mock.patch.dict(os.environ, env):
        plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 1 and plugin.sharding_strategy.name == "FULL_SHARD"
    assert plugin.auto_wrap_policy.__name__ == "transformer_auto_wrap_policy"
    # use_orig_params False is the setting FSDP-QLoRA is documented with; the Trainer then wraps the LoRA layers
    # separately (peft's fsdp_auto_wrap_policy) and sets FSDP's mixed precision to the 4-bit storage dtype.
    assert plugin.use_orig_params is False
    assert plugin.state_dict_type.name == "FULL_STATE_DICT"  # the adapter is saved whole by the main process


@pytest.mark.parametrize("name", ["deepspeed_zero3_single_machine.yaml", "deepspeed_zero3_multi_machine.yaml"])
def test_deepspeed_configs_build_accelerates_deepspeed_plugin(name):
    args, defaults, mixed_precision_from_config = _validated_launch_args(name)
    # What `accelerate launch` does before handing over to the DeepSpeed launcher.
    fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mixed_precision_from_config else [])
    args.deepspeed_fields_from_accelerate_config = ",".join(fields)
    _, env = prepare_deepspeed_cmd_env(args)
    env = {k: v for k, v in env.items() if k.startswith("ACCELERATE_")}
    assert env["ACCELERATE_USE_DEEPSPEED"] == "true" and env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == "3"
    with mock.patch.dict(os.environ, env):
        plugin = DeepSpeedPlugin()
    zero = plugin.deepspeed_config["zero_optimization"]
    assert plugin.zero_stage == 3 and zero["stage"] == 3
    assert zero["stage3_gather_16bit_weights_on_model_save"] is True  # needed to save the adapter from shards
    assert zero["offload_optimizer"]["device"] == "none" and zero["offload_param"]["device"] == "none"
    assert plugin.zero3_init_flag is False
    # Batch size, accumulation and clipping stay "auto": the Trainer fills them from the recipe.
    assert plugin.deepspeed_config["gradient_accumulation_steps"] == "auto"
    assert plugin.deepspeed_config["train_micro_batch_size_per_gpu"] == "auto"
    if defaults.num_machines > 1:
        assert args.deepspeed_multinode_launcher == "standard"


@pytest.fixture(scope="module")
def registry(tmp_path_factory, tiny_model_dir):
    folder = tmp_path_factory.mktemp("registry")
    recipes = {"sharded_qlora": {
        "base_model": str(tiny_model_dir), "dataset_path": str(REPO_ROOT / "data/train/sentiment_train.jsonl"),
        "quant_bits": 4, "bnb_4bit_quant_storage": "bfloat16", "dtype": "bfloat16",
        "bnb_4bit_compute_dtype": "bfloat16", "use_dora": True, "lora_r": 4, "gradient_checkpointing": True,
    }}
    path = folder / "finetune_configs.json"
    path.write_text(json.dumps(recipes))
    return path


def test_float_4bit_storage_keeps_every_frozen_parameter_in_one_dtype(registry):
    recipe = resolve_recipe("sharded_qlora", registry)
    model = load_base_model(recipe["base_model"], QuantisationSettings.from_recipe(recipe))
    model = attach_adapter(recipe, model)
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    packed = [p for p in model.parameters() if type(p).__name__ == "Params4bit"]
    assert packed and frozen == {torch.bfloat16}  # FSDP can flatten a block: one dtype (no float32 upcast)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}  # peft keeps adapters fp32

    tokens = torch.randint(0, model.config.vocab_size, (2, 16))
    model.train()
    loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert torch.isfinite(loss) and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_float_4bit_storage_must_match_the_recipe_dtype(registry):
    recipe = resolve_recipe("sharded_qlora", registry, ['dtype="float32"'])
    with pytest.raises(RecipeError, match='bnb_4bit_quant_storage is bfloat16 but dtype is float32'):
        QuantisationSettings.from_recipe(recipe).bitsandbytes_config()
