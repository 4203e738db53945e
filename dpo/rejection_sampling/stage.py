"""Rejection-sampling stage: the policy answers verifiable queries N times; verified answers become pairs.

Flow per chunk of `chunk_size` queries: sample `samples_per_prompt` responses each (seeded by the chunk),
verify them, build pairs (see `pairs.py` for the selection rule and review), write one shard of pairs and
one of SFT rows, mark the chunk finished (`work.py`). A rerun samples only the chunks without a marker.
Under several processes the unfinished chunks are split round-robin across ranks, each rank on its own
device; the main rank alone prepares the work folder and publishes. At the end `final/` holds `pairs/`
(TRL conversational preference rows), `sft/` (conversations of passing responses) and `stats.json`.
See docs/rejection_sampling.md.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter
from typing import Any

from tqdm.auto import tqdm

from qwen_align import distributed, verifiers
from qwen_align.errors import DataError
from qwen_align.generation import SamplingParams, make_sampler
from qwen_align.stage import StageContext, StageResult, resolve_stage_dtype

from .config import RejectionSamplingConfig as Config
from .pairs import Candidate, RuleReview, build_pairs
from .queries import load_queries, provenance, query_id
from .work import Work

log = logging.getLogger(__name__)


def chunk_seed(seed: int, chunk: int) -> int:
    return (seed * 1_000_003 + chunk * 7_919 + 17) % 2**31


def sampling_info(stage: Config, seed: int) -> dict[str, Any]:
    return {"temperature": stage.temperature, "top_p": stage.top_p, "n": stage.samples_per_prompt,
            "max_new_tokens": stage.max_new_tokens, "seed": seed}


def fingerprint(stage: Config, context: StageContext, rows: list[dict[str, Any]]) -> str:
    """What the work folder belongs to: every query row in order (not only ids: an edited answer counts),
    chunking, sampling options, policy and seed."""
    queries = hashlib.sha256()
    for row in rows:
        queries.update(json.dumps(row, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8") + b"\n")
    payload = {"queries": queries.hexdigest(), "chunk_size": stage.chunk_size, "policy": context.init_source,
               "stage": stage.model_dump(mode="json", exclude={"name"}), "seed": context.seed}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def verify_all(examples: list[dict], responses: list[str], workers: int | None) -> list[verifiers.VerifyResult]:
    if hasattr(verifiers, "verify_batch"):
        return list(verifiers.verify_batch(examples, responses, workers=workers))
    return [verifiers.verify(e, r) for e, r in zip(examples, responses)]


class ChunkRunner:
    """Samples, verifies and pairs one chunk of queries."""

    def __init__(self, stage: Config, context: StageContext, tokenizer):
        self.stage, self.context, self.tokenizer = stage, context, tokenizer
        self.rules = RuleReview(stage.review.reject_truncated, stage.review.max_chars, stage.review.reject_patterns)
        self._sampler = None
        self._rm = None

    @property
    def sampler(self):
        if self._sampler is None:
            s = self.stage
            self._sampler = make_sampler(
                s.backend, self.context.init_source, self.tokenizer,
                lambda: self._policy(), batch_size=s.batch_size, seed=self.context.seed,
                dtype=s.dtype,
                gpu_memory_utilization=s.gpu_memory_utilization, tensor_parallel_size=s.tensor_parallel_size,
            )
        return self._sampler

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        """The sampler (a vLLM engine, or the policy on the GPU) is shut down once this rank's chunks are done."""
        if self._sampler is not None:
            self._sampler.close()
            self._sampler = None

    def _policy(self):
        return self.context.load_policy(self.stage, self.tokenizer)  # make_sampler puts it on this rank's device

    @property
    def reward_model(self):
        if self._rm is None and self.stage.review.reward_model:
            from .review import RewardScorer

            path = self.stage.review.reward_model
            if hasattr(self.context, "stage_output"):
                path = self.context.stage_output(path)  # an earlier stage's name, or a path as written
            self._rm = RewardScorer(path, self.tokenizer, dtype=resolve_stage_dtype(self.stage.dtype),
                                    batch_size=self.stage.review.reward_batch_size)
        return self._rm

    def run(self, rows: list[dict[str, Any]], chunk: int) -> tuple[list[dict], list[dict], dict[str, Any]]:
        stage, n = self.stage, self.stage.samples_per_prompt
        seed = chunk_seed(self.context.seed, chunk)
        params = SamplingParams(max_new_tokens=stage.max_new_tokens, temperature=stage.temperature,
                                top_p=stage.top_p, num_return_sequences=n, seed=seed)
        prompts = [r["messages"] for r in rows]
        t0 = time.time()
        samples = self.sampler.sample(prompts, params)
        t1 = time.time()
        examples = [r for r in rows for _ in range(n)]
        try:
            results = verify_all(examples, [s.text for group in samples for s in group], stage.verify_workers)
        except DataError as e:
            raise DataError(f"rejection_sampling chunk {chunk}: {e}") from None
        t2 = time.time()
        candidates = [
            [Candidate(s.text, v.passed, float(v.score), s.finished, k)
             for k, (s, v) in enumerate(zip(samples[q], results[q * n : (q + 1) * n]))]
            for q in range(len(rows))
        ]
        rm_scores = self._reward_scores(prompts, candidates)
        pair_rows, sft_rows = [], []
        stats = _empty_stats()
        for q, row in enumerate(rows):
            accept = None
            if rm_scores is not None:
                margin = stage.review.min_margin
                accept = lambda c, r, q=q: rm_scores[q][c.text] - rm_scores[q][r.text] > margin  # noqa: E731
            built = build_pairs(candidates[q], stage.max_pairs_per_prompt, self.rules, accept)
            meta = {"query_id": query_id(row), **provenance(row),
                    "sampling": sampling_info(stage, seed), "model": self.context.init_source}
            for chosen, rejected in built.pairs:
                pair = {"prompt": prompts[q], "chosen": [{"role": "assistant", "content": chosen.text}],
                        "rejected": [{"role": "assistant", "content": rejected.text}], **meta,
                        "chosen_score": chosen.score, "rejected_score": rejected.score}
                if rm_scores is not None:
                    pair["chosen_reward"], pair["rejected_reward"] = rm_scores[q][chosen.text], rm_scores[q][rejected.text]
                pair_rows.append(pair)
            if stage.write_sft_data:
                for c in built.chosen_pool[: stage.sft_per_prompt]:
                    sft_rows.append({"messages": prompts[q] + [{"role": "assistant", "content": c.text}], **meta})
            _count(stats, row["verifier"], candidates[q], built)
        stats["sft_rows"] = len(sft_rows)
        stats["generation_s"], stats["verify_s"] = round(t1 - t0, 3), round(t2 - t1, 3)
        stats["review_s"] = round(time.time() - t2, 3)
        stats["truncated_samples"] = sum(not s.finished for g in samples for s in g)
        stats["response_tokens"] = sum(s.num_tokens for g in samples for s in g)
        return pair_rows, sft_rows, stats

    def _reward_scores(self, prompts, candidates) -> list[dict[str, float]] | None:
        """RM score per unique response text of each query that can give pairs (None without an RM)."""
        if not self.stage.review.reward_model:
            return None
        items, where = [], []
        for q, cands in enumerate(candidates):
            if any(c.passed for c in cands) and not all(c.passed for c in cands):
                for text in dict.fromkeys(c.text for c in cands):
                    items.append((prompts[q], text))
                    where.append((q, text))
        scores: list[dict[str, float]] = [{} for _ in candidates]
        for (q, text), value in zip(where, self.reward_model.score(items) if items else []):
            scores[q][text] = value
        return scores


