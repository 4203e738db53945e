"""The trainer consumes queries in exactly the saved order, through TRL's generation/iteration repetition;
the rewards (reward model, verifiers) and the default query set."""

from __future__ import annotations

import json

import pytest
import torch

from grpo.ordering import consumed_order
from grpo.queries import load_queries
from grpo.rewards import RewardModelReward, VerifierReward
from grpo.stage import make_trainer
from qwen_align.model import load_model
from qwen_align.recipe import validate_recipe
from qwen_align.stage import StageContext


def _recipe(tmp_path, data_path, **grpo):
    raw = {"model": "tiny", "run_dir": str(tmp_path / "run"), "stages": [{
        "name": "grpo", "kind": "grpo", "data": {"sources": [{"path": str(data_path)}]},
        "rewards": [{"kind": "verifier", "name": "noisy"}, {"kind": "verifier", "name": "recorder"}],
        "max_completion_length": 3, "learning_rate": 1e-4, "logging_steps": 100, "save_steps": 1000,
        "dtype": "float32", **grpo}]}
    return validate_recipe(raw, "recipe.yaml")


@pytest.mark.parametrize("layout", [
    # 4 queries x 2 per generation batch; steps_per_generation = accumulation = 2, each batch used twice
    {"per_device_train_batch_size": 4, "num_iterations": 2, "reorder_every_steps": 2},
    # 4 queries x 2 per generation batch, spread over 4 micro-batches (2 optimizer steps)
    {"per_device_train_batch_size": 2, "steps_per_generation": 4, "low_variance_policy": "rescore"},
])
def test_trainer_consumes_the_saved_order(tmp_path, demo_tokenizer, layout):
    torch.manual_seed(0)
    data = tmp_path / "q.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"What is {i}+1?"}]}) + "\n"
                            for i in range(12)))
    recipe = _recipe(tmp_path, data, num_generations=2, gradient_accumulation_steps=2, max_steps=8, **layout)
    stage = recipe.stage("grpo")
    context = StageContext(recipe, tmp_path / "run" / "grpo", "tiny", None, tmp_path / "metrics.jsonl")
    queries, _ = load_queries(stage, context)
    seen = []

    def noisy(prompts, completions, query_id, **_):
        # A group's samples sit together and alternate 0, q: variance q^2/4 grows with the id; multiples of 3
        # always score 1 (no variance).
        return [(q * (i % 2)) if q % 3 else 1.0 for i, q in enumerate(query_id)]

    def recorder(prompts, completions, query_id, **kw):
        if "trainer_state" in kw:  # a training generation (the ordering pass passes no trainer state)
            seen.append(list(query_id))
        return [0.0] * len(prompts)

    policy = load_model("tiny", "policy", tokenizer=demo_tokenizer, seed=0)
    trainer, schedule = make_trainer(stage, context, policy, demo_tokenizer, queries, [noisy, recorder])
    schedule.initial_round()
    trainer.train()

    artifact = json.loads((context.stage_dir / "ordering.json").read_text())
    generations = len(seen)
    pass_length = schedule.num_chunks * schedule.queries_per_chunk
    passes = -(-generations * schedule.queries_per_chunk // pass_length)
    got = []
    for call in seen:
        assert call[::2] == call[1::2]  # each query's num_generations samples sit together
        got += call[::2]
    assert got == consumed_order(artifact, pass_length, passes)[: len(got)]
    # Highest variance first, the never-varying queries (0, 3, 6, 9) last in the initial ranking.
    initial = [e["query_id"] for e in artifact["rounds"][0]["queries"]]
    assert initial == [11, 10, 8, 7, 5, 4, 2, 1, 0, 3, 6, 9]
    assert got[:4] == [11, 10, 8, 7]
    assert generations == 8 * 2 // (trainer.args.steps_per_generation * trainer.num_iterations)
    reasons = {r["reason"] for r in artifact["rounds"]}
    assert reasons == ({"initial", "every_steps"} if "reorder_every_steps" in layout else {"initial", "rescore"})


def test_rewards(demo_tokenizer):
    rm = load_model("tiny", "reward", tokenizer=demo_tokenizer, seed=0)
    reward = RewardModelReward(rm, demo_tokenizer, name="rm", batch_size=2)
    prompt = [{"role": "user", "content": "What is 2+2?"}]
    scores = reward([prompt] * 3, [[{"role": "assistant", "content": t}] for t in ("4", "5", "4")])
    assert len(scores) == 3 and scores[0] == pytest.approx(scores[2], abs=1e-5) and scores[0] != scores[1]
    verifier = VerifierReward()
    rows = [json.dumps({"verifier": "exact", "answer": "4"}), ""]
    out = verifier([prompt] * 2, [[{"role": "assistant", "content": "4"}]] * 2, verifier_row=rows)
    assert out == [1.0, None]


def test_default_queries_are_the_reward_model_prompts(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    row = {"prompt": [{"role": "user", "content": "What is 2+2?"}], "chosen": [{"role": "assistant", "content": "4"}],
           "rejected": [{"role": "assistant", "content": "5"}], "verifier": "exact", "answer": "4"}
    other = {"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
             "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Go"}]}
    pairs.write_text("".join(json.dumps(r) + "\n" for r in (row, row, other)))
    raw = {"model": "tiny", "run_dir": str(tmp_path / "run"), "stages": [
        {"name": "rm", "kind": "reward_model", "data": {"sources": [{"path": str(pairs)}]}},
        {"name": "grpo", "kind": "grpo"}]}
    recipe = validate_recipe(raw, "recipe.yaml")
    context = StageContext(recipe, tmp_path / "run" / "grpo", "tiny", None, tmp_path / "m.jsonl")
    queries, report = load_queries(recipe.stage("grpo"), context)
    assert report["queries"] == 2 and report["queries_with_verifier"] == 1 and "stage rm" in report["query_source"]
    by_prompt = {q["prompt"][-1]["content"]: q for q in queries}
    assert json.loads(by_prompt["What is 2+2?"]["verifier_row"]) == {"answer": "4", "verifier": "exact"}
    assert by_prompt["Hi"]["verifier_row"] == ""
