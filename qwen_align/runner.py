"""Run a recipe's chain of stages, recording each in the run directory's manifest.

run_dir/
  manifest.json     per stage: status, output, metrics, config hash, library versions (written atomically)
  metrics.jsonl     every logged training record, tagged with its stage
  fingerprints.json cache of input files' sha256 by (path, size, mtime_ns), for the config hashes
  logs/<stage>.log  the stage's log
  <stage>/final     the stage's output checkpoint; <stage>/checkpoints holds trainer checkpoints for resuming
  <stage>/tensorboard  event files, with `report_to: tensorboard`
  report/           report.md, report.html, figures/ (written by `qwen-align run` at the end, see qwen_align.report)

A completed stage whose config hash (its options, the contents of its input files, its upstream's hash) is
unchanged is skipped; an interrupted one resumes from its last trainer checkpoint; a changed one starts over.
"""

from __future__ import annotations

import errno
import importlib.metadata
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from . import distributed, registry, tracking
from .errors import Interrupted, RecipeError, UserError
from .fingerprint import Fingerprints
from .fsutil import atomic_write_json
from .recipe import Recipe, StageConfig, stage_hash, upstream_stages
from .stage import StageContext, StageResult

log = logging.getLogger(__name__)

WRITE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO)

LIBRARIES = ("qwen-align", "torch", "transformers", "trl", "peft", "accelerate", "datasets")


def library_versions() -> dict[str, str]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


class Manifest:
    def __init__(self, run_dir: Path, recipe: Recipe):
        self.path = run_dir / "manifest.json"
        self.data: dict[str, Any] = {"recipe": recipe.source, "stages": {}}
        if distributed.is_main() and self.path.is_file():
            import json

            try:
                self.data = json.loads(self.path.read_text(encoding="utf-8"))
            except ValueError as e:
                raise RecipeError(f"{self.path}: manifest is not valid JSON ({e}); move it away to start over") from None
            self.data.setdefault("stages", {})
        # Every rank decides what to skip, resume or redo from the main rank's reading (made before it writes).
        self.data = distributed.broadcast_object(self.data)

    def entry(self, name: str) -> dict[str, Any] | None:
        return self.data["stages"].get(name)

    def update(self, name: str, **fields: Any) -> None:
        self.data["stages"].setdefault(name, {}).update(fields)
        self.data["updated_at"] = _now()
        if distributed.is_main():
            atomic_write_json(self.path, self.data)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def select_stages(recipe: Recipe, until: str | None, only: list[str] | None) -> list[StageConfig]:
    names = [s.name for s in recipe.stages]
    for n in ([until] if until else []) + (only or []):
        if n not in names:
            raise RecipeError(f"no stage named '{n}' in {recipe.source} (stages: {', '.join(names)})")
    if only:
        return [s for s in recipe.stages if s.name in only]
    if until:
        return recipe.stages[: names.index(until) + 1]
    return list(recipe.stages)


def config_hashes(recipe: Recipe, run_dir: Path | None = None) -> dict[str, str]:
    """Each stage's config hash: its options, its inputs' contents and its upstream stages' hashes. File digests
    are cached in `run_dir` (None: not cached)."""
    hashes: dict[str, str] = {}
    prints = Fingerprints(run_dir)
    for stage in recipe.stages:
        upstream = ",".join(hashes[name] for name in upstream_stages(recipe, stage)) or None
        hashes[stage.name] = stage_hash(recipe, stage, upstream, prints)
    prints.save()
    return hashes


