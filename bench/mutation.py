"""Mutation testing of the critical modules with mutmut (pinned in requirements-mutation.txt), each module against
its own tests only, and the results as a table in MUTATION.md.

    .venv/bin/pip install -r requirements-mutation.txt
    nice -n 10 .venv/bin/python bench/mutation.py                      # every module below, smallest first
    nice -n 10 .venv/bin/python bench/mutation.py eval/harness/metrics.py lora/core/files.py   # some of them
    nice -n 10 .venv/bin/python bench/mutation.py --list                # the modules and the tests each one gets

Not part of `python -m pytest`: a run takes tens of minutes on 2 CPU cores (MUTATION.md says how long each module
took). For each module it copies the tracked files of the repository into a scratch folder, writes a `[tool.mutmut]`
section there that mutates only that module and selects only its tests, runs `mutmut run`, and reads the verdict of
each mutant from mutmut's own records. The rows of MUTATION.md for the modules run are replaced; other rows stay.
`--keep` leaves the scratch folders (under --work) to look at survivors with `mutmut show NAME` inside them, and
`--retest MODULE` runs only the survivors of such a kept run again once tests were added for them.
`--check-outside MODULE` checks the survivors judged "killed outside mutmut": each is written into a plain copy of
the repository (`mutmut apply`) and the tests its group names must fail there.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TABLE = REPO / "MUTATION.md"

# module -> the tests that are about it (pytest node ids or files). Only these run against its mutants: the
# whole suite per mutant would not finish on 2 cores, and a test elsewhere that happens to fail is not a test of it.
MODULES: dict[str, list[str]] = {
    "lora/training/sft_data.py": ["tests/test_data.py", "tests/test_training_loss.py", "tests/test_chat_data.py",
                                  "tests/test_mixtures.py"],
    "eval/harness/metrics.py": ["tests/test_eval_metrics.py", "tests/test_metric_table.py"],
    "lora/core/files.py": ["tests/test_output_lock_and_swap.py", "tests/test_json_files.py",
                           "tests/test_command_outputs.py"],
    "lora/prompts/templates.py": ["tests/test_data.py", "tests/test_encoding.py",
                                  "tests/test_stop_tokens.py::test_a_turn_end_of_several_tokens_stops_at_the_end_of_"
                                  "the_turn_not_inside_the_answer",
                                  "tests/test_stop_tokens.py::test_smollm2s_real_chat_template_stops_at_the_end_of_the"
                                  "_turn_not_at_the_first_newline"],
    "lora/prompts/generation.py": ["tests/test_stop_tokens.py", "tests/test_eval_harness.py"],
    "lora/serving/guards.py": ["tests/test_serve_guards.py", "tests/test_request_guard.py"],
    "lora/adapters/merge.py": ["tests/test_merge.py"],
    "lora/training/run_folder.py": ["tests/test_resume.py", "tests/test_safe_outputs.py",
                                    "tests/test_overwrite_leftovers.py", "tests/test_finetune_runs.py"],
    "lora/recipes/registry.py": [
        "tests/test_recipes.py",
        "tests/test_quantisation_settings.py",
        "tests/test_hostile_inputs.py::test_list_does_work_linear_in_the_number_of_recipes",
        "tests/test_hostile_inputs.py::test_a_symlink_loop_is_a_recipe_problem_and_list_shows_it",
    ],
    "lora/adapters/fast_dora.py": ["tests/test_fast_dora.py"],
}
# Tests left out of a module's mutation run, with why. A child process started in another folder inherits mutmut's
# MUTANT_UNDER_TEST but cannot find its configuration there and fails every run (mutmut's stats phase stops at it);
# mutmut credits no kill to a child process anyway, so leaving such a test out changes no verdict.
DESELECTED: dict[str, list[str]] = {
    "lora/recipes/registry.py": ["tests/test_recipes.py::test_finlora_recipe_dry_runs_from_another_folder"],
    "lora/adapters/merge.py": ["tests/test_merge.py::test_cli_refuses_existing_output_and_missing_adapter_with_exit_2"],
    "lora/training/run_folder.py": [
        "tests/test_finetune_runs.py::test_cli_missing_dataset_and_bad_row_and_unknown_model_exit_2"],
    # torch.compile cannot trace mutmut's trampoline (dynamo stops at its ContextVar.get); the kernels it compiles
    # are the same functions every other test of the module runs eagerly
    "lora/adapters/fast_dora.py": ["tests/test_fast_dora.py::test_compiled_composition_matches_stock_peft_on_cpu"],
}
COPIED = ["data", "finetune_configs.json", "accelerate_configs", "bench", "README.md", "requirements.txt"]
STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", 34: "skipped", 36: "timeout",
          24: "timeout", -24: "timeout", 152: "timeout", 255: "timeout", -11: "segfault", -9: "killed by signal",
          None: "not run"}
HEADER = ("| module | tests run against it | mutants | killed | survived | of them equivalent | timed out | no tests | "
          "other | killed % of the rest | minutes |")
# Survivors judged by reading them (MUTATION.md's second table is written from this file): "equivalent" (no input
# can tell the mutant from the module) or "killed outside mutmut" (a test fails on it, but mutmut cannot see it).
JUDGED = REPO / "bench" / "mutation_judged.json"


def mutmut_section(module: str, tests: list[str]) -> str:
    selection = [test for test in tests if (REPO / test.split("::")[0]).exists()]
    return "\n".join([
        "[tool.mutmut]",
        'source_paths = ["lora", "eval"]',
        f"only_mutate = [{json.dumps(module)}]",
        f"also_copy = {json.dumps(COPIED)}",
        f"pytest_add_cli_args_test_selection = {json.dumps(selection)}",
        # -x: one failing test kills the mutant; no cache: the scratch copy is thrown away; -p no:randomly if any
        "pytest_add_cli_args = " + json.dumps(["-x", "-q", "-p", "no:cacheprovider", "-o", "addopts=--strict-markers",
                                               *(f"--deselect={test}" for test in DESELECTED.get(module, []))]),
        # torch is not fork-safe once it has run: mutants are forked from a server that only imported the tests
        'process_isolation = "forkserver"',
        "timeout_multiplier = 5.0",
        "timeout_constant = 30.0",
        "use_git_change_detection = false",
        "",
    ])


def prepare(module: str, tests: list[str], work: Path) -> Path:
    folder = scratch_folder(module, work)
    copy_repository(folder)
    (folder / "record.json").write_text(json.dumps({"started": time.time()}))
    pyproject = folder / "pyproject.toml"
    pyproject.write_text(pyproject.read_text() + "\n" + mutmut_section(module, tests))
    return folder


def copy_repository(target: Path) -> None:
    """A fresh copy of the repository's files (`tracked_files`) in `target`, replacing whatever was there."""
    shutil.rmtree(target, ignore_errors=True)
    for name in tracked_files():
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, target / name)


