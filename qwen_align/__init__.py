"""qwen-align: the Qwen2.5 post-training recipe as software.

Core package: model presets and loader, tokenizer and chat template, data loading, the recipe schema and
runner, verifiers, generation, and the `qwen-align` CLI. Stage kinds live in their own packages
(`sft`, `dpo`, `reward_model`, `grpo`) and are reached only through `qwen_align.registry`.
"""

__version__ = "0.1.0"
