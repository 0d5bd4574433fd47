"""Benchmark: how soon a sweep finds a good student, Optuna TPE + ASHA against random search.

    python tests/bench/sweep_efficiency.py [--workdir demo-run] [--tolerance 0.005] [--trials N] [--epochs E]
                                           [--seeds 0 1 2]

Runs the demo sweep twice with the same budget (the demo's 8 trials x 4 epochs unless --trials /
--epochs say otherwise; 2 at a time, the same caches and reused processes): as specified (Optuna
TPE, ASHA stopping) and with random search and no early stopping. The figure: the best validation
AP the demo sweep (TPE + ASHA) finds, any trial, any epoch; the time from each sweep's start until
an epoch's AP came within --tolerance of it (0.005 = 0.5 AP points); their ratio (target: TPE +
ASHA at most 0.4 of random). When random search never gets there, the ratio is below TPE + ASHA's
time over random's whole wall time, and that bound is printed. Also printed: each sweep against its
own best, and a PNG of best-AP-so-far over time beside the runs. With several --seeds (the search
seed of both sweeps) each pair runs in turn and the median ratio is printed: at demo size, where
random search happens to land early decides much of one pair's ratio.
"""

from __future__ import annotations

import argparse
import statistics
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


def plot(curves: dict, out: Path) -> None:
    """Best AP so far over time, one line per sweep."""
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
        fig.savefig(out, dpi=120)
        plt.close(fig)
        print(f"plot: {out}")
    except ImportError:
        pass


def compare(workdir: Path, budget: dict, seed: int, tolerance: float) -> tuple[dict, dict, float | None]:
    """Both sweeps with search seed `seed`; prints their table and returns (runs, curves, ratio), the
    ratio None when random search never reached the target (its bound is printed)."""
    runs, curves = {}, {}
    for name, overrides in VARIANTS.items():
        print(f"running the demo sweep: {name}, seed {seed} ...", flush=True)
        search = {**overrides.get("search", {"algorithm": "tpe"}), "seed": seed}
        runs[name] = run_variant(name, workdir, {**budget, **overrides, "search": search})
        curves[name] = curve(runs[name])
    tpe, rnd = "efficiency-tpe-asha", "efficiency-random"
    target = max(ap for _, ap in curves[tpe])
    fmt = lambda t: f"{t:.0f}" if t is not None else "never"  # noqa: E731
    print(
        f"\n# seed {seed}: demo sweep, same budget ({runs[tpe]['spec']['num_samples']} trials x "
        f"{runs[tpe]['spec']['epochs']} epochs, "
        f"2 at a time); reached = an epoch's AP within {tolerance} of the best"
    )
    print(
        f"{'':<22}{'trials':>7}{'epochs':>7}{'wall s':>9}{'best AP':>9}{'t(TPE+ASHA best) s':>20}{'t(own best) s':>15}"
    )
    reached = {}
    for name, c in curves.items():
        own = max(ap for _, ap in c)
        reached[name] = (time_to(c, target - tolerance), time_to(c, own - tolerance))
        print(
            f"{name:<22}{len(runs[name]['trials']):>7}{len(c):>7}{runs[name]['wall_s']:>9.0f}{own:>9.4f}"
            f"{fmt(reached[name][0]):>20}{fmt(reached[name][1]):>15}"
        )
    (a, a_own), (b, b_own) = reached[tpe], reached[rnd]
    ratio = a / b if b else None
    if b:
        print(f"TPE+ASHA / random, time to within {tolerance} of the best TPE+ASHA finds: {ratio:.3f} (target <= 0.4)")
    else:
        print(
            f"random search never came within {tolerance} of the best TPE+ASHA finds ({target:.4f}) in its whole "
            "budget: "
            f"ratio < {a / runs[rnd]['wall_s']:.3f} (TPE+ASHA's time over random's wall; target <= 0.4)"
        )
    print(f"TPE+ASHA / random, each against its own best: {a_own / b_own:.3f}")
    print(f"sweep wall time TPE+ASHA / random: {runs[tpe]['wall_s'] / runs[rnd]['wall_s']:.3f}", flush=True)
    plot(curves, workdir / "bench" / f"sweep_efficiency-seed{seed}.png")
    return runs, curves, ratio


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="demo-run", help="demo work directory (teacher reused or trained there)")
    ap.add_argument(
        "--tolerance", type=float, default=0.005, help="AP below the best that still counts as reached (0.005 = 0.5 AP)"
    )
    ap.add_argument("--trials", type=int, help="trials per sweep (default: the demo spec's num_samples)")
    ap.add_argument("--epochs", type=int, help="epochs per trial (default: the demo spec's)")
    ap.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0],
        help="search seeds; each runs both sweeps (random search's luck decides a lot at this size)",
    )
    args = ap.parse_args()
    workdir = Path(args.workdir).resolve()
    budget = {
        **({"num_samples": args.trials} if args.trials else {}),
        **({"epochs": args.epochs} if args.epochs else {}),
    }
    ratios = []
    for seed in args.seeds:
        ratios.append(compare(workdir, budget, seed, args.tolerance)[2])
    if len(args.seeds) > 1:
        shown = ", ".join(f"{r:.3f}" if r is not None else "random never reached" for r in ratios)
        print(f"\nratios by seed {args.seeds}: {shown}")
        if None not in ratios:
            print(f"median ratio {statistics.median(ratios):.3f} (target <= 0.4)")


if __name__ == "__main__":
    main()
