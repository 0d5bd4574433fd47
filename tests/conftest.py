import json
import subprocess
import sys
from pathlib import Path

import pytest

from clockdistill.data.synth import write_synthetic


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory) -> Path:
    """A small synthetic COCO-format data set shared by the tests (read-only by convention)."""
    return write_synthetic(tmp_path_factory.mktemp("synth"), train=24, val=8, seed=0, progress=False)


def write_coco(root: Path, split: str, images, annotations, categories=None, make_images=True) -> Path:
    """Write a hand-made COCO data set; images are blank PNGs of the declared size."""
    from PIL import Image

    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    if make_images:
        for img in images:
            Image.new("RGB", (img["width"], img["height"]), (90, 90, 90)).save(root / "images" / split / img["file_name"])
    doc = {"images": images, "annotations": annotations, "categories": categories or [{"id": 1, "name": "thing"}]}
    path = root / "annotations" / f"instances_{split}.json"
    path.write_text(json.dumps(doc))
    return path


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clockdistill", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="session")
def tiny_teacher(synth_data, tmp_path_factory) -> Path:
    """A tiny-teacher checkpoint trained for two quick epochs on `synth_data` (its `best` directory)."""
    from clockdistill.config import config_from_dict
    from clockdistill.engine import fit

    out = tmp_path_factory.mktemp("teacher")
    cfg = config_from_dict({"data": {"root": str(synth_data)}, "model": {"preset": "tiny-teacher"},
                            "train": {"epochs": 2, "batch_size": 8, "lr": 4e-4, "lr_backbone": 4e-4, "clip_max_norm": 1.0,
                                      "device": "cpu", "output_dir": str(out), "progress": False}})
    fit(cfg)
    return out / "best"
