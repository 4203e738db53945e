"""Rejection sampling: pair selection, review, resumption, output format, bad input, a run on a tiny model."""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from helpers import write_jsonl

import dpo.rejection_sampling.stage as rs
from dpo.rejection_sampling.pairs import Candidate, RuleReview, build_pairs, round_robin
from qwen_align.cli import main as cli_main
from qwen_align.data import load_training_rows
from qwen_align.errors import DataError
from qwen_align.recipe import DataConfig, load_recipe
from qwen_align.runner import run_recipe


def C(text, passed, score=None, finished=True, index=0):
    return Candidate(text, passed, (1.0 if passed else 0.0) if score is None else score, finished, index)


# ---------------------------------------------------------------- selection rule


def test_round_robin_covers_every_combination_once():
    for longer, shorter in [(3, 2), (4, 4), (5, 1), (2, 2)]:
        pairs = list(round_robin(longer, shorter))
        assert len(pairs) == len(set(pairs)) == longer * shorter
        assert sorted(i for i, _ in pairs[:longer]) == list(range(longer))  # round 0 uses each once


def test_pairs_follow_the_stated_rule():
    cands = [C("p0", True, index=0), C("f0", False, 0.5, index=1), C("p1", True, index=2),
             C("f1", False, 0.0, index=3), C("f2", False, 0.2, index=4)]
    built = build_pairs(cands, max_pairs=4)
    # Failing ranked by score: f0 (0.5), f2 (0.2), f1 (0); they are the longer list, so the outer one.
    assert [(c.text, r.text) for c, r in built.pairs] == [("p0", "f0"), ("p1", "f2"), ("p0", "f1"), ("p1", "f0")]
    assert built.outcome == "mixed"
    everything = build_pairs(cands, max_pairs=100)
    assert len(everything.pairs) == 6 and len({(c.text, r.text) for c, r in everything.pairs}) == 6


def test_all_pass_and_all_fail_give_no_pairs():
    assert build_pairs([C("a", True), C("b", True, index=1)], 4).outcome == "all_pass"
    assert build_pairs([C("a", False), C("b", False, index=1)], 4).outcome == "all_fail"
    assert build_pairs([C("a", True)], 4).pairs == []


def test_duplicates_dropped_before_pairing():
    cands = [C("42", True, index=0), C(" 42 ", True, index=1), C("41", False, index=2), C("41", False, index=3),
             C("40", False, index=4)]
    built = build_pairs(cands, 10)
    assert built.duplicates == 2
    assert [(c.text, r.text) for c, r in built.pairs] == [("42", "41"), ("42", "40")]


def test_rule_review_counts_what_it_rejects():
    review = RuleReview(reject_truncated=True, max_chars=12, reject_patterns=[r"(?i)as an ai"])
    cands = [C("ok", True, index=0), C("cut off", True, finished=False, index=1), C("x" * 13, True, index=2),
             C("As an AI, 4", True, index=3), C("   ", True, index=4), C("bad", False, index=5)]
    built = build_pairs(cands, 10, review)
    assert built.review_rejections == Counter({"truncated": 1, "too_long": 1, "pattern": 1, "empty": 1})
    assert [(c.text, r.text) for c, r in built.pairs] == [("ok", "bad")]
    # Every passing response rejected: a mixed query without pairs.
    built = build_pairs([C("cut", True, finished=False), C("bad", False, index=1)], 10, review)
    assert built.outcome == "mixed" and built.pairs == [] and built.review_rejections["truncated"] == 1


def test_reward_margin_review():
    rewards = {"good": 2.0, "meh": 0.5, "bad": 0.0, "worse": -1.0}
    cands = [C("good", True, index=0), C("meh", True, index=1), C("bad", False, index=2), C("worse", False, index=3)]
    built = build_pairs(cands, 10, accept_pair=lambda c, r: rewards[c.text] - rewards[r.text] > 1.0)
    assert sorted((c.text, r.text) for c, r in built.pairs) == [("good", "bad"), ("good", "worse"), ("meh", "worse")]
    assert built.review_rejections["reward_margin"] == 1


# ---------------------------------------------------------------- the stage


def save_digit_policy(folder: Path, tokenizer) -> Path:
    """A 1-layer Qwen2 checkpoint that answers with 7s and 8s: a first digit (even odds), then stop or go on.

    Its layers add nothing (zero output projections), so the last hidden state is the current token's
    embedding and the head is a bigram table: the real sampler then gives answers a real verifier can pass.
    """
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from qwen_align.model import save_checkpoint

    hidden = 16
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                         tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    seven, eight, end = (tokenizer.convert_tokens_to_ids(t) for t in ("7", "8", "<|im_end|>"))
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb, head = model.model.embed_tokens.weight, model.lm_head.weight
        emb.zero_()
        emb[:, 0] = 1.0
        emb[[seven, eight], 1] = 1.0  # a digit as the current token changes the next-token table
        model.model.norm.weight.zero_()
        model.model.norm.weight[:2] = 1.0
        first = torch.full((len(tokenizer),), -40.0)
        first[[seven, eight]] = 0.0
        after_digit = first.clone()
        after_digit[end] = math.log(2.0)  # after a digit: stop 1/2, "7" 1/4, "8" 1/4
        head.zero_()  # RMSNorm scales e0 to sqrt(hidden), e0 + e1 to sqrt(hidden / 2) per entry
        head[:, 0] = first / math.sqrt(hidden)
        head[:, 1] = after_digit * math.sqrt(2 / hidden) - head[:, 0]
    return save_checkpoint(model, tokenizer, folder)


