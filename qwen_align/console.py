"""What a person sees while a recipe runs: one progress bar per training stage with its loss or reward, each
repeated warning once on one line, no library banners, and a closing table of every stage's headline metric.

`quiet_libraries()` is called once by the CLI; `StageProgress` is the bar every training stage gets from
`qwen_align.callbacks.training_callbacks`; the trainers' own printers (transformers' ProgressCallback and
PrinterCallback, which print each log record as a dict) are removed by `use_stage_progress`.
"""

from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path
from typing import Any

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")

# Metric keys a stage records and what each measures, in the order the closing table shows them.
HEADLINES: tuple[tuple[str, str], ...] = (
    ("heldout_accuracy", "held-out task accuracy"),
    ("heldout_pair_accuracy", "held-out pair accuracy"),
    ("pass_rate", "sampling pass rate"),
)

# The postfix of a stage's bar: the first of these keys a log record has.
POSTFIX_KEYS = (("loss", "loss"), ("reward", "reward"), ("rewards/accuracies", "pair_acc"), ("accuracy", "pair_acc"),
                ("mean_token_accuracy", "token_acc"))


_warned: set[tuple[str, str]] = set()


def _warn_once(message, category, filename, lineno, file=None, line=None) -> None:
    """`warnings.showwarning`: the first time a (category, text) is raised, one line through logging (console and
    stage log); later repeats, which libraries raise every step or every stage, are dropped."""
    key = (category.__name__, str(message))
    if key in _warned:
        return
    _warned.add(key)
    where = "/".join(Path(filename).parts[-2:])
    logging.getLogger("py.warnings").warning("%s: %s (%s:%s)", category.__name__, str(message).strip(), where, lineno)


class _LoadReportFilter(logging.Filter):
    """transformers prints a coloured "LOAD REPORT" table when checkpoint and model keys differ. It becomes one
    plain line: at INFO (the stage log only) when keys are only missing, i.e. newly initialised (the reward model's
    `score` head from a policy checkpoint); as a warning when some are unexpected or mismatched."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "LOAD REPORT" not in message:
            return True
        text = ANSI.sub("", message)
        head = text.splitlines()[0].replace(" LOAD REPORT from:", " loaded from").strip()
        rows = [[cell.strip() for cell in line.split("|")] for line in text.splitlines()[1:]
                if line.count("|") >= 2 and not line.startswith(("Key", "-"))]
        statuses = {row[1].lower() for row in rows}
        level = logging.INFO if statuses <= {"missing"} else logging.WARNING
        keys = ", ".join(f"{row[0]} ({row[1].lower()})" for row in rows) or "see transformers' loading report"
        logging.getLogger("qwen_align.model").log(level, "%s; %s", head, keys)
        return False


def quiet_libraries() -> None:
    """Once per process, before any model or trainer: the libraries' console noise off, warnings once each."""
    import datasets
    import transformers

    datasets.disable_progress_bars()  # map/filter bars: one bar per stage is the stage's own
    transformers.utils.logging.disable_progress_bar()  # "Writing model shards" and the like
    transformers.utils.logging.get_logger("transformers.modeling_utils").addFilter(_LoadReportFilter())
    # A warning raised every step or every stage is shown the first time only, as one line, also in the stage log.
    warnings.showwarning = _warn_once
    # INFO records go to the stage log (runner._stage_log); the console shows warnings and errors.
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.WARNING)


