"""Experiment tracking: a recipe's `report_to` and `run_name` go to the Trainer's own integrations (TensorBoard,
MLflow, trackio, W&B, ...), offline by default, and the run record's figures reach the same trackers at the end.

    python lora/finetune.py RECIPE --set report_to=tensorboard      # -> outputs/RECIPE/logs/tensorboard/
    tensorboard --logdir outputs/RECIPE/logs/tensorboard

Logs go to `logs/` beside `checkpoints/`, in the folder the Trainer writes to, unless the tracker's own variables
name another place (a variable the user set is never changed): tensorboard -> logs/tensorboard/
(TENSORBOARD_LOGGING_DIR), mlflow -> a file store in logs/mlflow/ (MLFLOW_TRACKING_URI), trackio -> logs/trackio/
(TRACKIO_DIR), wandb -> offline, logs/wandb/ (WANDB_MODE, WANDB_DIR). The other integrations keep their own
configuration (most need credentials the user sets up). `--resume` continues the TensorBoard log.

The stock callbacks end their run in on_train_end, before the after-training scores exist; `hold_trackers` holds
that end back and `finish_tracking` logs the run record's figures (lora.training.run_record.tracker_figures), then
ends them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from transformers import TrainerCallback
from transformers.integrations import TensorBoardCallback
from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

from lora.core.errors import RecipeError
from lora.training.run_record import TaskFacts, tracker_figures

__all__ = [
    "apply_offline_defaults",
    "finish_tracking",
    "HeldTrackers",
    "hold_trackers",
    "LOGS_DIR",
    "logs_dir",
    "prepare_trackers",
    "requested_trackers",
    "RunTensorBoardCallback",
    "TRACKERS",
]

LOGS_DIR = "logs"
# report_to name -> (transformers' availability check in transformers.integrations, what the user does to get it)
TRACKERS = {
    "azure_ml": ("is_azureml_available", "pip install azureml-core"),
    "clearml": ("is_clearml_available", "pip install clearml"),
    "codecarbon": ("is_codecarbon_available", "pip install codecarbon"),
    "comet_ml": ("is_comet_available", "pip install comet-ml and set COMET_API_KEY"),
    "dagshub": ("is_dagshub_available", "pip install dagshub mlflow"),
    "dvclive": ("is_dvclive_available", "pip install dvclive"),
    "flyte": ("is_flyte_deck_standard_available", "pip install flytekit flytekitplugins-deck-standard"),
    "kubeflow": ("is_kubeflow_available", "run inside a Kubeflow TrainJob (it sets KUBEFLOW_TRAINER_SERVER_URL)"),
    "mlflow": ("is_mlflow_available", "pip install mlflow-skinny (requirements.txt pins it), or mlflow"),
    "neptune": ("is_neptune_available", "pip install neptune"),
    "swanlab": ("is_swanlab_available", "pip install swanlab"),
    "tensorboard": ("is_tensorboard_available", "pip install tensorboard (requirements.txt pins it)"),
    "trackio": ("is_trackio_available", "pip install trackio"),
    "wandb": ("is_wandb_available", "pip install wandb"),
}
# Variables this process set for an earlier run: the next run may replace them (a user's own are never replaced).
_set_by_runner: dict[str, str] = {}


def requested_trackers(report_to: str | list[str] | None) -> list[str]:
    """The integration names a recipe's report_to means, as the Trainer reads it ("all": every one installed)."""
    if report_to in (None, "none"):
        return []
    if report_to == "all":
        from transformers.integrations import get_available_reporting_integrations

        return get_available_reporting_integrations()
    return [report_to] if isinstance(report_to, str) else list(report_to)


def logs_dir(checkpoint_dir: Path | str) -> Path:
    """Where trackers write: logs/ beside the checkpoints, inside the run folder the Trainer writes to."""
    return Path(checkpoint_dir).resolve().parent / LOGS_DIR


