"""timm/ and torchvision/ names, users' own networks, entry-point plugins, `ensemble-kd models`."""

from __future__ import annotations

import sys
import textwrap
import urllib.error

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ensemble_kd import cli
from ensemble_kd.engine import load_model, save_model
from ensemble_kd.methods import create_method, known_methods
from ensemble_kd.models import create, default_taps, forward_with_taps, list_models
from ensemble_kd.models.external import PretrainedUnavailable

pytest.importorskip("timm")
pytest.importorskip("torchvision")

TINY = [("timm/resnet10t", {}), ("torchvision/resnet18", {}), ("torchvision/mobilenet_v3_small", {})]


@pytest.mark.parametrize("name,kwargs", TINY)
@pytest.mark.parametrize("in_channels", [1, 3])
def test_library_model_builds_and_its_spec_rebuilds_it(name, kwargs, in_channels, tmp_path):
    torch.manual_seed(0)
    model = create(name, num_classes=7, in_channels=in_channels, **kwargs).eval()
    x = torch.randn(2, in_channels, 32, 32)
    assert model(x).shape == (2, 7)
    assert model.spec == {"name": name, "num_classes": 7, "in_channels": in_channels, **kwargs}
    save_model(model, tmp_path / "model.pt")
    again = load_model(tmp_path / "model.pt").eval()  # through model.json's spec
    torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)


def test_kwargs_pass_through_to_the_library():
    model = create("timm/resnet10t", num_classes=3, drop_rate=0.25)
    assert model.drop_rate == 0.25
    assert model.spec["drop_rate"] == 0.25
    zero = create("torchvision/resnet18", num_classes=3, zero_init_residual=True)
    assert zero.layer1[0].bn2.weight.abs().sum() == 0


def test_stage_end_taps_of_library_models():
    resnet = create("timm/resnet10t", num_classes=5)
    assert default_taps(resnet) == ("layer1", "layer2", "layer3", "layer4", "logits")
    assert default_taps(create("torchvision/resnet18", num_classes=5))[:4] == ("layer1", "layer2", "layer3", "layer4")
    mobile = create("torchvision/mobilenet_v3_small", num_classes=5).eval()
    taps = default_taps(mobile)
    _, got = forward_with_taps(mobile, torch.randn(1, 3, 64, 64), taps)
    sides = [got[t].shape[-1] for t in taps[:-1]]
    assert sides == sorted(sides, reverse=True) and len(set(sides)) == len(sides)  # one tap per resolution


def test_unknown_library_name_suggests_close_ones():
    with pytest.raises(ValueError, match=r"timm has no model 'resnet19'.*timm/resnet18"):
        create("timm/resnet19")
    with pytest.raises(ValueError, match=r"torchvision has no model 'resnet_18'"):
        create("torchvision/resnet_18")


def test_missing_library_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm now raises ImportError
    with pytest.raises(ValueError, match=r"pip install 'ensemble-kd\[vision\]'"):
        create("timm/resnet18")


