"""Turn mixed conversations into token ids + assistant masks, enforcing max_length with a count.

Masks come from the template's `{% generation %}` markers when it has them (Qwen2.5's layout, see
qwen_align.checkpoints.published), else from prefix renders: for each assistant turn i, the text that
rendering messages[:i+1] adds to messages[:i] with a generation prompt is the assistant's; it holds only when
every such render is a prefix of the whole conversation's, which is checked per row.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import datasets
from transformers import PreTrainedTokenizerBase

from qwen_align.checkpoints.published import has_generation_markers
from qwen_align.errors import DataError, UserError

MASK_OPTION_HINT = ("set the stage's `chat_template` (qwen2.5, or a .jinja file with {% generation %} markers) or "
                    "`assistant_mask`")


@dataclass
class LengthReport:
    examples_in: int = 0
    examples_out: int = 0
    truncated: int = 0
    dropped_for_length: int = 0
    dropped_no_target: int = 0  # no assistant token left to learn from (e.g. cut off by truncation)
    dropped_no_prefix: int = 0  # the template's renders of the conversation's prefixes are not its prefixes
    tokens: int = 0
    longest: int = 0  # before truncation

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def mask_mode(tokenizer: PreTrainedTokenizerBase, option: str = "auto") -> str:
    """`markers` or `prefix` for the tokenizer's (training) template under the stage option `assistant_mask`."""
    marked = has_generation_markers(tokenizer.chat_template or "")
    if option == "markers" and not marked:
        raise UserError("assistant_mask: markers: the chat template has no {% generation %} markers; use "
                        "`assistant_mask: prefix` or set `chat_template` to one that has them")
    if option == "auto":
        return "markers" if marked else "prefix"
    return option


def _render(tokenizer, messages, tools, add_generation_prompt=False) -> str:
    return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def assistant_spans(tokenizer: PreTrainedTokenizerBase, messages: list[dict], tools=None) -> tuple[str, list] | None:
    """The whole render and the character spans of what each assistant turn adds to it; None when a prefix
    render is not a prefix of the whole one (no mask can be derived by rendering)."""
    try:
        full = _render(tokenizer, messages, tools)
        spans = []
        for i, message in enumerate(messages):
            if message.get("role") != "assistant":
                continue
            prompt = _render(tokenizer, messages[:i], tools, add_generation_prompt=True)
            upto = _render(tokenizer, messages[: i + 1], tools)
            if not (upto.startswith(prompt) and full.startswith(upto)):
                return None
            added = upto[len(prompt):]
            stripped = added.rstrip()
            # Whitespace after the turn's closing token is the template's separator, not the reply.
            if stripped != added and any(stripped.endswith(t) for t in tokenizer.all_special_tokens):
                added = stripped
            spans.append((len(prompt), len(prompt) + len(added)))
    except Exception:  # a template that cannot render a prefix (e.g. an empty conversation)
        return None
    return full, spans


def prefix_mask(tokenizer: PreTrainedTokenizerBase, messages: list[dict], tools=None) -> tuple[list, list] | None:
    """Token ids of the whole render (tokenised as apply_chat_template does) and a mask marking the tokens that
    start inside an assistant span; None when the prefix property fails."""
    found = assistant_spans(tokenizer, messages, tools)
    if found is None:
        return None
    full, spans = found
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(any(lo <= start < hi for lo, hi in spans)) for start, _ in enc["offset_mapping"]]
    return list(enc["input_ids"]), mask


def _tokenize(example: dict[str, Any], tokenizer: PreTrainedTokenizerBase, max_length: int, drop_long: bool,
              mode: str) -> dict:
    prefix_ok = True
    if mode == "plain":  # loss on every token: no mask needed
        ids = list(tokenizer.apply_chat_template(example["messages"], tools=example.get("tools"), tokenize=True,
                                                 return_dict=True)["input_ids"])
        mask = [1] * len(ids)
    elif mode == "markers":
        enc = tokenizer.apply_chat_template(
            example["messages"], tools=example.get("tools"), tokenize=True, return_dict=True,
            return_assistant_tokens_mask=True,
        )
        ids, mask = list(enc["input_ids"]), list(enc["assistant_masks"])
    else:
        found = prefix_mask(tokenizer, example["messages"], example.get("tools"))
        if found is None:
            prefix_ok = False
            ids = list(tokenizer.apply_chat_template(example["messages"], tools=example.get("tools"), tokenize=True,
                                                     return_dict=True)["input_ids"])
            mask = [0] * len(ids)
        else:
            ids, mask = found
    length = len(ids)
    if length > max_length and not drop_long:
        ids, mask = ids[:max_length], mask[:max_length]
    return {"input_ids": ids, "assistant_masks": mask, "original_length": length, "has_target": 1 in mask,
            "prefix_ok": prefix_ok}


def tokenize_conversations(
    rows: list[dict[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    on_long: str = "truncate",
    assistant_only_loss: bool = True,
    num_proc: int | None = None,
    assistant_mask: str = "auto",
) -> tuple[datasets.Dataset, LengthReport]:
    keep = ["messages"] + (["tools"] if any("tools" in r for r in rows) else [])
    try:
        ds = datasets.Dataset.from_list([{k: r.get(k) for k in keep} for r in rows])
    except Exception as e:  # pyarrow refuses rows whose nested types disagree
        raise DataError(f"conversations could not be put in one table ({e})") from None
    mode = mask_mode(tokenizer, assistant_mask) if assistant_only_loss else "plain"
    drop_long = on_long == "drop"
    ds = ds.map(
        _tokenize, fn_kwargs={"tokenizer": tokenizer, "max_length": max_length, "drop_long": drop_long, "mode": mode},
        remove_columns=ds.column_names, num_proc=num_proc, desc="Tokenising conversations",
    )
    lengths, prefix_ok = ds["original_length"], ds["prefix_ok"]
    has_target = ds["has_target"]
    too_long = [n > max_length for n in lengths]
    report = LengthReport(examples_in=len(rows), longest=max(lengths, default=0))
    if drop_long:
        report.dropped_for_length = sum(too_long)
        keep_idx = [i for i, long in enumerate(too_long) if not long and has_target[i]]
    else:
        report.truncated = sum(too_long)
        keep_idx = [i for i, ok in enumerate(has_target) if ok]
    lost = [i for i, ok in enumerate(has_target) if not ok and not (drop_long and too_long[i])]
    report.dropped_no_prefix = sum(1 for i in lost if not prefix_ok[i])
    report.dropped_no_target = len(lost) - report.dropped_no_prefix
    if len(keep_idx) < len(ds):
        ds = ds.select(keep_idx)
    report.examples_out = len(ds)
    report.tokens = sum(min(lengths[i], max_length) for i in keep_idx)
    if rows and not keep_idx:
        why = (f"{report.dropped_no_target} with no assistant token in the mask, {report.dropped_no_prefix} whose "
               f"template renders break the prefix property, {report.dropped_for_length} over max_length")
        raise DataError(f"no SFT example left to learn from ({why}); " + MASK_OPTION_HINT)
    ds = ds.remove_columns(["original_length", "has_target", "prefix_ok"]
                           + ([] if assistant_only_loss else ["assistant_masks"]))
    return ds, report
