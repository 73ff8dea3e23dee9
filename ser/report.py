"""Self-contained HTML reports: a model's evaluation, and the results of labeling runs.

Figures are matplotlib PNGs embedded as base64 data URIs, so a report is one file that opens anywhere,
offline. Figures are drawn on `matplotlib.figure.Figure` directly (Agg), never through pyplot's global state.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ser import store
from ser.ravdess import EMOTIONS

FIGURE_DPI = 110
LOW_CONFIDENCE = 0.5  # results below this calibrated confidence go to human review
TOP_FILES = 10  # rows in the slowest / longest files table
CONFIDENCE_BINS = 20
MANIFEST_COLUMNS = ["run_id", "status", "started_at", "listed", "skipped", "ok", "error", "wall_seconds",
                    "files_per_second"]
TIMING_COLUMN = "processing_s"  # per-file read + decode + feature seconds (null in outputs that predate it)
COLORS = {"main": "#3b6ea8", "second": "#e08a3c", "bad": "#c44e52", "grid": "#d9d9d9"}

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #222; margin: 2rem auto;
       max-width: 1100px; padding: 0 1.5rem; line-height: 1.45; }
h1 { font-size: 1.7rem; margin-bottom: .2rem; } h2 { font-size: 1.25rem; margin-top: 2.2rem;
     border-bottom: 1px solid #ddd; padding-bottom: .3rem; }
.meta { color: #666; margin-top: 0; } img { max-width: 100%; height: auto; display: block; margin: .8rem 0; }
table { border-collapse: collapse; margin: .8rem 0; font-size: .92rem; }
th, td { padding: .3rem .8rem; border-bottom: 1px solid #e5e5e5; text-align: left; }
.num { text-align: right; font-variant-numeric: tabular-nums; } th { background: #f5f6f8; }
.row { display: flex; flex-wrap: wrap; gap: 1.5rem; align-items: flex-start; }
.row > div { flex: 1 1 420px; min-width: 0; }
"""


def figure_uri(fig: Figure) -> str:
    """A figure as a PNG data URI."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=FIGURE_DPI, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _img(fig: Figure, alt: str) -> str:
    return f'<img src="{figure_uri(fig)}" alt="{html.escape(alt)}">'


def _cell(value: object, spec: str) -> str:
    return "" if pd.isna(value) else html.escape(spec.format(value))


def _table(frame: pd.DataFrame, formats: dict[str, str] | None = None, header: bool = True) -> str:
    """An HTML table; numeric columns are right-aligned and formatted with `formats` (e.g. {"x": "{:.2f}"})."""
    align = ['class="num"' if pd.api.types.is_numeric_dtype(frame[column]) else "" for column in frame]
    specs = [(formats or {}).get(column, "{}") for column in frame]
    head = "".join(f"<th {a}>{html.escape(str(column))}</th>" for column, a in zip(frame, align, strict=True))
    rows = [f"<tr>{head}</tr>"] if header else []
    for values in frame.itertuples(index=False):
        cells = "".join(f"<td {a}>{_cell(v, spec)}</td>" for v, a, spec in zip(values, align, specs, strict=True))
        rows.append(f"<tr>{cells}</tr>")
    return f"<table>{''.join(rows)}</table>"


def _key_values(pairs: dict[str, object]) -> str:
    return _table(pd.DataFrame({"name": list(pairs), "value": [str(v) for v in pairs.values()]}), header=False)


def _page(title: str, subtitle: str, sections: list[tuple[str, str]]) -> str:
    """The whole document: a title, a grey subtitle line and (heading, html) sections."""
    body = "\n".join(f"<h2>{html.escape(heading)}</h2>\n{content}" for heading, content in sections)
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{CSS}</style></head>\n'
        f'<body><h1>{html.escape(title)}</h1><p class="meta">{html.escape(subtitle)}</p>\n{body}\n</body></html>\n'
    )


def _percent(part: float, whole: float) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "n/a"


# --- evaluation (ser evaluate --html) -------------------------------------------------------------------------------


def confusion_figure(matrix: list[list[int]], classes: tuple[str, ...]) -> Figure:
    """Counts, coloured by each true class's share (row-normalized), so rare classes stay readable."""
    counts = np.asarray(matrix)
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    fig = Figure(figsize=(6.4, 5.6))
    ax = fig.subplots()
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for (row, col), value in np.ndenumerate(counts):
        ax.text(col, row, str(value), ha="center", va="center", fontsize=9,
                color="white" if shares[row, col] > 0.55 else "#222")
    ax.set_xticks(range(len(classes)), classes, rotation=40, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    return fig


def per_class_figure(per_class: dict[str, dict]) -> Figure:
    """Precision and recall per class, side by side."""
    names = list(per_class)
    x = np.arange(len(names))
    fig = Figure(figsize=(7.2, 3.6))
    ax = fig.subplots()
    for offset, metric, color in ((-0.2, "precision", COLORS["main"]), (0.2, "recall", COLORS["second"])):
        ax.bar(x + offset, [per_class[n][metric] for n in names], width=0.4, label=metric, color=color)
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_ylim(0, 1.05)
    ax.grid(axis="y", color=COLORS["grid"])
    ax.set_axisbelow(True)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.28), ncol=2, frameon=False)
    return fig


