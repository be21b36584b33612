"""The shipped Accelerate config files, read and checked by accelerate itself: the config classes `accelerate launch`
loads them with, its launch-time validation, the environment it would hand to the processes, and the FSDP and
DeepSpeed plugins built from that environment. None of this needs a GPU or the deepspeed package (DeepSpeed's
plugin builds its config without it; only starting a DeepSpeed run needs requirements-deepspeed.txt). The FSDP2 and
ZeRO-2/3 configs run for real on CPU processes in tests/test_sharded_training.py, the 2-process CPU config in
tests/test_multiprocess.py.

Also the engine rules (lora/training/engines.py): the engine read from accelerate launch's environment, the
recipe/engine pairs refused with exit 2 before anything loads, what --dry-run says under an engine, and the memory
estimate's sharding.

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
from lora.training.engines import Engine, detect_engine, engine_problems

CONFIG_DIR = REPO_ROOT / "accelerate_configs"
# file -> (distributed type, machines, processes)
EXPECTED = {
    "cpu_2proc.yaml": (DistributedType.MULTI_GPU, 1, 2),
    "ddp_single_machine.yaml": (DistributedType.MULTI_GPU, 1, 8),
    "ddp_multi_machine.yaml": (DistributedType.MULTI_GPU, 2, 16),
    "fsdp_qlora_single_machine.yaml": (DistributedType.FSDP, 1, 8),
    "fsdp_qlora_multi_machine.yaml": (DistributedType.FSDP, 2, 16),
    "deepspeed_zero2_single_machine.yaml": (DistributedType.DEEPSPEED, 1, 8),
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
    # FSDP2 (fully_shard): the version that also runs on CPU processes; version 1 cannot gather the adapter there.
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert plugin.auto_wrap_policy.__name__ == "transformer_auto_wrap_policy"
    assert plugin.state_dict_type.name == "FULL_STATE_DICT"  # the adapter is saved whole by the main process
    assert detect_engine(env | {"WORLD_SIZE": "2"}) == Engine("fsdp", 2, fsdp_version=2)


@pytest.mark.parametrize("name", ["deepspeed_zero2_single_machine.yaml", "deepspeed_zero3_single_machine.yaml",
                                  "deepspeed_zero3_multi_machine.yaml"])
def test_deepspeed_configs_build_accelerates_deepspeed_plugin(name):
    args, defaults, mixed_precision_from_config = _validated_launch_args(name)
    # What `accelerate launch` does before handing over to the DeepSpeed launcher.
    fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mixed_precision_from_config else [])
    args.deepspeed_fields_from_accelerate_config = ",".join(fields)
    _, env = prepare_deepspeed_cmd_env(args)
    env = {k: v for k, v in env.items() if k.startswith("ACCELERATE_")}
    stage = 2 if "zero2" in name else 3
    assert env["ACCELERATE_USE_DEEPSPEED"] == "true" and env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == str(stage)
    assert detect_engine(env | {"WORLD_SIZE": "8"}) == Engine("deepspeed", 8, zero_stage=stage)
    with mock.patch.dict(os.environ, env):
        plugin = DeepSpeedPlugin()
    zero = plugin.deepspeed_config["zero_optimization"]
    assert plugin.zero_stage == stage and zero["stage"] == stage
    assert zero["offload_optimizer"]["device"] == "none" and zero["offload_param"]["device"] == "none"
    if stage == 3:
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True  # needed to save the adapter from shards
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


# --- the engine rules (lora/training/engines.py) --------------------------------------------------------------------

FSDP2_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "WORLD_SIZE": "2"}
FSDP1_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1", "WORLD_SIZE": "2"}
ZERO2_ENV = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2", "WORLD_SIZE": "2"}
ZERO3_ENV = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3", "WORLD_SIZE": "2"}


@pytest.fixture(scope="module")
def engine_registry(tmp_path_factory, tiny_model_dir):
    folder = tmp_path_factory.mktemp("engine_registry")
    common = {"base_model": str(tiny_model_dir), "dataset_path": str(REPO_ROOT / "data/train/sentiment_train.jsonl"),
              "lora_r": 4, "max_steps": 2}
    float_4bit = {"quant_bits": 4, "bnb_4bit_quant_storage": "float32", "dtype": "float32"}
    recipes = {
        "lora_8bit": {**common, "quant_bits": 8},
        "lora_4bit_uint8": {**common, "quant_bits": 4},
        "dora_4bit_float": {**common, **float_4bit, "use_dora": True},
        "dora_stock_4bit_float": {**common, **float_4bit, "use_dora": True, "fast_dora": False},
        "dora_stock_8bit": {**common, "quant_bits": 8, "use_dora": True, "fast_dora": False},
        "lora_fp32": {**common, "quant_bits": None},
        "lora_fp32_scored": {**common, "quant_bits": None, "eval_tasks": ["sentiment"]},
    }
    path = folder / "finetune_configs.json"
    path.write_text(json.dumps(recipes))
    return path


def _finetune(argv, env, capsys):
    from lora.finetune import main

    with mock.patch.dict(os.environ, env):
        code = main(argv)
    return code, capsys.readouterr()


@pytest.mark.parametrize("recipe, env, words", [
    ("lora_8bit", FSDP2_ENV, ['"quant_bits" 8 under FSDP2', "FSDP cannot shard bitsandbytes' 8-bit weights",
                              "use quant_bits 4 or DeepSpeed ZeRO-2/3"]),
    ("dora_stock_4bit_float", ZERO3_ENV, ['"fast_dora" false with "use_dora" true and "quant_bits" 4 under '
                                          "DeepSpeed ZeRO-3", "'Params4bit' object has no attribute 'ds_status'"]),
    ("dora_stock_8bit", ZERO3_ENV, ["'Int8Params' object has no attribute 'ds_status'", "set fast_dora true"]),
    ("lora_fp32_scored", FSDP2_ENV, ['"eval_tasks" [\'sentiment\'] under FSDP2', "--set eval_tasks=[]"]),
    ("lora_fp32_scored", ZERO3_ENV, ['"eval_tasks" [\'sentiment\'] under DeepSpeed ZeRO-3']),
    ("lora_fp32", FSDP1_ENV, ["FSDP version 1 trains but cannot gather the adapter", "use fsdp_version 2"]),
])
def test_what_cannot_run_under_an_engine_exits_2_before_anything_loads(engine_registry, tmp_path, capsys, recipe,
                                                                       env, words):
    out = tmp_path / "out"
    for extra in (["--dry-run"], ["--output-dir", str(out)]):
        code, captured = _finetune([recipe, "--registry", str(engine_registry), *extra], env, capsys)
        assert code == 2, captured.err
        message = captured.err.strip()
        assert message.startswith(f'error: recipe "{recipe}" cannot train under') and "\n" not in message
        assert all(word in message for word in words), message
        assert "Traceback" not in captured.err and captured.out == ""
    assert not out.exists()  # refused before the output folder (or any model) was touched


# Each ran on 2 CPU processes and matched one process (tests/test_sharded_training.py, or by hand: see the README);
# scoring under ZeRO-2, where every process holds the whole model, is DDP's (tests/test_multiprocess.py).
@pytest.mark.parametrize("recipe, env", [("lora_8bit", ZERO2_ENV), ("lora_8bit", ZERO3_ENV),
                                         ("lora_4bit_uint8", FSDP2_ENV), ("lora_4bit_uint8", ZERO3_ENV),
                                         ("dora_4bit_float", ZERO3_ENV), ("dora_stock_4bit_float", FSDP2_ENV),
                                         ("lora_fp32_scored", ZERO2_ENV)])
def test_what_runs_under_an_engine_passes_the_check(engine_registry, recipe, env):
    with mock.patch.dict(os.environ, env):
        engine = detect_engine()
    assert engine_problems(resolve_recipe(recipe, engine_registry), engine) == []


def test_dry_run_under_an_engine_says_what_it_will_do_and_shards_the_estimate(engine_registry, capsys):
    code, single = _finetune(["dora_4bit_float", "--registry", str(engine_registry), "--dry-run"], {}, capsys)
    assert code == 0 and "note: engine: one process, 1 process(es); every process holds the whole model" in single.err
    assert "memory estimate for dora_4bit_float per process (model config" in single.err
    code, zero3 = _finetune(["dora_4bit_float", "--registry", str(engine_registry), "--dry-run"], ZERO3_ENV, capsys)
    assert code == 0 and json.loads(zero3.out)["name"] == "dora_4bit_float"
    assert ("note: engine: DeepSpeed ZeRO-3, 2 process(es); weights, gradients and optimizer states sharded"
            in zero3.err)
    assert "note: the adapter is gathered onto the main process and saved whole" in zero3.err
    assert "per process, DeepSpeed ZeRO-3 x 2" in zero3.err and "1/2 per process under DeepSpeed ZeRO-3" in zero3.err
    assert "before sharding, each process loads the whole base" in zero3.err
    # under a launcher only the main process answers
    code, other_rank = _finetune(["dora_4bit_float", "--registry", str(engine_registry), "--dry-run"],
                                 {**ZERO3_ENV, "RANK": "1"}, capsys)
    assert code == 0 and other_rank.out == other_rank.err == ""


def test_memory_estimate_shards_what_each_engine_shards(engine_registry, tiny_model_dir):
    from transformers import AutoConfig

    from lora.models.memory import estimate_memory, model_shape_from_config

    recipe = resolve_recipe("lora_fp32", engine_registry)
    shape = model_shape_from_config(AutoConfig.from_pretrained(tiny_model_dir))
    alone = estimate_memory(recipe, shape, on_cuda=True)
    trainable = alone.trainable_parameters
    zero2 = estimate_memory(recipe, shape, on_cuda=True, engine=Engine("deepspeed", 4, zero_stage=2))
    zero3 = estimate_memory(recipe, shape, on_cuda=True, engine=Engine("deepspeed", 4, zero_stage=3))
    fsdp = estimate_memory(recipe, shape, on_cuda=True, engine=Engine("fsdp", 4, fsdp_version=2))
    ddp = estimate_memory(recipe, shape, on_cuda=True, engine=Engine("ddp", 4))
    assert ddp.total == alone.total and alone.adapter_states == 16 * trainable
    assert zero2.base_weights == alone.base_weights and zero2.gathered == 0
    assert zero2.adapter_states == trainable * (4 + (4 + 8) / 4)  # weights whole, gradients and AdamW sharded
    assert zero3.base_weights == alone.base_weights / 4 and zero3.adapter_states == trainable * 16 / 4
    assert fsdp.base_weights == zero3.base_weights and fsdp.adapter_states == zero3.adapter_states
    # two decoder layers gathered whole (of the tiny model's 2): the linear layers' weights, 3/4 of them not local
    linear_bytes = 4 * sum(layer.in_features * layer.out_features for layer in shape.linears)
    assert zero3.gathered == pytest.approx(linear_bytes * 3 / 4)
    assert zero3.activations == alone.activations
    assert zero3.total < zero2.total < alone.total
