"""Search the recipe space for the best recipe of a task: a sweep of sweeps.json, run as an Optuna study whose trials
are ordinary training runs (each in outputs/sweeps/<sweep>/trial-NNN/), pruned early when they are losing.

    python lora/sweep.py --list                               # the sweeps of sweeps.json
    python lora/sweep.py SWEEP --dry-run                      # validate; print the base recipe's trial fields
    python lora/sweep.py SWEEP                                # run (or continue) the study -> outputs/sweeps/SWEEP/
    python lora/sweep.py SWEEP --workers 2                    # two worker processes on this machine
    python lora/sweep.py SWEEP --storage postgresql://USER@HOST:5432/DB   # the same command on every machine
    python lora/sweep.py SWEEP --results                      # rewrite results.md/.csv and the plots
    python lora/sweep.py SWEEP --best                         # the best trial as a registry entry

The study lives in outputs/sweeps/SWEEP/study.sqlite3 unless --storage names a database; rerunning the command
continues it. A worker killed mid-trial leaves that trial to be failed and run again by the next worker that looks.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

if __name__ == "__main__":  # run as a script: the project's packages import from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora.core.errors import UserError, exit_on_user_error
from lora.sweeps.spec import SweepError, list_sweeps, load_sweep


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python lora/sweep.py",
                                     description="Run a sweep of sweeps.json: an Optuna study over recipe fields.")
    parser.add_argument("sweep", nargs="?", help="sweep name (see --list)")
    parser.add_argument("--list", action="store_true", help="print the sweeps as a table and exit")
    parser.add_argument("--sweeps", help="sweeps file (default: sweeps.json at the repo root)")
    parser.add_argument("--registry", help="recipe registry (default: finetune_configs.json beside the sweeps file)")
    parser.add_argument("--output-dir",
                        help="the sweep's folder (default: outputs/sweeps/<sweep>/ beside the registry)")
    parser.add_argument("--storage", metavar="URL",
                        help="the study's database shared by workers on several machines (postgresql://...); "
                             "default: SQLite in the sweep's folder")
    parser.add_argument("--workers", type=int, default=1, metavar="N", help="worker processes on this machine")
    parser.add_argument("--dry-run", action="store_true", help="validate and print what a trial sets; run nothing")
    parser.add_argument("--results", action="store_true", help="only (re)write the results table and plots")
    parser.add_argument("--best", action="store_true", help="print the best trial as a recipe entry and exit")
    parser.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        rows = list_sweeps(args.sweeps)
        columns = ["name", "recipe", "sampler", "pruner", "trials", "space"]
        widths = [max([len(c)] + [len(r[c]) for r in rows]) for c in columns]
        print("  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip())
        for row in rows:
            print("  ".join(row[c].ljust(w) for c, w in zip(columns, widths)).rstrip())
        return 0
    if not args.sweep:
        raise UserError("name a sweep to run (python lora/sweep.py SWEEP), or pass --list to see them.")
    if args.workers < 1:
        raise UserError(f"--workers {args.workers}: give 1 or more worker processes.")
    sweep = load_sweep(args.sweep, args.sweeps, args.registry)
    output_dir = Path(args.output_dir).resolve() if args.output_dir else sweep.default_output_dir()
    if args.dry_run:
        print(json.dumps({"sweep": sweep.name, "recipe": sweep.recipe, "registry": str(sweep.registry_path),
                          "output_dir": str(output_dir), "objective": sweep.objective.label,
                          "direction": sweep.objective.direction, "trials": sweep.target_trials(),
                          "max_steps_per_trial": sweep.max_steps_per_trial(), "every_trial_sets": sweep.fixed_fields(),
                          "space": list(sweep.space), "sampler": sweep.sampler, "pruner": sweep.pruner,
                          "budget": sweep.budget}, indent=2))
        return 0
    from lora.sweeps.results import best_recipe_entry
    from lora.sweeps.study import open_study, run_worker

    if args.best or args.results:
        study = open_study(sweep, output_dir, args.storage, must_exist=True)
        if args.best:
            try:
                print(best_recipe_entry(study, sweep))
            except ValueError as error:
                raise SweepError(f'sweep "{sweep.name}": {error}; run python lora/sweep.py {sweep.name} '
                                 "first.") from None
            return 0
        return report(study, sweep, output_dir)
    if args.workers > 1:
        return run_workers(args, output_dir)
    seed_offset = args.worker_index or 0
    if args.storage and args.worker_index is None:
        seed_offset = os.getpid()  # workers on other machines draw other TPE points
    study = run_worker(sweep, output_dir, args.storage, seed_offset=seed_offset)
    if args.worker_index is not None:
        return 0  # the parent of --workers writes the results once all its workers are done
    return report(study, sweep, output_dir)


def report(study, sweep, output_dir: Path) -> int:
    from lora.sweeps.results import write_results

    files, notes = write_results(study, sweep, output_dir)
    for note in notes:
        print(f"[sweep] note: {note}")
    print(f"[sweep] results: {', '.join(str(path) for path in files)}")
    print((output_dir / files[0].name).read_text(encoding="utf-8"))
    return 0


def run_workers(args: argparse.Namespace, output_dir: Path) -> int:
    """N worker processes of this command (each with its share of the CPU threads), then the results."""
    from lora.sweeps.study import open_study

    # The database's tables and the study are made here once, so the workers do not race to create them.
    open_study(load_sweep(args.sweep, args.sweeps, args.registry), output_dir, args.storage)
    threads = max(1, (os.cpu_count() or 1) // args.workers)
    base = [sys.executable, str(Path(__file__).resolve()), args.sweep, "--output-dir", str(output_dir)]
    for flag in ("sweeps", "registry", "storage"):
        if getattr(args, flag):
            base += [f"--{flag}", getattr(args, flag)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    workers = [subprocess.Popen([*base, "--worker-index", str(i)], env=env) for i in range(args.workers)]
    codes = [worker.wait() for worker in workers]
    failed = [(i, code) for i, code in enumerate(codes) if code != 0]
    for i, code in failed:
        print(f"[sweep] worker {i} exited with code {code}", file=sys.stderr)
    sweep = load_sweep(args.sweep, args.sweeps, args.registry)
    code = report(open_study(sweep, output_dir, args.storage, must_exist=True), sweep, output_dir)
    return max([code] + [2 if c == 2 else 1 for _, c in failed])


if __name__ == "__main__":
    sys.exit(main())
