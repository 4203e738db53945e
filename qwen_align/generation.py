"""Sampling from a policy through its chat template, and held-out task accuracy (greedy, verified).

One interface for every stage that generates (evaluation, rejection sampling, GRPO pre-scoring):
`make_sampler(...)` gives a `Sampler` whose `sample(conversations, params)` returns, per conversation,
`params.num_return_sequences` `Sample`s (text without special tokens, whether it ended at <|im_end|> /
<|endoftext|> or ran into max_new_tokens, token count). Two backends:

- `transformers`: batched `model.generate` (left padding, prompts sorted by length), CPU or GPU.
- `vllm`: vLLM's offline `LLM.generate` on a GPU, imported only when chosen. Untested in this repository's
  CI (no GPU there); written against vLLM's documented `LLM` / `SamplingParams` API. Under several
  processes each runs its own engine (`external_launcher`, one GPU per process).

`backend: auto` picks vLLM when it is installed, a GPU is present and the policy is a checkpoint folder, and
says so in one line; transformers otherwise. A vLLM engine starts after the process's cached GPU memory is
released and is shut down by `Sampler.close()` (vLLM's own `cleanup_dist_env_and_memory`). A transformers sampler runs on this process's own device
(`qwen_align.distributed.device()`: `cuda:LOCAL_RANK`, or the CPU). Sampling is seeded
(`SamplingParams.seed`): the same seed, prompts and batch size give the same samples. `generate(...)`
(texts only) is the older, simpler face of the same path.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from . import distributed
from .console import progress
from .data import conversation_problem, iter_rows
from .errors import DataError, UserError
from .verifiers import row_problem, verify


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    num_return_sequences: int = 1
    seed: int | None = None  # None: whatever the global RNG holds


@dataclass(frozen=True)
class Sample:
    text: str  # decoded without special tokens
    finished: bool  # ended with a stop token (False: cut at max_new_tokens)
    num_tokens: int  # generated tokens, the stop token included


Backend = Literal["auto", "transformers", "vllm"]


def prompt_messages(row: dict[str, Any]) -> list[dict[str, Any]]:
    """The prompt part of a conversation: everything before the last assistant turn."""
    messages = row["messages"]
    if messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    return messages


def stop_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """<|im_end|> (the end of an assistant turn), the tokenizer's eos and <|endoftext|>, where they exist."""
    ids = []
    for token in ("<|im_end|>", tokenizer.eos_token, "<|endoftext|>"):
        i = tokenizer.convert_tokens_to_ids(token) if token else None
        if isinstance(i, int) and i != tokenizer.unk_token_id and i not in ids:
            ids.append(i)
    return ids


def chat_prompts(tokenizer: PreTrainedTokenizerBase, conversations: list[list[dict[str, Any]]]) -> list[str]:
    return [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]


@torch.no_grad()
def generate_samples(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    conversations: list[list[dict[str, Any]]],
    params: SamplingParams,
    batch_size: int = 32,
    desc: str = "generating",
    shard_batches: bool = False,
) -> list[list[Sample]]:
    """`params.num_return_sequences` samples per conversation with transformers' `generate`.

    `shard_batches`: under several processes (each holding the whole model) every rank generates its share of
    the batches and all get every result. The batches are the ones one process forms, and with a seed each
    batch is seeded on its own (seed + batch index), so the samples do not depend on the number of processes.
    """
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    end_ids = stop_token_ids(tokenizer)
    if params.seed is not None and not shard_batches:
        torch.manual_seed(params.seed)  # also seeds every CUDA device
    try:
        # Sort by length so a batch pads little; restore the order afterwards.
        texts = chat_prompts(tokenizer, conversations)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
        if shard_batches:
            per_batch = distributed.sharded_map(
                lambda mine: [_generate_batch(model, tokenizer, texts, idx, params, end_ids, seed_offset=k)
                              for k, idx in mine],
                list(enumerate(batches)),
            )
            results = {i: samples for batch in per_batch for i, samples in batch.items()}
            return [results[i] for i in range(len(texts))]
        results: dict[int, list[Sample]] = {}
        for idx in progress(batches, desc=desc, unit="batch"):
            results.update(_generate_batch(model, tokenizer, texts, idx, params, end_ids))
        return [results[i] for i in range(len(texts))]
    finally:
        tokenizer.padding_side = side
        model.train(was_training)


