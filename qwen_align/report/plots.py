"""The report's figures, drawn with matplotlib's object API (`Figure`, rendered by Agg: no display, no pyplot
state). Each function takes one stage's records from every run being compared, as (label, StageRecords) pairs,
and returns a `Plot` or None when no run has the data; several runs overlay, one colour each."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..console import is_task_accuracy
from .collect import Run, StageRecords

Series = list[tuple[str, StageRecords]]  # (run label, the stage's records in that run)


@dataclass
class Plot:
    name: str  # file stem, unique within a stage
    caption: str  # what it shows, one sentence
    figure: object  # matplotlib.figure.Figure


def _figure(title: str, xlabel: str, ylabel: str, width: float = 6.4, height: float = 3.6):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    ax.set_title(title, fontsize=11)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if xlabel == "optimizer step":
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return fig, ax


def _colours(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def curve(key: str, title: str, ylabel: str, caption: str, name: str | None = None) -> Callable[[Series], Plot | None]:
    """A per-step trainer key against the step, one line per run."""

    def draw(series: Series) -> Plot | None:
        data = [(label, *stage.series(key)) for label, stage in series]
        if not any(steps for _, steps, _ in data):
            return None
        fig, ax = _figure(title, "optimizer step", ylabel)
        for (label, steps, values), colour in zip(data, _colours(len(data))):
            if steps:
                ax.plot(steps, values, marker="o" if len(steps) < 30 else None, ms=3, color=colour, label=label)
        if len(data) > 1:
            ax.legend(fontsize=8)
        return Plot(name or key.replace("/", "_"), caption, fig)

    return draw


def curves(keys: list[tuple[str, str]], title: str, ylabel: str, caption: str, name: str):
    """Several per-step keys in one axes (e.g. DPO's chosen and rejected rewards); runs differ in line style."""

    def draw(series: Series) -> Plot | None:
        if not any(stage.series(k)[0] for _, stage in series for k, _ in keys):
            return None
        fig, ax = _figure(title, "optimizer step", ylabel)
        styles = ["-", "--", ":", "-."]
        for i, (label, stage) in enumerate(series):
            for (key, what), colour in zip(keys, _colours(len(keys))):
                steps, values = stage.series(key)
                if steps:
                    tag = what if len(series) == 1 else f"{what} ({label})"
                    ax.plot(steps, values, styles[i % 4], color=colour, marker="o" if len(steps) < 30 else None,
                            ms=3, label=tag)
        ax.legend(fontsize=8)
        return Plot(name, caption, fig)

    return draw


def mean_std(prefix: str, title: str, ylabel: str, caption: str, name: str):
    """`<prefix><x>/mean` with a ±`/std` band for every x logged (GRPO: each reward function)."""

    def draw(series: Series) -> Plot | None:
        names = sorted({k[len(prefix):-len("/mean")] for _, s in series for r in s.records for k in r
                        if k.startswith(prefix) and k.endswith("/mean")})
        if not names:
            return None
        fig, ax = _figure(title, "optimizer step", ylabel)
        styles = ["-", "--", ":", "-."]
        for i, (label, stage) in enumerate(series):
            for reward, colour in zip(names, _colours(len(names))):
                steps, means = stage.series(f"{prefix}{reward}/mean")
                _, stds = stage.series(f"{prefix}{reward}/std")
                if not steps:
                    continue
                tag = reward if len(series) == 1 else f"{reward} ({label})"
                ax.plot(steps, means, styles[i % 4], color=colour, marker="o" if len(steps) < 30 else None, ms=3,
                        label=tag)
                if len(stds) == len(means):
                    ax.fill_between(steps, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                                    color=colour, alpha=0.15)
        ax.legend(fontsize=8)
        return Plot(name, caption, fig)

    return draw


def _bars(ax, groups: list[str], values_by_run: list[tuple[str, list[float | None]]], percent: bool = True) -> None:
    n = len(values_by_run)
    width = 0.8 / max(n, 1)
    for i, ((label, values), colour) in enumerate(zip(values_by_run, _colours(n))):
        xs = [g + (i - (n - 1) / 2) * width for g in range(len(groups))]
        heights = [v if v is not None else 0.0 for v in values]
        bars = ax.bar(xs, heights, width, color=colour, label=label if n > 1 else None)
        for bar, v in zip(bars, values):
            if v is not None:
                ax.annotate(f"{v:.1%}" if percent else f"{v:g}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(groups)), groups)
    if n > 1:
        ax.legend(fontsize=8)


def dpo_heldout_pairs(series: Series) -> Plot | None:
    """Held-out pair accuracy (implicit reward) and how often the policy prefers chosen, before and after."""
    rows = [(label, stage.metrics.get("heldout_pairs")) for label, stage in series]
    if not any(pairs for _, pairs in rows):
        return None
    fig, ax = _figure("held-out pairs, before and after DPO", "", "share of pairs")
    groups = ["implicit-reward\naccuracy", "policy prefers\nchosen, before", "policy prefers\nchosen, after"]
    values = [(label, [p["after"]["pair_accuracy"], p["before"]["logp_accuracy"], p["after"]["logp_accuracy"]]
               if p else [None] * 3) for label, p in rows]
    _bars(ax, groups, values)
    ax.set_ylim(0, 1.1)
    return Plot("heldout_pairs", "Implicit-reward pair accuracy on the held-out pairs after DPO (0.5 before: the policy "
                "is its own reference), and the share of pairs whose chosen reply the policy gives the higher "
                "log-probability, before and after.", fig)


def rm_heldout(series: Series) -> Plot | None:
    values = [(label, [stage.metrics.get("heldout_pair_accuracy"), stage.metrics.get("heldout_tie_rate")])
              for label, stage in series]
    if not any(v[0] is not None for _, v in values):
        return None
    fig, ax = _figure("reward model on held-out pairs", "", "share of pairs")
    _bars(ax, ["pair accuracy\n(chosen scored higher)", "ties"], values)
    ax.set_ylim(0, 1.1)
    return Plot("heldout_pairs", "Share of held-out pairs whose chosen reply the reward model scores above the "
                "rejected one, and the share of ties.", fig)


def rs_pass_rates(series: Series) -> Plot | None:
    """Histogram over queries of their pass rate (passing samples / samples)."""
    data = [(label, stage.metrics.get("passes_per_query"), stage.metrics.get("sampling", {}).get("n"))
            for label, stage in series]
    data = [(label, hist, n) for label, hist, n in data if hist and n]
    if not data:
        return None
    n_max = max(n for _, _, n in data)
    groups = [f"{k}/{n_max}" for k in range(n_max + 1)]
    fig, ax = _figure("pass rate per query", "samples that pass, of those drawn per query", "queries")
    _bars(ax, groups, [(label, [hist.get(str(k), 0) for k in range(n_max + 1)]) for label, hist, _ in data],
          percent=False)
    return Plot("pass_rate_histogram", "How many queries had 0, 1, ... n passing samples: the left bar is the all-fail "
                "queries (too hard, no pair), the right one the all-pass queries (too easy, no pair); pairs come from "
                "the ones between.", fig)


def rs_pairs_per_query(series: Series) -> Plot | None:
    data = [(label, stage.metrics.get("pairs_per_query")) for label, stage in series]
    data = [(label, hist) for label, hist in data if hist]
    if not data:
        return None
    top = max(int(k) for _, hist in data for k in hist)
    fig, ax = _figure("pairs per query", "preference pairs built from one query", "queries")
    _bars(ax, [str(k) for k in range(top + 1)], [(label, [hist.get(str(k), 0) for k in range(top + 1)])
                                                 for label, hist in data], percent=False)
    return Plot("pairs_per_query", "How many queries gave 0, 1, ... pairs (capped by `max_pairs_per_prompt`).", fig)


def _rounds(series: Series) -> list[tuple[dict, str]]:
    """(round, legend tag) for every ordering round that lists its queries."""
    out = []
    for label, stage in series:
        rounds = [r for r in (stage.ordering or {}).get("rounds", []) if r.get("queries")]
        windows = [r for r in rounds if r["reason"] in ("initial", "window")]
        tags = {id(r): f"round {r['round']} ({r['reason']})" for r in rounds}
        if len(windows) > 1:  # a windowed first pass: its rounds drawn as one series
            first = {"round": 0, "reason": "first pass", "queries": [q for r in windows for q in r["queries"]]}
            tags[id(first)] = f"first pass ({len(windows)} windows)"
            rounds = [first] + [r for r in rounds if r not in windows]
        out += [(r, tags[id(r)] + (f", {label}" if len(series) > 1 else "")) for r in rounds]
    return out


def grpo_variance_histogram(series: Series) -> Plot | None:
    rounds = _rounds(series)
    if not rounds:
        return None
    fig, ax = _figure("reward variance per query, each ordering round", "reward variance over the query's samples",
                      "queries")
    for (r, tag), colour in zip(rounds, _colours(len(rounds))):
        variances = [q["variance"] for q in r["queries"]]
        ax.hist(variances, bins=20, alpha=0.55 if len(rounds) > 1 else 0.9, color=colour, label=tag)
    ax.legend(fontsize=8)
    return Plot("variance_histogram", "Distribution of the queries' reward variance under the policy of each ordering "
                "round; queries at zero variance give GRPO no signal (all samples rewarded alike).", fig)


def grpo_variance_by_position(series: Series) -> Plot | None:
    rounds = _rounds(series)
    if not rounds:
        return None
    fig, ax = _figure("reward variance against position in the order", "position the query is fed at",
                      "reward variance")
    total = sum(len(r["queries"]) for r, _ in rounds)
    size = 8 if total > 200 else 24  # a short run's few points stay visible
    for (r, tag), colour in zip(rounds, _colours(len(rounds))):
        points = sorted((q["position"], q["variance"]) for q in r["queries"] if q.get("position") is not None)
        ax.scatter([p for p, _ in points], [v for _, v in points], s=size, color=colour, label=tag)
    ax.legend(fontsize=8)
    return Plot("variance_by_position", "Each query's reward variance against the position it is fed to the trainer "
                "at, per ordering round: high-variance queries first.", fig)


def completion_lengths(series: Series) -> Plot | None:
    if not any(stage.series("completions/mean_length")[0] for _, stage in series):
        return None
    fig, ax = _figure("completion length", "optimizer step", "tokens")
    for (label, stage), colour in zip(series, _colours(len(series))):
        steps, mean = stage.series("completions/mean_length")
        _, low = stage.series("completions/min_length")
        _, high = stage.series("completions/max_length")
        if not steps:
            continue
        ax.plot(steps, mean, color=colour, marker="o" if len(steps) < 30 else None, ms=3, label=f"mean ({label})"
                if len(series) > 1 else "mean")
        if len(low) == len(high) == len(mean):
            ax.fill_between(steps, low, high, color=colour, alpha=0.15, label="min-max" if len(series) == 1 else None)
    ax.legend(fontsize=8)
    return Plot("completion_length", "Mean generated completion length per step, the band from shortest to longest.",
                fig)


def chain_accuracy(runs: list[Run]) -> Plot | None:
    """Held-out task accuracy across the chain: the first evaluated stage's start, then after each stage."""
    columns: list[str] = []
    values: dict[str, dict[str, float]] = {r.label: {} for r in runs}
    for run in runs:
        start_done = False
        for name, stage in run.stages.items():
            m = stage.metrics
            if not start_done and isinstance(m.get("heldout_accuracy_before"), (int, float)):
                values[run.label]["start"] = m["heldout_accuracy_before"]
                start_done = True
                if "start" not in columns:
                    columns.insert(0, "start")
            if is_task_accuracy(m):
                values[run.label][name] = m["heldout_accuracy"]
                start_done = True
                if name not in columns:
                    columns.append(name)
    if not columns:
        return None
    fig, ax = _figure("held-out task accuracy across the chain", "", "accuracy", width=max(6.4, 1.3 * len(columns)))
    _bars(ax, columns, [(label, [v.get(c) for c in columns]) for label, v in values.items()])
    ax.set_ylim(0, max(0.1, max((x for v in values.values() for x in v.values()), default=0) * 1.25))
    return Plot("heldout_accuracy", "Greedy answers to the held-out prompts checked by their verifiers: the start "
                "of the chain (the first stage's model before it trained), then after each stage that evaluates.", fig)


def heldout_during_training(series: Series) -> Plot | None:
    """`task_eval.every_steps`: held-out accuracy against the step, with the stage's start and end points."""
    data = []
    for label, stage in series:
        steps, values = stage.series("heldout_accuracy")
        if not steps:
            continue
        m = stage.metrics
        if isinstance(m.get("heldout_accuracy_before"), (int, float)):
            steps, values = [0, *steps], [m["heldout_accuracy_before"], *values]
        if isinstance(m.get("heldout_accuracy"), (int, float)) and isinstance(m.get("train_steps"), int):
            steps, values = [*steps, m["train_steps"]], [*values, m["heldout_accuracy"]]
        data.append((label, steps, values))
    if not data:
        return None
    fig, ax = _figure("held-out accuracy while training", "optimizer step", "share of prompts right")
    for (label, steps, values), colour in zip(data, _colours(len(data))):
        ax.plot(steps, values, marker="o", ms=3, color=colour, label=label)
    if len(data) > 1:
        ax.legend(fontsize=8)
    return Plot("heldout_during_training", "Greedy answers to the held-out prompts, checked by their verifiers, every "
                "`task_eval.every_steps` steps (with the stage's start and end).", fig)


TRAINING = [
    curve("loss", "training loss", "loss", "The trainer's loss at each logged step."),
    curve("learning_rate", "learning rate", "learning rate", "The schedule's learning rate at each logged step."),
    curve("grad_norm", "gradient norm", "norm (before clipping)", "The gradient's global norm before clipping."),
    heldout_during_training,
]

BY_KIND: dict[str, list[Callable[[Series], Plot | None]]] = {
    "sft": [curve("mean_token_accuracy", "token accuracy", "share of target tokens",
                  "Share of target tokens whose most likely next token is the right one (train batches).")],
    "rejection_sampling": [rs_pass_rates, rs_pairs_per_query],
    "dpo": [
        curves([("rewards/chosen", "chosen"), ("rewards/rejected", "rejected")], "implicit rewards", "β · log-ratio",
               "DPO's implicit reward (β times the policy/reference log-ratio) of chosen and rejected replies, "
               "training batches.", "rewards"),
        curve("rewards/margins", "reward margin", "chosen − rejected", "Mean implicit-reward margin, training batches.",
              "reward_margin"),
        curve("rewards/accuracies", "pair accuracy (training batches)", "share of pairs",
              "Share of training pairs whose chosen reply has the higher implicit reward.", "pair_accuracy"),
        dpo_heldout_pairs,
    ],
    "reward_model": [
        curve("accuracy", "pair accuracy (training batches)", "share of pairs",
              "Share of training pairs the reward model ranks right.", "pair_accuracy"),
        curve("margin", "reward margin (training batches)", "chosen − rejected score",
              "Mean score margin of chosen over rejected, training batches.", "margin"),
        rm_heldout,
    ],
    "grpo": [
        curve("reward", "total reward", "weighted reward", "Mean weighted reward of the step's completions.",
              "reward"),
        mean_std("rewards/", "reward per reward function", "reward (mean ± std)",
                 "Each reward function's mean over the step's completions, the band one standard deviation.",
                 "rewards"),
        curve("kl", "KL to the reference", "KL", "Mean per-token KL of the policy to the reference (beta > 0).", "kl"),
        curve("entropy", "policy entropy", "nats per token", "Mean per-token entropy of the sampled completions.",
              "entropy"),
        completion_lengths,
        grpo_variance_histogram,
        grpo_variance_by_position,
    ],
}


def stage_plots(kind: str, series: Series) -> list[Plot]:
    drawn = [draw(series) for draw in TRAINING + BY_KIND.get(kind, [])]
    return [p for p in drawn if p is not None]
