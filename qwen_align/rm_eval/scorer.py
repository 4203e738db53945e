"""Score responses with a reward model (a scalar head or a likelihood RM, see `qwen_align.reward_score`):
chat-template formatting, explicit max length with LEFT truncation (the end of the conversation, where the
reward is read, is kept), batches sorted by length, eval mode, no gradients."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch

from ..errors import UserError
from ..reward_score import checkpoint_likelihood_spec, completion_mask, likelihood_spec, response_start, score_batch
from .items import Item

log = logging.getLogger(__name__)


class Encoded(NamedTuple):
    ids: list[int]
    truncated: bool
    start: int  # index of the response's first token in `ids` (0 when truncation cut into the response)


def encode(tokenizer, prompt: list[dict[str, str]], response: str, max_length: int) -> Encoded:
    """Token ids of prompt + response as the assistant turn (the tokenizer's chat template), left-truncated
    to `max_length`, and where the response starts."""
    messages = [*prompt, {"role": "assistant", "content": response}]
    ids = tokenizer(tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]
    head = tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)
    start = response_start(tokenizer(head, add_special_tokens=False)["input_ids"], ids)
    if len(ids) > max_length:
        cut = len(ids) - max_length
        return Encoded(ids[cut:], True, max(0, start - cut))
    return Encoded(ids, False, start)


@dataclass
class EncodedItems:
    sequences: list[list[int]] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)  # where each sequence's response begins
    owners: list[tuple[int, int]] = field(default_factory=list)  # (item index, response index) per sequence
    truncated_items: int = 0
    longest: int = 0


def encode_items(items: list[Item], tokenizer, max_length: int) -> EncodedItems:
    out = EncodedItems()
    for i, item in enumerate(items):
        cut = False
        for j, response in enumerate(item.responses):
            ids, was_cut, start = encode(tokenizer, item.prompt, response, max_length)
            cut |= was_cut
            out.sequences.append(ids)
            out.starts.append(start)
            out.owners.append((i, j))
            out.longest = max(out.longest, len(ids))
        out.truncated_items += cut
    return out


def batches(lengths: list[int], batch_size: int, sort_by_length: bool = True) -> list[list[int]]:
    """Index batches; sorted longest first so each batch pads to similar lengths (and a memory problem shows
    at the first batch, not the last)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i]) if sort_by_length else list(range(len(lengths)))
    return [order[s : s + batch_size] for s in range(0, len(order), batch_size)]


@torch.no_grad()
def score_sequences(
    model, sequences: list[list[int]], pad_token_id: int, batch_size: int = 8, sort_by_length: bool = True,
    progress: bool = True, desc: str = "scoring", starts: list[int] | None = None,
) -> list[float]:
    """A score per sequence. `starts` (each response's first token) is needed by a likelihood RM only."""
    from tqdm.auto import tqdm

    if pad_token_id is None:
        raise UserError("the reward model's tokenizer has no pad token")
    if starts is None:
        if likelihood_spec(model.config) is not None:
            raise ValueError("a likelihood reward model scores the response only: pass each sequence's start")
        starts = [0] * len(sequences)

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    scores = [0.0] * len(sequences)
    plan = batches([len(s) for s in sequences], batch_size, sort_by_length)
    try:
        for idx in tqdm(plan, desc=desc, unit="batch", disable=not progress):
            width = max(len(sequences[i]) for i in idx)
            ids = torch.full((len(idx), width), pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                ids[row, : len(sequences[i])] = torch.tensor(sequences[i])
                mask[row, : len(sequences[i])] = 1
            response = completion_mask([starts[i] for i in idx], [len(sequences[i]) for i in idx], width)
            batch_scores = score_batch(model, ids.to(device), mask.to(device), response.to(device)).float().tolist()
            for row, i in enumerate(idx):
                scores[i] = batch_scores[row]
    finally:
        model.train(was_training)
    return scores


def score_conversations(model, tokenizer, conversations: list[tuple[list[dict[str, Any]], str]], max_length: int,
                        batch_size: int, sort_by_length: bool = True) -> list[float]:
    """The reward of each (prompt messages, response text), in order, without a progress bar (GRPO's reward
    and the rejection-sampling review call this per batch)."""
    encoded = [encode(tokenizer, prompt, response, max_length) for prompt, response in conversations]
    return score_sequences(model, [e.ids for e in encoded], tokenizer.pad_token_id, batch_size, sort_by_length,
                           progress=False, starts=[e.start for e in encoded])


def score_items(model, tokenizer, items: list[Item], max_length: int, batch_size: int, progress: bool = True
                ) -> tuple[list[list[float]], dict[str, Any]]:
    """Per item, the reward of each response (in the item's order), and formatting stats."""
    enc = encode_items(items, tokenizer, max_length)
    flat = score_sequences(model, enc.sequences, tokenizer.pad_token_id, batch_size, progress=progress,
                           starts=enc.starts)
    per_item: list[list[float]] = [[0.0] * len(it.responses) for it in items]
    for (i, j), s in zip(enc.owners, flat):
        per_item[i][j] = s
    stats = {"sequences": len(enc.sequences), "truncated_items": enc.truncated_items, "longest_tokens": enc.longest,
             "max_length": max_length}
    return per_item, stats


def load_reward_model(path: str | Path, dtype: str = "auto"):
    """A reward model and its tokenizer from a checkpoint folder: a sequence classifier with one output, or a
    causal LM whose config.json marks it a likelihood RM (`qwen_align.reward_score`)."""
    from transformers import AutoModelForSequenceClassification

    from ..lora import is_adapter_folder
    from ..model import load_model, load_reward_scorer, resolve_dtype
    from ..stage import resolve_stage_dtype
    from ..tokenizer import load_tokenizer

    path = Path(path)
    adapter = is_adapter_folder(path)
    if not (path / "config.json").is_file() and not adapter:
        raise UserError(f"--model {path}: not a checkpoint folder (no config.json) nor a LoRA adapter folder")
    tokenizer = load_tokenizer(path)
    dtype = resolve_stage_dtype(dtype)
    likelihood = not adapter and checkpoint_likelihood_spec(path) is not None
    kind = "a causal LM (likelihood reward model)" if likelihood else "a sequence-classification model"
    try:
        if adapter:  # a reward_model stage's `lora.save: adapter` output: base + adapter, merged
            model = load_model(path, "reward", tokenizer=tokenizer, dtype=dtype)
        elif likelihood:
            model = load_reward_scorer(path, tokenizer=tokenizer, dtype=dtype)
        else:
            model = AutoModelForSequenceClassification.from_pretrained(path, dtype=resolve_dtype(dtype))
    except (OSError, ValueError) as e:
        raise UserError(f"--model {path}: cannot load {kind} ({str(e).splitlines()[0]})") from e
    if not likelihood and model.config.num_labels != 1:
        raise UserError(f"--model {path}: a reward model has one output; this one has {model.config.num_labels}")
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if torch.cuda.is_available():
        model = model.to("cuda")
    return model, tokenizer, dtype
