"""Weights files into models through config, teachers loaded from them, per-teacher input, safetensors."""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ensemble_kd import pipeline
from ensemble_kd.config import ConfigError, ModelConfig, load_config
from ensemble_kd.engine import save_model
from ensemble_kd.ensemble.cache import teacher_fingerprint
from ensemble_kd.methods.latentbe import LatentBE
from ensemble_kd.models import create, forward_with_taps
from ensemble_kd.models.batchensemble import collapse
from ensemble_kd.models.stages import forward_stem, run_stages
from ensemble_kd.models.inputs import InputAdapter, adapt_input
from ensemble_kd.models import weights as weights_module
from ensemble_kd.models.weights import check_weights, read_state_dict

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")

CPU = torch.device("cpu")


def fake_data(num_classes=5, in_channels=3):
    return SimpleNamespace(splits=SimpleNamespace(num_classes=num_classes, in_channels=in_channels), device=CPU)


def wrapped(state: dict, how: str):
    if how == "plain":
        return state
    if how == "state_dict+module.":  # a DDP training script's checkpoint
        return {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}
    if how == "model+_orig_mod.":  # torchdistill-style, of a compiled model
        return {"model": {f"_orig_mod.{k}": v for k, v in state.items()}, "optimizer": {}}
    if how == "model_ema":
        return {"model_ema": state, "epoch": 1}
    raise ValueError(how)


def saved(state: dict, how: str, folder) -> Path:
    """`state` written as a user's file: safetensors, or a torch file wrapped as `how` says."""
    if how == "safetensors":
        path = folder / "w.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, path)
    else:
        path = folder / "w.pth"
        torch.save(wrapped(state, how), path)
    return path


@pytest.mark.parametrize("arch", ["timm/resnet10t", "torchvision/resnet18"])
@pytest.mark.parametrize("how", ["safetensors", "plain", "state_dict+module.", "model+_orig_mod.", "model_ema"])
def test_weights_file_loads_back_through_config(arch, how, tmp_path):
    torch.manual_seed(1)
    original = create(arch, num_classes=5).eval()
    state = original.state_dict()
    path = saved(state, how, tmp_path)
    loaded = pipeline.build_model(ModelConfig(arch=arch, seed=7, weights=str(path)), fake_data()).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), original(x), rtol=0, atol=0)


