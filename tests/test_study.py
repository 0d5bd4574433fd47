"""The efficacy-study page: per-method statistics over seeds and paired differences with 95% t
intervals, checked against hand-computed values (t quantile from a printed table), and its plot."""

import math

import pytest

from sweeps.results.study import compare_methods, format_table, method_comparison_plot


def _row(method, seed, ap, full=True):
    return {
        "config": {"distill.method": method, "train.seed": seed},
        "completed_full_budget": full,
        "best": {"AP": ap, "AP50": ap + 0.2},
    }


ROWS = [
    *(_row("none", s, ap) for s, ap in ((0, 0.10), (1, 0.12), (2, 0.11))),
    *(_row("vanilla_kd", s, ap) for s, ap in ((0, 0.12), (1, 0.15), (2, 0.15))),
    *(_row("fitnet", s, ap) for s, ap in ((0, 0.11), (1, 0.12), (2, 0.10))),
    *(_row("clockdistill", s, ap) for s, ap in ((0, 0.13), (1, 0.16), (2, 0.17))),
    _row("clockdistill", 3, 0.50),  # no partner seed in the others: left out of every pair
    _row("detrdistill", 0, 0.90, full=False),  # stopped early: not counted at all
]


def test_paired_differences_and_their_95_percent_intervals():
    study = compare_methods(ROWS)
    assert set(study["methods"]) == {"none", "vanilla_kd", "fitnet", "clockdistill"}
    clock = study["methods"]["clockdistill"]["AP"]
    assert clock["n"] == 4 and clock["mean"] == pytest.approx((0.13 + 0.16 + 0.17 + 0.50) / 4)
    d = study["versus_alone"]["clockdistill"]  # seeds 0-2: 0.03, 0.04, 0.06
    t975_2 = 4.303  # Student's t, 2 degrees of freedom, two-sided 95% (printed tables)
    half = t975_2 * 0.015275252 / math.sqrt(3)  # sd of (0.03, 0.04, 0.06)
    assert d["n"] == 3 and d["mean"] == pytest.approx(0.043333, abs=1e-6)
    assert d["low"] == pytest.approx(0.043333 - half, abs=2e-4) and d["high"] == pytest.approx(
        0.043333 + half, abs=2e-4
    )
    assert study["best_baseline"] == "vanilla_kd"  # 0.140 against fitnet's 0.110
    vb = study["versus_best_baseline"]["clockdistill"]  # 0.01, 0.01, 0.02
    assert vb["mean"] == pytest.approx(0.013333, abs=1e-6) and vb["low"] < vb["mean"] < vb["high"]
    assert "vanilla_kd" not in study["versus_best_baseline"]
    assert study["methods"]["none"]["AP50"]["mean"] == pytest.approx(0.31)
    table = format_table(study)
    assert table.splitlines()[1].startswith("clockdistill") and "best baseline: vanilla_kd" in table


def test_a_single_seed_gives_a_difference_without_an_interval(tmp_path):
    study = compare_methods([_row("none", 0, 0.1), _row("clockdistill", 0, 0.2)])
    d = study["versus_alone"]["clockdistill"]
    assert d["n"] == 1 and d["low"] is None and d["mean"] == pytest.approx(0.1)
    assert study["best_baseline"] is None and "n=1" in format_table(study)
    path = method_comparison_plot(compare_methods(ROWS), tmp_path / "methods.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_optimum_estimators_on_known_curves():
    from sweeps.results.study import half_rise, parabola_peak

    xs = [-1.0, 0.0, 1.0, 2.0, 3.0]
    # y = 5 - (x - 0.8)^2 sampled on the grid: the vertex is found exactly, not the best grid point (1.0)
    assert parabola_peak(xs, [5 - (x - 0.8) ** 2 for x in xs]) == pytest.approx(0.8)
    # best point at an end of the grid, or a parabola opening upwards: the grid point itself
    assert parabola_peak(xs, [1, 2, 3, 4, 5]) == 3.0
    assert parabola_peak([0.0, 1.0, 2.0], [1.0, 1.5, 3.0]) == 2.0
    # the half of the maximum (4) is crossed between x=-1 (y=1) and x=0 (y=7): at x = -0.5
    assert half_rise(xs, [1, 7, 8, 6, 2]) == pytest.approx(-0.5)
    assert half_rise(xs, [5, 7, 8, 6, 2]) == -1.0  # already above half at the first point
