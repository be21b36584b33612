"""Our choice scoring vs lm-evaluation-harness on the same loaded model, adapter and rows, side by side in one run.

    python bench/choice_vs_lm_eval.py --adapter outputs/sentiment_smollm2_135m_4bits_r8_dora --task sentiment

The adapter is loaded once (its recorded base and quantisation, as eval/evaluate.py does); the task is exported for
lm-eval (eval/harness/lm_eval_export.py) and scored by `lm_eval.simple_evaluate(HFLM(pretrained=model))` and by
eval.harness.evaluation.evaluate_tasks in choice mode. Prints examples/s and accuracy of each, and how often they chose
the
same label.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", required=True)
    parser.add_argument("--task", default="sentiment")
    parser.add_argument("--limit", type=int)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from eval.evaluate import parse_args
    from eval.harness.evaluation import evaluate_tasks, prepare_tasks, task_targets
    from eval.harness.lm_eval_export import export_tasks
    from eval.harness.model_plan import load_model, model_plan

    plan = model_plan(parse_args(["--adapter", args.adapter]))
    model, tokenizer = load_model(plan, None)
    template = plan["settings"].get("prompt_template", "plain")
    prepared = prepare_tasks([args.task], limit=args.limit)
    with tempfile.TemporaryDirectory() as folder:
        export = Path(folder) / "tasks"
        [name] = export_tasks([(task, rows, task_targets(task, rows)) for task, rows in prepared], export,
                              template=template, tokenizer=tokenizer)
        started = time.perf_counter()
        ours = evaluate_tasks(model, tokenizer, [args.task], prompt_template=template, limit=args.limit,
                              batch_size=args.batch_size, mode="choice", out_dir=Path(folder) / "ours",
                              progress=False)[args.task]
        ours_seconds = time.perf_counter() - started
        our_choices = [json.loads(line)["prediction"]
                       for line in (Path(folder) / "ours" / f"{args.task}.predictions.jsonl").read_text().splitlines()]
        model.eval()
        started = time.perf_counter()
        results = simple_evaluate(model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=args.batch_size),
                                  tasks=[name], task_manager=TaskManager(include_path=str(export)), log_samples=True,
                                  bootstrap_iters=0)
        theirs_seconds = time.perf_counter() - started
    theirs = results["results"][name]
    picked = {}
    for sample in results["samples"][name]:
        log_likelihoods = [response[0] for response in sample["filtered_resps"]]
        picked[sample["doc_id"]] = sample["doc"]["choices"][max(range(len(log_likelihoods)),
                                                                key=log_likelihoods.__getitem__)]
    same = sum(picked[i] == choice for i, choice in enumerate(our_choices)) / len(our_choices)
    n = len(our_choices)
    print(f"adapter {plan['adapter']} ({plan['quant_bits']}-bit base), task {args.task}, {n} rows, template "
          f"{json.dumps(template)}, batch {args.batch_size}")
    print("| scorer | examples/s | accuracy | weighted F1 | macro F1 |")
    print("|---|---|---|---|---|")
    print(f"| ours (choice mode) | {n / ours_seconds:.1f} | {ours['accuracy']:.3f} | {ours['weighted_f1']:.3f} | "
          f"{ours['macro_f1']:.3f} |")
    print(f"| lm-eval 0.4.13 (HFLM on the same model, exported task) | {n / theirs_seconds:.1f} | "
          f"{theirs['accuracy,none']:.3f} | {theirs['weighted_f1,none']:.3f} | {theirs['macro_f1,none']:.3f} |")
    print(f"same choice on {same:.1%} of rows; ours is {theirs_seconds / ours_seconds:.2f}x lm-eval's speed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
