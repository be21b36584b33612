"""Compare evaluation results: a markdown table (rows: tasks; columns: base, then each adapter) and a PNG chart.

    python eval/compare.py outputs/*                                  # base = the first run's eval_before/
    python eval/compare.py outputs/* --base outputs/base_SmolLM2-135M-Instruct_4bit
    python eval/compare.py outputs/run_a outputs/run_b --metric weighted_f1 --png /tmp/cmp.png --markdown /tmp/cmp.md

Each argument is a run folder (results in its eval/ subfolder, written by lora/finetune.py or eval/evaluate.py) or
an eval folder itself (holding <task>.json files). Without --base, the base column is the first run's eval_before/
(the runner scores the identity-initialised adapter, i.e. the base model, before training) or, failing that, its
eval_base/ (written by evaluate.py --with-base). A cell shows the task's
headline metric (the first of its metrics in eval/tasks.json) and, for adapters, the change against the base.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if __name__ == "__main__":  # run as a script: the project's packages import from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eval.harness.results import bar_chart, collect_columns, markdown_table, table_rows
from lora.core.errors import exit_on_user_error


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python eval/compare.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run folders (outputs/<recipe>) or eval folders")
    parser.add_argument("--base", help="base model results (a run folder or eval folder); default: first eval_before")
    parser.add_argument("--metric", help="show this metric for every task instead of each task's headline metric")
    parser.add_argument("--png", help="chart path (default: comparison.png beside the runs)")
    parser.add_argument("--markdown", help="also write the table to this file")
    return parser.parse_args(argv)


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    paths = [Path(p).expanduser().resolve() for p in args.runs]
    base = Path(args.base).expanduser().resolve() if args.base else None
    paths = [p for p in paths if p != base and p.is_dir()]
    columns = collect_columns(paths, base)
    has_base = columns[0][0].startswith("base: ")
    rows = table_rows(columns, args.metric)
    table = markdown_table(columns, rows, has_base)
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    png = Path(args.png) if args.png else Path(os.path.commonpath([str(p.parent) for p in paths])) / "comparison.png"
    bar_chart(columns, rows, png)
    print(f"\nchart: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
