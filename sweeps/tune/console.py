"""What a sweep prints: one line per trial event and a progress line (Console), Ray's own output
off unless asked for (quiet_ray), paths relative to the working directory (short_path)."""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any

from sweeps.tracking.schema import best_key
from sweeps.tune.spec import SweepSpec


def short_path(path: str | Path) -> str:
    """A path relative to the current directory when it lies under it (what the console shows)."""
    text = str(path)
    if "://" in text:
        return text
    try:
        return str(Path(text).resolve().relative_to(Path.cwd().resolve())) or "."
    except ValueError:
        return text


def quiet_ray() -> None:
    """Ray's own console output off (its status tables are off through RunConfig(verbose=0)):
    warnings such as the experiment-state snapshot notices, and the multi-line error reports of
    failed trials, which the sweep's console says in one line. `--verbose` keeps them."""
    # Tune's newer console reporter prints its experiment box, result paths and error files whatever
    # the verbosity; the classic one prints nothing at verbose 0
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    for name in ("ray", "ray.tune", "ray.train", "ray.data"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # "A new study created in memory ..."


class Console:
    """The sweep's console: one line per trial event (started with its knobs, an epoch's objective,
    stopped early, failed, finished) and, after each end, where the sweep stands."""

    def __init__(self, spec: SweepSpec):
        self.metric = spec.primary.metric
        self.maximize = spec.primary.mode == "max"
        self.epochs = spec.epochs
        grid = math.prod(len(d.value) for d in spec.search_space.values() if d.kind == "grid")
        self.total = spec.num_samples * grid + int(spec.baseline_trial)
        self.started = time.monotonic()
        self.ended: dict[str, str] = {}  # trial id -> finished | stopped | failed
        self.retries: dict[str, int] = {}  # trial id -> retries so far

    def __getstate__(self):  # kept with the callback in Tune's experiment state: a resumed sweep counts on
        return {**self.__dict__, "started": None}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.started = time.monotonic()

    def say(self, text: str) -> None:
        print(text, flush=True)

    def trial_started(self, label: str) -> None:
        number, _, knobs = label.partition(" ")
        self.say(f"{number} started   {knobs}")

    def epoch(self, label: str, result: dict[str, Any]) -> None:
        value, best = result.get(self.metric), result.get(best_key(self.metric))
        if not isinstance(value, (int, float)):
            return
        shown = f"{self.metric} {value:.4f}" + (f" (best {best:.4f})" if isinstance(best, (int, float)) else "")
        self.say(f"{label.split(' ')[0]} epoch {int(result.get('epoch', 0))}/{self.epochs}  {shown}")

    def retrying(self, trial_id: str, label: str, attempt: int, allowed: int, reason: str) -> None:
        """A trial's process or node died and Tune runs it again from its last checkpoint."""
        self.retries[trial_id] = attempt
        self.say(
            f"{label.split(' ')[0]} retry {attempt} of {allowed} from its last checkpoint (trial {trial_id}): {reason}"
        )

    def trial_ended(self, trial_id: str, label: str, how: str, epochs: int, best: float | None, reason: str) -> None:
        number = label.split(" ")[0]
        self.ended[trial_id] = how
        best_text = f"best {self.metric} {best:.4f}" if best is not None else f"no {self.metric}"
        retried = self.retries.get(trial_id, 0)
        after = f", after {retried} retr{'y' if retried == 1 else 'ies'}" if retried else ""
        if how == "failed":
            self.say(f"{number} failed after {epochs}/{self.epochs} epoch(s){after}: {reason}")
        elif how == "stopped":
            self.say(f"{number} stopped early after {epochs}/{self.epochs} epoch(s), {best_text}{after}")
        else:
            self.say(f"{number} finished  {best_text} after {epochs}/{self.epochs} epochs{after}")

    def progress(self, ended: list[tuple[str, str, float | None, bool]], running: int) -> None:
        """ended: (number, finished | stopped | failed, best value or None, no-KD?) of every trial that
        has ended, those of a sweep before its restore included."""
        counts = {k: sum(how == k for _, how, _, _ in ended) for k in ("finished", "stopped", "failed")}
        scored = [(value, number) for number, _, value, no_kd in ended if value is not None and not no_kd]
        top = (max if self.maximize else min)(scored) if scored else None
        best = f"; best so far {top[1]} {self.metric} {top[0]:.4f}" if top else ""
        self.say(
            f"    [{len(ended)}/{self.total} trials done: {counts['finished']} finished, {counts['stopped']} "
            f"stopped early, {counts['failed']} failed; {running} running{best}; "
            f"{(time.monotonic() - self.started) / 60:.1f} min]"
        )