def _empty_stats() -> dict[str, Any]:
    return {"queries": 0, "samples": 0, "passed": 0, "by_verifier": {}, "outcomes": Counter(),
            "pairs": 0, "pairs_per_query": Counter(), "passes_per_query": Counter(), "duplicate_samples": 0, "review_rejections": Counter(),
            "no_pairs_after_review": 0}


def _count(stats: dict[str, Any], verifier: str, cands: list[Candidate], built) -> None:
    passed = sum(c.passed for c in cands)
    stats["queries"] += 1
    stats["samples"] += len(cands)
    stats["passed"] += passed
    v = stats["by_verifier"].setdefault(verifier, {"samples": 0, "passed": 0, "queries": 0, "pairs": 0})
    v["samples"] += len(cands)
    v["passed"] += passed
    v["queries"] += 1
    v["pairs"] += len(built.pairs)
    stats["outcomes"][built.outcome] += 1
    stats["pairs"] += len(built.pairs)
    stats["pairs_per_query"][str(len(built.pairs))] += 1
    stats["passes_per_query"][str(passed)] += 1  # of len(cands) samples: the report's pass-rate histogram
    stats["duplicate_samples"] += built.duplicates
    stats["review_rejections"].update(built.review_rejections)
    if built.outcome == "mixed" and not built.pairs:
        stats["no_pairs_after_review"] += 1


