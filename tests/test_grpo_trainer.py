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
        "rewards": [{"kind": "verifier", "name": "noisy"}, {"kind": "verifier", "name": "zero"}],
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

    def zero(prompts, completions, **_):
        return [0.0] * len(prompts)

    policy = load_model("tiny", "policy", tokenizer=demo_tokenizer, seed=0)
    trainer, schedule = make_trainer(stage, context, policy, demo_tokenizer, queries, [noisy, zero])
    score = trainer._generate_and_score_completions

    def recording(inputs):  # each training generation batch, served from the cache or generated
        seen.append([x["query_id"] for x in inputs])
        return score(inputs)

    trainer._generate_and_score_completions = recording
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
    assert reasons == ({"initial", "every_steps", "epoch"} if "reorder_every_steps" in layout
                       else {"initial", "rescore", "epoch"})


def _texts_reward(prompts, completions, **_):
    """A reward of the sampled text itself (0, 1 or 2), so each query's variance is that of its samples."""
    return [float(sum(map(ord, c[0]["content"])) % 3) for c in completions]


@pytest.mark.parametrize("window", [None, 1])
def test_ordering_costs_no_rollout_training_does_not_use(tmp_path, demo_tokenizer, window):
    """Two passes over 12 queries (4 per step): the first pass trains on exactly the ordering rounds' samples
    (sampled all before training, or window by window as training reaches them) and the trainer generates
    nothing itself; after it nothing is sampled for ordering; the ordering artifact's variances are those of the
    rollouts training generated; the cached samples' log-probs are those of the sampling policy."""
    from grpo.stage import ordering_metrics

    torch.manual_seed(0)
    data = tmp_path / "q.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Name {i}."}]}) + "\n"
                            for i in range(12)))
    recipe = _recipe(tmp_path, data, num_generations=2, gradient_accumulation_steps=2, per_device_train_batch_size=4,
                     max_steps=6, max_completion_length=4, reorder_every_steps=1, temperature=1.5, ordering_window=window,
                     rewards=[{"kind": "verifier", "name": "texts"}])
    stage = recipe.stage("grpo")
    context = StageContext(recipe, tmp_path / "run" / "grpo", "tiny", None, tmp_path / "metrics.jsonl")
    queries, _ = load_queries(stage, context)
    trained = []  # per training generation batch: step, query ids, completion ids, rewards, advantages

    policy = load_model("tiny", "policy", tokenizer=demo_tokenizer, seed=0)
    generate_calls = []
    original_generate = policy.generate
    policy.generate = lambda *a, **k: generate_calls.append(len(trained)) or original_generate(*a, **k)
    _texts_reward.__name__ = "texts"
    trainer, schedule = make_trainer(stage, context, policy, demo_tokenizer, queries, [_texts_reward])
    cached, ordering = {}, []  # every group an ordering round put in the cache; generate() calls of the rounds
    put, scorer = trainer.rollout_cache.put, schedule.scorer
    trainer.rollout_cache.put = lambda q, group: cached.setdefault(q, group) and put(q, group)

    def scoring(ids):
        before = len(generate_calls)
        out = scorer(ids)
        ordering.extend(range(before, len(generate_calls)))
        return out

    schedule.scorer = scoring
    schedule.initial_round()
    first_logps_gap = []
    original_score = trainer._generate_and_score_completions

    def checking(inputs):
        step = trainer.state.global_step
        sampled = [schedule.latest.get(q, {}) for q in set(x["query_id"] for x in inputs)]
        out = original_score(inputs)
        completions = [row[m.bool()].tolist() for row, m in zip(out["completion_ids"], out["completion_mask"])]
        texts = demo_tokenizer.batch_decode(completions, skip_special_tokens=True)
        trained.append({"step": step, "query_id": [x["query_id"] for x in inputs], "completion_ids": completions,
                        "rewards": _texts_reward(None, [[{"content": t}] for t in texts]),
                        "advantages": out["advantages"].tolist()})
        if all(e.get("source") == "ordering_pass" and e["step"] == step for e in sampled):
            # served from the cache, and the policy is still the one that sampled it
            ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
            mask = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
            with torch.no_grad():
                now, _, _ = trainer._get_per_token_logps_and_entropies(
                    trainer.model, ids, mask, out["completion_ids"].size(1))
            m = out["completion_mask"].bool()
            first_logps_gap.append((now[m] - out["old_per_token_logps"][m]).abs().max().item())
        return out

    trainer._generate_and_score_completions = checking
    trainer.train()

    assert len(trained) == 6 and ordering
    # (b) the trainer's own generate() calls: only after the first pass (3 batches), none for ordering after it
    assert [n for i, n in enumerate(generate_calls) if i not in set(ordering)] == [3, 4, 5]
    assert max(generate_calls[i] for i in ordering) < 3 and len(cached) == 12
    # (c) the first pass trains on the ordering rounds' samples, each query's in order, with the rewards they were
    # given when sampled (not scored again: the advantages are those of the cached rewards)
    for batch in trained[:3]:
        for i in range(0, 8, 2):
            q = batch["query_id"][i]
            assert batch["completion_ids"][i : i + 2] == [x.completion_ids for x in cached[q]]
            assert batch["rewards"][i : i + 2] == [x.rewards[0] for x in cached[q]]
            r = batch["rewards"][i : i + 2]
            assert batch["advantages"][i : i + 2] == pytest.approx([r[0] - sum(r) / 2, r[1] - sum(r) / 2], abs=1e-6) \
                or max(abs(a) for a in batch["advantages"][i : i + 2]) > 0
    assert first_logps_gap and max(first_logps_gap) < 1e-4
    # (a) every score in the artifact is the variance of the rewards its rollouts got
    artifact = json.loads((context.stage_dir / "ordering.json").read_text())
    measured = {}
    for batch in trained:
        for i in range(0, 8, 2):
            r = batch["rewards"][i : i + 2]
            measured[(batch["query_id"][i], batch["step"])] = ((r[0] - r[1]) / 2) ** 2
    sampled_rounds = [r for r in artifact["rounds"] if r["source"] == "ordering_pass"]
    assert [r["reason"] for r in sampled_rounds] == ["initial"] + ["window"] * (2 if window else 0)
    initial = {e["query_id"]: e["variance"] for r in sampled_rounds for e in r["queries"]}
    first_pass = {q: v for (q, step), v in measured.items() if step < 3}
    assert initial == pytest.approx(first_pass) and len(set(initial.values())) > 1
    later_rounds = artifact["rounds"][len(sampled_rounds):]
    later = [e for r in later_rounds for e in r["queries"] if e["source"] == "rollouts"]
    assert later and all(r["source"] == "rollouts" for r in later_rounds)
    for e in later:
        assert e["variance"] == pytest.approx(measured[(e["query_id"], e["step"])])
    assert ordering_metrics(schedule, trainer, 1.0, "")["rollouts_for_ordering_only"] == 0


