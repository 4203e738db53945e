"""`qwen-align report RUN_DIR [RUN_DIR ...]`: one page per report, `report.md` and a self-contained
`report.html` (figures embedded), with figures as PNG files beside them.

Per stage: what it started from, its status and duration, data counts, key hyperparameters, metrics (one column
per run) and its plots (`plots.py`); first the held-out accuracy across the chain. Several run directories
overlay their curves, each labelled by its folder name. Everything is read from the run directory
(`collect.py`): the manifest, metrics.jsonl and the artifacts the manifest names.
"""

from __future__ import annotations

import base64
import html
import io
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..console import duration, headline
from ..fsutil import atomic_dir, atomic_write_text
from ..tracking import summary_scalars
from .collect import Run, load_runs, read_manifest
from .plots import Plot, chain_accuracy, stage_plots

log = logging.getLogger(__name__)

__all__ = ["write_report", "read_manifest", "load_runs"]

# Metrics shown under "data" rather than "metrics", and those left to the figures or too detailed to list.
DATA_KEYS = ("queries", "samples", "pairs", "sft_rows", "mixed", "all_pass", "all_fail", "duplicate_samples",
             "truncated_samples", "heldout_pairs", "samples_consumed", "queries_dropped")
HIDDEN = ("heldout/", "pairs_per_query/", "passes_per_query/", "sampling/", "fingerprint", "data/bad_row_examples",
          "review_rejections/", "heldout_pairs/before/pairs", "heldout_pairs/after/pairs")


@dataclass
class Section:
    title: str
    tables: list[tuple[str, list[str], list[list[str]]]] = field(default_factory=list)  # (caption, header, rows)
    plots: list[Plot] = field(default_factory=list)
    note: str = ""


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, (list, tuple)):
        return ", ".join(map(_fmt, value))
    return str(value)


def _by_run(rows: dict[str, dict[str, Any]], runs: list[str]) -> list[list[str]]:
    """{key: {run: value}} as table rows, keys in first-seen order."""
    return [[key, *(_fmt(values.get(r)) for r in runs)] for key, values in rows.items()]


