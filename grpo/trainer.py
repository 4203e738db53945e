"""TRL's GRPOTrainer with the queries in reward-variance order, a per-query variance estimate from the training
rollouts, the ordering pass's samples trained on, and the scorer that ranks the queries."""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from typing import NamedTuple

import torch
from accelerate.utils import gather
from transformers import TrainerCallback
from trl import GRPOTrainer
from trl.trainer.utils import pad

from qwen_align import distributed
from qwen_align.checkpoints.resume import AtomicCheckpoints
from qwen_align.fsutil import atomic_write_json

from .ordering import OrderingSchedule, QueryScore, score_of
from .rewards import combined
from .sampler import OrderedRepeatSampler

ORDERING_STATE_FILE = "ordering_state.json"


class CachedSample(NamedTuple):
    """One response an ordering round sampled: its token ids, the sampling policy's per-token log-probs, and its
    reward from each of the stage's reward functions (NaN where one does not apply; None: not kept)."""

    completion_ids: list[int]
    logps: list[float]
    rewards: list[float] | None = None


class RolloutCache:
    """Responses an ordering round sampled, per query, waiting for the trainer to reach the query: one group of
    `num_generations` `CachedSample`s each. Their rewards were computed when they were sampled, with the very
    reward functions training uses, so a served batch is not scored again.

    A generation batch is served from the cache only when every query in it has a cached group (the same
    decision on every rank: all ranks hold the same cache and see the same query ids); otherwise the batch is
    generated as usual. Either way a query's group leaves the cache once the query is trained on.
    """

    def __init__(self):
        self.groups: dict[int, list[CachedSample]] = {}
        self.generated = 0  # samples put in by ordering rounds
        self.trained = 0  # samples the trainer trained on

    def put(self, query_id: int, group: list[CachedSample]) -> None:
        self.groups[query_id] = group
        self.generated += len(group)

    def has(self, query_id: int) -> bool:
        return query_id in self.groups

    def take(self, batch_ids: list[int], first: int, count: int) -> list[CachedSample] | None:
        """The samples for rows `first : first + count` of a generation batch whose rows (all ranks, in order)
        are `batch_ids` -- the j-th row of a query gets its group's j-th sample -- or None (not all cached)."""
        needed: dict[int, int] = {}
        for q in batch_ids:
            needed[q] = needed.get(q, 0) + 1
        servable = all(len(self.groups.get(q, ())) >= n for q, n in needed.items())
        rows, seen = [], {}
        for q in batch_ids:
            j = seen.get(q, 0)
            seen[q] = j + 1
            rows.append(self.groups[q][j] if servable else None)
        for q in needed:
            self.groups.pop(q, None)
        if not servable:
            return None
        self.trained += len(batch_ids)
        return rows[first : first + count]

    def keep_only(self, query_ids) -> None:
        """Forget the samples of queries training will not use (dropped by the low-variance policy)."""
        keep = set(query_ids)
        self.groups = {q: g for q, g in self.groups.items() if q in keep}

    @property
    def ordering_only(self) -> int:
        """Samples drawn for ordering that no training step used (so far)."""
        return self.generated - self.trained

    def state_dict(self) -> dict:
        return {"generated": self.generated, "trained": self.trained,
                "groups": [{"query_id": q, "completion_ids": [x.completion_ids for x in g],
                            "logps": [x.logps for x in g], "rewards": [x.rewards for x in g]}
                           for q, g in sorted(self.groups.items())]}

    def load_state_dict(self, state: dict) -> None:
        self.generated, self.trained = state["generated"], state["trained"]
        self.groups = {
            e["query_id"]: [CachedSample(c, lp, r) for c, lp, r in
                            zip(e["completion_ids"], e["logps"], e.get("rewards") or [None] * len(e["logps"]))]
            for e in state["groups"]
        }