def reliability_figure(bins: list[dict], ece: float) -> Figure:
    """Accuracy per confidence bin against the diagonal (shaded: the gap to the bin's mean confidence), with counts."""
    used = [b for b in bins if b["count"]]
    lower = [b["lower"] for b in used]
    width = [b["upper"] - b["lower"] for b in used]
    accuracy = np.array([b["accuracy"] for b in used])
    gap = np.array([b["confidence"] for b in used]) - accuracy
    fig = Figure(figsize=(5.6, 6.2))
    ax, count_ax = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [4, 1]})
    ax.plot([0, 1], [0, 1], linestyle="--", color="#888", label="perfect calibration")
    ax.bar(lower, accuracy, width=width, align="edge", color=COLORS["main"], edgecolor="white", label="accuracy")
    ax.bar(lower, gap, bottom=accuracy, width=width, align="edge", color=COLORS["bad"], alpha=0.35,
           edgecolor=COLORS["bad"], label="gap to mean confidence")
    ax.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy", title=f"ECE {ece:.3f}")
    ax.legend(loc="upper left", frameon=False)
    count_ax.bar(lower, [b["count"] for b in used], width=width, align="edge", color="#999", edgecolor="white")
    count_ax.set(xlabel="confidence", ylabel="files")
    return fig


def evaluation_html(result: dict, classes: tuple[str, ...]) -> str:
    """The `ser evaluate --html` page: metrics, confusion matrix, per-class scores and reliability diagram."""
    from ser.evaluate import interval

    level = f"{result['intervals']['level']:.0%} of what {result['n']} test files give by chance"
    summary = _key_values(
        {
            "test files": result["n"],
            "accuracy": f"{result['accuracy']:.4f} {interval(result, 'accuracy')}",
            "macro F1": f"{result['macro_f1']:.4f} {interval(result, 'macro_f1')}",
            "weighted F1": f"{result['weighted_f1']:.4f}",
            "ECE before calibration": f"{result['ece_uncalibrated']:.4f}",
            "ECE after calibration": f"{result['ece']:.4f}",
            "ECE a perfectly calibrated model shows by chance": interval(result, "ece_if_calibrated"),
            "intervals [low, high]": level,
            "NLL before / after calibration": f"{result['nll_uncalibrated']:.4f} / {result['nll']:.4f}",
            "temperature": f"{result['temperature']:.3f}",
            "model sha256": result["model_sha256"][:16],
        }
    )
    per_class = pd.DataFrame.from_dict(result["per_class"], orient="index").rename_axis("class").reset_index()
    per_class = per_class.rename(columns={"f1": "F1"})
    per_class_html = _table(per_class, dict.fromkeys(("precision", "recall", "F1"), "{:.3f}"))
    sections = [
        ("Metrics", summary),
        ("Confusion matrix", _img(confusion_figure(result["confusion_matrix"], classes), "confusion matrix")),
        ("Per class", f'<div class="row"><div>{_img(per_class_figure(result["per_class"]), "precision and recall")}'
                      f"</div><div>{per_class_html}</div></div>"),
        ("Calibration (15 bins, after temperature scaling)",
         _img(reliability_figure(result["reliability"], result["ece"]), "reliability diagram")),
    ]
    subtitle = f"model {result['model']} · protocol {result['protocol']} · test split"
    return _page(f"Evaluation of {result['model']}", subtitle, sections)