def test_pretrained_without_cache_or_network_says_to_use_weights(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(PretrainedUnavailable, match=r"timm/resnet10t: .*point `weights:` at"):
        create("timm/resnet10t", num_classes=10, pretrained=True)

    import torchvision.models._api as api

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(api, "load_state_dict_from_url", offline)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(PretrainedUnavailable, match=r"torchvision/resnet18: .*no network.*`weights:`"):
        create("torchvision/resnet18", num_classes=10, pretrained=True)
    with pytest.raises(ValueError, match="no pretrained weights of its own"):
        create("small_cnn", pretrained=True)


def test_users_own_network_by_import_path(tmp_path, monkeypatch):
    (tmp_path / "my_nets.py").write_text(textwrap.dedent("""
        from torch import nn
        def build(num_classes, in_channels, hidden=8):
            return nn.Sequential(nn.Flatten(), nn.LazyLinear(hidden), nn.ReLU(), nn.Linear(hidden, num_classes))
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    model = create("my_nets:build", num_classes=4, in_channels=1, hidden=5)
    assert model(torch.randn(3, 1, 8, 8)).shape == (3, 4)
    assert model.spec == {"name": "my_nets:build", "num_classes": 4, "in_channels": 1, "hidden": 5}
    with pytest.raises(ValueError, match="has no argument 'width'"):
        create("my_nets:build", width=2)
    with pytest.raises(ValueError, match="has no callable 'nope'"):
        create("my_nets:nope")
    with pytest.raises(ValueError, match="cannot import module 'not_a_module_here'"):
        create("not_a_module_here:build")


@pytest.fixture
def plugin_package(tmp_path, monkeypatch):
    """An installed distribution (a dist-info on sys.path) registering one model and one method."""
    (tmp_path / "ekd_plugin.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn
        from ensemble_kd.methods import Method, MethodLoss, Needs

        def tiny(num_classes=10, in_channels=3):
            return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_channels, num_classes))

        class HalfCE(Method):
            needs = Needs()
            def loss(self, batch, student, teachers):
                loss = 0.5 * nn.functional.cross_entropy(student.logits, batch.y)
                return MethodLoss(loss, {"loss": loss.detach()})
    """))
    info = tmp_path / "ekd_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: ekd-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[ensemble_kd.models]\nplugin_tiny = ekd_plugin:tiny\n\n[ensemble_kd.methods]\nhalf_ce = ekd_plugin:HalfCE\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    sys.modules.pop("ekd_plugin", None)


def test_entry_point_plugin_registers_a_model_and_a_method(plugin_package):
    assert "plugin_tiny" in list_models() and "half_ce" in known_methods()
    assert "ekd_plugin" not in sys.modules  # listed from metadata, imported only when built
    model = create("plugin_tiny", num_classes=4, in_channels=2)
    assert model(torch.randn(3, 2, 5, 5)).shape == (3, 4)
    method = create_method("half_ce")
    assert type(method).__name__ == "HalfCE" and method.name == "half_ce"


def test_distill_with_a_plugin_method_and_model(plugin_package, tmp_path, capsys):
    code = cli.main(["distill", "method.name=half_ce", "student.arch=plugin_tiny", "student.kwargs={}",
                     "student.train.epochs=1", f"run.dir={tmp_path}", "run.name=p", "eval.cost=false",
                     "eval.latency=false"])
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "p" / "model.pt").is_file()


def test_models_command_lists_ours_and_the_libraries(capsys):
    assert cli.main(["models", "resnet1*"]) == 0
    text = capsys.readouterr().out
    assert "  resnet110" in text and "  timm/resnet18" in text and "  torchvision/resnet18" in text
    assert "resnet20" not in text and "timm/resnet50" not in text


@pytest.mark.parametrize("arch", ["timm/resnet10t", "torchvision/resnet18"])
@pytest.mark.parametrize("method_name,options", [("meal", {}), ("aekd", {"variant": "features"})])
def test_meal_and_aekd_features_tap_library_resnets_at_their_stage_ends(arch, method_name, options):
    from ensemble_kd.data.loader import Batch
    from ensemble_kd.ensemble import TeacherSet
    from ensemble_kd.methods import StudentOutput

    torch.manual_seed(0)
    teachers = TeacherSet([create(arch, num_classes=4) for _ in range(2)])
    teachers.prepare_for_inference(fold_bn=True)  # as the engine runs them: BN folded, paths kept
    student = create(arch, num_classes=4)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 4, (4,))
    method = create_method(method_name, **options)
    method.bind(student, teachers, x)
    stages = ("layer1", "layer2", "layer3", "layer4")
    if method_name == "meal":
        assert method.student_taps == method.teacher_taps == stages + ("logits",)
        assert method.lengths == [64, 16, 4, 1, 4]  # 8x8 .. 1x1 maps of a 32 px input, K = 4
    else:
        assert method.needs.student_taps == method.needs.teacher_taps == ("layer4",)
    logits, taps = forward_with_taps(student, x, method.needs.student_taps)
    out = method.loss(Batch(x, y, torch.arange(4)), StudentOutput(logits, taps),
                      teachers.outputs(x, method.needs, members=method.teacher_indices(0, 2, 0)))
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)
    assert all(p.grad is not None for p in method.parameters())



