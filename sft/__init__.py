"""Supervised fine-tuning stage (TRL's SFTTrainer with a fused chunked loss)."""

from .config import Config


def run(stage, context):
    # Imported on use so `qwen-align plan` validates recipes without loading torch and TRL.
    from .stage import run as run_sft

    return run_sft(stage, context)


__all__ = ["Config", "run"]
