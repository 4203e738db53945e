"""`score: likelihood` reward models: the score (beta x mean response log-prob) against a hand computation,
the response boundary under BPE merges and left truncation, the reward_model stage writing a plain causal
LM that says how it scores, and every reader (stage held-out, GRPO's reward, `qwen-align eval-rm`, the
model loader) scoring it the same way."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from helpers import arithmetic_pairs, write_jsonl
from transformers import AutoModelForCausalLM

from qwen_align.cli import main
from qwen_align.errors import UserError
from qwen_align.recipe import load_recipe
from qwen_align.reward_score import CONFIG_KEY, completion_mask, likelihood_spec, response_start
from qwen_align.rm_eval.items import Item
from qwen_align.rm_eval.scorer import encode, load_reward_model, score_items
from qwen_align.runner import run_recipe

PROMPT = [{"role": "user", "content": "What is 12+30?"}]


def _by_hand(model, tokenizer, prompt, response, beta) -> float:
    """beta x mean log p of the tokens after the prompt rendered with the generation prompt."""
    head = tokenizer(tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True),
                     add_special_tokens=False)["input_ids"]
    full = tokenizer(tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": response}],
                                                   tokenize=False), add_special_tokens=False)["input_ids"]
    assert full[: len(head)] == head
    with torch.no_grad():
        logp = model(torch.tensor([full])).logits[0].log_softmax(-1)
    picked = [float(logp[t - 1, full[t]]) for t in range(len(head), len(full))]
    return beta * sum(picked) / len(picked)


def test_response_start_and_mask():
    assert response_start([1, 2, 3], [1, 2, 3, 4, 5]) == 3
    assert response_start([1, 2, 3], [1, 2, 9, 5]) == 2  # a merge across the boundary: the differing token starts it
    assert response_start([1, 2, 3], [1, 2, 3]) == 2  # never past the last token
    assert completion_mask([1, 0], [3, 2], 4).tolist() == [[0, 1, 1, 0], [1, 1, 0, 0]]


def test_encode_moves_the_start_with_left_truncation(demo_tokenizer):
    full = encode(demo_tokenizer, PROMPT, "42", 10**6)
    assert demo_tokenizer.decode(full.ids[full.start:]).startswith("42")
    cut = encode(demo_tokenizer, PROMPT, "42", len(full.ids) - 3)
    assert cut.truncated and cut.ids == full.ids[3:] and cut.start == full.start - 3
    assert encode(demo_tokenizer, PROMPT, "42", 2).start == 0  # cut into the response: all that is left counts


@pytest.fixture(scope="module")
def trained(tmp_path_factory, demo_tokenizer_dir):
    """A likelihood RM trained by the stage for 3 steps (stage entry, output folder)."""
    tmp = tmp_path_factory.mktemp("likelihood")
    data = write_jsonl(tmp / "pairs.jsonl", arithmetic_pairs(32))
    raw = {"model": "tiny", "tokenizer": str(demo_tokenizer_dir), "run_dir": str(tmp / "run"), "seed": 0,
           "stages": [{"name": "rm", "kind": "reward_model", "data": {"sources": [{"path": str(data)}]},
                       "score": "likelihood", "beta": 1.5, "max_length": 64, "per_device_train_batch_size": 8,
                       "max_steps": 3, "learning_rate": 1e-3, "eval_fraction": 0.25, "logging_steps": 1,
                       "save_steps": 10, "dtype": "float32"}]}
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    entry = run_recipe(load_recipe(path))["stages"]["rm"]
    return entry, entry["output"]


def test_stage_writes_a_causal_lm_that_says_how_it_scores(trained, demo_tokenizer):
    entry, out = trained
    assert entry["status"] == "completed" and entry["metrics"]["train_steps"] == 3
    config = json.loads((Path(out) / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"] and likelihood_spec(config) == {"kind": "likelihood", "beta": 1.5}
    model = AutoModelForCausalLM.from_pretrained(out)  # plain transformers loads it
    # The stage's held-out numbers are the hand-computed scores of the saved model.
    from reward_model.dataset import as_items, split_heldout

    from qwen_align.data import load_training_rows

    stage = load_recipe(Path(out).parents[2] / "recipe.yaml").stage("rm")
    rows, _ = load_training_rows(stage.data, 0, kind="preference")  # the stage's rows and split
    _, held = split_heldout(as_items(rows, "x"), 0.25, 0)
    hand = [[_by_hand(model, demo_tokenizer, it.prompt, r, 1.5) for r in it.responses] for it in held]
    m = entry["metrics"]
    assert m["heldout_pairs"] == len(held) == 8
    assert m["heldout_pair_accuracy"] == pytest.approx(sum(c > r for c, r in hand) / len(hand))
    assert m["heldout_mean_margin"] == pytest.approx(sum(c - r for c, r in hand) / len(hand), abs=1e-5)
    assert m["heldout_mean_margin"] != 0


def test_every_reader_scores_it_the_same(trained, demo_tokenizer, caplog):
    from grpo.rewards import RewardModelReward

    from qwen_align.model import load_model, load_reward_scorer

    _, out = trained
    rm, tokenizer, _ = load_reward_model(out, dtype="float32")
    loaded = load_reward_scorer(out, tokenizer=demo_tokenizer)  # GRPO's and the review's loader
    assert type(rm).__name__ == type(loaded).__name__ == "Qwen2ForCausalLM"
    responses = ["42", "43", "forty-two, and more words after it"]
    hand = [_by_hand(rm, demo_tokenizer, PROMPT, r, 1.5) for r in responses]
    items = [Item(id="a", subset="s", prompt=PROMPT, responses=responses)]
    scored, _ = score_items(rm, tokenizer, items, max_length=64, batch_size=2, progress=False)
    assert scored[0] == pytest.approx(hand, abs=1e-5)
    grpo = RewardModelReward(loaded, demo_tokenizer, batch_size=2)
    assert grpo([PROMPT] * 3, [[{"role": "assistant", "content": r}] for r in responses]) == pytest.approx(hand, abs=1e-5)
    # started from by a stage (say, a later stage's init_from), it stops being a likelihood reward model
    assert not hasattr(load_model(out, "policy", tokenizer=demo_tokenizer).config, CONFIG_KEY)
    with caplog.at_level("WARNING", logger="qwen_align.model"):
        assert not hasattr(load_model(out, "reward", tokenizer=demo_tokenizer).config, CONFIG_KEY)
    assert "load_reward_scorer" in caplog.text  # a fresh head on a trained RM is said, not silent


def test_training_scores_are_the_hand_computed_ones(demo_tokenizer):
    """The trainer's path (tokenize_pairs -> LikelihoodCollator -> score): pairs of unequal lengths, one cut
    from the left, a margin column; chosen rows first, rejected rows after, as RewardTrainer splits them."""
    from reward_model.dataset import tokenize_pairs
    from reward_model.likelihood import LikelihoodCollator, _ScoresAsLogits

    from qwen_align.model import load_model

    model = load_model("tiny", "policy", tokenizer=demo_tokenizer, seed=3).eval()
    long_prompt = [{"role": "user", "content": "What is " + "1+" * 30 + "1?"}]
    items = [Item(id="0", subset="s", prompt=PROMPT, responses=["42", "forty two"], extra={"margin": 0.5}),
             Item(id="1", subset="s", prompt=long_prompt, responses=["31", "3"], extra={"margin": 0.0})]
    limit = len(encode(demo_tokenizer, long_prompt, "31", 10**6).ids) - 5
    dataset, report = tokenize_pairs(items, demo_tokenizer, limit, "truncate")
    assert report.truncated == 1
    batch = LikelihoodCollator(pad_token_id=demo_tokenizer.pad_token_id)([dataset[0], dataset[1]])
    assert batch["margin"].tolist() == [0.5, 0.0]
    with torch.no_grad():
        scores = _ScoresAsLogits(model, batch["completion_mask"], 1.5)(batch["input_ids"], batch["attention_mask"])
    expected = [_by_hand(model, demo_tokenizer, PROMPT, "42", 1.5), _cut_by_hand(model, dataset[1]["chosen_ids"], dataset[1]["chosen_start"], 1.5),
                _by_hand(model, demo_tokenizer, PROMPT, "forty two", 1.5),
                _cut_by_hand(model, dataset[1]["rejected_ids"], dataset[1]["rejected_start"], 1.5)]
    assert scores.logits[:, 0].tolist() == pytest.approx(expected, abs=1e-5)
    # the truncated pair's start moved left with the cut: its response is still "31" / "3"
    assert demo_tokenizer.decode(dataset[1]["chosen_ids"][dataset[1]["chosen_start"]:]).startswith("31")


def _cut_by_hand(model, ids: list[int], start: int, beta: float) -> float:
    with torch.no_grad():
        logp = model(torch.tensor([ids])).logits[0].log_softmax(-1)
    picked = [float(logp[t - 1, ids[t]]) for t in range(max(start, 1), len(ids))]
    return beta * sum(picked) / len(picked)


def test_a_scalar_reward_model_started_from_a_likelihood_rm_is_a_classifier(trained, tmp_path, demo_tokenizer_dir):
    _, out = trained
    data = write_jsonl(tmp_path / "pairs.jsonl", arithmetic_pairs(8))
    raw = {"model": "tiny", "tokenizer": str(demo_tokenizer_dir), "run_dir": str(tmp_path / "run"), "seed": 0,
           "stages": [{"name": "rm", "kind": "reward_model", "init_from": str(out), "data": {"sources": [{"path": str(data)}]},
                       "max_length": 64, "per_device_train_batch_size": 4, "max_steps": 1, "eval_fraction": 0.25,
                       "save_steps": 10, "dtype": "float32"}]}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    entry = run_recipe(load_recipe(path))["stages"]["rm"]
    config = json.loads((Path(entry["output"]) / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForSequenceClassification"] and CONFIG_KEY not in config
    model, _, _ = load_reward_model(entry["output"], dtype="float32")
    assert type(model).__name__ == "Qwen2ForSequenceClassification"


def test_eval_rm_cli_reads_a_likelihood_rm(trained, tmp_path, demo_tokenizer):
    _, out = trained
    data = write_jsonl(tmp_path / "pairs.jsonl", [{**row, "id": f"p{i}"} for i, row in enumerate(arithmetic_pairs(6))])
    assert main(["eval-rm", "--model", str(out), "--benchmark", "pairs", "--data", str(data),
                 "--out", str(tmp_path / "eval"), "--max-length", "64", "--batch-size", "4"]) == 0
    rows = {r["id"]: r for r in map(json.loads, (tmp_path / "eval" / "scores.jsonl").read_text().splitlines())}
    model = AutoModelForCausalLM.from_pretrained(out)
    for i, pair in enumerate(arithmetic_pairs(6)):
        expected = [_by_hand(model, demo_tokenizer, pair["prompt"], pair[side][0]["content"], 1.5)
                    for side in ("chosen", "rejected")]
        assert [rows[f"p{i}"]["scores_chosen"], rows[f"p{i}"]["scores_rejected"]] == pytest.approx(expected, abs=1e-5)


def test_a_causal_lm_without_the_mark_is_not_a_reward_model(tmp_path, demo_tokenizer):
    from qwen_align.model import load_model, save_checkpoint

    policy = save_checkpoint(load_model("tiny", "policy", tokenizer=demo_tokenizer), demo_tokenizer, tmp_path / "p")
    with pytest.raises(UserError, match="one output"):
        load_reward_model(policy, dtype="float32")


def test_likelihood_with_an_adapter_output_is_refused(tmp_path, demo_tokenizer_dir, capsys):
    data = write_jsonl(tmp_path / "pairs.jsonl", arithmetic_pairs(4))
    raw = {"model": "tiny", "tokenizer": str(demo_tokenizer_dir), "run_dir": str(tmp_path / "run"),
           "stages": [{"name": "rm", "kind": "reward_model", "data": {"sources": [{"path": str(data)}]},
                       "score": "likelihood", "lora": {"save": "adapter"}}]}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    assert main(["run", str(path)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "recipe.yaml" in errors[0] and "lora.save: merged" in errors[0]
    assert not (tmp_path / "run").exists()


def test_a_broken_mark_is_one_line_naming_the_file(trained, tmp_path, capsys):
    import shutil

    _, out = trained
    broken = Path(shutil.copytree(out, tmp_path / "rm"))
    config = json.loads((broken / "config.json").read_text())
    config[CONFIG_KEY] = {"kind": "likelihood", "beta": "two"}
    (broken / "config.json").write_text(json.dumps(config))
    data = write_jsonl(tmp_path / "pairs.jsonl", [{**row, "id": f"p{i}"} for i, row in enumerate(arithmetic_pairs(2))])
    assert main(["eval-rm", "--model", str(broken), "--benchmark", "pairs", "--data", str(data),
                 "--out", str(tmp_path / "eval")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "config.json" in errors[0] and "reward_score.beta" in errors[0]
    assert not (tmp_path / "eval").exists()