def run_recipe(recipe: Recipe, until: str | None = None, only: list[str] | None = None) -> dict[str, Any]:
    run_dir = Path(recipe.run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(run_dir, recipe)
    selected = {s.name for s in select_stages(recipe, until, only)}

    hashes = config_hashes(recipe, run_dir)
    for stage in recipe.stages:
        if stage.name not in selected:
            continue
        entry = manifest.entry(stage.name) or {}
        if (
            entry.get("status") == "completed"
            and entry.get("config_hash") == hashes[stage.name]
            and Path(entry.get("output", "")).exists()
        ):
            print(f"[{stage.name}] completed earlier with the same config; skipping (output: {entry['output']})")
            continue
        _run_stage(recipe, stage, hashes, manifest, run_dir)
    return manifest.data


def _init_source(recipe: Recipe, stage: StageConfig, manifest: Manifest, hashes: dict[str, str]) -> str:
    if stage.init_from is None:
        return recipe.model
    if any(s.name == stage.init_from for s in recipe.stages):
        return _completed_output(recipe, manifest, hashes, stage.name, stage.init_from)
    return stage.init_from  # a path, checked when the recipe was loaded


def _completed_output(recipe: Recipe, manifest: Manifest, hashes: dict[str, str], reader: str, name: str) -> str:
    try:
        context = StageContext(recipe, Path(), "", None, Path(), manifest=manifest.data, stage_hashes=hashes)
        return context.stage_output(name)
    except UserError as e:
        raise RecipeError(f"stage '{reader}' needs an earlier stage's output: {e}") from None


def _with_stage_sources(stage: StageConfig, context: StageContext) -> StageConfig:
    """A copy of `stage` whose data sources that name an earlier stage point at that stage's output."""
    fields = stage.data_fields()
    if not any(src.stage for data in fields.values() for src in data.sources):
        return stage
    stage = stage.model_copy(deep=True)
    for key, data in fields.items():
        try:
            setattr(stage, key, context.resolve_data(data))
        except UserError as e:
            raise RecipeError(f"stage '{stage.name}' reads {key} from an earlier stage: {e}") from None
    return stage


def _run_stage(recipe: Recipe, stage: StageConfig, hashes: dict[str, str], manifest: Manifest, run_dir: Path) -> None:
    config_hash = hashes[stage.name]
    stage_dir = run_dir / stage.name
    entry = manifest.entry(stage.name) or {}
    init_source = _init_source(recipe, stage, manifest, hashes)
    resume = None
    checkpoints = stage_dir / "checkpoints"
    same_work = entry.get("config_hash") == config_hash
    if same_work and entry.get("status") in ("running", "failed", "interrupted"):
        resume = distributed.broadcast_object(_last_checkpoint(checkpoints))  # the one the main rank sees
    with distributed.main_writes() as writer:
        # Work of a different config (or of different inputs) must be neither resumed nor reused.
        for stale in (checkpoints, stage_dir / "final"):
            if writer and not same_work and stale.exists():
                shutil.rmtree(stale)
    context = StageContext(
        recipe=recipe,
        stage_dir=stage_dir,
        init_source=init_source,
        resume_checkpoint=resume,
        metrics_path=run_dir / "metrics.jsonl",
        is_main_process=distributed.is_main(),
        manifest=manifest.data,
        stage_hashes=dict(hashes),
    )
    stage = _with_stage_sources(stage, context)
    context.stage_config = stage
    module = registry.stage_module(stage.kind)
    integrations = recipe.integrations(stage)
    print(f"[{stage.name}] {stage.kind} from {context.init_source}" + (f", resuming {resume}" if resume else ""))
    manifest.update(
        stage.name, kind=stage.kind, status="running", config_hash=config_hash, init_from=context.init_source,
        started_at=_now(), versions=library_versions(), resumed_from=resume, error=None,
        hyperparameters={k: v if isinstance(v, (int, float, str, bool)) or v is None else str(v)
                         for k, v in stage.key_hyperparameters().items()}
        | ({"global_batch": stage.global_batch(recipe.num_processes)} if stage.trains else {}),
    )
    with _stage_log(run_dir / "logs" / _log_name(stage.name)) as stage_log:
        try:
            context.check_task_eval(stage)  # before any compute: a bad held-out row must not wait for training
            with tracking.stage_environment(integrations, recipe.source, stage_dir, run_dir):
                result: StageResult = module.run(stage, context)
        except Interrupted as e:
            manifest.update(stage.name, status="interrupted", interrupted_at_step=e.step, signal=e.signal_name,
                            finished_at=_now())
            raise
        except KeyboardInterrupt:
            manifest.update(stage.name, status="interrupted", finished_at=_now())
            raise
        except Exception as e:
            if not isinstance(e, UserError):
                stage_log.traceback(f"{distributed.rank_label()}stage '{stage.name}' failed")
            manifest.update(stage.name, status="failed", error=f"{type(e).__name__}: {e}"[:2000], finished_at=_now())
            if isinstance(e, OSError) and e.errno in WRITE_ERRORS:  # e.g. a full disk under final/: one line
                where = e.filename or stage_dir
                raise UserError(f"stage '{stage.name}': could not write {where}: {errno.errorcode[e.errno]} "
                                f"({e.strerror}); earlier outputs and the manifest are intact") from e
            raise
    with distributed.main_writes():  # the next stage, on every rank, reads what this one recorded
        manifest.update(
            stage.name, status="completed", output=str(result.output),
            outputs={k: str(v) for k, v in result.outputs.items()}, metrics=result.metrics, finished_at=_now(),
        )
    if integrations and distributed.is_main():
        tracking.log_summary(integrations, recipe.source, stage.name, stage_dir, result.metrics,
                             int(result.metrics.get("train_steps") or 0))
    print(f"[{stage.name}] done: {result.output}")


def _log_name(stage_name: str) -> str:
    """The main rank writes logs/<stage>.log; another rank its own logs/<stage>.rank<N>.log."""
    return f"{stage_name}.log" if distributed.is_main() else f"{stage_name}.rank{distributed.rank()}.log"


def _last_checkpoint(folder: Path) -> str | None:
    """The newest whole trainer checkpoint; torn ones are set aside, staging leftovers removed."""
    from .checkpoints.resume import last_whole_checkpoint

    return last_whole_checkpoint(folder)


LOGGERS = ("qwen_align", "transformers", "trl", "sft", "dpo", "grpo", "reward_model", "py.warnings")


class _stage_log:
    """Send qwen_align, transformers and trl log records to the stage's log file while it runs."""

    def __init__(self, path: Path):
        self.path = path
        self.handler: logging.Handler | None = None

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.handler = logging.FileHandler(self.path, encoding="utf-8")
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self.handler.setLevel(logging.INFO)
        for name in LOGGERS:
            lg = logging.getLogger(name)
            lg.addHandler(self.handler)
            # Our own loggers record INFO; the libraries keep their level so the console stays quiet.
            if name not in ("transformers", "trl") and (lg.level == logging.NOTSET or lg.level > logging.INFO):
                lg.setLevel(logging.INFO)
        return self

    def traceback(self, message: str) -> None:
        """The exception being handled, with its traceback, into the log file only (the console gets one line)."""
        import sys

        record = logging.LogRecord(__name__, logging.ERROR, __file__, 0, message, None, sys.exc_info())
        self.handler.handle(record)

    def __exit__(self, *exc):
        for name in LOGGERS:
            logging.getLogger(name).removeHandler(self.handler)
        self.handler.close()
        return False
