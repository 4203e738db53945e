"""Trainer checkpoints: torn ones are found by opening every part and set aside; a full disk while saving a
checkpoint or the stage's output leaves what was there intact and ends with one line; time-based saves."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import arithmetic_rows, write_jsonl
from safetensors.torch import save_file
from transformers import TrainerControl

from qwen_align.callbacks import TimedSave
from qwen_align.checkpoints.resume import TornCheckpoint, check_checkpoint, last_whole_checkpoint

REPO = Path(__file__).resolve().parents[1]


def _fake_checkpoint(folder: Path, step: int) -> Path:
    """A checkpoint-N with every part the Trainer writes, in the Trainer's formats."""
    ckpt = folder / f"checkpoint-{step}"
    ckpt.mkdir(parents=True)
    save_file({"w": torch.randn(64, 64), "b": torch.zeros(64)}, ckpt / "model.safetensors")
    optimizer = {"state": {0: {"exp_avg": torch.randn(64, 64), "step": torch.tensor(3.0)}}, "param_groups": [{"lr": 1}]}
    torch.save(optimizer, ckpt / "optimizer.pt")
    torch.save({"last_epoch": step, "_last_lr": [1e-3]}, ckpt / "scheduler.pt")
    torch.save({"python": (3, tuple(range(5)), None), "numpy": np.random.get_state(),
                "cpu": torch.random.get_rng_state()}, ckpt / "rng_state.pth")
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": []}))
    return ckpt


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


TEARS = {
    "truncated weights": lambda c: _truncate(c / "model.safetensors", 0.9),
    "no weights": lambda c: (c / "model.safetensors").unlink(),
    "truncated optimizer": lambda c: _truncate(c / "optimizer.pt"),
    "no optimizer": lambda c: (c / "optimizer.pt").unlink(),
    "empty scheduler": lambda c: (c / "scheduler.pt").write_bytes(b""),
    "no rng state": lambda c: (c / "rng_state.pth").unlink(),
    "truncated trainer state": lambda c: _truncate(c / "trainer_state.json"),
    "no trainer state": lambda c: (c / "trainer_state.json").unlink(),
}


def test_a_whole_checkpoint_passes(tmp_path):
    check_checkpoint(_fake_checkpoint(tmp_path, 2))


@pytest.mark.parametrize("tear", list(TEARS))
def test_a_torn_checkpoint_is_set_aside_and_the_one_before_used(tmp_path, tear, capsys):
    _fake_checkpoint(tmp_path, 2)
    torn = _fake_checkpoint(tmp_path, 4)
    TEARS[tear](torn)
    staging = tmp_path / ".staging" / "checkpoint-6"
    staging.mkdir(parents=True)
    with pytest.raises(TornCheckpoint):
        check_checkpoint(torn)

    assert last_whole_checkpoint(tmp_path) == str(tmp_path / "checkpoint-2")
    assert not torn.exists() and not (tmp_path / ".staging").exists()
    aside = [p.name for p in tmp_path.iterdir() if p.name.startswith("checkpoint-4.torn-")]
    assert len(aside) == 1  # kept, not deleted
    assert "checkpoint-4 is torn" in capsys.readouterr().out
    assert last_whole_checkpoint(tmp_path) == str(tmp_path / "checkpoint-2")  # the set-aside one is not a candidate


def test_no_whole_checkpoint_means_starting_over(tmp_path):
    TEARS["no optimizer"](_fake_checkpoint(tmp_path, 2))
    assert last_whole_checkpoint(tmp_path) is None
    assert last_whole_checkpoint(tmp_path / "missing") is None


def test_time_based_save_is_due_after_the_interval(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr("qwen_align.callbacks.time.monotonic", lambda: now[0])
    saver, control = TimedSave(minutes=2), TrainerControl()
    saver.on_train_begin(None, None, control)
    now[0] += 119
    saver.on_step_end(None, None, control)
    assert not control.should_save
    now[0] += 2
    saver.on_step_end(None, None, control)
    assert control.should_save
    saver.on_save(None, None, control)
    control.should_save = False
    now[0] += 60
    saver.on_step_end(None, None, control)
    assert not control.should_save  # the clock restarts at each save, whatever triggered it


# A child process that runs the CLI with one write failing as a full disk does.
FULL_DISK = """
import errno, sys
from pathlib import Path
import torch
from transformers import PreTrainedModel
target = sys.argv[2]
real_save, real_save_pretrained = torch.save, PreTrainedModel.save_pretrained
def disk_full(path):
    raise OSError(errno.ENOSPC, "No space left on device", str(path))
def save(obj, f, *a, **k):
    if target == "checkpoint" and str(f).endswith("checkpoint-4/optimizer.pt"):
        disk_full(f)
    return real_save(obj, f, *a, **k)
def save_pretrained(self, save_directory, *a, **k):
    if target == "final" and Path(save_directory).name.startswith(".final."):
        disk_full(Path(save_directory) / "model.safetensors")
    return real_save_pretrained(self, save_directory, *a, **k)
torch.save, PreTrainedModel.save_pretrained = save, save_pretrained
from qwen_align.cli import main
sys.exit(main(["run", sys.argv[1]]))
"""


@pytest.fixture
def sft_recipe(tmp_path, demo_tokenizer_dir):
    data = write_jsonl(tmp_path / "sft.jsonl", arithmetic_rows(24))
    raw = {"model": "tiny", "tokenizer": str(demo_tokenizer_dir), "run_dir": str(tmp_path / "run"), "seed": 0,
           "stages": [{"name": "sft", "kind": "sft", "data": {"sources": [{"path": str(data)}]}, "max_length": 64,
                       "packing": False, "per_device_train_batch_size": 8, "max_steps": 4, "save_steps": 2,
                       "logging_steps": 1, "dtype": "float32"}]}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


def _run_with_full_disk(recipe: Path, target: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    return subprocess.run([sys.executable, "-c", FULL_DISK, str(recipe), target], capture_output=True, text=True,
                          env=env, cwd=recipe.parent, timeout=300)


def _manifest(recipe: Path) -> dict:
    return json.loads((recipe.parent / "run" / "manifest.json").read_text())  # still valid JSON


def test_a_full_disk_while_saving_a_checkpoint_keeps_the_previous_one(sft_recipe):
    proc = _run_with_full_disk(sft_recipe, "checkpoint")
    checkpoints = (sft_recipe.parent / "run" / "sft" / "checkpoints").resolve()
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert last.startswith(f"error: could not write checkpoint {checkpoints / 'checkpoint-4'}: ENOSPC"), last
    check_checkpoint(checkpoints / "checkpoint-2")
    assert not (checkpoints / "checkpoint-4").exists() and not list((checkpoints / ".staging").iterdir())
    entry = _manifest(sft_recipe)["stages"]["sft"]
    assert entry["status"] == "failed" and "ENOSPC" in entry["error"]


def test_a_full_disk_while_writing_the_output_leaves_no_final_folder(sft_recipe):
    proc = _run_with_full_disk(sft_recipe, "final")
    stage_dir = (sft_recipe.parent / "run" / "sft").resolve()
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert last.startswith(f"error: stage 'sft': could not write {stage_dir}/.final.") and "ENOSPC" in last, last
    assert not [p for p in stage_dir.iterdir() if "final" in p.name]  # neither final/ nor its temporary folder
    check_checkpoint(stage_dir / "checkpoints" / "checkpoint-4")  # the trained state is kept for a rerun
    assert _manifest(sft_recipe)["stages"]["sft"]["status"] == "failed"