# --------------------------------------------------------------------------- vision transformers
VIT = ("timm/vit_tiny_patch16_224", {"img_size": 32})  # 2x2 patches of 16 px, 192 wide


def _small_torchvision_vit(num_classes=4):
    """torchvision's ViT at a test's size, with the tap_points build_torchvision gives every ViT
    (`torchvision/vit_b_16` takes image_size: 32 but not its 12 layers' width or depth)."""
    import torchvision

    from ensemble_kd.models.external import torchvision_stage_ends

    model = torchvision.models.VisionTransformer(image_size=32, patch_size=16, num_layers=1, num_heads=2,
                                                 hidden_dim=32, mlp_dim=64, num_classes=num_classes)
    model.tap_points = torchvision_stage_ends(model)
    return model


def test_vit_token_layouts_give_the_maps_of_timms_forward_intermediates():
    from ensemble_kd.models.tokens import token_layout, tokens_to_map

    torch.manual_seed(0)
    vit = create(VIT[0], num_classes=4, **VIT[1]).eval()
    assert token_layout(vit) == (1, (2, 2)) and default_taps(vit) == ("blocks.11", "logits")
    assert token_layout(create("timm/deit_tiny_distilled_patch16_224", num_classes=4, img_size=32)) == (2, (2, 2))
    assert token_layout(create("timm/resnet10t", num_classes=4)) is None
    # dynamic_img_size at 48 px: 3x3 patches where the grid says 2x2, read from the token count
    dynamic = create(VIT[0], num_classes=4, img_size=32, dynamic_img_size=True).eval()
    for model, side in ((vit, 32), (dynamic, 48)):
        x = torch.randn(2, 3, side, side)
        _, taps = forward_with_taps(model, x, ("blocks.5",))
        official = model.forward_intermediates(x, indices=[5], output_fmt="NCHW", intermediates_only=True)[0]
        torch.testing.assert_close(tokens_to_map(taps["blocks.5"], token_layout(model)), official, rtol=0, atol=0)
    tv = _small_torchvision_vit()
    assert token_layout(tv) == (1, (2, 2)) and default_taps(tv) == ("encoder.layers.encoder_layer_0", "logits")
    x = torch.randn(2, 3, 32, 32)
    _, taps = forward_with_taps(tv.eval(), x, ("conv_proj", "encoder.layers.encoder_layer_0"))
    patches = taps["conv_proj"]  # (B, C, 2, 2), which torchvision flattens row by row after its class token
    assert tokens_to_map(taps["encoder.layers.encoder_layer_0"], token_layout(tv)).shape == patches.shape
    tokens = torch.cat([torch.zeros(2, 1, 32), patches.flatten(2).transpose(1, 2)], 1)
    torch.testing.assert_close(tokens_to_map(tokens, token_layout(tv)), patches, rtol=0, atol=0)


def test_a_vit_that_drops_patches_is_refused_where_its_tokens_would_be_read_as_maps():
    """Patch dropout keeps a random subset of the patches in training: no grid to read them on."""
    from ensemble_kd.ensemble import TeacherSet
    from ensemble_kd.models.tokens import tap_layout

    dropping = create(VIT[0], num_classes=4, patch_drop_rate=0.5, **VIT[1])
    with pytest.raises(ValueError, match=r"drops patches in training \(patch_drop_rate > 0\)"):
        tap_layout(dropping, "blocks.11")
    assert tap_layout(dropping, "logits") is None  # logits need no layout: MEAL on logits alone still works
    meal = create_method("meal", taps=["logits"])
    meal.bind(dropping, TeacherSet([create(VIT[0], num_classes=4, **VIT[1])]), torch.randn(2, 3, 32, 32))


