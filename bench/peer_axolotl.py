"""Side by side with axolotl, the engine FinLoRA drives: one recipe, one model folder, the same data and steps.

    .venv/bin/python bench/peer_axolotl.py                 # build or reuse the axolotl venv, run both, print the table
    .venv/bin/python bench/peer_axolotl.py --write         # ... and write the table into BENCHMARKS.md
    .venv/bin/python bench/peer_axolotl.py --yaml-only     # print FinLoRA's YAML and the changes; run nothing
    .venv/bin/python bench/peer_axolotl.py --no-install    # skip axolotl (with a message) unless its venv is built

axolotl lives in a virtualenv of its own (it pins transformers 5.16.1, peft 0.20.0, accelerate 1.13.0, trl 1.9.0),
built once under ${LORA_RECIPES_CACHE:-~/.cache/lora-recipes}/peer-venvs/axolotl-0.19.0 (about 4 GB, 6 minutes):

    python3 -m venv ~/.cache/lora-recipes/peer-venvs/axolotl-0.19.0
    ~/.cache/lora-recipes/peer-venvs/axolotl-0.19.0/bin/pip install axolotl==0.19.0 torch==2.13.0

(`torch==2.13.0` exactly, so pip takes the CPU wheel on disk instead of a multi-GB CUDA build.) Where it cannot
be installed, axolotl's columns are skipped with the reason and this runner is still measured.

What runs, one after the other, each in its own process with the same threads (OMP_NUM_THREADS) and offline:
- `ours`: lora/finetune.py on the recipe, with the settings FinLoRA hard-codes (q/k/v targets, dropout 0.05,
  gradient checkpointing for 4-bit, 10 warm-up steps) so that both tools train the same adapter;
- `finlora`: `axolotl train` on the YAML FinLoRA's lora/finetune.py writes for that recipe, plus only the changes
  this device needs to run it at all (each printed, with why);
- `matched`: that YAML plus the changes that make axolotl train what the recipe says (a 4-bit base, no new pad
  token, no step-0 evaluation, fp32 compute, the recipe's prompt text, adamw_torch).
A probe (installed through a sitecustomize.py on PYTHONPATH, in both tools' processes alike) times every optimizer
step, records the losses and gradient norms the Trainer logs, and counts the bitsandbytes 4-bit/8-bit layers of the
model the Trainer really trains (lora/models/quantisation.py, the rule the runner itself checks with). Peak memory
is the peak resident set of the tool's process tree (wait4), plus torch.cuda.max_memory_allocated on a GPU. Each
saved adapter is then loaded onto the plain (unquantised) base with this venv's peft, strictly.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
AXOLOTL_VERSION = "0.19.0"
INSTALL_PINS = [f"axolotl=={AXOLOTL_VERSION}", "torch==2.13.0"]
SECTION_HEADING = "## Side by side with axolotl (FinLoRA's engine)"
PROBE_ENV = "PEER_PROBE_OUT"
# FinLoRA's lora/finetune.py: the q/k/v targets, dropout and pad token it writes whatever the recipe says.
FINLORA_TARGETS = ["q_proj", "v_proj", "k_proj"]
FINLORA_DROPOUT = 0.05
FINLORA_WARMUP_STEPS = 10


# ----------------------------------------------------------------------------------------------------------------
# The probe: runs inside each tool's training process (stdlib only at import time)


def install_probe() -> None:
    """Wrap `transformers.Trainer.__init__`, whenever that module gets imported, to add the probe callback."""
    import importlib.abc
    import importlib.util

    class TrainerModuleFinder(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != "transformers.trainer":
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            original_exec = spec.loader.exec_module

            def exec_module(module):
                original_exec(module)
                wrap_trainer_init(module.Trainer)

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, TrainerModuleFinder())


def wrap_trainer_init(trainer_class) -> None:
    original_init = trainer_class.__init__

    def __init__(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.add_callback(probe_callback())

    trainer_class.__init__ = __init__


def make_this_checkout_importable() -> None:
    """This checkout's `lora` package on sys.path, appended: in axolotl's processes (the probe) nothing of axolotl's
    may be shadowed by a folder of ours."""
    if str(REPO_ROOT) not in sys.path:
        sys.path.append(str(REPO_ROOT))


def probe_callback():
    """A TrainerCallback that writes step times, logged losses and the model's quantised layers to PROBE_ENV."""
    import torch
    from transformers import TrainerCallback

    # The rule the runner checks with, imported from this checkout in axolotl's venv too (lora.models.quantisation
    # needs only torch).
    make_this_checkout_importable()
    from lora.models.quantisation import count_quantised_layers

    class Probe(TrainerCallback):
        def __init__(self):
            self.record = {"step_seconds": [], "logs": [], "pid": os.getpid()}
            self.started = None

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.record["layers"] = count_quantised_layers(model)
            self.record["vocab_rows"] = model.get_input_embeddings().num_embeddings
            self.record["torch_threads"] = torch.get_num_threads()

        def on_step_begin(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.record["step_seconds"].append(time.perf_counter() - self.started)

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.record["logs"].append({"step": state.global_step, **{k: v for k, v in (logs or {}).items()
                                                                       if isinstance(v, (int, float))}})

        def on_train_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                self.record["cuda_max_allocated_bytes"] = int(torch.cuda.max_memory_allocated())
            folder = Path(os.environ[PROBE_ENV])
            (folder / f"probe-{os.getpid()}.json").write_text(json.dumps(self.record))

    return Probe()


def write_sitecustomize(folder: Path) -> None:
    """A sitecustomize.py that installs the probe in every Python process started with `folder` on PYTHONPATH."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(
        "import importlib.util, os\n"
        f"if os.environ.get({PROBE_ENV!r}):\n"
        f"    spec = importlib.util.spec_from_file_location('_peer_probe', {str(Path(__file__).resolve())!r})\n"
        "    module = importlib.util.module_from_spec(spec)\n"
        "    spec.loader.exec_module(module)\n"
        "    module.install_probe()\n"
    )


# ----------------------------------------------------------------------------------------------------------------
# The YAML FinLoRA writes, and the changes a device needs


def finlora_run_config(recipe, model_dir: Path) -> dict:
    """The recipe in FinLoRA's own field names (the ones its generator reads), on the local model folder."""
    return {
        "base_model": str(model_dir),
        "dataset_path": recipe["dataset_path"],
        "lora_r": recipe["lora_r"],
        "lora_alpha": recipe["lora_alpha"],
        "quant_bits": recipe["quant_bits"],
        "peft_use_dora": recipe["use_dora"],
        "peft_use_rslora": recipe["use_rslora"],
        "learning_rate": recipe["learning_rate"],
        "num_epochs": recipe["num_epochs"],
        "batch_size": recipe["batch_size"],
        "gradient_accumulation_steps": recipe["gradient_accumulation_steps"],
    }


def finlora_yaml(run_config: dict, output_dir: Path) -> dict:
    """What FinLoRA's lora/finetune.py writes for `run_config` (its template values and overrides, as of its 2025
    revision; restated here, not imported: FinLoRA is not a package). Only quant_bits 4 and 8 are accepted there."""
    bits = run_config["quant_bits"]
    if bits not in (4, 8):
        raise SystemExit(f"FinLoRA's generator accepts quant_bits 4 or 8 only; this recipe has {bits!r}.")
    four = bits == 4
    return {
        "base_model": run_config["base_model"],
        "model_type": "LlamaForCausalLM",
        "tokenizer_type": "AutoTokenizer",
        "gradient_accumulation_steps": run_config["gradient_accumulation_steps"],
        "micro_batch_size": run_config["batch_size"],
        "num_epochs": run_config["num_epochs"],
        "optimizer": "paged_adamw_8bit" if four else "adamw_bnb_8bit",
        "lr_scheduler": "cosine",
        "learning_rate": run_config["learning_rate"],
        "load_in_8bit": not four,
        "load_in_4bit": four,
        "bnb_4bit_use_double_quant": four,
        "bnb_4bit_quant_type": "nf4" if four else None,
        "bnb_4bit_compute_dtype": "bfloat16" if four else None,
        "adapter": "lora",
        "lora_model_dir": None,
        "lora_r": run_config["lora_r"],
        "lora_alpha": run_config["lora_alpha"],
        "lora_dropout": FINLORA_DROPOUT,
        "lora_target_modules": list(FINLORA_TARGETS),
        "datasets": [{
            "path": str(Path(run_config["dataset_path"]).resolve()),
            "type": {
                "system_prompt": "",
                "field_system": "system",
                "field_instruction": "context",
                "field_output": "target",
                "format": "[INST] {instruction} [/INST]",
                "no_input_format": "[INST] {instruction} [/INST]",
            },
        }],
        "dataset_prepared_path": None,
        "val_set_size": 0.02,
        "output_dir": str(output_dir),
        "peft_use_dora": run_config["peft_use_dora"],
        "peft_use_rslora": run_config["peft_use_rslora"],
        "sequence_len": 4096,
        "sample_packing": False,
        "pad_to_sequence_len": False,
        "wandb_project": "finlora_models",
        "wandb_entity": None,
        "wandb_watch": "gradients",
        "wandb_name": output_dir.name,
        "wandb_log_model": "false",
        "bf16": "auto",
        "tf32": False,
        "gradient_checkpointing": True,
        "resume_from_checkpoint": None,
        "logging_steps": 500,
        "flash_attention": False,
        "deepspeed": "deepspeed_configs/zero1.json",
        "warmup_steps": FINLORA_WARMUP_STEPS,
        "evals_per_epoch": 4,
        "saves_per_epoch": 1,
        "weight_decay": 0.0,
        "special_tokens": {"pad_token": "<|end_of_text|>"},  # Llama 3's; written for every base model
    }


def benchmark_changes(steps: int) -> list[tuple[str, object, str]]:
    """(key, value, why) for both axolotl variants: the benchmark's own settings, not the device's."""
    return [
        ("max_steps", steps, "the benchmark's step count (both tools)"),
        ("logging_steps", 1, "a loss on every step (FinLoRA logs every 500)"),
        ("saves_per_epoch", None, "no checkpoint inside the timed steps (the final adapter is still saved)"),
    ]


def device_changes(device: str) -> list[tuple[str, object, str]]:
    """(key, value, why): the least this device needs for FinLoRA's YAML to run at all under axolotl 0.19.0."""
    changes = [
        ("deepspeed", None, "deepspeed_configs/zero1.json is a path relative to FinLoRA's checkout, and "
                            "deepspeed is not installed"),
        ("wandb_project", None, "no W&B account or network here: axolotl would try to log in"),
        ("wandb_watch", None, "goes with wandb_project"),
        ("wandb_log_model", None, "goes with wandb_project"),
    ]
    if device == "cpu":
        changes += [
            ("bf16", False, "`auto` finds no bf16 GPU and turns fp16 mixed precision on (axolotl's resolve_dtype); "
                            "the recipe computes in fp32"),
            ("lora_mlp_kernel", False, "axolotl switches its Triton LoRA kernels on by default; they need CUDA"),
            ("lora_qkv_kernel", False, "same"),
            ("lora_o_kernel", False, "same"),
            ("lora_embedding_kernel", False, "same"),
            ("optimizer", "adamw_torch", "paged 8-bit AdamW is built on CUDA unified memory"),
        ]
    return changes


def matched_changes(device: str) -> list[tuple[str, object, str]]:
    """(key, value, why): what makes axolotl train what the recipe says, on top of the device changes."""
    changes = [
        ("adapter", "qlora", "`adapter: lora` with `load_in_4bit: true` loads the base unquantised, silently: "
                             "axolotl builds its 4-bit config only for `qlora`"),
        ("special_tokens", None, "FinLoRA's Llama-3 pad token is not in SmolLM2's vocabulary: it adds a token, "
                                 "grows the embeddings, and the adapter then carries them"),
        ("val_set_size", 0, "no validation split and so no evaluation at step 0 (the runner evaluates nothing "
                            "here either)"),
        ("evals_per_epoch", None, "goes with val_set_size"),
        ("optimizer", "adamw_torch", "the runner's optimizer (FinLoRA writes a bitsandbytes 8-bit AdamW)"),
        ("datasets.0.type.format", "{instruction}", "the recipe's plain prompt: the context as it is"),
        ("datasets.0.type.no_input_format", "{instruction}", "same"),
    ]
    if device == "cpu":
        changes.append(("bnb_config_kwargs", {"bnb_4bit_quant_storage": "uint8"},
                        "the runner's 4-bit storage (axolotl stores packed weights as bf16); with bf16 false the "
                        "compute dtype is fp32, the recipe's"))
    return changes


def apply_changes(config: dict, changes) -> dict:
    """A copy of the YAML dict with each (dotted key, value) set; a None value removes the key."""
    config = json.loads(json.dumps(config))
    for key, value, _ in changes:
        *parents, last = key.split(".")
        node = config
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value
    return config


def our_overrides(steps: int) -> list[str]:
    """--set overrides that give the runner FinLoRA's hard-coded settings and the benchmark's steps."""
    return [
        f"lora_target_modules={json.dumps(FINLORA_TARGETS)}", f"lora_dropout={FINLORA_DROPOUT}",
        "gradient_checkpointing=true", f"warmup_steps={FINLORA_WARMUP_STEPS}", f"max_steps={steps}",
        "eval_tasks=[]", "logging_steps=1", "save_steps=null",
    ]


# ----------------------------------------------------------------------------------------------------------------
# The axolotl virtualenv


def axolotl_venv_dir() -> Path:
    cache = Path(os.environ.get("LORA_RECIPES_CACHE", "~/.cache/lora-recipes")).expanduser()
    return cache / "peer-venvs" / f"axolotl-{AXOLOTL_VERSION}"


def ensure_axolotl_venv(install: bool) -> tuple[Path | None, str]:
    """The axolotl venv (built when missing and `install`), or None and why it is not there."""
    venv = axolotl_venv_dir()
    marker = venv / ".installed"  # written only after a complete install: a half-built venv is rebuilt
    if marker.is_file():
        return venv, f"reused {venv}"
    if not install:
        return None, f"no axolotl venv at {venv} and --no-install given"
    print(f"building the axolotl venv at {venv} (once; about 4 GB): pip install {' '.join(INSTALL_PINS)}", flush=True)
    shutil.rmtree(venv, ignore_errors=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    log = venv.parent / f"axolotl-{AXOLOTL_VERSION}-install.log"
    with log.open("w") as handle:
        steps = [["python3", "-m", "venv", str(venv)], [str(venv / "bin" / "pip"), "install", *INSTALL_PINS]]
        for command in steps:
            try:
                code = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT).returncode
            except OSError as error:
                code = f"{error}"
            if code != 0:
                tail = log.read_text()[-1500:]
                return None, f"`{' '.join(command)}` failed ({code}); see {log}:\n{tail}"
    marker.write_text(" ".join(INSTALL_PINS) + "\n")
    return venv, f"built {venv}"


# ----------------------------------------------------------------------------------------------------------------
# Running and measuring one tool


def run_measured(command: list[str], env: dict, log_path: Path, timeout_s: float, cwd: Path = REPO_ROOT) -> dict:
    """Run `command`, its output to `log_path`; wall time and the peak RSS of its whole process tree."""
    started = time.perf_counter()
    with log_path.open("w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                   start_new_session=True)
        deadline = started + timeout_s
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                os.killpg(process.pid, 9)
                pid, status, usage = os.wait4(process.pid, 0)
                break
            time.sleep(0.2)
        process.returncode = os.waitstatus_to_exitcode(status)
    # ru_maxrss of a reaped child is the largest of it and its reaped descendants (accelerate launch's child).
    return {"returncode": process.returncode, "wall_seconds": time.perf_counter() - started,
            "peak_rss_bytes": usage.ru_maxrss * 1024}


def tool_env(probe_dir: Path, site_dir: Path, threads: int, extra_path: Path | None = None) -> dict:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update({
        PROBE_ENV: str(probe_dir), "PYTHONPATH": str(site_dir), "OMP_NUM_THREADS": str(threads),
        "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled",
        "AXOLOTL_DO_NOT_TRACK": "1", "DO_NOT_TRACK": "1", "TOKENIZERS_PARALLELISM": "false",
    })
    if extra_path is not None:  # axolotl launches `accelerate` by name
        env["PATH"] = f"{extra_path}{os.pathsep}{env.get('PATH', '')}"
    return env


def read_probe(probe_dir: Path) -> dict | None:
    records = [json.loads(path.read_text()) for path in sorted(probe_dir.glob("probe-*.json"))]
    return max(records, key=lambda record: len(record["step_seconds"]), default=None)


def check_adapter(adapter_dir: Path, model_dir: Path) -> dict:
    """Size and contents of a saved adapter, and whether stock peft loads it onto the plain base."""
    import torch
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        return {"adapter_bytes": None, "non_adapter_tensors": None, "loads_on_plain_base": "no adapter saved"}
    with safe_open(str(weights), "pt") as handle:
        extra = [name for name in handle.keys() if "lora_" not in name]
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    try:
        PeftModel.from_pretrained(base, adapter_dir)
        loads = "yes"
    except Exception as error:  # noqa: BLE001  (any failure is the answer being measured)
        lines = [line.strip() for line in str(error).strip().splitlines()]
        reason = next((line for line in lines if "size mismatch" in line), lines[0] if lines else "")
        loads = f"no: {type(error).__name__}: {reason[:200]}"
    return {"adapter_bytes": weights.stat().st_size, "non_adapter_tensors": len(extra),
            "loads_on_plain_base": loads}


def summarise(name: str, run: dict, probe: dict | None, adapter: dict, log_path: Path) -> dict:
    row = {"variant": name, **run, **adapter, "log": str(log_path)}
    if probe is None:
        tail = log_path.read_text(errors="replace")[-1200:] if log_path.exists() else ""
        return {**row, "failed": f"exit {run['returncode']}, no training step recorded; log tail:\n{tail}"}
    losses = [entry["loss"] for entry in probe["logs"] if "loss" in entry]
    grad_norms = [entry["grad_norm"] for entry in probe["logs"] if "grad_norm" in entry]
    timed = probe["step_seconds"][1:] or probe["step_seconds"]  # the first step also warms the caches
    return {
        **row,
        "steps": len(probe["step_seconds"]),
        "step_seconds": statistics.median(timed),
        "train_seconds": sum(probe["step_seconds"]),
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "all_grad_norms_zero": bool(grad_norms) and all(g == 0 for g in grad_norms),
        "layers": probe["layers"],
        "vocab_rows": probe["vocab_rows"],
        "torch_threads": probe["torch_threads"],
        "cuda_max_allocated_bytes": probe.get("cuda_max_allocated_bytes"),
    }


def run_ours(args, recipe_name: str, model_dir: Path, scratch: Path, site_dir: Path) -> dict:
    out, probe_dir = scratch / "ours", scratch / "probe-ours"
    probe_dir.mkdir()
    command = [sys.executable, str(REPO_ROOT / "lora" / "finetune.py"), recipe_name, "--output-dir", str(out),
               "--set", f"base_model={model_dir}"]
    command += [item for override in our_overrides(args.steps) for item in ("--set", override)]
    log = scratch / "ours.log"
    print(f"[ours] {' '.join(command)}", flush=True)
    run = run_measured(command, tool_env(probe_dir, site_dir, args.threads), log, args.timeout)
    return summarise("ours", run, read_probe(probe_dir), check_adapter(out, model_dir), log)


def run_axolotl(args, name: str, config: dict, venv: Path, model_dir: Path, scratch: Path, site_dir: Path) -> dict:
    import yaml

    probe_dir = scratch / f"probe-{name}"
    probe_dir.mkdir()
    config_path = scratch / f"{name}.yml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    command = [str(venv / "bin" / "axolotl"), "train", str(config_path)]  # what FinLoRA runs
    log = scratch / f"{name}.log"
    print(f"[{name}] {' '.join(command)}", flush=True)
    env = tool_env(probe_dir, site_dir, args.threads, extra_path=venv / "bin")
    # cwd: axolotl writes its tokenised data to ./last_run_prepared when dataset_prepared_path is empty (FinLoRA's)
    run = run_measured(command, env, log, args.timeout, cwd=scratch)
    return summarise(name, run, read_probe(probe_dir), check_adapter(Path(config["output_dir"]), model_dir), log)


# ----------------------------------------------------------------------------------------------------------------
# The table


def _gib(value) -> str:
    return f"{value / 2**30:.2f}" if value else "-"


def format_table(rows: list[dict]) -> str:
    def quantised(row):
        layers = row.get("layers")
        if not layers:
            return "-"
        if layers["bits"] is None:
            return "no (0 bnb layers)"
        count = layers["linear4bit"] or layers["linear8bit"]
        return f"{layers['bits']}-bit ({count} bnb layers{', ' + layers['quant_type'] if layers['quant_type'] else ''})"

    header = ("| variant | s/step (median) | train s | wall s | peak RSS GiB | first -> last loss | grad norms | "
              "base quantised (loaded modules) | vocab rows | adapter MB (non-LoRA tensors) | loads on plain base |")
    lines = [header, "|" + "---|" * 11]
    for row in rows:
        if "failed" in row:
            lines.append(f"| {row['variant']} | failed: exit {row['returncode']} | | {row['wall_seconds']:.0f} | "
                         f"{_gib(row['peak_rss_bytes'])} | | | | | | |")
            continue
        loss = (f"{row['first_loss']:.3f} -> {row['last_loss']:.3f}" if row["first_loss"] is not None else "-")
        size = (f"{row['adapter_bytes'] / 1e6:.1f} ({row['non_adapter_tensors']})" if row["adapter_bytes"] else "-")
        memory = _gib(row["peak_rss_bytes"])
        if row.get("cuda_max_allocated_bytes"):
            memory += f" (CUDA {_gib(row['cuda_max_allocated_bytes'])})"
        lines.append(
            f"| {row['variant']} | {row['step_seconds']:.2f} | {row['train_seconds']:.1f} | {row['wall_seconds']:.0f} "
            f"| {memory} | {loss} | {'all 0' if row['all_grad_norms_zero'] else 'non-zero'} | {quantised(row)} | "
            f"{row['vocab_rows']} | {size} | {row['loads_on_plain_base']} |"
        )
    return "\n".join(lines)


def ratio_lines(rows: list[dict]) -> list[str]:
    by_name = {row["variant"]: row for row in rows if "failed" not in row}
    ours = by_name.get("ours")
    lines = []
    for name in ("matched", "finlora"):
        peer = by_name.get(name)
        if ours and peer:
            lines.append(f"- axolotl ({name}) / ours: {peer['step_seconds'] / ours['step_seconds']:.2f}x the seconds "
                         f"per step, {peer['peak_rss_bytes'] / ours['peak_rss_bytes']:.2f}x the peak RSS")
    return lines


def format_changes(title: str, changes) -> list[str]:
    lines = [f"{title}:"]
    for key, value, why in changes:
        shown = "(removed)" if value is None else json.dumps(value)
        lines.append(f"  - {key}: {shown}  ({why})")
    return lines


def machine_line() -> str:
    from benchmarks_md import hardware_name  # bench/ is on sys.path as the script's folder

    make_this_checkout_importable()

    return f"{hardware_name()}, {os.cpu_count()} cores"


def uptime_line() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def write_section(args, block_lines: list[str]) -> None:
    name = "peer_axolotl" + (f" {args.tag}" if args.tag else "")
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    block = "\n".join([begin, *block_lines, end])
    from benchmarks_md import write_block  # bench/ is on sys.path as the script's folder

    write_block(args.benchmarks_file, SECTION_HEADING, begin, end, block)


# ----------------------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="sentiment_smollm2_135m_4bits_r8_dora")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--threads", type=int, default=min(os.cpu_count() or 1, 2), help="OMP_NUM_THREADS of both")
    parser.add_argument("--variants", nargs="+", default=["ours", "finlora", "matched"],
                        choices=["ours", "finlora", "matched"])
    parser.add_argument("--no-install", action="store_true", help="never build the axolotl venv")
    parser.add_argument("--yaml-only", action="store_true", help="print the YAMLs and the changes; run nothing")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per tool run")
    parser.add_argument("--keep", type=Path, help="keep logs, YAMLs and adapters in this folder")
    parser.add_argument("--write", action="store_true", help="write the table into BENCHMARKS.md")
    parser.add_argument("--tag", default="", help="names this run's block in BENCHMARKS.md")
    parser.add_argument("--benchmarks-file", type=Path, default=REPO_ROOT / "BENCHMARKS.md")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(REPO_ROOT))
    import torch
    import yaml

    from lora.models.source import resolve_model_source
    from lora.recipes.registry import resolve_recipe

    device = "cuda" if torch.cuda.is_available() else "cpu"
    recipe = resolve_recipe(args.recipe)
    model_dir = Path(resolve_model_source(recipe["base_model"], relative_to=recipe.registry_path.parent).path)
    scratch = args.keep.resolve() if args.keep else Path(tempfile.mkdtemp(prefix="peer-axolotl-"))
    scratch.mkdir(parents=True, exist_ok=True)
    common = benchmark_changes(args.steps) + device_changes(device)
    finlora = finlora_yaml(finlora_run_config(recipe, model_dir), scratch / "axolotl-finlora")
    configs = {"finlora": apply_changes(finlora, common),
               "matched": apply_changes(finlora, common + matched_changes(device))}
    configs["matched"]["output_dir"] = str(scratch / "axolotl-matched")
    change_lines = (format_changes(f"changes to FinLoRA's YAML in both axolotl runs ({device})", common)
                    + format_changes("and in `matched` only", matched_changes(device))
                    + [f"ours: --set {' --set '.join(our_overrides(args.steps))}"])
    print("\n".join(change_lines))
    if args.yaml_only:
        print("\n# FinLoRA's YAML for this recipe, as its generator writes it")
        print(yaml.safe_dump(finlora, sort_keys=False))
        return 0

    load_before, started = uptime_line(), time.time()
    site_dir = scratch / "site"
    write_sitecustomize(site_dir)
    rows, notes = [], []
    venv = None
    if {"finlora", "matched"} & set(args.variants):
        venv, why = ensure_axolotl_venv(install=not args.no_install)
        print(f"axolotl: {why}", flush=True)
        if venv is None:
            notes.append(f"axolotl skipped: {why.splitlines()[0]}")
    for name in args.variants:
        if name == "ours":
            rows.append(run_ours(args, args.recipe, model_dir, scratch, site_dir))
        elif venv is not None:
            rows.append(run_axolotl(args, name, configs[name], venv, model_dir, scratch, site_dir))
        else:
            continue
        row = rows[-1]
        print(f"[{name}] " + (row["failed"] if "failed" in row else
                              f"{row['step_seconds']:.2f} s/step, {_gib(row['peak_rss_bytes'])} GiB peak RSS, "
                              f"loss {row['first_loss']} -> {row['last_loss']}"), flush=True)
    table = format_table(rows)
    lines = [
        f"Command: `.venv/bin/python bench/peer_axolotl.py {' '.join(a for a in (argv or sys.argv[1:]))}`  ",
        f"Machine: {machine_line()}; torch {torch.__version__}; axolotl {AXOLOTL_VERSION} in its own venv  ",
        f"Load: before `{load_before}`; after `{uptime_line()}`  ",
        f"Run: {datetime.date.today().isoformat()}, recipe `{args.recipe}` on {model_dir.name} (Q4_1-dequantised "
        f"weights), {args.steps} steps, OMP_NUM_THREADS={args.threads}, {(time.time() - started) / 60:.1f} min in all",
        "",
        table,
        "",
        *ratio_lines(rows),
        *[f"- {note}" for note in notes],
        "",
        "```",
        *change_lines,
        "```",
    ]
    print("\n" + "\n".join(lines))
    failed = [row["variant"] for row in rows if "failed" in row]
    if args.write and failed:
        # A run that did not train measures nothing: it must not replace the results it would be compared with.
        print(f"not writing BENCHMARKS.md: {', '.join(failed)} failed (logs above)", file=sys.stderr)
    elif args.write:
        write_section(args, lines)
    if args.keep:
        (scratch / "rows.json").write_text(json.dumps(rows, indent=2))
    else:
        shutil.rmtree(scratch, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
