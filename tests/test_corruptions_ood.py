"""Tests for ensemble_kd.metrics.corruptions (common corruptions, robustness suite) and .ood (AUROC)."""

from __future__ import annotations

import math
from itertools import pairwise

import pytest
import torch
from sklearn.metrics import roc_auc_score

from ensemble_kd.metrics import expected_calibration_error, negative_log_likelihood, top_k_accuracy
from ensemble_kd.metrics.corruptions import CORRUPTIONS, corrupt, corruption_suite
from ensemble_kd.metrics.ood import auroc, max_probability, negative_entropy, ood_metrics

SEVERITIES = (1, 2, 3, 4, 5)
# Corruptions whose mean absolute change must grow with severity (brightness and JPEG
# also grow on average but saturate or depend on the block content).
MONOTONE = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "contrast", "pixelate")


def _images(channels: int, side: int, dtype=torch.float32, n: int = 8) -> torch.Tensor:
    gen = torch.Generator().manual_seed(channels * 100 + side)
    return torch.rand(n, channels, side, side, generator=gen).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("channels,side", [(1, 8), (3, 32)])
def test_every_corruption_keeps_shape_dtype_range(channels, side, dtype):
    x = _images(channels, side, dtype)
    for name in CORRUPTIONS:
        for sev in SEVERITIES:
            y = corrupt(x, name, sev, seed=1)
            assert y.shape == x.shape and y.dtype == dtype and y.device == x.device, (name, sev)
            assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0, (name, sev)
            assert not torch.equal(y, x), (name, sev)  # even on 8x8 no level is the identity


@pytest.mark.parametrize("channels,side", [(1, 8), (1, 28), (3, 32)])
def test_distortion_grows_with_severity(channels, side):
    x = _images(channels, side, n=16)
    for name in MONOTONE:
        change = [float((corrupt(x, name, sev, seed=3) - x).abs().mean()) for sev in SEVERITIES]
        assert all(a < b for a, b in pairwise(change)), (name, change)
    for name in ("brightness", "jpeg"):
        change = [float((corrupt(x, name, sev, seed=3) - x).abs().mean()) for sev in SEVERITIES]
        assert change[-1] > change[0], (name, change)


def test_seed_determines_the_corruption():
    x = _images(3, 16)
    for name in CORRUPTIONS:
        assert torch.equal(corrupt(x, name, 3, seed=7), corrupt(x, name, 3, seed=7)), name
    for name in ("gaussian_noise", "shot_noise", "impulse_noise"):
        assert not torch.equal(corrupt(x, name, 3, seed=7), corrupt(x, name, 3, seed=8)), name
        fn = CORRUPTIONS[name]
        # An int generator is a seed; a Generator gives the same draws as corrupt's seed.
        assert torch.equal(fn(x, 3, 7), corrupt(x, name, 3, seed=7)), name
        assert torch.equal(fn(x, 3, torch.Generator().manual_seed(7)), corrupt(x, name, 3, seed=7)), name


def test_one_seed_nests_impulse_hits_and_scales_gaussian_noise():
    x = _images(3, 16)
    hits = [corrupt(x, "impulse_noise", sev, seed=5) != x for sev in SEVERITIES]
    assert all(bool((lo <= hi).all()) for lo, hi in pairwise(hits))
    # the same normal draws, scaled by the std (0.04 and 0.08), before clipping
    inside = (x > 0.3) & (x < 0.7)
    noise1 = corrupt(x, "gaussian_noise", 1, seed=5) - x
    noise3 = corrupt(x, "gaussian_noise", 3, seed=5) - x
    assert torch.allclose(noise3[inside], 2 * noise1[inside], atol=1e-6)


