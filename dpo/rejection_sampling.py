"""Rejection-sampling stage: sample the policy, verify, pair passing with failing responses. Not built yet."""

from qwen_align.stage import StageContext, StageResult, not_built

from .rejection_config import RejectionSamplingConfig as Config


def run(stage: Config, context: StageContext) -> StageResult:
    return not_built(stage)


__all__ = ["Config", "run"]