def merge_stats(parts: list[dict[str, Any]]) -> dict[str, Any]:
    total: dict[str, Any] = {}
    for part in parts:
        for key, value in part.items():
            if isinstance(value, dict):
                merged = total.setdefault(key, {})
                for k, v in value.items():
                    if isinstance(v, dict):
                        inner = merged.setdefault(k, {})
                        for kk, vv in v.items():
                            inner[kk] = inner.get(kk, 0) + vv
                    else:
                        merged[k] = merged.get(k, 0) + v
            else:
                total[key] = total.get(key, 0) + value
    return total


def summarise(total: dict[str, Any], chunks: int, resumed: int, seconds: float, data: dict) -> dict[str, Any]:
    samples = total.get("samples", 0)
    outcomes = total.get("outcomes", {})
    by_verifier = {
        name: {**v, "pass_rate": round(v["passed"] / v["samples"], 4) if v["samples"] else 0.0}
        for name, v in sorted(total.get("by_verifier", {}).items())
    }
    histogram = dict(sorted(total.get("pairs_per_query", {}).items(), key=lambda kv: int(kv[0])))
    passes = dict(sorted(total.get("passes_per_query", {}).items(), key=lambda kv: int(kv[0])))
    return {
        "queries": total.get("queries", 0), "samples": samples,
        "pass_rate": round(total.get("passed", 0) / samples, 4) if samples else 0.0,
        "by_verifier": by_verifier,
        "all_pass": outcomes.get("all_pass", 0), "all_fail": outcomes.get("all_fail", 0),
        "mixed": outcomes.get("mixed", 0), "no_pairs_after_review": total.get("no_pairs_after_review", 0),
        "pairs": total.get("pairs", 0), "pairs_per_query": histogram, "passes_per_query": passes,
        "sft_rows": total.get("sft_rows", 0), "duplicate_samples": total.get("duplicate_samples", 0),
        "truncated_samples": total.get("truncated_samples", 0),
        "mean_response_tokens": round(total.get("response_tokens", 0) / samples, 2) if samples else 0.0,
        "review_rejections": dict(total.get("review_rejections", {})),
        "generation_s": round(total.get("generation_s", 0.0), 2), "verify_s": round(total.get("verify_s", 0.0), 2),
        "review_s": round(total.get("review_s", 0.0), 2),
        "time_s": round(seconds, 2), "chunks": chunks, "chunks_resumed": resumed, "data": data,
    }


def _jsonable(stats: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(stats, default=dict))


def _published_stats(final, fp: str) -> dict[str, Any] | None:
    """stats.json of an earlier run of this very work that published `final/` (only the manifest missed it)."""
    path = final / "stats.json"
    if not path.is_file():
        return None
    stats = json.loads(path.read_text(encoding="utf-8"))
    return stats if stats.get("fingerprint") == fp else None


