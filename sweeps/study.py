"""The fair efficacy study (`clockdistill study SPEC`, `make study`): every method tuned with the same
budget, the best setting of each confirmed on new seeds, and test AP compared with paired intervals.

A method tuned against baselines at their defaults wins by construction, and the best of N noisy
trials scored on the images it was chosen on is optimistic (the winner's curse). So a study spec is
a sweep spec (teacher, data, student, epochs, config, search, scheduler, num_samples, resources,
storage, mlflow) without a search_space, plus

    methods:           # each method and its own knobs; the student alone searches its learning rates
      none:         {train.lr: {loguniform: [1.0e-4, 1.6e-3]}}
      vanilla_kd:   {distill.logit.temperature: {choice: [1, 2, 4, 10]}, ...}
      clockdistill: {distill.memory.alpha: {loguniform: [1.0e-5, 1.0]}, ...}
    confirm_seeds: 5

and runs three stages, each resumable (launching the study again reruns nothing that finished):

1. tuning: one sweep per method, `<study>-<method>`, with the spec's search algorithm, scheduler,
   trial count and epochs for every method (config distill.method set to the method);
2. confirmation: the best full-budget trial of each method's sweep (by the validation objective)
   retrained on `confirm_seeds` new seeds, all methods in one grid `<study>-confirm<S>` (every run the
   full budget, no scheduler; MLflow: role confirmation, tag confirms <study>);
3. test: every confirmation run, and each method's chosen tuning trial and one other tuning trial
   drawn at random, on the test split (which no trial reads). Per method the mean test AP over seeds
   with a 95% t interval, the paired difference to the student alone and to the best baseline (the
   competitor with the highest mean test AP: the strongest one to beat), and the winner's curse (the
   chosen trial's validation AP minus its test AP, the same for the random trial).

The page goes to --out (study.json, study.txt, method_comparison.png) and to the confirmation's run.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Any

from clockdistill.config.dotted import parse_yaml, set_dotted
from clockdistill.config.methods import METHODS
from clockdistill.errors import UserError
from sweeps.results.confirm import Confirmation, read_confirmation, seed_grid_spec, setting_name
from sweeps.tracking import schema as S
from sweeps.tracking.reader import Sweep, Trial, find_sweep, open_client, rank, sweep_trials
from sweeps.tune.spec import SpecError, SweepSpec, parse_spec, resolve_paths

log = logging.getLogger(__name__)

STUDY_KEYS = ("methods", "confirm_seeds")
SEED_KEY = "train.seed"


def load_study(path: str | Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]], int]:
    """(the base sweep spec, {method: its search space}, confirm_seeds), checked: a bad key or method
    is refused in one line naming it."""
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"{p}: study spec not found")
    try:
        data = parse_yaml(p.read_text())
    except Exception as exc:  # noqa: BLE001 - yaml errors carry their own position
        raise SpecError(f"{p}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise SpecError(f"{p}: expected a mapping of spec keys (name, teacher, epochs, methods, confirm_seeds, ...)")
    base = {k: v for k, v in data.items() if k not in STUDY_KEYS}
    if base.get("search_space"):
        raise SpecError(f"{p}: search_space: a study searches each method's own knobs; give them under methods.<name>")
    methods = data.get("methods")
    if not isinstance(methods, dict) or not methods:
        raise SpecError(f"{p}: methods: expected a mapping of method -> its search space, e.g. none: {{train.lr: ...}}")
    for name, space in methods.items():
        if name not in METHODS:
            raise SpecError(f"{p}: methods.{name}: not a method (expected one of {', '.join(METHODS)})")
        if not isinstance(space, dict) or not space:
            raise SpecError(f"{p}: methods.{name}: expected its search space, a mapping of config key -> dimension")
    if "none" not in methods:
        raise SpecError(f"{p}: methods: the study needs none (the student alone, its learning rates searched)")
    seeds = data.get("confirm_seeds", 5)
    if not isinstance(seeds, int) or isinstance(seeds, bool) or seeds < 2:
        raise SpecError(
            f"{p}: confirm_seeds: expected an integer >= 2 (an interval over seeds needs two), got {seeds!r}"
        )
    return base, methods, seeds


def method_keys(method: str) -> dict[str, Any]:
    """The config keys that make a run one of `method`'s (the student alone reads no teacher output)."""
    return {"distill.method": method, **({} if METHODS[method].uses_teacher else {"distill.teacher_cache": "off"})}


