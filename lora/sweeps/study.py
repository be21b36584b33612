"""A sweep's Optuna study: its storage (SQLite under the sweep's folder, or any database URL several machines share),
sampler and pruner built from the sweep, and the worker loop that runs trials until the study is done.

Each trial is an ordinary run of lora.training.run.run_recipe into its own folder under the sweep's folder, holding
that folder's one-writer lock; its run_summary.json gets a "sweep" section (trial, parameters, objective values,
state: complete or pruned). Workers on one or many machines share the study: Optuna hands each new trial to one
worker; a killed worker's trial stops sending heartbeats, is failed by the next worker that looks, and is run again
(RetryHeartbeatStaleTrialCallback) as a new trial with the same parameters.
"""

from __future__ import annotations

import json
import os
import random
import shlex
import socket
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lora.sweeps.spec import Sweep, SweepError, override_strings

__all__ = [
    "build_pruner",
    "build_sampler",
    "open_study",
    "run_worker",
    "storage_url",
    "study_counts",
    "StudyCounts",
    "trial_folder",
]

STUDY_FILE = "study.sqlite3"
FINETUNE_COMMAND = "lora/finetune.py"


def storage_url(output_dir: Path, storage: str | None) -> str:
    """The study's database: `--storage URL`, or SQLite in the sweep's folder. `postgresql://` URLs use psycopg 3
    (the driver requirements.txt installs)."""
    if not storage:
        return f"sqlite:///{Path(output_dir).resolve() / STUDY_FILE}"
    if storage.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg://" + storage.split("://", 1)[1]
    return storage


def _open_storage(sweep: Sweep, url: str):
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    # Several workers of one machine share SQLite: wait for the file lock rather than fail at once.
    engine_kwargs = {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    # Workers that start together race to create Optuna's tables in a new database; the loser sees a unique-key
    # violation (PostgreSQL 15) or "table ... already exists" (SQLite), and a moment later finds the tables made:
    # try again a few times (a server that is down fails the same way each time and is reported).
    for attempt in range(5):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            try:
                return RDBStorage(url, engine_kwargs=engine_kwargs,
                                  heartbeat_interval=sweep.workers["heartbeat_seconds"],
                                  grace_period=sweep.workers["grace_seconds"],
                                  heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(
                                      max_retry=sweep.workers["max_retry"]))
            except Exception as error:  # sqlalchemy's errors: a server that is down, a bad URL, a missing driver
                racing = type(error).__name__ in ("IntegrityError", "OperationalError", "ProgrammingError")
                if racing and attempt < 4:
                    time.sleep(0.5 + random.random())
                    continue
                shown = url.split("@")[-1] if "@" in url else url
                raise SweepError(f"--storage: cannot open the study's database ({shown}): "
                                 f"{type(error).__name__}: {str(error).splitlines()[0]}. Check that the server runs "
                                 "and the URL (postgresql://USER@HOST:PORT/DATABASE) is right.") from None


def build_sampler(sweep: Sweep, seed_offset: int = 0):
    """Optuna's GridSampler over every parameter's grid points, or its TPESampler.

    The grid's order is seeded the same on every worker (Optuna's advice, so that workers do not pick the same
    point); TPE's draws get `seed_offset` on top of the sweep's seed, so that workers (and a continued study, see
    open_study) do not draw the same points.
    """
    import optuna

    if sweep.sampler["type"] == "grid":
        return optuna.samplers.GridSampler({name: p.grid_points() for name, p in sweep.space.items()},
                                           seed=sweep.sampler["seed"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=sweep.sampler["seed"] + seed_offset,
                                          n_startup_trials=sweep.sampler["n_startup_trials"], constant_liar=True)


def build_pruner(sweep: Sweep):
    """Optuna's NopPruner, MedianPruner or SuccessiveHalvingPruner; steps are training steps."""
    import optuna

    pruner = sweep.pruner
    if pruner["type"] == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=pruner.get("n_startup_trials", 3),
                                           n_warmup_steps=pruner.get("n_warmup_steps", 0),
                                           interval_steps=1)
    if pruner["type"] == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=pruner.get("min_resource", sweep.objective.report_every_steps),
            reduction_factor=pruner.get("reduction_factor", 3))
    return optuna.pruners.NopPruner()


