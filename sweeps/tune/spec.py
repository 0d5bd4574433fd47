"""Sweep specs: YAML files validated into typed models before Ray starts.

    name: demo                       # the sweep's id: launching the same name again resumes it
    teacher: demo-run/teacher/best   # teacher checkpoint (required)
    data: demo-run/data              # COCO-format data set (default: the teacher's)
    student: hybrid-tiny-student            # student preset (default: the teacher's counterpart)
    epochs: 4                        # training budget of every trial
    config: {train: {batch_size: 8}} # fixed config values (sections data, model, loss, train, distill)
    search_space:                    # any dotted config key -> one of
      distill.memory.alpha: {loguniform: [1.0e-6, 1.0e-2]}
      distill.logit.cls_weight: {uniform: [0.5, 4]}
      distill.logit.groups: {int: [1, 5]}           # inclusive
      distill.logit.temperature: {choice: [1, 2, 4, 10]}
      distill.method: {grid: [none, clockdistill]}  # every value, each num_samples times (algorithm grid)
      distill.memory.beta: {fixed: 1.0e-7}
    search: {algorithm: tpe, seed: 0}               # tpe | gp | cmaes | random | grid
    scheduler: {type: asha, grace_period: 1, reduction_factor: 2}   # asha | pbt | none
    objective: {metric: AP, mode: max}              # or several: objectives: [{metric: AP, mode: max},
                                                    #                         {metric: params, mode: min}]
    num_samples: 8
    baseline_trial: false                           # true: one more trial, without distillation (method none),
                                                    # the full budget, kept out of the searcher and the scheduler
    variants:                                       # named bundles of config keys, searched as
      tuned: {distill.memory.alpha: 0.085, distill.logit.temperature: 1}   # search_space.variant:
      paper: {distill.memory.alpha: 5.0e-5}                                # {grid: [paper, tuned]}
    max_concurrent_trials: 2
    resources: {cpu: 1, gpu: 0}                     # per trial; fractional GPUs allowed; workers: N for DDP trials
    storage_path: sweeps-storage                    # local dir, NFS path or s3://bucket/prefix
    max_failures: 2                                 # retries of a failed trial, from its last checkpoint
    reuse_actors: true                              # a finished trial's process runs the next trial (no new start-up)
    mlflow: {tracking_uri: sqlite:///mlflow.db, experiment: clockdistill}

(`confirms: <sweep>` marks the spec of a sweep's confirmation stage, which `best-student --confirm`
writes: its settings as variants, its new seeds as a grid; it is not written by hand.)

Every error is one line naming the field, e.g.
`sweeps/configs/x.yaml: search_space.distill.memory.alpha.loguniform: low must be > 0, got 0.0`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from clockdistill.config.dotted import parse_yaml, set_dotted
from clockdistill.config.layers import SECTIONS, resolve_config
from clockdistill.config.sections import Config
from clockdistill.errors import ConfigError, UserError
from clockdistill.metrics import LATENCY
from sweeps.tracking.schema import DEFAULT_OBJECTIVE, OBJECTIVE_METRICS, VARIANT_KEY


class SpecError(UserError):
    """A sweep spec is invalid; the message is one line naming the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Dimension(_Strict):
    """One searched config key: exactly one of the fields below."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    integer: tuple[int, int] | None = Field(None, alias="int")
    choice: list[Any] | None = None
    grid: list[Any] | None = None
    fixed: Any = None

    @model_validator(mode="before")
    @classmethod
    def _one_kind(cls, data: Any) -> Any:
        if not isinstance(data, dict) or len(data) != 1:
            raise ValueError(
                "expected exactly one of uniform: [low, high], loguniform: [low, high], int: [low, high], "
                "choice: [values], grid: [values], fixed: value"
            )
        return data

    @field_validator("uniform", "loguniform", "integer")
    @classmethod
    def _range(cls, value, info):
        if value is None:
            return value
        low, high = value
        if not low < high:
            raise ValueError(f"low must be < high, got [{low}, {high}]")
        if info.field_name == "loguniform" and low <= 0:
            raise ValueError(f"low must be > 0, got {low}")
        return value

    @field_validator("choice", "grid")
    @classmethod
    def _values(cls, value):
        if value is not None and not value:
            raise ValueError("expected a non-empty list of values")
        return value

    @property
    def kind(self) -> str:
        """uniform, loguniform, int, choice, grid or fixed."""
        field = next(iter(self.model_fields_set))
        return "int" if field == "integer" else field

    @property
    def value(self) -> Any:
        return getattr(self, "integer" if self.kind == "int" else self.kind)

    def candidates(self) -> list[Any]:
        """Values to check against the config: the bounds of a range, every listed value."""
        return [self.fixed] if self.kind == "fixed" else list(self.value)


class Search(_Strict):
    algorithm: Literal["tpe", "gp", "cmaes", "random", "grid"] = "tpe"
    seed: int = 0
    paper_defaults_first: bool = True  # evaluate the paper defaults as the first trial (points_to_evaluate)


class Scheduler(_Strict):
    type: Literal["asha", "pbt", "none"] = "asha"
    grace_period: int = Field(1, ge=1)  # asha: epochs every trial runs before it can be stopped
    reduction_factor: float = Field(2.0, gt=1)  # asha: keep 1/reduction_factor at each rung
    perturbation_interval: int = Field(2, ge=1)  # pbt: epochs between exploit/explore steps
    quantile_fraction: float = Field(0.25, gt=0, le=0.5)  # pbt


class Objective(_Strict):
    # A COCO metric of the validation split, or a property of the student (for AP-against-size or
    # AP-against-speed sweeps): its parameter count or its one-image latency on the trial's device.
    metric: Literal[tuple(OBJECTIVE_METRICS)] = DEFAULT_OBJECTIVE[0]  # type: ignore[valid-type] - schema.py owns the list
    mode: Literal["max", "min"] = DEFAULT_OBJECTIVE[1]


class Resources(_Strict):
    cpu: float = Field(1.0, gt=0)  # per trial, or per worker of a data-parallel trial
    gpu: float = Field(0.0, ge=0)
    workers: int = Field(
        1, ge=1
    )  # > 1: each trial is a data-parallel Ray Train run of this many workers (sweeps/tune/ddp.py)

    @model_validator(mode="after")
    def _whole_gpus_where_needed(self) -> "Resources":
        if self.gpu > 1 and self.gpu != int(self.gpu):
            raise ValueError(f"resources.gpu: a share above 1 must be a whole number of GPUs, got {self.gpu:g}")
        if self.workers > 1 and 0 < self.gpu < 1:
            raise ValueError(
                f"resources.gpu: a data-parallel trial (workers: {self.workers}) needs a whole GPU per worker "
                f"(NCCL refuses two ranks on one GPU), got {self.gpu:g}; give gpu: 1, or workers: 1 to share GPUs"
            )
        return self


class MlflowSpec(_Strict):
    tracking_uri: str = ""  # default: sqlite:///<project dir>/mlflow.db (or MLFLOW_TRACKING_URI)
    experiment: str = "clockdistill"
    registered_model: str = ""  # the name `best-student` registers under (default: <experiment>-student)


class SweepSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
    teacher: str
    data: str = ""
    student: str = ""
    epochs: int = Field(ge=1)
    config: dict[str, Any] = Field(default_factory=dict)
    search_space: dict[str, Dimension] = Field(default_factory=dict)
    search: Search = Field(default_factory=Search)
    scheduler: Scheduler = Field(default_factory=Scheduler)
    objective: Objective | None = None
    objectives: list[Objective] | None = None
    num_samples: int = Field(8, ge=1)
    baseline_trial: bool = False  # one extra no-distillation trial on the same budget, the report's no-KD line
    # named bundles of config keys, searched as `variant: {grid: [names]}` (e.g. one method at two settings)
    variants: dict[str, dict[str, Any]] = Field(default_factory=dict)
    max_concurrent_trials: int = Field(2, ge=1)
    resources: Resources = Field(default_factory=Resources)
    storage_path: str = "sweeps-storage"
    max_failures: int = Field(2, ge=0)
    reuse_actors: bool = True
    mlflow: MlflowSpec = Field(default_factory=MlflowSpec)
    confirms: str = ""  # set by best-student --confirm: this spec is that sweep's confirmation stage

    @model_validator(mode="after")
    def _objectives_and_scheduler(self) -> "SweepSpec":
        if self.objective is not None and self.objectives is not None:
            raise ValueError("objectives: give either objective or objectives, not both")
        if self.objectives is not None and len(self.objectives) < 2:
            raise ValueError("objectives: a multi-objective sweep needs at least two objectives (or use objective)")
        if self.resources.workers > 1 and self.scheduler.type == "pbt":
            raise ValueError(
                "scheduler.type: pbt exploits Tune checkpoints, which data-parallel trials (resources.workers > 1) "
                "do not make; use asha or none"
            )
        if self.scheduler.type == "pbt" and self.search.algorithm != "random":
            raise ValueError("scheduler.type: pbt mutates running trials itself; use it with search.algorithm: random")
        if self.scheduler.type == "asha" and self.scheduler.grace_period >= self.epochs and self.epochs > 1:
            raise ValueError(
                f"scheduler.grace_period: must be < epochs ({self.epochs}), got {self.scheduler.grace_period}"
            )
        if self.baseline_trial and (self.search.algorithm == "grid" or self.scheduler.type == "pbt"):
            raise ValueError(
                "baseline_trial: needs a searcher (tpe, gp, cmaes or random, not pbt); in a grid sweep put none "
                "into distill.method's grid instead"
            )
        return self

    @model_validator(mode="after")
    def _search_space_fits_the_algorithm(self) -> "SweepSpec":
        algorithm = self.search.algorithm
        grid_keys = [k for k, d in self.search_space.items() if d.kind == "grid"]
        if grid_keys and algorithm != "grid":
            raise ValueError(f"search_space.{grid_keys[0]}: grid values need search.algorithm: grid (got {algorithm})")
        ranges = [k for k, d in self.search_space.items() if d.kind not in ("grid", "fixed", "choice")]
        if algorithm == "grid" and ranges:
            raise ValueError(
                f"search_space.{ranges[0]}: search.algorithm grid takes grid, choice or fixed values, not ranges"
            )
        if self.multi_objective and algorithm in ("cmaes", "grid"):
            raise ValueError(
                "search.algorithm: cmaes cannot optimise several objectives (use tpe, gp or random)"
                if algorithm == "cmaes"
                else "objectives: a grid sweep takes one objective"
            )
        if self.baseline_trial and "distill.method" in self.search_space:
            raise ValueError("baseline_trial: distill.method is searched already; leave one of them out")
        if not any(d.kind != "fixed" for d in self.search_space.values()):
            raise ValueError("search_space: nothing to search (give at least one key a range, choice or grid)")
        return self

    @property
    def multi_objective(self) -> bool:
        return self.objectives is not None

    @property
    def objective_list(self) -> list[Objective]:
        return list(self.objectives) if self.objectives else [self.objective or Objective()]

    @property
    def needs_latency(self) -> bool:
        """Whether an objective is the student's latency (measured per node before the trials)."""
        return any(o.metric == LATENCY for o in self.objective_list)

    @property
    def primary(self) -> Objective:
        """The objective a scheduler stops on and `best-student` ranks by first."""
        return self.objective_list[0]


