"""Reward-variance ordering of the query set, and the schedule the training sampler follows.

The *initial round* samples `num_generations` responses per query with the current policy, scores them with the
stage's rewards and ranks the queries by the variance of their (weighted) reward, highest first: a query whose
responses all score alike gives GRPO no advantage, hence no gradient. With a `window` (in generation batches) the
first pass is ranked window by window as training reaches it: each window's queries are sampled then and ranked
highest variance first (its flat queries last), and the samples are trained on within `window` generation batches
instead of up to a whole pass later. Without one, the whole set is sampled before training. After that the
schedule keeps a per-query
estimate from the training rollouts themselves (`observe`: the latest generation batch's variance of each query,
with the step it was measured at), and later rounds (`reorder_each_epoch`, `reorder_every_steps`) re-rank the
queries not yet used in the pass by their latest estimate, without sampling (`source: rollouts`); a query with
no rollout estimate yet keeps its initial score. `source: ordering_pass` samples again instead (the older way).

Queries at or below `epsilon` follow the low-variance policy: `last` (ranked after all others), `drop` (left
out of training), `rescore` (ranked last, and sampled again with the then-current policy when the sampler
reaches them). Every sample a round draws can be trained on (the trainer's rollout cache, `needs_samples`).

The schedule hands the sampler one generation batch of queries (a *chunk*) at a time, so a re-ordering changes
what the trainer consumes from the next chunk on. Every round is saved to `ordering.json` in the stage folder
(atomically): per query its id, variance, mean, position in the pass, where its score came from and the step
it was measured at -- exactly the order the trainer consumes.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from qwen_align.fsutil import atomic_write_json

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QueryScore:
    query_id: int
    mean: float
    variance: float


def score_of(query_id: int, rewards: list[float]) -> QueryScore:
    """Mean and (population) variance of one query's sampled rewards; NaNs (nothing applied) are skipped."""
    values = [r for r in rewards if not math.isnan(r)]
    if not values:
        return QueryScore(query_id, math.nan, 0.0)
    mean = sum(values) / len(values)
    return QueryScore(query_id, mean, sum((v - mean) ** 2 for v in values) / len(values))


def rank(scores: list[QueryScore], epsilon: float) -> tuple[list[QueryScore], list[QueryScore]]:
    """(high, low): variance above epsilon, highest first, then the never-measured (NaN: not known to be flat);
    the rest. Ties keep query-id order."""
    high = sorted((s for s in scores if s.variance > epsilon), key=lambda s: (-s.variance, s.query_id))
    unknown = [s for s in scores if math.isnan(s.variance)]
    low = sorted((s for s in scores if s.variance <= epsilon), key=lambda s: s.query_id)
    return high + unknown, low


Scorer = Callable[[list[int]], list[QueryScore]]