def _collect(per_run: list[tuple[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    for label, values in per_run:
        for key, value in values.items():
            rows.setdefault(key, {})[label] = value
    return rows


def _split_metrics(metrics: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(data counts, other metrics), flattened to `a/b` keys, details the figures show left out."""
    flat = summary_scalars(metrics)
    flat.update({k: v for k, v in metrics.items() if isinstance(v, (str, list)) and k not in ("ordering_artifact",)})
    data, other = {}, {}
    for key, value in flat.items():
        if key.startswith(HIDDEN) or key in HIDDEN:
            continue
        target = data if key in DATA_KEYS or key.startswith(("data/", "lengths/")) else other
        target[key] = int(value) if isinstance(value, float) and value.is_integer() and target is data else value
    return data, other


def stage_section(name: str, runs: list[Run]) -> Section:
    present = [(run.label, run.stages[name]) for run in runs if name in run.stages]
    labels = [label for label, _ in present]
    kind = present[0][1].kind
    section = Section(f"{name} ({kind})")
    overview = _collect([(label, {
        "status": s.entry.get("status"), "started from": s.entry.get("init_from"),
        "resumed from": s.entry.get("resumed_from"), "duration": duration(s.entry) or None,
        "headline": headline(s.entry) or None, "output": s.entry.get("output"),
    }) for label, s in present])
    section.tables.append(("", ["", *labels], _by_run(overview, labels)))
    data_rows, metric_rows = [], []
    for label, s in present:
        data, other = _split_metrics(s.metrics)
        data_rows.append((label, data))
        metric_rows.append((label, other))
    if any(v for _, v in data_rows):
        section.tables.append(("data", ["", *labels], _by_run(_collect(data_rows), labels)))
    hyper = _collect([(label, s.entry.get("hyperparameters") or {}) for label, s in present])
    if hyper:
        section.tables.append(("key hyperparameters", ["", *labels], _by_run(hyper, labels)))
    if any(v for _, v in metric_rows):
        section.tables.append(("metrics", ["", *labels], _by_run(_collect(metric_rows), labels)))
    section.plots = stage_plots(kind, present)
    error = next((s.entry.get("error") for _, s in present if s.entry.get("error")), None)
    if error:
        section.note = f"error: {error}"
    return section


def build_sections(runs: list[Run]) -> list[Section]:
    chain = Section("chain")
    names: list[str] = []
    for run in runs:
        names += [n for n in run.stages if n not in names]
    rows = [[name, *((headline(run.stages[name].entry) or run.stages[name].entry.get("status", "")) if name in
                     run.stages else "-" for run in runs)] for name in names]
    chain.tables.append(("", ["stage", *(r.label for r in runs)], rows))
    accuracy = chain_accuracy(runs)
    if accuracy is not None:
        chain.plots.append(accuracy)
    return [chain, *(stage_section(name, runs) for name in names)]


def _png(plot: Plot) -> bytes:
    buffer = io.BytesIO()
    plot.figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in text)


def _markdown(runs: list[Run], sections: list[Section], figure_files: dict[int, str]) -> str:
    out = ["# qwen-align report", "", "Runs: " + ", ".join(f"`{r.label}` ({r.path})" for r in runs), ""]
    for section in sections:
        out += [f"## {section.title}", ""]
        if section.note:
            out += [section.note, ""]
        for caption, header, rows in section.tables:
            if caption:
                out += [f"**{caption}**", ""]
            out.append("| " + " | ".join(header) + " |")
            out.append("|" + "---|" * len(header))
            out += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
            out.append("")
        for plot in section.plots:
            out += [f"![{plot.name}]({figure_files[id(plot)]})", "", f"*{plot.caption}*", ""]
    return "\n".join(out)


STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;
font-size:13px;vertical-align:top}th{background:#f4f4f4}figure{display:inline-block;margin:0 1em 1em 0;
max-width:640px;vertical-align:top}figcaption{font-size:12px;color:#555}img{max-width:100%}h2{border-bottom:1px solid
#ddd;padding-bottom:.2em}code{background:#f4f4f4;padding:0 3px}"""


def _html(runs: list[Run], sections: list[Section], pngs: dict[int, bytes]) -> str:
    e = html.escape
    out = ["<!doctype html><html><head><meta charset='utf-8'><title>qwen-align report</title>",
           f"<style>{STYLE}</style></head><body><h1>qwen-align report</h1>",
           "<p>Runs: " + ", ".join(f"<code>{e(r.label)}</code> ({e(str(r.path))})" for r in runs) + "</p>"]
    for section in sections:
        out.append(f"<h2>{e(section.title)}</h2>")
        if section.note:
            out.append(f"<p>{e(section.note)}</p>")
        for caption, header, rows in section.tables:
            if caption:
                out.append(f"<h3>{e(caption)}</h3>")
            out.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>")
            out += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in rows]
            out.append("</table>")
        for plot in section.plots:
            data = base64.b64encode(pngs[id(plot)]).decode("ascii")
            out.append(f"<figure><img alt='{e(plot.name)}' src='data:image/png;base64,{data}'>"
                       f"<figcaption>{e(plot.caption)}</figcaption></figure>")
    out.append("</body></html>")
    return "\n".join(out)


def write_report(run_dirs: list[str | Path], out: str | Path | None = None) -> Path:
    """Write report.md, report.html and figures/ into `out` (default: `<first run dir>/report`, or
    `<first run dir>/report-compare` for several, so a comparison never replaces the run's own report); returns
    `out`. The folder appears whole: an earlier report there is replaced only once the new one is written."""
    runs = load_runs(run_dirs)
    if out is None:
        out = runs[0].path / ("report" if len(runs) == 1 else "report-compare")
    out = Path(out)
    sections = build_sections(runs)
    pngs: dict[int, bytes] = {}
    files: dict[int, str] = {}
    for section in sections:
        for plot in section.plots:
            pngs[id(plot)] = _png(plot)
            files[id(plot)] = f"figures/{_slug(section.title.split(' ')[0])}-{plot.name}.png"
    if out.exists() and not (out / "report.md").is_file() and any(out.iterdir()):
        from ..errors import UserError

        raise UserError(f"--out {out}: the folder exists and holds no report; give a new or empty folder")
    with atomic_dir(out) as staging:
        staging = Path(staging)
        (staging / "figures").mkdir()
        for key, rel in files.items():
            (staging / rel).write_bytes(pngs[key])
        atomic_write_text(staging / "report.md", _markdown(runs, sections, files))
        atomic_write_text(staging / "report.html", _html(runs, sections, pngs))
    return out
