"""Evaluate a reward model on a benchmark, or re-score a saved per-example scores file; write the summary
JSON and the per-example scores JSONL atomically (only after every row has been read and checked)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from ..data import iter_rows
from ..errors import DataError
from ..fsutil import atomic_write_json, atomic_write_text
from . import rules
from .items import Item
from .loaders import BENCHMARKS, load_benchmark
from .reference import comparison_table


def score_rows(items: list[Item], scores: list[list[float]], benchmark: str) -> list[dict[str, Any]]:
    """Per-example rows in reward-bench's result shape."""
    rows = []
    for item, s in zip(items, scores):
        if item.pairwise:
            row: dict[str, Any] = {"id": item.id, "subset": item.subset, "scores_chosen": s[0], "scores_rejected": s[1]}
        else:
            row = {"id": item.id, "subset": item.subset, "scores": s, "num_correct": item.num_correct}
        row.update(item.extra)
        row["results"] = row_result(benchmark, row)
        rows.append(row)
    return rows


def row_result(benchmark: str, row: dict) -> float | None:
    if benchmark == "rewardbench2":
        return None if str(row["subset"]).lower() == "ties" else rules.top_credit(row)
    if benchmark == "ppe" and "scores" in row:
        return rules.best_of_k(row, len(row["scores"]))
    return rules.beats_all(row)


def read_scores_file(path: str | Path, benchmark: str) -> list[dict[str, Any]]:
    rows = []
    for row in iter_rows(Path(path)):
        r = row.data
        if "id" not in r or "subset" not in r:
            raise DataError(f"{row.origin}: a scores row needs 'id' and 'subset'")
        if "scores_chosen" in r:
            if not all(isinstance(r.get(k), (int, float)) for k in ("scores_chosen", "scores_rejected")):
                raise DataError(f"{row.origin}: 'scores_chosen' and 'scores_rejected' must be numbers")
        elif "scores" in r:
            if not isinstance(r["scores"], list) or not isinstance(r.get("num_correct"), int) or not (
                0 <= r["num_correct"] <= len(r["scores"])
            ):
                raise DataError(f"{row.origin}: a best-of-N scores row needs a 'scores' list and 'num_correct' within it")
        else:
            raise DataError(f"{row.origin}: a scores row has scores_chosen/scores_rejected or scores/num_correct")
        if benchmark == "rewardbench2" and str(r["subset"]).lower() == "ties" and ":" not in str(r["id"]):
            raise DataError(f"{row.origin}: a Ties row's id must be 'ref:N' or 'tied:N'")
        rows.append(r)
    if not rows:
        raise DataError(f"{path}: no scores rows")
    return rows


def _write(out_dir: Path, summary: dict, rows: list[dict] | None) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    if rows is not None:
        atomic_write_text(out_dir / "scores.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    atomic_write_json(out_dir / "summary.json", summary)


def evaluate(
    model: str, benchmark: str, data: str, out: str | None = None, max_length: int = 4096, batch_size: int = 8,
    dtype: str = "auto", progress: bool = True,
) -> dict[str, Any]:
    from .scorer import load_reward_model, score_items

    if benchmark not in BENCHMARKS:
        raise DataError(f"unknown benchmark '{benchmark}' (one of: {', '.join(BENCHMARKS)})")
    items, load = load_benchmark(benchmark, data)  # every row checked before any model work or writing
    rm, tokenizer, dtype = load_reward_model(model, dtype)
    start = time.perf_counter()
    scores, fmt = score_items(rm, tokenizer, items, max_length, batch_size, progress=progress)
    elapsed = time.perf_counter() - start
    rows = score_rows(items, scores, benchmark)
    summary = {
        "benchmark": benchmark,
        "model": str(model),
        "data": str(data),
        **rules.summarize(benchmark, rows),
        "settings": {"max_length": max_length, "batch_size": batch_size, "dtype": dtype, "truncation": "left",
                     "sort_by_length": True, "chat_template": "tokenizer"},
        "formatting": fmt,
        "load": load,
        "scoring_seconds": round(elapsed, 2),
    }
    if out:
        summary["scores_file"] = str(Path(out) / "scores.jsonl")
        _write(Path(out), summary, rows)
    return summary


def rescore(scores_file: str, benchmark: str, out: str | None = None) -> dict[str, Any]:
    rows = read_scores_file(scores_file, benchmark)
    summary = {"benchmark": benchmark, "scores_file": str(scores_file), **rules.summarize(benchmark, rows)}
    if out:
        _write(Path(out), summary, None)
    return summary


def print_summary(summary: dict[str, Any]) -> None:
    bench = summary["benchmark"]
    print(f"{bench}: score {summary.get('score')} on {summary.get('num_examples')} examples "
          f"(tie rate {summary.get('tie_rate', 0):.2%})")
    fmt = summary.get("formatting")
    if fmt:
        print(f"  {fmt['truncated_items']} item(s) left-truncated to {fmt['max_length']} tokens; "
              f"dtype {summary['settings']['dtype']}; {summary.get('scoring_seconds')} s")
    for key in ("sections", "subsets"):
        for name, value in (summary.get(key) or {}).items():
            print(f"  {name}: {value}")
    for name, curve in (summary.get("best_of_k") or {}).items():
        print(f"  best-of-K {name}: " + ", ".join(f"K={k} {v}" for k, v in curve.items()))
    for key in ("missing_subsets",):
        if summary.get(key):
            print(f"  {key.replace('_', ' ')}: {', '.join(summary[key])}")
    table = comparison_table(bench, summary)
    if table:
        print("\nQwen2.5 report, Table 15 (arXiv 2412.15115):\n" + table)