def run(stage: Config, context: StageContext) -> StageResult:
    """Sample every unfinished chunk (this rank's share of them), then publish `final/` from the main rank."""
    start = time.time()
    distributed.init()
    rows, data_report = load_queries(stage.data, context.seed)  # stops on bad rows before any sampling
    fp = fingerprint(stage, context, rows)
    final = context.output_dir
    outputs = {"pairs": final / "pairs", "sft": final / "sft"}
    work = Work(context.checkpoints_dir / "rejection_sampling")

    published = distributed.broadcast_object(_published_stats(final, fp) if distributed.is_main() else None)
    if published is not None:
        if distributed.is_main():
            work.remove()  # killed between publishing and cleaning up
        distributed.barrier()
        return StageResult(output=outputs["pairs"], metrics=published, outputs=outputs)

    size = stage.chunk_size
    chunks = (len(rows) + size - 1) // size
    with distributed.main_writes() as writer:
        if writer:
            work.prepare(fp)
    # The main rank's view, taken before any rank commits, so that every rank splits the same list.
    finished = [c for c in range(chunks) if work.is_done(c)] if distributed.is_main() else None
    finished = distributed.broadcast_object(finished)
    if finished and distributed.is_main():
        print(f"[{stage.name}] resuming: {len(finished)} of {chunks} chunks already done, "
              f"{chunks - len(finished)} to sample")
    done = set(finished)
    mine = distributed.shard([c for c in range(chunks) if c not in done])
    _sample_chunks(stage, context, rows, mine, work)
    distributed.barrier()  # every chunk is committed

    stats = None
    if distributed.is_main():
        total = merge_stats([work.chunk_stats(c) for c in range(chunks)])
        stats = summarise(total, chunks, len(finished), time.time() - start, data_report)
        stats["fingerprint"] = fp
        stats["sampling"] = sampling_info(stage, context.seed)
        stats["processes"] = distributed.world_size()
        work.publish(final, chunks, stats)
        work.remove()
        _print_summary(stage.name, stats)
    stats = distributed.broadcast_object(stats)  # also the point where every rank sees final/
    return StageResult(output=outputs["pairs"], metrics=stats, outputs=outputs)


def _sample_chunks(stage: Config, context: StageContext, rows: list[dict], chunks: list[int], work: Work) -> None:
    """Sample, pair and commit `chunks` (this rank's share); the progress bar is the main rank's own share."""
    if not chunks:
        return
    size = stage.chunk_size
    runner = ChunkRunner(stage, context, context.tokenizer())
    share = sum(len(rows[c * size : (c + 1) * size]) for c in chunks)
    desc = f"[{stage.name}] queries" + (", rank 0's share" if distributed.is_distributed() else "")
    with runner, tqdm(total=share, desc=desc, unit="query", disable=not distributed.is_main()) as bar:
        for c in chunks:
            chunk_rows = rows[c * size : (c + 1) * size]
            pairs, sft, stats = runner.run(chunk_rows, c)
            work.commit(c, pairs, sft if stage.write_sft_data else [], _jsonable(stats))
            bar.update(len(chunk_rows))
            bar.set_postfix(pairs=stats["pairs"], pass_rate=f"{stats['passed'] / max(stats['samples'], 1):.2f}")
            context.log_metrics({"stage": stage.name, "chunk": c, "pairs": stats["pairs"],
                                 "pass_rate": stats["passed"] / max(stats["samples"], 1)})


def _print_summary(name: str, s: dict[str, Any]) -> None:
    rates = ", ".join(f"{k} {v['pass_rate']:.1%}" for k, v in s["by_verifier"].items())
    rejected = sum(s["review_rejections"].values())
    print(
        f"[{name}] {s['queries']} queries x {s['samples'] // max(s['queries'], 1)} samples in {s['time_s']:.1f}s: "
        f"pass rate {s['pass_rate']:.1%} ({rates}); {s['pairs']} pairs from {s['mixed']} mixed queries; "
        f"all pass (too easy) {s['all_pass']}, all fail (too hard) {s['all_fail']}; "
        f"duplicates dropped {s['duplicate_samples']}, review rejected {rejected}; SFT rows {s['sft_rows']}"
    )


__all__ = ["Config", "run"]
