"""Every row of every input a stage reads is checked before any compute: a malformed row at the *end* of a
file stops the stage with its file:line before a model is loaded or a checkpoint written."""

from __future__ import annotations

import importlib

import pytest
from helpers import arithmetic_rows, write_jsonl

from qwen_align.errors import DataError
from qwen_align.recipe import validate_recipe
from qwen_align.runner import run_recipe

USER = [{"role": "user", "content": "What is 2+2?"}]
PAIR = {"prompt": USER, "chosen": [{"role": "assistant", "content": "4"}],
        "rejected": [{"role": "assistant", "content": "5"}]}
QUERY = {"messages": USER, "verifier": "exact", "answer": "4"}
HELDOUT = {"messages": USER, "verifier": "exact", "answer": "4"}


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model fails the test: the error must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad row was found")

    # Import first: a module imported while the patch is on would keep `refuse` after the test.
    modules = [importlib.import_module(m) for m in ("dpo.stage", "grpo.stage", "reward_model.stage",
                                                     "dpo.rejection_sampling.review", "qwen_align.model")]
    for module in modules:
        if hasattr(module, "load_model"):  # stages that load through StageContext reach qwen_align.model's
            monkeypatch.setattr(module, "load_model", refuse)


def _run(tmp_path, demo_tokenizer_dir, stage: dict):
    raw = {"model": "tiny", "tokenizer": str(demo_tokenizer_dir), "run_dir": str(tmp_path / "run"), "seed": 0,
           "stages": [{"name": "s", "max_steps": 1, "dtype": "float32", **stage}]}
    recipe = validate_recipe(raw, str(tmp_path / "recipe.yaml"))
    with pytest.raises(DataError) as err:
        run_recipe(recipe)
    assert not (tmp_path / "run" / "s" / "checkpoints").exists()
    assert not (tmp_path / "run" / "s" / "final").exists()
    return str(err.value)


def _data(path):
    return {"sources": [{"path": str(path)}]}


# (stage options, which file gets the bad row, the good row, the bad row, what the message says)
CASES = {
    "sft conversations": ({"kind": "sft"}, "data", arithmetic_rows(1)[0],
                          {"messages": [{"role": "robot", "content": "hi"}]}, "role is 'robot'"),
    "dpo pairs": ({"kind": "dpo"}, "data", PAIR, {**PAIR, "rejected": None}, "rejected"),
    "dpo eval_data": ({"kind": "dpo"}, "eval_data", PAIR, {"prompt": USER, "chosen": PAIR["chosen"]},
                      "missing 'rejected'"),
    "reward_model pairs": ({"kind": "reward_model"}, "data", PAIR, {**PAIR, "chosen": "text"}, "both be text"),
    "reward_model eval_data": ({"kind": "reward_model"}, "eval_data", PAIR, {"chosen": [], "rejected": []},
                               "non-empty"),
    "grpo unknown verifier": ({"kind": "grpo", "rewards": [{"kind": "verifier"}], "num_generations": 2,
                               "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1},
                              "data", QUERY, {**QUERY, "verifier": "maths"}, "unknown verifier 'maths'"),
    "grpo missing answer": ({"kind": "grpo", "rewards": [{"kind": "verifier"}], "num_generations": 2,
                             "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1},
                            "data", QUERY, {"messages": USER, "verifier": "math"}, "needs the field(s) 'answer'"),
    "rejection_sampling bad regex": ({"kind": "rejection_sampling"}, "data", QUERY,
                                     {"messages": USER, "verifier": "regex", "pattern": "(unclosed"},
                                     "bad pattern"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_last_row_stops_before_compute(tmp_path, demo_tokenizer_dir, no_model, case):
    options, key, good, bad, says = CASES[case]
    path = write_jsonl(tmp_path / f"{key}.jsonl", [good] * 5 + [bad])
    stage = {**options, "data": _data(path)}
    if key != "data":
        stage["data"] = _data(write_jsonl(tmp_path / "train.jsonl", [good] * 5))
        stage[key] = _data(path)
    message = _run(tmp_path, demo_tokenizer_dir, stage)
    assert message.startswith(f"{path}:6: ") and says in message, message


def test_grpo_default_queries_check_the_reward_model_rows(tmp_path, demo_tokenizer_dir, no_model):
    """GRPO without `data` reads the reward model stage's pairs: their verifier fields are checked too."""
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{**PAIR, "verifier": "exact", "answer": "4"}] * 3
                        + [{**PAIR, "verifier": "exact"}])
    raw = {"model": "tiny", "tokenizer": str(demo_tokenizer_dir), "run_dir": str(tmp_path / "run"), "stages": [
        {"name": "rm", "kind": "reward_model", "data": _data(pairs)},
        {"name": "s", "kind": "grpo", "rewards": [{"kind": "verifier"}], "num_generations": 2,
         "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1, "max_steps": 1}]}
    recipe = validate_recipe(raw, str(tmp_path / "recipe.yaml"))
    with pytest.raises(DataError, match=rf"^{pairs}:4: verifier 'exact' needs the field\(s\) 'answer'"):
        run_recipe(recipe, only=["s"])


@pytest.mark.parametrize("kind", ["sft", "dpo", "reward_model", "grpo", "rejection_sampling"])
def test_bad_task_eval_row_fails_at_stage_start(tmp_path, demo_tokenizer_dir, no_model, kind):
    """A held-out row its verifier cannot check fails before training, not after it."""
    good = {"sft": arithmetic_rows(1)[0], "dpo": PAIR, "reward_model": PAIR}.get(kind, QUERY)
    heldout = write_jsonl(tmp_path / "heldout.jsonl", [HELDOUT] * 3 + [{"messages": USER, "verifier": "code"}])
    stage = {"kind": kind, "data": _data(write_jsonl(tmp_path / "train.jsonl", [good] * 4)),
             "task_eval": {"path": str(heldout), "limit": 2}}  # the limit picks rows; every row is still checked
    if kind == "grpo":
        stage.update(rewards=[{"kind": "verifier"}], num_generations=2, per_device_train_batch_size=2,
                     gradient_accumulation_steps=1)
    message = _run(tmp_path, demo_tokenizer_dir, stage)
    assert message.startswith(f"{heldout}:4: verifier 'code' needs the field(s) 'tests'"), message


def test_grpo_skip_counts_rows_its_verifier_cannot_check(tmp_path):
    from grpo.queries import load_queries
    from qwen_align.stage import StageContext

    path = write_jsonl(tmp_path / "q.jsonl", [QUERY, {**QUERY, "verifier": "nope"},
                                                    {"messages": [{"role": "user", "content": "Hi"}]}])
    raw = {"model": "tiny", "run_dir": str(tmp_path / "run"), "stages": [
        {"name": "g", "kind": "grpo", "data": {**_data(path), "on_bad_rows": "skip"},
         "rewards": [{"kind": "verifier"}], "num_generations": 2, "per_device_train_batch_size": 2,
         "gradient_accumulation_steps": 1}]}
    recipe = validate_recipe(raw, "recipe.yaml")
    context = StageContext(recipe, tmp_path / "run" / "g", "tiny", None, tmp_path / "m.jsonl")
    queries, report = load_queries(recipe.stage("g"), context)
    assert report["bad_rows_skipped"] == 1 and len(queries) == 2  # a row without a verifier is a plain prompt
    assert report["bad_row_examples"][0].startswith(f"{path}:2: unknown verifier 'nope'")
