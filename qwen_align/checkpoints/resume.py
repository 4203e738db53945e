"""Trainer checkpoints (`checkpoint-N`: model, optimizer, scheduler, RNG, trainer state) that are whole or absent.

Writing: `AtomicCheckpoints`, a mixin put in front of every stage's Trainer class, makes the Trainer's own
`_save_checkpoint` write into `checkpoints/.staging/checkpoint-N` (every rank writes its share there, as the
Trainer expects under FSDP), then the main rank fsyncs the files and the folder, renames it to
`checkpoints/checkpoint-N` after a barrier, and rotates (`save_total_limit`). A kill at any moment leaves the
previous checkpoints untouched and, at worst, a staging folder that the next run removes.

Reading: `last_whole_checkpoint` opens every part of the newest checkpoint (safetensors headers, `torch.load`
with `weights_only`, json) and sets a checkpoint that fails aside as `checkpoint-N.torn-<time>` (never deleted),
falling back to the one before.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path

from .. import distributed
from ..errors import Interrupted, UserError

log = logging.getLogger(__name__)

STAGING = ".staging"
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")

# Test-only hook (set by tests/test_kill_resume.py, never by users): "STEP:SECONDS" pauses the write of
# checkpoint-STEP for SECONDS once its model, optimizer and scheduler are in the staging folder (RNG and
# trainer state not yet), so that a test can kill the process mid-write or signal it at a known step.
PAUSE_ENV = "QWEN_ALIGN_TEST_CHECKPOINT_PAUSE"


class TornCheckpoint(Exception):
    pass


# ---------------------------------------------------------------- writing


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        _fsync(path)
    _fsync(folder)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoints_in(folder: Path) -> list[Path]:
    """The `checkpoint-N` folders directly in `folder`, oldest step first (set-aside and staging ones excluded)."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and CHECKPOINT.match(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT.match(p.name).group(1)))


