"""Sampling interface: seeded, n per prompt, stop/truncation flags, backend choice (vLLM absent here)."""

from __future__ import annotations

import pytest

from qwen_align.errors import UserError
from qwen_align.generation import (
    SamplingParams, TransformersSampler, generate, make_sampler, resolve_backend, stop_token_ids,
)
from qwen_align.model import load_model

PROMPTS = [[{"role": "user", "content": "What is 12+13?"}], [{"role": "user", "content": "What is 4+5? Answer now."}]]


@pytest.fixture(scope="module")
def tiny(demo_tokenizer):
    return load_model("tiny", "policy", tokenizer=demo_tokenizer, seed=0)


def test_n_samples_per_prompt_seeded(tiny, demo_tokenizer):
    sampler = TransformersSampler(tiny, demo_tokenizer, batch_size=2)
    params = SamplingParams(max_new_tokens=5, temperature=1.0, num_return_sequences=3, seed=7)
    first = sampler.sample(PROMPTS, params)
    assert [len(g) for g in first] == [3, 3]
    assert sampler.sample(PROMPTS, params) == first  # same seed, same samples
    other = sampler.sample(PROMPTS, SamplingParams(max_new_tokens=5, temperature=1.0, num_return_sequences=3, seed=8))
    assert other != first
    for group in first:
        for s in group:
            assert 1 <= s.num_tokens <= 5
            if not s.finished:
                assert s.num_tokens == 5  # only a response that ran into max_new_tokens is unfinished
            assert "<|im_end|>" not in s.text


def test_truncation_flag(tiny, demo_tokenizer):
    # One new token cannot hold both a word and <|im_end|>: unless the model stops at once, it is cut.
    groups = TransformersSampler(tiny, demo_tokenizer).sample(PROMPTS, SamplingParams(max_new_tokens=1, temperature=1.0, seed=0))
    for (s,) in groups:
        assert s.num_tokens == 1 and s.finished == (s.text == "")


def test_generate_keeps_its_face(tiny, demo_tokenizer):
    texts = generate(tiny, demo_tokenizer, PROMPTS, SamplingParams(max_new_tokens=3))
    assert len(texts) == 2 and all(len(t) == 1 and isinstance(t[0], str) for t in texts)
    assert generate(tiny, demo_tokenizer, PROMPTS, SamplingParams(max_new_tokens=3)) == texts  # greedy


def test_stop_tokens_include_im_end(demo_tokenizer):
    assert demo_tokenizer.convert_tokens_to_ids("<|im_end|>") in stop_token_ids(demo_tokenizer)


def test_backend_choice_without_vllm(tmp_path, demo_tokenizer, tiny):
    assert resolve_backend("auto", "tiny") == "transformers"
    assert resolve_backend("transformers", str(tmp_path)) == "transformers"
    with pytest.raises(UserError, match="vllm"):
        resolve_backend("vllm", str(tmp_path))
    sampler = make_sampler("auto", "tiny", demo_tokenizer, lambda: tiny, batch_size=4)
    assert sampler.backend == "transformers"