class OrderedGRPOTrainer(AtomicCheckpoints, GRPOTrainer):
    """`schedule` set: the train sampler follows it (no shuffle); None: TRL's shuffled RepeatSampler.

    Every training generation batch's rewards feed `schedule.observe` (per query: the variance of its
    num_generations rewards, gathered over all ranks, at this step). With `rollout_cache`, a generation batch
    whose queries an ordering round already sampled trains on those samples instead of generating, with the
    sampling policy's per-token log-probs as `old_per_token_logps`: TRL's clipped importance ratio (its
    mechanism for steps_per_generation > 1) then corrects for the samples being older than the policy.

    Each trainer checkpoint holds the schedule's and the cache's state (`ordering_state.json`), written while the
    checkpoint is written, so a resumed run consumes the queries in the order the interrupted one would have.
    """

    def __init__(self, *args, schedule: OrderingSchedule | None = None, rollout_cache: RolloutCache | None = None,
                 **kwargs):
        self.schedule = schedule
        self.rollout_cache = rollout_cache
        self._batch_query_ids: list[int] | None = None  # this generation batch's rows over all ranks
        self._served: list | None = None  # this rank's rows taken from the cache
        super().__init__(*args, **kwargs)

    def _get_train_sampler(self, dataset=None):
        if self.schedule is None:
            return super()._get_train_sampler(dataset)
        return OrderedRepeatSampler(
            self.schedule,
            mini_repeat_count=self.num_generations,
            repeat_count=self.num_iterations * self.args.steps_per_generation,
        )

    def _generate_and_score_completions(self, inputs):
        if self.schedule is None or not self.model.training:
            return super()._generate_and_score_completions(inputs)
        local = [x["query_id"] for x in inputs]
        self._batch_query_ids = [q for part in distributed.gather_objects(local) for q in part]
        if self.rollout_cache is not None:
            self._served = self.rollout_cache.take(self._batch_query_ids, self.accelerator.process_index * len(local),
                                                   len(local))
        try:
            output = super()._generate_and_score_completions(inputs)
            if self._served is not None:
                logps = pad([torch.tensor(x.logps, dtype=torch.float32) for x in self._served], padding_value=0.0,
                            padding_side="right")
                width = output["completion_ids"].size(1)
                logps = torch.nn.functional.pad(logps, (0, width - logps.size(1)))[:, :width]
                output["old_per_token_logps"] = logps.to(output["completion_ids"].device)
        finally:
            self._batch_query_ids, self._served = None, None
        return output

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        if self._served is None:
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields, num_generations,
                                                 has_tool_images)
        if len(self._served) != len(prompt_ids):
            raise RuntimeError(f"rollout cache: {len(self._served)} cached rows for {len(prompt_ids)} prompts")
        return [list(x.completion_ids) for x in self._served], None

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        served = self._served
        if served is not None and all(x.rewards is not None for x in served):
            # Scored when sampled, by the same reward functions: gathered as TRL gathers its own.
            local = torch.tensor([x.rewards for x in served], dtype=torch.float32, device=self.accelerator.device)
            rewards_per_func = gather(local)
        else:
            rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        ids = self._batch_query_ids
        if ids is not None:  # a training generation batch: rows of every rank, groups of num_generations
            per_func = rewards_per_func.cpu().T.tolist()
            total = combined(per_func, self.reward_weights.tolist())
            g = self.num_generations
            scores = [score_of(ids[i], total[i : i + g]) for i in range(0, len(ids), g)]
            self.schedule.observe(scores, step=self.state.global_step, samples=g)
        return rewards_per_func

    def _save_rng_state(self, output_dir: str) -> None:
        super()._save_rng_state(output_dir)
        if self.schedule is not None and self.args.should_save:
            state = self.schedule.state_dict()
            if self.rollout_cache is not None:
                state["rollout_cache"] = self.rollout_cache.state_dict()
            atomic_write_json(os.path.join(output_dir, ORDERING_STATE_FILE), state)


class SkipStepsWithoutGradient(TrainerCallback):
    """Leaves weights and optimizer state alone on a step whose gradient is exactly zero.

    With β = 0, a step whose every group scored its samples alike has all-zero advantages and so a zero
    gradient; AdamW would still move the weights along its momentum (and decay them). Ordering makes such steps
    common where many queries are flat (they are ranked together), and they measurably hurt (docs/grpo.md).
    Clearing the gradients makes torch's optimizers skip every parameter. Single process and DDP only: there
    every rank holds the same reduced gradient; under FSDP2 / ZeRO-3 a rank sees only its shard, so it is off.
    """

    def __init__(self):
        self.skipped = 0
        self.enabled: bool | None = None

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, model=None, **kwargs):
        if self.enabled is None:
            from qwen_align.stage import holds_shards

            self.enabled = model is not None and not holds_shards(model) and not getattr(args, "deepspeed", None)
        if not self.enabled or optimizer is None:
            return
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not params or torch.stack(torch._foreach_norm([p.grad for p in params])).sum().item() != 0:
            return
        for p in params:
            p.grad = None
        self.skipped += 1


