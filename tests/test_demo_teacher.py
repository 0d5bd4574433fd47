"""The teacher the demo ships (sweeps/assets/demo-teacher): what recipe.json says of it holds here,
and a changed file or a changed architecture is refused with what to do."""

import json
import shutil

import pytest

from clockdistill.data.synth import write_synthetic
from clockdistill.errors import UserError
from sweeps.demo import SHIPPED_TEACHER, TEACHER_DATA, evaluate_checkpoint, install_teacher

RECIPE = json.loads((SHIPPED_TEACHER / "recipe.json").read_text())


@pytest.fixture(scope="module")
def val_data(tmp_path_factory):
    """The recipe's validation images (the synthetic generator is deterministic per seed)."""
    root = tmp_path_factory.mktemp("demo-teacher") / "data"
    return write_synthetic(root, train=0, val=TEACHER_DATA["val"], seed=TEACHER_DATA["seed"], progress=False)


def test_the_shipped_teacher_is_worth_distilling_and_scores_what_its_recipe_says(val_data, tmp_path):
    assert RECIPE["AP"] >= 0.3  # the demo's promise
    teacher = install_teacher(tmp_path / "teacher" / "best", val_data)  # sha256 checked, loads into the preset
    metrics = evaluate_checkpoint(teacher, val_data)
    # the same weights on the same images: only float summation order differs between CPUs
    assert metrics["AP"] == pytest.approx(RECIPE["AP"], abs=0.01), metrics["AP"]


def test_changed_weights_or_architecture_are_refused_with_what_to_do(val_data, tmp_path):
    tampered = tmp_path / "tampered"
    shutil.copytree(SHIPPED_TEACHER, tampered)
    with open(tampered / "model.safetensors", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x00\x00\x80\x7f")
    with pytest.raises(UserError, match="is not the recipe's .*make demo-teacher"):
        install_teacher(tmp_path / "a", val_data, tampered)
    other = tmp_path / "other"
    shutil.copytree(SHIPPED_TEACHER, other)
    meta = json.loads((other / "meta.json").read_text())
    meta["config"]["model"]["d_model"] = 32  # as if the preset's architecture had changed
    (other / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="no longer fits hybrid-tiny-teacher .*make demo-teacher") as err:
        install_teacher(tmp_path / "b", val_data, other)
    assert "\n" not in str(err.value)


def test_the_study_teacher_starts_from_the_shipped_one_on_more_images_and_is_reused(tmp_path, monkeypatch):
    """`clockdistill demo study-teacher` at a tiny scale: the students' images are the first of
    the teacher's, the run starts from the shipped weights, and a finished teacher is not retrained."""
    import sweeps.demo as demo

    monkeypatch.setattr(demo, "TEACHER_DATA", {"train": 8, "val": 4, "seed": 0})
    monkeypatch.setattr(demo, "STUDY_TEACHER", {"train_images": 16, "epochs": 1})
    monkeypatch.setattr(demo, "TRAIN", {**demo.TRAIN, "warmup_iters": 1})
    best, ap = demo.build_study_teacher(tmp_path, threads=1)
    meta = json.loads((best / "meta.json").read_text())
    assert meta["config"]["train"]["init_from"] == str(tmp_path / "shipped-teacher")
    assert meta["config"]["data"]["root"] == str(tmp_path / "teacher-data") and meta["best_ap"] == ap
    students = json.loads((tmp_path / "data" / "annotations" / "instances_train.json").read_text())
    teachers = json.loads((tmp_path / "teacher-data" / "annotations" / "instances_train.json").read_text())
    assert len(students["images"]) == 8 and students["images"] == teachers["images"][:8]
    assert students["annotations"] == [
        a for a in teachers["annotations"] if a["image_id"] in {i["id"] for i in students["images"]}
    ]
    stamp = (best / "model.safetensors").stat().st_mtime_ns
    assert demo.build_study_teacher(tmp_path, threads=1) == (best, ap)
    assert (best / "model.safetensors").stat().st_mtime_ns == stamp


def test_the_shipped_student_weights_load_and_come_from_other_images():
    """The demo students' starting weights (sweeps/assets/demo-student): the student preset, pretrained
    on images of another seed than the demo's, and the file its recipe names."""
    from sweeps.demo import SHIPPED_STUDENT, STUDENT_PRESET, check_shipped

    recipe = json.loads((SHIPPED_STUDENT / "recipe.json").read_text())
    assert recipe["preset"] == STUDENT_PRESET and recipe["data"]["synthetic"]["seed"] != TEACHER_DATA["seed"]
    assert check_shipped(SHIPPED_STUDENT, STUDENT_PRESET, "make demo-student") == SHIPPED_STUDENT.resolve()