def prepare_trackers(recipe, checkpoint_dir: Path) -> None:
    """Before any model loads: refuse trackers the environment lacks, and point the offline ones at logs_dir.

    Raises:
        RecipeError: report_to names an integration that is not installed (or not configured, for comet_ml and
            kubeflow); the message says what to install.
    """
    import transformers.integrations as integrations

    trackers = requested_trackers(recipe["report_to"])
    missing = [name for name in trackers if not getattr(integrations, TRACKERS[name][0])()]
    if missing:
        remedies = "; ".join(f"{name}: {TRACKERS[name][1]}" for name in missing)
        raise RecipeError(
            f'recipe "{recipe.name}": field "report_to" names {", ".join(missing)}, which this environment lacks '
            f"({remedies}). Install it, or report elsewhere: --set report_to=tensorboard, or none."
        )
    apply_offline_defaults(trackers, logs_dir(checkpoint_dir))


def apply_offline_defaults(trackers: list[str], logs: Path) -> None:
    """Set the variables that keep the chosen trackers local and inside `logs`, unless the user set them."""

    def default(variable: str, value: str) -> bool:
        if os.environ.get(variable) not in (None, _set_by_runner.get(variable)):
            return False  # the user's choice (e.g. a tracking server)
        os.environ[variable] = _set_by_runner[variable] = value
        return True

    if "mlflow" in trackers and default("MLFLOW_TRACKING_URI", (logs / "mlflow").as_uri()):
        default("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow 3 refuses a file store (in maintenance) unless asked
    if "trackio" in trackers:
        default("TRACKIO_DIR", str(logs / "trackio"))  # read when trackio is first imported (Trainer construction)
    if "wandb" in trackers:
        default("WANDB_MODE", "offline")
        default("WANDB_DIR", str(logs))


class RunTensorBoardCallback(TensorBoardCallback):
    """The stock TensorBoard callback, writing to the run's logs/tensorboard/ (TENSORBOARD_LOGGING_DIR still wins),
    so that `--resume` continues one log: the events an interrupted run wrote past the checkpoint being resumed
    are hidden through TensorBoard's purge_step, and the log shows each step once."""

    def __init__(self, log_dir: Path):
        super().__init__()
        self.logging_dir = self.logging_dir or str(log_dir)

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self.tb_writer is None:
            self.tb_writer = self._SummaryWriter(log_dir=self.logging_dir, purge_step=state.global_step + 1)
        super().on_train_begin(args, state, control, **kwargs)


class HeldTrackers(TrainerCallback):
    """The Trainer's reporting callbacks, called for every event as the Trainer would call them, except the end of
    training, which waits for `finish` (after the run record is complete)."""

    def __init__(self, trackers: list[TrainerCallback]):
        self.trackers = trackers

    def on_train_end(self, args, state, control, **kwargs):
        return control  # held: see finish

    def finish(self, trainer, figures: dict[str, float]) -> None:
        events = {"model": trainer.model, "processing_class": trainer.processing_class}
        for tracker in self.trackers:
            if figures:
                tracker.on_log(trainer.args, trainer.state, trainer.control, logs=figures, **events)
            tracker.on_train_end(trainer.args, trainer.state, trainer.control, **events)


def _forward(event: str):
    def forward(self, args, state, control, **kwargs):
        for tracker in self.trackers:
            control = getattr(tracker, event)(args, state, control, **kwargs) or control
        return control

    forward.__name__ = event
    return forward


for _event in [name for name in vars(TrainerCallback) if name.startswith("on_") and name != "on_train_end"]:
    setattr(HeldTrackers, _event, _forward(_event))


def hold_trackers(trainer) -> None:
    """Replace the reporting callbacks the Trainer built from report_to by one HeldTrackers holding them (with the
    TensorBoard one writing to the run's logs folder)."""
    stock = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, tuple(INTEGRATION_TO_CALLBACK.values()))]
    if not stock:
        return
    for callback in stock:
        trainer.callback_handler.remove_callback(callback)
    tensorboard_dir = logs_dir(trainer.args.output_dir) / "tensorboard"
    trainer.add_callback(HeldTrackers([RunTensorBoardCallback(tensorboard_dir) if type(cb) is TensorBoardCallback
                                       else cb for cb in stock]))


def finish_tracking(trainer, summary: dict, task_facts: Mapping[str, TaskFacts]) -> None:
    """Log the run record's figures (scores before/after, key figures) at the last step, then end the trackers'
    runs. Does nothing for a recipe without trackers."""
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, HeldTrackers):
            callback.finish(trainer, tracker_figures(summary, task_facts))
