"""Read each benchmark's released format (JSON, JSONL, Parquet, save_to_disk; a file or a folder read
recursively) into `Item`s. A row that does not fit stops the load with its file and row."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..data import iter_rows, preference_problem
from ..errors import DataError
from .items import Item, as_messages, as_text, need

BENCHMARKS = ("rewardbench", "rewardbench2", "rmb", "ppe", "pairs")

# PPE's correctness sets do not name themselves in their rows; the file or folder name does.
PPE_SETS = {"mmlu": "MMLU-Pro", "math": "MATH", "gpqa": "GPQA", "ifeval": "IFEval", "mbpp": "MBPP-Plus"}
PPE_HUMAN = "Human Preference"


class LoadStats:
    def __init__(self) -> None:
        self.rows = 0
        self.skipped: dict[str, int] = {}

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1


def load_benchmark(benchmark: str, path: str | Path) -> tuple[list[Item], dict[str, Any]]:
    """Items of `benchmark` read from `path`, and load counts ({"rows": n, "skipped": {...}})."""
    if benchmark not in BENCHMARKS:
        raise DataError(f"unknown benchmark '{benchmark}' (one of: {', '.join(BENCHMARKS)})")
    convert: Callable[[dict, str, int, LoadStats], Item | None] = CONVERTERS[benchmark]
    stats = LoadStats()
    items = []
    for index, row in enumerate(_rows(path)):
        stats.rows += 1
        item = convert(row.data, row.origin, index, stats)
        if item is not None:
            items.append(item)
    if not items:
        raise DataError(f"{path}: no {benchmark} items to score ({stats.rows} rows read)")
    _check_unique_ids(items, path)
    return items, {"rows": stats.rows, "skipped": stats.skipped, "items": len(items)}


def _rows(path: str | Path) -> Iterator:
    p = Path(path)
    if not p.exists():
        raise DataError(f"{path}: benchmark data not found")
    yield from iter_rows(p)


def _check_unique_ids(items: list[Item], path) -> None:
    seen: set[tuple[str, str]] = set()
    for item in items:
        key = (item.subset, item.id)
        if key in seen:
            raise DataError(f"{path}: id '{item.id}' appears twice in subset '{item.subset}'")
        seen.add(key)


def _id(row: dict, key: str, index: int) -> str:
    value = row.get(key)
    return str(index) if value is None else str(value)


# ---------------------------------------------------------------- RewardBench 1 and 2


def rewardbench_item(row: dict, origin: str, index: int, stats: LoadStats) -> Item:
    need(row, ("prompt", "chosen", "rejected", "subset"), origin, "RewardBench")
    return Item(
        id=_id(row, "id", index), subset=str(row["subset"]), prompt=as_messages(row["prompt"], origin),
        responses=[as_text(row["chosen"], origin, "chosen"), as_text(row["rejected"], origin, "rejected")],
    )


def rewardbench2_item(row: dict, origin: str, index: int, stats: LoadStats) -> Item:
    need(row, ("prompt", "chosen", "rejected", "subset"), origin, "RewardBench 2")
    chosen, rejected = row["chosen"], row["rejected"]
    if not isinstance(chosen, list) or not isinstance(rejected, list) or not chosen or not rejected:
        raise DataError(f"{origin}: RewardBench 2 'chosen' and 'rejected' must be non-empty lists of responses")
    responses = [as_text(r, origin, "chosen") for r in chosen] + [as_text(r, origin, "rejected") for r in rejected]
    subset = str(row["subset"])
    item_id = _id(row, "id", index)
    if subset.lower() == "ties" and not re.fullmatch(r"(ref|tied):\d+", item_id):
        raise DataError(f"{origin}: a Ties row's id must be 'ref:N' or 'tied:N' (got {item_id!r})")
    return Item(id=item_id, subset=subset, prompt=as_messages(row["prompt"], origin), responses=responses,
                num_correct=len(chosen), pairwise=False)


# ---------------------------------------------------------------- RMB


def _answer(value: Any, origin: str, name: str) -> str:
    if not isinstance(value, dict) or not isinstance(value.get("answer"), str):
        raise DataError(f"{origin}: '{name}' must be an object with a text 'answer'")
    return value["answer"]


def rmb_item(row: dict, origin: str, index: int, stats: LoadStats) -> Item:
    if "bon_best" in row or "loser_list" in row:
        need(row, ("conversation_input", "bon_best", "loser_list", "category_path"), origin, "RMB best-of-N")
        losers = row["loser_list"]
        if not isinstance(losers, list) or not losers:
            raise DataError(f"{origin}: 'loser_list' must be a non-empty list of {{llm_name, answer}}")
        responses = [_answer(row["bon_best"], origin, "bon_best")]
        responses += [_answer(x, origin, f"loser_list[{i}]") for i, x in enumerate(losers)]
        item_id, pairwise = _id(row, "bon_uid", index), False
    else:
        need(row, ("conversation_input", "chosen", "reject", "category_path"), origin, "RMB pairwise")
        responses = [_answer(row["chosen"], origin, "chosen"), _answer(row["reject"], origin, "reject")]
        item_id, pairwise = _id(row, "pair_uid", index), True
    path = str(row["category_path"])
    return Item(id=item_id, subset=path, prompt=as_messages(row["conversation_input"], origin, "conversation_input"),
                responses=responses, pairwise=pairwise, extra={"category_path": path})


# ---------------------------------------------------------------- PPE


def _source_file(origin: str) -> str:
    return re.sub(r"(:\d+|\[\d+\])$", "", origin)


def ppe_set_name(row: dict, origin: str) -> str:
    for key in ("benchmark", "subset"):
        if isinstance(row.get(key), str):
            named = [label for k, label in PPE_SETS.items() if k in row[key].lower()]
            return named[0] if len(named) == 1 else row[key]
    for part in reversed(Path(_source_file(origin)).parts):  # the file name first, then its folders
        found = [label for key, label in PPE_SETS.items() if key in part.lower()]
        if len(found) == 1:
            return found[0]
        if found:
            break
    raise DataError(f"{origin}: cannot tell which PPE correctness set this row is from; name the file after "
                    f"it (mmlu-pro, math, gpqa, ifeval, mbpp-plus) or give rows a 'benchmark' field")


def _response_columns(row: dict) -> list[str]:
    cols = [(int(m.group(1)), k) for k in row if (m := re.fullmatch(r"response_(\d+)", k))]
    return [k for _, k in sorted(cols)]


def ppe_item(row: dict, origin: str, index: int, stats: LoadStats) -> Item | None:
    if "winner" in row:  # human preference pairs
        need(row, ("prompt", "response_1", "response_2", "winner"), origin, "PPE human-preference")
        winner = row["winner"]
        if winner not in ("model_a", "model_b"):
            stats.skip("human preference ties")  # no preferred response to check
            return None
        a, b = as_text(row["response_1"], origin, "response_1"), as_text(row["response_2"], origin, "response_2")
        chosen, rejected = (a, b) if winner == "model_a" else (b, a)
        return Item(id=_id(row, "question_id", index), subset=PPE_HUMAN, prompt=as_messages(row["prompt"], origin),
                    responses=[chosen, rejected], extra={"winner": winner})
    need(row, ("prompt", "scores"), origin, "PPE correctness (or a human-preference row with 'winner')")
    cols = _response_columns(row)
    labels = row["scores"]
    if not cols or not isinstance(labels, list) or len(labels) != len(cols):
        raise DataError(f"{origin}: a PPE correctness row needs response_1..response_K and 'scores' with K 0/1 labels "
                        f"(found {len(cols)} responses, {len(labels) if isinstance(labels, list) else 'no'} labels)")
    if any(x not in (0, 1, True, False) for x in labels):
        raise DataError(f"{origin}: PPE 'scores' must be 0/1 correctness labels")
    order = sorted(range(len(cols)), key=lambda i: not labels[i])  # correct first, original order kept within
    extra: dict[str, Any] = {"order": order}
    pairs = row.get("sampled_conflict_pairs")
    if pairs is not None:
        extra["conflict_pairs"] = [[int(x) for x in p] for p in pairs]
    return Item(
        id=_id(row, "question_id", index), subset=ppe_set_name(row, origin), prompt=as_messages(row["prompt"], origin),
        responses=[as_text(row[cols[i]], origin, cols[i]) for i in order], num_correct=int(sum(map(bool, labels))),
        pairwise=False, extra=extra,
    )


# ---------------------------------------------------------------- TRL preference pairs


def split_preference(row: dict, origin: str) -> tuple[list[dict], str, str]:
    """A TRL preference row (explicit or implicit prompt; text or messages) as (prompt messages, chosen, rejected)."""
    problem = preference_problem(row)
    if problem:
        raise DataError(f"{origin}: {problem}")
    chosen, rejected, prompt = row["chosen"], row["rejected"], row.get("prompt")
    if isinstance(chosen, str):
        return as_messages(prompt, origin), chosen, rejected
    prompt_msgs = as_messages(prompt, origin) if prompt is not None else as_messages(chosen[:-1], origin, "chosen")
    if prompt is not None:
        prompt_msgs = prompt_msgs + as_messages(chosen[:-1], origin, "chosen")
    return prompt_msgs, chosen[-1]["content"], rejected[-1]["content"]


def pairs_item(row: dict, origin: str, index: int, stats: LoadStats) -> Item:
    prompt, chosen, rejected = split_preference(row, origin)
    extra = {"margin": float(row["margin"])} if isinstance(row.get("margin"), (int, float)) else {}
    return Item(id=_id(row, "id", index), subset=str(row.get("subset") or "pairs"), prompt=prompt,
                responses=[chosen, rejected], extra=extra)


CONVERTERS = {
    "rewardbench": rewardbench_item,
    "rewardbench2": rewardbench2_item,
    "rmb": rmb_item,
    "ppe": ppe_item,
    "pairs": pairs_item,
}