def _aekd_features_step(teachers, student, x):
    """bind, then one step of aekd (features) as the engine takes it: (method, loss)."""
    from ensemble_kd.data.loader import Batch
    from ensemble_kd.ensemble import TeacherSet
    from ensemble_kd.methods import StudentOutput

    teachers = TeacherSet(teachers)
    teachers.prepare_for_inference(fold_bn=True)
    method = create_method("aekd", variant="features")
    method.bind(student, teachers, x)
    logits, taps = forward_with_taps(student, x, method.needs.student_taps)
    y = torch.randint(0, 4, (len(x),))
    out = method.loss(Batch(x, y, torch.arange(len(x))), StudentOutput(logits, taps),
                      teachers.outputs(x, method.needs))
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.logs["hint"] > 0
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in method.parameters())
    return method


def test_aekd_features_hint_a_resnet_student_from_vit_teachers():
    torch.manual_seed(0)
    vits = [create(VIT[0], num_classes=4, **VIT[1]) for _ in range(2)]
    method = _aekd_features_step(vits, create("timm/resnet10t", num_classes=4), torch.randn(4, 3, 32, 32))
    assert (method.student_tap, method.teacher_tap) == ("layer4", "blocks.11")
    assert [(r.conv.in_channels, r.conv.out_channels) for r in method.regressors] == [(512, 192)] * 2


def test_aekd_features_hint_a_vit_student_from_resnet_and_torchvision_vit_teachers():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    method = _aekd_features_step([create("timm/resnet10t", num_classes=4) for _ in range(2)],
                                 create(VIT[0], num_classes=4, **VIT[1]), x)
    assert (method.student_tap, method.teacher_tap) == ("blocks.11", "layer4")
    assert [(r.conv.in_channels, r.conv.out_channels) for r in method.regressors] == [(192, 512)] * 2
    method = _aekd_features_step([_small_torchvision_vit() for _ in range(2)], create(VIT[0], num_classes=4, **VIT[1]), x)
    assert (method.teacher_tap, method.teacher_layouts) == ("encoder.layers.encoder_layer_0", [(1, (2, 2))] * 2)
    assert [(r.conv.in_channels, r.conv.out_channels) for r in method.regressors] == [(192, 32)] * 2


def test_meal_aligns_vit_tokens_over_their_patches():
    from ensemble_kd.data.loader import Batch
    from ensemble_kd.ensemble import TeacherSet
    from ensemble_kd.methods import StudentOutput
    from ensemble_kd.methods.meal import align, spatial

    torch.manual_seed(0)
    teachers = TeacherSet([create(VIT[0], num_classes=4, **VIT[1]) for _ in range(2)])
    student, x = create(VIT[0], num_classes=4, **VIT[1]), torch.randn(4, 3, 32, 32)
    method = create_method("meal")
    method.bind(student, teachers, x)
    assert method.teacher_taps == ("blocks.11", "logits") and method.lengths == [4, 4]  # 2x2 patches, K = 4
    tokens = teachers.outputs(x, method.needs).taps["blocks.11"][0]
    # the class token left out; positions are the patches, the channels reduced, as for a CNN's map
    torch.testing.assert_close(align(spatial(tokens, method.teacher_layouts["blocks.11"], "teachers", "blocks.11"), 4),
                               tokens[:, 1:].mean(-1))
    logits, taps = forward_with_taps(student, x, method.needs.student_taps)
    out = method.loss(Batch(x, torch.randint(0, 4, (4,)), torch.arange(4)), StudentOutput(logits, taps),
                      teachers.outputs(x, method.needs, members=method.teacher_indices(0, 2, 0)))
    out.loss.backward()
    assert torch.isfinite(out.loss) and all(p.grad is not None for p in method.parameters())


SWIN = ("timm/swin_tiny_patch4_window7_224",  # shrunk: 32 px, window 2, one block of width 24 per stage
        {"img_size": 32, "window_size": 2, "depths": (1, 1, 1, 1), "embed_dim": 24, "num_heads": (1, 1, 1, 1)})