@pytest.fixture(scope="session")
def digit_policy(tmp_path_factory, demo_tokenizer) -> Path:
    return save_digit_policy(tmp_path_factory.mktemp("policy") / "digits", demo_tokenizer)


def digit_queries(n: int) -> list[dict]:
    """Queries the digit policy can get right: `exact` answers 7 / 8, `math` answers 78 / 87."""
    rows = []
    for i in range(n):
        verifier, answer = [("exact", "7"), ("math", "78"), ("exact", "8"), ("math", "87")][i % 4]
        rows.append({"messages": [{"role": "user", "content": f"Question {i}: say {answer}."}], "verifier": verifier,
                     "answer": answer})
    rows[0]["id"] = "first"
    return rows


def rs_stage(prompts: Path, **options) -> dict:
    return {"name": "rs", "kind": "rejection_sampling", "data": {"sources": [{"path": str(prompts)}]},
            "samples_per_prompt": 4, "max_new_tokens": 3, "temperature": 1.0, "chunk_size": 2, "dtype": "float32",
            "review": {"reject_truncated": False}, **options}


@pytest.fixture
def rs_recipe(tmp_path, digit_policy):
    def make(name="run", rows=None, **options):
        prompts = write_jsonl(tmp_path / f"{name}-prompts.jsonl", rows if rows is not None else digit_queries(8))
        raw = {"model": str(digit_policy), "run_dir": str(tmp_path / name), "seed": 3,
               "stages": [rs_stage(prompts, **options)]}
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
        return path
    return make


def _lines(folder: Path) -> list[str]:
    return [line for f in sorted(folder.glob("*.jsonl")) for line in f.read_text().splitlines()]


def _is_right(row: dict, text: str) -> bool:
    """The task, judged here without the verifiers: the response is the answer's number."""
    return text.strip().isdigit() and int(text) == int(row["answer"])