def open_study(sweep: Sweep, output_dir: Path, storage: str | None = None, seed_offset: int = 0,
               must_exist: bool = False):
    """Create the sweep's study, or load it when it exists (a rerun continues it); refuse a study that was begun
    with another search (a changed space, objective, sampler or pruner).

    Raises:
        SweepError: the database cannot be opened, the study was begun by a different sweep definition, or
            (`must_exist`) there is no study yet.
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if must_exist and not storage and not (Path(output_dir) / STUDY_FILE).is_file():
        raise SweepError(f'sweep "{sweep.name}": no study in {output_dir} yet; run python lora/sweep.py '
                         f"{sweep.name} first.")
    if not storage:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
    storage_obj = _open_storage(sweep, storage_url(output_dir, storage))
    if must_exist and sweep.name not in {s.study_name for s in optuna.get_all_study_summaries(storage_obj)}:
        raise SweepError(f'sweep "{sweep.name}": no study of that name in the database yet; run python '
                         f"lora/sweep.py {sweep.name} --storage URL first.")
    try:  # a continued study: TPE starts from another seed, or its first draws would repeat the earlier run's
        seed_offset += storage_obj.get_n_trials(storage_obj.get_study_id_from_name(sweep.name))
    except KeyError:
        pass
    study = optuna.create_study(study_name=sweep.name, storage=storage_obj, sampler=build_sampler(sweep, seed_offset),
                                pruner=build_pruner(sweep), direction=sweep.objective.direction, load_if_exists=True)
    begun_with = study.user_attrs.get("fingerprint")
    if begun_with is None:
        study.set_user_attr("fingerprint", sweep.fingerprint())
        study.set_user_attr("definition", sweep.definition)
        study.set_user_attr("objective", sweep.objective.label)
    elif begun_with != sweep.fingerprint():
        raise SweepError(
            f'sweep "{sweep.name}": the study in {storage or storage_url(output_dir, None)} was begun with another '
            "definition of this sweep (its recipe, set, space, objective, sampler or pruner differ from "
            f"{sweep.path} now). Put the old definition back to continue it, or give the changed sweep a new name."
        )
    return study


@dataclass
class StudyCounts:
    """Where a study stands, trial states counted as the sweep counts them."""

    complete: int = 0
    pruned: int = 0
    running: int = 0
    waiting: int = 0
    failed: int = 0  # failed for good (not run again, not a surplus start)
    steps_spent: int = 0  # training steps of finished and failed trials (as far as they reported)

    @property
    def planned(self) -> int:
        """Trials that count towards the sweep's number: run, running, waiting or failed for good."""
        return self.complete + self.pruned + self.running + self.waiting + self.failed


def study_counts(trials) -> StudyCounts:
    """Count frozen trials: a trial that was run again after its worker died, and a surplus start (two workers
    starting the last trial at once), do not count."""
    from optuna.trial import TrialState

    retried = {number for trial in trials for number in trial.system_attrs.get("retry_history", [])}
    counts = StudyCounts()
    for trial in trials:
        if trial.user_attrs.get("surplus") or trial.number in retried:
            counts.steps_spent += int(trial.user_attrs.get("steps", 0))
            continue
        if trial.state == TrialState.COMPLETE:
            counts.complete += 1
        elif trial.state == TrialState.PRUNED:
            counts.pruned += 1
        elif trial.state == TrialState.RUNNING:
            counts.running += 1
        elif trial.state == TrialState.WAITING:
            counts.waiting += 1
        else:
            counts.failed += 1
        if trial.state != TrialState.RUNNING:
            counts.steps_spent += int(trial.user_attrs.get("steps", 0))
    return counts


