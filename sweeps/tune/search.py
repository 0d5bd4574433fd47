"""Spec -> Ray Tune: the search space, the paper defaults as the first point, the searcher, the scheduler.

Trials report, for every objective metric m, its value this epoch (`m`) and the best value so far
(`best_m`). Searchers and schedulers rank by `best_m`: "best" is the best evaluated checkpoint over a
trial's life, not its last epoch.
"""

from __future__ import annotations

import logging
from typing import Any

import optuna
from optuna.trial import TrialState
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining, TrialScheduler
from ray.tune.search import BasicVariantGenerator
from ray.tune.search.optuna import OptunaSearch

from clockdistill.config.layers import resolve_config
from clockdistill.config.sections import Config
from clockdistill.metrics import EPOCH
from sweeps.tracking.schema import BASELINE_KEY, BASELINE_METHOD, FAILED_KEY, best_key
from sweeps.tune.spec import SweepSpec, spec_config

log = logging.getLogger(__name__)


def tune_param_space(spec: SweepSpec) -> dict[str, Any]:
    """Flat dict of dotted config keys -> Tune domains (or constants)."""
    space: dict[str, Any] = {}
    for key, dim in spec.search_space.items():
        kind, value = dim.kind, dim.value
        if kind == "uniform":
            space[key] = tune.uniform(*value)
        elif kind == "loguniform":
            space[key] = tune.loguniform(*value)
        elif kind == "int":
            space[key] = tune.randint(value[0], value[1] + 1)  # randint excludes the upper bound
        elif kind == "choice":
            space[key] = tune.choice(list(value))
        elif kind == "grid":
            space[key] = tune.grid_search(list(value))
        else:
            space[key] = dim.fixed
    return space


def paper_defaults_point(spec: SweepSpec) -> dict[str, Any] | None:
    """The first point to evaluate: the config defaults (the paper's values, or the spec's own
    `config` where it sets them) of every searched key. A warm-start point must name every key, so
    a default outside the space is brought in: a range clamps it, a choice takes the nearest numeric
    choice (else the first). None when no key is searched by Optuna."""
    defaults = Config().flatten()
    try:
        defaults.update(resolve_config(spec_config(spec)).flatten())
    except Exception:  # noqa: BLE001 - the spec's config is validated elsewhere; fall back to the paper's
        pass
    point: dict[str, Any] = {}
    for key, dim in spec.search_space.items():
        default, kind = defaults.get(key), dim.kind
        if kind in ("uniform", "loguniform", "int"):
            low, high = dim.value
            value = min(max(default, low), high) if isinstance(default, (int, float)) else low
            point[key] = int(round(value)) if kind == "int" else float(value)
        elif kind == "choice":
            choices = dim.value
            if default in choices:
                point[key] = default
            elif isinstance(default, (int, float)) and all(isinstance(c, (int, float)) for c in choices):
                point[key] = min(choices, key=lambda c: abs(c - default))
            else:
                point[key] = choices[0]
    return point or None


def _sampler(spec: SweepSpec):
    algorithm, seed = spec.search.algorithm, spec.search.seed
    startup = max(2, min(10, spec.num_samples // 3))  # TPE/GP: random trials before the model takes over
    if algorithm == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True, n_startup_trials=startup)
    if algorithm == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup)
    if algorithm == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=startup)
    return optuna.samplers.RandomSampler(seed=seed)


class PruningAwareOptunaSearch(OptunaSearch):
    """OptunaSearch that tells Optuna the truth about trials the scheduler stopped early (PRUNED,
    not COMPLETE with a partial value) and about diverged trials (FAIL).

    `full_budget` is the number of epochs a complete trial reports. `baseline`, when given, is the
    config of the sweep's no-distillation trial: the first suggestion, which Optuna never sees (its
    results would teach the model about a point outside the space)."""

    def __init__(self, full_budget: int, baseline: dict[str, Any] | None = None, **kw):
        super().__init__(**kw)
        self.full_budget = full_budget
        self.baseline = baseline
        self.baseline_id: str | None = None  # saved with the searcher: a resumed sweep adds no second one

    def suggest(self, trial_id: str):
        if self.baseline is not None and self.baseline_id in (None, trial_id):
            self.baseline_id = trial_id
            return dict(self.baseline)
        return super().suggest(trial_id)

    def on_trial_result(self, trial_id: str, result: dict):
        if trial_id != self.baseline_id:
            super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        if trial_id == self.baseline_id:
            return
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return super().on_trial_complete(trial_id, result, error)
        state = _state_for_optuna(result, error, self.full_budget)
        if state is None:
            return super().on_trial_complete(trial_id, result, error)
        try:
            self._ot_study.tell(self._ot_trials[trial_id], state=state)
        except Exception as exc:  # noqa: BLE001 - Optuna refuses e.g. a second tell; never crash the sweep
            log.warning("optuna: could not record trial %s as %s: %s", trial_id, state.name, exc)
        self._completed_trials.add(trial_id)


