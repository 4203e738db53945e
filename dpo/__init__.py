"""DPO stage (offline RL): preference pairs, TRL's DPOTrainer, the Online Merging Optimizers (OnDARE, OnTIES)."""

from qwen_align.stage import StageContext, StageResult

from .config import Config


def run(stage: Config, context: StageContext) -> StageResult:
    from .stage import run as run_stage  # heavy imports (torch, trl) stay out of `qwen-align plan`

    return run_stage(stage, context)


__all__ = ["Config", "run"]
