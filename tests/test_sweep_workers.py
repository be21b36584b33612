"""Sweep workers as separate processes: two workers sharing a study on a real PostgreSQL server (started by the test
in a temporary folder) run every trial exactly once; a worker killed with SIGKILL mid-trial leaves a study that a
rerun completes, with the dead trial failed and run again with the same parameters."""

from __future__ import annotations

import glob
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest

from conftest import REPO_ROOT
from lora.sweep import main

pytestmark = pytest.mark.slow
SWEEP = [sys.executable, str(REPO_ROOT / "lora/sweep.py")]


def postgres_program(name: str) -> str | None:
    """A PostgreSQL server program: on PATH, or where Debian's postgresql package puts it."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
                        key=lambda path: int(Path(path).parts[-3]) if Path(path).parts[-3].isdigit() else 0)
    return candidates[-1] if candidates else None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url():
    """A private PostgreSQL server on 127.0.0.1, run as an unprivileged user (it refuses root), stopped at the end."""
    initdb, pg_ctl = postgres_program("initdb"), postgres_program("pg_ctl")
    if not initdb or not pg_ctl:
        pytest.skip("PostgreSQL's initdb/pg_ctl are not installed (Debian: apt-get install postgresql; .ci/run "
                    "installs it)")
    root = Path(tempfile.mkdtemp(prefix="sweep-postgres-"))
    as_user = []
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        os.chown(root, nobody.pw_uid, nobody.pw_gid)
        as_user = ["runuser", "-u", "nobody", "--"]
    data, port = root / "data", free_port()
    subprocess.run([*as_user, initdb, "-D", str(data), "-U", "test", "--auth=trust", "-E", "UTF8"], check=True,
                   capture_output=True, cwd=root)
    subprocess.run([*as_user, pg_ctl, "-D", str(data), "-l", str(root / "server.log"), "-w", "-o",
                    f"-k {root} -p {port} -c listen_addresses=127.0.0.1", "start"], check=True, capture_output=True,
                   cwd=root)
    try:
        yield f"postgresql://test@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "fast", "-w", "stop"], capture_output=True, cwd=root)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def sweep_home(tmp_path_factory, tiny_model_dir):
    folder = tmp_path_factory.mktemp("sweep-workers")
    rows = (REPO_ROOT / "data/train/sentiment_train.jsonl").read_text().splitlines()[:80]
    (folder / "train.jsonl").write_text("\n".join(rows) + "\n")
    (folder / "finetune_configs.json").write_text(json.dumps({"tiny": {
        "base_model": str(tiny_model_dir), "dataset_path": "train.jsonl", "quant_bits": None,
        "max_steps": 4, "batch_size": 4, "learning_rate": 0.01, "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0,
        "logging_steps": 1, "warmup_steps": 0, "lr_scheduler_type": "constant", "max_seq_length": 96,
    }}))
    grid = {
        "recipe": "tiny",
        "space": {"lora_r": {"type": "categorical", "choices": [2, 4]},
                  "use_dora": {"type": "categorical", "choices": [False, True]}},
        "objective": {"metric": "validation_loss", "direction": "minimize", "validation": {"split": 0.25},
                      "report_every_steps": 2},
        "sampler": {"type": "grid"},
        "workers": {"heartbeat_seconds": 1, "grace_seconds": 3},
    }
    (folder / "sweeps.json").write_text(json.dumps({"grid": grid}))
    return folder


def child_env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def test_two_workers_on_postgresql_run_every_trial_once(sweep_home, postgres_url, tmp_path):
    outs = [tmp_path / "machine-a", tmp_path / "machine-b"]  # as two machines: each its own folder
    workers = [subprocess.Popen([*SWEEP, "grid", "--sweeps", str(sweep_home / "sweeps.json"), "--output-dir",
                                 str(out), "--storage", postgres_url], env=child_env(), cwd=REPO_ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for out in outs]
    logs = [worker.communicate(timeout=600)[0] for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0], logs

    storage = "postgresql+psycopg://" + postgres_url.split("://", 1)[1]
    study = optuna.load_study(study_name="grid", storage=storage)
    ran = [t for t in study.trials if not t.user_attrs.get("surplus")]
    assert [t.state.name for t in ran] == ["COMPLETE"] * 4
    assert sorted((t.params["lora_r"], t.params["use_dora"]) for t in ran) == [(2, False), (2, True), (4, False),
                                                                                (4, True)]
    # Each trial ran in exactly one of the two workers, and its folder says so.
    folders = {out.name: {p.name for p in out.glob("trial-*")} for out in outs}
    assert not folders["machine-a"] & folders["machine-b"]
    assert folders["machine-a"] | folders["machine-b"] == {f"trial-{t.number:03d}" for t in ran}
    for trial in ran:
        out = next(o for o in outs if (o / f"trial-{trial.number:03d}").is_dir())
        summary = json.loads((out / f"trial-{trial.number:03d}" / "run_summary.json").read_text())
        assert summary["status"] == "completed" and summary["sweep"]["state"] == "complete"
    assert all((out / "results.csv").is_file() for out in outs)


def test_killed_worker_and_rerun_leave_a_consistent_study(sweep_home, tmp_path, capsys):
    out = tmp_path / "sweep"
    worker = subprocess.Popen([*SWEEP, "grid", "--sweeps", str(sweep_home / "sweeps.json"), "--output-dir", str(out)],
                              env=child_env(), cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    started = out / "trial-001" / "run_summary.json"  # the second trial has begun: kill its worker mid-trial
    deadline = time.monotonic() + 300
    while not started.exists() and worker.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(worker.pid, signal.SIGKILL)
    worker.wait()
    assert started.exists()
    storage = f"sqlite:///{out / 'study.sqlite3'}"
    study = optuna.load_study(study_name="grid", storage=storage)
    killed = next(t for t in study.trials if t.number == 1)
    assert killed.state.name == "RUNNING" and study.trials[0].state.name == "COMPLETE"

    assert main(["grid", "--sweeps", str(sweep_home / "sweeps.json"), "--output-dir", str(out)]) == 0
    study = optuna.load_study(study_name="grid", storage=storage)
    states = {t.number: t.state.name for t in study.trials}
    assert states[1] == "FAIL" and "RUNNING" not in states.values()
    retries = [t for t in study.trials if t.system_attrs.get("failed_trial") == 1]
    assert len(retries) == 1 and retries[0].state.name == "COMPLETE" and retries[0].params == killed.params
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert sorted((t.params["lora_r"], t.params["use_dora"]) for t in complete) == [(2, False), (2, True),
                                                                                     (4, False), (4, True)]
    summary = json.loads((out / f"trial-{retries[0].number:03d}" / "run_summary.json").read_text())
    assert summary["sweep"]["state"] == "complete" and summary["status"] == "completed"
    table = (out / "results.md").read_text()
    assert "| complete (retry of 1) |" in table and "| fail |" in table
    assert "(a retry of trial 1, whose worker died)" in capsys.readouterr().out

    # Run once more: the study is complete and consistent, nothing runs again.
    assert main(["grid", "--sweeps", str(sweep_home / "sweeps.json"), "--output-dir", str(out)]) == 0
    assert len(optuna.load_study(study_name="grid", storage=storage).trials) == len(study.trials)


def test_workers_flag_runs_the_study_in_two_processes(sweep_home, tmp_path, capsys):
    out = tmp_path / "sweep"
    assert main(["grid", "--sweeps", str(sweep_home / "sweeps.json"), "--output-dir", str(out), "--workers", "2"]) == 0
    study = optuna.load_study(study_name="grid", storage=f"sqlite:///{out / 'study.sqlite3'}")
    ran = [t for t in study.trials if not t.user_attrs.get("surplus")]
    assert [t.state.name for t in ran] == ["COMPLETE"] * 4
    assert len({(t.params["lora_r"], t.params["use_dora"]) for t in ran}) == 4
    pids = {int(t.user_attrs["worker"].split(":")[1]) for t in ran}
    assert os.getpid() not in pids and 1 <= len(pids) <= 2  # the trials ran in the worker processes
    assert "| trial | lora_r | use_dora | validation_loss |" in (out / "results.md").read_text()
