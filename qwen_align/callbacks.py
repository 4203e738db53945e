"""Trainer callbacks every training stage gets from `training_callbacks`: metrics, time-based saves, preemption."""

from __future__ import annotations

import logging
import signal
import threading
import time

from transformers import TrainerCallback

from . import distributed
from .stage import StageContext

log = logging.getLogger(__name__)


class MetricsLogger(TrainerCallback):
    """Copies every trainer log record into the run's metrics.jsonl, tagged with the stage name."""

    def __init__(self, context: StageContext, stage_name: str):
        self.context = context
        self.stage_name = stage_name

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs:
            self.context.log_metrics({"stage": self.stage_name, "step": state.global_step, **logs})


class TimedSave(TrainerCallback):
    """Save a checkpoint once `minutes` have passed since the last save (or the start), besides `save_steps`.

    Ranks' clocks differ, so the decision is collective: any rank that is due makes every rank save.
    """

    def __init__(self, minutes: float):
        self.seconds = minutes * 60
        self.last = time.monotonic()

    def on_train_begin(self, args, state, control, **kwargs):
        self.last = time.monotonic()

    def on_step_end(self, args, state, control, **kwargs):
        if distributed.any_rank(time.monotonic() - self.last >= self.seconds):
            control.should_save = True

    def on_save(self, args, state, control, **kwargs):
        self.last = time.monotonic()


class Preemption(TrainerCallback):
    """SIGTERM/SIGINT while training: finish the step, save a checkpoint, stop (then the trainer raises `Interrupted`).

    Under several ranks a signal may reach only some of them; the stop is decided collectively at each step
    end so that all save the same step. A second signal falls back to the default (immediate) behaviour.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: str | None = None
        self.previous: dict[int, object] = {}

    def _handle(self, signum, frame):
        if self.received is not None:  # second signal: do not wait for the step to end
            self.restore()
            signal.raise_signal(signum)
            return
        self.received = signal.Signals(signum).name
        log.warning("%s received: saving a checkpoint at the end of this step, then stopping", self.received)

    def restore(self):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}

    def on_train_begin(self, args, state, control, **kwargs):
        self.received = None
        if threading.current_thread() is not threading.main_thread():
            return  # only the main thread may set handlers; training in a thread keeps the default behaviour
        for signum in self.SIGNALS:
            self.previous[signum] = signal.signal(signum, self._handle)

    def on_step_end(self, args, state, control, **kwargs):
        if distributed.any_rank(self.received is not None):
            self.received = self.received or "a signal on another rank"
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        self.restore()  # the trainer (`AtomicCheckpoints.train`) raises `Interrupted` once train() is done


class PeriodicTaskEval(TrainerCallback):
    """`task_eval.every_steps`: the held-out accuracy every N optimizer steps, logged with the step; with
    `task_eval.stop_at`, training stops at the first evaluation that reaches it (every rank computes the same
    accuracy, so all stop at the same step).

    Every rank answers its share (as after training). A rank holding parameter shards (FSDP2, ZeRO-3) would
    have to gather them in step with the others through generate's uneven loops, so there it is skipped
    with one warning; the stage's evaluation after training still runs on the whole saved model.
    """

    def __init__(self, stage, context: StageContext):
        self.stage = stage
        self.context = context
        self.every = stage.task_eval.every_steps

    def on_step_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        step = state.global_step
        if step % self.every or step >= state.max_steps or model is None:
            return  # the last step's accuracy is the stage's own evaluation after training
        from .stage import holds_shards

        if holds_shards(model):
            log.warning("stage '%s': task_eval.every_steps is skipped under a sharded backend (FSDP2 / ZeRO-3)",
                        self.stage.name)
            self.every = 10**12
            return
        tokenizer = getattr(processing_class, "tokenizer", processing_class)
        use_cache = model.config.use_cache  # generation turns the KV cache on (and restores train mode itself)
        try:
            result = self.context.evaluate_task(self.stage, model, tokenizer, step=step)
        finally:
            model.config.use_cache = use_cache
        target = self.stage.task_eval.stop_at
        if target is not None and result["heldout_accuracy"] >= target:
            from .console import say

            control.should_training_stop = True
            self.context.log_metrics({"stage": self.stage.name, "step": step, "stopped_at_accuracy": target})
            if self.context.is_main_process:
                say(f"[{self.stage.name}] held-out accuracy reached stop_at {target:.0%}: training stops at step {step}")


def training_callbacks(stage, context: StageContext) -> list[TrainerCallback]:
    """The callbacks each training stage passes to its Trainer."""
    from .console import StageProgress

    callbacks: list[TrainerCallback] = [MetricsLogger(context, stage.name), Preemption(), StageProgress(stage.name)]
    if stage.save_every_minutes:
        callbacks.append(TimedSave(stage.save_every_minutes))
    if stage.task_eval is not None and stage.task_eval.every_steps:
        callbacks.append(PeriodicTaskEval(stage, context))
    return callbacks