def tracked_files() -> list[str]:
    """The repository's files as git sees them (tracked, and new ones not ignored), MUTATION.md left out."""
    names = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.splitlines()
    return [name for name in names if (REPO / name).is_file() and not name.startswith("MUTATION")]


def refresh_copy(folder: Path, module: str) -> None:
    """Bring a kept scratch copy up to the repository as it is now (tests and fixes added since), all but the
    mutated module itself: its mutants were made from the kept copy, and a changed module needs a new run."""
    if (REPO / module).read_bytes() != (folder / module).read_bytes():
        raise SystemExit(f"--retest: {module} changed since its kept run; run it again without --retest")
    for name in tracked_files():
        if name in (module, "pyproject.toml"):
            continue
        # mutmut's own copy (mutants/) holds the source folders, the tests and also_copy; other files live beside it
        targets = [folder / name]
        if (folder / "mutants" / name.split("/")[0]).exists():
            targets.append(folder / "mutants" / name)
        for target in targets:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, target)


def verdicts(folder: Path, module: str) -> dict[str, str]:
    """mutant name -> status, from the .meta file mutmut keeps beside the mutated module."""
    meta = folder / "mutants" / (module + ".meta")
    if not meta.is_file():
        return {}
    codes = json.loads(meta.read_text()).get("exit_code_by_key", {})
    return {name: STATUS.get(code, f"exit {code}") for name, code in codes.items()}


def scratch_folder(module: str, work: Path) -> Path:
    return work / re.sub(r"[^A-Za-z0-9]+", "_", module.removesuffix(".py"))


