"""Recipe schema: report defaults, resolved chain, and one-line errors naming file, line and key."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from qwen_align.errors import RecipeError
from qwen_align.recipe import load_recipe, stage_hash

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


BASE = """\
model: tiny
run_dir: runs/x
stages:
  - name: sft
    kind: sft
    data:
      sources:
        - path: data.jsonl
"""


@pytest.mark.parametrize("name", ["demo.yaml", "qwen2.5-7b.yaml", "sft.yaml"])
def test_shipped_recipes_validate(name):
    recipe = load_recipe(REPO / "recipes" / name)
    assert recipe.stages[0].kind == "sft"


def test_7b_recipe_carries_report_values():
    recipe = load_recipe(REPO / "recipes" / "qwen2.5-7b.yaml")
    assert [s.kind for s in recipe.stages] == ["sft", "rejection_sampling", "dpo", "reward_model", "grpo"]
    sft = recipe.stage("sft")
    assert (sft.max_length, sft.num_train_epochs, sft.learning_rate) == (32768, 2, 7e-6)
    assert sft.lr_scheduler_kwargs["min_lr"] == 7e-7
    assert (sft.weight_decay, sft.max_grad_norm) == (0.1, 1.0)
    dpo = recipe.stage("dpo")
    assert (dpo.learning_rate, dpo.num_train_epochs, dpo.optimizer) == (7e-7, 1, "online_merging")
    grpo = recipe.stage("grpo")
    assert grpo.num_generations == 8 and grpo.global_batch(recipe.num_processes) == 2048


def test_plan_json_is_the_whole_resolved_recipe():
    out = subprocess.run(
        [sys.executable, "-m", "qwen_align.cli", "plan", str(REPO / "recipes" / "qwen2.5-7b.yaml"), "--json"],
        capture_output=True, text=True, check=True,
    ).stdout
    plan = json.loads(out)
    sft = plan["stages"][0]
    assert sft["max_length"] == 32768 and sft["weight_decay"] == 0.1 and sft["effective_global_batch"] == 128
    assert plan["stages"][4]["effective_global_batch"] == 2048


def test_defaults_are_the_report_values(tmp_path):
    sft = load_recipe(write(tmp_path, BASE)).stage("sft")
    assert sft.learning_rate == 7e-6 and sft.lr_scheduler_kwargs == {"min_lr": 7e-7}
    assert sft.num_train_epochs == 2 and sft.max_length == 32768
    assert sft.assistant_only_loss and sft.packing


def test_relative_paths_follow_the_recipe_file(tmp_path):
    (tmp_path / "data.jsonl").write_text("")
    recipe = load_recipe(write(tmp_path, BASE))
    assert recipe.stages[0].data.sources[0].path == str(tmp_path / "data.jsonl")
    assert recipe.run_dir == "runs/x"  # relative to where the command runs


@pytest.mark.parametrize(
    "text, expected",
    [
        (BASE + "    learnin_rate: 1.0\n", r"r.yaml:9: stages\[0\].learnin_rate: unknown key"),
        (BASE + "    learning_rate: fast\n", r"r.yaml:9: stages\[0\].learning_rate: .*number.*'fast'"),
        (BASE + "    init_from: ghost\n", r"r.yaml:9: stages\[0\].init_from: 'ghost' is neither"),
        (BASE.replace("kind: sft", "kind: sfx"), r"r.yaml:5: stages\[0\].kind: unknown stage kind 'sfx'"),
        (BASE + "colour: red\n", r"r.yaml:9: colour: unknown key"),
        (BASE.replace("model: tiny\n", ""), r"model: required key is missing"),
        (BASE + "  - name: sft\n    kind: sft\n    data: {sources: [{path: a}]}\n", r"duplicate stage name 'sft'"),
        (BASE + "    data: [\n", r"r.yaml:\d+: invalid YAML"),
        ("- just\n- a list\n", r"a recipe is a YAML mapping"),
    ],
)
def test_bad_recipes_fail_with_one_line(tmp_path, text, expected):
    with pytest.raises(RecipeError, match=expected) as info:
        load_recipe(write(tmp_path, text))
    assert "\n" not in str(info.value)


def test_init_from_a_later_stage_is_refused(tmp_path):
    text = BASE.replace("    kind: sft\n", "    kind: sft\n    init_from: dpo\n", 1) + (
        "  - name: dpo\n    kind: dpo\n    data: {sources: [{stage: sft}]}\n")
    with pytest.raises(RecipeError, match="init_from: 'dpo' names a later stage"):
        load_recipe(write(tmp_path, text))


def test_overrides_by_stage_name_and_index(tmp_path):
    p = write(tmp_path, BASE)
    recipe = load_recipe(p, ["stages.sft.learning_rate=3e-4", "stages.0.max_length=128", "seed=7"])
    assert recipe.seed == 7 and recipe.stages[0].learning_rate == 3e-4 and recipe.stages[0].max_length == 128
    with pytest.raises(RecipeError, match="no list item named or numbered 'nope'"):
        load_recipe(p, ["stages.nope.learning_rate=1"])
    with pytest.raises(RecipeError, match=r"stages\[0\].max_length: .*greater than 0"):
        load_recipe(p, ["stages.sft.max_length=-5"])
    with pytest.raises(RecipeError, match="expected key.path=value"):
        load_recipe(p, ["seed"])


def test_stage_hash_follows_options_and_upstream(tmp_path):
    recipe = load_recipe(write(tmp_path, BASE))
    stage = recipe.stages[0]
    h = stage_hash(recipe, stage, None)
    assert h == stage_hash(recipe, stage, None)
    assert h != stage_hash(recipe, stage, "upstream-changed")
    changed = load_recipe(write(tmp_path, BASE), ["stages.sft.learning_rate=1e-4"])
    assert h != stage_hash(changed, changed.stages[0], None)
    # How often a stage saves or logs changes nothing it computes: a rerun resumes instead of starting over.
    saves_more = load_recipe(write(tmp_path, BASE), ["stages.sft.save_steps=3", "stages.sft.logging_steps=2",
                                                     "stages.sft.save_every_minutes=5", "stages.sft.save_total_limit=9"])
    assert h == stage_hash(saves_more, saves_more.stages[0], None)


@pytest.mark.parametrize(
    "args, expected",
    [
        (["plan", "missing.yaml"], "missing.yaml: recipe file not found"),
        (["run", "{bad}"], "recipe file not found"),
    ],
)
def test_cli_errors_are_one_line_without_traceback(tmp_path, args, expected):
    args = [a.replace("{bad}", str(tmp_path / "nope.yaml")) for a in args]
    proc = subprocess.run([sys.executable, "-m", "qwen_align.cli", *args], capture_output=True, text=True)
    assert proc.returncode == 2
    assert expected in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_cli_plan_prints_every_stage():
    proc = subprocess.run(
        [sys.executable, "-m", "qwen_align.cli", "plan", str(REPO / "recipes" / "qwen2.5-7b.yaml")],
        capture_output=True, text=True, check=True,
    )
    for name in ["sft", "rejection_sampling", "dpo", "reward_model", "grpo"]:
        assert f"{name} [{name}]" in proc.stdout
    assert "= 2048" in proc.stdout and "cosine_with_min_lr -> 7e-07" in proc.stdout


def test_readme_recipe_reference_is_current():
    from qwen_align.reference import END, START, render

    text = (REPO / "README.md").read_text()
    block = text[text.index(START) : text.index(END) + len(END)]
    assert block == render(), "run: python -m qwen_align.reference --write README.md"


def test_data_source_may_name_an_earlier_stage(tmp_path):
    from qwen_align.recipe import validate_recipe

    def recipe(source):
        return {"model": "tiny", "run_dir": "r", "stages": [
            {"name": "a", "kind": "sft", "data": {"sources": [{"path": str(tmp_path)}]}},
            {"name": "b", "kind": "reward_model", "data": {"sources": [source]}},
        ]}

    ok = validate_recipe(recipe({"stage": "a", "output": "pairs"}), "r.yaml")
    assert ok.stages[1].data.sources[0].stage == "a" and ok.stages[1].data.sources[0].path is None
    with pytest.raises(RecipeError, match=r"stages\[1\].data.sources\[0\].stage: 'b' names a later stage|'b' is not"):
        validate_recipe(recipe({"stage": "b"}), "r.yaml")
    with pytest.raises(RecipeError, match="'zzz' is not a stage"):
        validate_recipe(recipe({"stage": "zzz"}), "r.yaml")
    with pytest.raises(RecipeError, match="give `path`"):
        validate_recipe(recipe({"weight": 2}), "r.yaml")
    with pytest.raises(RecipeError, match="give `stage` too"):
        validate_recipe(recipe({"path": str(tmp_path), "output": "pairs"}), "r.yaml")


def test_a_stage_kind_can_check_the_whole_recipe(monkeypatch):
    from qwen_align.recipe import StageConfig, validate_recipe

    def needs_two(self, recipe):
        return None if recipe.num_processes == 2 else ("per_device_train_batch_size", "needs num_processes 2")

    monkeypatch.setattr(StageConfig, "check_recipe", needs_two)
    raw = {"model": "tiny", "run_dir": "r",
           "stages": [{"name": "a", "kind": "reward_model", "data": {"sources": [{"path": "."}]}}]}
    with pytest.raises(RecipeError, match=r"stages\[0\].per_device_train_batch_size: needs num_processes 2"):
        validate_recipe(raw, "r.yaml")
    assert validate_recipe({**raw, "num_processes": 2}, "r.yaml").num_processes == 2