def test_mismatched_weights_are_refused_naming_the_keys(tmp_path):
    path = tmp_path / "r10.pth"
    torch.save(create("timm/resnet10t", num_classes=5).state_dict(), path)
    with pytest.raises(ValueError, match=r"does not fit architecture 'timm/resnet10t': 2 shape mismatches "
                                         r"\(first 'fc.weight': \[5, 512\] in the file, \[7, 512\] in the model\)"):
        pipeline.build_model(ModelConfig(arch="timm/resnet10t", weights=str(path)), fake_data(num_classes=7))
    with pytest.raises(ValueError, match=r"does not fit architecture 'timm/resnet14t': 25 missing keys "
                                         r"\('layer1.0.conv3.weight', .*; 20 shape mismatches"):
        pipeline.build_model(ModelConfig(arch="timm/resnet14t", weights=str(path)), fake_data())
    with pytest.raises(ValueError, match=r"unexpected keys \('conv1.0.weight'"):
        pipeline.build_model(ModelConfig(arch="torchvision/resnet18", weights=str(path)), fake_data())
    torch.save({"epoch": 3, "optimizer": {}}, tmp_path / "not_weights.pt")
    with pytest.raises(ValueError, match=r"holds no state_dict \(found 'epoch', 'optimizer'\)"):
        read_state_dict(tmp_path / "not_weights.pt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_state_dict(tmp_path / "absent.safetensors")


@pytest.mark.parametrize("how", ["safetensors", "state_dict+module."])
@pytest.mark.parametrize("kind", [torch.int64, torch.int8, torch.bool])
def test_integer_weights_are_refused_naming_the_key_by_the_header_check_and_the_load(how, kind, tmp_path):
    """Found in a fault sweep: an int file was cast to the model's floats (all zeros) and trained at chance."""
    state = create("timm/resnet10t", num_classes=5).state_dict()
    state = {k: (v.to(kind) if v.is_floating_point() else v) for k, v in state.items()}
    path = saved(state, how, tmp_path)
    words = rf"weights file '.*' holds \d+ non-floating tensors where the model has floating ones \(first " \
            rf"'conv1.0.weight': {str(kind).removeprefix('torch.')} in the file, float32 in the model\)"
    with pytest.raises(ValueError, match=words):
        check_weights(_meta("timm/resnet10t"), path)
    with pytest.raises(ValueError, match=words):
        pipeline.build_model(ModelConfig(arch="timm/resnet10t", weights=str(path)), fake_data())


def _meta(arch: str) -> torch.nn.Module:
    with torch.device("meta"):
        return create(arch, num_classes=5)


@pytest.mark.parametrize("how", ["safetensors", "plain"])
@pytest.mark.parametrize("kind", [torch.float16, torch.bfloat16])
def test_half_weights_are_widened_and_said_once(how, kind, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(weights_module, "_widened", set(), raising=False)
    torch.manual_seed(2)
    original = create("timm/resnet10t", num_classes=5).eval()
    half = {k: (v.to(kind) if v.is_floating_point() else v) for k, v in original.state_dict().items()}
    path = saved(half, how, tmp_path)
    check_weights(_meta("timm/resnet10t"), path)  # the header check before the run, then the load
    loaded = pipeline.build_model(ModelConfig(arch="timm/resnet10t", weights=str(path)), fake_data()).eval()
    for key, value in loaded.state_dict().items():
        assert value.dtype == original.state_dict()[key].dtype and torch.equal(value, half[key].to(value.dtype)), key
    said = [line for line in capsys.readouterr().err.splitlines() if str(path) in line]
    assert said == [f"note: weights file '{path}' holds {str(kind).removeprefix('torch.')} tensors; they are "
                    f"loaded as the model's float32"]


def test_weights_and_pretrained_together_are_refused():
    with pytest.raises(ConfigError, match="set weights .* or pretrained .*, not both"):
        load_config(None, ["student.weights=/x.pth", "student.pretrained=true"])


# ---------------------------------------------------------------------------- students over a plain base

def saved_base(arch: str, path, num_classes=5) -> torch.nn.Module:
    torch.manual_seed(3)
    base = create(arch, num_classes=num_classes).eval()
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, path)
    return base


@pytest.mark.parametrize("arch", ["timm/resnet10t", "torchvision/resnet18"])
def test_a_batchensemble_student_starts_from_its_plain_base_weights(arch, tmp_path):
    base = saved_base(arch, tmp_path / "base.safetensors")
    x = torch.randn(2, 3, 32, 32)
    config = ModelConfig(arch="batchensemble", weights=str(tmp_path / "base.safetensors"),
                         kwargs={"base": arch, "members": 3, "init": "ones", "bias": "member"})
    be = pipeline.build_model(config, fake_data()).eval()
    for member in be.forward_members(x):  # factors 1: every member is the base network
        torch.testing.assert_close(member, base(x), rtol=1e-5, atol=1e-5)
    collapsed = collapse(be).state_dict()
    for key, value in base.state_dict().items():
        torch.testing.assert_close(collapsed[key], value, rtol=0, atol=0)
    signs = pipeline.build_model(config.model_copy(update={"kwargs": {**config.kwargs, "init": "sign"}}),
                                 fake_data()).eval()
    layers = dict(signs.be_layers())
    torch.testing.assert_close(layers["fc"].weight, base.fc.weight, rtol=0, atol=0)  # the shared weights
    assert not torch.allclose(signs.forward_members(x)[0], signs.forward_members(x)[1])  # members differ by r, s
    # LatentBE's own rewrite of the configured student (student.arch: <the base>) takes the same file
    arch_, kwargs = LatentBE(members=2).student_spec(arch, {})
    rewritten = pipeline.build_model(ModelConfig(arch=arch_, kwargs=kwargs, weights=config.weights), fake_data())
    torch.testing.assert_close(dict(rewritten.be_layers())["fc"].weight, base.fc.weight, rtol=0, atol=0)


def test_a_multihead_student_starts_from_its_base_weights_in_the_shared_part(tmp_path):
    base = saved_base("timm/resnet10t", tmp_path / "base.safetensors")
    net = pipeline.build_model(ModelConfig(arch="multihead", weights=str(tmp_path / "base.safetensors"),
                                           kwargs={"base": "timm/resnet10t", "branches": 2, "fork": "layer3"}),
                               fake_data()).eval()
    own = base.state_dict()
    trunk = net.trunk.state_dict()
    assert trunk and any(k.startswith("layer2.") for k in trunk) and not any(k.startswith("layer3.") for k in trunk)
    for key, value in trunk.items():
        torch.testing.assert_close(value, own[key], rtol=0, atol=0)
    x = torch.randn(2, 3, 32, 32)
    _, taps = forward_with_taps(base, x, ("layer2",))
    torch.testing.assert_close(run_stages(net.trunk, forward_stem(net.trunk, x), net.shared_points), taps["layer2"],
                               rtol=0, atol=0)


def test_a_file_fitting_neither_the_student_nor_its_base_is_refused_naming_both(tmp_path):
    saved_base("timm/resnet14t", tmp_path / "other.safetensors")
    config = ModelConfig(arch="batchensemble", weights=str(tmp_path / "other.safetensors"),
                         kwargs={"base": "timm/resnet10t", "members": 2})
    with pytest.raises(ValueError, match=r"fits neither architecture 'batchensemble' \(\d+ missing keys .*\) nor "
                                         r"its base 'timm/resnet10t' \(30 unexpected keys \('layer1.0.bn3.bias'"):
        pipeline.build_model(config, fake_data())


def test_a_whole_batchensemble_file_still_loads_as_itself(tmp_path):
    torch.manual_seed(0)
    be = create("batchensemble", num_classes=5, base="timm/resnet10t", members=2, init="sign").eval()
    torch.save(be.state_dict(), tmp_path / "be.pth")
    loaded = pipeline.build_model(ModelConfig(arch="batchensemble", seed=9, weights=str(tmp_path / "be.pth"),
                                              kwargs={"base": "timm/resnet10t", "members": 2, "init": "sign"}),
                                  fake_data()).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), be(x), rtol=0, atol=0)


