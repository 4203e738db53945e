"""What a report reads from a run directory: the manifest, metrics.jsonl grouped by stage, and the artifacts a
stage's manifest entry points to (GRPO's `ordering.json`)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError


@dataclass
class StageRecords:
    name: str
    kind: str
    entry: dict[str, Any]  # the manifest's entry: status, init_from, metrics, hyperparameters, ...
    records: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl rows of this stage, in order
    ordering: dict[str, Any] | None = None  # grpo: ordering.json

    @property
    def metrics(self) -> dict[str, Any]:
        return self.entry.get("metrics") or {}

    def series(self, key: str) -> tuple[list[float], list[float]]:
        """(steps, values) of a per-step trainer key (records with a `step`; the end-of-training summary and
        one-off records have other keys)."""
        steps, values = [], []
        for r in self.records:
            value = r.get(key)
            if "step" in r and isinstance(value, (int, float)) and not isinstance(value, bool):
                steps.append(r["step"])
                values.append(float(value))
        return steps, values


@dataclass
class Run:
    path: Path
    label: str
    manifest: dict[str, Any]
    stages: dict[str, StageRecords]


def read_manifest(run_dir: str | Path) -> dict[str, Any]:
    """The run's manifest; a folder without one, or a manifest that is not JSON, stops with one line."""
    path = Path(run_dir) / "manifest.json"
    if not path.is_file():
        raise UserError(f"{run_dir}: no manifest.json (not a run directory)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: manifest is not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("stages", {}), dict):
        raise UserError(f"{path}: not a qwen-align manifest (no 'stages' mapping)")
    manifest.setdefault("stages", {})
    return manifest


def _records(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl's rows; a torn last line (a killed run) is skipped."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _ordering(run_dir: Path, name: str, entry: dict[str, Any]) -> dict[str, Any] | None:
    path = Path(entry.get("metrics", {}).get("ordering_artifact") or run_dir / name / "ordering.json")
    if not path.is_file():
        path = run_dir / name / "ordering.json"  # the run directory was moved since
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return None


def load_run(run_dir: str | Path, label: str | None = None) -> Run:
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    records = _records(run_dir / "metrics.jsonl")
    stages = {}
    for name, entry in manifest["stages"].items():
        kind = entry.get("kind", name)
        stage = StageRecords(name, kind, entry, [r for r in records if r.get("stage") == name])
        if kind == "grpo":
            stage.ordering = _ordering(run_dir, name, entry)
        stages[name] = stage
    return Run(run_dir, label or str(run_dir), manifest, stages)


def load_runs(run_dirs: list[str | Path]) -> list[Run]:
    """The runs, each labelled by its folder name (its path where two names are the same)."""
    names = [Path(d).resolve().name for d in run_dirs]
    labels = [n if names.count(n) == 1 else str(d) for n, d in zip(names, run_dirs)]
    return [load_run(d, label) for d, label in zip(run_dirs, labels)]
