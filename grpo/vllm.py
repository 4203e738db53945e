"""GRPO generation on vLLM through TRL's own integration (GRPOConfig `use_vllm`, `vllm_mode` colocate / server).

Unmeasured here: vllm is not installed on any machine this project runs on (see docs/grpo.md#vllm). The code
only maps the stage's options onto TRL's documented GRPOConfig fields; TRL builds, feeds and syncs the engine.
"""

from __future__ import annotations

from typing import Any

from qwen_align.errors import UserError
from qwen_align.generation import release_accelerator_memory, vllm_available

from .config import Config


def vllm_arguments(stage: Config) -> dict[str, Any]:
    """GRPOConfig keyword arguments for the stage's generation backend ({} for transformers)."""
    if stage.backend != "vllm":
        return {}
    args: dict[str, Any] = {"use_vllm": True, "vllm_mode": stage.vllm_mode}
    if stage.vllm_mode == "colocate":
        args.update(vllm_gpu_memory_utilization=stage.gpu_memory_utilization,
                    vllm_tensor_parallel_size=stage.tensor_parallel_size,
                    vllm_enable_sleep_mode=stage.vllm_sleep_mode)
    elif stage.vllm_server_base_url:
        args["vllm_server_base_url"] = stage.vllm_server_base_url
    return args


def check_vllm_backend(stage: Config) -> None:
    """`backend: vllm` needs vllm and a GPU; the engine (colocate) sizes itself by the free memory, so the
    cached memory of what was loaded and dropped before it is handed back first."""
    if stage.backend != "vllm":
        return
    if not vllm_available():
        raise UserError(f"stage '{stage.name}': backend: vllm needs the vllm package and a CUDA GPU "
                        "(pip install -e '.[gpu]'); use backend: transformers")
    release_accelerator_memory()


def engine_responses(trainer, tokenizer, conversations: list[list[dict]], k: int) -> list[list[str]]:
    """k responses per conversation from the trainer's own vLLM engine, at its current weights (TRL's
    `VLLMGeneration`: the stage's temperature, top_p and max_completion_length), for a pass outside training
    such as the reward-variance ordering. In server mode and under tensor parallelism TRL's `generate` is a
    collective: every rank must call this the same number of times."""
    engine = trainer.vllm_generation
    if trainer.state.global_step != trainer._last_loaded_step:
        engine.sync_weights()
        trainer._last_loaded_step = trainer.state.global_step
    # As GRPOTrainer hands them over: each prompt repeated k times in a row (server mode sends every k-th once
    # with n=k; colocate samples each copy once).
    prompt_ids = [list(tokenizer.apply_chat_template(c, tokenize=True, add_generation_prompt=True,
                                                     return_dict=True)["input_ids"])
                  for c in conversations for _ in range(k)]
    _, completion_ids, _, _ = engine.generate(prompts=prompt_ids, images=None, num_generations=k)
    texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    return [texts[i * k : (i + 1) * k] for i in range(len(conversations))]
