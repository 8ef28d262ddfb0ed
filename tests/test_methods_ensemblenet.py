"""EnsembleNet (METHODS.md §2): the multi-head builder, both loss structures, the ensemblers."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from ensemble_kd import pipeline
from ensemble_kd.config import load_config
from ensemble_kd.data.loader import Batch
from ensemble_kd.methods import StudentOutput, create_method
from ensemble_kd.methods.ensemblenet import Probs, codistillation_loss, ensembling_loss, pair_loss
from ensemble_kd.metrics.cost import count_flops, count_parameters
from ensemble_kd.models import create, forward_with_taps, register_model


def _random(N=3, B=5, K=4, seed=0):
    torch.manual_seed(seed)
    z = torch.randn(N, B, K, requires_grad=True)
    y = torch.randint(0, K, (B,))
    return z, F.one_hot(y, K).float(), y


# --------------------------------------------------------------------------- the losses
@pytest.mark.parametrize("lam", [-1.5, -0.5, 0.0, 0.3, 1.0])
def test_appendix_a1_ensembling_at_lambda_is_codistillation_at_one_minus_lambda(lam):
    z, g, _ = _random()
    ens, _ = ensembling_loss(Probs.of_logits(z), g, lam, "l2")
    codist, _ = codistillation_loss(Probs.of_logits(z), g, 1 - lam, "l2", stop_gradient=False)
    torch.testing.assert_close(ens, codist)
    (g_ens,) = torch.autograd.grad(ens, z)
    (g_co,) = torch.autograd.grad(codist, z)
    torch.testing.assert_close(g_ens, g_co)


def test_appendix_a1_holds_for_any_probabilities_not_only_softmax_outputs():
    torch.manual_seed(1)
    p = torch.rand(4, 6, 5)  # not normalised: the identity is algebra, not probability
    g = torch.rand(6, 5)
    branches = Probs(p.log())
    for lam in (-2.0, 0.25):
        ens, _ = ensembling_loss(branches, g, lam, "l2")
        codist, _ = codistillation_loss(branches, g, 1 - lam, "l2", stop_gradient=False)
        torch.testing.assert_close(ens, codist)


def test_the_losses_by_hand_with_cross_entropy():
    z, g, y = _random(N=2)
    p = z.softmax(-1)
    p_ens = p.mean(0)
    own = sum(F.nll_loss(p[i].log(), y) for i in range(2))
    ens_term = F.nll_loss(p_ens.log(), y)
    total, logs = ensembling_loss(Probs.of_logits(z), g, -0.5, "ce")
    torch.testing.assert_close(total, 1.5 * own + 2 * -0.5 * ens_term)
    torch.testing.assert_close(logs["ensemble"], ens_term.detach())
    aux = sum(-(p_ens * p[i].log()).sum(-1).mean() for i in range(2))
    total, _ = codistillation_loss(Probs.of_logits(z), g, 3.0, "ce")
    torch.testing.assert_close(total, 3.0 * aux + 2 * ens_term)


def test_stop_gradient_keeps_the_auxiliary_terms_off_p_ens():
    z, g, _ = _random()
    total, _ = codistillation_loss(Probs.of_logits(z), g, 2.0, "ce", stop_gradient=True)
    (got,) = torch.autograd.grad(total, z)
    # the same loss with p_ens in the auxiliary terms replaced by a constant tensor
    branches = Probs.of_logits(z)
    constant = branches.mix().p.detach().clone()
    reference = 2.0 * sum(pair_loss(constant, branches[i]) for i in range(3)) + 3 * pair_loss(g, branches.mix())
    (expected,) = torch.autograd.grad(reference, z)
    torch.testing.assert_close(got, expected)
    free, _ = codistillation_loss(Probs.of_logits(z), g, 2.0, "ce", stop_gradient=False)
    (without,) = torch.autograd.grad(free, z)
    assert not torch.allclose(got, without)  # the stop-gradient changes something


def test_gate_turns_the_ensemble_factor_into_a_gradient_multiplier():
    z, g, _ = _random()
    weights = torch.softmax(torch.randn(5, 3), -1).requires_grad_()
    lam = -0.5
    total, logs = ensembling_loss(Probs.of_logits(z), g, lam, "ce", weights)
    own = sum(pair_loss(g, Probs.of_logits(z)[i]) for i in range(3))
    torch.testing.assert_close(total, (1 - lam) * own + logs["ensemble"])  # the term enters with weight 1
    grad_z, grad_w = torch.autograd.grad(total, [z, weights])
    # by hand: the ensemble term's gradient reaches the branches times N·λ, the gate times 1
    ens = pair_loss(g, Probs.of_logits(z).mix(weights))
    g_ens_z, g_ens_w = torch.autograd.grad(ens, [z, weights])
    (g_own_z,) = torch.autograd.grad((1 - lam) * own, z)
    torch.testing.assert_close(grad_z, g_own_z + 3 * lam * g_ens_z)
    torch.testing.assert_close(grad_w, g_ens_w)


def test_multilabel_losses_use_the_binary_cross_entropy():
    torch.manual_seed(2)
    z = torch.randn(2, 4, 3)
    g = torch.randint(0, 2, (4, 3)).float()
    branches = Probs.of_logits(z, multilabel=True)
    torch.testing.assert_close(pair_loss(g, branches[0]),
                               F.binary_cross_entropy_with_logits(z[0], g, reduction="sum") / 4)
    p_ens = torch.sigmoid(z).mean(0)
    torch.testing.assert_close(pair_loss(g, branches.mix()), F.binary_cross_entropy(p_ens, g, reduction="sum") / 4)


# --------------------------------------------------------------------------- the builder
@pytest.mark.parametrize("base, kwargs, fork", [("small_cnn", {"width": 0.5}, None), ("resnet20", {}, "layer2"),
                                                ("wrn16_2", {}, None), ("resnet32", {}, "layer3")])
def test_builder_shapes_and_parameter_budget(base, kwargs, fork):
    baseline = create(base, num_classes=10, in_channels=1, **kwargs)
    net = create("multihead", num_classes=10, in_channels=1, base=base, base_kwargs=kwargs, fork=fork)
    at = baseline.tap_points.index(fork or baseline.tap_points[-1])
    assert len(net.branches) == 2 and net.shared_points == baseline.tap_points[:at]
    assert net.branch_widths[:at] == baseline.stage_channels[:at]
    assert all(w < b for w, b in zip(net.branch_widths[at:], baseline.stage_channels[at:]))
    assert 1.3 <= net.width_factor <= 1.6  # the paper's ≈1.5 for two branches
    assert count_parameters(net) <= count_parameters(baseline)
    assert count_parameters(net) > 0.9 * count_parameters(baseline)  # the smallest factor that fits
    assert count_flops(net, (1, 16, 16)) <= 1.05 * count_flops(baseline, (1, 16, 16))
    x = torch.randn(3, 1, 16, 16)
    z, weights = net.forward_branches(x)
    assert z.shape == (2, 3, 10) and weights is None
    torch.testing.assert_close(net(x).exp(), z.softmax(-1).mean(0))  # log p_ens: one pass, softmax gives p_ens
    assert not any(name.startswith(("trunk.fc", "branches.0.conv1", "branches.0.layer1")) and at > 0
                   for name, _ in net.named_parameters())  # the shared part lives once, in the trunk
    again = create(**net.spec)
    again.load_state_dict(net.state_dict())  # a plain checkpoint rebuilds it


@register_model("test_pretrained_stages")
def _pretrained_stages(num_classes=10, in_channels=3, widths=None, pretrained=False):
    net = create("small_cnn", num_classes=num_classes, in_channels=in_channels, width=0.25, widths=widths)
    if pretrained:  # the 'library weights': a constant, no download in a test
        with torch.no_grad():
            for p in net.parameters():
                p.fill_(0.01)
    return net


def test_a_pretrained_base_fills_the_shared_stages_and_the_branches_start_fresh():
    net = create("multihead", num_classes=3, in_channels=1, base="test_pretrained_stages", pretrained=True)
    assert "pretrained" not in net.spec  # the checkpoint carries the weights
    assert all(torch.all(p == 0.01) for p in net.trunk.parameters())
    assert not any(torch.all(p == 0.01) for n, p in net.branches.named_parameters() if n.endswith("weight")
                   and p.dim() > 1)


def test_more_branches_an_explicit_width_and_the_gate():
    net = create("multihead", num_classes=5, in_channels=1, base="small_cnn", branches=3, fork="layer2",
                 width_factor=2.0, ensembler="gate")
    assert net.branch_widths == (32, 32, 64)
    x = torch.randn(4, 1, 8, 8)
    logits, taps = forward_with_taps(net, x, ("heads", "ensembler"))
    assert taps["heads"].shape == (3, 4, 5) and taps["ensembler"].shape == (4, 3)
    torch.testing.assert_close(taps["ensembler"].sum(-1), torch.ones(4))
    expected = (taps["heads"].softmax(-1) * taps["ensembler"].T[..., None]).sum(0)
    torch.testing.assert_close(logits.exp(), expected)
    with pytest.raises(ValueError, match="fork must be one of"):
        create("multihead", base="small_cnn", fork="layer9")
    with pytest.raises(ValueError, match="does not expose its stages"):
        create("multihead", base="mlp")
    with pytest.raises(ValueError, match="fork after the first stage"):
        create("multihead", base="small_cnn", fork="layer1", ensembler="gate")


def test_method_builds_the_student_and_reads_its_heads():
    method = create_method("ensemblenet", branches=3, ensembler="gate", fork="layer2")
    arch, kwargs = method.student_spec("small_cnn", {"width": 0.5})
    assert arch == "multihead" and kwargs == {"base": "small_cnn", "base_kwargs": {"width": 0.5}, "branches": 3,
                                              "fork": "layer2", "ensembler": "gate"}
    net = create(arch, num_classes=4, in_channels=1, **kwargs)
    method.bind(net)
    assert method.needs.student_taps == ("heads", "ensembler") and not method.needs.teachers
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 4, (6,))
    logits, taps = forward_with_taps(net, x, method.needs.student_taps)
    out = method.loss(Batch(x, y, torch.arange(6)), StudentOutput(logits, taps), None)
    out.loss.backward()
    assert all(p.grad is not None for p in net.parameters())  # every branch and the gate learn
    with pytest.raises(ValueError, match="multi-headed"):
        method.bind(create("small_cnn"))
    for options, match in [({"structure": "both"}, "structure"), ({"loss": "kl"}, "loss"),
                           ({"branches": 0}, "branches"), ({"mu": float("nan")}, "mu")]:
        with pytest.raises(ValueError, match=match):
            create_method("ensemblenet", **options)


# --------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("options", [{}, {"structure": "ensembling", "lam": -0.5, "ensembler": "gate",
                                          "fork": "layer2"}])
def test_ensemblenet_trains_end_to_end_on_digits(tmp_path, options):
    config = load_config(None, ["data.batch_size=64", "student.kwargs={width: 0.25}", "student.train.epochs=6",
                                "student.train.log_every=10", "method.name=ensemblenet", "device=cpu",
                                f"method.options={json.dumps(options)}"])
    data = pipeline.prepare_data(config)
    method, _ = pipeline.prepare_distill(config, data)
    model, _ = pipeline.distill(config, tmp_path, data=data, method=method)
    assert model.spec["name"] == "multihead" and model.spec["base"] == "small_cnn"
    model.eval()
    correct = sum(int((model(b.x).argmax(1) == b.y).sum()) for b in data.test.batches(0))
    assert correct / len(data.splits.test) > 0.88  # the student alone reaches about 92% on this budget
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any("train_ensemble" in r for r in records)
    loaded = create(**model.spec)
    loaded.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))


def test_ensemblenet_trains_on_generated_video_features_and_reports_gap_and_map(tmp_path):
    """DBoF forked after pooling: two branches of hidden layer + MoE, multi-label BCE, GAP@20 and mAP."""
    config = load_config(None, ["data.name=video-synthetic", "student.arch=dbof",
                                "student.kwargs={cluster_size: 64, hidden_size: 32}", "method.name=ensemblenet",
                                "student.train.epochs=3", "data.batch_size=128", "device=cpu",
                                "student.train.optim={name: adamw, lr: 0.03}"])
    data = pipeline.prepare_data(config)
    assert data.splits.num_classes == 20 and data.splits.in_channels == 32
    method, _ = pipeline.prepare_distill(config, data)
    model, _ = pipeline.distill(config, tmp_path, data=data, method=method)
    assert model.multilabel and model.shared_points == ("frames",) and model.branch_points == ("hidden",)
    (row,) = pipeline.evaluate_student(config, model, data)
    assert row["map"] > 0.2 and row["gap"] > 0.15  # chance: about 0.11 mAP (2 labels of 20 per item)
    assert row["flops"] > 0 and row["params"] <= count_parameters(create("dbof", num_classes=20, in_channels=32,
                                                                         cluster_size=64, hidden_size=32))