def _no_new_trial_reason(sweep: Sweep, counts: StudyCounts, started: float) -> str | None:
    """Why a new trial (not a retry) may not start now, or None when it may."""
    target = sweep.target_trials()
    if counts.planned >= target:
        return f"all {target} trials of the study are planned"
    total = sweep.budget["total_steps"]
    if total:
        per_trial = sweep.max_steps_per_trial()
        committed = counts.steps_spent + counts.running * per_trial
        if committed + per_trial > total:
            return (f"budget: {committed} training steps spent or committed of {total}; another trial "
                    f"({per_trial} steps) would exceed it")
    timeout = sweep.budget["timeout_minutes"]
    if timeout and time.monotonic() - started > timeout * 60:
        return f"timeout: {timeout} minutes since this command started"
    return None


def trial_folder(output_dir: Path, number: int) -> Path:
    return Path(output_dir) / f"trial-{number:03d}"


def _reproduce_command(sweep: Sweep, params: dict, folder: Path) -> str:
    overrides = [part for assignment in override_strings(sweep.trial_fields(params)) for part in ("--set", assignment)]
    return shlex.join(["python", FINETUNE_COMMAND, sweep.recipe, "--registry", str(sweep.registry_path),
                       *overrides, "--output-dir", str(folder)])


def _suggest(trial, sweep: Sweep) -> dict:
    params = {}
    for name, p in sweep.space.items():
        if p.type == "categorical":
            params[name] = trial.suggest_categorical(name, list(p.choices))
        elif p.type == "int":
            params[name] = trial.suggest_int(name, int(p.low), int(p.high), step=int(p.step or 1), log=p.log)
        else:
            params[name] = trial.suggest_float(name, float(p.low), float(p.high), log=p.log,
                                               step=None if p.log else p.step)
    return params


class _Surplus(Exception):
    """This trial started although the study already had all its trials (or budget) planned."""


def _run_trial(trial, sweep: Sweep, output_dir: Path, started: float) -> float:
    """One trial: an ordinary run of the trial's recipe into its own folder, reporting the objective as it trains."""
    import optuna

    from lora.core.files import finish_interrupted_replacement, write_json_atomic
    from lora.core.locks import hold_output_lock
    from lora.recipes.outputs import read_summary
    from lora.sweeps.objective import ObjectiveReporter, validation_scorer
    from lora.training.run import TrainingError, run_recipe

    trials = trial.study.get_trials(deepcopy=False)
    is_retry = any(t.number == trial.number and "failed_trial" in t.system_attrs for t in trials)
    if not is_retry:
        # Two workers can start a trial at the same moment when one trial is left: the later number stands down
        # before training (Optuna numbers trials atomically, so exactly one of them runs).
        earlier = [t for t in trials if t.number < trial.number]
        reason = _no_new_trial_reason(sweep, study_counts(earlier), started)
        if reason:
            trial.set_user_attr("surplus", reason)
            raise _Surplus(reason)
    params = _suggest(trial, sweep)
    folder = trial_folder(output_dir, trial.number)
    trial.set_user_attr("folder", folder.name)
    trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
    trial.set_user_attr("reproduce", _reproduce_command(sweep, params, folder))
    recipe = sweep.resolve_trial(params)
    measure = None if sweep.objective.is_loss else validation_scorer(sweep.objective, recipe)
    reporter = ObjectiveReporter(sweep.objective, trial, measure, on_report=lambda step: trial.set_user_attr(
        "steps", step))
    began = time.perf_counter()
    state, error = "failed", None
    with hold_output_lock(folder):
        note = finish_interrupted_replacement(folder)
        if note:
            print(f"[sweep] {note}", flush=True)
        try:
            result = run_recipe(recipe, folder, scoring=None, callbacks=[reporter])
            steps = int(result.summary["steps"])
            state = "pruned" if reporter.pruned_at is not None else "complete"
        except TrainingError as caught:
            steps, error = (reporter.values[-1][0] if reporter.values else 0), str(caught)
            raise
        finally:
            seconds = time.perf_counter() - began
            trial.set_user_attr("wall_seconds", round(seconds, 1))
            if state != "failed":
                trial.set_user_attr("steps", steps)
            summary = read_summary(folder)
            if summary is not None:  # the run's record says which trial it was and how it ended
                summary["sweep"] = {
                    "sweep": sweep.name, "sweeps_file": str(sweep.path), "trial": trial.number, "state": state,
                    "params": params, "objective": sweep.objective.label, "direction": sweep.objective.direction,
                    "reports": [{"step": s, "value": v} for s, v in reporter.values],
                    "pruned_at_step": reporter.pruned_at, "error": error,
                    "reproduce": trial.user_attrs.get("reproduce") or _reproduce_command(sweep, params, folder),
                }
                write_json_atomic(folder / "run_summary.json", summary)
    if not reporter.values:
        raise RuntimeError(f"trial {trial.number} trained {steps} steps but never scored its objective")
    if reporter.pruned_at is not None:
        raise optuna.TrialPruned(f"pruned at step {reporter.pruned_at}")
    return reporter.values[-1][1]