# ---------------------------------------------------------------------------- per-teacher input

def test_input_adapter_hand_case():
    data_mean, data_std = (0.5, 0.4, 0.3), (0.25, 0.2, 0.1)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    adapter = InputAdapter(data_mean, data_std, mean, std)
    raw = torch.tensor([0.75, 0.2, 0.0]).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    x = (raw - torch.tensor(data_mean).view(1, 3, 1, 1)) / torch.tensor(data_std).view(1, 3, 1, 1)
    # by hand: (0.75 - 0.485) / 0.229, (0.2 - 0.456) / 0.224, (0.0 - 0.406) / 0.225
    expected = torch.tensor([1.1572052, -1.1428571, -1.8044444]).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    torch.testing.assert_close(adapter(x), expected, rtol=0, atol=1e-6)
    # a = std_d / std_t, b = (mean_d - mean_t) / std_t
    torch.testing.assert_close(adapter.scale.flatten(), torch.tensor([0.25 / 0.229, 0.2 / 0.224, 0.1 / 0.225]))
    torch.testing.assert_close(adapter.shift.flatten(),
                               torch.tensor([0.015 / 0.229, -0.056 / 0.224, -0.106 / 0.225]))


def test_input_adapter_resizes_and_maps_grey_data_to_rgb_statistics():
    adapter = InputAdapter((0.5,), (0.5,), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), size=(16, 16))
    x = torch.randn(2, 1, 8, 8)
    mean_t, std_t = sum((0.485, 0.456, 0.406)) / 3, sum((0.229, 0.224, 0.225)) / 3
    affine = (x * 0.5 + 0.5 - mean_t) / std_t
    want = F.interpolate(affine, size=(16, 16), mode="bilinear", antialias=True, align_corners=False)
    torch.testing.assert_close(adapter(x), want, rtol=0, atol=1e-5)
    flat = adapter(torch.full((1, 1, 8, 8), 0.3))
    torch.testing.assert_close(flat, torch.full_like(flat, (0.3 * 0.5 + 0.5 - mean_t) / std_t), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="has 3 values but the data has 2 channels"):
        InputAdapter((0.5, 0.5), (0.5, 0.5), (0.1, 0.2, 0.3), (1, 1, 1))