def publish(staged: Path, target: Path, save_total_limit: int | None) -> None:
    """Main rank: make the staged checkpoint durable, put it in place in one rename, drop the oldest ones."""
    _fsync_tree(staged)
    old = None
    if target.exists():  # the same step saved again (e.g. a preemption save right at a save_steps step)
        old = staged.with_name(f"replaced-{target.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(staged, target)
    _fsync(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    if save_total_limit and save_total_limit > 0:
        for stale in checkpoints_in(target.parent)[:-save_total_limit]:
            if stale != target:
                shutil.rmtree(stale)


def _test_pause(step: int) -> None:
    hook = os.environ.get(PAUSE_ENV)
    if hook and int(hook.split(":")[0]) == step:
        time.sleep(float(hook.split(":")[1]))


class AtomicCheckpoints:
    """Mixin for a transformers Trainer subclass (`class X(AtomicCheckpoints, SFTTrainer)`): checkpoint-N
    appears whole in one rename or not at all; a failed write (a full disk) leaves the earlier ones as they were
    and stops the run with one line."""

    _staging_root: str | None = None

    def _get_output_dir(self, trial):
        if self._staging_root is not None:
            return self._staging_root
        return super()._get_output_dir(trial)

    def train(self, *args, **kwargs):
        """The Trainer's train(); raises `Interrupted` once a `Preemption` callback has stopped it (after the
        progress bar closed, so the interrupted line is the last one printed)."""
        from ..callbacks import Preemption
        from ..console import use_stage_progress

        use_stage_progress(self)  # the stage's own bar replaces the Trainer's printers of log dicts
        preemption = [c for c in self.callback_handler.callbacks if isinstance(c, Preemption)]
        try:
            output = super().train(*args, **kwargs)
        finally:  # also when training fails: the process gets its usual signal handling back
            for callback in preemption:
                callback.restore()
        for callback in preemption:
            if callback.received is not None:
                raise Interrupted(self.state.global_step, callback.received)
        return output

    def _save_optimizer_and_scheduler(self, output_dir):
        super()._save_optimizer_and_scheduler(output_dir)
        _test_pause(self.state.global_step)

    def _save_checkpoint(self, model, trial):
        run_dir = Path(super()._get_output_dir(trial))
        name = f"checkpoint-{self.state.global_step}"
        staging_root = run_dir / STAGING
        if distributed.is_main():
            shutil.rmtree(staging_root / name, ignore_errors=True)
            staging_root.mkdir(parents=True, exist_ok=True)
        distributed.barrier()
        self._staging_root = str(staging_root)
        failure = None
        try:
            super()._save_checkpoint(model, trial)  # every rank writes its part under .staging/checkpoint-N
        except Exception as e:  # noqa: BLE001 - a full disk: OSError, or RuntimeError (torch), SafetensorError
            failure = e
        finally:
            self._staging_root = None
        failures = [f for f in distributed.gather_objects(_describe(failure)) if f]
        if not failures and distributed.is_main():
            try:
                publish(staging_root / name, run_dir / name, self.args.save_total_limit)
            except OSError as e:
                failures = [_describe(e)]
        failures = distributed.broadcast_object(failures)  # the same on every rank: all stop, or none
        if failures:
            if distributed.is_main():
                shutil.rmtree(staging_root / name, ignore_errors=True)
            raise UserError(f"could not write checkpoint {run_dir / name}: {failures[0]}; the checkpoints "
                            "before it are intact — free space and rerun the same command to resume") from failure
        distributed.barrier()


def _describe(error: BaseException | None) -> str | None:
    """One line: `ENOSPC (No space left on device)` for an OSError, else the error's first line."""
    if error is None:
        return None
    if isinstance(error, OSError) and error.errno:
        return f"{errno.errorcode.get(error.errno, error.errno)} ({error.strerror or error})"
    return _short(error)


_ATOMIC_CLASSES: dict[type, type] = {}


def atomic_checkpoints(trainer_cls: type) -> type:
    """`trainer_cls` with `AtomicCheckpoints` in front (for Trainer classes used as they come, e.g. SFTTrainer)."""
    if issubclass(trainer_cls, AtomicCheckpoints):
        return trainer_cls
    if trainer_cls not in _ATOMIC_CLASSES:
        _ATOMIC_CLASSES[trainer_cls] = type(trainer_cls.__name__, (AtomicCheckpoints, trainer_cls),
                                            {"__module__": trainer_cls.__module__})
    return _ATOMIC_CLASSES[trainer_cls]


# ---------------------------------------------------------------- reading


def check_checkpoint(folder: Path) -> None:
    """Open every part a resume needs; raise TornCheckpoint naming the first one missing or unreadable."""
    state = folder / "trainer_state.json"
    try:
        json.loads(state.read_text(encoding="utf-8"))["global_step"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise TornCheckpoint(f"{state.name}: {_short(e)}") from None
    _check_weights(folder)
    if not any(p.name.startswith("optimizer_") for p in folder.iterdir()):  # FSDP writes optimizer_0/ instead
        _check_torch_file(folder / "optimizer.pt")
    _check_torch_file(folder / "scheduler.pt")
    rng = sorted(folder.glob("rng_state*.pth"))
    if not rng:
        raise TornCheckpoint("rng_state.pth: missing")
    for path in rng:
        _check_torch_file(path)


def _check_weights(folder: Path) -> None:
    index = next((folder / n for n in ("model.safetensors.index.json", "adapter_model.safetensors.index.json")
                  if (folder / n).exists()), None)
    if index is not None:
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, ValueError, KeyError) as e:
            raise TornCheckpoint(f"{index.name}: {_short(e)}") from None
        files = [folder / s for s in shards]
    else:
        files = [folder / n for n in ("model.safetensors", "adapter_model.safetensors") if (folder / n).exists()]
    if not files:
        if any(p.name.startswith("pytorch_model_fsdp") for p in folder.iterdir()):
            return  # FSDP's sharded state dict: torch.distributed.checkpoint files, read as a whole on load
        if (folder / "pytorch_model.bin").exists():
            return _check_torch_file(folder / "pytorch_model.bin")
        raise TornCheckpoint("model weights: missing (no model.safetensors)")
    for path in files:
        _check_safetensors(path)


def _check_safetensors(path: Path) -> None:
    """The header parses and the file is as long as the header says (a cut-off write fails here)."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        if path.stat().st_size != 8 + size + end:
            raise ValueError(f"{path.stat().st_size} bytes, the header describes {8 + size + end}")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise TornCheckpoint(f"{path.name}: {_short(e)}") from None


def _check_torch_file(path: Path) -> None:
    if not path.exists():
        raise TornCheckpoint(f"{path.name}: missing")
    import torch
    from transformers.trainer_pt_utils import safe_globals

    try:
        with safe_globals():  # the allowlist the Trainer itself loads RNG states with
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - whatever torch raises, the file cannot be resumed from
        raise TornCheckpoint(f"{path.name}: {_short(e)}") from None


def _short(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:200]


def last_whole_checkpoint(folder: Path) -> str | None:
    """The newest checkpoint in `folder` that passes `check_checkpoint`, on every rank.

    The main rank removes leftover staging folders and sets torn checkpoints aside (logged, renamed
    `checkpoint-N.torn-<time>`); the others wait and get its answer.
    """
    distributed.init()  # a no-op for one process; under torchrun every rank must agree on the answer
    chosen = None
    if distributed.is_main():
        folder = Path(folder)
        shutil.rmtree(folder / STAGING, ignore_errors=True)
        for candidate in reversed(checkpoints_in(folder)):
            try:
                check_checkpoint(candidate)
            except TornCheckpoint as e:
                aside = candidate.with_name(f"{candidate.name}.torn-{time.strftime('%Y%m%dT%H%M%S')}")
                with contextlib.suppress(OSError):
                    os.replace(candidate, aside)
                log.warning("checkpoint %s is torn (%s); set aside as %s, trying the one before", candidate, e,
                            aside.name)
                print(f"warning: checkpoint {candidate} is torn ({e}); set aside as {aside.name}")
                continue
            chosen = str(candidate)
            break
    return distributed.broadcast_object(chosen)
