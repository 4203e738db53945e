"""Reward-variance ordering: ranking, low-variance policies, re-ordering, and the sampler's TRL layout."""

from __future__ import annotations

import json

import torch
from accelerate.data_loader import BatchSamplerShard
from torch.utils.data import BatchSampler
from trl.trainer.utils import RepeatSampler

from grpo.ordering import OrderingSchedule, QueryScore, consumed_order, rank, score_of
from grpo.rewards import combined
from grpo.sampler import OrderedRepeatSampler
from grpo.trainer import CachedSample, RolloutCache


def fixed_scorer(variances):
    calls = []

    def scorer(ids):
        calls.append(list(ids))
        return [QueryScore(q, 0.5, variances[q]) for q in ids]

    scorer.calls = calls
    return scorer


def test_score_and_rank():
    assert score_of(3, [1.0, 0.0, 1.0, 0.0]) == QueryScore(3, 0.5, 0.25)
    assert score_of(4, [float("nan")] * 2).variance == 0.0
    high, low = rank([QueryScore(0, 0, 0.1), QueryScore(1, 0, 0.0), QueryScore(2, 0, 0.3), QueryScore(3, 0, 1e-9)], 1e-6)
    assert [s.query_id for s in high] == [2, 0] and [s.query_id for s in low] == [1, 3]
    assert combined([[1.0, None], [0.5, 1.0]], [2.0, 1.0]) == [2.5, 1.0]


def test_last_and_artifact(tmp_path):
    variances = [0.0, 0.2, 0.1, 0.0, 0.3, 0.05]
    s = OrderingSchedule(6, 2, fixed_scorer(variances), artifact=tmp_path / "ordering.json")
    assert list(s.chunks()) == [[4, 1], [2, 5], [0, 3]]
    art = json.loads((tmp_path / "ordering.json").read_text())
    q = art["rounds"][0]["queries"]
    assert [e["query_id"] for e in q] == [4, 1, 2, 5, 0, 3] and [e["position"] for e in q] == list(range(6))
    assert q[0]["variance"] == 0.3 and q[4]["low_variance"]
    assert consumed_order(art, 6, 2) == [4, 1, 2, 5, 0, 3] * 2


def test_drop_shortens_the_pass():
    s = OrderingSchedule(6, 2, fixed_scorer([0.0, 0.2, 0.1, 0.0, 0.3, 0.05]), policy="drop")
    s.initial_round()
    assert s.num_chunks == 2 and list(s.chunks()) == [[4, 1], [2, 5]]
    assert s.rounds[0]["dropped"] == [0, 3]


def test_rescore_when_reached():
    variances = {0: 0.0, 1: 0.2, 2: 0.0, 3: 0.1}
    scorer = fixed_scorer(variances)
    s = OrderingSchedule(4, 2, scorer, policy="rescore", needs_samples=lambda q: q == 1)
    chunks = s.chunks()
    assert next(chunks) == [1, 3]
    variances[2] = 0.5  # the policy changed: query 2 now varies
    assert next(chunks) == [2, 0]
    assert scorer.calls == [[0, 1, 2, 3], [0, 2]]  # query 1 has samples to train on: not sampled again
    assert s.rounds[-1]["reason"] == "rescore"


def test_reorder_every_chunks_and_epoch_by_sampling():
    variances = [0.1, 0.2, 0.3, 0.4]
    scorer = fixed_scorer(variances)
    s = OrderingSchedule(4, 1, scorer, reorder_every_chunks=2, reorder_each_epoch=False, source="ordering_pass")
    chunks = s.chunks()
    assert [next(chunks), next(chunks)] == [[3], [2]]
    variances[:] = [0.4, 0.3, 0.2, 0.1]  # re-ranked: the rest of the pass follows the new scores
    assert list(chunks) == [[0], [1]]
    assert scorer.calls[-1] == [1, 0]
    s2 = OrderingSchedule(2, 1, fixed_scorer([0.1, 0.2]), reorder_each_epoch=True, source="ordering_pass")
    assert list(s2.chunks()) == [[1], [0]] and list(s2.chunks()) == [[1], [0]] and len(s2.rounds) == 2