def method_spec(base: dict[str, Any], method: str, space: dict[str, Any], source: str) -> SweepSpec:
    """The tuning sweep of one method: the study's budget with the method's own search space."""
    spec = json.loads(json.dumps(base))
    config = spec.get("config") or {}
    for key, value in method_keys(method).items():
        config = set_dotted(config, key, value)
    spec.update(name=f"{base['name']}-{method}", config=config, search_space=space, baseline_trial=False)
    return parse_spec(spec, f"{source} (methods.{method})")


def chosen_setting(sweep: Sweep, trials: list[Trial]) -> tuple[Trial, dict[str, Any]]:
    """The method sweep's best full-budget trial (validation objective) and its searched values."""
    metric, mode = sweep.objectives[0]
    ranked = rank([t for t in trials if t.finished], metric, mode)
    if not ranked:
        raise UserError(f"sweep {sweep.name}: no trial finished its full budget; launch the study again (it resumes)")
    best = ranked[0]
    return best, {k: best.params[k] for k in sweep.searched_keys if "." in k and k in best.params}


def confirmation_spec(base: dict[str, Any], settings: dict[str, dict[str, Any]], seeds: int, source: str) -> SweepSpec:
    """Every method's chosen setting on `seeds` new seeds, one grid, the full budget for each run."""
    first = int((base.get("config") or {}).get("train", {}).get("seed", 0))
    name = f"{base['name']}-confirm{seeds}"
    spec = seed_grid_spec(base, name, base["name"], settings, first, seeds, f"{source} (confirmation)")
    return resolve_paths(spec, source)


def run_study(path: str | Path, out: str | Path | None = None, device: str = "auto", verbose: bool = False):
    """The three stages (resuming what is done) and the study page; returns the page's figures."""
    from clockdistill.engine import select_device
    from sweeps.tune.driver import run_spec

    source = str(path)
    base, methods, seeds = load_study(path)
    # every error before Ray starts
    specs = {m: resolve_paths(method_spec(base, m, space, source), source) for m, space in methods.items()}
    first = next(iter(specs.values()))
    print(
        f"study {base['name']}: {len(methods)} methods ({', '.join(methods)}), each tuned by {first.search.algorithm} "
        f"over its own knobs: {first.num_samples} trials x {first.epochs} epochs, scheduler {first.scheduler.type}; "
        f"then each best setting on {seeds} new seeds ({len(methods) * seeds} runs) and on the test split"
    )
    for i, (method, spec) in enumerate(specs.items(), 1):
        print(f"[{i}/{len(specs) + 1}] tuning {method}: sweep {spec.name}")
        run_spec(spec, verbose)
    client = open_client(first.mlflow.tracking_uri or None)
    tuned: dict[str, tuple[Sweep, list[Trial], Trial, dict[str, Any]]] = {}
    settings = {}
    for method, spec in specs.items():
        sweep = find_sweep(client, spec.name)
        trials = sweep_trials(client, sweep)
        best, searched = chosen_setting(sweep, trials)
        tuned[method] = (sweep, trials, best, searched)
        settings[method] = {**searched, **method_keys(method)}
    stage = confirmation_spec(base, settings, seeds, source)
    print(f"[{len(specs) + 1}/{len(specs) + 1}] confirming: {stage.name} ({len(settings)} settings x {seeds} seeds)")
    run_spec(stage, verbose)
    confirmation = read_confirmation(client, stage, alone="none")
    page = study_page(client, confirmation, tuned, select_device(device))
    target = Path(out or Path("artifacts") / "study" / base["name"])
    write_page(client, confirmation, page, target)
    return page


