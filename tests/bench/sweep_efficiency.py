"""Benchmark: how soon a sweep finds a good student, Optuna TPE + ASHA against random search.

    python tests/bench/sweep_efficiency.py [--workdir demo-run] [--tolerance 0.005]

Runs the demo sweep twice with the same budget (8 trials x 4 epochs, 2 at a time, the same caches
and reused processes): as specified (Optuna TPE, ASHA stopping) and with random search and no early
stopping. For each it takes the best validation AP it finds (any trial, any epoch) and the time from
the sweep's start until an epoch's AP came within --tolerance of it (0.005 = 0.5 AP points); the
ratio of those times is the figure (target: TPE + ASHA at most 0.4 of random). The same is printed
against the better of the two bests, and a PNG of best-AP-so-far over time is written beside the runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from demo_sweeps import run_variant  # noqa: E402

VARIANTS = {
    "efficiency-tpe-asha": {},
    "efficiency-random": {"search": {"algorithm": "random", "seed": 0}, "scheduler": {"type": "none"}},
}


def curve(run: dict) -> list[tuple[float, float]]:
    """(seconds since the sweep started, AP) of every evaluated epoch, in time order."""
    points = [(r["timestamp"] - run["started"], r["AP"]) for rows in run["trials"].values() for r in rows if "AP" in r]
    return sorted(points)


def time_to(points: list[tuple[float, float]], threshold: float) -> float | None:
    return next((t for t, ap in points if ap >= threshold), None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="demo-run", help="demo work directory (teacher reused or trained there)")
    ap.add_argument("--tolerance", type=float, default=0.005, help="AP below the best that still counts as reached (0.005 = 0.5 AP)")
    args = ap.parse_args()
    workdir = Path(args.workdir).resolve()
    runs, curves = {}, {}
    for name, overrides in VARIANTS.items():
        print(f"running the demo sweep: {name} ...", flush=True)
        runs[name] = run_variant(name, workdir, overrides)
        curves[name] = curve(runs[name])
    overall = max(max(ap for _, ap in c) for c in curves.values())
    print(f"\n# demo sweep, same budget; reached = an epoch's AP within {args.tolerance} of the best")
    print(f"{'':<22}{'trials':>7}{'epochs':>7}{'wall s':>9}{'best AP':>9}{'t(own best) s':>15}{'t(overall best) s':>19}")
    reached = {}
    for name, c in curves.items():
        own = max(ap for _, ap in c)
        t_own, t_all = time_to(c, own - args.tolerance), time_to(c, overall - args.tolerance)
        reached[name] = (t_own, t_all)
        fmt = lambda t: f"{t:.0f}" if t is not None else "never"  # noqa: E731
        print(f"{name:<22}{len(runs[name]['trials']):>7}{len(c):>7}{runs[name]['wall_s']:>9.0f}{own:>9.4f}{fmt(t_own):>15}{fmt(t_all):>19}")
    (a_own, a_all), (b_own, b_all) = reached["efficiency-tpe-asha"], reached["efficiency-random"]
    print(f"TPE+ASHA / random, time to its own best: {a_own / b_own:.3f} (target <= 0.4)" if a_own and b_own else "own-best ratio: n/a")
    if a_all is not None and b_all:
        print(f"TPE+ASHA / random, time to the overall best: {a_all / b_all:.3f}")
    else:
        print(f"time to the overall best: {'TPE+ASHA' if a_all is None else 'random'} never reached it")
    print(f"sweep wall time TPE+ASHA / random: {runs['efficiency-tpe-asha']['wall_s'] / runs['efficiency-random']['wall_s']:.3f}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        for name, c in curves.items():
            best, xs, ys = 0.0, [], []
            for t, ap_ in c:
                best = max(best, ap_)
                xs.append(t)
                ys.append(best)
            ax.step(xs, ys, where="post", label=name.removeprefix("efficiency-"))
        ax.set_xlabel("seconds since the sweep started")
        ax.set_ylabel("best validation AP so far")
        ax.legend()
        fig.tight_layout()
        out = workdir / "bench" / "sweep_efficiency.png"
        fig.savefig(out, dpi=120)
        print(f"plot: {out}")
    except ImportError:
        pass


if __name__ == "__main__":
    main()