def test_rounds_after_the_first_rank_by_the_rollouts_without_sampling():
    """Every round after the initial one ranks the queries not yet used by their latest training-rollout
    estimate; a query with none keeps its initial score; the scorer is never called again."""
    scorer = fixed_scorer([0.1, 0.2, 0.3, 0.4, 0.25])
    s = OrderingSchedule(5, 1, scorer, reorder_every_chunks=1, reorder_each_epoch=True)
    chunks = s.chunks()
    assert next(chunks) == [3]
    s.observe([QueryScore(3, 0.5, 0.0)], step=0, samples=8)  # what training measured on the first chunk
    s.observe([QueryScore(0, 0.5, 0.9)], step=0, samples=8)  # (an estimate for a query not yet used)
    assert next(chunks) == [0]  # 0 now ranks first; 2, 4, 1 keep their initial scores
    assert list(chunks) == [[2], [4], [1]]
    s.observe([QueryScore(q, 0.5, v) for q, v in [(0, 0.0), (2, 0.05), (4, 0.3), (1, 0.01)]], step=4, samples=8)
    assert list(s.chunks()) == [[4], [2], [1], [0], [3]]  # the next pass: the latest estimates, 0 and 3 flat
    assert scorer.calls == [[0, 1, 2, 3, 4]]
    epoch = next(r for r in s.rounds if r["reason"] == "epoch")
    assert epoch["reason"] == "epoch" and epoch["source"] == "rollouts"
    assert [(e["query_id"], e["variance"], e["step"], e["source"]) for e in epoch["queries"][:2]] == [
        (4, 0.3, 4, "rollouts"), (2, 0.05, 4, "rollouts")]
    assert s.rounds[0]["source"] == "ordering_pass" and s.rounds[0]["queries"][0]["source"] == "ordering_pass"


def test_rollout_cache_serves_whole_generation_batches_only():
    cache = RolloutCache()
    S = CachedSample
    cache.put(1, [S([11], [-0.1], [1.0]), S([12], [-0.2], [0.0])])
    cache.put(2, [S([21], [-0.3], [0.25]), S([22], [-0.4], [1.0])])
    cache.put(3, [S([31], [-0.5]), S([32], [-0.6])])
    # Rows [1, 1, 2, 2] over two ranks of 2 rows: rank 1 takes rows 2-3, query 2's two samples in order.
    assert cache.take([1, 1, 2, 2], first=2, count=2) == [S([21], [-0.3], [0.25]), S([22], [-0.4], [1.0])]
    assert not cache.has(1) and not cache.has(2) and cache.trained == 4
    assert cache.take([3, 3, 4, 4], first=0, count=4) is None  # 4 has no samples: generate the batch anew
    assert not cache.has(3) and cache.ordering_only == 2  # 3's samples were never trained on
    restored = RolloutCache()
    cache.put(5, [S([51, 52], [-1.0, -2.0], [0.5, 1.0])])
    restored.load_state_dict(json.loads(json.dumps(cache.state_dict())))
    assert restored.groups == cache.groups and restored.generated == 7 and restored.trained == 4
    restored.put(6, [S([61], [-0.7])])
    restored.keep_only([6])  # `drop` left 5 out of training
    assert list(restored.groups) == [6] and restored.ordering_only == 4


def test_sampler_has_trl_layout():
    """With the identity order the sampler yields what TRL's unshuffled RepeatSampler yields."""
    s = OrderingSchedule(7, 3, fixed_scorer([0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]))
    ours = OrderedRepeatSampler(s, mini_repeat_count=2, repeat_count=4)
    trl = RepeatSampler(list(range(7)), mini_repeat_count=2, batch_size=3, repeat_count=4, shuffle=False)
    assert list(ours) == list(trl) and len(ours) == len(trl)