def _state_for_optuna(result: dict | None, error: bool, full_budget: int):
    """FAIL for a diverged trial, PRUNED for one stopped before its budget, else None (as reported)."""
    if result and result.get(FAILED_KEY):
        return TrialState.FAIL
    if not error and result and int(result.get(EPOCH, full_budget)) < full_budget:
        return TrialState.PRUNED
    return None


def build_searcher(spec: SweepSpec):
    """The search algorithm for the spec (None: Tune's own variant generator for grid / PBT)."""
    objectives = spec.objective_list
    if spec.search.algorithm == "grid" or spec.scheduler.type == "pbt":
        # max_concurrent here: Tune ignores TuneConfig.max_concurrent_trials for a variant generator
        return BasicVariantGenerator(random_state=spec.search.seed, max_concurrent=spec.max_concurrent_trials)
    point = paper_defaults_point(spec) if spec.search.paper_defaults_first else None
    metrics = [best_key(o.metric) for o in objectives]
    modes = [o.mode for o in objectives]
    return PruningAwareOptunaSearch(
        full_budget=spec.epochs,
        baseline=baseline_config(spec) if spec.baseline_trial else None,
        metric=metrics if spec.multi_objective else metrics[0],
        mode=modes if spec.multi_objective else modes[0],
        points_to_evaluate=[point] if point else None,
        sampler=_sampler(spec),
        study_name=spec.name,
        seed=None,
    )


def baseline_config(spec: SweepSpec) -> dict[str, Any]:
    """The no-distillation trial's config: distill.method none, the searched keys at their first point
    (they do nothing without distillation, but every trial names every key)."""
    return {BASELINE_KEY: True, "distill.method": BASELINE_METHOD, **(paper_defaults_point(spec) or {})}


def baseline_aware_asha(**kwargs):
    """ASHA that never stops the no-distillation trial and leaves it out of its rungs: the baseline
    runs the full budget, and the other trials are stopped exactly as in a sweep without it."""

    class BaselineAwareASHA(ASHAScheduler):
        def on_trial_result(self, tune_controller, trial, result):
            if trial.config.get(BASELINE_KEY):
                return TrialScheduler.CONTINUE
            return super().on_trial_result(tune_controller, trial, result)

        def on_trial_complete(self, tune_controller, trial, result):
            if trial.config.get(BASELINE_KEY):
                self._trial_info.pop(trial.trial_id, None)
                return
            super().on_trial_complete(tune_controller, trial, result)

    return BaselineAwareASHA(**kwargs)


def build_scheduler(spec: SweepSpec):
    sc, primary = spec.scheduler, spec.primary
    metric = best_key(primary.metric)
    if sc.type == "asha":
        return baseline_aware_asha(
            time_attr="training_iteration",
            metric=metric,
            mode=primary.mode,
            max_t=spec.epochs,
            grace_period=sc.grace_period,
            reduction_factor=sc.reduction_factor,
            # a trial that reaches the budget ends by itself: stopping it at its last report would cut a
            # data-parallel trial's Train run short before it frees its workers
            stop_last_trials=False,
        )
    if sc.type == "pbt":
        mutations = {k: v for k, v in tune_param_space(spec).items() if hasattr(v, "sample")}
        return PopulationBasedTraining(
            time_attr="training_iteration",
            metric=primary.metric,
            mode=primary.mode,
            perturbation_interval=sc.perturbation_interval,
            hyperparam_mutations=mutations,
            quantile_fraction=sc.quantile_fraction,
        )
    return FIFOScheduler()
