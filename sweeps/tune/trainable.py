"""The Tune function trainable: a single-process trial reports to Tune once per epoch with its
checkpoint (the loop itself: trial.py); with `resources.workers` > 1 the trial instead drives a
data-parallel Ray Train run (ddp.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sweeps.tune.spec import spec_from_json
from sweeps.tune.trial import mark_process_free, run_trial, trial_clock_start


def train_trial(config: dict[str, Any], spec_json: str) -> None:
    """Tune function trainable. `config` holds the trial's dotted keys; the spec travels as JSON."""
    started = trial_clock_start()
    try:
        spec = spec_from_json(spec_json)
        if spec.resources.workers > 1:
            from sweeps.tune.ddp import train_trial_ddp

            train_trial_ddp(config, spec, started)
        else:
            _single_process_trial(config, spec, started)
    finally:
        mark_process_free()


def _single_process_trial(config: dict[str, Any], spec, started: float) -> None:
    from ray import tune

    ctx = tune.get_context()

    def send(row: dict, ckpt: Path | None) -> None:
        tune.report(row, checkpoint=tune.Checkpoint.from_directory(str(ckpt)) if ckpt is not None else None)

    run_trial(
        spec,
        config,
        Path(ctx.get_trial_dir()) / "work",
        tune.get_checkpoint(),
        send,
        started,
        trial_name=ctx.get_trial_id(),
    )
