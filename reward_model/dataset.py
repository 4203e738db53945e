"""Preference pairs -> tokenised chosen/rejected ids for TRL's RewardTrainer, and the held-out split."""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Any

from qwen_align.errors import DataError
from qwen_align.rm_eval.items import Item
from qwen_align.rm_eval.loaders import split_preference
from qwen_align.rm_eval.scorer import encode


def as_items(rows: list[dict[str, Any]], origin: str) -> list[Item]:
    items = []
    has_margin = None
    for i, row in enumerate(rows):
        prompt, chosen, rejected = split_preference(row, f"{origin}[{i}]")
        margin = row.get("margin")
        if has_margin is None:
            has_margin = margin is not None
        if has_margin != (margin is not None) or (margin is not None and not isinstance(margin, (int, float))):
            raise DataError(f"{origin}[{i}]: 'margin' must be a number on every pair or on none")
        extra = {"margin": float(margin)} if margin is not None else {}
        items.append(Item(id=str(row.get("id", i)), subset="pairs", prompt=prompt, responses=[chosen, rejected],
                          extra=extra))
    return items


def split_heldout(items: list[Item], fraction: float, seed: int) -> tuple[list[Item], list[Item]]:
    """A seeded `fraction` of the pairs held out (at least one when fraction > 0 and there are 2+ pairs)."""
    if fraction <= 0 or len(items) < 2:
        return items, []
    n = min(len(items) - 1, max(1, round(fraction * len(items))))
    order = list(range(len(items)))
    random.Random(seed + 2).shuffle(order)
    held = set(order[:n])
    return [x for i, x in enumerate(items) if i not in held], [items[i] for i in sorted(held)]


@dataclass
class LengthReport:
    pairs_in: int = 0
    pairs_out: int = 0
    truncated: int = 0
    dropped_for_length: int = 0
    longest: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def tokenize_pairs(items: list[Item], tokenizer, max_length: int, on_long: str):
    """A `datasets.Dataset` with chosen_ids/rejected_ids (and margin), and the length report."""
    import datasets

    report = LengthReport(pairs_in=len(items))
    # *_start: where the response begins (the likelihood score reads the response tokens only)
    columns: dict[str, list] = {"chosen_ids": [], "rejected_ids": [], "chosen_start": [], "rejected_start": []}
    with_margin = bool(items) and "margin" in items[0].extra
    if with_margin:
        columns["margin"] = []
    for item in items:
        full = [encode(tokenizer, item.prompt, r, 10**9) for r in item.responses]
        report.longest = max(report.longest, *(len(e.ids) for e in full))
        if max(len(e.ids) for e in full) > max_length:
            if on_long == "drop":
                report.dropped_for_length += 1
                continue
            report.truncated += 1
            full = [encode(tokenizer, item.prompt, r, max_length) for r in item.responses]
        for side, encoded in zip(("chosen", "rejected"), full):
            columns[f"{side}_ids"].append(encoded.ids)
            columns[f"{side}_start"].append(encoded.start)
        if with_margin:
            columns["margin"].append(item.extra["margin"])
    report.pairs_out = len(columns["chosen_ids"])
    if not report.pairs_out:
        raise DataError(f"no training pairs left after dropping {report.dropped_for_length} over max_length {max_length}")
    return datasets.Dataset.from_dict(columns), report