@pytest.mark.parametrize("skip", [True, False])
def test_a_step_without_gradient_leaves_the_weights_alone(tmp_path, demo_tokenizer, skip):
    """Step 1's rewards vary; from step 2 on every group scores alike (zero advantages, zero gradient). With
    `skip_steps_without_gradient` the weights after the run are those after step 1; without, AdamW's momentum
    keeps moving them (TRL's behaviour, the reason for the option)."""
    from transformers import TrainerCallback

    torch.manual_seed(0)
    data = tmp_path / "q.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Name {i}."}]}) + "\n"
                            for i in range(8)))
    recipe = _recipe(tmp_path, data, num_generations=2, per_device_train_batch_size=4, gradient_accumulation_steps=1,
                     max_steps=4, order_by_reward_variance=False, skip_steps_without_gradient=skip, learning_rate=1e-2,
                     rewards=[{"kind": "verifier", "name": "first_step_only"}])
    stage = recipe.stage("grpo")
    context = StageContext(recipe, tmp_path / "run" / "grpo", "tiny", None, tmp_path / "metrics.jsonl")
    queries, _ = load_queries(stage, context)
    calls = []

    def first_step_only(prompts, completions, **_):
        calls.append(len(prompts))
        return [float(i % 2) if len(calls) == 1 else 1.0 for i in range(len(prompts))]

    class Snapshot(TrainerCallback):
        after = {}

        def on_step_end(self, args, state, control, model=None, **kw):
            self.after[state.global_step] = {k: v.detach().clone() for k, v in model.state_dict().items()}

    policy = load_model("tiny", "policy", tokenizer=demo_tokenizer, seed=0)
    start = {k: v.detach().clone() for k, v in policy.state_dict().items()}
    trainer, _ = make_trainer(stage, context, policy, demo_tokenizer, queries, [first_step_only], callbacks=[Snapshot()])
    trainer.train()

    def moved(a, b):
        return max((a[k] - b[k]).abs().max().item() for k in a)

    assert len(calls) == 4 and moved(Snapshot.after[1], start) > 0  # step 1 learned something
    if skip:
        assert trainer.step_skipper.skipped == 3
        assert moved(Snapshot.after[4], Snapshot.after[1]) == 0
    else:
        assert trainer.step_skipper is None
        assert moved(Snapshot.after[4], Snapshot.after[1]) > 0


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