def run_module(module: str, tests: list[str], work: Path, max_children: int, retest: bool = False,
               with_tests: bool = False) -> dict:
    """Run mutmut over `module`; with `retest`, only its surviving mutants again, in the kept scratch folder, against
    the tests as they are now (tests added since are found by mutmut, which collects their coverage first)."""
    folder = scratch_folder(module, work)
    earlier_minutes, names = 0.0, []
    if retest:
        if not (folder / "mutants").is_dir():
            raise SystemExit(f"--retest: no kept run of {module} in {folder} (run it with --keep first)")
        refresh_copy(folder, module)
        # the test selection as MODULES gives it now, which may name test files added since the first run
        section = mutmut_section(module, tests)
        (folder / "pyproject.toml").write_text((REPO / "pyproject.toml").read_text() + "\n" + section)
        # with --with-tests the survivors and the unreached: the narrower selection is for them, not for mutants
        # never tested
        untested = ("survived", "no tests") if with_tests else ("survived", "no tests", "not run")
        names = sorted(name for name, status in verdicts(folder, module).items() if status in untested)
        # mutmut keeps a verdict until its source changes: forget these so that they are tested again
        meta = folder / "mutants" / (module + ".meta")
        data = json.loads(meta.read_text())
        earlier_codes = dict(data["exit_code_by_key"])
        data["exit_code_by_key"].update(dict.fromkeys(names))
        meta.write_text(json.dumps(data))
        earlier_minutes = json.loads((folder / "record.json").read_text()).get("minutes", 0.0)
    else:
        folder = prepare(module, tests, work)
    mutmut = Path(sys.executable).with_name("mutmut")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    started = time.monotonic()
    log = folder / "mutmut.log"
    with log.open("a" if retest else "w") as out:
        result = subprocess.run([str(mutmut), "run", "--max-children", str(max_children), *names], cwd=folder,
                                env=env, stdout=out, stderr=subprocess.STDOUT)
    minutes = earlier_minutes + (time.monotonic() - started) / 60
    if retest:
        keep_earlier_verdicts(folder / "mutants" / (module + ".meta"), earlier_codes, set(names))
    (folder / "record.json").write_text(json.dumps({"minutes": minutes}))
    return summarise(module, tests, folder, minutes, result.returncode)


def keep_earlier_verdicts(meta: Path, earlier_codes: dict, retested: set[str]) -> None:
    """Put back the verdicts of the mutants a retest did not run: mutmut regenerates its records when its
    configuration changed (a new test selection) and would report every earlier kill as 'not run'; and a survivor
    that a narrower selection (--with-tests) does not reach stays a survivor rather than becoming 'no tests'."""
    data = json.loads(meta.read_text())
    codes = data["exit_code_by_key"]
    not_reached = (None, 5, 33)
    for name, code in earlier_codes.items():
        if codes.get(name) in not_reached and (name not in retested or code == 0):
            codes[name] = code
    meta.write_text(json.dumps(data))


def check_outside(module: str, work: Path) -> list[str]:
    """The survivors judged "killed outside mutmut" that the tests named for them do not kill: each mutant is made
    with `mutmut apply` in the kept run's folder (the module there is put back after), copied into a plain copy of
    the repository, and its group's tests are run there with pytest alone (exit 1: a test failed)."""
    folder = scratch_folder(module, work)
    if not (folder / "mutants").is_dir():
        raise SystemExit(f"--check-outside: no kept run of {module} in {folder} (run it with --keep first)")
    if (REPO / module).read_bytes() != (folder / module).read_bytes():
        raise SystemExit(f"--check-outside: {module} changed since its kept run; run it again first")
    groups = [group for group in judged_groups(module) if group["verdict"] == "killed outside mutmut"]
    plain = folder.with_name(folder.name + "_outside")
    copy_repository(plain)
    mutmut = Path(sys.executable).with_name("mutmut")
    prefix = module.removesuffix(".py").replace("/", ".")
    original = (folder / module).read_bytes()
    survived = []
    for group in groups:
        for mutant in group["mutants"]:
            try:
                subprocess.run([str(mutmut), "apply", f"{prefix}.{mutant}"], cwd=folder, check=True,
                               capture_output=True)
                (plain / module).write_bytes((folder / module).read_bytes())
            finally:
                (folder / module).write_bytes(original)
            if (plain / module).read_bytes() == original:
                raise SystemExit(f"--check-outside: mutmut apply {mutant} changed nothing")
            result = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                                     *group["tests"]], cwd=plain, capture_output=True, text=True)
            verdict = "killed" if result.returncode == 1 else f"NOT killed (pytest exit {result.returncode})"
            print(f"mutation: {module}: {mutant}: {verdict}", flush=True)
            if result.returncode != 1:
                survived.append(mutant)
    shutil.rmtree(plain, ignore_errors=True)
    return survived


