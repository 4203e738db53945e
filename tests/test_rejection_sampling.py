"""Rejection sampling: pair selection, review, resumption, output format, bad input, a run on a tiny model."""

from __future__ import annotations

import json
import zlib
from collections import Counter
from pathlib import Path

import pytest
import yaml
from helpers import write_jsonl

import dpo.rejection_sampling.stage as rs
from dpo.rejection_sampling.pairs import Candidate, RuleReview, build_pairs, round_robin
from qwen_align.data import load_training_rows
from qwen_align.errors import DataError
from qwen_align.recipe import DataConfig, load_recipe
from qwen_align.runner import run_recipe
from qwen_align.verifiers import VerifyResult


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


def _rows(n):
    rows = []
    for i in range(n):
        a, b = 10 + i, 20 + 3 * i
        rows.append({"messages": [{"role": "user", "content": f"What is {a}+{b}?"}], "verifier": "exact",
                     "answer": str(a + b)})
    rows[0]["id"] = "first"
    return rows


def fake_verify(examples, responses, workers=None):
    """Deterministic verdicts on random-model text: about half pass."""
    return [VerifyResult(zlib.crc32(r.encode()) % 2 == 0, float(zlib.crc32(r.encode()) % 2 == 0), "fake")
            for r in responses]


@pytest.fixture
def rs_recipe(tmp_path, demo_tokenizer_dir):
    def make(name="run", rows=None, **options):
        prompts = write_jsonl(tmp_path / f"{name}-prompts.jsonl", rows if rows is not None else _rows(4))
        stage = {"name": "rs", "kind": "rejection_sampling", "data": {"sources": [{"path": str(prompts)}]},
                 "samples_per_prompt": 4, "max_new_tokens": 3, "chunk_size": 2, "dtype": "float32",
                 "review": {"reject_truncated": False}, **options}
        raw = {"model": "tiny", "tokenizer": str(demo_tokenizer_dir), "run_dir": str(tmp_path / name), "seed": 3,
               "stages": [stage]}
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
        return path
    return make


def _lines(folder: Path) -> list[str]:
    return [line for f in sorted(folder.glob("*.jsonl")) for line in f.read_text().splitlines()]


def test_stage_writes_pairs_sft_and_stats(rs_recipe, monkeypatch, capsys):
    monkeypatch.setattr(rs, "verify_all", fake_verify)
    entry = run_recipe(load_recipe(rs_recipe()))["stages"]["rs"]
    assert entry["status"] == "completed"
    pairs_dir, sft_dir = Path(entry["outputs"]["pairs"]), Path(entry["outputs"]["sft"])
    assert entry["output"] == str(pairs_dir)
    stats = json.loads((pairs_dir.parent / "stats.json").read_text())
    assert stats["queries"] == 4 and stats["samples"] == 16 and stats["chunks"] == 2
    assert stats["all_pass"] + stats["all_fail"] + stats["mixed"] == 4
    assert sum(stats["pairs_per_query"].values()) == 4 and stats["pairs"] > 0
    assert stats == {**entry["metrics"], "data": stats["data"]}
    assert "pairs from" in capsys.readouterr().out

    rows, _ = load_training_rows(DataConfig(sources=[{"path": str(pairs_dir)}]), seed=0, kind="preference")
    assert len(rows) == stats["pairs"]
    row = rows[0]
    assert row["prompt"][-1]["role"] == "user" and row["chosen"][0]["role"] == "assistant"
    assert {"query_id", "verifier", "answer", "chosen_score", "rejected_score", "sampling", "model"} <= set(row)
    assert row["sampling"]["n"] == 4 and row["model"] == "tiny" and row["chosen_score"] == 1.0
    assert len({(r["query_id"], r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in rows}) == len(rows)
    assert all(r["chosen"][0]["content"].strip() != r["rejected"][0]["content"].strip() for r in rows)
    sft, _ = load_training_rows(DataConfig(sources=[{"path": str(sft_dir)}]), seed=0)
    assert len(sft) == stats["sft_rows"] == stats["mixed"] + stats["all_pass"]
    assert sft[0]["messages"][-1]["role"] == "assistant"


def test_resume_after_a_kill_matches_an_uninterrupted_run(rs_recipe, monkeypatch):
    monkeypatch.setattr(rs, "verify_all", fake_verify)
    whole = run_recipe(load_recipe(rs_recipe("whole")))["stages"]["rs"]

    real_commit = rs.Work.commit
    calls = []

    def dying_commit(self, chunk, *args):
        if calls:
            raise KeyboardInterrupt  # killed while the second chunk is being written
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
    assert a == b and len(set(b)) == len(b)
    assert _lines(Path(whole["outputs"]["sft"])) == _lines(Path(resumed["outputs"]["sft"]))
    assert not (Path(resumed["output"]).parent.parent / "checkpoints" / "rejection_sampling").exists()


def test_query_id_uses_id_field_or_a_stable_hash(rs_recipe, monkeypatch):
    from dpo.rejection_sampling.queries import query_id

    rows = _rows(3)
    assert query_id(rows[0]) == "first"
    assert query_id(rows[1]) == query_id(json.loads(json.dumps(rows[1]))) != query_id(rows[2])


@pytest.mark.parametrize("bad, match", [
    ({"messages": [{"role": "user", "content": "hi"}], "answer": "1"}, "missing 'verifier'"),
    ({"messages": [{"role": "user", "content": "hi"}], "verifier": "telepathy"}, "unknown verifier 'telepathy'"),
    ({"messages": [{"role": "user", "content": "hi"}], "verifier": "exact"}, "'answer'"),
    ({"messages": [{"role": "user", "content": "hi"}], "verifier": "ifeval", "instruction_id_list": ["nope:x"],
      "kwargs": [{}]}, "unknown instruction id 'nope:x'"),
])
def test_bad_rows_stop_before_sampling(rs_recipe, monkeypatch, bad, match):
    def no_sampling(*a, **k):
        raise AssertionError("sampling started")

    monkeypatch.setattr(rs, "make_sampler", no_sampling)
    path = rs_recipe(rows=[*_rows(2), bad])
    with pytest.raises(DataError, match=rf"run-prompts.jsonl:3: .*{match}"):
        run_recipe(load_recipe(path))


def test_bad_rows_can_be_skipped_and_counted(rs_recipe, monkeypatch):
    monkeypatch.setattr(rs, "verify_all", fake_verify)
    bad = {"messages": [{"role": "user", "content": "hi"}], "verifier": "telepathy"}
    path = rs_recipe(rows=[*_rows(2), bad], data={"sources": [{"path": "x"}], "on_bad_rows": "skip"})
    raw = yaml.safe_load(path.read_text())
    raw["stages"][0]["data"]["sources"][0]["path"] = str(path.parent / "run-prompts.jsonl")
    path.write_text(yaml.safe_dump(raw))
    metrics = run_recipe(load_recipe(path))["stages"]["rs"]["metrics"]
    assert metrics["queries"] == 2 and metrics["data"]["bad_rows_skipped"] == 1
