"""Turn one query's verified samples into chosen/rejected pairs (pure functions, no model).

Selection rule, per query:
1. Duplicates go: samples whose text (after strip) repeats an earlier sample's are dropped and counted.
2. A query whose unique samples all pass is `all_pass` ("too easy"), all fail `all_fail` ("too hard"):
   counted, no pairs.
3. Candidates for `chosen`: passing samples that the rule review accepts (not empty; not truncated, not
   longer than `max_chars`, matching no `reject_patterns`, as configured). Rejected candidates are counted
   by reason. Candidates for `rejected`: every failing sample.
4. Order: chosen candidates by verifier score (high first), failing samples by verifier score (high
   first: near misses make the most informative negatives); ties keep sampling order (seeded).
5. Round-robin over the two ordered lists, longer list outer: round d pairs the i-th sample of the longer
   list with the ((i + d) mod m)-th of the shorter (m its length). Round 0 uses every sample of the longer
   list once and spreads the shorter one evenly; later rounds shift; every (chosen, rejected) combination
   comes up exactly once, so pairs are distinct. A pair is kept unless the reward-model review rejects it
   (margin not above `min_margin`), until `max_pairs` are kept.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterator


@dataclass(frozen=True)
class Candidate:
    text: str
    passed: bool
    score: float
    finished: bool = True  # False: cut at max_new_tokens
    index: int = 0  # position in sampling order


@dataclass
class RuleReview:
    reject_truncated: bool = True
    max_chars: int | None = None
    reject_patterns: list[str] = field(default_factory=list)

    def __post_init__(self):
        self._patterns = [re.compile(p) for p in self.reject_patterns]

    def why_not_chosen(self, c: Candidate) -> str | None:
        """The reason `c` may not be a chosen response, or None."""
        if not c.text.strip():
            return "empty"
        if self.reject_truncated and not c.finished:
            return "truncated"
        if self.max_chars is not None and len(c.text) > self.max_chars:
            return "too_long"
        if any(p.search(c.text) for p in self._patterns):
            return "pattern"
        return None


@dataclass
class QueryPairs:
    outcome: str  # "all_pass" | "all_fail" | "mixed"
    pairs: list[tuple[Candidate, Candidate]]
    chosen_pool: list[Candidate]  # passing samples accepted by the rule review, best first
    duplicates: int = 0
    review_rejections: Counter = field(default_factory=Counter)


def dedupe(candidates: list[Candidate]) -> tuple[list[Candidate], int]:
    seen: set[str] = set()
    kept = []
    for c in candidates:
        key = c.text.strip()
        if key in seen:
            continue
        seen.add(key)
        kept.append(c)
    return kept, len(candidates) - len(kept)


def round_robin(longer: int, shorter: int) -> Iterator[tuple[int, int]]:
    """(i, j) index pairs: i over the longer list, j over the shorter, every combination once."""
    for d in range(shorter):
        for i in range(longer):
            yield i, (i + d) % shorter


def _ranked(cands: list[Candidate]) -> list[Candidate]:
    return sorted(cands, key=lambda c: (-c.score, c.index))


def build_pairs(
    candidates: list[Candidate],
    max_pairs: int,
    review: RuleReview | None = None,
    accept_pair: Callable[[Candidate, Candidate], bool] | None = None,
) -> QueryPairs:
    """Pairs for one query by the module's selection rule; `accept_pair` is the optional RM review."""
    review = review or RuleReview()
    unique, duplicates = dedupe(candidates)
    passing = [c for c in unique if c.passed]
    failing = _ranked([c for c in unique if not c.passed])
    rejections: Counter = Counter()
    pool = []
    for c in _ranked(passing):
        reason = review.why_not_chosen(c)
        if reason:
            rejections[reason] += 1
        else:
            pool.append(c)
    if not failing or not passing:
        outcome = "all_pass" if passing else "all_fail"
        return QueryPairs(outcome, [], pool, duplicates, rejections)
    pairs = []
    swap = len(failing) > len(pool)  # iterate the longer list in the outer position
    longer, shorter = (failing, pool) if swap else (pool, failing)
    for i, j in round_robin(len(longer), len(shorter)):
        chosen, rejected = (shorter[j], longer[i]) if swap else (longer[i], shorter[j])
        if accept_pair is not None and not accept_pair(chosen, rejected):
            rejections["reward_margin"] += 1
            continue
        pairs.append((chosen, rejected))
        if len(pairs) >= max_pairs:
            break
    return QueryPairs("mixed", pairs, pool, duplicates, rejections)
