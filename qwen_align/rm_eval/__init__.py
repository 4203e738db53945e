"""Reward-model evaluation: RewardBench 1 & 2, RMB, PPE and plain preference pairs.

`loaders` reads each benchmark's released format into `Item`s (a prompt and scored responses, correct ones
first); `scorer` turns items into per-response rewards with any sequence-classification reward model;
`rules` turns per-example scores into the benchmark's published numbers; `report` writes and prints them.
The per-example scores (reward-bench's result shape) can be re-scored without a model.
"""

from .items import Item
from .loaders import BENCHMARKS, load_benchmark
from .report import evaluate, rescore
from .rules import summarize

__all__ = ["BENCHMARKS", "Item", "evaluate", "load_benchmark", "rescore", "summarize"]
