import pytest

from clockdistill.config.dotted import parse_yaml
from clockdistill.config.layers import resolve_config
from clockdistill.errors import ConfigError


def test_preset_fills_fields_and_explicit_keys_win():
    cfg = resolve_config({"model": {"preset": "deformable-detr-r50", "dec_layers": 4}})
    assert cfg.model.backbone_depth == 50 and cfg.model.d_model == 256 and cfg.model.dec_layers == 4
    assert resolve_config({"model": {"preset": "dab-detr-tiny-student"}}).model.arch == "dab"


def test_overrides_and_flatten_round_trip(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  lr: 5e-5\n  epochs: 3\nmodel:\n  preset: hybrid-tiny-student\n")
    cfg = resolve_config(f, overrides=["train.epochs=7", "data.train_sizes=[96, 128]", "train.amp=false"])
    assert cfg.train.lr == 5e-5 and isinstance(cfg.train.lr, float)  # 5e-5 read as a number
    assert cfg.train.epochs == 7 and cfg.data.train_sizes == [96, 128] and cfg.train.amp is False
    flat = cfg.flatten()
    assert flat["train.epochs"] == 7 and flat["model.preset"] == "hybrid-tiny-student"
    again = resolve_config(cfg.to_dict())
    assert again == cfg


def test_on_off_knobs_read_as_written_in_overrides_files_and_specs(tmp_path):
    """YAML 1.1 reads on/off/yes/no as booleans; the documented values of distill.teacher_cache must
    work as written, and a true/false field takes the same words."""
    from sweeps.tune.spec import parse_spec

    for value in ("on", "off", "auto"):
        assert resolve_config({}, overrides=[f"distill.teacher_cache={value}"]).distill.teacher_cache == value
    f = tmp_path / "c.yaml"
    f.write_text("distill:\n  teacher_cache: on\n  init_student: yes\ntrain:\n  amp: off\n")
    cfg = resolve_config(f, overrides=["data.decoded_cache=on"])
    assert cfg.distill.teacher_cache == "on" and cfg.distill.init_student is True and cfg.train.amp is False
    assert cfg.data.decoded_cache is True
    spec = parse_spec(
        parse_yaml(
            "name: s\nteacher: t\nepochs: 1\nbaseline_trial: yes\nconfig: {distill: {teacher_cache: on}}\n"
            "search_space: {distill.teacher_cache: {choice: [on, off]}}\n"
        )
    )
    assert spec.baseline_trial is True and spec.config["distill"]["teacher_cache"] == "on"
    assert spec.search_space["distill.teacher_cache"].candidates() == ["on", "off"]
    with pytest.raises(ConfigError, match=r"train\.amp: expected true or false, got 'maybe'"):
        resolve_config({}, overrides=["train.amp=maybe"])


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["train.epoch=3"], r"unknown config key 'train\.epoch'"),
        (["model.preset=huge"], r"model\.preset: unknown preset 'huge'"),
        (["train.lr=abc"], r"train\.lr: expected a number, got 'abc'"),
        (["train.lr='1e-4'"], r"train\.lr: expected a number"),
        (["train.epochs=2.5"], r"train\.epochs: expected an integer"),
        (["train.amp=1"], r"train\.amp: expected true or false"),
        (["train.lr=-1"], r"train\.lr: expected a value >= 0"),
        (["model.arch=yolo"], r"model\.arch: expected one of deformable, dab"),
        (["model.d_model=66"], r"model\.d_model: 66 must be divisible by model\.nheads"),
        (["train.device=gpu"], r"train\.device"),
        (["nonsense"], r"expected key=value"),
    ],
)
def test_bad_values_are_rejected_with_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        resolve_config({}, overrides=overrides)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        resolve_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        resolve_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        resolve_config(listy)
    code = tmp_path / "code.yaml"
    code.write_text("name: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(ConfigError):  # safe loading: tags that run code are refused
        resolve_config(code)


def test_configs_are_values_no_function_changes_its_argument(tmp_path):
    import copy
    import dataclasses

    from clockdistill.config.dotted import apply_overrides
    from clockdistill.config.layers import resolve_config

    raw = {"train": {"epochs": 1}, "model": {"preset": "hybrid-tiny-student"}}
    before = copy.deepcopy(raw)
    assert apply_overrides(raw, ["train.epochs=3", "train.lr=1e-3"])["train"] == {"epochs": 3, "lr": 1e-3}
    cfg = resolve_config(raw, overrides=["train.epochs=5", "data.max_size=64"])
    assert cfg.train.epochs == 5 and raw == before  # the caller's nested dicts are untouched
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.epochs = 2
    again = cfg.updated({"train.epochs": 2})
    assert again.train.epochs == 2 and cfg.train.epochs == 5
    with pytest.raises(ConfigError, match="train.epochs"):
        cfg.updated({"train.epochs": 0})
    # resolve_config(distill=True) reads a teacher checkpoint's metadata and fills in what the dict leaves out
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    tcfg = resolve_config({"data": {"root": "somewhere"}, "model": {"preset": "hybrid-tiny-teacher"}})
    (teacher / "meta.json").write_text(__import__("json").dumps({"config": tcfg.to_dict(), "class_names": ["a", "b"]}))
    data = {"distill": {"memory": {"alpha": 1e-3}}, "train": {"epochs": 2}}
    before = copy.deepcopy(data)
    kd = resolve_config(distill=True, config=data, overrides=["distill.logit.temperature=4"], teacher=teacher)
    assert (
        kd.model.preset == "hybrid-tiny-student" and kd.data.root == "somewhere" and kd.distill.logit.temperature == 4
    )
    assert data == before


def _teacher_meta(path, model: dict, data: dict) -> str:
    """A teacher checkpoint's meta.json (all resolve_config reads of it)."""
    import json

    from clockdistill.config.layers import resolve_config

    path.mkdir()
    cfg = resolve_config({"data": data, "model": model})
    (path / "meta.json").write_text(json.dumps({"config": cfg.to_dict(), "class_names": ["a", "b", "c"]}))
    return str(path)


@pytest.mark.parametrize("winner", ["teacher", "config", "variant", "overrides", "fixed"])
def test_each_layer_wins_over_the_layers_above_it(winner, tmp_path):
    """config/layers.py's order: defaults < preset < teacher < config < variant < overrides < fixed.
    Every layer from `winner` down is left out, so `winner` gives data.max_size and train.lr."""
    from clockdistill.config.layers import resolve_config

    teacher = _teacher_meta(tmp_path / "t", {"preset": "dino-tiny-teacher"}, {"root": "t-data", "max_size": 96})
    order = ["teacher", "config", "variant", "overrides", "fixed"]
    value = {name: (64 + 8 * i, 1e-4 * (i + 1)) for i, name in enumerate(order)}
    layers = {
        name: {"data.max_size": value[name][0], "train.lr": value[name][1]} for name in order if name != "teacher"
    }
    used = order[: order.index(winner) + 1]
    config = {}
    if "config" in used:
        config = {"data": {"max_size": value["config"][0]}, "train": {"lr": value["config"][1]}}
    cfg = resolve_config(
        config,
        variant=layers["variant"] if "variant" in used else None,
        overrides=layers["overrides"] if "overrides" in used else {},
        fixed=layers["fixed"] if "fixed" in used else None,
        distill=True,
        teacher=teacher,
    )
    expected_size = 96 if winner == "teacher" else value[winner][0]
    expected_lr = 2e-4 if winner == "teacher" else value[winner][1]  # the teacher gives data only: lr is the default
    assert (cfg.data.max_size, cfg.train.lr) == (expected_size, expected_lr)
    assert cfg.data.root == "t-data" and cfg.model.num_classes == 3  # the teacher's, wherever nothing else says
    # the architecture: the student preset that follows from the teacher's, with the loss it brings
    assert cfg.model.preset == "dino-tiny-student" and cfg.model.enc_layers == 1 and cfg.loss.cls == 1.0


def test_a_named_preset_wins_over_the_starting_checkpoints_architecture(tmp_path):
    """train.init_from without model.preset: the checkpoint's model section (not its class count);
    a preset named in any layer replaces it, and keys beside either win over both."""
    from clockdistill.config.layers import resolve_config

    start = _teacher_meta(tmp_path / "s", {"preset": "deformable-detr-tiny-teacher-refine", "dec_layers": 2}, {})
    fine_tune = resolve_config({"train": {"init_from": start}})
    assert fine_tune.model.preset == "deformable-detr-tiny-teacher-refine" and fine_tune.model.dec_layers == 2
    assert fine_tune.model.box_refine and fine_tune.model.num_classes == 0  # classes: the new data's
    own = resolve_config({"train": {"init_from": start}, "model": {"enc_layers": 1}})
    assert own.model.dec_layers == 2 and own.model.enc_layers == 1
    other = resolve_config({"train": {"init_from": start}}, overrides=["model.preset=hybrid-tiny-student"])
    assert other.model.arch == "hybrid" and other.model.dec_layers == 3  # the named preset's own


def test_the_config_package_imports_no_torch():
    import subprocess
    import sys

    code = "import sys, clockdistill.config.layers, clockdistill.config.sections; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