def summarise(module: str, tests: list[str], folder: Path, minutes: float, returncode: int | None) -> dict:
    mutmut = Path(sys.executable).with_name("mutmut")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    found = verdicts(folder, module)
    counts = {status: list(found.values()).count(status) for status in set(found.values())}
    survivors = sorted(name for name, status in found.items() if status == "survived")
    diffs = {}
    for name in survivors:
        shown = subprocess.run([str(mutmut), "show", name], cwd=folder, capture_output=True, text=True, env=env)
        diffs[name] = shown.stdout.strip()
    return {"module": module, "tests": tests, "counts": counts, "minutes": minutes, "returncode": returncode,
            "survivors": diffs, "log": str(folder / "mutmut.log"), "killed": sorted(
                name for name, status in found.items() if status in ("killed", "timeout"))}


def judged_groups(module: str) -> list[dict]:
    """The module's groups of survivors read by hand (verdict, why, mutants, and for "killed outside mutmut" the
    tests that kill them), from JUDGED."""
    return json.loads(JUDGED.read_text()).get(module, []) if JUDGED.is_file() else []


def judged(module: str) -> dict[str, str]:
    """mutant name (as mutmut names it, without the module) -> its verdict, for the survivors read by hand."""
    return {name: group["verdict"] for group in judged_groups(module) for name in group["mutants"]}


def short_name(mutant: str) -> str:
    return mutant.rsplit(".", 1)[-1]


def stopped_early(record: dict) -> str | None:
    """mutmut's last words when it tested no mutant at all (say a test failed in its stats run), else None: such a
    run has no verdicts, and a row of 'not run' mutants would read like a result."""
    if not record["returncode"] or set(record["counts"]) - {"not run"}:
        return None
    text = Path(record["log"]).read_text(errors="replace").replace("\r", "\n")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else f"mutmut exited {record['returncode']}"


def table_row(record: dict) -> str:
    counts = dict(record["counts"])
    total = sum(counts.values())
    killed, survived = counts.pop("killed", 0), counts.pop("survived", 0)
    timeout, no_tests = counts.pop("timeout", 0), counts.pop("no tests", 0)
    other = ", ".join(f"{n} {status}" for status, n in sorted(counts.items())) or "0"
    verdicts = judged(record["module"])
    survivors = [short_name(name) for name in record["survivors"]]
    equivalent = sum(verdicts.get(name) == "equivalent" for name in survivors)
    killed_outside = sum(verdicts.get(name) == "killed outside mutmut" for name in survivors)
    checked = killed + survived + timeout - equivalent
    share = f"{100 * (killed + timeout + killed_outside) / checked:.1f}" if checked else "-"
    tests = ", ".join(test_files_named(record["tests"]))
    return (f"| `{record['module']}` | {tests} | {total} | {killed} | {survived} | {equivalent} | {timeout} | "
            f"{no_tests} | {other} | {share} | {record['minutes']:.1f} |")


def misjudged(record: dict) -> list[str]:
    """Mutants the judged list calls equivalent that this run killed: the list is wrong there and must be read
    again."""
    verdicts = judged(record["module"])
    killed = {short_name(name) for name in record.get("killed", [])}
    return sorted(name for name, verdict in verdicts.items() if verdict == "equivalent" and name in killed)


def judged_section() -> str:
    """MUTATION.md's list of the survivors read by hand, grouped with the reason for each group."""
    lines = []
    for module, groups in json.loads(JUDGED.read_text()).items():
        lines.append(f"\n**`{module}`**\n")
        for group in groups:
            names = ", ".join(readable(name) for name in group["mutants"])
            lines.append(f"- {group['verdict']} ({len(group['mutants'])}): {group['why']} Mutants: {names}.")
    return "\n".join(lines).strip() + "\n"


def readable(mutant: str) -> str:
    """x_f__mutmut_3 -> `f` 3; xǁClassǁmethod__mutmut_3 -> `Class.method` 3 (mutmut's own naming)."""
    function, _, number = mutant.rpartition("__mutmut_")
    name = ".".join(function[2:].split("ǁ")) if function.startswith("xǁ") else function[2:]
    return f"`{name}` {number}"


def test_files_named(tests: list[str]) -> list[str]:
    """`file.py` for a whole test file, `file.py` (N tests) for some of its tests, in the order first given."""
    picked: dict[str, int | None] = {}
    for test in tests:
        name, _, node = test.partition("::")
        name = Path(name).name
        picked[name] = None if not node or picked.get(name, 0) is None else picked.get(name, 0) + 1
    return [f"`{name}`" + (f" ({count} tests)" if count else "") for name, count in picked.items()]


