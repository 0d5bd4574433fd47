"""The confirmation stage of `best-student --confirm K --seeds S`: the sweep's top K settings and its
student alone retrained with S new seeds, so the winner is chosen on a mean over seeds instead of one
lucky run.

One seed of one setting is a noisy measurement; the best of N of them is optimistic (the winner's
curse). The stage runs as a second Tune run of the same storage, named `<sweep>-confirm<K>x<S>`: its spec is
the sweep's own (same teacher, data, budget, resources, MLflow experiment) with

    variants:     {t07: <t07's searched values>, t03: ..., alone: {distill.method: none, ...}}
    search_space: {variant: {grid: [t07, t03, alone]}, train.seed: {grid: [new seeds]}}
    search: grid, scheduler: none (every run gets the full budget), confirms: <sweep>

so it resumes like any sweep (launching it again reruns nothing that finished), and in MLflow its
parent run is nested under the sweep's (role `confirmation`, tag `confirms`), each run a child of it.
Settings are ranked by their mean validation objective over the new seeds; the champion is the best
seed run of the best setting (selected on validation only). The test split is read afterwards, for
every run: test AP per setting as a mean with a 95% t interval over seeds, and the paired difference
to the student alone (runs of the same seed are pairs).
"""

from __future__ import annotations

import json
import logging
import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clockdistill.errors import UserError
from sweeps.tracking import schema as S
from sweeps.tracking.reader import Sweep, Trial, find_sweep, rank, sweep_trials
from sweeps.tune.spec import SweepSpec, parse_spec

log = logging.getLogger(__name__)

ALONE_SETTING = "alone"
SEED_KEY = "train.seed"


def confirmation_name(sweep: str, top: int, seeds: int) -> str:
    """`demo-confirm2x3`: one stage per K and S, so asking for another never resumes a different one."""
    return f"{sweep}-confirm{top}x{seeds}"


def setting_name(trial: Trial) -> str:
    """`t07` from the trial's name `t07 (8870a1b2)`, else its id."""
    return trial.name.split(" ")[0]


def _setting(trial: Trial, keys: list[str]) -> dict[str, Any]:
    return {k: trial.params[k] for k in keys if k in trial.params}


def confirmation_spec(sweep: Sweep, trials: list[Trial], top: int, seeds: int) -> tuple[SweepSpec, dict[str, Trial]]:
    """The stage's spec, and which trial each distilled setting comes from."""
    metric, mode = sweep.objectives[0]
    candidates = rank([t for t in trials if t.finished and not t.baseline], metric, mode)[:top]
    if not candidates:
        raise UserError(f"sweep {sweep.name}: no trial finished its full budget; nothing to confirm")
    base = dict(sweep.spec)
    variant_keys = sorted({k for bundle in (base.get("variants") or {}).values() for k in bundle})
    keys = [k for k in sweep.searched_keys if "." in k and k != SEED_KEY] + variant_keys
    settings = {setting_name(t): _setting(t, keys) for t in candidates}
    alone = next((t for t in trials if t.baseline and t.finished), None)
    # the student alone at the baseline trial's training settings, else at the best setting's (its
    # distillation keys do nothing without distillation)
    source = _setting(alone, keys) if alone is not None else dict(settings[setting_name(candidates[0])])
    settings[ALONE_SETTING] = {**source, "distill.method": S.BASELINE_METHOD, "distill.teacher_cache": "off"}
    first = int(candidates[0].params.get(SEED_KEY, 0))
    name = confirmation_name(sweep.name, top, seeds)
    spec = seed_grid_spec(base, name, sweep.name, settings, first, seeds, f"confirmation of {sweep.name}")
    return spec, {setting_name(t): t for t in candidates}


def seed_grid_spec(
    base: dict[str, Any], name: str, confirms: str, settings: dict[str, dict], first: int, seeds: int, source: str
) -> SweepSpec:
    """A confirmation stage's spec: `base` (a sweep spec as a dict) with `settings` as variants, seeds
    first + 1 ... first + seeds as a grid over them, no scheduler (every run the full budget)."""
    spec = json.loads(json.dumps(base, default=str))
    spec.update(
        name=name,
        confirms=confirms,
        variants=settings,
        search_space={
            S.VARIANT_KEY: {"grid": list(settings)},
            SEED_KEY: {"grid": [first + 1 + i for i in range(seeds)]},
        },
        search={"algorithm": "grid", "seed": 0},
        scheduler={"type": "none"},
        num_samples=1,
        baseline_trial=False,
    )
    return parse_spec(json.loads(json.dumps(spec, default=str)), source)


@dataclass
class Setting:
    name: str
    runs: dict[int, Trial] = field(default_factory=dict)  # seed -> its confirmation run
    val: dict[int, float] = field(default_factory=dict)  # seed -> best validation objective
    test_metrics: dict[int, dict[str, float]] = field(default_factory=dict)  # seed -> test figures (measure_test)

    @property
    def test(self) -> dict[int, float]:
        """seed -> test AP."""
        return {seed: m["AP"] for seed, m in self.test_metrics.items()}

    @property
    def mean_val(self) -> float:
        return statistics.fmean(self.val.values()) if self.val else float("nan")


