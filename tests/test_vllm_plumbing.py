"""vLLM through the libraries' own integrations, with vllm absent: what reaches TRL's GRPOConfig and vLLM's `LLM`,
that an engine starts after the GPU cache is handed back and is shut down after use, and that `backend: auto`
says so when it picks vLLM. (The engines themselves are unmeasured: vllm is installed on no machine here.)"""

from __future__ import annotations

import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from grpo.config import Config as GRPOStage
from grpo.stage import training_args
from grpo.vllm import check_vllm_backend, engine_responses, vllm_arguments
from qwen_align import generation
from qwen_align.errors import UserError
from qwen_align.generation import SamplingParams, VLLMSampler, resolve_backend


def context(tmp_path):
    recipe = SimpleNamespace(source=None, integrations=lambda stage: [])  # no trackers
    return SimpleNamespace(checkpoints_dir=tmp_path / "ckpt", seed=3, recipe=recipe)


def test_grpo_vllm_options_reach_grpo_config(tmp_path):
    plain = training_args(GRPOStage(name="g"), context(tmp_path))
    assert plain.use_vllm is False
    colocate = training_args(GRPOStage(name="g", backend="vllm", gpu_memory_utilization=0.25,
                                       tensor_parallel_size=2, vllm_sleep_mode=True), context(tmp_path))
    assert (colocate.use_vllm, colocate.vllm_mode, colocate.vllm_gpu_memory_utilization,
            colocate.vllm_tensor_parallel_size, colocate.vllm_enable_sleep_mode) == (True, "colocate", 0.25, 2, True)
    server = training_args(GRPOStage(name="g", backend="vllm", vllm_mode="server",
                                     vllm_server_base_url="http://gen:8000"), context(tmp_path))
    assert (server.use_vllm, server.vllm_mode, server.vllm_server_base_url) == (True, "server", "http://gen:8000")
    assert server.vllm_gpu_memory_utilization == 0.3  # TRL's default: colocate-only options stay untouched
    assert vllm_arguments(GRPOStage(name="g")) == {}


def test_grpo_vllm_options_need_the_vllm_backend():
    with pytest.raises(ValidationError, match="need `backend: vllm`"):
        GRPOStage(name="g", vllm_mode="server")
    with pytest.raises(UserError, match="backend: vllm needs the vllm package and a CUDA GPU"):
        check_vllm_backend(GRPOStage(name="g", backend="vllm"))
    check_vllm_backend(GRPOStage(name="g"))  # transformers: nothing to check


def test_ordering_responses_from_the_trainers_engine(demo_tokenizer):
    calls = []

    class Engine:
        def sync_weights(self):
            calls.append("sync")

        def generate(self, prompts, images, num_generations):
            calls.append(("generate", len(prompts), num_generations))
            assert prompts[0] == prompts[1] != prompts[2]  # each prompt twice in a row, as GRPOTrainer sends them
            ids = [demo_tokenizer(f"answer {i}", add_special_tokens=False)["input_ids"] for i in range(len(prompts))]
            return prompts, ids, None, None

    trainer = SimpleNamespace(vllm_generation=Engine(), state=SimpleNamespace(global_step=5), _last_loaded_step=4)
    convs = [[{"role": "user", "content": "1+1?"}], [{"role": "user", "content": "2+2?"}]]
    out = engine_responses(trainer, demo_tokenizer, convs, k=2)
    assert out == [["answer 0", "answer 1"], ["answer 2", "answer 3"]]
    assert calls == ["sync", ("generate", 4, 2)] and trainer._last_loaded_step == 5
    engine_responses(trainer, demo_tokenizer, convs, k=2)
    assert calls.count("sync") == 1  # same step: the engine already holds these weights


@pytest.fixture
def fake_vllm(monkeypatch):
    """A stand-in `vllm` package recording what the sampler hands it."""
    seen = {"events": []}

    class LLM:
        def __init__(self, **kwargs):
            seen["events"].append("engine")
            seen["llm"] = kwargs

        def generate(self, prompts, params, use_tqdm=True):
            seen["params"] = params
            out = SimpleNamespace(text="4", finish_reason="stop", token_ids=[1, 2], index=0)
            return [SimpleNamespace(outputs=[out]) for _ in prompts]

    def cleanup():
        seen["events"].append("cleanup")

    vllm = types.ModuleType("vllm")
    vllm.LLM, vllm.SamplingParams = LLM, lambda **kw: kw
    parallel_state = types.ModuleType("vllm.distributed.parallel_state")
    parallel_state.cleanup_dist_env_and_memory = cleanup
    for name, module in {"vllm": vllm, "vllm.distributed": types.ModuleType("vllm.distributed"),
                         "vllm.distributed.parallel_state": parallel_state}.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(generation, "release_accelerator_memory", lambda: seen["events"].append("release"))
    return seen


def test_rejection_sampling_engine_arguments_and_shutdown(fake_vllm, demo_tokenizer, tmp_path):
    sampler = VLLMSampler(tmp_path, demo_tokenizer, dtype="bfloat16", seed=7, gpu_memory_utilization=0.5)
    assert fake_vllm["events"] == ["release", "engine"]  # the cache handed back before the engine sizes itself
    assert fake_vllm["llm"] == {"model": str(tmp_path), "tokenizer": str(tmp_path), "dtype": "bfloat16", "seed": 7,
                                "gpu_memory_utilization": 0.5, "tensor_parallel_size": 1, "max_model_len": None}
    samples = sampler.sample([[{"role": "user", "content": "2+2?"}]] * 2,
                             SamplingParams(max_new_tokens=5, temperature=0.7, num_return_sequences=1, seed=10))
    assert [s[0].text for s in samples] == ["4", "4"] and samples[0][0].finished
    first, second = fake_vllm["params"]
    assert (first["n"], first["max_tokens"], first["temperature"], first["seed"], second["seed"]) == (1, 5, 0.7, 10, 11)
    assert demo_tokenizer.convert_tokens_to_ids("<|im_end|>") in first["stop_token_ids"]
    sampler.close()
    sampler.close()  # once only
    assert fake_vllm["events"] == ["release", "engine", "cleanup"]


def test_auto_says_when_it_picks_vllm(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(generation, "vllm_available", lambda: True)
    (tmp_path / "config.json").write_text("{}")
    assert resolve_backend("auto", str(tmp_path)) == "vllm"
    assert "backend: auto picked vLLM" in capsys.readouterr().out
    assert resolve_backend("auto", "tiny") == "transformers"  # a preset: no folder for an engine
    assert resolve_backend("transformers", str(tmp_path)) == "transformers"
    assert capsys.readouterr().out == ""


def test_rejection_sampling_closes_its_sampler_after_its_chunks():
    from dpo.rejection_sampling.stage import ChunkRunner

    closed = []
    runner = ChunkRunner.__new__(ChunkRunner)
    runner._sampler = SimpleNamespace(close=lambda: closed.append(True))
    with runner:
        pass
    assert closed == [True] and runner._sampler is None
