"""The sweep report's pictures (matplotlib, Agg backend: no display needed). Each function writes one PNG."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - after choosing the backend

FINISHED, STOPPED, FAILED, NO_KD = "#1f77b4", "#9aa5b1", "#d62728", "#ff7f0e"


def _save(fig, path: Path, dpi: int = 110) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def _colour(row: dict[str, Any]) -> str:
    if row["status"] == "FAILED":
        return FAILED
    return FINISHED if row["completed_full_budget"] else STOPPED


def ap_over_epochs(
    rows: list[dict[str, Any]], metric: str, teacher: float | None, baseline: float | None, path: Path
) -> Path:
    """metric per epoch, one line per trial (finished blue, stopped grey, failed red; a no-KD trial
    orange, dotted), reference lines. A teacher far above every student is named in the title
    rather than drawn, so the students' differences stay readable."""
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(8, 5))
    top = 0.0
    for row in rows:
        values = row["metrics"].get(metric, [])
        points = [(e, v) for e, v in zip(row["epochs"], values) if v is not None]
        if not points:
            continue
        no_kd = (row.get("config") or {}).get("distill.method") == "none"
        ax.plot(
            *zip(*points),
            marker="o",
            ms=3,
            lw=1.6 if no_kd else 1.2,
            ls=":" if no_kd else "-",
            color=NO_KD if no_kd else _colour(row),
            alpha=0.9,
        )
        top = max(top, max(v for _, v in points))
        name = (row.get("run_name") or "").split(" ")[0]  # t03, as the console and MLflow call it
        ax.annotate(
            name if name.startswith("t") else row["trial_id"][-5:],
            points[-1],
            fontsize=7,
            xytext=(3, 0),
            textcoords="offset points",
        )
    title = f"{metric} over epochs, {len(rows)} trials"
    if teacher is not None and (top <= 0 or teacher <= 2.5 * top):
        ax.axhline(teacher, color="black", ls="--", lw=1, label=f"teacher {teacher:.3f}")
    elif teacher is not None:
        title += f"; teacher {teacher:.3f}, above the plotted range"
    if baseline is not None:
        ax.axhline(baseline, color=NO_KD, ls=":", lw=1, label=f"student without KD (best) {baseline:.3f}")
    ax.plot([], [], color=FINISHED, label="full budget")
    ax.plot([], [], color=STOPPED, label="stopped early")
    if any(r["status"] == "FAILED" for r in rows):
        ax.plot([], [], color=FAILED, label="failed")
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"validation {metric}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if baseline is None:
        title += "  (no no-KD baseline in this sweep: baseline_trial: true, distill.method none, or --baseline-ap)"
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    return _save(fig, path)


def metric_vs_knobs(rows: list[dict[str, Any]], knobs: dict[str, str], metric: str, path: Path) -> Path:
    """best <metric> against each searched knob (log x axis for log-uniform knobs)."""
    keys = list(knobs)
    cols = min(3, len(keys)) or 1
    nrows = math.ceil(len(keys) / cols) or 1
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        xs, ys, cs = [], [], []
        for row in rows:
            value, best = row["params"].get(key), row["best"].get(metric)
            if value is None or best is None:
                continue
            xs.append(value if not isinstance(value, str) else str(value))
            ys.append(best)
            cs.append(_colour(row))
        if xs and all(isinstance(x, (int, float)) for x in xs):
            ax.scatter(xs, ys, c=cs, s=28, edgecolors="black", linewidths=0.4)
            if knobs[key] == "loguniform" or (min(xs) > 0 and max(xs) / min(xs) >= 30):  # values over decades
                ax.set_xscale("log")
        elif xs:
            labels = sorted({str(x) for x in xs})
            ax.scatter([labels.index(str(x)) for x in xs], ys, c=cs, s=28, edgecolors="black", linewidths=0.4)
            ax.set_xticks(range(len(labels)), labels, rotation=20, fontsize=8)
        ax.set_xlabel(key, fontsize=8)
        ax.set_ylabel(f"best {metric}", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    fig.suptitle(f"best {metric} against each searched knob (blue: full budget, grey: stopped early)", fontsize=9)
    return _save(fig, path)


def importance_bars(importances: dict[str, float], metric: str, evaluator: str, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(importances) + 1.5))
    names = list(importances)[::-1]
    ax.barh(names, [importances[n] for n in names], color=FINISHED)
    for y, name in enumerate(names):
        ax.text(importances[name], y, f" {importances[name]:.2f}", va="center", fontsize=8)
    ax.set_xlabel(f"importance for best {metric} ({evaluator})")
    ax.set_xlim(0, max(1.0, max(importances.values()) * 1.15))
    ax.set_title("hyperparameter importance (Optuna)", fontsize=9)
    return _save(fig, path)


