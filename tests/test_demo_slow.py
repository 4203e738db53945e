"""The embedded demo end to end (minutes of CPU): run with `python -m pytest -m slow`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_sft_learns_the_task(tmp_path):
    run_dir = tmp_path / "demo"
    cmd = [sys.executable, "-m", "qwen_align.cli", "run", str(REPO / "recipes" / "demo.yaml"), "--until", "sft",
           "--set", f"run_dir={run_dir}"]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    entry = json.loads((run_dir / "manifest.json").read_text())["stages"]["sft"]
    # A random-init model answers none of the held-out sums; the trained one answers some (about 9% measured).
    assert entry["status"] == "completed" and entry["metrics"]["heldout_accuracy"] >= 0.03
    again = subprocess.run(cmd, check=True, capture_output=True, text=True)
    assert "skipping" in again.stdout