def load_ordering_state(checkpoint: str) -> dict | None:
    """The schedule state saved in a trainer checkpoint, or None (a checkpoint from before it was saved)."""
    path = os.path.join(checkpoint, ORDERING_STATE_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class QueryScorer:
    """Samples k responses per query with the trainer's current policy, through the trainer's own rollout path
    (its chat-template tokenization and `_generate_single_turn`: the same generation config, temperature, top_p
    and max_completion_length as training), and scores them with the stage's rewards. With a `cache`, each
    query's samples go into it with their per-token log-probs (TRL's `_get_per_token_logps_and_entropies`,
    the same temperature scaling as the loss), for the trainer to train on.

    The queries go in batches of `batch_size`, each sampled with its own seed; across processes each takes a
    share of the batches and all get every score (and sample), so a round's scores (hence the order) are the
    same under any number of processes."""

    def __init__(self, queries, tokenizer, reward_funcs, weights, num_samples: int, batch_size: int = 64,
                 seed: int = 0, cache: RolloutCache | None = None):
        self.queries = queries  # dataset rows (prompt, verifier_row, query_id)
        self.tokenizer = tokenizer
        self.reward_funcs = reward_funcs
        self.weights = weights
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.cache = cache
        self.trainer = None
        self.last_reward_stats: dict[str, float] = {}
        self.samples_drawn = 0
        self.logps_seconds = 0.0  # the sampling policy's log-prob pass: what caching adds to generating

    def bind(self, trainer) -> None:
        self.trainer = trainer

    def __call__(self, query_ids: list[int]) -> list[QueryScore]:
        batches = [query_ids[i : i + self.batch_size] for i in range(0, len(query_ids), self.batch_size)]
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):  # the training RNG stream stays as it was
            results = distributed.sharded_map(lambda mine: [self._score(batch) for batch in mine], batches)
        scores = [s for batch in results for s in batch["scores"]]
        self.samples_drawn += len(query_ids) * self.num_samples
        if self.cache is not None:
            for batch in results:
                for q, group in zip(batch["query_ids"], batch["groups"]):
                    self.cache.put(q, group)
        self.last_reward_stats = {}
        for f in self.reward_funcs:
            values = [v for batch in results for v in batch["per_reward"][f.__name__]]
            values = [v for v in values if v is not None and not math.isnan(v)]
            if values:
                mean = sum(values) / len(values)
                self.last_reward_stats[f"{f.__name__}/mean"] = mean
                variance = sum((v - mean) ** 2 for v in values) / len(values)
                self.last_reward_stats[f"{f.__name__}/std"] = variance**0.5
        return scores

    def _batch_seed(self, batch: list[int]) -> int:
        """A batch's sampling seed, from what it is: the same on any rank, in any number of processes, and in a
        run resumed at this step (a counter of rounds would restart at 0 on resume)."""
        key = json.dumps([self.seed, self.trainer.state.global_step, batch])
        return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "little")

    def _score(self, batch: list[int]) -> dict:
        """One batch: k samples per query (token ids, log-probs), their rewards and each query's score."""
        trainer, k = self.trainer, self.num_samples
        rows = [self.queries[q] for q in batch for _ in range(k)]
        prompts = [r["prompt"] for r in rows]
        torch.manual_seed(self._batch_seed(batch))
        prompt_ids, _, _ = trainer._tokenize_prompts(prompts)
        with torch.no_grad():
            completion_ids, _ = GRPOTrainer._generate_single_turn(trainer, prompt_ids, None, {}, k)
            t0 = time.perf_counter()
            logps = self._logps(prompt_ids, completion_ids) if self.cache is not None else None
            self.logps_seconds += time.perf_counter() - t0
        texts = self.tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        completions = [[{"role": "assistant", "content": t}] for t in texts]
        columns = {key: [r[key] for r in rows] for key in rows[0] if key != "prompt"}
        with torch.no_grad():
            per_func = [f(prompts=prompts, completions=completions, **columns) for f in self.reward_funcs]
        total = combined(per_func, self.weights)
        groups = None
        if logps is not None:
            rewards = [[math.nan if v is None else float(v) for v in sample] for sample in zip(*per_func)]
            samples = [CachedSample(c, lp, r) for c, lp, r in zip(completion_ids, logps, rewards)]
            groups = [samples[i * k : (i + 1) * k] for i in range(len(batch))]
        return {
            "query_ids": batch, "groups": groups or [None] * len(batch),
            "scores": [score_of(q, total[i * k : (i + 1) * k]) for i, q in enumerate(batch)],
            "per_reward": {f.__name__: list(values) for f, values in zip(self.reward_funcs, per_func)},
        }

    def _logps(self, prompt_ids: list[list[int]], completion_ids: list[list[int]]) -> list[list[float]]:
        """Per-token log-probs of the sampled completions under the policy that sampled them, as TRL computes them
        for the loss (left-padded prompts, right-padded completions)."""
        trainer = self.trainer
        device = trainer.accelerator.device
        pad_id = trainer._tokenizer.pad_token_id
        p = [torch.tensor(ids) for ids in prompt_ids]
        c = [torch.tensor(ids) for ids in completion_ids]
        p_ids = pad(p, padding_value=pad_id, padding_side="left").to(device)
        p_mask = pad([torch.ones_like(t) for t in p], padding_value=0, padding_side="left").to(device)
        c_ids = pad(c, padding_value=pad_id, padding_side="right").to(device)
        c_mask = pad([torch.ones_like(t) for t in c], padding_value=0, padding_side="right").to(device)
        logps, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, torch.cat([p_ids, c_ids], 1), torch.cat([p_mask, c_mask], 1), c_ids.size(1),
            batch_size=trainer.args.per_device_train_batch_size,
        )
        return [row[: len(ids)].float().cpu().tolist() for row, ids in zip(logps, completion_ids)]
