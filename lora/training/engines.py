"""The engine a run trains under (one process, DDP, FSDP, DeepSpeed ZeRO), what a recipe may do under it, and how
its processes start on a machine without CUDA.

    accelerate launch --config_file accelerate_configs/fsdp_qlora_single_machine.yaml --num_processes 2 \\
        lora/finetune.py RECIPE [--dry-run]

`accelerate launch` hands the engine to every process in environment variables (ACCELERATE_USE_FSDP, FSDP_VERSION,
ACCELERATE_USE_DEEPSPEED, ACCELERATE_DEEPSPEED_ZERO_STAGE, WORLD_SIZE); `detect_engine` reads them, so `--dry-run`
and the run itself see the same engine before anything loads. `engine_problems` lists the recipe/engine pairs the
libraries cannot run (the run exits 2 naming them).

Fast DoRA (lora/adapters/fast_dora.py) needs no switch: it reads the base weight only inside the adapted layer's
forward and backward, where FSDP2 and ZeRO-3 hold it whole (tests/test_sharded_training.py checks its adapters
against one process), and it refuses to read a partition.

On a machine without CUDA, accelerate 1.15 ignores FSDP and DeepSpeed: `use_cpu` makes the state MULTI_CPU, which
neither plugin is applied to, so the configs silently train unsharded. `start_processes` sets the state up so
that they do shard there (gloo, the CPU device), which is what lets tests/test_sharded_training.py run FSDP2 and
ZeRO-2/3 for real on CPU processes; `trainer_device_arguments` makes the Trainer keep that state.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = [
    "check_engine_support",
    "describe_engine",
    "detect_engine",
    "Engine",
    "engine_problems",
    "start_processes",
    "trainer_device_arguments",
]


@dataclass(frozen=True)
class Engine:
    """How the processes of a run share the model.

    Attributes:
        kind: "single" (one process), "ddp", "fsdp" or "deepspeed".
        num_processes: processes over all machines.
        fsdp_version: 1 or 2 under FSDP.
        zero_stage: 0-3 under DeepSpeed.
    """

    kind: str = "single"
    num_processes: int = 1
    fsdp_version: int | None = None
    zero_stage: int | None = None

    @property
    def label(self) -> str:
        if self.kind == "fsdp":
            return f"FSDP{self.fsdp_version}" if self.fsdp_version == 2 else "FSDP (version 1)"
        if self.kind == "deepspeed":
            return f"DeepSpeed ZeRO-{self.zero_stage}"
        return "DDP" if self.kind == "ddp" else "one process"

    @property
    def shards_parameters(self) -> bool:
        """Each process holds only its part of the weights outside a layer's forward/backward."""
        return self.kind == "fsdp" or (self.kind == "deepspeed" and self.zero_stage == 3)

    @property
    def shards_gradients(self) -> bool:
        return self.kind == "fsdp" or (self.kind == "deepspeed" and (self.zero_stage or 0) >= 2)

    @property
    def shards_optimizer(self) -> bool:
        return self.kind == "fsdp" or (self.kind == "deepspeed" and (self.zero_stage or 0) >= 1)

    def to_record(self) -> dict:
        return {"engine": self.label, "kind": self.kind, "num_processes": self.num_processes,
                "fsdp_version": self.fsdp_version, "zero_stage": self.zero_stage}


def _flag(environ: Mapping[str, str], name: str) -> bool:
    return environ.get(name, "false").lower() in ("1", "true", "yes")


def detect_engine(environ: Mapping[str, str] | None = None) -> Engine:
    """The engine `accelerate launch` (or torchrun) started this process under, from its environment."""
    environ = os.environ if environ is None else environ
    processes = int(environ.get("WORLD_SIZE", "1") or 1)
    if _flag(environ, "ACCELERATE_USE_FSDP"):
        return Engine("fsdp", processes, fsdp_version=int(environ.get("FSDP_VERSION", "1") or 1))
    if _flag(environ, "ACCELERATE_USE_DEEPSPEED"):
        stage = environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
        config_file = environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
        if config_file and os.path.isfile(config_file):  # a DeepSpeed JSON given to accelerate names its own stage
            with open(config_file) as handle:
                stage = json.load(handle).get("zero_optimization", {}).get("stage", stage)
        return Engine("deepspeed", processes, zero_stage=int(stage) if stage not in (None, "") else 2)
    return Engine("ddp" if processes > 1 else "single", processes)