def test_adapted_model_keeps_its_module_paths():
    torch.manual_seed(0)
    model = create("timm/resnet10t", num_classes=4).eval()
    plain = copy.deepcopy(model)
    adapter = InputAdapter((0.5,) * 3, (0.25,) * 3, (0.4,) * 3, (0.2,) * 3, size=(40, 40))
    adapt_input(model, adapter)
    x = torch.randn(2, 3, 32, 32)
    out, taps = forward_with_taps(model, x, ("layer2", "logits"))
    want, want_taps = forward_with_taps(plain, adapter(x), ("layer2", "logits"))
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    assert taps["layer2"].shape[-1] == 5  # 40 px / 8: the tap sees the resized input
    torch.testing.assert_close(taps["layer2"], want_taps["layer2"], rtol=0, atol=0)
    folded = copy.deepcopy(model)  # a deep copy (teachers' fast copies) keeps the adapter
    torch.testing.assert_close(folded(x), want, rtol=0, atol=0)


# ---------------------------------------------------------------------------- teachers from weights

@pytest.fixture
def weight_files(tmp_path):
    """A timm and a torchvision ResNet for digits (1 channel, 10 classes), random weights, saved."""
    torch.manual_seed(0)
    timm_net = create("timm/resnet10t", num_classes=10, in_channels=1).eval()
    tv_net = create("torchvision/resnet18", num_classes=10, in_channels=1).eval()
    save_file({k: v.contiguous() for k, v in timm_net.state_dict().items()}, tmp_path / "r10t.safetensors")
    torch.save({"state_dict": tv_net.state_dict()}, tmp_path / "r18.pth")
    return {"timm": (timm_net, tmp_path / "r10t.safetensors"), "tv": (tv_net, tmp_path / "r18.pth")}


def members_override(files, size=16):
    return ["teachers.members=[{arch: timm/resnet10t, weights: %s, input: {size: %d}}, "
            "{arch: torchvision/resnet18, weights: %s, input: {mean: [0.5], std: [0.25]}}]"
            % (files["timm"][1], size, files["tv"][1]), "device=cpu"]


def test_teacher_set_from_weights_without_train_teachers(weight_files):
    config = load_config(None, members_override(weight_files))
    data = pipeline.prepare_data(config)
    teachers = pipeline.load_teachers(config, data)
    assert teachers.names == ["00-timm-resnet10t-s0", "01-torchvision-resnet18-s0"]
    x = next(data.test.batches(None)).x[:4]
    got = teachers.member_logits(x)
    mean, std = data.splits.mean[0], data.splits.std[0]
    timm_net, tv_net = weight_files["timm"][0], weight_files["tv"][0]
    from ensemble_kd.ensemble.teacher_set import fold_batchnorm
    want0 = fold_batchnorm(timm_net)(F.interpolate(x, size=(16, 16), mode="bilinear", antialias=True))
    want1 = fold_batchnorm(tv_net)((x * std + mean - 0.5) / 0.25)
    torch.testing.assert_close(got[0], want0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[1], want1, rtol=1e-4, atol=1e-4)


def test_teacher_fingerprint_names_the_weights_and_the_input(weight_files):
    def prints(size):
        config = load_config(None, members_override(weight_files, size))
        return teacher_fingerprint(pipeline.teachers_from_weights(config, pipeline.prepare_data(config)))

    at16, at24 = prints(16), prints(24)
    assert at16[0]["input"]["size"] == [16, 16] and at24[0]["input"]["size"] == [24, 24]
    assert at16[1]["input"]["mean"] == [0.5] and at16[1] == at24[1]
    assert at16[0]["weights"] == at24[0]["weights"]  # the same file; only the input differs
    plain = create("timm/resnet10t", num_classes=10, in_channels=1)
    other = SimpleNamespace(names=["a"], members=[plain])
    assert teacher_fingerprint(other)[0]["weights"] != at16[0]["weights"]


def test_members_without_weights_and_no_source_are_refused(weight_files):
    config = load_config(None, members_override(weight_files) + ["teachers.members.1.weights=null"])
    with pytest.raises(ConfigError, match=r"'teachers.members.1' has neither weights nor pretrained"):
        pipeline.load_teachers(config, pipeline.prepare_data(config))
    config = load_config(None, ["device=cpu"])
    with pytest.raises(ConfigError, match="teachers.source is not set"):
        pipeline.load_teachers(config, pipeline.prepare_data(config))