def test_hand_cases_of_deterministic_corruptions():
    x = torch.tensor([0.2, 0.6]).reshape(1, 1, 1, 2).expand(1, 1, 2, 2).contiguous()  # columns 0.2, 0.6
    # contrast: mean 0.4, factor 0.5 at severity 2 -> 0.3, 0.5
    assert torch.allclose(corrupt(x, "contrast", 2)[0, 0, 0], torch.tensor([0.3, 0.5]))
    # brightness on grey images is min(x + shift, 1); severity 5 adds 0.3
    assert torch.allclose(corrupt(x, "brightness", 5)[0, 0, 0], torch.tensor([0.5, 0.9]))
    # brightness keeps hue and saturation: RGB scales by V'/V (0.5 -> 0.8 is x 1.6)
    rgb = torch.tensor([0.5, 0.25, 0.0]).reshape(1, 3, 1, 1)
    assert torch.allclose(corrupt(rgb, "brightness", 5).flatten(), torch.tensor([0.8, 0.4, 0.0]))
    # pixelate at severity 4 keeps 4 of 8 pixels per side: exact 2x2 block means
    img = _images(1, 8, n=1)
    blocks = torch.nn.functional.avg_pool2d(img, 2).repeat_interleave(2, 2).repeat_interleave(2, 3)
    assert torch.allclose(corrupt(img, "pixelate", 4), blocks)
    # a constant image is unchanged by blur and pixelate
    flat = torch.full((2, 3, 8, 8), 0.25)
    for name in ("defocus_blur", "pixelate", "contrast"):
        assert torch.allclose(corrupt(flat, name, 5), flat), name


def test_bad_inputs_raise():
    x = _images(3, 8)
    with pytest.raises(ValueError, match="known: gaussian_noise"):
        corrupt(x, "fog", 1)
    for sev in (0, 6, 2.0, True):
        with pytest.raises(ValueError, match="severity"):
            corrupt(x, "contrast", sev)
    with pytest.raises(ValueError, match="shape"):
        corrupt(x[0], "contrast", 1)
    with pytest.raises(ValueError, match="C = 1 or 3"):
        corrupt(torch.rand(2, 2, 8, 8), "contrast", 1)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        corrupt(x * 255, "contrast", 1)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        corrupt(x - 0.5, "gaussian_noise", 1)
    with pytest.raises(ValueError, match="floating"):
        corrupt((x * 255).to(torch.uint8), "jpeg", 1)


def _linear_predictor(channels: int, side: int, classes: int = 4):
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(channels * side * side, classes, generator=gen)
    return lambda x: (x.flatten(1) - 0.5) @ weight


def test_corruption_suite_keys_values_and_means():
    images, labels = _images(1, 8, n=40), torch.arange(40) % 4
    predict = _linear_predictor(1, 8)
    out = corruption_suite(predict, images, labels, severities=(1, 3, 5), batch_size=16, seed=2)
    assert set(out) == {"clean", "per", "by_corruption", "mean"}
    assert set(out["per"]) == {f"{name}/{sev}" for name in CORRUPTIONS for sev in (1, 3, 5)}
    assert set(out["by_corruption"]) == set(CORRUPTIONS)
    entries = [out["clean"], out["mean"], *out["per"].values(), *out["by_corruption"].values()]
    for entry in entries:
        assert set(entry) == {"acc", "nll", "ece"}
        assert all(isinstance(v, float) and math.isfinite(v) for v in entry.values())
    for key in ("acc", "nll", "ece"):
        parts = [e[key] for e in out["per"].values()]
        assert out["mean"][key] == pytest.approx(sum(parts) / len(parts))
        by = [e[key] for e in out["by_corruption"].values()]
        assert out["mean"][key] == pytest.approx(sum(by) / len(by))
        for name in CORRUPTIONS:
            sevs = [out["per"][f"{name}/{s}"][key] for s in (1, 3, 5)]
            assert out["by_corruption"][name][key] == pytest.approx(sum(sevs) / 3)
    # "clean" is the predictor's own metrics; a corrupted entry matches corrupt() with one batch.
    probs = torch.softmax(predict(images).double(), dim=1)
    assert out["clean"]["acc"] == pytest.approx(top_k_accuracy(probs, labels))
    assert out["clean"]["nll"] == pytest.approx(negative_log_likelihood(probs, labels))
    one = corruption_suite(predict, images, labels, names="gaussian_noise", severities=(3,), batch_size=40, seed=2)
    probs = torch.softmax(predict(corrupt(images, "gaussian_noise", 3, seed=2)).double(), dim=1)
    assert one["per"]["gaussian_noise/3"]["ece"] == pytest.approx(expected_calibration_error(probs, labels))
    assert corruption_suite(predict, images, labels, seed=2, severities=(1, 3, 5), batch_size=16) == out


