"""timm and torchvision networks as EnsembleNet's multi-headed and LatentBE's BatchEnsemble students.

Small members of each family keep this quick on 2 CPU cores: timm's resnet10t, torchvision's
resnet18, mobilenet_v2 at width 0.25, 32x32 inputs.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from ensemble_kd.cli import main
from ensemble_kd.data.loader import Batch
from ensemble_kd.methods import StudentOutput, create_method
from ensemble_kd.metrics.cost import count_parameters
from ensemble_kd.models import create, forward_with_taps
from ensemble_kd.models.batchensemble import collapse

sys.path.insert(0, str(Path(__file__).parent))
from _images import make_image_folder  # noqa: E402

timm = pytest.importorskip("timm")
tv_models = pytest.importorskip("torchvision.models")

RESNETS = ["timm/resnet10t", "torchvision/resnet18"]


def _library_model(name: str, num_classes: int, **kwargs):
    """The library's own constructor, by hand: what a user's code would call."""
    source, arch = name.split("/")
    if source == "timm":
        return timm.create_model(arch, num_classes=num_classes, **kwargs)
    return getattr(tv_models, arch)(num_classes=num_classes, **kwargs)


# --------------------------------------------------------------------------- EnsembleNet's multi-head builder
@pytest.mark.parametrize("name", RESNETS)
def test_multihead_over_a_library_resnet_stays_within_the_base_and_runs_one_training_step(name):
    torch.manual_seed(0)
    base = create(name, num_classes=10)
    net = create("multihead", num_classes=10, base=name)
    assert net.shared_points == ("layer1", "layer2", "layer3") and net.branch_points == ("layer4",)
    assert net.branch_widths[:3] == (64, 128, 256) and net.branch_widths[3] < 512  # layer4 shrunk
    assert 0.9 * count_parameters(base) < count_parameters(net) <= count_parameters(base)
    assert type(net.branches[0].layer4[0]) is type(base.layer4[0])  # the library's own blocks
    method = create_method("ensemblenet")
    method.bind(net)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    losses = []
    for _ in range(2):
        logits, taps = forward_with_taps(net, x, method.needs.student_taps)
        assert logits.shape == (4, 10) and taps["heads"].shape == (2, 4, 10)
        loss = method.loss(Batch(x, y, torch.arange(4)), StudentOutput(logits, taps), None).loss
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None for p in net.parameters())  # both branches and the trunk learn
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[1] < losses[0]
    again = create(**net.spec)
    again.load_state_dict(net.state_dict())  # a plain checkpoint rebuilds it


@pytest.mark.parametrize("name", RESNETS)
def test_one_full_width_branch_is_the_library_network_itself(name):
    """Stem, stages and head run as the library's forward does: same weights, same logits."""
    torch.manual_seed(1)
    base = _library_model(name, 6).eval()
    net = create("multihead", num_classes=6, base=name, branches=1, width_factor=1.0).eval()
    upper = ("layer4.", "fc.")
    state = {(f"branches.0.{k}" if k.startswith(upper) else f"trunk.{k}"): v for k, v in base.state_dict().items()}
    net.load_state_dict(state)  # strict: the same modules, split into trunk and branch
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(net(x), base(x).log_softmax(-1))


def test_multihead_forks_a_torchvision_resnet_earlier_with_the_gate():
    net = create("multihead", num_classes=5, base="torchvision/resnet18", fork="layer3", ensembler="gate", branches=3)
    assert net.branch_points == ("layer3", "layer4") and all(w < b for w, b in zip(net.branch_widths[2:], (256, 512)))
    assert count_parameters(net) <= count_parameters(create("torchvision/resnet18", num_classes=5))
    logits, taps = forward_with_taps(net.eval(), torch.randn(2, 3, 32, 32), ("heads", "ensembler"))
    assert taps["heads"].shape == (3, 2, 5) and taps["ensembler"].shape == (2, 3)


def test_multihead_over_timms_convnext_narrows_its_last_stage_within_the_base():
    """ConvNeXt's stages live in a container (stages.0..3): the trunk keeps 0..2, each branch is timm's
    own ConvNeXt with narrower dims for stages.3 and its head, within the base's parameters."""
    torch.manual_seed(0)
    base = create("timm/convnext_atto", num_classes=5)
    net = create("multihead", num_classes=5, base="timm/convnext_atto", branches=2)
    assert net.shared_points == ("stages.0", "stages.1", "stages.2") and net.branch_points == ("stages.3",)
    assert net.branch_widths[:3] == (40, 80, 160) and net.branch_widths[3] < 320
    assert 0.9 * count_parameters(base) < count_parameters(net) <= count_parameters(base)
    assert not any(k.startswith(("stages.3.", "head.")) for k in net.trunk.state_dict())
    assert not any(k.startswith(("stem.", "stages.0.")) for k in net.branches[0].state_dict())
    method = create_method("ensemblenet")
    method.bind(net)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 5, (4,))
    logits, taps = forward_with_taps(net, x, method.needs.student_taps)
    method.loss(Batch(x, y, torch.arange(4)), StudentOutput(logits, taps), None).loss.backward()
    assert all(p.grad is not None for p in net.parameters())
    one = create("multihead", num_classes=5, base="timm/convnext_atto", branches=1, width_factor=1.0).eval()
    library = _library_model("timm/convnext_atto", 5).eval()
    upper = ("stages.3.", "head.")
    one.load_state_dict({(f"branches.0.{k}" if k.startswith(upper) else f"trunk.{k}"): v
                         for k, v in library.state_dict().items()})  # strict: the same modules, split
    torch.testing.assert_close(one(x), library(x).log_softmax(-1))