@dataclass
class Confirmation:
    sweep: Sweep  # the stage's own parent run
    trials: list[Trial]
    settings: dict[str, Setting]
    metric: str
    mode: str
    seeds: list[int]
    alone: str = ALONE_SETTING  # the setting that is the student alone

    @property
    def ranked(self) -> list[Setting]:
        """Distilled settings with every seed finished, best mean validation objective first."""
        full = [s for n, s in self.settings.items() if n != self.alone and len(s.val) == len(self.seeds)]
        return sorted(full, key=lambda s: s.mean_val, reverse=self.mode == "max")

    @property
    def champion(self) -> Trial:
        """The best seed run (validation) of the best setting."""
        if not self.ranked:
            raise UserError(
                f"{self.sweep.name}: no setting finished all {len(self.seeds)} seeds; launch the confirmation again "
                "(it resumes) or check its failed trials"
            )
        best = self.ranked[0]
        seed = (max if self.mode == "max" else min)(best.val, key=best.val.__getitem__)
        return best.runs[seed]

    def alone_for(self, trial: Trial) -> Trial | None:
        """The student-alone run of the champion's seed: the pair of the held-out comparison."""
        alone = self.settings.get(self.alone)
        return alone.runs.get(int(trial.params.get(SEED_KEY, -1))) if alone else None


def read_confirmation(client, spec: SweepSpec, alone: str = ALONE_SETTING) -> Confirmation:
    stage = find_sweep(client, spec.name, role=S.ROLE_CONFIRMATION)
    trials = sweep_trials(client, stage)
    metric, mode = stage.objectives[0]
    seeds = list(spec.search_space[SEED_KEY].value)
    settings = {name: Setting(name) for name in spec.variants}
    for t in trials:
        name, seed = t.params.get(S.VARIANT_KEY), t.params.get(SEED_KEY)
        if name in settings and t.finished and t.best(metric) is not None:
            settings[name].runs[int(seed)] = t
            settings[name].val[int(seed)] = t.best(metric)
    return Confirmation(stage, trials, settings, metric, mode, seeds, alone)


def run_confirmation(client, sweep: Sweep, trials: list[Trial], top: int, seeds: int, verbose: bool = False):
    """Run (or resume) the stage and read it back."""
    from sweeps.tune.driver import run_spec

    if top < 1 or seeds < 1:
        raise UserError(f"--confirm {top} --seeds {seeds}: both must be at least 1")
    spec, _ = confirmation_spec(sweep, trials, top, seeds)
    print(
        f"confirming sweep {sweep.name}: {len(spec.variants) - 1} setting(s) and the student alone x {seeds} new "
        f"seed(s) = {len(spec.variants) * seeds} runs of {spec.epochs} epochs ({spec.name}; resumes when relaunched)"
    )
    run_spec(spec, verbose)
    return read_confirmation(client, spec)


def measure_test(client, confirmation: Confirmation, device) -> bool:
    """Test AP of every confirmation run (False, measuring nothing, when the data set has no test split)."""
    from sweeps.results.held_out import test_annotations

    annotations = test_annotations(confirmation.sweep.spec.get("data", ""))
    if not annotations.is_file():
        return False
    ground_truth = json.loads(annotations.read_text())
    runs = [(s, seed, t) for s in confirmation.settings.values() for seed, t in s.runs.items()]
    for setting, seed, trial in runs:
        setting.test_metrics[seed] = trial_test_metrics(client, trial, annotations, ground_truth, device)
    return True


def trial_test_metrics(client, trial: Trial, annotations: Path, ground_truth: dict, device) -> dict[str, float]:
    """COCO metrics of a trial's best checkpoint on the test split whose annotations file is given."""
    from clockdistill.evaluation.coco import coco_evaluate
    from sweeps.results.best_student import fetch_checkpoint
    from sweeps.results.held_out import test_predictions

    with tempfile.TemporaryDirectory() as tmp:
        path, _ = fetch_checkpoint(client, trial, Path(tmp) / "run")
        results, ids = test_predictions(path, annotations.parent.parent, device)
    return coco_evaluate(ground_truth, results, ids)


def seed_table(confirmation: Confirmation) -> tuple[str, dict[str, Any]]:
    """The table of settings (val mean, test mean [interval], gain over alone [interval]) and its figures."""
    from sweeps.results.study import paired_difference

    alone = confirmation.settings.get(confirmation.alone)
    rows, figures = [], {}
    level = "95%"
    header = (
        f"{'setting':<10} {'seeds':>5} {'val ' + confirmation.metric + ' mean':>14}   "
        f"{'test AP mean [' + level + ']':<28} gain over alone [{level}]"
    )
    order = [*confirmation.ranked, *([alone] if alone else [])]
    for s in order:
        test = paired_difference(s.test, {k: 0.0 for k in s.test}) if s.test else None
        gain = paired_difference(s.test, alone.test) if alone and s is not alone and s.test and alone.test else None
        figures[s.name] = {"val_mean": s.mean_val, "val": s.val, "test": s.test, "test_interval": test, "gain": gain}
        test_text = _interval(test) if test else "-"
        gain_text = _interval(gain, signed=True) if gain else ("-" if s is not alone else "")
        rows.append(f"{s.name:<10} {len(s.val):>5} {s.mean_val:>14.4f}   {test_text:<28} {gain_text}")
    lines = [header, *rows]
    if confirmation.ranked:
        lines.append(
            f"champion: setting {confirmation.ranked[0].name} (best mean validation {confirmation.metric} over "
            f"{len(confirmation.seeds)} seeds), run {confirmation.champion.name}"
        )
    return "\n".join(lines), figures


def _interval(d: dict[str, Any], signed: bool = False) -> str:
    scale, fmt = (100.0, "+.2f") if signed else (1.0, ".4f")
    head = f"{scale * d['mean']:{fmt}}"
    if d["low"] is None:
        return head + " (one seed)"
    return f"{head} [{scale * d['low']:{fmt}}, {scale * d['high']:{fmt}}]" + (" AP" if signed else "")