# --- labeling results (ser report) ----------------------------------------------------------------------------------


def read_results(location: store.Store) -> pd.DataFrame:
    """Every committed row of every run in an output location; ValueError when there are none."""
    data = location.dataset()
    if data is None:
        raise ValueError(f"{location.uri}: no labeling results here")
    return data.to_table().to_pandas()


def read_manifests(location: store.Store) -> pd.DataFrame:
    """One row per run manifest, oldest first, started_at in naive UTC."""
    rows = [
        {key: m.get(key) for key in ("run_id", "status", "started_at")}
        | {key: m["counts"].get(key) for key in ("listed", "skipped", "ok", "error")}
        | {key: m.get(key) for key in ("wall_seconds", "files_per_second")}
        for m in location.manifests()
    ]
    frame = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
    frame["started_at"] = pd.to_datetime(frame["started_at"], utc=True).dt.tz_localize(None)
    return frame.sort_values("started_at", ignore_index=True)


def select_rows(results: pd.DataFrame, run: str | None) -> pd.DataFrame:
    """One run's rows, or without `run` the latest row of every file (the collection as it stands)."""
    if run is None:
        return store.latest(results).reset_index(drop=True)
    if run not in set(results["run_id"]):
        raise ValueError(f"run {run!r} not found; runs: {', '.join(sorted(set(results['run_id'])))}")
    return results[results["run_id"] == run].reset_index(drop=True)


def runs_figure(manifests: pd.DataFrame) -> Figure:
    """Files per run (labeled, errors, skipped as unchanged) and throughput, over time."""
    fig = Figure(figsize=(9, 5))
    files_ax, speed_ax = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    for column, label, color in (("ok", "labeled", COLORS["main"]), ("error", "errors", COLORS["bad"]),
                                 ("skipped", "skipped (unchanged)", "#999")):
        files_ax.plot(manifests["started_at"], manifests[column], "o-", color=color, label=label)
    files_ax.set_ylabel("files")
    files_ax.legend(loc="lower left", bbox_to_anchor=(0, 1), frameon=False, ncol=3)
    speed_ax.plot(manifests["started_at"], manifests["files_per_second"], "o-", color=COLORS["second"])
    speed_ax.set(ylabel="files / s", xlabel="run start (UTC)")
    for ax in (files_ax, speed_ax):
        ax.set_ylim(bottom=0)
        ax.yaxis.set_major_locator(MaxNLocator(nbins=5, integer=True))
        ax.grid(color=COLORS["grid"])
    fig.autofmt_xdate()
    return fig


def labels_figure(ok: pd.DataFrame, classes: tuple[str, ...]) -> Figure:
    """How many files got each label."""
    counts = ok["label"].value_counts().reindex(classes, fill_value=0)
    fig = Figure(figsize=(7.2, 3.6))
    ax = fig.subplots()
    bars = ax.bar(classes, counts.to_numpy(), color=COLORS["main"])
    ax.bar_label(bars, padding=2, fontsize=9)
    ax.set_ylabel("files")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.margins(y=0.15)
    ax.tick_params(axis="x", rotation=30)
    return fig