def _progress_line(study, trial, sweep: Sweep) -> str:
    from optuna.trial import TrialState

    counts = study_counts(study.get_trials(deepcopy=False))
    done = counts.complete + counts.pruned + counts.failed
    value = trial.value if trial.value is not None else (
        trial.intermediate_values[max(trial.intermediate_values)] if trial.intermediate_values else None)
    shown = f"{sweep.objective.label} {value:.4f}" if value is not None else "no value"
    state = trial.state.name
    if trial.state == TrialState.PRUNED:
        state += f" at step {trial.last_step}"
    if "failed_trial" in trial.system_attrs:
        state += f" (a retry of trial {trial.system_attrs['failed_trial']}, whose worker died)"
    params = " ".join(f"{k}={_short(v)}" for k, v in trial.params.items())
    try:
        best = study.best_trial
        best_text = f"best {best.value:.4f} (trial {best.number})"
    except ValueError:
        best_text = "no completed trial yet"
    steps, seconds = trial.user_attrs.get("steps", 0), trial.user_attrs.get("wall_seconds", 0)
    return (f"[sweep] trial {trial.number} {state}: {shown} | {params} | {steps} steps, {seconds:.0f} s | "
            f"{done}/{sweep.target_trials()} done, {counts.steps_spent} steps spent | {best_text}")


def _short(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else json.dumps(value)


def run_worker(sweep: Sweep, output_dir: Path, storage: str | None = None, *, seed_offset: int = 0,
               say: Callable[[str], None] | None = None, poll_seconds: float = 2.0):
    """Run trials of the sweep's study until it is done: every trial planned and none running anywhere.

    A worker waits for trials other workers are running (their workers may die: a stale trial is failed and run
    again, here or elsewhere); a trial that stopped on a non-finite loss is failed and the study goes on.

    Returns:
        The study.

    Raises:
        SweepError: the study's database, or a study begun by another definition. Other errors of a trial (a bug,
            an unreachable model) stop the worker after Optuna has marked the trial failed.
    """
    import optuna
    from optuna.storages import fail_stale_trials

    from lora.training.run import TrainingError

    say = say or (lambda line: print(line, flush=True))
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    study = open_study(sweep, output_dir, storage, seed_offset)
    started = time.monotonic()

    def progress(study, trial):
        if trial.user_attrs.get("surplus"):
            say(f"[sweep] trial {trial.number} not run: {trial.user_attrs['surplus']}")
        else:
            say(_progress_line(study, trial, sweep))

    waited = False
    while True:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            fail_stale_trials(study)
        counts = study_counts(study.get_trials(deepcopy=False))
        reason = None if counts.waiting else _no_new_trial_reason(sweep, counts, started)
        if reason and counts.running:
            if not waited:
                say(f"[sweep] {reason}; waiting for {counts.running} running trial(s) (a dead worker's trial is run "
                    f"again after {sweep.workers['grace_seconds']} s without a heartbeat)")
                waited = True
            time.sleep(poll_seconds)
            continue
        if reason:
            say(f"[sweep] study {sweep.name} done: {reason}; {counts.complete} complete, {counts.pruned} pruned, "
                f"{counts.failed} failed, {counts.steps_spent} training steps")
            return study
        waited = False
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.optimize(lambda trial: _run_trial(trial, sweep, output_dir, started), n_trials=1,
                           catch=(TrainingError, _Surplus), callbacks=[progress], gc_after_trial=True)
        sys.stdout.flush()