def pareto_front(
    rows: list[dict[str, Any]], objectives: list[tuple[str, str]], front_ids: set[str], path: Path
) -> Path:
    (mx, _), (my, _) = objectives[1], objectives[0]
    fig, ax = plt.subplots(figsize=(7, 5))
    pts = [(r["best"].get(mx), r["best"].get(my), r) for r in rows]
    pts = [(x, y, r) for x, y, r in pts if x is not None and y is not None]
    ax.scatter(
        [x for x, _, r in pts if r["trial_id"] not in front_ids],
        [y for _, y, r in pts if r["trial_id"] not in front_ids],
        color=STOPPED,
        s=24,
        label="dominated",
    )
    front = sorted((x, y) for x, y, r in pts if r["trial_id"] in front_ids)
    if front:
        ax.plot(*zip(*front), color=FINISHED, marker="o", lw=1.2, label="Pareto front")
    ax.set_xlabel(mx)
    ax.set_ylabel(my)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{my} against {mx}: finished trials", fontsize=9)
    return _save(fig, path)


def sample_grid(
    panels: list[list[tuple[Any, list[tuple[list[float], str, float | None]]]]], columns: list[str], path: Path
) -> Path:
    """panels[row][col] = (PIL image, [(xyxy box, label, score or None)]); one column per source."""
    rows, cols = len(panels), len(columns)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
    colours = ["#2ca02c", "#1f77b4", "#ff7f0e"]
    for r, row in enumerate(panels):
        for c, (image, boxes) in enumerate(row):
            ax = axes[r][c]
            ax.imshow(image)
            for (x0, y0, x1, y1), label, score in boxes:
                ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, lw=1.5, color=colours[c % 3]))
                text = label if score is None else f"{label} {score:.2f}"
                ax.text(
                    x0,
                    y0,
                    text,
                    fontsize=6,
                    color="white",
                    va="bottom",
                    bbox={"facecolor": colours[c % 3], "pad": 0.5, "lw": 0},
                )
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(columns[c], fontsize=9)
    return _save(fig, path, dpi=90)


def method_comparison(study: dict[str, Any], path: Path) -> Path:
    """Per-method results over seeds (dots, mean bar) and paired differences with 95% intervals."""
    metric = study["metric"]
    names = sorted(study["methods"], key=lambda n: study["methods"][n].get(metric, {}).get("mean", -1))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 0.45 * len(names) + 2.0), sharey=True)
    for y, name in enumerate(names):
        s = study["methods"][name].get(metric)
        if not s:
            continue
        values = list(s["values"].values())
        colour = NO_KD if name == "none" else FINISHED
        left.barh(y, s["mean"], color=colour, alpha=0.35)
        left.scatter(values, [y] * len(values), color=colour, s=18, edgecolors="black", linewidths=0.4, zorder=3)
        left.text(max(values + [s["mean"]]), y, f"  mean {s['mean']:.3f}", va="center", fontsize=7)
    left.set_yticks(range(len(names)), names, fontsize=8)
    left.set_xlabel(f"{study.get('label', 'best ' + metric)} per seed (bar: mean)")
    left.grid(axis="x", alpha=0.3)
    for offset, (key, label, colour) in enumerate(
        (("versus_alone", "vs the student alone", NO_KD), ("versus_best_baseline", "vs the best baseline", FINISHED))
    ):
        labelled = False
        for y, name in enumerate(names):
            d = study[key].get(name)
            if not d:
                continue
            yy = y + (offset - 0.5) * 0.3
            if d["low"] is not None:
                right.plot([d["low"], d["high"]], [yy, yy], color=colour, lw=2)
            right.scatter([d["mean"]], [yy], color=colour, s=20, zorder=3, label=None if labelled else label)
            labelled = True
    right.axvline(0.0, color="black", lw=0.8)
    right.set_xlabel(f"paired difference in {metric} (95% interval over seeds)")
    right.grid(axis="x", alpha=0.3)
    handles, labels = right.get_legend_handles_labels()
    if handles:
        right.legend(handles, labels, fontsize=7, loc="lower right")
    base = study.get("best_baseline")
    fig.suptitle(f"methods over seeds{f' (best baseline: {base})' if base else ''}", fontsize=9)
    return _save(fig, path)
