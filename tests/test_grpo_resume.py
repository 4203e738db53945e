"""GRPO resume: the ordering schedule's state travels in every trainer checkpoint, so a run killed with
SIGKILL and run again consumes the queries in the order, and ends with the weights, of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import write_jsonl

from grpo.ordering import OrderingSchedule, QueryScore, consumed_order
from grpo.sampler import OrderedRepeatSampler

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- the schedule alone


def drifting_scorer(schedule_ref: list, calls: list):
    """Variances that change with every round (as a policy's do while it trains), a function of the state."""

    def scorer(ids):
        calls.append(list(ids))
        rounds = len(schedule_ref[0].rounds)
        return [QueryScore(q, 0.5, ((q * 7 + rounds * 3) % 5) / 10) for q in ids]

    return scorer


def make_schedule(calls: list, tmp_path: Path, name: str) -> OrderingSchedule:
    ref: list = []
    s = OrderingSchedule(8, 2, drifting_scorer(ref, calls), policy="rescore", reorder_every_chunks=1,
                         reorder_each_epoch=True, artifact=tmp_path / name)
    ref.append(s)
    return s


@pytest.mark.parametrize("consumed, handed_out", [(1, 2), (2, 2), (0, 1), (3, 4)])
def test_restored_schedule_continues_the_same_sequence(tmp_path, consumed, handed_out):
    """Interrupted in pass 2 after `handed_out` chunks were drawn and `consumed` trained on, the restored
    schedule, iterated from the start of the pass as the Trainer does, hands out what the original would."""
    calls_ref: list = []
    ref = make_schedule(calls_ref, tmp_path, "ref.json")
    expected = [c for _ in range(3) for c in ref.chunks()]

    calls: list = []
    first = make_schedule(calls, tmp_path, "run.json")
    got = list(first.chunks())
    second_pass = first.chunks()
    drawn = [next(second_pass) for _ in range(handed_out)]
    got += drawn[:consumed]
    state = json.loads(json.dumps(first.state_dict()))  # what ordering_state.json holds

    resumed = make_schedule(calls, tmp_path, "run.json")
    resumed.load_state_dict(state)
    got += list(resumed.chunks())[consumed:]  # the Trainer skips the batches it trained on
    got += list(resumed.chunks())
    assert got == expected
    assert calls == calls_ref  # no round repeated, none left out
    artifact = json.loads((tmp_path / "run.json").read_text())
    assert consumed_order(artifact, 8, 3) == [q for c in expected for q in c]


def test_state_of_another_query_set_is_refused(tmp_path):
    s = make_schedule([], tmp_path, "a.json")
    list(s.chunks())
    other = OrderingSchedule(6, 2, lambda ids: [QueryScore(q, 0, 0.1) for q in ids])
    with pytest.raises(ValueError, match="num_queries"):
        other.load_state_dict(s.state_dict())


def test_drop_sampler_length_counts_only_kept_queries():
    """The Trainer asks the sampler's length before it iterates: it must already exclude dropped queries."""
    variances = [0.0, 0.2, 0.1, 0.0, 0.3, 0.05]
    s = OrderingSchedule(6, 2, lambda ids: [QueryScore(q, 0.5, variances[q]) for q in ids], policy="drop")
    sampler = OrderedRepeatSampler(s, mini_repeat_count=2, repeat_count=3)
    assert len(sampler) == 2 * 2 * 2 * 3  # 2 chunks of 2 kept queries, x2 generations, x3 repeats
    assert len(list(sampler)) == len(sampler)


# ---------------------------------------------------------------- a real process, killed


PATTERNS = [r"(?s).*[a-f].*", r"(?s).*[0-9].*", r"(?s).*[A-Z].*", r"(?s).*\s.*", r"(?s).*[g-p].*",
            r"(?s).*[.,!?].*", r"(?s).*e.*", r"(?s).*[q-z].*"]


def write_recipe(tmp_path: Path, demo_tokenizer_dir: Path, run_dir: Path) -> Path:
    rows = [{"messages": [{"role": "user", "content": f"Say something about {i}."}], "verifier": "regex",
             "pattern": PATTERNS[i % len(PATTERNS)]} for i in range(12)]
    write_jsonl(tmp_path / "q.jsonl", rows)
    raw = {"model": "tiny", "tokenizer": str(demo_tokenizer_dir), "run_dir": str(run_dir), "seed": 3,
           "stages": [{
               "name": "grpo", "kind": "grpo", "data": {"sources": [{"path": str(tmp_path / "q.jsonl")}]},
               "rewards": [{"kind": "verifier"}], "num_generations": 2,
               "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1, "max_steps": 14,
               "max_completion_length": 4, "temperature": 1.0, "learning_rate": 5e-3, "reorder_every_steps": 3,
               "low_variance_policy": "rescore", "ordering_window": 1, "save_steps": 2, "save_total_limit": None,
               "logging_steps": 1,
               "dtype": "float32",
           }]}
    path = tmp_path / f"recipe_{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def start(recipe: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "qwen_align.cli", "run", str(recipe)], cwd=REPO, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def finish(proc: subprocess.Popen, log: Path) -> None:
    assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]


