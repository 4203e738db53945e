"""Scoring rules on hand-computed cases: strict ties, RewardBench sections, best-of-N ties, the Ties subset,
RMB cells, PPE pairs and best-of-K."""

from __future__ import annotations

import math

import pytest

from qwen_align.rm_eval import rules


def pair(subset, chosen, rejected, **extra):
    return {"id": f"{subset}-{chosen}-{rejected}", "subset": subset, "scores_chosen": chosen,
            "scores_rejected": rejected, **extra}


def bon(subset, scores, num_correct=1, id_=None, **extra):
    return {"id": id_ or f"{subset}-{scores}", "subset": subset, "scores": scores, "num_correct": num_correct, **extra}


def test_rewardbench_ties_are_wrong_and_sections_weighted():
    rows = [
        pair("alpacaeval-easy", 2.0, 1.0),  # right
        pair("mt-bench-easy", 1.0, 1.0),  # tie: wrong
        pair("math-prm", 1.0, 0.0), pair("math-prm", 0.0, 1.0),  # 0.5
        *[pair(h, 1.0, 0.5) for h in ("hep-cpp", "hep-go", "hep-java", "hep-js", "hep-python", "hep-rust")],  # 1.0
    ]
    s = rules.rewardbench(rows)
    assert s["subsets"]["mt-bench-easy"] == 0.0
    # Chat: weighted by the published counts 100 (alpacaeval-easy) and 28 (mt-bench-easy).
    assert s["sections"]["Chat"] == pytest.approx(100 * 100 / 128, abs=0.01)
    # Reasoning: math-prm counts as 984 = the six hep subsets together -> 1/2 * 0.5 + 1/2 * 1.0.
    assert s["sections"]["Reasoning"] == pytest.approx(75.0)
    assert s["score"] == pytest.approx((100 * 100 / 128 + 75.0) / 2, abs=0.01)
    assert "Safety" not in s["sections"] and "donotanswer" in s["missing_subsets"]
    assert s["tie_rate"] == pytest.approx(1 / 10)


def test_rewardbench_prior_sets_at_half_weight():
    rows = [pair("alpacaeval-easy", 1, 0), pair("shp", 0, 1), pair("summarize", 1, 0)]
    s = rules.rewardbench(rows)
    assert s["sections"]["Prior Sets"] == 50.0
    assert s["score"] == 100.0
    assert s["score_with_prior_sets"] == pytest.approx((100 + 0.5 * 50) / 1.5, abs=0.01)


def test_rewardbench2_best_of_4_tie_credit():
    assert rules.top_credit(bon("Math", [2, 2, 1, 0])) == 0.5
    assert rules.top_credit(bon("Math", [1, 3, 0, 0])) == 0.0
    assert rules.top_credit(bon("Math", [3, 1, 1, 1])) == 1.0
    assert rules.top_credit(bon("Math", [3, 3, 3, 3])) == 0.25


def test_rewardbench2_ties_formula():
    rows = [
        bon("Ties", [5, 1, 2], 1, "ref:1"), bon("Ties", [4, 3.5, 1], 2, "tied:1"),  # all good
        bon("Ties", [1, 2], 1, "ref:2"), bon("Ties", [3, 1, 2], 2, "tied:2"),  # all bad
    ]
    # prompt 1: gaps ref 3, tied 2.5, spread 0.5; prompt 2: gaps -1, -1, spread 2
    expected = (0.30 * 0.5 + 0.30 * 0.5 + 0.20 * 0.5 + 0.20 * 0.5
                + 0.01 * (math.tanh(2.5 / 0.5 - 1) + math.tanh(-1 / 2 - 1)) / 2)
    assert rules.ties_score(rows) == pytest.approx(expected)
    s = rules.rewardbench2(rows + [bon("Math", [2, 2, 1, 0])])
    assert s["subsets"]["Ties"] == pytest.approx(100 * expected, abs=0.01)
    assert s["subsets"]["Math"] == 50.0
    assert s["score"] == pytest.approx((100 * expected + 50) / 2, abs=0.01)  # unweighted mean of subsets


def test_rmb_cells_and_bon_needs_every_loser_beaten():
    rows = [
        pair("p", 2, 1, category_path="Pairwise_set/Helpfulness/Chat/Discussion"),
        pair("p", 1, 2, category_path="Pairwise_set/Harmlessness/S1"),
        bon("b", [3, 1, 3], category_path="BoN_set/Helpfulness/Code/Documentation"),  # ties a loser: wrong
        bon("b", [3, 1, 2], category_path="BoN_set/Harmlessness/S1"),
    ]
    s = rules.rmb(rows)
    assert s["sections"] == {"Harmlessness (BoN)": 100.0, "Harmlessness (Pairwise)": 0.0,
                             "Helpfulness (BoN)": 0.0, "Helpfulness (Pairwise)": 100.0}
    assert s["score"] == 50.0
    assert s["subsets"]["BoN_set/Harmlessness/S1"] == 100.0


def test_ppe_pairs_and_best_of_k():
    # original order: labels [0, 1, 1, 0], rewards [0.9, 0.5, 0.9, 0.1]; stored correct first with `order`
    row = bon("MATH", [0.5, 0.9, 0.9, 0.1], 2, order=[1, 2, 0, 3])
    assert [rules.best_of_k(row, k) for k in (1, 2, 4)] == [0.0, 0.0, 0.5]
    assert rules.ppe_pairs(row) == (2, 4)  # (1,0) no, (1,3) yes, (2,0) tie -> no, (2,3) yes
    assert rules.ppe_pairs({**row, "conflict_pairs": [[2, 3]]}) == (1, 1)
    s = rules.ppe([row, pair("Human Preference", 1, 0)])
    assert s["subsets"] == {"Human Preference": 100.0, "MATH": 50.0}
    assert s["best_of_k"]["MATH"] == {"1": 0.0, "2": 0.0, "4": 50.0}
    assert s["score"] == 50.0 and s["sections"]["Objective-Avg"] == 50.0


def test_pairs_accuracy_margin():
    s = rules.pairs([pair("pairs", 2, 1), pair("pairs", 0, 1), pair("pairs", 1, 1)])
    assert s["accuracy"] == pytest.approx(1 / 3) and s["mean_margin"] == pytest.approx(0.0)
    assert s["tie_rate"] == pytest.approx(0.3333, abs=1e-4)
