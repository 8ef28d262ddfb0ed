"""The ImageNet configs of configs/ run end to end: on a generated folder of variable-size images,
views at 32 px, 1 epoch, batch 4. The students keep the configs' architectures; the teachers are
smaller members of the same family (torchvision ResNet-18/34 for ResNet-34/101/152, whose
building and training would take minutes on 2 cores), in the configs' numbers."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from ensemble_kd.cli import main
from ensemble_kd.config import load_config
from ensemble_kd.models import create

sys.path.insert(0, str(Path(__file__).parent))
from _images import make_image_folder  # noqa: E402

pytest.importorskip("torchvision")
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    # ImageNet's layout: train/ and val/, images of differing sizes (so the data streams)
    return make_image_folder(tmp_path_factory.mktemp("imagenet"), per_class=4, test_per_class=2, sizes=(36, 60),
                             test_dir="val", modes=("RGB",))


def _tiny(folder, tmp_path, name):
    return [f"data.root={folder}", "data.views.size=32", "data.batch_size=4", "data.eval_batch_size=8",
            "data.workers=0", "data.val_fraction=0.25", "student.train.epochs=1", "teachers.train.epochs=1",
            "student.train.log_every=1", "device=cpu", f"run.dir={tmp_path}", f"run.name={name}",
            # batch 4 at the configs' lr 0.1 (set for 256) sends a ResNet-50 to inf in two steps
            "student.train.optim.lr=0.001", "teachers.train.optim.lr=0.001"]


def test_every_imagenet_config_names_its_data_views_and_paper(folder):
    for path in sorted(CONFIGS.glob("imagenet_*.yaml")):
        text = path.read_text()
        config = load_config(path, [])
        assert config.data.name == "image-folder" and config.data.views.train == "rrc", path.name
        assert config.data.views.size == 224 and "Paper" in text and "Schedule" in text, path.name


def test_meal_resnet50_from_two_teachers_loaded_from_files(folder, tmp_path):
    files = []
    for arch in ("resnet18", "resnet34"):  # the config's ResNet-101 and ResNet-152, smaller
        files.append(tmp_path / f"{arch}.pth")
        torch.save(create(f"torchvision/{arch}", num_classes=3).state_dict(), files[-1])
    members = f"teachers.members=[{{arch: torchvision/resnet18, weights: {files[0]}}}, " \
              f"{{arch: torchvision/resnet34, weights: {files[1]}}}]"
    assert main(["distill", str(CONFIGS / "imagenet_meal.yaml"), members, *_tiny(folder, tmp_path, "meal")]) == 0
    assert (tmp_path / "meal" / "model.pt").exists()


def test_ensemblenet_multihead_resnet152_of_table_1a(folder, tmp_path):
    assert main(["distill", str(CONFIGS / "imagenet_ensemblenet.yaml"), *_tiny(folder, tmp_path, "enet")]) == 0
    net = create("multihead", num_classes=3, base="timm/resnet152", branches=2, fork="layer3",
                 branch_widths=[176, 352], base_kwargs={"act_layer": "relu6", "zero_init_last": False})
    assert type(net.branches[0].layer4[0].act2).__name__ == "ReLU6"  # capped at 6, as the paper's
    net.load_state_dict(torch.load(tmp_path / "enet" / "model.pt", weights_only=True))
    config = load_config(CONFIGS / "imagenet_ensemblenet.yaml", [])
    assert config.method.options["mu"] == 3 and config.method.options["label_smoothing"] == 0.1


@pytest.mark.parametrize("config,count", [("imagenet_latentbe.yaml", 4), ("imagenet_aekd.yaml", 5)])
def test_students_from_trained_teacher_sets(folder, tmp_path, config, count):
    tiny = [*_tiny(folder, tmp_path, "student"), "teachers.arch=torchvision/resnet18"]  # ResNet-50/34, smaller
    assert main(["train-teachers", str(CONFIGS / config), *tiny, "run.name=teachers"]) == 0
    assert len(list((tmp_path / "teachers" / "members").iterdir())) == count
    assert main(["distill", str(CONFIGS / config), *tiny, f"teachers.source={tmp_path / 'teachers'}"]) == 0
    if config == "imagenet_latentbe.yaml":  # the collapse is a plain torchvision ResNet-50
        import torchvision

        plain = torchvision.models.resnet50(num_classes=3)
        plain.load_state_dict(torch.load(tmp_path / "student" / "collapsed.pt", weights_only=True))
