"""Trainer callbacks shared by the stages."""

from __future__ import annotations

from transformers import TrainerCallback

from .stage import StageContext


class MetricsLogger(TrainerCallback):
    """Copies every trainer log record into the run's metrics.jsonl, tagged with the stage name."""

    def __init__(self, context: StageContext, stage_name: str):
        self.context = context
        self.stage_name = stage_name

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs:
            self.context.log_metrics({"stage": self.stage_name, "step": state.global_step, **logs})