def test_channels_last_taps_of_swin_models_are_read_channels_first():
    """timm's and torchvision's Swin keep their maps (B, H, W, C): read as (B, C, H, W) they would
    hint and align height for channels, silently."""
    from ensemble_kd.models.tokens import NHWC, tap_layout, to_map

    swin = create(SWIN[0], num_classes=4, **SWIN[1]).eval()
    assert tap_layout(swin, "layers.2") == NHWC and tap_layout(create("timm/resnet10t", num_classes=4), "layer3") is None
    tv = create("torchvision/swin_t", num_classes=4)
    assert (tap_layout(tv, "features.7"), tap_layout(tv, "avgpool")) == (NHWC, None)  # permuted after features
    x = torch.randn(2, 3, 32, 32)
    _, taps = forward_with_taps(swin, x, ("layers.2",))
    assert taps["layers.2"].shape == (2, 2, 2, 96)
    torch.testing.assert_close(to_map(taps["layers.2"], NHWC), taps["layers.2"].permute(0, 3, 1, 2), rtol=0, atol=0)
    method = _aekd_features_step([create(SWIN[0], num_classes=4, **SWIN[1]) for _ in range(2)],
                                 create("timm/resnet10t", num_classes=4), x)
    assert method.teacher_tap == "layers.3"  # (B, 1, 1, 192): read channels-first, 192 channels, not 1
    assert [(r.conv.in_channels, r.conv.out_channels) for r in method.regressors] == [(512, 192)] * 2
    from ensemble_kd.ensemble import TeacherSet

    meal = create_method("meal", taps=["layers.2", "logits"])
    meal.bind(create(SWIN[0], num_classes=4, **SWIN[1]), TeacherSet([swin]), x)
    assert meal.lengths == [4, 4]  # 2x2 positions of a 96-channel map, not 2x96


def test_ecosystem_methods_script_prints_a_row_per_family(capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "ecosystem_methods.py"
    spec = importlib.util.spec_from_file_location("ecosystem_methods", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--families", "timm/resnet10t", "--methods", "kd,aver", "--size", "16"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| timm/")]
    assert rows == ["| timm/resnet10t | works | works |"]


def test_fast_teachers_fold_timms_batchnorm_act_and_keep_its_activation():
    """timm's EfficientNet/MobileNetV3/`ts` ResNets put BN, dropout and activation in one module
    (BatchNormAct2d): folded, its activation must stay; a conv with a forward of its own (weight
    standardisation) must not be folded into."""
    from ensemble_kd.ensemble.teacher_set import fold_batchnorm

    x = torch.randn(2, 3, 32, 32)
    for arch in ("timm/mobilenetv3_small_050", "timm/resnext26ts"):
        torch.manual_seed(0)
        model = create(arch, num_classes=4).train()
        with torch.no_grad():
            model(x)  # running statistics away from 0 and 1
        model.eval()
        folded = fold_batchnorm(model)
        assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
        bn_acts = [(path, m) for path, m in model.named_modules() if type(m).__name__ == "BatchNormAct2d"]
        assert bn_acts
        for path, bn in bn_acts:  # what stays at the BN's path: its dropout and activation
            kept = folded.get_submodule(path)
            assert isinstance(kept, nn.Sequential) and type(kept[1]) is type(bn.act)
        with torch.no_grad():
            torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-5)

    class StandardisedConv(nn.Conv2d):
        def forward(self, x):
            w = (self.weight - self.weight.mean((1, 2, 3), keepdim=True)) / (self.weight.std((1, 2, 3), keepdim=True) + 1e-5)
            return F.conv2d(x, w, self.bias, self.stride, self.padding)

    net = nn.Sequential(StandardisedConv(3, 4, 3), nn.BatchNorm2d(4)).eval()
    net[1].running_mean.fill_(0.5)
    folded = fold_batchnorm(net)
    assert isinstance(folded[1], nn.BatchNorm2d)
    torch.testing.assert_close(folded(x), net(x))
