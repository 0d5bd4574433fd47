"""The efficacy study page of a sweep that compares methods over seeds: per method the mean and
spread of AP and AP50, and each method's paired difference to the student alone and to the best
baseline, with a 95% confidence interval (trials of the same `train.seed` are pairs).

A method is a trial's `variant` (a named bundle of the spec's `variants`, e.g. CLoCKDistill at the
paper's defaults and at a tuned setting) or else its `distill.method`. Only trials that ran their
full budget count. `clockdistill report` writes methods.json and method_comparison.png when the
sweep searched distill.method or variant and at least two methods have results.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

BASELINES = ("vanilla_kd", "detrdistill", "fitnet")  # the published competitors (not CLoCKDistill's own ablations)
ALONE = "none"


def method_of(row: dict[str, Any]) -> str | None:
    config = row.get("config") or {}
    return config.get("variant") or config.get("distill.method")


def _seed(row: dict[str, Any]) -> Any:
    return (row.get("config") or {}).get("train.seed", 0)


def paired_difference(a: dict[Any, float], b: dict[Any, float]) -> dict[str, Any] | None:
    """Mean of a[s] - b[s] over the seeds both have, with a two-sided 95% t interval (n >= 2)."""
    from scipy.stats import t as student_t

    seeds = sorted(set(a) & set(b), key=str)
    if not seeds:
        return None
    diffs = [a[s] - b[s] for s in seeds]
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return {"mean": mean, "n": 1, "low": None, "high": None, "seeds": seeds}
    half = float(student_t.ppf(0.975, len(diffs) - 1)) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return {"mean": mean, "n": len(diffs), "low": mean - half, "high": mean + half, "seeds": seeds}


def parabola_peak(xs: list[float], ys: list[float]) -> float:
    """x of the best grid point (e.g. log10 of a loss weight), refined by the vertex of the parabola
    through it and its two neighbours when it has both and the parabola opens downwards."""
    i = max(range(len(ys)), key=ys.__getitem__)
    if 0 < i < len(xs) - 1:
        (x0, x1, x2), (y0, y1, y2) = xs[i - 1 : i + 2], ys[i - 1 : i + 2]
        denom = (x0 - x1) * (x0 - x2) * (x1 - x2)
        a = (x2 * (y1 - y0) + x1 * (y0 - y2) + x0 * (y2 - y1)) / denom
        b = (x2 * x2 * (y0 - y1) + x1 * x1 * (y2 - y0) + x0 * x0 * (y1 - y2)) / denom
        if a < 0:
            return min(max(-b / (2 * a), x0), x2)
    return xs[i]


def half_rise(xs: list[float], ys: list[float]) -> float:
    """x where y first reaches half its maximum, interpolated linearly between the grid points around
    it (the grid's first point when it is already there). For a gain over log10 alpha: where a loss
    term starts to matter, better determined than the peak of a flat top."""
    half = max(ys) / 2
    i = next(k for k, y in enumerate(ys) if y >= half)
    if i == 0:
        return xs[0]
    return xs[i - 1] + (half - ys[i - 1]) / (ys[i] - ys[i - 1]) * (xs[i] - xs[i - 1])


def compare_methods(rows: list[dict[str, Any]], metrics: tuple[str, ...] = ("AP", "AP50")) -> dict[str, Any]:
    """{methods: {name: {metric: {mean, sd, n, values}}}, versus_alone: {name: diff}, best_baseline,
    versus_best_baseline: {name: diff}} on the first metric for the comparisons."""
    by_method: dict[str, dict[str, dict[Any, float]]] = {}
    for row in rows:
        name = method_of(row)
        if name is None or not row.get("completed_full_budget"):
            continue
        for m in metrics:
            value = _best(row, m)
            if value is not None:
                by_method.setdefault(name, {}).setdefault(m, {})[_seed(row)] = value
    summary = {}
    for name, per_metric in by_method.items():
        summary[name] = {}
        for m, values in per_metric.items():
            v = list(values.values())
            summary[name][m] = {
                "mean": statistics.fmean(v),
                "sd": statistics.stdev(v) if len(v) > 1 else 0.0,
                "n": len(v),
                "values": {str(k): x for k, x in values.items()},
            }
    first = metrics[0]
    scores = {name: by_method[name].get(first, {}) for name in by_method}
    versus_alone = {
        name: paired_difference(scores[name], scores[ALONE]) for name in scores if name != ALONE and ALONE in scores
    }
    baselines = [b for b in BASELINES if scores.get(b)]
    best_baseline = max(baselines, key=lambda b: statistics.fmean(scores[b].values())) if baselines else None
    versus_best = (
        {name: paired_difference(scores[name], scores[best_baseline]) for name in scores if name != best_baseline}
        if best_baseline
        else {}
    )
    return {
        "metric": first,
        "methods": summary,
        "versus_alone": versus_alone,
        "best_baseline": best_baseline,
        "versus_best_baseline": versus_best,
    }


def _best(row: dict[str, Any], metric: str) -> float | None:
    value = (row.get("best") or {}).get(metric)
    if value is not None:
        return float(value)
    series = [v for v in (row.get("metrics") or {}).get(metric, []) if v is not None]
    return max(series) if series else None


def format_table(study: dict[str, Any]) -> str:
    """The study as text: one line per method, best first."""
    m = study["metric"]
    methods = sorted(study["methods"], key=lambda n: -study["methods"][n].get(m, {}).get("mean", -1))
    lines = [f"{'method':<22} {m:>14} {'AP50':>14}  {'vs alone (95% CI)':>28}  {'vs best baseline':>28}"]

    def diff(d):
        if d is None:
            return "-"
        if d["low"] is None:
            return f"{d['mean']:+.4f} (n=1)"
        return f"{d['mean']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]"

    for name in methods:
        s = study["methods"][name]
        cells = [f"{s[k]['mean']:.4f}±{s[k]['sd']:.4f}" if k in s else "-" for k in (m, "AP50")]
        lines.append(
            f"{name:<22} {cells[0]:>14} {cells[1]:>14}  {diff(study['versus_alone'].get(name)):>28}  "
            f"{diff(study['versus_best_baseline'].get(name)):>28}"
        )
    if study["best_baseline"]:
        lines.append(f"(best baseline: {study['best_baseline']}; n = seeds paired)")
    return "\n".join(lines)


def method_comparison_plot(study: dict[str, Any], path: Path) -> Path:
    """Left: each method's metric per seed (dots) and mean; right: paired differences to the student
    alone and to the best baseline with their 95% intervals."""
    from sweeps.results import plots

    return plots.method_comparison(study, path)
