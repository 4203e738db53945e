"""How a reward model turns a tokenised conversation into one score. Every scorer (the reward_model stage's
held-out pairs and training loss, GRPO's reward, `qwen-align rm-eval`) goes through here.

Two kinds of reward model:

- `scalar`: a `Qwen2ForSequenceClassification`; the score is its one logit at the last token.
- `likelihood`: a causal LM; the score is beta x the mean log-probability of the response tokens given the
  prompt (every token after the generation prompt: the answer, the end-of-turn token and what the chat
  template puts after it; SimPO's reward; RewardBench scores reference-free DPO models the same way). A scalar head must
  judge the whole response in the one pass that reaches the last token; the likelihood score reads the
  model's prediction at every response token, which a small model does far better (docs/demo.md). The
  checkpoint is a plain Qwen2 causal LM whose config.json carries `reward_score: {kind: likelihood, beta}`.
"""

from __future__ import annotations

from typing import Any

import torch

CONFIG_KEY = "reward_score"
LIKELIHOOD = "likelihood"


def likelihood_spec(config: Any) -> dict[str, Any] | None:
    """The `reward_score` entry of a model config (object or config.json dict) when it is a likelihood RM."""
    spec = config.get(CONFIG_KEY) if isinstance(config, dict) else getattr(config, CONFIG_KEY, None)
    return spec if isinstance(spec, dict) and spec.get("kind") == LIKELIHOOD else None


def checkpoint_likelihood_spec(path) -> dict[str, Any] | None:
    """The likelihood mark of a checkpoint folder's config.json (None: not a folder, or not marked)."""
    from pathlib import Path

    from .checkpoints.published import is_checkpoint, read_json
    from .errors import UserError

    if not is_checkpoint(path):
        return None
    spec = likelihood_spec(read_json(Path(path) / "config.json"))
    beta = spec.get("beta") if spec is not None else None
    if spec is not None and (isinstance(beta, bool) or not isinstance(beta, (int, float)) or not beta > 0):
        raise UserError(f"{Path(path) / 'config.json'}: {CONFIG_KEY}.beta must be a positive number (got {beta!r})")
    return spec


def copy_mark(source_config: Any, model) -> None:
    """Carry a likelihood mark over to a model rebuilt from the trained one (e.g. merged on a plain base)."""
    spec = likelihood_spec(source_config)
    if spec is not None:
        mark_likelihood(model, spec["beta"])


def mark_likelihood(model, beta: float) -> None:
    """Record on the model's config (and so in every checkpoint written from it) how it scores."""
    setattr(model.config, CONFIG_KEY, {"kind": LIKELIHOOD, "beta": float(beta)})
    model.config.num_labels = 1  # one score per sequence (a causal LM ignores it; reward trainers check it)


def response_start(prompt_ids: list[int], full_ids: list[int]) -> int:
    """Where the response begins in `full_ids`: the length of its common prefix with the prompt rendered with
    the generation prompt (a BPE merge across the boundary moves the start to the first token that differs)."""
    n = 0
    for a, b in zip(prompt_ids, full_ids):
        if a != b:
            break
        n += 1
    return min(n, len(full_ids) - 1)


def completion_mask(starts: list[int], lengths: list[int], width: int) -> torch.Tensor:
    """1 on each row's response tokens (from its start to its length), 0 on prompt and padding."""
    positions = torch.arange(width)[None, :]
    start = torch.tensor(starts)[:, None]
    end = torch.tensor(lengths)[:, None]
    return ((positions >= start) & (positions < end)).long()


def likelihood_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor,
                      beta: float) -> torch.Tensor:
    """beta x mean log p(response token | everything before it), per row; differentiable (the training loss
    uses it). A token at position 0 has nothing before it and is not counted.

    Logits are made only from the batch's first response position on (`logits_to_keep`): with long prompts
    the [rows, positions, vocab] tensor covers the responses, not the whole conversation."""
    width = input_ids.shape[1]
    counted = response_mask[:, 1:].bool().any(0).nonzero()
    first = int(counted[0]) + 1 if len(counted) else width - 1  # first position whose token is scored
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                   logits_to_keep=width - first + 1).logits[:, :-1]  # predictions of tokens first..width-1
    targets = input_ids[:, first:]
    mask = response_mask[:, first:].float()  # float: a bf16 sum miscounts past 256 tokens
    # log_softmax in fp32: bf16 log-probs of a 152K vocabulary lose the differences being compared
    token_logp = torch.gather(torch.log_softmax(logits, -1, dtype=torch.float32), 2, targets[..., None])[..., 0]
    return beta * (token_logp * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def score_batch(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor
                ) -> torch.Tensor:
    """One score per row, for either kind of reward model (no gradients needed by the caller's context)."""
    spec = likelihood_spec(model.config)
    if spec is not None:
        return likelihood_scores(model, input_ids, attention_mask, response_mask, spec["beta"])
    return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, 0]
