"""Benchmark: fractional-GPU packing of small students, and GPU utilisation during a sweep.

    python tests/bench/gpu_packing.py [--workdir demo-run] [--fractions 1 0.5 0.25] [--trials 4] [--epochs 3]

Runs the demo sweep once per GPU fraction with the same work each time (--trials trials of
--epochs epochs, random search with a fixed seed so every run trains the same settings, no early
stopping): `resources: {gpu: F}` puts round(1/F) trials on each GPU at once. While each sweep runs,
`nvidia-smi` samples GPU utilisation and memory every 0.5 s. Printed per fraction: trials at once,
sweep wall time, the training window (first epoch start to last report), trial-epochs and training
images per second over that window, mean and median GPU utilisation over the window, peak memory
used; and the throughput ratio of each fraction to whole-GPU trials (above 1.0: packing pays).

Needs a CUDA GPU and nvidia-smi (exits with an error otherwise). The demo teacher is reused from
--workdir or trained there first.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from demo_sweeps import ensure_teacher, run_variant  # noqa: E402


class GpuSampler:
    """nvidia-smi in loop mode; every line stamped with this machine's clock as it arrives."""

    def __init__(self, interval_ms: int = 500):
        self.samples: list[tuple[float, float, float]] = []  # (unix s, utilisation %, memory used MiB), a line per GPU
        self.proc = subprocess.Popen(
            [
                "nvidia-smi",
                "--query-gpu=index,utilization.gpu,memory.used",
                "--format=csv,noheader,nounits",
                "-lms",
                str(interval_ms),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                _, util, mem = (float(x) for x in line.split(","))
            except ValueError:
                continue
            self.samples.append((time.time(), util, mem))

    def stop(self) -> list[tuple[float, float, float]]:
        self.proc.terminate()
        self.proc.wait(timeout=10)
        self.thread.join(timeout=5)
        return self.samples


def gpu_count() -> int:
    if not shutil.which("nvidia-smi"):
        raise SystemExit("error: nvidia-smi not found: this benchmark needs a CUDA GPU")
    out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True)
    names = [n for n in out.stdout.splitlines() if n.strip()]
    if out.returncode or not names:
        raise SystemExit(f"error: nvidia-smi lists no GPU: {out.stderr.strip()[:200]}")
    print(f"GPUs: {', '.join(names)}")
    return len(names)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="demo-run", help="demo work directory (teacher reused or trained there)")
    ap.add_argument(
        "--fractions", type=float, nargs="+", default=[1.0, 0.5, 0.25], help="GPU per trial, each in (0, 1]"
    )
    ap.add_argument("--trials", type=int, default=4, help="trials per sweep (the same work at every fraction)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--cpus", type=float, default=2, help="CPUs per trial (data loading)")
    args = ap.parse_args()
    if any(not 0 < f <= 1 for f in args.fractions):
        raise SystemExit(f"error: --fractions: expected numbers in (0, 1], got {args.fractions}")
    gpus = gpu_count()
    workdir = Path(args.workdir).resolve()
    train_images = len(
        json.loads((ensure_teacher(workdir).parents[1] / "data" / "annotations" / "instances_train.json").read_text())[
            "images"
        ]
    )

    rows = []
    for f in args.fractions:
        at_once = max(1, int(1 / f + 1e-9)) * gpus  # trials that fit on the GPUs at once
        name = f"gpu-packing-{f:g}"
        print(f"running the demo sweep with {f:g} GPU per trial ({at_once} at once) ...", flush=True)
        sampler = GpuSampler()
        run = run_variant(
            name,
            workdir,
            {
                "num_samples": args.trials,
                "epochs": args.epochs,
                "max_concurrent_trials": at_once,
                "resources": {"cpu": args.cpus, "gpu": f},
                "search": {"algorithm": "random", "seed": 0},
                "scheduler": {"type": "none"},
            },
        )
        samples = sampler.stop()
        reports = [r for rows_ in run["trials"].values() for r in rows_]
        if len(reports) != args.trials * args.epochs:
            print(f"  warning: {len(reports)} epochs reported, expected {args.trials * args.epochs}")
        start = min(r["timestamp"] - r["time_this_iter_s"] for r in reports if r.get("training_iteration") == 1)
        end = max(r["timestamp"] for r in reports)
        window = [(u, m) for t, u, m in samples if start <= t <= end] or [(u, m) for _, u, m in samples]
        seconds = max(end - start, 1e-9)
        rows.append(
            {
                "fraction": f,
                "at_once": at_once,
                "wall": run["wall_s"],
                "window": seconds,
                "epochs": len(reports),
                "img_s": len(reports) * train_images / seconds,
                "epoch_s": statistics.median(r["train_time_s"] for r in reports if "train_time_s" in r),
                "util_mean": statistics.mean(u for u, _ in window) if window else float("nan"),
                "util_median": statistics.median(u for u, _ in window) if window else float("nan"),
                "mem_peak": max((m for _, m in window), default=float("nan")),
            }
        )

    print(
        f"\n# demo sweep, {args.trials} trials x {args.epochs} epochs ({train_images} training images each), "
        f"{gpus} GPU(s), {args.cpus:g} CPUs per trial; utilisation is per GPU, mean over the training window"
    )
    print(
        f"{'GPU/trial':>9}{'at once':>8}{'wall s':>8}{'train s':>8}{'epochs':>7}{'img/s':>8}{'epoch s':>8}"
        f"{'util %':>7}{'median %':>9}{'peak MiB':>9}{'img/s / 1 GPU':>14}"
    )
    base = next((r["img_s"] for r in rows if r["fraction"] == 1.0), None)
    for r in rows:
        gain = f"{r['img_s'] / base:.2f}" if base else "-"
        print(
            f"{r['fraction']:>9g}{r['at_once']:>8}{r['wall']:>8.0f}{r['window']:>8.0f}{r['epochs']:>7}{r['img_s']:>8.0f}"
            f"{r['epoch_s']:>8.1f}{r['util_mean']:>7.0f}{r['util_median']:>9.0f}{r['mem_peak']:>9.0f}"
            f"{gain:>14}"
        )


if __name__ == "__main__":
    main()