def write_table(records: list[dict]) -> None:
    """Replace the rows of the modules just run in MUTATION.md's table (between its markers); keep the others."""
    start, end = "<!-- mutation-table -->", "<!-- /mutation-table -->"
    text = TABLE.read_text() if TABLE.exists() else f"# Mutation testing\n\n{start}\n{end}\n"
    head, rest = text.split(start, 1)
    body, tail = rest.split(end, 1)
    rows = {line.split("|")[1].strip(" `"): line for line in body.splitlines() if line.startswith("| `")}
    for record in records:
        rows[record["module"]] = table_row(record)
    ordered = [rows[m] for m in MODULES if m in rows] + [r for m, r in rows.items() if m not in MODULES]
    separator = "|" + "---|" * (HEADER.count("|") - 1)
    text = f"{head}{start}\n{HEADER}\n{separator}\n" + "\n".join(ordered) + f"\n{end}{tail}"
    first, last = "<!-- judged -->", "<!-- /judged -->"
    if first in text and JUDGED.is_file():
        before, rest = text.split(first, 1)
        text = f"{before}{first}\n{judged_section()}{last}{rest.split(last, 1)[1]}"
    TABLE.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("modules", nargs="*", help="modules to run (default: all of MODULES, smallest first)")
    parser.add_argument("--list", action="store_true", help="print the modules and their tests, run nothing")
    parser.add_argument("--work", type=Path, default=Path("/tmp/lora-recipes-mutation"), help="scratch folder")
    parser.add_argument("--max-children", type=int, default=1, help="mutants tested at once (default 1)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch copies (to `mutmut show` survivors)")
    parser.add_argument("--report", action="store_true",
                        help="write the table rows of kept runs as they stand (an unfinished run: its mutants not "
                             "yet tested count as 'not run'), run nothing")
    parser.add_argument("--retest", action="store_true",
                        help="run only the survivors of a kept earlier run again, against the tests as they are now")
    parser.add_argument("--check-outside", action="store_true",
                        help="check that the tests named for each survivor judged 'killed outside mutmut' fail on "
                             "it outside mutmut (needs a kept run), run nothing else")
    parser.add_argument("--with-tests", nargs="+", metavar="TEST",
                        help="with --retest: run the survivors against these tests only (those added for them), "
                             "not the module's whole selection, whose slow tests each survivor would run again")
    args = parser.parse_args(argv)
    if args.with_tests and not args.retest:
        parser.error("--with-tests goes with --retest")
    if args.list:
        for module, tests in MODULES.items():
            print(f"{module}: {' '.join(tests)}")
        return 0
    unknown = [m for m in args.modules if m not in MODULES]
    if unknown:
        parser.error(f"not in MODULES: {', '.join(unknown)} (known: {', '.join(MODULES)})")
    chosen = args.modules or sorted(MODULES, key=lambda m: (REPO / m).stat().st_size)
    if args.check_outside:
        wrong = [name for module in chosen for name in check_outside(module, args.work)]
        return 1 if wrong else 0
    if args.report:
        for module in chosen:
            folder = scratch_folder(module, args.work)
            record = json.loads((folder / "record.json").read_text())
            minutes = record.get("minutes") or (time.time() - record["started"]) / 60
            row = summarise(module, MODULES[module], folder, minutes, None)
            write_table([row])
            print(table_row(row), flush=True)
        return 0
    records, failed = [], False
    for module in chosen:
        print(f"mutation: {module} against {' '.join(MODULES[module])} ...", flush=True)
        record = run_module(module, args.with_tests or MODULES[module], args.work, args.max_children,
                            retest=args.retest, with_tests=bool(args.with_tests))
        record["tests"] = MODULES[module]
        reason = stopped_early(record)
        if reason:
            print(f"mutation: {module}: mutmut tested no mutant ({reason}); its table row is left as it was. To see "
                  f"which test fails under mutmut: cd {Path(record['log']).parent / 'mutants'} && "
                  "MUTANT_UNDER_TEST=stats python -m pytest -x <the module's tests>", flush=True)
            failed = True
            continue
        records.append(record)
        print(table_row(record), flush=True)
        for name in misjudged(record):
            print(f"mutation: {module}: {name} is listed as equivalent in {JUDGED.name} but was killed", flush=True)
        survivors_file = args.work / (Path(module).stem + ".survivors.json")
        survivors_file.write_text(json.dumps(record["survivors"], indent=1))
        print(f"mutation: survivors' diffs in {survivors_file}; log {record['log']}", flush=True)
        write_table([record])
        if not args.keep and not args.retest:
            shutil.rmtree(Path(record["log"]).parent, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