def test_networks_without_resnet_stages_are_refused_in_one_sentence():
    with pytest.raises(ValueError, match=r"'torchvision/mobilenet_v2' does not expose its stages .* ResNets have them"):
        create("multihead", base="torchvision/mobilenet_v2")
    with pytest.raises(ValueError, match="replace_stride_with_dilation cannot be rebuilt"):
        create("multihead", base="torchvision/resnet50", width_factor=2.0,
               base_kwargs={"replace_stride_with_dilation": [False, False, True]})


# --------------------------------------------------------------------------- LatentBE's BatchEnsemble and collapse
GROUPED = [("torchvision/mobilenet_v2", {"width_mult": 0.25}),  # depthwise convs
           ("timm/mobilenetv3_small_050", {}),  # depthwise convs, squeeze-excite, timm's Linear head
           ("timm/convnext_atto", {}),  # 7x7 depthwise convs, Linear layers on channels-last maps
           ("timm/vit_tiny_patch16_224", {"img_size": 32, "depth": 2}),  # Linear layers on tokens
           ("timm/swin_tiny_patch4_window7_224", {"img_size": 32, "window_size": 2, "depths": (1, 1, 1, 1),
                                                  "embed_dim": 24, "num_heads": (1, 1, 1, 1)})]  # window attention


@pytest.mark.parametrize("name,kwargs", [(n, {}) for n in RESNETS] + GROUPED)
def test_batchensemble_collapses_into_a_state_dict_the_library_loads_unchanged(name, kwargs):
    torch.manual_seed(2)
    be = create("batchensemble", num_classes=5, base=name, members=3, init="normal", base_kwargs=kwargs)
    x = torch.randn(2, 3, 32, 32)
    be.train()
    be(x).logsumexp(-1).sum().backward()  # BatchNorm statistics away from their defaults
    skipped = [path for path, layer in be.be_layers() if layer.r.grad is None or layer.s.grad is None]
    assert not skipped, f"factors no forward uses (a parent reading the weight itself?): {skipped[:3]}"
    be.eval()
    members = be.forward_members(x)
    assert members.shape == (3, 2, 5) and not torch.allclose(members[0], members[1])  # the factors differ
    collapsed = collapse(be).eval()
    plain = _library_model(name, 5, **kwargs).eval()
    plain.load_state_dict(collapsed.state_dict())  # strict, into the library's own class
    assert type(plain) is type(collapsed)
    torch.testing.assert_close(plain(x), collapsed(x))


@pytest.mark.parametrize("name,kwargs", [("timm/resnet10t", {})] + GROUPED)
def test_a_fresh_batchensemble_of_a_library_network_collapses_to_that_network(name, kwargs):
    """All factors 1: every member and the collapse are the base network (exact)."""
    torch.manual_seed(3)
    reference = create(name, num_classes=4, **kwargs).eval()
    torch.manual_seed(3)  # the BE builder creates the base first; "ones" draws nothing
    be = create("batchensemble", num_classes=4, base=name, members=2, base_kwargs=kwargs).eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(collapse(be).eval()(x), reference(x))
    torch.testing.assert_close(be.forward_members(x), reference(x).expand(2, -1, -1))


def test_a_conv_with_its_own_forward_is_refused_by_path():
    with pytest.raises(ValueError, match=r"cannot make layer 'conv_stem' a BatchEnsemble layer: it is a Conv2dSame"):
        create("batchensemble", base="timm/tf_mobilenetv3_small_minimal_100", members=2)


def test_a_layer_whose_parent_passes_its_weight_on_is_refused_by_path():
    """torchvision's Swin attention hands qkv.weight to a function: converted, its factors would be
    silently skipped (every member the same network, r and s without gradients)."""
    with pytest.raises(ValueError, match=r"layer 'features.1.0.attn.qkv' .*: its ShiftedWindowAttention reads "
                                         r"its weight directly"):
        create("batchensemble", base="torchvision/swin_t", members=2)


# --------------------------------------------------------------------------- end to end, by name
def test_distill_ensemblenet_and_latentbe_students_named_by_library(tmp_path):
    folder = make_image_folder(tmp_path / "images", per_class=6, test_per_class=2, sizes=(16, 16), modes=("RGB",))
    common = ["data.name=image-folder", f"data.root={folder}", "data.batch_size=8", "device=cpu",
              f"run.dir={tmp_path}", "eval.latency=false", "student.kwargs={}", "student.train.epochs=1"]
    assert main(["distill", "method.name=ensemblenet", "student.arch=timm/resnet10t", "run.name=enet", *common]) == 0
    net = create("multihead", num_classes=3, base="timm/resnet10t")
    net.load_state_dict(torch.load(tmp_path / "enet" / "model.pt", weights_only=True))

    assert main(["train-teachers", "teachers.count=2", "teachers.kwargs={width: 0.25}", "teachers.train.epochs=1",
                 "run.name=teachers", *common]) == 0
    assert main(["distill", "method.name=latentbe", "student.arch=torchvision/resnet18", "run.name=lbe",
                 f"teachers.source={tmp_path / 'teachers'}", *common]) == 0
    plain = tv_models.resnet18(num_classes=3)
    plain.load_state_dict(torch.load(tmp_path / "lbe" / "collapsed.pt", weights_only=True))  # the library's own