def study_page(client, confirmation: Confirmation, tuned: dict, device) -> dict[str, Any]:
    """Test figures of every confirmation run and the winner's curse of each method's tuning."""
    from sweeps.results.confirm import measure_test, trial_test_metrics
    from sweeps.results.held_out import test_annotations
    from sweeps.results.study import compare_methods

    metric = confirmation.metric
    if not measure_test(client, confirmation, device):
        raise UserError(
            f"{confirmation.sweep.spec.get('data')}: the data set has no test split "
            "(annotations/instances_test.json); the study reports on held-out images only"
        )
    rows = [
        {
            "config": {S.VARIANT_KEY: name, SEED_KEY: seed},
            "completed_full_budget": True,
            "best": {k: m[k] for k in ("AP", "AP50")},
        }
        for name, setting in confirmation.settings.items()
        for seed, m in setting.test_metrics.items()
    ]
    page = compare_methods(rows)
    annotations = test_annotations(confirmation.sweep.spec["data"])
    ground_truth = json.loads(annotations.read_text())
    curse, chosen = {}, {}
    for method, (sweep, trials, best, searched) in tuned.items():
        others = [t for t in trials if t.finished and t.run_id != best.run_id]
        other = random.Random(0).choice(others) if others else None
        curse[method] = {}
        for role, trial in (("chosen", best), ("random", other)):
            if trial is None:
                continue
            test = trial_test_metrics(client, trial, annotations, ground_truth, device)["AP"]
            val = trial.best(metric)
            curse[method][role] = {"trial": setting_name(trial), "val": val, "test": test, "gap": val - test}
        setting = confirmation.settings[method]
        chosen[method] = {
            "sweep": sweep.name,
            "trial": setting_name(best),
            "setting": searched,
            "val_mean": setting.mean_val,
            "val": setting.val,
        }
    page.update(
        label="test AP",  # what the plot's per-seed values are (compare_methods' rows carry test figures)
        study=confirmation.sweep.spec.get("confirms"),
        stage=confirmation.sweep.name,
        seeds=confirmation.seeds,
        selection_metric=metric,
        chosen=chosen,
        winners_curse=curse,
        test_data=str(annotations),
        test_images=len(ground_truth.get("images", [])),
    )
    return page


def page_text(page: dict[str, Any]) -> str:
    """The study as text: one line per method, best mean test AP first."""
    methods = page["methods"]
    order = sorted(methods, key=lambda n: -methods[n]["AP"]["mean"])

    def diff(d: dict[str, Any] | None) -> str:
        if not d:
            return "-"
        if d["low"] is None:
            return f"{100 * d['mean']:+.2f} (one seed)"
        return f"{100 * d['mean']:+.2f} [{100 * d['low']:+.2f}, {100 * d['high']:+.2f}]"

    lines = [
        f"{'method':<14} {'val ' + page['selection_metric'] + ' mean':>12} {'test AP mean +- sd':>20} "
        f"{'test AP50':>9}  {'vs alone, AP [95%]':>22}  {'vs best baseline':>22}"
    ]
    for name in order:
        ap, ap50 = methods[name]["AP"], methods[name].get("AP50", {})
        val = page["chosen"].get(name, {}).get("val_mean")
        lines.append(
            f"{name:<14} {val if val is not None else float('nan'):>12.4f} "
            f"{ap['mean']:>11.4f} +- {ap['sd']:.4f} {ap50.get('mean', float('nan')):>9.4f}  "
            f"{diff(page['versus_alone'].get(name)):>22}  {diff(page['versus_best_baseline'].get(name)):>22}"
        )
    lines.append(
        f"test split: {page['test_images']} images; {len(page['seeds'])} seeds per method (paired by seed); "
        f"best baseline: {page['best_baseline'] or '-'}"
    )
    for name in order:
        c = page["winners_curse"].get(name, {})
        parts = [
            f"{role} {v['trial']} val {v['val']:.4f} test {v['test']:.4f} ({v['gap']:+.4f})" for role, v in c.items()
        ]
        if parts:
            lines.append(f"winner's curse {name}: " + "; ".join(parts))
    return "\n".join(lines)


def write_page(client, confirmation: Confirmation, page: dict[str, Any], out: Path) -> None:
    from sweeps.results.study import method_comparison_plot
    from sweeps.tune.console import short_path

    out.mkdir(parents=True, exist_ok=True)
    text = page_text(page)
    (out / "study.txt").write_text(text + "\n")
    (out / "study.json").write_text(json.dumps(page, indent=1, default=str))
    plot = method_comparison_plot(page, out / "method_comparison.png")
    print()
    print(text)
    print(f"study page: {short_path(out)}")
    run_id = confirmation.sweep.run_id
    try:
        for f in (out / "study.txt", out / "study.json", plot):
            client.log_artifact(run_id, str(f), "study")
    except Exception as exc:  # noqa: BLE001 - the files are written; MLflow is a copy
        log.warning("mlflow: could not log the study page to run %s: %s", run_id, exc)