# ---------------------------------------------------------------------------- students as safetensors

@pytest.mark.parametrize("arch", ["timm/resnet10t", "torchvision/mobilenet_v3_small"])
def test_saved_student_loads_with_the_library_own_loader(arch, tmp_path):
    torch.manual_seed(0)
    model = create(arch, num_classes=6).eval()
    save_model(model, tmp_path / "model.pt")
    state = load_file(tmp_path / "model.safetensors")
    source, name = arch.split("/")
    plain = (timm.create_model(name, num_classes=6) if source == "timm"
             else torchvision.models.get_model(name, num_classes=6)).eval()
    plain.load_state_dict(state)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(plain(x), model(x), rtol=0, atol=0)


def test_library_input_config_and_overrides(weight_files):
    config = load_config(None, [
        "teachers.members=[{arch: timm/resnet10t, weights: %s, input: {library: true, size: null}}, "
        "{arch: torchvision/resnet18, weights: %s, input: {library: true}}]"
        % (weight_files["timm"][1], weight_files["tv"][1]), "device=cpu"])
    teachers = pipeline.teachers_from_weights(config, pipeline.prepare_data(config))
    prints = teacher_fingerprint(teachers)
    grey_mean, grey_std = sum((0.485, 0.456, 0.406)) / 3, sum((0.229, 0.224, 0.225)) / 3  # RGB stats, one channel
    assert prints[0]["input"]["size"] is None  # size: null keeps the digits' 8x8
    assert prints[0]["input"]["mean"] == pytest.approx([grey_mean]) and prints[0]["input"]["std"] == pytest.approx([grey_std])
    assert prints[1]["input"]["size"] == [224, 224]  # torchvision's resnet18 weights: 224 px crops


def test_kwargs_the_library_refuses_are_named_with_the_key_to_fix():
    config = load_config(None, ["student.arch=timm/resnet10t", "student.kwargs.width=0.25"])
    with pytest.raises(ConfigError, match=r"config key 'student': .*'width'; student.kwargs is \{'width': 0.25\}: "
                                          r"give the arguments of timm/resnet10t there \(\{\} for none\)"):
        pipeline.check_models(config, fake_data(), teachers=False)


@pytest.mark.parametrize("method", ["ce", "latentbe"])
def test_a_student_weights_file_that_does_not_fit_is_refused_before_anything_is_written(method, tmp_path, capsys):
    """Found in a first-use trial: the file was read only once training began, after the run
    directory (config.yaml, fingerprint.json) was written, so the corrected command was refused."""
    from ensemble_kd.cli import main

    torch.manual_seed(0)
    teacher = create("timm/resnet10t", num_classes=10, in_channels=1)
    save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, tmp_path / "t.safetensors")
    other = create("torchvision/resnet18", num_classes=10, in_channels=1)
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, tmp_path / "other.safetensors")
    base = ["distill", f"run.dir={tmp_path}", "run.name=r", "device=cpu", f"method.name={method}",
            f"teachers.members=[{{arch: timm/resnet10t, weights: {tmp_path}/t.safetensors}}]",
            "student.arch=timm/resnet10t", "student.train.epochs=1"]
    for weights, words in ((tmp_path / "other.safetensors", "does not fit" if method == "ce" else "fits neither"),
                           (tmp_path / "absent.pth", "does not exist")):
        capsys.readouterr()
        assert main([*base, f"student.weights={weights}"]) == 2
        said = " ".join(capsys.readouterr().err.split())
        assert "config key 'student.weights'" in said and words in said, said
        assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("how", ["safetensors", "state_dict+module."])
def test_shapes_only_reads_the_keys_and_shapes_of_what_a_load_gives(how, tmp_path):
    state = create("timm/resnet10t", num_classes=5).state_dict()
    path = saved(state, how, tmp_path)
    full, shapes = read_state_dict(path), read_state_dict(path, shapes_only=True)
    assert sorted(shapes) == sorted(full) and all(shapes[k].shape == full[k].shape for k in full)
    if how == "safetensors":
        assert all(v.is_meta for v in shapes.values())  # the header alone: no tensor data read