def _error_line(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    elif err["type"] == "missing":
        msg = "required"
    elif err["type"] == "literal_error":
        msg = f"{msg}, got {err.get('input')!r}"
    return f"{loc}: {msg}" if loc else msg


def parse_spec(data: Any, source: str = "spec") -> SweepSpec:
    if not isinstance(data, dict):
        raise SpecError(f"{source}: expected a mapping of spec keys (name, teacher, epochs, search_space, ...)")
    try:
        spec = SweepSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(f"{source}: {_error_line(exc)}") from None
    _check_config_keys(spec, source)
    return spec


def load_spec(path: str | Path, name: str | None = None) -> SweepSpec:
    """Read and validate a sweep spec file; `name` replaces the spec's name."""
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"{p}: sweep spec not found")
    try:
        data = parse_yaml(p.read_text())
    except Exception as exc:  # yaml errors carry their own position
        raise SpecError(f"{p}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if isinstance(data, dict) and name:
        data = {**data, "name": name}
    return parse_spec(data, str(p))


def _check_config_keys(spec: SweepSpec, source: str) -> None:
    """Every searched key is a real config key and every candidate value passes its checks."""
    bad_sections = [k for k in spec.config if k not in SECTIONS]
    if bad_sections:
        raise SpecError(f"{source}: config.{bad_sections[0]}: unknown section (expected {', '.join(SECTIONS)})")
    base = spec_config(spec)
    try:
        resolve_config(base)
    except ConfigError as exc:
        raise SpecError(f"{source}: config: {exc}") from None
    known = set(Config().flatten())
    _check_variants(spec, base, known, source)
    for key, dim in spec.search_space.items():
        if key == VARIANT_KEY:
            continue
        if key not in known:
            section = key.rsplit(".", 1)[0] if "." in key else ""
            near = sorted(k for k in known if k.startswith(section + ".")) if section else []
            hint = f" (known under {section}: {', '.join(k[len(section) + 1 :] for k in near)})" if near else ""
            raise SpecError(f"{source}: search_space.{key}: unknown config key{hint}")
        if key in ("distill.teacher", "data.root", "train.epochs", "train.output_dir"):
            raise SpecError(f"{source}: search_space.{key}: set by the sweep itself (use teacher, data, epochs)")
        for value in dim.candidates():
            try:
                resolve_config(base, overrides={key: value})
            except ConfigError as exc:
                raise SpecError(f"{source}: search_space.{key}.{dim.kind}: {exc}") from None


def _check_variants(spec: SweepSpec, base: dict[str, Any], known: set[str], source: str) -> None:
    """`variants` and the searched `variant` agree; every variant is a valid set of config keys."""
    dim = spec.search_space.get(VARIANT_KEY)
    if dim is None:
        if spec.variants:
            raise SpecError(
                f"{source}: variants: defined but not searched (add search_space.variant: {{grid: [names]}})"
            )
        return
    if not spec.variants:
        raise SpecError(f"{source}: search_space.variant: names a variant, but the spec has no variants section")
    if dim.kind not in ("grid", "choice", "fixed"):
        raise SpecError(f"{source}: search_space.variant: expected grid, choice or fixed names, not a {dim.kind} range")
    for name in dim.candidates():
        if name not in spec.variants:
            raise SpecError(
                f"{source}: search_space.variant: {name!r} is not a variant (known: {', '.join(spec.variants)})"
            )
    for name, keys in spec.variants.items():
        _check_variant(spec, name, keys, base, known, source)


def _check_variant(spec: SweepSpec, name: str, keys: Any, base: dict[str, Any], known: set[str], source: str) -> None:
    if not isinstance(keys, dict) or not keys:
        raise SpecError(f"{source}: variants.{name}: expected a mapping of dotted config keys to values")
    for key in keys:
        if key not in known:
            raise SpecError(f"{source}: variants.{name}.{key}: unknown config key")
        if key in spec.search_space:
            raise SpecError(f"{source}: variants.{name}.{key}: also searched; a key is set by one or the other")
    try:
        resolve_config(base, variant=keys)
    except ConfigError as exc:
        raise SpecError(f"{source}: variants.{name}: {exc}") from None


def spec_config(spec: SweepSpec) -> dict[str, Any]:
    """The config layer of every trial (layer 4 of config/layers.py): spec.config with the spec's
    own data, student and epochs. Data and model keys left out come from the teacher at trial time."""
    base = set_dotted(spec.config, "train.epochs", spec.epochs)
    if spec.student:
        base = set_dotted(base, "model.preset", spec.student)
    if spec.data:
        base = set_dotted(base, "data.root", spec.data)
    return base


def search_space_summary(spec: SweepSpec) -> dict[str, str]:
    """{key: "loguniform[1e-06, 0.01]"} for logging."""
    out = {}
    for key, dim in spec.search_space.items():
        value = dim.value
        out[key] = f"{dim.kind}{list(value) if isinstance(value, (list, tuple)) else '(' + repr(value) + ')'}"
    return out


def resolve_paths(spec: SweepSpec, source: str = "spec") -> SweepSpec:
    """Check that the teacher checkpoint and the data set exist, before anything starts, and make
    their paths absolute (trials may run in other directories or on other nodes)."""
    from clockdistill.checkpoint_meta import read_meta

    teacher = Path(spec.teacher).expanduser()
    if not (teacher / "meta.json").is_file():
        raise SpecError(
            f"{source}: teacher: {spec.teacher} is not a checkpoint directory (expected meta.json and "
            "model.safetensors)"
        )
    meta = read_meta(teacher)
    data = Path(spec.data or meta["config"]["data"]["root"]).expanduser()
    where = "data" if spec.data else "data (taken from the teacher's checkpoint)"
    if not (data / "annotations").is_dir():
        raise SpecError(
            f"{source}: {where}: {data} is not a COCO-format data set (expected "
            f"{data}/annotations/instances_<split>.json)"
        )
    _check_kitti_objective(spec, data, source)
    spec = _absolute_config_paths(spec, source)
    storage = spec.storage_path if "://" in spec.storage_path else str(Path(spec.storage_path).expanduser().resolve())
    return spec.model_copy(
        update={"teacher": str(teacher.resolve()), "data": str(data.resolve()), "storage_path": storage}
    )


PATH_KEYS = ("train.init_from", "model.backbone_weights")  # config paths a trial reads, from its own directory


def _absolute_config_paths(spec: SweepSpec, source: str) -> SweepSpec:
    """The spec's config paths (PATH_KEYS) made absolute from where the sweep is launched, as trials
    run elsewhere; a path that is not there is refused in one line."""
    config = spec.config
    for key in PATH_KEYS:
        section, name = key.split(".")
        value = (config.get(section) or {}).get(name)
        if not value or "://" in str(value):
            continue
        path = Path(value).expanduser()
        if not path.exists():
            raise SpecError(f"{source}: config.{key}: {value} not found (a checkpoint directory or weights file)")
        config = set_dotted(config, key, str(path.resolve()))
    return spec.model_copy(update={"config": config})


def _check_kitti_objective(spec: SweepSpec, data: Path, source: str) -> None:
    """A KITTI objective needs a validation split converted by `clockdistill data kitti`."""
    import json

    from clockdistill.evaluation.kitti import has_kitti_fields

    kitti = [o.metric for o in spec.objective_list if o.metric.startswith("kitti/")]
    if not kitti:
        return
    split = spec.config.get("data", {}).get("val_split", "val")
    ann = data / "annotations" / f"instances_{split}.json"
    if not ann.is_file() or not has_kitti_fields(json.loads(ann.read_text())):
        raise SpecError(
            f"{source}: objective: {kitti[0]} needs a validation split converted by `clockdistill data kitti` "
            f"(its KITTI fields); {ann} has none"
        )


def spec_to_dict(spec: SweepSpec) -> dict[str, Any]:
    """A plain dict that validates back into the same spec (JSON types; each dimension as its one key)."""
    data = spec.model_dump(mode="json", by_alias=True, exclude={"search_space"})
    data["search_space"] = {
        k: {d.kind: list(d.value) if isinstance(d.value, tuple) else d.value} for k, d in spec.search_space.items()
    }
    return data


def spec_to_json(spec: SweepSpec) -> str:
    import json

    return json.dumps(spec_to_dict(spec))


def spec_from_json(text: str) -> SweepSpec:
    return SweepSpec.model_validate_json(text)


def sweep_dir_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


__all__ = [
    "SpecError",
    "SweepSpec",
    "spec_config",
    "load_spec",
    "parse_spec",
    "resolve_paths",
    "search_space_summary",
    "spec_from_json",
    "spec_to_dict",
    "spec_to_json",
]
