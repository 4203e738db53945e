"""TRL's GRPOTrainer with the queries in reward-variance order, and the scorer that ranks them."""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import replace

import torch
from trl import GRPOTrainer

from qwen_align.checkpoints.resume import AtomicCheckpoints
from qwen_align.fsutil import atomic_write_json
from qwen_align.generation import SamplingParams, generate

from .ordering import OrderingSchedule, QueryScore, score_of
from .rewards import combined
from .sampler import OrderedRepeatSampler


ORDERING_STATE_FILE = "ordering_state.json"


class OrderedGRPOTrainer(AtomicCheckpoints, GRPOTrainer):
    """`schedule` set: the train sampler follows it (no shuffle); None: TRL's shuffled RepeatSampler.

    Each trainer checkpoint holds the schedule's state (`ordering_state.json`), written while the checkpoint
    is written, so a resumed run consumes the queries in the order the interrupted one would have.
    """

    def __init__(self, *args, schedule: OrderingSchedule | None = None, **kwargs):
        self.schedule = schedule
        super().__init__(*args, **kwargs)

    def _get_train_sampler(self, dataset=None):
        if self.schedule is None:
            return super()._get_train_sampler(dataset)
        return OrderedRepeatSampler(
            self.schedule,
            mini_repeat_count=self.num_generations,
            repeat_count=self.num_iterations * self.args.steps_per_generation,
        )

    def _save_rng_state(self, output_dir: str) -> None:
        super()._save_rng_state(output_dir)
        if self.schedule is not None and self.args.should_save:
            atomic_write_json(os.path.join(output_dir, ORDERING_STATE_FILE), self.schedule.state_dict())


def load_ordering_state(checkpoint: str) -> dict | None:
    """The schedule state saved in a trainer checkpoint, or None (a checkpoint from before it was saved)."""
    path = os.path.join(checkpoint, ORDERING_STATE_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class QueryScorer:
    """Samples k responses per query with the trainer's current policy and scores them with the stage's
    rewards. The queries go in batches of `batch_size`, each sampled with its own seed; across processes each
    takes a share of the batches and all get every score, so a round's scores (hence the order) are the same
    under any number of processes."""

    def __init__(self, queries, tokenizer, reward_funcs, weights, params: SamplingParams, batch_size: int = 64,
                 seed: int = 0):
        self.queries = queries  # dataset rows (prompt, verifier_row, query_id)
        self.tokenizer = tokenizer
        self.reward_funcs = reward_funcs
        self.weights = weights
        self.params = params
        self.batch_size = batch_size
        self.seed = seed
        self.trainer = None
        self.last_reward_stats: dict[str, float] = {}

    def bind(self, trainer) -> None:
        self.trainer = trainer

    def __call__(self, query_ids: list[int]) -> list[QueryScore]:
        acc = self.trainer.accelerator
        batches = [query_ids[i : i + self.batch_size] for i in range(0, len(query_ids), self.batch_size)]
        mine = list(enumerate(batches))[acc.process_index :: acc.num_processes]
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):  # the training RNG stream stays as it was
            scores, per_reward = self._score([(self._batch_seed(batch), batch) for _, batch in mine])
        if acc.num_processes > 1:
            from accelerate.utils import gather_object

            scores = gather_object(scores)
            per_reward = {k: gather_object(v) for k, v in sorted(per_reward.items())}
        self.last_reward_stats = {}
        for name, values in per_reward.items():
            values = [v for v in values if v is not None and not math.isnan(v)]
            if values:
                mean = sum(values) / len(values)
                self.last_reward_stats[f"{name}/mean"] = mean
                self.last_reward_stats[f"{name}/std"] = (sum((v - mean) ** 2 for v in values) / len(values)) ** 0.5
        where = {q: i for i, q in enumerate(query_ids)}
        return sorted(scores, key=lambda s: where[s.query_id])

    def _batch_seed(self, batch: list[int]) -> int:
        """A batch's sampling seed, from what it is: the same on any rank, in any number of processes, and in a
        run resumed at this step (a counter of rounds would restart at 0 on resume)."""
        key = json.dumps([self.seed, self.trainer.state.global_step, batch])
        return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "little")

    def _score(self, seeded_batches: list[tuple[int, list[int]]]) -> tuple[list[QueryScore], dict[str, list]]:
        query_ids = [q for _, batch in seeded_batches for q in batch]
        if not query_ids:
            return [], {f.__name__: [] for f in self.reward_funcs}
        rows = [self.queries[i] for i in query_ids]
        model = self.trainer.accelerator.unwrap_model(self.trainer.model)
        responses = []
        for seed, batch in seeded_batches:
            responses += generate(model, self.tokenizer, [self.queries[i]["prompt"] for i in batch],
                                  replace(self.params, seed=seed), batch_size=self.batch_size, desc="ordering pass")
        k = self.params.num_return_sequences
        prompts = [r["prompt"] for r in rows for _ in range(k)]
        completions = [[{"role": "assistant", "content": text}] for group in responses for text in group]
        columns = {key: [r[key] for r in rows for _ in range(k)] for key in rows[0] if key != "prompt"}
        with torch.no_grad():
            per_func = [f(prompts=prompts, completions=completions, **columns) for f in self.reward_funcs]
        total = combined(per_func, self.weights)
        scores = [score_of(q, total[i * k : (i + 1) * k]) for i, q in enumerate(query_ids)]
        per_reward = {f.__name__: list(values) for f, values in zip(self.reward_funcs, per_func)}
        return scores, per_reward
