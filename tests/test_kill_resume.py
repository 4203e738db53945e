"""kill -9 and preemption of real `qwen_align.cli run` processes: the rerun of the same command resumes from the
last whole checkpoint and ends with the weights of an uninterrupted run, bit for bit (CPU, one thread)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers import arithmetic_rows, write_jsonl
from safetensors.torch import load_file

from qwen_align.checkpoints.resume import PAUSE_ENV, check_checkpoint
from qwen_align.recipe import load_recipe
from qwen_align.runner import run_recipe

REPO = Path(__file__).resolve().parents[1]
STEPS, SAVE_EVERY = 8, 2


def _pairs(n: int) -> list[dict]:
    return [{"prompt": [{"role": "user", "content": f"What is {10 + i}+{20 + 3 * i}?"}],
             "chosen": [{"role": "assistant", "content": str(30 + 4 * i)}],
             "rejected": [{"role": "assistant", "content": str(31 + 4 * i + i % 3)}]} for i in range(n)]


# variant -> (stage kind, extra options)
VARIANTS = {"sft": ("sft", {}), "dpo": ("dpo", {}), "reward_model": ("reward_model", {}),
            "likelihood_rm": ("reward_model", {"score": "likelihood"})}


def _stage(variant: str, data: Path) -> dict:
    kind, extra = VARIANTS[variant]
    common = {"name": kind, "kind": kind, **extra, "data": {"sources": [{"path": str(data)}]}, "max_length": 64,
              "max_steps": STEPS, "save_steps": SAVE_EVERY, "save_total_limit": 2, "save_every_minutes": None,
              "logging_steps": 1, "learning_rate": 1e-3, "dtype": "float32"}
    if kind == "sft":
        return {**common, "packing": False, "per_device_train_batch_size": 8}  # 6 steps an epoch: resumes mid-epoch 2
    return {**common, "per_device_train_batch_size": 4, "eval_fraction": 0.0}


def _recipe(folder: Path, variant: str, tokenizer_dir: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    data = (write_jsonl(folder / "sft.jsonl", arithmetic_rows(48)) if variant == "sft"
            else write_jsonl(folder / "pairs.jsonl", _pairs(24)))
    raw = {"model": "tiny", "tokenizer": str(tokenizer_dir), "run_dir": str(folder / "run"), "seed": 0,
           "stages": [_stage(variant, data)]}
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


def _launch(recipe: Path, log_name: str, **env_extra: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != PAUSE_ENV}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", **env_extra)
    out = open(recipe.parent / f"{log_name}.out", "w")
    return subprocess.Popen([sys.executable, "-m", "qwen_align.cli", "run", str(recipe)], cwd=recipe.parent,
                            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _output(recipe: Path, log_name: str) -> str:
    return (recipe.parent / f"{log_name}.out").read_text()


def _finish(recipe: Path, log_name: str, **env_extra: str) -> subprocess.CompletedProcess:
    proc = _launch(recipe, log_name, **env_extra)
    proc.wait(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, _output(recipe, log_name))


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before {path} appeared"
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.005)


def _kill_group(proc: subprocess.Popen) -> None:
    assert proc.poll() is None, "the run had already ended: the kill came too late to test anything"
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL


def _manifest_entry(recipe: Path, kind: str) -> dict:
    return json.loads((recipe.parent / "run" / "manifest.json").read_text())["stages"][kind]


def _final_weights(recipe: Path, kind: str) -> dict:
    return load_file(recipe.parent / "run" / kind / "final" / "model.safetensors")


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    differing = [k for k in a if not (a[k] == b[k]).all()]
    assert not differing, f"weights differ from the uninterrupted run: {differing[:5]}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, demo_tokenizer_dir):
    """One uninterrupted run per variant, made on first use and shared; in this process (saving a start-up),
    on one thread like the runs it is compared with."""
    made: dict[str, dict] = {}

    def get(variant: str) -> dict:
        if variant not in made:
            kind = VARIANTS[variant][0]
            recipe = _recipe(tmp_path_factory.mktemp(f"ref-{variant}"), variant, demo_tokenizer_dir)
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                entry = run_recipe(load_recipe(recipe))["stages"][kind]
            finally:
                torch.set_num_threads(threads)
            assert entry["status"] == "completed" and entry["resumed_from"] is None
            made[variant] = _final_weights(recipe, kind)
        return made[variant]

    return get


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_kill_9_mid_checkpoint_and_at_a_random_moment_then_resume(variant, tmp_path, demo_tokenizer_dir, reference):
    kind = VARIANTS[variant][0]
    recipe = _recipe(tmp_path, variant, demo_tokenizer_dir)
    checkpoints = (tmp_path / "run" / kind / "checkpoints").resolve()

    # 1. Killed while checkpoint-4 is half written (model, optimizer, scheduler in; RNG and trainer state not).
    proc = _launch(recipe, "first", **{PAUSE_ENV: "4:600"})
    _wait_for(checkpoints / ".staging" / "checkpoint-4" / "scheduler.pt", proc)
    _kill_group(proc)
    assert not (checkpoints / "checkpoint-4").exists()  # nothing half-written where a resume would look
    check_checkpoint(checkpoints / "checkpoint-2")

    # 2. The rerun resumes from checkpoint-2; killed at a random (seeded) moment after its first new checkpoint.
    proc = _launch(recipe, "second")
    _wait_for(checkpoints / "checkpoint-4", proc)
    time.sleep(random.Random(f"kill-{kind}").uniform(0.0, 0.2))
    _kill_group(proc)
    assert f"resuming {checkpoints / 'checkpoint-2'}" in _output(recipe, "second")
    assert not (checkpoints / ".staging" / "checkpoint-4").exists()  # the leftover was cleared

    # 3. The same command again: resumes from the newest whole checkpoint and completes.
    done = _finish(recipe, "third")
    assert done.returncode == 0, done.stdout[-3000:]
    entry = _manifest_entry(recipe, kind)
    last = int(entry["resumed_from"].rsplit("-", 1)[1])
    assert entry["status"] == "completed" and last >= 4 and entry["metrics"]["train_steps"] == STEPS
    assert f"resuming {entry['resumed_from']}" in done.stdout
    _assert_same_weights(_final_weights(recipe, kind), reference(variant))


def test_sigterm_then_sigint_save_at_the_next_step_and_the_rerun_finishes_the_same(tmp_path, demo_tokenizer_dir,
                                                                                    reference):
    recipe = _recipe(tmp_path, "sft", demo_tokenizer_dir)
    checkpoints = (tmp_path / "run" / "sft" / "checkpoints").resolve()
    # The hook holds the run inside checkpoint-N's write, so the signal lands while step N is being saved;
    # the run finishes that save, takes one more step, saves it and stops.
    for log_name, signum, pause_at in (("first", signal.SIGTERM, 2), ("second", signal.SIGINT, 4)):
        proc = _launch(recipe, log_name, **{PAUSE_ENV: f"{pause_at}:2"})
        _wait_for(checkpoints / ".staging" / f"checkpoint-{pause_at}" / "scheduler.pt", proc)
        proc.send_signal(signum)
        rc = proc.wait(timeout=120)
        lines = _output(recipe, log_name).strip().splitlines()
        assert rc != 0 and lines[-1] == f"interrupted at step {pause_at + 1}; rerun the same command to resume"
        entry = _manifest_entry(recipe, "sft")
        assert entry["status"] == "interrupted" and entry["interrupted_at_step"] == pause_at + 1
        assert entry["signal"] == signum.name
        check_checkpoint(checkpoints / f"checkpoint-{pause_at + 1}")  # saved at the step boundary after the signal
    assert entry["resumed_from"] == str(checkpoints / "checkpoint-3")

    done = _finish(recipe, "third")
    assert done.returncode == 0, done.stdout[-3000:]
    assert _manifest_entry(recipe, "sft")["resumed_from"] == str(checkpoints / "checkpoint-5")
    _assert_same_weights(_final_weights(recipe, "sft"), reference("sft"))


@pytest.mark.slow
def test_a_signal_to_one_rank_stops_both_at_the_same_step(tmp_path, demo_tokenizer_dir):
    """torchrun, 2 processes (gloo): SIGTERM reaches rank 1 only; both save checkpoint-3 (written by both into
    one staging folder, renamed by rank 0) and stop, and the rerun resumes from it and completes."""
    import psutil

    recipe = _recipe(tmp_path, "sft", demo_tokenizer_dir)
    checkpoints = (tmp_path / "run" / "sft" / "checkpoints").resolve()
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "qwen_align.cli", "run",
               str(recipe)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", PAUSE_ENV: "2:3"}
    log = open(tmp_path / "first.out", "w")
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        _wait_for(checkpoints / ".staging" / "checkpoint-2" / "scheduler.pt", proc)
        workers = [p for p in psutil.Process(proc.pid).children(recursive=True) if "qwen_align.cli" in p.cmdline()]
        rank1 = next(p for p in workers if p.environ().get("RANK") == "1")
        rank1.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=300) != 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    out = (tmp_path / "first.out").read_text()
    assert out.count("interrupted at step 3; rerun the same command to resume") == 2, out[-3000:]
    entry = _manifest_entry(recipe, "sft")
    assert entry["status"] == "interrupted" and entry["interrupted_at_step"] == 3
    check_checkpoint(checkpoints / "checkpoint-3")
    assert sorted(p.name for p in (checkpoints / "checkpoint-3").glob("rng_state*")) == ["rng_state_0.pth",
                                                                                         "rng_state_1.pth"]

    env.pop(PAUSE_ENV)
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    entry = _manifest_entry(recipe, "sft")
    assert entry["status"] == "completed" and entry["resumed_from"] == str(checkpoints / "checkpoint-3")
