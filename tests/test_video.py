"""Tests for the video variant: multi-label metrics, DBoF and its parts, the frame-feature data."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score
from torch import nn

from ensemble_kd.data.video import VideoDataset, VideoLoader, load_video_npz, make_video_dataset, save_video_npz
from ensemble_kd.metrics.multilabel import global_average_precision, mean_average_precision
from ensemble_kd.models.registry import create
from ensemble_kd.models.video import ContextGating, DBoF, MoEClassifier, frame_mask, swap

# ----------------------------------------------------------------------------- metrics

# Three items, four classes; class 3 has no positive.
SCORES = np.array([[0.9, 0.2, 0.6, 0.05], [0.3, 0.8, 0.1, 0.5], [0.2, 0.4, 0.7, 0.15]])
LABELS = np.array([[1, 0, 1, 0], [0, 0, 1, 0], [1, 1, 0, 0]])


def test_gap_hand_case():
    # P = 5 positives in all. top 2 per item: item0 0.9(+) 0.6(+), item1 0.8(-) 0.5(-), item2 0.7(-) 0.4(+).
    # Pooled ranking 0.9+ 0.8- 0.7- 0.6+ 0.5- 0.4+: precision at the hits 1/1, 2/4, 3/6 -> (1 + .5 + .5) / 5.
    assert global_average_precision(SCORES, LABELS, top_k=2) == pytest.approx(0.4)
    # top 1: 0.9+ 0.8- 0.7- -> 1/1 / 5; the positives left out still count in P.
    assert global_average_precision(torch.tensor(SCORES), torch.tensor(LABELS), top_k=1) == pytest.approx(0.2)


def test_gap_with_every_class_kept_is_micro_average_precision():
    rng = np.random.default_rng(0)
    scores, labels = rng.random((40, 6)), (rng.random((40, 6)) < 0.3).astype(int)
    expected = average_precision_score(labels.ravel(), scores.ravel())
    assert global_average_precision(scores, labels, top_k=6) == pytest.approx(expected)
    assert global_average_precision(scores, labels, top_k=100) == pytest.approx(expected)  # k is capped at C


def test_map_hand_case():
    # class 0: 0.9+ 0.3- 0.2+ -> (1/1 + 2/3) / 2 = 5/6
    # class 1: 0.8- 0.4+ 0.2- -> (1/2) / 1     = 1/2
    # class 2: 0.7- 0.6+ 0.1+ -> (1/2 + 2/3) / 2 = 7/12
    # class 3: no positive, skipped.   mean = (10 + 6 + 7) / 12 / 3 = 23/36
    assert mean_average_precision(SCORES, LABELS) == pytest.approx(23 / 36)


def test_map_matches_sklearn_on_random_data():
    rng = np.random.default_rng(1)
    scores, labels = rng.random((60, 8)), (rng.random((60, 8)) < 0.25).astype(np.float32)
    labels[:, 7] = 0  # a class without positives is skipped, as sklearn's per-class loop below does
    expected = np.mean([average_precision_score(labels[:, c], scores[:, c]) for c in range(7)])
    assert mean_average_precision(torch.tensor(scores), torch.tensor(labels)) == pytest.approx(expected)


def test_multilabel_metrics_reject_bad_input():
    assert global_average_precision(SCORES, np.zeros_like(LABELS)) == 0.0
    with pytest.raises(ValueError, match="no class has a positive"):
        mean_average_precision(SCORES, np.zeros_like(LABELS))
    with pytest.raises(ValueError, match="must match"):
        global_average_precision(SCORES, LABELS[:2])
    with pytest.raises(ValueError, match="multi-hot"):
        mean_average_precision(SCORES, LABELS * 2)
    with pytest.raises(ValueError, match=r"shape \(N, C\)"):
        mean_average_precision(SCORES[0], LABELS[0])
    with pytest.raises(ValueError, match="top_k"):
        global_average_precision(SCORES, LABELS, top_k=0)


# ----------------------------------------------------------------------------- model parts


def test_swap_hand_case():
    # frames (T=4, D=2): [1, -2], [3, 0], [5, 4] (masked out), [0, 0] (a valid zero frame)
    x = torch.tensor([[[1.0, -2.0], [3.0, 0.0], [5.0, 4.0], [0.0, 0.0]]])
    mask = torch.tensor([[True, True, False, True]])
    # feature 0: (1*1 + 3*3) / (1 + 3) = 2.5;  feature 1: (2*-2 + 0*0) / (2 + 0) = -2
    torch.testing.assert_close(swap(x, mask), torch.tensor([[2.5, -2.0]]))
    # no mask: (1 + 9 + 25 + 0) / (1 + 3 + 5) = 35/9;  (-4 + 0 + 16) / (2 + 0 + 4) = 2
    torch.testing.assert_close(swap(x), torch.tensor([[35 / 9, 2.0]]))
    assert swap(torch.zeros(2, 3, 4)).abs().max() == 0  # all-zero features pool to 0, not NaN
    with pytest.raises(ValueError, match="mask must have shape"):
        swap(x, mask[:, :2])


def test_context_gating_hand_case():
    gating = ContextGating(2)
    with torch.no_grad():
        gating.linear.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 0.0]]))
        gating.linear.bias.zero_()
    # W x = [0, ln 3] -> gates sigmoid = [1/2, 3/4] -> y = [ln 3 / 2, 2 * 3/4]
    torch.testing.assert_close(gating(torch.tensor([[math.log(3), 2.0]])), torch.tensor([[math.log(3) / 2, 1.5]]))


def test_moe_hand_case_and_dummy_expert():
    moe = MoEClassifier(1, num_classes=2, num_experts=2)
    with torch.no_grad():
        # class-major units: gates c*(E+1)+e (e = 2 is the dummy), experts c*E+e
        moe.gate.weight.copy_(torch.tensor([[0.0], [0.0], [0.0], [0.0], [0.0], [math.log(2)]]))
        moe.experts.weight.copy_(torch.tensor([[0.0], [math.log(3)], [math.log(3)], [math.log(3)]]))
        moe.experts.bias.zero_()
    # class 0: gates 1/3 each, experts sigmoid(0, ln 3) = 1/2, 3/4 -> (1/2 + 3/4) / 3 = 5/12
    # class 1: gates softmax(0, 0, ln 2) = 1/4, 1/4, 1/2 (dummy), experts 3/4, 3/4 -> 2 * 1/4 * 3/4 = 3/8
    torch.testing.assert_close(moe(torch.ones(1, 1)), torch.tensor([[5 / 12, 3 / 8]]))
    with torch.no_grad():
        moe.gate.weight[5] = 50.0  # the gate puts all its weight on the dummy: p_1 -> 0 whatever the experts say
    assert moe(torch.ones(1, 1))[0, 1] < 1e-12


# ----------------------------------------------------------------------------- DBoF


def _frames(b: int = 4, t: int = 6, d: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, t, d, generator=g)
    x[0, 3:] = 0  # item 0 has 3 frames, the others 6
    return x


@pytest.mark.parametrize("pooling", ["swap", "max", "avg"])
def test_dbof_shapes_stages_and_gradients(pooling):
    model = DBoF(5, 8, cluster_size=12, hidden_size=7, pooling=pooling)
    x = _frames()
    logits = model(x)
    assert logits.shape == (4, 5) and model.multilabel
    probs = torch.sigmoid(logits)
    assert bool(((probs > 0) & (probs < 1)).all())
    h1 = model.frames(model.forward_stem(x))
    h2 = model.hidden(h1)
    assert h1.shape == (4, 12) and h2.shape == (4, 7) and model.stage_channels == (12, 7)
    assert model.tap_points == ("frames", "hidden")
    torch.testing.assert_close(model.forward_head(h2), logits)
    logits.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_dbof_logits_invert_the_moe_probabilities():
    model = DBoF(3, 8, cluster_size=6, hidden_size=4).eval()
    h = model.hidden(model.frames(_frames()))
    torch.testing.assert_close(torch.sigmoid(model.forward_head(h)), model.classifier(h))


@pytest.mark.parametrize("pooling", ["swap", "max", "avg"])
def test_dbof_output_ignores_zero_padding(pooling):
    torch.manual_seed(0)
    model = DBoF(5, 8, cluster_size=12, hidden_size=7, pooling=pooling)
    x = _frames()
    padded = torch.cat([x, torch.zeros(4, 5, 8)], dim=1)
    # Train mode too: the clustering BatchNorm only sees valid frames, so its batch statistics agree.
    torch.testing.assert_close(model(padded), model(x))
    model.eval()
    torch.testing.assert_close(model(padded), model(x))


def test_dbof_widths_registry_and_errors():
    model = create("dbof", num_classes=4, in_channels=8, widths=(10, 6))
    assert isinstance(model, DBoF) and model.stage_channels == (10, 6)
    assert model(_frames()).shape == (4, 4)
    with pytest.raises(ValueError, match=r"\(B, T, 8\)"):
        model(torch.randn(2, 3, 9))
    with pytest.raises(ValueError, match="pooling"):
        DBoF(4, 8, pooling="sum")
    with pytest.raises(ValueError, match="widths"):
        DBoF(4, 8, widths=(10,))


# ----------------------------------------------------------------------------- data


def test_generator_shapes_padding_and_determinism():
    ds = make_video_dataset(64, num_classes=10, feature_dim=6, max_frames=12, min_frames=4, seed=3)
    assert ds.features.shape == (64, 12, 6) and ds.labels.shape == (64, 10) and len(ds) == 64
    assert int(ds.num_frames.min()) >= 4 and int(ds.num_frames.max()) <= 12
    per_item = ds.labels.sum(1)
    assert bool(((per_item >= 1) & (per_item <= 3)).all())
    # the model's padding rule recovers each item's frame count
    assert torch.equal(frame_mask(ds.features).sum(1), ds.num_frames)
    again = make_video_dataset(64, num_classes=10, feature_dim=6, max_frames=12, min_frames=4, seed=3)
    assert torch.equal(again.features, ds.features) and torch.equal(again.labels, ds.labels)
    other = make_video_dataset(64, num_classes=10, feature_dim=6, max_frames=12, min_frames=4, seed=4)
    assert not torch.equal(other.features, ds.features)


def test_video_dataset_validation():
    ds = make_video_dataset(4, num_classes=3, feature_dim=2, max_frames=5, min_frames=2)
    with pytest.raises(ValueError, match="zero after"):
        VideoDataset(ds.features, ds.num_frames - 1, ds.labels)
    with pytest.raises(ValueError, match="multi-hot"):
        VideoDataset(ds.features, ds.num_frames, ds.labels * 2)
    with pytest.raises(ValueError, match="num_frames must be in"):
        VideoDataset(ds.features, torch.zeros(4, dtype=torch.int64), ds.labels)
    with pytest.raises(ValueError, match="one row per item"):
        VideoDataset(ds.features, ds.num_frames[:3], ds.labels)
    sub = ds.subset([2, 0])
    assert torch.equal(sub.labels, ds.labels[[2, 0]])


def test_npz_round_trip_and_errors(tmp_path):
    ds = make_video_dataset(10, num_classes=4, feature_dim=3, max_frames=6, min_frames=2)
    path = tmp_path / "videos.bin"
    save_video_npz(ds, path)
    assert path.exists()  # written under exactly the given name
    back = load_video_npz(path)
    for key in ("features", "num_frames", "labels"):
        assert torch.equal(getattr(back, key), getattr(ds, key))
    with pytest.raises(FileNotFoundError):
        load_video_npz(tmp_path / "missing.npz")
    arrays = {"features": ds.features.numpy(), "num_frames": ds.num_frames.numpy(), "labels": ds.labels.numpy()}
    np.savez(tmp_path / "nolabels.npz", features=arrays["features"], num_frames=arrays["num_frames"])
    with pytest.raises(ValueError, match="lacks the array"):
        load_video_npz(tmp_path / "nolabels.npz")
    np.savez(tmp_path / "flat.npz", **{**arrays, "features": arrays["features"][:, 0]})
    with pytest.raises(ValueError, match=r"\(N, T, D\)"):
        load_video_npz(tmp_path / "flat.npz")
    noisy = arrays["features"].copy()
    noisy[:, -1] = 1.0
    np.savez(tmp_path / "noisy.npz", **{**arrays, "features": noisy, "num_frames": np.full(10, 5)})
    with pytest.raises(ValueError, match="zero after"):
        load_video_npz(tmp_path / "noisy.npz")


def test_loader_order_sharding_resume_and_trim():
    ds = make_video_dataset(10, num_classes=4, feature_dim=3, max_frames=8, min_frames=1, seed=2)
    evaluate = VideoLoader(ds, batch_size=4, train=False)
    assert len(evaluate) == 3
    batches = list(evaluate.batches(None))
    assert torch.equal(torch.cat([b.index for b in batches]), torch.arange(10))
    for b in batches:
        assert b.x.dtype == torch.float32 and b.y.dtype == torch.float32
        assert b.x.shape[1] == int(ds.num_frames[b.index].max())  # trimmed to the longest item
        torch.testing.assert_close(b.x, ds.features[b.index, : b.x.shape[1]])
        torch.testing.assert_close(b.y, ds.labels[b.index])

    train = VideoLoader(ds, batch_size=3, seed=7)
    assert len(train) == 3  # drop_last: 10 // 3
    e0 = torch.cat([b.index for b in train.batches(0)])
    assert torch.equal(e0, torch.cat([b.index for b in VideoLoader(ds, batch_size=3, seed=7).batches(0)]))
    assert not torch.equal(e0, torch.cat([b.index for b in train.batches(1)]))
    assert len(set(e0.tolist())) == 9
    resumed = [b.index for b in train.batches(0, start=2)]
    assert len(resumed) == 1 and torch.equal(resumed[0], e0[6:9])
    with pytest.raises(ValueError, match="epoch"):
        next(train.batches(None))

    # two ranks: the padded training order (5 + 5) covers every item; eval shards partition them
    shards = [VideoLoader(ds, batch_size=5, seed=7, rank=r, world_size=2).indices(0) for r in range(2)]
    assert sorted(torch.cat(shards).tolist()) == list(range(10))
    eval_shards = [VideoLoader(ds, batch_size=5, train=False, rank=r, world_size=3).indices(None) for r in range(3)]
    assert sorted(torch.cat(eval_shards).tolist()) == list(range(10))


@pytest.mark.parametrize("signal, margin", [(1.0, 0.06), (2.0, 0.25)])
def test_generated_problem_is_learnable(signal, margin):
    # Logistic regression on mean-pooled frames; chance mAP is about the label rate (2/20 = 0.1).
    ds = make_video_dataset(1200, seed=0, signal=signal)
    train, test = ds.subset(range(800)), ds.subset(range(800, 1200))

    def mean_pool(d: VideoDataset) -> torch.Tensor:
        return d.features.sum(1) / d.num_frames[:, None]

    torch.manual_seed(0)
    model = nn.Linear(ds.feature_dim, ds.num_classes)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    x = mean_pool(train)
    for _ in range(200):
        loss = nn.functional.binary_cross_entropy_with_logits(model(x), train.labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        scores = model(mean_pool(test))
    chance = mean_average_precision(torch.rand(scores.shape, generator=torch.Generator().manual_seed(0)), test.labels)
    assert mean_average_precision(scores, test.labels) > chance + margin


def test_dbof_trains_on_the_generated_problem():
    # End to end: loader batches (trimmed, float multi-hot) -> DBoF logits -> BCE; 120 Adam steps.
    ds = make_video_dataset(1200, seed=0, signal=2.0)
    train, test = ds.subset(range(800)), ds.subset(range(800, 1200))
    torch.manual_seed(0)
    model = DBoF(ds.num_classes, ds.feature_dim, cluster_size=32, hidden_size=32)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    loader = VideoLoader(train, batch_size=100)
    for epoch in range(15):
        for batch in loader.batches(epoch):
            loss = nn.functional.binary_cross_entropy_with_logits(model(batch.x), batch.y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        scores = model.eval()(test.features)
    assert mean_average_precision(scores, test.labels) > 0.2  # chance is about 0.1


# ----------------------------------------------------------------------------- DBoF: gate placement


def _params(m) -> int:
    return sum(p.numel() for p in m.parameters())


def test_dbof_paper_placement_gates_frames_before_pooling_and_the_moe_output():
    D, cl, h, C, E = 8, 12, 7, 5, 3
    model = DBoF(C, D, cluster_size=cl, hidden_size=h, num_experts=E)  # gating="paper" by default
    seen = {}

    def record(name, module, value):
        module.register_forward_hook(lambda m, i, o: seen.__setitem__(name, value(i[0])))  # returns None
    record("frame_gate", model.frames.gating, lambda v: v.shape)
    record("output_gate", model.classifier[1], lambda v: v.detach())
    record("input_bn", model.frames.input_bn, lambda v: v.shape)
    x = _frames(d=D)
    model(x)
    n_valid = int(frame_mask(x).sum())
    assert seen["input_bn"] == (n_valid, D)  # BN on the input, valid frames only
    assert seen["frame_gate"] == (n_valid, cl)  # per frame, before the pooling
    assert bool(((seen["output_gate"] >= 0) & (seen["output_gate"] <= 1)).all())  # it gates probabilities
    assert not any(isinstance(m, ContextGating) for m in model.hidden)  # none after the hidden layer
    moe = h * C * (E + 1) + h * C * E + C * E
    expected = (2 * D + D * cl + 2 * cl + cl * cl + 2 * cl  # input BN, clustering + BN, frame gate + BN
                + cl * h + 2 * h + moe + C * C + 2 * C)  # hidden + BN, MoE, output gate + BN
    assert _params(model) == expected
    hidden = DBoF(C, D, cluster_size=cl, hidden_size=h, num_experts=E, gating="hidden")  # the earlier DBoF
    assert _params(hidden) == D * cl + 2 * cl + cl * h + 2 * h + h * h + 2 * h + moe
    assert _params(DBoF(C, D, cluster_size=cl, hidden_size=h, num_experts=E, gating="none")) == (
        D * cl + 2 * cl + cl * h + 2 * h + moe)
    with pytest.raises(ValueError, match="gating must be one of"):
        DBoF(C, D, gating="after")


def test_multiheaded_dbof_shrinks_the_experts_within_the_base_budget():
    base = create("dbof", num_classes=6, in_channels=8, cluster_size=16, hidden_size=12, num_experts=5)
    net = create("multihead", base="dbof", num_classes=6, in_channels=8, fork="hidden",
                 base_kwargs={"cluster_size": 16, "hidden_size": 12, "num_experts": 5},
                 branch_kwargs={"num_experts": 3})
    assert [b.classifier[0].num_experts for b in net.branches] == [3, 3]  # MoE-5 -> MoE-3
    assert _params(net) <= _params(base)
    wider = create("multihead", base="dbof", num_classes=6, in_channels=8, fork="hidden",
                   base_kwargs={"cluster_size": 16, "hidden_size": 12, "num_experts": 5})
    assert net.width_factor <= wider.width_factor  # fewer experts leave room for wider branches
    assert net(_frames()).shape == (4, 6)
    with pytest.raises(ValueError, match="cannot set widths"):
        create("multihead", base="dbof", num_classes=6, in_channels=8, branch_kwargs={"widths": (4, 4)})


# ----------------------------------------------------------------------------- 25 random frames (section 4.2)
def _drawn(loader, epoch):
    """{video index: its (count, D) training frames} over an epoch."""
    return {int(i): x for b in loader.batches(epoch) for i, x in zip(b.index, b.x)}


def test_training_frames_are_drawn_per_video_as_a_pure_function_of_seed_epoch_and_index():
    ds = make_video_dataset(24, num_classes=4, feature_dim=5, max_frames=40, min_frames=3, seed=4)
    drawn = _drawn(VideoLoader(ds, batch_size=6, seed=7, frames_per_video=25), 0)
    assert len(drawn) == 24 and all(x.shape == (25, 5) for x in drawn.values())
    for i, x in drawn.items():  # every drawn frame is one of the video's own (the padding is never drawn)
        own = ds.features[i, : int(ds.num_frames[i])]
        assert all(bool((own == frame).all(-1).any()) for frame in x)
    short = int(ds.num_frames.argmin())
    assert len(torch.unique(drawn[short], dim=0)) <= int(ds.num_frames[short]) < 25  # with replacement
    # the same video gets the same frames in another batch layout and another epoch order ...
    other = VideoLoader(ds, batch_size=5, seed=7, frames_per_video=25)
    again = {int(i): x for b in other.batches_at([torch.tensor([3, 17, 0]), torch.tensor([9])], 0)
             for i, x in zip(b.index, b.x)}
    assert all(torch.equal(again[i], drawn[i]) for i in again)
    # ... and other frames in another epoch or with another seed
    for changed in (_drawn(VideoLoader(ds, batch_size=6, seed=7, frames_per_video=25), 1),
                    _drawn(VideoLoader(ds, batch_size=6, seed=8, frames_per_video=25), 0)):
        assert sum(not torch.equal(changed[i], drawn[i]) for i in drawn) >= 20
    # evaluation takes every frame
    evaluate = VideoLoader(ds, batch_size=6, train=False, frames_per_video=25)
    assert all(b.x.shape[1] == int(ds.num_frames[b.index].max()) for b in evaluate.batches(None))
    assert VideoLoader(ds, batch_size=6, frames_per_video=25).views_fingerprint() == {"frames_per_video": 25}
    assert VideoLoader(ds, batch_size=6).views_fingerprint() == {}  # caches made before still match
    with pytest.raises(ValueError, match="frames_per_video must be a positive integer"):
        VideoLoader(ds, batch_size=6, frames_per_video=0)


def test_drawn_frame_positions_are_the_same_in_another_process():
    import subprocess
    import sys

    code = ("import torch; from ensemble_kd.data.frames import frame_positions; "
            "print(frame_positions(torch.tensor([300, 7, 1]), torch.tensor([0, 5, 123456789]), epoch=3, seed=11, "
            "count=25).tolist())")
    from ensemble_kd.data.frames import frame_positions

    here = frame_positions(torch.tensor([300, 7, 1]), torch.tensor([0, 5, 123456789]), epoch=3, seed=11, count=25)
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert eval(there) == here.tolist()
    assert here[2].tolist() == [0] * 25 and int(here[0].max()) < 300 and int(here[1].max()) < 7
    assert len(set(here[0].tolist())) > 20  # spread over the long video


def test_table2_dbof_sizes_at_full_scale():
    """The paper's YouTube-8M DBoF: cluster 4096, hidden 4096, MoE-5 over 1152 features and 3862
    classes; its multi-headed version forks after the pooling into two (hidden 3000, MoE-3) branches.
    Counted with batch norm folded, by hand (the paper states 229M and 226M: see the README)."""
    from ensemble_kd.metrics.cost import count_parameters_bn_folded

    C, D = 3862, 1152

    def head(hidden, experts):  # hidden layer (BN -> bias), MoE gates (no bias) and experts, output gate
        return 4096 * hidden + hidden + hidden * C * (experts + 1) + hidden * C * experts + C * experts + C * C + C

    frames = D * 4096 + 4096 + 4096 * 4096 + 4096  # input BN folded forwards; clustering, its context gate
    kwargs = {"cluster_size": 4096, "hidden_size": 4096, "num_experts": 5}
    with torch.device("meta"):
        base = create("dbof", num_classes=C, in_channels=D, **kwargs)
        net = create("multihead", base="dbof", num_classes=C, in_channels=D, base_kwargs=kwargs, fork="hidden",
                     branch_widths=[3000], branch_kwargs={"num_experts": 3})
    assert count_parameters_bn_folded(base) == frames + head(4096, 5)  # 227.2M
    assert count_parameters_bn_folded(net) == frames + 2 * head(3000, 3)  # 238.2M
    assert [(b.hidden[0].out_features, b.classifier[0].num_experts) for b in net.branches] == [(3000, 3)] * 2


def test_data_frames_per_video_reaches_the_training_loader_and_is_refused_for_images():
    from ensemble_kd import pipeline
    from ensemble_kd.config import ConfigError, load_config

    config = load_config(None, ["data.name=video-synthetic", "data.frames_per_video=5", "device=cpu"])
    data = pipeline.prepare_data(config)
    assert next(iter(data.train_loader(config.data, seed=0).batches(0))).x.shape[1] == 5
    assert next(iter(data.test.batches(None))).x.shape[1] > 5  # evaluation: every frame
    with pytest.raises(ConfigError, match="'data.frames_per_video' draws frames of videos; data.name 'digits'"):
        pipeline.prepare_data(load_config(None, ["data.frames_per_video=5", "device=cpu"]))