def test_per_rank_slices_keep_groups():
    """Across 2 processes accelerate hands each rank alternate batches of the sampler's sequence (what TRL's
    dataloader does with per_device x steps_per_generation); the ranks together see the ordered sequence."""
    s = OrderingSchedule(8, 4, fixed_scorer([0.1 * i for i in range(8)]))
    sampler = OrderedRepeatSampler(s, mini_repeat_count=2, repeat_count=2)
    full = list(sampler)
    local = 4  # per-device batch x steps_per_generation; global generation batch = 2 x 4 = 8 = 4 queries x 2
    per_rank = [list(BatchSamplerShard(BatchSampler(sampler, local, False), 2, r)) for r in range(2)]
    rebuilt = [i for b0, b1 in zip(*per_rank) for i in b0 + b1]
    assert rebuilt == full
    assert full[:8] == [7, 7, 6, 6, 5, 5, 4, 4] and per_rank[0][0] == [7, 7, 6, 6] and per_rank[1][0] == [5, 5, 4, 4]
    assert torch.tensor(full).view(-1, 2).unique(dim=1).shape[1] == 1  # every group of 2 is one query


def test_windowed_first_pass_samples_each_window_when_reached():
    """window=2 (generation batches of 2 queries): the first pass samples 4 queries at a time, only when the
    sampler reaches them, and ranks each window highest variance first, its flat queries last; the artifact's
    positions give exactly the consumed order."""
    variances = [0.0, 0.2, 0.1, 0.0, 0.3, 0.05, 0.4, 0.0, 0.15, 0.25, 0.0, 0.12, 0.0]
    scorer = fixed_scorer(variances)
    s = OrderingSchedule(13, 2, scorer, window=2)
    s.initial_round()
    assert scorer.calls == [[0, 1, 2, 3]]
    chunks = s.chunks()
    assert [next(chunks), next(chunks)] == [[1, 2], [0, 3]]
    assert scorer.calls == [[0, 1, 2, 3]]
    assert next(chunks) == [6, 4]
    assert scorer.calls[-1] == [4, 5, 6, 7]  # the second window waited for the sampler to reach it
    assert list(chunks) == [[5, 7], [9, 8], [11, 10]]
    # Every query of the pass sampled once; query 12 (past the last whole generation batch) never.
    assert len(scorer.calls) == 3 and scorer.calls[2] == [8, 9, 10, 11]
    assert [r["reason"] for r in s.rounds] == ["initial", "window", "window"]
    assert consumed_order({"rounds": s.rounds}, 12, 1) == [1, 2, 0, 3, 6, 4, 5, 7, 9, 8, 11, 10]
    assert {e["query_id"] for r in s.rounds for e in r["queries"] if e["low_variance"]} == {0, 3, 7, 10}


def test_windowed_pass_never_samples_more_than_the_run_consumes():
    """A run of 3 generation batches samples 6 queries, no more, even when the sampler looks ahead."""
    scorer = fixed_scorer([0.0, 0.2, 0.1, 0.3, 0.05, 0.4, 0.0, 0.15])
    s = OrderingSchedule(8, 2, scorer, window=2, chunk_budget=3)
    chunks = s.chunks()
    assert [next(chunks) for _ in range(3)] == [[3, 1], [2, 0], [5, 4]]
    next(chunks)  # a look-ahead past the budget samples nothing
    assert scorer.calls == [[0, 1, 2, 3], [4, 5]]


def test_rescore_in_a_windowed_pass_waits_for_the_next_pass():
    """A flat query of a window is reached right after it was sampled: nothing to re-score in the first pass."""
    scorer = fixed_scorer([0.0, 0.2, 0.0, 0.3])
    s = OrderingSchedule(4, 2, scorer, window=1, policy="rescore")
    assert list(s.chunks()) == [[1, 0], [3, 2]]
    assert scorer.calls == [[0, 1], [2, 3]] and {r["reason"] for r in s.rounds} == {"initial", "window"}


def test_windowed_state_resumes_mid_pass():
    scorer = fixed_scorer([0.0, 0.2, 0.1, 0.0, 0.3, 0.05, 0.4, 0.0])
    s = OrderingSchedule(8, 2, scorer, window=1)
    chunks = s.chunks()
    first = [next(chunks), next(chunks)]
    state = json.loads(json.dumps(s.state_dict()))
    expected = list(chunks)
    restored = OrderingSchedule(8, 2, fixed_scorer([0.0, 0.2, 0.1, 0.0, 0.3, 0.05, 0.4, 0.0]), window=1)
    restored.load_state_dict(state)
    assert list(restored.chunks()) == first + expected  # replays the handed-out chunks, then continues