def engine_problems(recipe, engine: Engine) -> list[str]:
    """Why this recipe cannot train under this engine (empty when it can), one sentence per problem."""
    problems = []
    where = f"under {engine.label}"
    if engine.kind == "fsdp" and engine.fsdp_version == 1 and not _has_cuda():
        problems.append(f"{where} on a machine without CUDA, FSDP version 1 trains but cannot gather the adapter "
                        "to save it (torch's full state dict of a CPU-flattened parameter fails); use fsdp_version 2 "
                        "(accelerate_configs/fsdp_qlora_single_machine.yaml)")
    if engine.kind == "fsdp" and recipe["quant_bits"] == 8:
        problems.append(f'"{recipe.field_name("quant_bits")}" 8 {where}: FSDP cannot shard '
                        "bitsandbytes' 8-bit weights "
                        "(bitsandbytes 0.50.2: \"Creating a Parameter from an instance of type Int8Params requires "
                        "that detach() returns an instance of the same type\"); use quant_bits 4 or DeepSpeed ZeRO-2/3 "
                        "for an 8-bit base")
    if engine.shards_parameters and engine.kind == "deepspeed" and recipe.quantised and recipe["use_dora"] \
            and not recipe["fast_dora"]:
        bits = recipe["quant_bits"]
        problems.append(f'"fast_dora" false with "use_dora" true and "quant_bits" {bits} {where}: peft\'s own DoRA on '
                        f"a {bits}-bit base fails in the first backward (deepspeed 0.19.8, peft 0.21.2: "
                        f"\"'{'Params4bit' if bits == 4 else 'Int8Params'}' object has no attribute 'ds_status'\"); "
                        "set fast_dora true (this project's DoRA, same adapter files), which runs there")
    if engine.shards_parameters and recipe["eval_tasks"]:
        problems.append(f'"eval_tasks" {recipe["eval_tasks"]} {where}: the scores after training run on the main '
                        "process alone, and a sharded model's forward needs every process (seen: the run aborts in a "
                        'collective); set "eval_tasks" to [] (--set eval_tasks=[]) and score the saved adapter with '
                        "eval/evaluate.py")
    return problems


def check_engine_support(recipe, engine: Engine) -> None:
    """Exit 2 (RecipeError) before anything loads when the recipe cannot train under this engine."""
    from lora.core.errors import RecipeError

    problems = engine_problems(recipe, engine)
    if problems:
        raise RecipeError(f'recipe "{recipe.name}" cannot train under {engine.label} ({engine.num_processes} '
                          f"process(es)): {'; '.join(problems)}. The support matrix is in the README, section "
                          '"Several GPUs, several machines, crashes and memory".')


def describe_engine(recipe, engine: Engine) -> list[str]:
    """What a run of this recipe will do under this engine (said by --dry-run and at the start of a run)."""
    lines = [f"engine: {engine.label}, {engine.num_processes} process(es); "
             + ("weights, gradients and optimizer states sharded" if engine.shards_parameters
                else "gradients and optimizer states sharded" if engine.shards_gradients
                else "optimizer states sharded" if engine.shards_optimizer
                else "every process holds the whole model")]
    if engine.shards_parameters or engine.shards_gradients:
        lines.append("the adapter is gathered onto the main process and saved whole (a standard peft adapter)")
    return lines


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def start_processes(engine: Engine):
    """The accelerate `PartialState` of this run (sets up the process group under accelerate launch/torchrun).

    On a machine without CUDA it must be told so (as TrainingArguments(use_cpu=True) does later); a bare
    PartialState() there makes every rank a main process. FSDP and DeepSpeed get a state that accelerate applies
    their plugins to, on the CPU device with gloo (see the module docstring).
    """
    import torch
    from accelerate import PartialState
    from accelerate.state import DistributedType

    if _has_cuda() or engine.kind not in ("fsdp", "deepspeed"):
        return PartialState(cpu=not _has_cuda())
    if engine.kind == "deepspeed":
        # Not cpu: accelerate then hands the process group to deepspeed.init_distributed (gloo: DeepSpeed's CPU
        # accelerator) and marks the state DEEPSPEED.
        return PartialState(backend="gloo")
    state = PartialState(cpu=True)  # gloo process group, rank and world size from the launcher
    if state.distributed_type == DistributedType.MULTI_CPU:
        # FSDP's plugin is applied to a multi-device state only; FSDP itself wants the plain "cpu" device.
        state.distributed_type = DistributedType.MULTI_GPU
        state.device = torch.device("cpu")
    return state


def trainer_device_arguments(engine: Engine | None = None) -> dict:
    """TrainingArguments that put the Trainer on the run's device and processes (`start_processes`' state)."""
    import torch

    engine = engine or detect_engine()
    if _has_cuda():
        return {"use_cpu": False}
    if engine.kind in ("fsdp", "deepspeed"):
        # The Trainer would otherwise reset the state to MULTI_CPU (use_cpu) and drop FSDP/DeepSpeed.
        return {"use_cpu": False, "ddp_backend": "gloo", "accelerator_config": {"use_configured_state": True}}
    return {"use_cpu": not torch.cuda.is_available()}
