"""`qwen-align eval-rm` end to end with a tiny random reward model: the shared RMB release, summary and
per-example scores, `--scores-file` round trip, left truncation, and bad input (exit 2, nothing written)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import write_jsonl

from qwen_align.cli import main
from qwen_align.rm_eval.scorer import batches, encode

SHARED_RMB = Path(__file__).resolve().parents[2] / "shared" / "benchmarks" / "rmb"


@pytest.fixture(scope="module")
def tiny_rm(tmp_path_factory, demo_tokenizer):
    from transformers import AutoModelForSequenceClassification

    from qwen_align.model import load_model, save_checkpoint

    out = tmp_path_factory.mktemp("rm") / "tiny_rm"
    save_checkpoint(load_model("tiny", "reward", tokenizer=demo_tokenizer, seed=0), demo_tokenizer, out)
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.num_labels == 1 and model.config.pad_token_id == demo_tokenizer.pad_token_id
    return out


def _pairs_file(tmp_path: Path) -> Path:
    rows = [{"prompt": [{"role": "user", "content": f"What is {a}+{a}?"}],
             "chosen": [{"role": "assistant", "content": str(2 * a)}],
             "rejected": [{"role": "assistant", "content": str(2 * a + 1)}], "id": f"p{a}"} for a in range(12)]
    return write_jsonl(tmp_path / "pairs.jsonl", rows)


def test_left_truncation_keeps_the_end(demo_tokenizer):
    ids, cut, _ = encode(demo_tokenizer, [{"role": "user", "content": "word " * 100}], "the answer", 16)
    full, _, _ = encode(demo_tokenizer, [{"role": "user", "content": "word " * 100}], "the answer", 10**6)
    assert cut and ids == full[-16:]
    assert batches([3, 9, 1, 5], 2) == [[1, 3], [0, 2]] and batches([3, 9, 1, 5], 2, False) == [[0, 1], [2, 3]]


def test_pairs_eval_and_scores_file_round_trip(tiny_rm, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["eval-rm", "--model", str(tiny_rm), "--benchmark", "pairs", "--data", str(_pairs_file(tmp_path)),
                 "--out", str(out), "--max-length", "48", "--batch-size", "5"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and {"id", "subset", "scores_chosen", "scores_rejected", "results"} <= set(rows[0])
    assert summary["num_examples"] == 12 and summary["settings"]["dtype"] == "float32"
    assert summary["settings"]["max_length"] == 48 and summary["formatting"]["truncated_items"] == 0
    # Scores do not depend on batch composition (padding is masked): batch size 1 gives the same numbers.
    out1 = tmp_path / "out1"
    main(["eval-rm", "--model", str(tiny_rm), "--benchmark", "pairs", "--data", str(_pairs_file(tmp_path)),
          "--out", str(out1), "--batch-size", "1"])
    rows1 = [json.loads(line) for line in (out1 / "scores.jsonl").read_text().splitlines()]
    assert [r["scores_chosen"] for r in rows1] == pytest.approx([r["scores_chosen"] for r in rows], abs=1e-4)
    # Re-score the saved file without a model: the same summary numbers.
    re_out = tmp_path / "rescored"
    assert main(["eval-rm", "--benchmark", "pairs", "--scores-file", str(out / "scores.jsonl"),
                 "--out", str(re_out)]) == 0
    again = json.loads((re_out / "summary.json").read_text())
    for key in ("score", "accuracy", "mean_margin", "tie_rate", "subsets", "counts"):
        assert again[key] == summary[key]


@pytest.mark.skipif(not SHARED_RMB.is_dir(), reason="shared RMB release files not present")
def test_shared_rmb_end_to_end(tiny_rm, tmp_path, capsys):
    torch.manual_seed(0)
    out = tmp_path / "rmb"
    assert main(["eval-rm", "--model", str(tiny_rm), "--benchmark", "rmb", "--data", str(SHARED_RMB),
                 "--out", str(out), "--max-length", "64", "--batch-size", "64"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"] == {"BoN_set/Harmlessness/S1": 111, "BoN_set/Helpfulness/Code/Documentation": 15,
                                 "Pairwise_set/Harmlessness/S1": 459, "Pairwise_set/Helpfulness/Chat/Discussion": 293}
    assert set(summary["sections"]) == {"Helpfulness (BoN)", "Helpfulness (Pairwise)", "Harmlessness (BoN)",
                                        "Harmlessness (Pairwise)"}
    assert summary["score"] == pytest.approx(sum(summary["sections"].values()) / 4, abs=0.01)
    assert summary["formatting"]["truncated_items"] > 0  # long RMB conversations cut from the left, counted
    rows = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    bon = next(r for r in rows if "scores" in r)
    assert bon["num_correct"] == 1 and bon["category_path"].startswith("BoN_set/")
    printed = capsys.readouterr().out
    assert "Table 15" in printed and "Athene-RM-70B" in printed
    re_out = tmp_path / "rescored"
    assert main(["eval-rm", "--benchmark", "rmb", "--scores-file", str(out / "scores.jsonl"), "--out", str(re_out)]) == 0
    assert json.loads((re_out / "summary.json").read_text())["sections"] == summary["sections"]


def test_bad_input_exits_2_and_writes_nothing(tiny_rm, tmp_path, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "chosen": "a", "subset": "s"}])
    out = tmp_path / "out"
    assert main(["eval-rm", "--model", str(tiny_rm), "--benchmark", "rewardbench", "--data", str(bad),
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.jsonl:1: missing 'rejected'" in err[0]
    assert not out.exists()
    scores = write_jsonl(tmp_path / "scores.jsonl", [{"id": 1, "subset": "s", "scores": [1.0, 0.0]}])
    assert main(["eval-rm", "--benchmark", "pairs", "--scores-file", str(scores), "--out", str(out)]) == 2
    assert "scores.jsonl:1:" in capsys.readouterr().err and not out.exists()
