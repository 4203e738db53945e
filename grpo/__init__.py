"""Online RL stage: GRPO (TRL's GRPOTrainer), 8 responses per query, queries ordered by the reward variance of
the current policy, rewards from the trained reward model and the rows' verifiers. Report: 2048 samples
(256 queries x 8) per optimizer step."""

from .config import Config


def run(stage, context):
    # Imported on use so `qwen-align plan` validates recipes without loading torch and TRL.
    from .stage import run as run_grpo

    return run_grpo(stage, context)


__all__ = ["Config", "run"]
