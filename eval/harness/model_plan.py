"""What `python eval/evaluate.py` scores: the plan (base, adapter, recorded settings, default tasks, output folder)
from --adapter, --recipe or --base-model, the model loaded by the inference loader, and the lm-eval export.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from eval.harness.tasks import parse_data_overrides
from lora.core.errors import ModelSourceError, UserError

__all__ = ["base_generation_config", "export_for_lm_eval", "load_model", "model_plan", "plan_inputs",
           "plan_quantisation", "QUANT_CHOICES", "REPO_ROOT", "slug"]

REPO_ROOT = Path(__file__).resolve().parents[2]
QUANT_CHOICES = {"4": 4, "8": 8, "none": None, "16": None, "32": None}


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text.strip("/").split("/")[-1]) or "model"


def model_plan(args: argparse.Namespace) -> dict:
    """What to load: base model (name, path), quantisation recipe fields, template, adapter folder, tasks."""
    from lora.adapters.folders import read_adapter_records, refuse_if_normalised, resolve_base_model_path
    from lora.models.source import resolve_model_source

    if args.recipe:
        from lora.recipes.outputs import default_output_dir
        from lora.recipes.registry import resolve_recipe

        recipe = resolve_recipe(args.recipe, args.registry)
        record = recipe.to_record()
        if not args.base_only:
            adapter_dir = default_output_dir(recipe)
            if not (adapter_dir / "adapter_config.json").is_file():
                raise UserError(
                    f'recipe "{recipe.name}" has no trained adapter at {adapter_dir} yet. Train it first '
                    f"(python lora/finetune.py {recipe.name}), or add --base-only to score its base model."
                )
            args.adapter = str(adapter_dir)
        else:
            source = resolve_model_source(args.base_model or recipe["base_model"], recipe.registry_path.parent)
            return {"model": source.name, "path": source.path, "origin": source.origin, "settings": record,
                    "adapter": None, "default_tasks": record.get("eval_tasks") or [],
                    "default_limit": record.get("eval_limit"),
                    "out": Path(args.out) if args.out else default_output_dir(recipe) / "eval_base"}
    if args.adapter:
        refuse_if_normalised(args.adapter)
        records = read_adapter_records(args.adapter)
        try:
            path, origin = resolve_base_model_path(args.adapter, args.base_model)
        except ModelSourceError as error:
            message = f"the base model of adapter {records.adapter_dir} cannot be loaded: {error}"
            raise ModelSourceError(message) from None
        settings = dict(records.recipe or {})
        return {"model": args.base_model or records.base_model, "path": path, "origin": origin,
                "base_override": args.base_model,
                "settings": settings, "adapter": records.adapter_dir, "is_dora": records.is_dora,
                "default_tasks": settings.get("eval_tasks") or [], "default_limit": settings.get("eval_limit"),
                "out": Path(args.out) if args.out else records.adapter_dir / "eval"}
    if not args.base_model:
        raise UserError("say what to evaluate: --adapter FOLDER, --recipe NAME, or --base-model ID_OR_FOLDER "
                        "(see python eval/evaluate.py --help).")
    source = resolve_model_source(args.base_model, None)
    bits = QUANT_CHOICES[args.quant_bits] if args.quant_bits else None
    name = f"base_{slug(args.base_model)}" + (f"_{bits}bit" if bits else "")
    return {"model": source.name, "path": source.path, "origin": source.origin, "settings": {"quant_bits": bits},
            "adapter": None, "default_tasks": [], "default_limit": None,
            "out": Path(args.out) if args.out else REPO_ROOT / "outputs" / name / "eval"}


def plan_inputs(plan: dict) -> list[tuple[str, Path | str]]:
    """What scoring a plan reads besides the tasks' data: the adapter's own files (not its subfolders: results go
    to <adapter>/eval by default) and the base model's folder (a hub id names no local path and is skipped)."""
    inputs: list[tuple[str, Path | str]] = []
    if plan["adapter"] is not None:
        inputs += [("the adapter's file", path) for path in sorted(Path(plan["adapter"]).iterdir()) if path.is_file()]
    inputs.append(("the base model folder", plan["path"]))
    return inputs


def plan_quantisation(plan: dict, quant_bits_flag: str | None):
    """The base's QuantisationSettings: as the adapter (or the recipe) records them, at --quant-bits' width when
    given."""
    from lora.adapters.folders import read_adapter_records
    from lora.adapters.inference import AS_TRAINED, quantisation_for_adapter
    from lora.models.quantisation import QuantisationSettings

    bits = QUANT_CHOICES[quant_bits_flag] if quant_bits_flag is not None else AS_TRAINED
    if plan["adapter"] is not None:
        return quantisation_for_adapter(read_adapter_records(plan["adapter"]), bits)
    settings = QuantisationSettings.from_recipe(plan["settings"])
    return settings if bits == AS_TRAINED else settings.with_bits(bits)


def export_for_lm_eval(plan: dict, task_names: list[str], args, template: str, limit: int | None) -> int:
    """--export-lm-eval: write the task folder and print the lm_eval command that scores this adapter on it."""
    from eval.harness.evaluation import prepare_tasks, task_targets
    from eval.harness.lm_eval_export import export_tasks
    from lora.adapters.inference import tokenizer_folder
    from lora.models.loading import load_tokenizer

    prepared = prepare_tasks(task_names, data_overrides=parse_data_overrides(args.data), registry=args.task_registry,
                             limit=limit)
    tokenizer = load_tokenizer(tokenizer_folder(plan["adapter"], plan["path"]))
    source = {"model": plan["model"], "adapter": str(plan["adapter"]) if plan["adapter"] else None, "limit": limit}
    names = export_tasks([(task, rows, task_targets(task, rows)) for task, rows in prepared], Path(args.export_lm_eval),
                         template=template, tokenizer=tokenizer, source=source, inputs=plan_inputs(plan),
                         generation_config=base_generation_config(plan["path"]))
    model_args = f"pretrained={plan['path']}"
    if plan["adapter"]:
        model_args += f",peft={plan['adapter']},tokenizer={tokenizer_folder(plan['adapter'], plan['path'])}"
    print(f"wrote {len(names)} lm-eval task(s) to {Path(args.export_lm_eval).resolve()} (prompt template "
          f"{json.dumps(template)}). Score them with:\n"
          f"  lm_eval --model hf --model_args {model_args} --include_path {Path(args.export_lm_eval).resolve()} "
          f"--tasks {','.join(names)}")
    if plan["settings"].get("quant_bits") in (4, 8):
        print("(that base loads unquantised: lm-eval's load_in_4bit fails under transformers 5; to score the "
              "quantised model, hand the loaded model to lm_eval.models.huggingface.HFLM(pretrained=model), "
              "as README.md shows)")
    return 0


def base_generation_config(path):
    """The base model's GenerationConfig (the end ids it declares), None when its folder has none."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(path)
    except OSError:
        return None


def load_model(plan: dict, quant_bits_flag: str | None):
    """(model, tokenizer) for the plan: base (quantised as planned) with the adapter attached when there is one."""
    from lora.adapters.inference import load_adapter_for_inference, load_inference_base

    quantisation = plan_quantisation(plan, quant_bits_flag)
    plan["quant_bits"] = quantisation.bits
    if plan["adapter"] is None:
        return load_inference_base(plan["model"], plan["path"], quantisation)
    loaded = load_adapter_for_inference(plan["adapter"], base_override=plan["base_override"], quantisation=quantisation)
    return loaded.model, loaded.tokenizer
