"""Turn mixed conversations into token ids + assistant masks, enforcing max_length with a count."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import datasets
from transformers import PreTrainedTokenizerBase

from qwen_align.errors import DataError


@dataclass
class LengthReport:
    examples_in: int = 0
    examples_out: int = 0
    truncated: int = 0
    dropped_for_length: int = 0
    dropped_no_target: int = 0  # no assistant token left to learn from (e.g. cut off by truncation)
    tokens: int = 0
    longest: int = 0  # before truncation

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def _tokenize(example: dict[str, Any], tokenizer: PreTrainedTokenizerBase, max_length: int, drop_long: bool) -> dict:
    enc = tokenizer.apply_chat_template(
        example["messages"], tools=example.get("tools"), tokenize=True, return_dict=True,
        return_assistant_tokens_mask=True,
    )
    ids, mask = list(enc["input_ids"]), list(enc["assistant_masks"])
    length = len(ids)
    if length > max_length and not drop_long:
        ids, mask = ids[:max_length], mask[:max_length]
    return {"input_ids": ids, "assistant_masks": mask, "original_length": length, "has_target": 1 in mask}


def tokenize_conversations(
    rows: list[dict[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    on_long: str = "truncate",
    assistant_only_loss: bool = True,
    num_proc: int | None = None,
) -> tuple[datasets.Dataset, LengthReport]:
    keep = ["messages"] + (["tools"] if any("tools" in r for r in rows) else [])
    try:
        ds = datasets.Dataset.from_list([{k: r.get(k) for k in keep} for r in rows])
    except Exception as e:  # pyarrow refuses rows whose nested types disagree
        raise DataError(f"conversations could not be put in one table ({e})") from None
    drop_long = on_long == "drop"
    ds = ds.map(
        _tokenize, fn_kwargs={"tokenizer": tokenizer, "max_length": max_length, "drop_long": drop_long},
        remove_columns=ds.column_names, num_proc=num_proc, desc="Tokenising conversations",
    )
    lengths, has_target = ds["original_length"], ds["has_target"]
    too_long = [n > max_length for n in lengths]
    report = LengthReport(examples_in=len(rows), longest=max(lengths, default=0))
    if drop_long:
        report.dropped_for_length = sum(too_long)
        keep_idx = [i for i, long in enumerate(too_long) if not long and has_target[i]]
    else:
        report.truncated = sum(too_long)
        keep_idx = [i for i, ok in enumerate(has_target) if ok]
    report.dropped_no_target = sum(1 for i, ok in enumerate(has_target) if not ok and not (drop_long and too_long[i]))
    if len(keep_idx) < len(ds):
        ds = ds.select(keep_idx)
    report.examples_out = len(ds)
    report.tokens = sum(min(lengths[i], max_length) for i in keep_idx)
    ds = ds.remove_columns(["original_length", "has_target"] + ([] if assistant_only_loss else ["assistant_masks"]))
    return ds, report
