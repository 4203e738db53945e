"""StageContext.stage_output: how a stage finds an earlier stage's outputs in the run's manifest."""

from __future__ import annotations

from pathlib import Path

import pytest

from qwen_align.errors import UserError
from qwen_align.recipe import validate_recipe
from qwen_align.stage import StageContext


def _context(manifest):
    recipe = validate_recipe({"model": "tiny", "run_dir": "r", "stages": [
        {"name": "rs", "kind": "rejection_sampling", "data": {"sources": [{"path": "."}]}},
        {"name": "rm", "kind": "reward_model", "data": {"sources": [{"stage": "rs"}]}},
    ]}, "r.yaml")
    return StageContext(recipe, Path("r/rm"), "tiny", None, Path("m.jsonl"), manifest=manifest)


def test_stage_output_reads_main_and_named_outputs():
    ctx = _context({"stages": {"rs": {"status": "completed", "output": "/o/pairs",
                                       "outputs": {"pairs": "/o/pairs", "sft": "/o/sft"}}}})
    assert ctx.stage_output("rs") == "/o/pairs"
    assert ctx.stage_output("rs", "sft") == "/o/sft"
    assert ctx.stage_output("/some/checkpoint") == "/some/checkpoint"  # not a stage: a path
    with pytest.raises(UserError, match="stage 'rs' has no output 'x' \\(it has: pairs, sft\\)"):
        ctx.stage_output("rs", "x")


def test_stage_output_of_an_unfinished_stage_is_a_clear_error():
    ctx = _context({"stages": {"rs": {"status": "failed"}}})
    with pytest.raises(UserError, match="stage 'rs' has not completed in r; run it first"):
        ctx.stage_output("rs")
