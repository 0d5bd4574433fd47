import pytest

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
    # distill_config reads a teacher checkpoint's metadata and fills in what the dict leaves out
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
