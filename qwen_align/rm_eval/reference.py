"""Reference rows: Table 15 of the Qwen2.5 Technical Report (arXiv 2412.15115), "Performance comparison
across multiple RM benchmarks", copied as published (RewardBench sections and score, RMB cells, PPE sets)."""

from __future__ import annotations

MODELS = ["Nemotron-4-340B-Reward", "Llama-3.1-Nemotron-70B-Reward", "Athene-RM-70B", "Qwen2.5-RM-72B"]

TABLE_15: dict[str, dict[str, list[float]]] = {
    "rewardbench": {
        "Chat": [95.80, 97.50, 98.32, 97.21],
        "Chat Hard": [87.10, 85.70, 70.61, 78.73],
        "Safety": [91.50, 95.10, 92.10, 92.71],
        "Reasoning": [93.60, 98.10, 92.19, 97.65],
        "Score": [92.00, 94.10, 88.32, 91.59],
    },
    "rmb": {
        "Helpfulness (BoN)": [48.85, 61.02, 67.24, 65.72],
        "Helpfulness (Pairwise)": [68.70, 75.28, 80.82, 78.83],
        "Harmlessness (BoN)": [50.92, 52.00, 67.02, 56.35],
        "Harmlessness (Pairwise)": [70.84, 69.96, 80.83, 73.94],
        "Overall": [59.83, 64.57, 73.98, 68.71],
    },
    "ppe": {
        "Human Preference": [59.28, 64.32, 66.48, 64.80],
        "IFEval": [62.66, 63.40, 62.15, 67.97],
        "GPQA": [56.56, 59.14, 59.26, 59.80],
        "MATH": [65.12, 69.73, 79.14, 81.48],
        "MBPP-Plus": [49.15, 55.62, 67.97, 64.34],
        "MMLU-Pro": [69.69, 70.20, 76.95, 75.66],
        "Objective-Avg": [60.64, 63.62, 69.09, 69.85],
    },
    # Human-Preference-Chinese (the report's in-house set, not public): accuracy 50.46, 59.95, 61.11, 61.27.
}

SCORE_ROW = {"rewardbench": "Score", "rmb": "Overall", "ppe": "Objective-Avg"}


def ours(benchmark: str, summary: dict) -> dict[str, float | None]:
    """Our numbers under the table's row names."""
    values: dict[str, float | None] = {}
    for metric in TABLE_15.get(benchmark, {}):
        if metric == SCORE_ROW.get(benchmark):
            values[metric] = summary.get("score")
        else:
            values[metric] = summary.get("sections", {}).get(metric, summary.get("subsets", {}).get(metric))
    return values


def comparison_table(benchmark: str, summary: dict, name: str = "this model") -> str:
    if benchmark not in TABLE_15:
        return ""
    width = max(len(m) for m in TABLE_15[benchmark]) + 2
    head = f"{'':<{width}}" + "".join(f"{m[:14]:>16}" for m in [name, *MODELS])
    lines = [head]
    mine = ours(benchmark, summary)
    for metric, ref in TABLE_15[benchmark].items():
        v = mine.get(metric)
        cells = [f"{v:16.2f}" if v is not None else f"{'-':>16}"] + [f"{x:16.2f}" for x in ref]
        lines.append(f"{metric:<{width}}" + "".join(cells))
    return "\n".join(lines)