class OrderingSchedule:
    """Which queries each generation batch takes, pass after pass, re-ranked by reward variance when due.

    `scorer(query_ids)` samples and scores those queries with the current policy; `source` says whether rounds
    after the initial one rank by the training rollouts' estimates ("rollouts") or sample again ("ordering_pass").
    `needs_samples(query_id)`: whether the trainer lacks samples to train that query on (a rescore samples those
    of the chunk it reaches too, so the chunk is trained on what the rescore drew). `clock()`: the optimizer step.
    """

    def __init__(
        self, num_queries: int, queries_per_chunk: int, scorer: Scorer, *,
        epsilon: float = 1e-6, policy: str = "last", reorder_every_chunks: int | None = None,
        reorder_each_epoch: bool = False, artifact: Path | None = None, on_round=None, source: str = "rollouts",
        needs_samples: Callable[[int], bool] | None = None, clock: Callable[[], int] | None = None,
        window: int | None = None, chunk_budget: int | None = None,
    ):
        self.num_queries = num_queries
        self.queries_per_chunk = queries_per_chunk
        self.scorer = scorer
        self.epsilon = epsilon
        self.policy = policy
        self.reorder_every_chunks = reorder_every_chunks
        self.reorder_each_epoch = reorder_each_epoch
        self.artifact = artifact
        self.on_round = on_round  # called with each round's summary (metrics)
        self.source = source
        self.needs_samples = needs_samples or (lambda query_id: False)
        self.clock = clock or (lambda: 0)
        self.window = window  # generation batches per first-pass ordering round; None: the whole set at once
        self.chunk_budget = chunk_budget  # generation batches the run will consume (None: unknown, whole passes)
        self.unscored: set[int] = set()  # first pass, windowed: queries not sampled yet
        # Per query, the latest score: {variance, mean, source, step, chunk, samples}.
        self.latest: dict[int, dict] = {}
        self.active = list(range(num_queries))  # queries training may use (drop removes some)
        self.ranking: list[int] = []  # the current pass's order
        self.low: set[int] = set()
        self.rounds: list[dict] = []
        self.seconds = 0.0
        self.epoch = -1
        self.chunks_done = 0
        self.last_round_chunk = 0
        # Where the current pass stands: chunks handed out, chunks consumed, low-variance queries re-scored.
        self.pass_yielded = 0
        self.pass_consumed = 0
        self.rescored: set[int] = set()
        self._resuming = False  # the next `chunks()` continues a restored pass instead of starting one

    @property
    def num_chunks(self) -> int:
        return len(self.active) // self.queries_per_chunk

    # ------------------------------------------------------------ rounds

    def initial_round(self) -> None:
        """The ordering before training; with `drop`, low-variance queries leave the active set here."""
        if self.rounds:
            return
        if self.window:
            self.ranking = list(self.active)
            self.unscored = set(self.active)
            self._window_round(0, reason="initial")
            return
        self._round(list(self.active), start=0, reason="initial")
        if self.policy == "drop" and self.low:
            kept = [q for q in self.active if q not in self.low]
            if len(kept) < self.queries_per_chunk:
                log.warning("only %d queries have reward variance above %g, fewer than one generation batch (%d); "
                            "keeping the low-variance ones last instead of dropping them",
                            len(kept), self.epsilon, self.queries_per_chunk)
            else:
                self.active = kept
                self.ranking = [q for q in self.ranking if q not in self.low]
                self.rounds[-1]["dropped"] = sorted(self.low)
                self._save()

    def _round(self, query_ids: list[int], start: int, reason: str) -> None:
        """Score `query_ids` (sampling, or from the rollout estimates) and rank them into the pass from `start` on."""
        t0 = time.perf_counter()
        if reason == "initial" or self.source == "ordering_pass":
            source, scores = "ordering_pass", self._sample(query_ids)
        else:
            source, scores = "rollouts", [self._latest_score(q) for q in query_ids]
        seconds = time.perf_counter() - t0
        self.seconds += seconds
        high, low = rank(scores, self.epsilon)
        self.low = (self.low - set(query_ids)) | {s.query_id for s in low}
        self.ranking = self.ranking[:start] + [s.query_id for s in high + low]
        self._record(reason, source, start, high + low, len(low), seconds)

    def _record(self, reason: str, source: str, start: int, ordered: list[QueryScore], low: int,
                seconds: float) -> None:
        """Append a round (its queries placed from `start` on in the ranking), save the artifact, report it."""
        summary = {
            "round": len(self.rounds), "reason": reason, "source": source, "epoch": max(self.epoch, 0),
            "chunk": self.chunks_done, "step": self.clock(), "start_position": start, "scored": len(ordered),
            "low_variance": low, "seconds": round(seconds, 3),
        }
        self.rounds.append({**summary, "queries": [self._entry(s.query_id, start + i) for i, s in enumerate(ordered)]})
        self.last_round_chunk = self.chunks_done
        self._save()
        if self.on_round:
            self.on_round(summary)

    def _window_round(self, pos: int, reason: str = "window") -> None:
        """First pass, windowed: sample the next `window` generation batches' worth of unsampled queries (no more
        than the run has steps left for) and rank them into the pass at `pos`, after the already-sampled queries
        still waiting there: highest variance first, the flat ones last. A flat query stays in its window: moved
        to the end of the pass its samples would be old when reached and batches made only of them would spend
        steps on nothing; in its window it costs a few rows of a batch."""
        size = self.queries_per_chunk
        pass_end = self.num_chunks * size
        left = None if self.chunk_budget is None else max(0, self.chunk_budget - self.chunks_done) * size
        count = self.window * size if left is None else min(self.window * size, left)
        chosen = [q for q in self.ranking[pos:pass_end] if q in self.unscored][:count]
        if not chosen:
            return  # the run ends before it reaches these queries
        t0 = time.perf_counter()
        scores = self._sample(chosen)
        seconds = time.perf_counter() - t0
        self.seconds += seconds
        picked = set(chosen)
        self.unscored -= picked
        high, low = rank(scores, self.epsilon)
        self.low |= {s.query_id for s in low}
        rest = [q for q in self.ranking[pos:] if q not in picked]
        waiting = [q for q in rest if q not in self.unscored]  # sampled by the last window, not yet handed out
        unsampled = [q for q in rest if q in self.unscored]
        # A query once placed keeps its position: each round's entries say where it is consumed.
        self.ranking = self.ranking[:pos] + waiting + [s.query_id for s in high + low] + unsampled
        self._record(reason, "ordering_pass", pos + len(waiting), high + low, len(low), seconds)

    def _sample(self, query_ids: list[int]) -> list[QueryScore]:
        """The scorer's scores, remembered as each query's latest (source `ordering_pass`)."""
        scores = self.scorer(query_ids)
        for s in scores:
            self._remember(s, "ordering_pass", self.clock(), samples=None)
        return scores

    def observe(self, scores: list[QueryScore], step: int, samples: int) -> None:
        """Scores of the queries one training generation batch sampled (`samples` responses each) at `step`."""
        for s in scores:
            self._remember(s, "rollouts", step, samples)

    def _remember(self, score: QueryScore, source: str, step: int, samples: int | None) -> None:
        self.latest[score.query_id] = {"variance": score.variance, "mean": score.mean, "source": source,
                                       "step": step, "chunk": self.chunks_done, "samples": samples}

    def _latest_score(self, query_id: int) -> QueryScore:
        e = self.latest.get(query_id)
        return QueryScore(query_id, math.nan, math.nan) if e is None else QueryScore(query_id, e["mean"], e["variance"])

    def _entry(self, query_id: int, position: int) -> dict:
        e = self.latest.get(query_id) or {"variance": math.nan, "mean": math.nan, "source": None, "step": None,
                                          "samples": None}
        return {"query_id": query_id, "variance": e["variance"], "mean": e["mean"], "position": position,
                "low_variance": query_id in self.low, "source": e["source"], "step": e["step"],
                "samples": e["samples"]}

    def _save(self) -> None:
        if self.artifact is None:
            return
        atomic_write_json(self.artifact, {
            "num_queries": self.num_queries, "queries_per_chunk": self.queries_per_chunk, "epsilon": self.epsilon,
            "low_variance_policy": self.policy, "source": self.source, "ordering_seconds": round(self.seconds, 3),
            "rounds": self.rounds,
        })

    # ------------------------------------------------------------ passes

    def chunks(self) -> Iterator[list[int]]:
        """One pass: `num_chunks` generation batches of query ids, re-ranked when a round is due.

        After `load_state_dict` the first call continues the saved pass: the chunks handed out before the save
        come again from the saved ranking, without scoring (the Trainer iterates its sampler from the start and
        skips the batches it trained on), and the rest follows as it would have.
        """
        if self._resuming and self.pass_consumed < self.num_chunks:
            self._resuming = False
            replay = self.pass_yielded
        else:
            self._resuming = False
            self._start_pass()
            replay = 0
        size = self.queries_per_chunk
        for k in range(self.num_chunks):
            pos = k * size
            if k >= replay:
                self._before_chunk(pos)
                self.pass_yielded = k + 1
            yield self.ranking[pos : pos + size]
            if k >= self.pass_consumed:
                self.chunks_done += 1
                self.pass_consumed = k + 1

    def _start_pass(self) -> None:
        self.epoch += 1
        self.pass_yielded = self.pass_consumed = 0
        self.rescored = set()
        if not self.rounds:
            self.initial_round()
            return
        if self.epoch > 0:  # a windowed first pass is over: later ranks come from the rollouts
            self.unscored = set()
        if self.epoch > 0 and self.reorder_each_epoch:
            self.ranking = []
            self._round(list(self.active), start=0, reason="epoch")

    def _before_chunk(self, pos: int) -> None:
        """Rounds due before the chunk at `pos` is handed out."""
        if self.unscored and any(q in self.unscored for q in self.ranking[pos : pos + self.queries_per_chunk]):
            self._window_round(pos)
        elif self._due() and not self.unscored:  # a windowed first pass re-ranks by its windows alone
            self._round(self.ranking[pos:], start=pos, reason="every_steps")
        if self.policy == "rescore":
            size = self.queries_per_chunk
            chunk = self.ranking[pos : pos + size]
            stale = [q for q in chunk if q in self.low and q not in self.rescored and not self._scored_now(q)]
            if stale:
                rest_low = [q for q in self.ranking[pos:] if q in self.low and q not in self.rescored]
                self.rescored |= set(rest_low)
                unsampled = [q for q in chunk if q not in self.low and self.needs_samples(q)]
                self._rescore(pos, rest_low, unsampled)

    # ------------------------------------------------------------ resume

    STATE_FIELDS = ("active", "ranking", "rounds", "seconds", "epoch", "chunks_done", "last_round_chunk",
                    "pass_yielded", "pass_consumed")  # plus low, rescored and latest (JSON wants string keys)

    def state_dict(self) -> dict:
        """Everything a resumed run needs to consume what this one would have (JSON-serialisable)."""
        return {
            "num_queries": self.num_queries, "queries_per_chunk": self.queries_per_chunk,
            **{name: getattr(self, name) for name in self.STATE_FIELDS},
            "low": sorted(self.low), "rescored": sorted(self.rescored),
            "unscored": sorted(self.unscored),
            "latest": [{"query_id": q, **e} for q, e in sorted(self.latest.items())],
        }

    def load_state_dict(self, state: dict) -> None:
        for key in ("num_queries", "queries_per_chunk"):
            if state[key] != getattr(self, key):
                raise ValueError(f"ordering state is for {key}={state[key]}, this stage has {getattr(self, key)}")
        for name in self.STATE_FIELDS:
            setattr(self, name, state[name])
        self.low, self.rescored = set(state["low"]), set(state["rescored"])
        self.unscored = set(state.get("unscored", ()))
        self.latest = {e["query_id"]: {k: v for k, v in e.items() if k != "query_id"} for e in state.get("latest", [])}
        self._resuming = True
        self._save()  # ordering.json again holds only the rounds of the run being continued

    def _scored_now(self, query_id: int) -> bool:
        """Sampled for this very chunk (a windowed round just now): nothing to re-score yet."""
        e = self.latest.get(query_id)
        return e is not None and e["source"] == "ordering_pass" and e["chunk"] == self.chunks_done

    def _due(self) -> bool:
        n = self.reorder_every_chunks
        return bool(n) and self.chunks_done - self.last_round_chunk >= n

    def _rescore(self, pos: int, stale: list[int], unsampled: list[int]) -> None:
        """Sample the remaining low-variance queries again; those that now vary move ahead of the still-low.
        `unsampled`: the reached chunk's other queries the trainer has no samples for, sampled alongside so
        the whole chunk trains on what this round drew (their scores refresh; their places stay)."""
        keep = [q for q in self.ranking[pos:] if q not in set(stale)]
        t0 = time.perf_counter()
        scores = self._sample(stale + unsampled)[: len(stale)]
        seconds = time.perf_counter() - t0
        self.seconds += seconds
        high, low = rank(scores, self.epsilon)
        self.low = (self.low - set(stale)) | {s.query_id for s in low}
        moved = [s.query_id for s in high]
        still = [s.query_id for s in low]
        # Already-ranked, varying queries first, then the newly varying ones, then the still-flat ones.
        varying = [q for q in keep if q not in self.low]
        flat = [q for q in keep if q in self.low]
        self.ranking = self.ranking[:pos] + varying + moved + flat + still
        summary = {
            "round": len(self.rounds), "reason": "rescore", "source": "ordering_pass", "epoch": self.epoch,
            "chunk": self.chunks_done, "step": self.clock(), "start_position": pos,
            "scored": len(stale) + len(unsampled), "low_variance": len(low), "seconds": round(seconds, 3),
        }
        entries = [self._entry(q, pos + i) for i, q in enumerate(self.ranking[pos:])]
        self.rounds.append({**summary, "queries": entries})
        self._save()
        if self.on_round:
            self.on_round(summary)


def consumed_order(artifact: dict, pass_length: int, passes: int) -> list[int]:
    """The query ids a trainer following `artifact`'s rounds consumes: per pass, each position takes the id the
    latest round covering it put there (what `OrderingSchedule.chunks` yields)."""
    out: list[int] = []
    for epoch in range(passes):
        rounds = [r for r in artifact["rounds"] if r["epoch"] == epoch]
        slots = dict(enumerate(out[-pass_length:]))  # a pass starts from the last one's order
        for r in rounds:
            for e in r["queries"]:
                slots[e["position"]] = e["query_id"]
        out += [slots[p] for p in range(pass_length)]
    return out