def confidence_figure(ok: pd.DataFrame, classes: tuple[str, ...], threshold: float) -> Figure:
    """One confidence histogram per label, with the review threshold marked."""
    fig = Figure(figsize=(10, 4.4))
    axes = fig.subplots(2, (len(classes) + 1) // 2, sharex=True, sharey=True).ravel()
    edges = np.linspace(0, 1, CONFIDENCE_BINS + 1)
    for ax, name in zip(axes, classes, strict=False):
        values = ok.loc[ok["label"] == name, "confidence"]
        ax.hist(values, bins=edges, color=COLORS["main"])
        ax.axvline(threshold, color=COLORS["bad"], linestyle="--", linewidth=1)
        ax.set_title(f"{name} ({len(values)})", fontsize=10)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes[len(classes):]:
        ax.set_visible(False)
    fig.supxlabel("calibrated confidence (dashed: review threshold)", fontsize=10)
    fig.supylabel("files", fontsize=10)
    return fig


def summary_table(rows: pd.DataFrame, threshold: float) -> str:
    """Headline numbers: files, errors, low-confidence share, audio hours, models."""
    ok = rows[rows["status"] == "ok"]
    errors = len(rows) - len(ok)
    low = int((ok["confidence"] < threshold).sum())
    return _key_values(
        {
            "files": len(rows),
            "labeled": len(ok),
            "errors": f"{errors} ({_percent(errors, len(rows))})",
            f"low confidence (< {threshold:g})": f"{low} ({_percent(low, len(ok))} of labeled)" if len(ok) else "n/a",
            "mean confidence": f"{ok['confidence'].mean():.3f}" if len(ok) else "n/a",
            "audio hours": f"{ok['duration_s'].sum() / 3600:.2f}",
            "models": ", ".join(sorted(set(rows["model_name"].dropna()))),
        }
    )


def runs_table(manifests: pd.DataFrame) -> str:
    names = {"started_at": "started (UTC)", "wall_seconds": "wall s", "files_per_second": "files/s"}
    shown = manifests.rename(columns=names)
    return _table(shown, {"started (UTC)": "{:%Y-%m-%d %H:%M}", "wall s": "{:.1f}", "files/s": "{:.2f}"})


def files_table(rows: pd.DataFrame) -> tuple[str, str]:
    """(heading, table) of the slowest files when per-file timings exist, else the longest files."""
    timed = TIMING_COLUMN in rows and rows[TIMING_COLUMN].notna().any()
    column, heading = (TIMING_COLUMN, "Slowest files") if timed else ("duration_s", "Longest files")
    columns = ["path", *dict.fromkeys([column, "duration_s"]), "label", "confidence", "status"]
    shown = rows.nlargest(TOP_FILES, column)[columns]
    names = {TIMING_COLUMN: "processing s", "duration_s": "duration s"}
    formats = {"processing s": "{:.2f}", "duration s": "{:.1f}", "confidence": "{:.3f}"}
    return heading, _table(shown.rename(columns=names), formats)


def errors_table(rows: pd.DataFrame) -> str:
    """Error reasons, most frequent first, with one example path each."""
    errors = rows[rows["status"] == "error"]
    if errors.empty:
        return "<p>No errors.</p>"
    grouped = errors.groupby("error", sort=False)["path"].agg(["size", "first"]).sort_values("size", ascending=False)
    return _table(grouped.reset_index().set_axis(["reason", "files", "example"], axis=1))


def results_html(out: str, run: str | None = None, threshold: float = LOW_CONFIDENCE) -> str:
    """The `ser report` page for a labeling output folder: one run, or the latest result of every file."""
    location = store.Store(out, store.s3_options())
    results = read_results(location)
    rows = select_rows(results, run)
    manifests = read_manifests(location)
    ok = rows[rows["status"] == "ok"]
    n_runs = results["run_id"].nunique()
    scope = f"run {run}" if run else f"latest result of each file over {n_runs} run{'s' * (n_runs > 1)}"
    sections = [("Summary", summary_table(rows, threshold))]
    if len(manifests) > 1:
        sections.append(("Runs over time", _img(runs_figure(manifests), "files and files per second per run")))
    if not manifests.empty:
        sections.append(("Runs", runs_table(manifests)))
    if not ok.empty:
        sections += [
            ("Labels", _img(labels_figure(ok, EMOTIONS), "label distribution")),
            ("Confidence by label", _img(confidence_figure(ok, EMOTIONS, threshold), "confidence histograms")),
        ]
    sections += [files_table(rows), ("Errors", errors_table(rows))]
    generated = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return _page("Labeling results", f"{out} · {scope} · generated {generated}", sections)
