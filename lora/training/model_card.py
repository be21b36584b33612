"""The adapter's model card (README.md): front matter the hub understands (base model, tags, and the eval scores as
`model-index`, so a pushed adapter shows its results), then what was trained and how well.

The card is written to be published: it names no path of the machine that trained it (run_summary.json keeps
those: where the weights were read from, the data files).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from huggingface_hub import EvalResult, ModelCardData

from lora.training.run_record import TaskFacts, format_losses, score_figures

__all__ = ["card_metadata", "eval_results", "write_model_card"]

# eval task kind (eval/tasks.json) -> the hub's task type for model-index
HUB_TASK_TYPES = {"classification": "text-classification"}
HUB_DATASETS_URL = "https://huggingface.co/datasets/"


def _format_scores(before: dict, after: dict) -> list[str]:
    if not after:
        return []
    lines = ["", "## Evaluation (bundled test sets)", "", "| task | n | before | after |", "|---|---|---|---|"]
    for task, scores in after.items():
        previous = before.get(task, {}).get("accuracy")
        shown = f"{previous:.3f}" if previous is not None else "-"
        lines.append(f"| {task} | {scores.get('n')} | {shown} | {scores['accuracy']:.3f} |")
    return lines


def eval_results(scores_after: dict[str, dict], task_facts: Mapping[str, TaskFacts]) -> list[EvalResult]:
    """The after-training scores as the hub's model-index entries: one per task and declared metric."""
    results = []
    for name, metrics in score_figures(scores_after, task_facts).items():
        task, scored = task_facts.get(name), scores_after[name]
        homepage = (task.homepage if task else "") or ""
        dataset_id = homepage.removeprefix(HUB_DATASETS_URL) if homepage.startswith(HUB_DATASETS_URL) else name
        for metric, value in metrics.items():
            results.append(EvalResult(
                task_type=HUB_TASK_TYPES.get(scored.get("kind"), "text-generation"),
                task_name=name,
                dataset_type=dataset_id,
                dataset_name=(task.description if task and task.description else name),
                dataset_split="test",
                metric_type=metric,
                metric_value=value,
                metric_name=f"{metric} ({scored.get('mode')} scoring, n={scored.get('n')})",
            ))
    return results


def card_metadata(recipe, summary: dict, base_model_id: str, task_facts: Mapping[str, TaskFacts]) -> ModelCardData:
    """The card's front matter; a base model named by a local folder is left out (the hub needs a hub id)."""
    adapter = "DoRA" if recipe["use_dora"] else "LoRA"
    return ModelCardData(
        base_model=None if Path(base_model_id).is_absolute() else base_model_id,
        library_name="peft",
        tags=sorted({"lora", adapter.lower()}),
        model_name=recipe.name,
        eval_results=eval_results(summary.get("eval_after") or {}, task_facts) or None,
    )


def write_model_card(path: Path, recipe, summary: dict, base_model_id: str,
                     task_facts: Mapping[str, TaskFacts]) -> None:
    adapter = "DoRA" if recipe["use_dora"] else "LoRA"
    base = f"{recipe['quant_bits']}-bit" if recipe.quantised else recipe["dtype"]
    named_base = base_model_id if not Path(base_model_id).is_absolute() else "a local model folder"
    lines = [
        "---",
        card_metadata(recipe, summary, base_model_id, task_facts).to_yaml(),
        "---",
        "",
        f"# {recipe.name}",
        "",
        recipe["description"] or f"A {adapter} adapter for {named_base}.",
        "",
        f"- adapter: {adapter}, r={recipe['lora_r']}, alpha={recipe['lora_alpha']}, dropout={recipe['lora_dropout']}"
        + (", rsLoRA" if recipe["use_rslora"] else ""),
        f"- base during training: {named_base}, {base}; weights from {summary.get('weights_from')}",
        (f"- data: {Path(recipe['dataset_path']).name} (sha256 {(summary.get('dataset_sha256') or '')[:12]}...), "
         if recipe["dataset_path"] else
         f"- data: a mixture of {', '.join(Path(d['path']).name for d in recipe['datasets'])}, ")
        + f"prompt template `{recipe['prompt_template']}`",
        f"- steps: {summary.get('steps')}, loss {format_losses(summary)}",
        "",
        "Load it with peft:",
        "",
        "```python",
        "from peft import AutoPeftModelForCausalLM",
        "model = AutoPeftModelForCausalLM.from_pretrained('PATH_TO_THIS_FOLDER')",
        "```",
        "",
        "`recipe.json` holds the full resolved recipe and `run_summary.json` the run record.",
    ]
    lines += _format_scores(summary.get("eval_before") or {}, summary.get("eval_after") or {})
    path.write_text("\n".join(lines) + "\n")
