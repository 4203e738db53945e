"""Rejection sampling as real processes: 2 ranks (torchrun, gloo) and kill -9, each against one uninterrupted run.

Every run here is a subprocess with one thread per process, so the 1-process reference and the runs it is
compared with do the same floating-point work; the pairs must then be the same bytes.
"""

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
from helpers import write_jsonl
from test_rejection_sampling import digit_queries, rs_stage, save_digit_policy

REPO = Path(__file__).resolve().parents[1]
CHUNKS = 12  # one query per chunk: many commits, so a kill lands between two of them
CLI = ["-m", "qwen_align.cli", "run"]
TWO_PROCESSES = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return env


@pytest.fixture(scope="module")
def setup(tmp_path_factory, demo_tokenizer):
    root = tmp_path_factory.mktemp("rs_procs")
    policy = save_digit_policy(root / "policy", demo_tokenizer)
    prompts = write_jsonl(root / "prompts.jsonl", digit_queries(CHUNKS))

    def recipe(name: str) -> Path:
        raw = {"model": str(policy), "run_dir": str(root / name), "seed": 5,
               "stages": [rs_stage(prompts, chunk_size=1)]}
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
        return path

    reference = run(recipe("reference"))
    assert reference.returncode == 0, reference.stderr[-3000:]
    return recipe, root / "reference" / "rs" / "final"


def run(recipe: Path, *launcher: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *launcher, *CLI, str(recipe)], env=_env(), cwd=recipe.parent,
                          capture_output=True, text=True, timeout=300)


def shards(final: Path) -> dict[str, bytes]:
    return {f"{sub}/{f.name}": f.read_bytes() for sub in ("pairs", "sft") for f in sorted((final / sub).glob("*.jsonl"))}


def assert_same_output(final: Path, reference: Path) -> None:
    got, want = shards(final), shards(reference)
    assert len(want) == 2 * CHUNKS and sum(b.count(b"\n") for k, b in want.items() if k.startswith("pairs")) > 0
    assert got == want


def work_folder(recipe: Path) -> Path:
    return recipe.parent / recipe.stem / "rs" / "checkpoints" / "rejection_sampling"


def test_two_processes_give_the_same_pairs_as_one(setup):
    recipe, reference = setup
    path = recipe("two")
    done = run(path, *TWO_PROCESSES)
    assert done.returncode == 0, done.stderr[-3000:]
    final = path.parent / "two" / "rs" / "final"
    assert_same_output(final, reference)
    stats = json.loads((final / "stats.json").read_text())
    assert stats["processes"] == 2 and stats["chunks"] == CHUNKS and stats["queries"] == CHUNKS
    assert stats["pairs"] == json.loads((reference / "stats.json").read_text())["pairs"]
    # The main rank logs the chunks it sampled: its round-robin share, not every chunk.
    logged = [json.loads(line) for line in (path.parent / "two" / "metrics.jsonl").read_text().splitlines()]
    assert sorted(r["chunk"] for r in logged if "chunk" in r) == list(range(0, CHUNKS, 2))
    assert not work_folder(path).exists()


def _start(recipe: Path) -> subprocess.Popen:
    with open(recipe.with_suffix(".log"), "w") as log:  # a file, not a pipe: a full pipe would stall the child
        return subprocess.Popen([sys.executable, *CLI, str(recipe)], env=_env(), cwd=recipe.parent, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _markers(recipe: Path) -> int:
    done = work_folder(recipe) / "done"
    return len(list(done.glob("*.json"))) if done.is_dir() else 0


def _rerun_resumes(path: Path, reference: Path, finished: int, *launcher: str) -> None:
    again = run(path, *launcher)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming: {finished} of {CHUNKS} chunks already done" in again.stdout
    stats = json.loads((path.parent / path.stem / "rs" / "final" / "stats.json").read_text())
    assert stats["chunks_resumed"] == finished
    assert_same_output(path.parent / path.stem / "rs" / "final", reference)
    assert not work_folder(path).exists()


def test_kill_9_at_a_random_moment_then_the_rerun_resumes(setup):
    recipe, reference = setup
    rng = random.Random(1234)
    after, pause = rng.randint(1, 4), rng.uniform(0.0, 0.02)
    path = recipe("killed")
    proc = _start(path)
    deadline = time.monotonic() + 240
    while _markers(path) < after and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    time.sleep(pause)
    assert proc.poll() is None, f"the run ended before the kill (rc {proc.returncode}), see {path.with_suffix('.log')}"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    finished = _markers(path)
    assert after <= finished < CHUNKS and not (path.parent / "killed" / "rs" / "final").exists()
    _rerun_resumes(path, reference, finished)


# Run in the child: kill -9 the whole process group at the moment chunk 3's pairs shard is complete in its
# temporary file but not yet renamed into place.
KILL_MID_WRITE = """
import os, signal, sys
real_replace = os.replace
def replace(src, dst, *a, **k):
    if str(dst).endswith(os.path.join("pairs", "part-00003.jsonl")):
        os.killpg(os.getpgid(0), signal.SIGKILL)
    return real_replace(src, dst, *a, **k)
os.replace = replace
from qwen_align.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_kill_9_while_a_shard_is_written_then_two_processes_resume(setup):
    recipe, reference = setup
    path = recipe("torn")
    proc = subprocess.run([sys.executable, "-c", KILL_MID_WRITE, "run", str(path)], env=_env(), cwd=path.parent,
                          capture_output=True, text=True, timeout=300, start_new_session=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    pairs = work_folder(path) / "pairs"
    torn = list(pairs.glob(".part-00003.jsonl.*.tmp"))
    assert len(torn) == 1 and not (pairs / "part-00003.jsonl").exists()  # killed inside the write
    assert _markers(path) == 3
    _rerun_resumes(path, reference, 3, *TWO_PROCESSES)  # the work of one process, finished by two


# ---------------------------------------------------------------- placement, without launching


def test_the_sampler_goes_to_this_ranks_device(monkeypatch, demo_tokenizer):
    from qwen_align import distributed, generation
    from qwen_align.model import load_model

    monkeypatch.setattr(distributed, "device", lambda: torch.device("meta"))  # stands in for cuda:LOCAL_RANK
    sampler = generation.make_sampler("transformers", "tiny", demo_tokenizer,
                                      lambda: load_model("tiny", tokenizer=demo_tokenizer))
    assert sampler.model.device.type == "meta"


def test_vllm_under_several_processes_runs_one_engine_per_process(monkeypatch):
    from qwen_align.errors import UserError
    from qwen_align.generation import _vllm_launch_options

    assert _vllm_launch_options(2) == {}  # one process: vLLM may split the model itself
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert _vllm_launch_options(1) == {"distributed_executor_backend": "external_launcher"}
    with pytest.raises(UserError, match="tensor_parallel_size 2 under 2 processes"):
        _vllm_launch_options(2)
