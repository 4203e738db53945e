"""`report_to`: each training stage's curves go to TensorBoard, W&B, MLflow or trackio through the transformers
integrations, and its manifest metrics follow as a summary when the stage ends.

Where things go: TensorBoard event files in `<stage>/tensorboard`; W&B offline (`WANDB_MODE=offline` unless set,
or an API key is), under `<run_dir>/wandb`; MLflow where `MLFLOW_TRACKING_URI` points (default: `./mlruns`);
trackio in its local project. The run is named `<recipe>-<stage>`; W&B, MLflow and trackio group a recipe's
stages under a project / experiment named after the recipe.
"""

from __future__ import annotations

import logging
import math
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger(__name__)

INTEGRATIONS = ("none", "tensorboard", "wandb", "mlflow", "trackio")


def normalise(value: str | list[str] | None) -> list[str]:
    """`report_to` as a list without "none"; raises ValueError naming a value that is not an integration."""
    if value is None:
        return []
    values = [value] if isinstance(value, str) else list(value)
    for v in values:
        if v not in INTEGRATIONS:
            raise ValueError(f"unknown integration {v!r}; choose from {', '.join(INTEGRATIONS)}")
    if "none" in values and len(values) > 1:
        raise ValueError("'none' cannot be combined with an integration")
    return [v for v in values if v != "none"]


def recipe_name(source: str | None) -> str:
    return Path(source).stem if source else "recipe"


def run_name(source: str | None, stage_name: str) -> str:
    return f"{recipe_name(source)}-{stage_name}"


def tensorboard_dir(stage_dir: Path) -> Path:
    return stage_dir / "tensorboard"


def trainer_arguments(integrations: list[str], source: str | None, stage_name: str) -> dict[str, Any]:
    """What TrainingArguments gets for `report_to`."""
    args: dict[str, Any] = {"report_to": integrations or "none", "run_name": run_name(source, stage_name)}
    if "trackio" in integrations:
        args["project"] = recipe_name(source)
    return args


@contextmanager
def stage_environment(integrations: list[str], source: str | None, stage_dir: Path, run_dir: Path) -> Iterator[None]:
    """The integrations read their folders and projects from the environment when the Trainer is built; set
    them for the stage's duration (a user's own settings win), then put the environment back."""
    wanted: dict[str, str] = {}
    if "tensorboard" in integrations:
        wanted["TENSORBOARD_LOGGING_DIR"] = str(tensorboard_dir(stage_dir))  # ours: one folder per stage
    if "wandb" in integrations:
        if not os.environ.get("WANDB_API_KEY"):
            wanted.setdefault("WANDB_MODE", os.environ.get("WANDB_MODE", "offline"))
        wanted["WANDB_DIR"] = os.environ.get("WANDB_DIR", str(run_dir))
        wanted["WANDB_PROJECT"] = os.environ.get("WANDB_PROJECT", recipe_name(source))
    if "mlflow" in integrations:
        wanted["MLFLOW_EXPERIMENT_NAME"] = os.environ.get("MLFLOW_EXPERIMENT_NAME", recipe_name(source))
    before = {k: os.environ.get(k) for k in wanted}
    os.environ.update(wanted)
    if "wandb" in integrations:
        Path(wanted["WANDB_DIR"]).mkdir(parents=True, exist_ok=True)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def summary_scalars(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """A stage's manifest metrics as flat `a/b` numbers (nested dicts flattened; lists and text left out)."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, bool):
            out[name] = float(value)
        elif isinstance(value, (int, float)) and math.isfinite(value):
            out[name] = float(value)
        elif isinstance(value, dict):
            out.update(summary_scalars(value, name + "/"))
    return out


def log_summary(integrations: list[str], source: str | None, stage_name: str, stage_dir: Path,
                metrics: dict[str, Any], step: int) -> None:
    """The stage's manifest metrics as a summary through each integration (main rank, after the stage).
    A tracker that fails says so once and the run goes on: the manifest holds the same numbers."""
    scalars = summary_scalars(metrics)
    for integration in integrations:
        try:
            SUMMARY_WRITERS[integration](source, stage_name, stage_dir, scalars, step)
        except Exception as e:  # noqa: BLE001 - a tracker must not fail a completed stage
            log.warning("report_to %s: the summary of stage '%s' was not logged (%s: %s)", integration, stage_name,
                        type(e).__name__, e)


def _tensorboard(source, stage_name, stage_dir, scalars, step) -> None:
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(log_dir=str(tensorboard_dir(stage_dir))) as writer:
        for key, value in scalars.items():
            writer.add_scalar(f"summary/{key}", value, step)


def _wandb(source, stage_name, stage_dir, scalars, step) -> None:
    import wandb

    run = wandb.run
    if run is None:  # the trainer's run has ended (or the stage does not train): resume it by name
        run = wandb.init(project=os.environ.get("WANDB_PROJECT", recipe_name(source)), name=run_name(source, stage_name),
                         dir=os.environ.get("WANDB_DIR"), reinit="finish_previous")
    run.summary.update(scalars)
    run.finish()


def _mlflow(source, stage_name, stage_dir, scalars, step) -> None:
    import mlflow

    if mlflow.active_run() is None:
        mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", recipe_name(source)))
        mlflow.start_run(run_name=run_name(source, stage_name))
    mlflow.log_metrics({k.replace("/", "."): v for k, v in scalars.items()}, step=step)
    mlflow.end_run()


def _trackio(source, stage_name, stage_dir, scalars, step) -> None:
    import trackio

    trackio.init(project=recipe_name(source), name=run_name(source, stage_name), resume="allow")
    trackio.log({f"summary/{k}": v for k, v in scalars.items()})
    trackio.finish()


SUMMARY_WRITERS = {"tensorboard": _tensorboard, "wandb": _wandb, "mlflow": _mlflow, "trackio": _trackio}