def use_stage_progress(trainer) -> None:
    """Drop the Trainer's own progress printers when the stage's `StageProgress` bar is among its callbacks."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    if any(isinstance(c, StageProgress) for c in trainer.callback_handler.callbacks):
        trainer.remove_callback(ProgressCallback)
        trainer.remove_callback(PrinterCallback)


def _bar_class():
    from tqdm.auto import tqdm

    return tqdm


def progress(iterable, desc: str, unit: str):
    """A bar over `iterable` for work inside a stage (sampling batches, held-out eval); hidden while another bar
    (the stage's own) is open, so bars never nest and redraw each other."""
    tqdm = _bar_class()
    return tqdm(iterable, desc=desc, unit=unit, leave=False, disable=bool(getattr(tqdm, "_instances", None)))


def say(text: str) -> None:
    """Print a line; while a stage's bar is open, above it (tqdm.write) instead of onto its line."""
    tqdm = _bar_class()
    if getattr(tqdm, "_instances", None):
        tqdm.write(text)
    else:
        print(text)


try:  # a TrainerCallback when transformers is there (always, in a run); this module stays importable without it
    from transformers import TrainerCallback as _Callback
except ImportError:  # pragma: no cover
    _Callback = object


class StageProgress(_Callback):
    """One bar per training stage on the main rank, `[name] train`, the latest loss or reward in its postfix.
    Log records are not printed: they go to metrics.jsonl (`MetricsLogger`) and the integrations."""

    def __init__(self, stage_name: str):
        self.stage_name = stage_name
        self.bar = None
        self.redirect = None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero and not args.disable_tqdm:
            from tqdm.contrib.logging import logging_redirect_tqdm

            self.bar = _bar_class()(total=state.max_steps, initial=state.global_step, desc=f"[{self.stage_name}] train",
                                    unit="step", dynamic_ncols=True)
            self.redirect = logging_redirect_tqdm()  # a warning while the bar is open prints above it
            self.redirect.__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is None or not logs:
            return
        postfix = {label: f"{logs[key]:.4g}" for key, label in POSTFIX_KEYS
                   if isinstance(logs.get(key), (int, float))}
        if postfix:
            self.bar.set_postfix(postfix, refresh=False)

    def on_train_end(self, args, state, control, **kwargs):
        if self.redirect is not None:
            self.redirect.__exit__(None, None, None)
            self.redirect = None
        if self.bar is not None:
            self.bar.close()
            self.bar = None


# ---------------------------------------------------------------- closing table and `status`


def is_task_accuracy(metrics: dict[str, Any]) -> bool:
    """`heldout_accuracy` is a task accuracy when it comes with its details (`heldout`, from `evaluate_task`);
    manifests written before the reward model's pair accuracy got its own name alone filed it there too."""
    return isinstance(metrics.get("heldout_accuracy"), (int, float)) and isinstance(metrics.get("heldout"), dict)


def headline(entry: dict[str, Any]) -> str:
    """A stage's headline metrics, each named for what it measures ("held-out task accuracy 24.5% -> 28.5%")."""
    metrics = entry.get("metrics") or {}
    parts = []
    for key, label in HEADLINES:
        value = metrics.get(key)
        if not isinstance(value, (int, float)):
            continue
        if key == "heldout_accuracy" and not is_task_accuracy(metrics):
            continue
        before = metrics.get(f"{key}_before")
        text = f"{label} {before:.1%} -> {value:.1%}" if isinstance(before, (int, float)) else f"{label} {value:.1%}"
        if key == "heldout_pair_accuracy" and isinstance(metrics.get("heldout_pairs"), int):
            text += f" on {metrics['heldout_pairs']} pairs"
        parts.append(text)
    if isinstance(metrics.get("pairs"), int):
        parts.append(f"{metrics['pairs']:,} pairs")
    if not parts and isinstance(metrics.get("train_loss"), (int, float)):
        parts.append(f"final train loss {metrics['train_loss']:.4g}")
    return ", ".join(parts)


def duration(entry: dict[str, Any]) -> str:
    from datetime import datetime

    try:
        start = datetime.strptime(entry["started_at"], "%Y-%m-%dT%H:%M:%S%z")
        end = datetime.strptime(entry["finished_at"], "%Y-%m-%dT%H:%M:%S%z")
    except (KeyError, TypeError, ValueError):
        return ""
    seconds = int((end - start).total_seconds())
    return f"{seconds // 60}m {seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def table(header: list[str], rows: list[list[str]]) -> str:
    """A plain-text table: columns padded to their widest cell."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def summary_table(manifest: dict[str, Any]) -> str:
    """The closing table of `qwen-align run`: each stage, its status and headline metric."""
    rows = [[name, entry.get("status", ""), headline(entry)] for name, entry in manifest.get("stages", {}).items()]
    return table(["stage", "status", "result"], rows)


def status_table(manifest: dict[str, Any]) -> str:
    """`qwen-align status`: the manifest as a table."""
    rows = []
    for name, entry in manifest.get("stages", {}).items():
        resumed = entry.get("resumed_from")
        rows.append([name, entry.get("kind", ""), entry.get("status", ""), Path(resumed).name if resumed else "-",
                     duration(entry) or "-", headline(entry) or "-", entry.get("output") or "-"])
    return table(["stage", "kind", "status", "resumed from", "duration", "headline metric", "output"], rows)