def test_stage_writes_pairs_sft_and_stats_with_the_real_verifiers(rs_recipe, capsys):
    entry = run_recipe(load_recipe(rs_recipe()))["stages"]["rs"]
    assert entry["status"] == "completed"
    pairs_dir, sft_dir = Path(entry["outputs"]["pairs"]), Path(entry["outputs"]["sft"])
    assert entry["output"] == str(pairs_dir)
    stats = json.loads((pairs_dir.parent / "stats.json").read_text())
    assert stats["queries"] == 8 and stats["samples"] == 32 and stats["chunks"] == 4
    assert stats["all_pass"] + stats["all_fail"] + stats["mixed"] == 8
    assert sum(stats["pairs_per_query"].values()) == 8 and stats["pairs"] > 0
    assert stats["by_verifier"]["exact"]["passed"] > 0 and stats["by_verifier"]["math"]["passed"] > 0
    assert stats == {**entry["metrics"], "data": stats["data"]}
    assert "pairs from" in capsys.readouterr().out

    rows, _ = load_training_rows(DataConfig(sources=[{"path": str(pairs_dir)}]), seed=0, kind="preference")
    assert len(rows) == stats["pairs"]
    assert {r["verifier"] for r in rows} == {"exact", "math"}
    for row in rows:  # the verifiers' verdicts agree with the task: chosen right, rejected wrong
        chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
        assert _is_right(row, chosen) and not _is_right(row, rejected), row
        assert set(chosen + rejected) <= {"7", "8"}  # sampled from the policy, not made up
        assert row["chosen_score"] == 1.0 and row["rejected_score"] == 0.0
    row = rows[0]
    assert row["prompt"][-1]["role"] == "user" and row["chosen"][0]["role"] == "assistant"
    assert {"query_id", "verifier", "answer", "chosen_score", "rejected_score", "sampling", "model"} <= set(row)
    assert row["sampling"]["n"] == 4 and Path(row["model"]).name == "digits"
    assert len({(r["query_id"], r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in rows}) == len(rows)
    sft, _ = load_training_rows(DataConfig(sources=[{"path": str(sft_dir)}]), seed=0)
    assert len(sft) == stats["sft_rows"] == stats["mixed"] + stats["all_pass"]
    assert all(sft_row["messages"][-1]["role"] == "assistant" and _is_right(sft_row, sft_row["messages"][-1]["content"])
               for sft_row in sft)


def test_resume_after_an_interrupt_matches_an_uninterrupted_run(rs_recipe, monkeypatch):
    whole = run_recipe(load_recipe(rs_recipe("whole")))["stages"]["rs"]

    real_commit = rs.Work.commit
    calls = []

    def dying_commit(self, chunk, *args):
        if calls:
            raise KeyboardInterrupt  # interrupted while the second chunk is being written
        calls.append(chunk)
        real_commit(self, chunk, *args)

    monkeypatch.setattr(rs.Work, "commit", dying_commit)
    path = rs_recipe("killed")
    with pytest.raises(KeyboardInterrupt):
        run_recipe(load_recipe(path))
    monkeypatch.setattr(rs.Work, "commit", real_commit)
    resumed = run_recipe(load_recipe(path))["stages"]["rs"]
    assert resumed["metrics"]["chunks_resumed"] == 1
    a, b = _lines(Path(whole["outputs"]["pairs"])), _lines(Path(resumed["outputs"]["pairs"]))
    assert a and a == b and len(set(b)) == len(b)
    assert _lines(Path(whole["outputs"]["sft"])) == _lines(Path(resumed["outputs"]["sft"]))
    assert not (Path(resumed["output"]).parent.parent / "checkpoints" / "rejection_sampling").exists()


def test_work_of_edited_queries_is_not_reused(rs_recipe, monkeypatch):
    real_commit = rs.Work.commit

    def interrupted_after_one(self, chunk, *args):
        real_commit(self, chunk, *args)
        raise KeyboardInterrupt

    monkeypatch.setattr(rs.Work, "commit", interrupted_after_one)
    path = rs_recipe("edited")
    with pytest.raises(KeyboardInterrupt):
        run_recipe(load_recipe(path))
    monkeypatch.setattr(rs.Work, "commit", real_commit)
    rows = digit_queries(8)
    rows[0]["answer"] = "8"  # same id ("first"), other answer: chunk 0's pairs would be wrong now
    write_jsonl(path.parent / "edited-prompts.jsonl", rows)
    entry = run_recipe(load_recipe(path))["stages"]["rs"]
    assert entry["metrics"]["chunks_resumed"] == 0
    pairs = [json.loads(line) for line in _lines(Path(entry["outputs"]["pairs"]))]
    assert all(_is_right(p, p["chosen"][0]["content"]) for p in pairs if p["query_id"] == "first")


def test_query_id_uses_id_field_or_a_stable_hash():
    from dpo.rejection_sampling.queries import query_id

    rows = digit_queries(3)
    assert query_id(rows[0]) == "first"
    assert query_id(rows[1]) == query_id(json.loads(json.dumps(rows[1]))) != query_id(rows[2])


HI = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("bad, match", [
    ({"messages": HI, "answer": "1"}, "missing 'verifier'"),
    ({"messages": HI, "verifier": "telepathy"}, "unknown verifier 'telepathy'"),
    ({"messages": HI, "verifier": "exact"}, "'answer'"),
    ({"messages": HI, "verifier": "math", "answer": "  "}, "'answer'"),
    ({"messages": HI, "verifier": "regex", "pattern": "(7"}, "bad pattern '\\(7': not a valid regex"),
    ({"messages": HI, "verifier": "ifeval", "instruction_id_list": ["nope:x"], "kwargs": [{}]},
     "unknown instruction id 'nope:x'"),
    ({"messages": [{"role": "assistant", "content": "7"}], "verifier": "exact", "answer": "7"}, "assistant turn"),
])
def test_a_bad_last_row_stops_the_run_before_any_sampling(rs_recipe, monkeypatch, capsys, bad, match):
    def no_sampling(*a, **k):
        raise AssertionError("sampling started")

    monkeypatch.setattr(rs, "make_sampler", no_sampling)
    path = rs_recipe(rows=[*digit_queries(10), bad])  # five chunks' worth of good rows first
    assert cli_main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.match(rf"error: .*run-prompts.jsonl:11: .*{match}", err[0]), err
    assert not (path.parent / "run" / "rs" / "checkpoints").exists() and not (path.parent / "run" / "rs" / "final").exists()


def test_bad_rows_can_be_skipped_and_counted(rs_recipe):
    bad = {"messages": HI, "verifier": "telepathy"}
    path = rs_recipe(rows=[*digit_queries(2), bad], data={"sources": [{"path": "x"}], "on_bad_rows": "skip"})
    raw = yaml.safe_load(path.read_text())
    raw["stages"][0]["data"]["sources"][0]["path"] = str(path.parent / "run-prompts.jsonl")
    path.write_text(yaml.safe_dump(raw))
    metrics = run_recipe(load_recipe(path))["stages"]["rs"]["metrics"]
    assert metrics["queries"] == 2 and metrics["data"]["bad_rows_skipped"] == 1