def final_weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "grpo" / "final" / "model.safetensors"))


def consumed(run_dir: Path, steps: int) -> list[int]:
    artifact = json.loads((run_dir / "grpo" / "ordering.json").read_text())
    return consumed_order(artifact, 12, 2)[: steps * 2]  # 2 queries per optimizer step


def test_kill9_resume_matches_an_uninterrupted_run(tmp_path, demo_tokenizer_dir):
    import torch

    ref_dir, run_dir = tmp_path / "ref", tmp_path / "killed"
    ref_log, run_log = tmp_path / "ref.log", tmp_path / "killed.log"
    reference = start(write_recipe(tmp_path, demo_tokenizer_dir, ref_dir), ref_log)  # alongside, on the other core
    recipe = write_recipe(tmp_path, demo_tokenizer_dir, run_dir)
    proc = start(recipe, run_log)
    # Right after checkpoint-4 is complete, outside any checkpoint write (a torn checkpoint is the atomic
    # checkpoint writer's case, not this test's): in the middle of the first pass (6 steps each), ranked one
    # generation batch at a time (`ordering_window: 1`), with the next batch's samples waiting in the rollout
    # cache and the last one's queries not sampled yet, and before the second pass, which is ranked from the
    # rollout estimates the checkpoint restores.
    target = 4
    done = run_dir / "grpo" / "checkpoints" / f"checkpoint-{target}" / "trainer_state.json"
    deadline = time.monotonic() + 600
    while not done.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    while any(not (c / "trainer_state.json").is_file() for c in done.parent.parent.glob("checkpoint-*")):
        time.sleep(0.005)
    assert proc.poll() is None, "the run finished before it could be killed:\n" + run_log.read_text()[-2000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "grpo" / "final").exists()
    saved = json.loads((done.parent / "ordering_state.json").read_text())
    assert saved["rollout_cache"]["groups"] and saved["latest"] and saved["unscored"]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["stages"]["grpo"]["status"] == "running"  # killed: nothing marked it

    finish(start(recipe, run_log), run_log)
    finish(reference, ref_log)
    text = run_log.read_text()
    assert "resuming" in text and "ordering restored from" in text, text[-3000:]
    assert "ordering round 0 (initial)" not in text.split("ordering restored from")[1]
    entry = json.loads((run_dir / "manifest.json").read_text())["stages"]["grpo"]
    assert entry["status"] == "completed" and entry["resumed_from"].endswith(f"checkpoint-{target}")
    assert entry["metrics"]["train_steps"] == 14

    ref_order = consumed(ref_dir, 14)
    rounds = json.loads((ref_dir / "grpo" / "ordering.json").read_text())["rounds"]
    assert {r["reason"] for r in rounds} >= {"initial", "every_steps"}  # re-ranked while training
    assert consumed(run_dir, 14) == ref_order
    ref, got = final_weights(ref_dir), final_weights(run_dir)
    assert ref.keys() == got.keys()
    differing = [k for k in ref if not torch.equal(ref[k], got[k])]
    assert not differing, f"{len(differing)} tensors differ from the uninterrupted run, e.g. {differing[:3]}"