def _generate_batch(model, tokenizer, texts, idx, params: SamplingParams, end_ids, seed_offset: int | None = None):
    """{conversation index: its samples} for one batch; `seed_offset` given: the batch seeded on its own."""
    sample = params.temperature > 0
    n = params.num_return_sequences
    if seed_offset is not None and params.seed is not None:
        torch.manual_seed(params.seed + seed_offset)
    enc = tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    generated = model.generate(
        **enc, max_new_tokens=params.max_new_tokens, do_sample=sample,
        temperature=params.temperature if sample else None, top_p=params.top_p if sample else None, top_k=None,
        num_return_sequences=n, eos_token_id=end_ids, pad_token_id=tokenizer.pad_token_id,
    )
    new_tokens = generated[:, enc["input_ids"].shape[1] :].tolist()
    decoded = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    samples = [_sample(text, tokens, end_ids) for text, tokens in zip(decoded, new_tokens)]
    return {i: samples[j * n : (j + 1) * n] for j, i in enumerate(idx)}


def _sample(text: str, tokens: list[int], end_ids: list[int]) -> Sample:
    for k, t in enumerate(tokens):
        if t in end_ids:
            return Sample(text, True, k + 1)
    return Sample(text, False, len(tokens))


def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    conversations: list[list[dict[str, Any]]],
    params: SamplingParams,
    batch_size: int = 32,
    desc: str = "generating",
    shard_batches: bool = False,
) -> list[list[str]]:
    """Responses (num_return_sequences per conversation), decoded without special tokens."""
    samples = generate_samples(model, tokenizer, conversations, params, batch_size=batch_size, desc=desc,
                               shard_batches=shard_batches)
    return [[s.text for s in group] for group in samples]


def release_accelerator_memory() -> None:
    """Hand the memory of dead tensors back to the GPU (before an engine sizes itself by what is free)."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class Sampler:
    """Samples responses to chat prompts; see `make_sampler`. `close()` frees what it holds on the GPU."""

    backend: str = ""

    def sample(self, conversations: list[list[dict[str, Any]]], params: SamplingParams) -> list[list[Sample]]:
        raise NotImplementedError

    def close(self) -> None:
        release_accelerator_memory()


class TransformersSampler(Sampler):
    backend = "transformers"

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, batch_size: int = 32):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        model.config.use_cache = True

    def sample(self, conversations, params):
        return generate_samples(self.model, self.tokenizer, conversations, params, self.batch_size, desc="sampling")

    def close(self) -> None:
        self.model = None
        super().close()


class VLLMSampler(Sampler):
    """vLLM's offline engine on the checkpoint folder `path`. UNTESTED here (needs vLLM and a GPU)."""

    backend = "vllm"

    def __init__(self, path: str, tokenizer: PreTrainedTokenizerBase, *, dtype: str = "auto", seed: int = 0,
                 gpu_memory_utilization: float = 0.9, tensor_parallel_size: int = 1, max_model_len: int | None = None):
        from vllm import LLM

        self.tokenizer = tokenizer
        release_accelerator_memory()  # vLLM takes gpu_memory_utilization of the memory that is free now
        self.llm = LLM(**vllm_engine_arguments(path, dtype=dtype, seed=seed,
                                               gpu_memory_utilization=gpu_memory_utilization,
                                               tensor_parallel_size=tensor_parallel_size, max_model_len=max_model_len))

    def close(self) -> None:
        """Shut the engine down as vLLM's maintainers advise: drop it, then `cleanup_dist_env_and_memory()`
        (which also ends vLLM's process group; under torchrun the launch's own group stays, so only memory goes)."""
        if getattr(self, "llm", None) is None:
            return
        self.llm = None
        if distributed.is_distributed():
            super().close()
            return
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        cleanup_dist_env_and_memory()

    def sample(self, conversations, params):
        from vllm import SamplingParams as VLLMParams

        end_ids = stop_token_ids(self.tokenizer)
        prompts = chat_prompts(self.tokenizer, conversations)
        per_prompt = [
            VLLMParams(
                n=params.num_return_sequences, temperature=params.temperature, top_p=params.top_p,
                max_tokens=params.max_new_tokens, stop_token_ids=end_ids, skip_special_tokens=True,
                # One seed per request: identical prompts still get independent samples.
                seed=None if params.seed is None else params.seed + i,
            )
            for i in range(len(prompts))
        ]
        outputs = self.llm.generate(prompts, per_prompt, use_tqdm=True)
        return [
            [Sample(o.text, o.finish_reason == "stop", len(o.token_ids)) for o in sorted(out.outputs, key=lambda o: o.index)]
            for out in outputs
        ]


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()


