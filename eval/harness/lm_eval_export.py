"""Write registry tasks as an lm-evaluation-harness task folder, prompts rendered with an adapter's template.

    python eval/evaluate.py --adapter outputs/RECIPE --tasks sentiment,entities --export-lm-eval lm_eval_tasks
    lm_eval --model hf --model_args pretrained=BASE,peft=outputs/RECIPE,tokenizer=outputs/RECIPE \
        --include_path lm_eval_tasks --tasks lora_recipes_sentiment,lora_recipes_entities

Each task becomes `lora_recipes_<task>.yaml` and its rows `lora_recipes_<task>.jsonl`, with every prompt already
rendered (chat template applied) so lm-eval needs no template of its own:
- classification: `multiple_choice` over the task's labels, `target_delimiter: ""`. lm-eval moves the prompt's
  trailing whitespace into the label before tokenising, which is our encoding rule
  (lora.prompts.templates.encode_text_pair),
  so it scores exactly the ids we train on and score.
- entities, numeric, text: `generate_until`, greedy, the prompt written as the rule's generation prompt (trailing
  whitespace left out), stopped where our generation stops (`until`: the text of each token of
  lora.prompts.generation.stop_token_ids: EOS, the end ids the model declares, the template's end of answer);
  parsed and scored by the harness's own lora/prompts/parsing.py and eval/harness/metrics.py, which are copied
  into the folder (eval/harness/lm_eval_metrics.py loads them).
The data paths in the YAML files are absolute: move the folder and export again.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterable
from pathlib import Path

from eval.harness import metrics
from eval.harness.tasks import Task
from lora.core.files import claim_output_folder
from lora.prompts import parsing
from lora.prompts.generation import stop_strings
from lora.prompts.templates import prompt_text, split_at_boundary

__all__ = [
    "COPIED_MODULES",
    "export_tasks",
    "lm_eval_task_name",
    "MARKER",
    "metric_list",
    "METRICS_MODULE",
    "task_documents",
    "TASK_PREFIX",
    "task_yaml",
]

TASK_PREFIX = "lora_recipes_"
MARKER = "lora_recipes_export.json"  # says a folder is ours to replace
METRICS_MODULE = "lm_eval_metrics"
# The files an exported folder carries, by the name lm_eval_metrics.py loads them under (it finds them beside it).
COPIED_MODULES = {
    "lm_eval_metrics.py": Path(__file__).with_name("lm_eval_metrics.py"),
    "parsing.py": Path(parsing.__file__),
    "metrics.py": Path(metrics.__file__),
}


def lm_eval_task_name(task_name: str) -> str:
    """The exported name: our prefix (no clash with lm-eval's own tasks) and only [A-Za-z0-9_]."""
    return TASK_PREFIX + re.sub(r"[^A-Za-z0-9_]+", "_", task_name)


def task_documents(task: Task, rows: list[dict], targets: list, template: str, tokenizer) -> list[dict]:
    """One lm-eval document per row: the rendered prompt and what the task's metrics compare with."""
    documents = []
    for row, target in zip(rows, targets, strict=True):
        prompt = prompt_text(row["context"], template, tokenizer)
        document = {"target": row["target"]}
        if task.kind == "classification":
            document.update(prompt=prompt, choices=list(task.labels), gold=task.labels.index(target))
        else:
            document["prompt"] = split_at_boundary(prompt, "")[0]
            document["expected"] = target
            if task.kind == "entities":
                document["entity_types"] = list(task.entity_types)
            elif task.kind == "numeric":
                document.update(rel_tol=task.rel_tol, abs_tol=task.abs_tol)
        documents.append(document)
    return documents


def metric_list(kind: str) -> list[str]:
    """The YAML `metric_list` of a `kind` task: every metric the one table (eval/harness/metrics.py) exports."""
    lines = ["metric_list:"]
    for metric in metrics.METRICS[kind]:
        if metric.lm_eval:
            written = "mean" if metric.lm_eval == "mean" else f"!function {METRICS_MODULE}.aggregate_corpus"
            lines += [f"  - metric: {metric.name}", f"    aggregation: {written}", "    higher_is_better: true"]
    return lines


def task_yaml(name: str, task: Task, data_file: Path, template: str, tokenizer, generation_config=None) -> str:
    """The task's lm-eval YAML; `generation_config` is the base model's (its declared end ids stop an answer too)."""
    lines = [
        f"# {task.kind} task {json.dumps(task.name)}, prompts under prompt_template {json.dumps(template)}",
        f"task: {name}",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {json.dumps(str(data_file))}",
        "test_split: test",
        "num_fewshot: 0",
        "doc_to_text: prompt",
        "doc_to_target: target",
    ]
    if task.kind == "classification":
        lines += ["output_type: multiple_choice", "doc_to_choice: choices", 'target_delimiter: ""']
    else:
        until = ", ".join(json.dumps(text) for text in stop_strings(tokenizer, template, generation_config))
        lines += ["output_type: generate_until", 'target_delimiter: ""', "generation_kwargs:",
                  f"  until: [{until}]", f"  max_gen_toks: {task.max_new_tokens}", "  do_sample: false"]
    lines += [f"process_results: !function {METRICS_MODULE}.process_{task.kind}", *metric_list(task.kind),
              "metadata:", "  version: 1.0"]
    return "\n".join(lines) + "\n"


def export_tasks(prepared: list[tuple[Task, list[dict], list]], out_dir: Path, *, template: str, tokenizer,
                 source: dict | None = None, inputs: Iterable[tuple[str, Path | str | None]] = (),
                 generation_config=None) -> list[str]:
    """Write the task folder `out_dir` (replaced whole once complete) and return the exported task names.

    Args:
        prepared: (task, rows, targets) as eval.harness.evaluation.prepare_tasks and task_targets give them.
        template: the adapter's prompt template ("plain", "chat" or a "{context}" string).
        generation_config: the base model's `GenerationConfig` (None: only the tokenizer's and the template's ends
            stop a generated answer).
        source: what the prompts were rendered for (adapter, base model), recorded in the folder's marker file.
        inputs: what else the export reads (the adapter's files, the tokenizer's folder), as (what, path) pairs;
            the tasks' data files are added here. The export may not be, contain nor lie inside any of them.

    Raises:
        OutputError: `out_dir` is (inside) an input, a file, a folder that is not an earlier export (it is never
            replaced then), or being written by another command (lora.core.files.claim_output_folder).
    """
    inputs = [*inputs, *((f'the data file of task "{task.name}"', task.path) for task, _, _ in prepared)]
    # An earlier export is replaced without a flag (the folder is ours and regenerated whole); nothing else is.
    with claim_output_folder(out_dir, overwrite=True, record=MARKER, made_by="eval/evaluate.py --export-lm-eval",
                             kind="an lm-eval export", inputs=inputs, flag="--export-lm-eval") as claim:
        out_dir = claim.out
        staging = claim.new_build()
        names = []
        for task, rows, targets in prepared:
            name = lm_eval_task_name(task.name)
            data_file = staging / f"{name}.jsonl"
            with data_file.open("w", encoding="utf-8") as handle:
                for document in task_documents(task, rows, targets, template, tokenizer):
                    handle.write(json.dumps(document, ensure_ascii=False) + "\n")
            yaml_text = task_yaml(name, task, out_dir / data_file.name, template, tokenizer, generation_config)
            (staging / f"{name}.yaml").write_text(yaml_text, encoding="utf-8")
            names.append(name)
        for name, source_file in COPIED_MODULES.items():
            shutil.copyfile(source_file, staging / name)
        marker = {"tasks": names, "prompt_template": template, **(source or {})}
        (staging / MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        claim.publish()
    return names