def test_corruption_suite_bad_inputs_raise():
    images, labels = _images(3, 8, n=6), torch.arange(6) % 3
    predict = _linear_predictor(3, 8, classes=3)
    with pytest.raises(ValueError, match="known"):
        corruption_suite(predict, images, labels, names=["fog"])
    with pytest.raises(ValueError, match="severity"):
        corruption_suite(predict, images, labels, severities=(0,))
    with pytest.raises(ValueError, match="labels"):
        corruption_suite(predict, images, labels[:5])
    with pytest.raises(ValueError, match="batch_size"):
        corruption_suite(predict, images, labels, batch_size=0)
    with pytest.raises(ValueError, match="predict_fn output"):
        corruption_suite(lambda x: predict(x)[:, 0], images, labels, names=["contrast"])


def test_auroc_hand_cases():
    # pairs (in > out): 0.9 beats both, 0.8 beats both, 0.4 beats 0.3 only -> 5 of 6
    assert auroc(torch.tensor([0.9, 0.8, 0.4]), torch.tensor([0.5, 0.3])) == pytest.approx(5 / 6)
    # tie 0.5 = 0.5 counts 1/2: (0.5 + 1) / 2
    assert auroc([0.5, 0.9], [0.5]) == pytest.approx(0.75)
    assert auroc([1.0, 1.0], [1.0, 1.0, 1.0]) == 0.5
    assert auroc([0.0], [1.0]) == 0.0 and auroc([2], [1]) == 1.0


def test_auroc_matches_sklearn():
    gen = torch.Generator().manual_seed(0)
    for n_in, n_out, levels in [(50, 70, 1000), (200, 30, 5)]:  # 5 levels: many ties
        s_in = torch.randint(0, levels, (n_in,), generator=gen).double() + 1  # same lattice: ties
        s_out = torch.randint(0, levels, (n_out,), generator=gen).double()
        y = [1] * n_in + [0] * n_out
        expected = roc_auc_score(y, torch.cat([s_in, s_out]).numpy())
        assert auroc(s_in, s_out) == pytest.approx(expected, abs=1e-12)
        assert auroc(s_out, s_in) == pytest.approx(1 - expected, abs=1e-12)


def test_auroc_bad_inputs_raise():
    with pytest.raises(ValueError, match="non-empty"):
        auroc([], [0.1])
    with pytest.raises(ValueError, match="1-D"):
        auroc([[0.1]], [0.1])
    with pytest.raises(ValueError, match="NaN"):
        auroc([float("nan")], [0.1])


def test_score_functions_and_ood_metrics():
    probs = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [1 / 3, 1 / 3, 1 / 3]], dtype=torch.float64)
    assert torch.allclose(max_probability(probs), torch.tensor([1.0, 0.5, 1 / 3], dtype=torch.float64))
    expected = torch.tensor([0.0, -math.log(2), -math.log(3)], dtype=torch.float64)
    assert torch.allclose(negative_entropy(probs), expected)
    out = ood_metrics(probs[:1], probs[1:])  # the confident row is in-distribution
    assert out == {"auroc_maxprob": 1.0, "auroc_entropy": 1.0}
    assert ood_metrics(probs[1:], probs[:1]) == {"auroc_maxprob": 0.0, "auroc_entropy": 0.0}
    with pytest.raises(ValueError, match="logits"):
        max_probability(torch.tensor([[-1.0, 2.0]]))
    with pytest.raises(ValueError, match="classes"):
        ood_metrics(probs, probs[:, :2])