def vllm_engine_arguments(path: str | Path, *, dtype: str = "auto", seed: int = 0, gpu_memory_utilization: float = 0.9,
                          tensor_parallel_size: int = 1, max_model_len: int | None = None) -> dict[str, Any]:
    """The keyword arguments of `vllm.LLM(...)` for the checkpoint folder `path` (its tokenizer travels with it)."""
    return dict(model=str(path), tokenizer=str(path), dtype=dtype, seed=seed,
                gpu_memory_utilization=gpu_memory_utilization, tensor_parallel_size=tensor_parallel_size,
                max_model_len=max_model_len, **_vllm_launch_options(tensor_parallel_size))


def resolve_backend(backend: Backend, source: str) -> str:
    """`auto`: vLLM when installed on a GPU and `source` is a checkpoint folder (said in one line); transformers
    otherwise."""
    if backend == "auto":
        if vllm_available() and (Path(source) / "config.json").is_file():
            if distributed.is_main():
                print("backend: auto picked vLLM (installed, and a GPU is present); set `backend: transformers` "
                      "to sample with transformers instead")
            return "vllm"
        return "transformers"
    if backend == "vllm" and not vllm_available():
        raise UserError("backend: vllm needs the vllm package and a CUDA GPU (pip install -e '.[gpu]'); use auto or transformers")
    return backend


def _vllm_launch_options(tensor_parallel_size: int) -> dict[str, Any]:
    """Under several processes: one engine per process on its own GPU (vLLM's torchrun-style data parallel)."""
    if not distributed.is_distributed():
        return {}
    if tensor_parallel_size != 1:
        raise UserError(f"backend: vllm with tensor_parallel_size {tensor_parallel_size} under "
                        f"{distributed.world_size()} processes is not supported; launch one process (vLLM splits the "
                        "model itself) or set tensor_parallel_size: 1 (one engine per process)")
    # As TRL's colocated vLLM does: each torchrun process builds a 1-GPU engine on cuda:LOCAL_RANK.
    return {"distributed_executor_backend": "external_launcher"}


def make_sampler(
    backend: Backend, source: str, tokenizer: PreTrainedTokenizerBase, load_model, *, batch_size: int = 32,
    seed: int = 0, dtype: str = "auto", device: torch.device | str | None = None, **vllm_options: Any,
) -> Sampler:
    """A sampler for the policy at `source`; `load_model()` builds the transformers model when that path is taken.

    Each process samples on its own device: `device`, by default `qwen_align.distributed.device()`.
    """
    chosen = resolve_backend(backend, source)
    if chosen == "vllm":
        if not (Path(source) / "config.json").is_file():
            raise UserError(f"backend: vllm needs a checkpoint folder, not {source!r}")
        return VLLMSampler(source, tokenizer, dtype=dtype, seed=seed, **vllm_options)
    return TransformersSampler(load_model().to(device or distributed.device()), tokenizer, batch_size)


def eval_row_problem(row: dict[str, Any]) -> str | None:
    """Why `row` is not a task-eval row (a conversation whose prompt a verifier can check), or None."""
    problem = conversation_problem(row, need_assistant=False)
    if problem is None and not prompt_messages(row):
        problem = "'messages' holds only the answer; give the prompt before it"
    return problem or row_problem(row)


def load_eval_rows(path: str, limit: int | None = None) -> list[dict[str, Any]]:
    """The first `limit` rows of `path` (all by default); every row of the file is checked, with its file:line."""
    rows = []
    for row in iter_rows(path):
        problem = eval_row_problem(row.data)
        if problem:
            raise DataError(f"{row.origin}: {problem} (task_eval row)")
        rows.append(row.data)
    if not rows:
        raise DataError(f"{path}: no task_eval rows")
    return rows[:limit] if limit else rows


def task_accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    rows: list[dict[str, Any]],
    max_new_tokens: int = 32,
    batch_size: int = 64,
    shard_batches: bool = False,
) -> dict[str, Any]:
    """Greedy answers to held-out prompts, checked by each row's verifier (`shard_batches`: see generate_samples)."""
    responses = generate(
        model, tokenizer, [prompt_messages(r) for r in rows], SamplingParams(max_new_tokens=max_new_tokens),
        batch_size=batch_size, desc="held-out eval", shard_batches=shard_batches,
    )
    passed = Counter()
    total = Counter()
    for row, (response,) in zip(rows, responses):
        family = row.get("family", row["verifier"])
        total[family] += 1
        passed[family] += verify(row, response).passed
    n = sum(total.values())
    return {
        "accuracy": sum(passed.values()) / n if n else 0.0,
        "num_examples": n,
        "by_family": {f: passed[f] / total[f] for f in sorted(total)},
        "examples": [{"prompt": prompt_messages(r)[-1]["content"], "response": resp[0]} for r, resp in zip(rows[:3], responses[:3])],
    }
