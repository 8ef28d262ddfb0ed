"""Tests for ensemble_kd.metrics: hand-computed values, calibration bins, temperature, cost."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ensemble_kd.metrics import (
    brier_score,
    classification_metrics,
    count_flops,
    count_macs,
    count_parameters,
    expected_calibration_error,
    fit_temperature,
    measure_latency,
    measure_throughput,
    negative_log_likelihood,
    probs_to_logits,
    reliability_bins,
    temperature_at_bound,
    top_k_accuracy,
)

# Three samples, three classes. Predictions (argmax) are 0, 1, 2; labels 0, 0, 2.
HAND_PROBS = torch.tensor([[0.7, 0.2, 0.1], [0.3, 0.5, 0.2], [0.25, 0.25, 0.5]], dtype=torch.float64)
HAND_LABELS = torch.tensor([0, 0, 2])


def test_hand_case_accuracy_nll_brier_ece():
    # accuracy: sample 0 right, sample 1 wrong (predicts 1), sample 2 right -> 2/3
    assert top_k_accuracy(HAND_PROBS, HAND_LABELS) == pytest.approx(2 / 3)
    # NLL: p(label) = 0.7, 0.3, 0.5 -> -(ln 0.7 + ln 0.3 + ln 0.5) / 3
    #      = (0.356675 + 1.203973 + 0.693147) / 3 = 0.751265
    expected_nll = -(math.log(0.7) + math.log(0.3) + math.log(0.5)) / 3
    assert negative_log_likelihood(HAND_PROBS, HAND_LABELS) == pytest.approx(expected_nll)
    assert expected_nll == pytest.approx(0.751265, abs=1e-6)
    # Brier (sum over classes, mean over samples):
    #   s0: (0.7-1)^2 + 0.2^2 + 0.1^2        = 0.09 + 0.04 + 0.01     = 0.14
    #   s1: (0.3-1)^2 + 0.5^2 + 0.2^2        = 0.49 + 0.25 + 0.04     = 0.78
    #   s2: 0.25^2 + 0.25^2 + (0.5-1)^2      = 0.0625 + 0.0625 + 0.25 = 0.375
    #   mean = (0.14 + 0.78 + 0.375) / 3 = 1.295 / 3 = 0.431667
    assert brier_score(HAND_PROBS, HAND_LABELS) == pytest.approx(1.295 / 3)
    # ECE, 15 bins of width 1/15 = 0.0667, confidences 0.7, 0.5, 0.5:
    #   0.7 -> bin 10 = (0.6667, 0.7333]: 1 sample, acc 1, conf 0.7 -> gap 0.3
    #   0.5 -> bin 7  = (0.4667, 0.5333]: 2 samples, acc 1/2 (s1 wrong, s2 right), conf 0.5 -> gap 0
    #   ECE = 1/3 * 0.3 + 2/3 * 0 = 0.1
    assert expected_calibration_error(HAND_PROBS, HAND_LABELS) == pytest.approx(0.1)
    # Two bins (0, 0.5], (0.5, 1], float32: 0.5 and 0.5 close bin 0 (acc 1/2, gap 0), 0.7 in bin 1
    # (gap 0.3) -> 0.1 again; a half-open [lo, hi) binning would put 0.5 in bin 1 and give
    # 1 * |2/3 - 0.5667| = 0.1 too, so also check the counts.
    assert expected_calibration_error(HAND_PROBS.float(), HAND_LABELS, n_bins=2) == pytest.approx(0.1, abs=1e-6)
    assert reliability_bins(HAND_PROBS.float(), HAND_LABELS, n_bins=2)["count"] == [2, 1]


def test_hand_case_with_ece_gaps_in_two_bins():
    # Labels 1, 0, 2 instead: sample 0 wrong (pred 0), sample 1 wrong (pred 1), sample 2 right.
    labels = torch.tensor([1, 0, 2])
    #   bin 10: conf 0.7, acc 0 -> gap 0.7 ; bin 7: conf 0.5, acc 1/2 -> gap 0
    #   ECE = 1/3 * 0.7 + 2/3 * 0 = 0.233333
    assert expected_calibration_error(HAND_PROBS, labels) == pytest.approx(0.7 / 3)
    assert top_k_accuracy(HAND_PROBS, labels) == pytest.approx(1 / 3)


def test_top5_differs_from_top1():
    # Six classes, probabilities in decreasing order of class index 0..5 for every row.
    probs = torch.tensor([[0.30, 0.25, 0.20, 0.12, 0.08, 0.05]] * 3)
    # label ranks: 1st (class 0), 4th (class 3), 6th (class 5)
    labels = torch.tensor([0, 3, 5])
    assert top_k_accuracy(probs, labels, k=1) == pytest.approx(1 / 3)
    assert top_k_accuracy(probs, labels, k=2) == pytest.approx(1 / 3)
    assert top_k_accuracy(probs, labels, k=5) == pytest.approx(2 / 3)
    assert top_k_accuracy(probs, labels, k=6) == pytest.approx(1.0)
    metrics = classification_metrics(probs, labels)
    assert metrics["top5"] == pytest.approx(2 / 3)
    assert metrics["acc"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="k=7"):
        top_k_accuracy(probs, labels, k=7)


def test_reliability_bins_counts_and_means():
    # 5 bins (0, .2], (.2, .4], (.4, .6], (.6, .8], (.8, 1]; confidences .35 .45 .55 .9 .95 1.0
    probs = torch.tensor(
        [
            [0.35, 0.33, 0.32],
            [0.45, 0.30, 0.25],
            [0.55, 0.25, 0.20],
            [0.90, 0.05, 0.05],
            [0.95, 0.03, 0.02],
            [1.0, 0.0, 0.0],
        ]
    )
    labels = torch.tensor([1, 0, 0, 0, 1, 0])  # correct: no, yes, yes, yes, no, yes
    bins = reliability_bins(probs, labels, n_bins=5)
    assert bins["edges"] == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert bins["count"] == [0, 1, 2, 0, 3]
    assert bins["accuracy"] == pytest.approx([0.0, 0.0, 1.0, 0.0, 2 / 3])
    assert bins["confidence"] == pytest.approx([0.0, 0.35, 0.5, 0.0, (0.9 + 0.95 + 1.0) / 3])
    # ECE = 1/6 * |0 - .35| + 2/6 * |1 - .5| + 3/6 * |2/3 - .95| = .058333 + .166667 + .141667 = .366667
    expected = 1 / 6 * 0.35 + 2 / 6 * 0.5 + 3 / 6 * abs(2 / 3 - 0.95)
    assert expected_calibration_error(probs, labels, n_bins=5) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ece_bin_edges_are_right_closed(dtype):
    # 15 bins: 0.6 = 9/15 is the upper edge of bin 8 = (0.5333, 0.6], not the start of bin 9.
    probs = torch.tensor([[0.6, 0.4], [0.6000001, 0.3999999], [1.0, 0.0]], dtype=dtype)
    bins = reliability_bins(probs, torch.tensor([0, 0, 0]))
    assert bins["edges"][8] == pytest.approx(0.5333333, abs=1e-6) and bins["edges"][9] == 0.6
    assert bins["count"][8] == 1  # exactly 0.6
    assert bins["count"][9] == 1  # just above 0.6
    assert bins["count"][14] == 1  # confidence 1.0 is in the last bin (14/15, 1]
    assert sum(bins["count"]) == 3


def test_zero_confidence_goes_to_first_bin():
    # An all-zero row (unnormalised input is accepted) has confidence 0: bin 0 includes lo = 0.
    bins = reliability_bins(torch.tensor([[0.0, 0.0], [0.5, 0.5]]), torch.tensor([0, 1]), n_bins=4)
    assert bins["count"] == [1, 1, 0, 0]


def test_calibrated_predictions_have_small_ece():
    gen = torch.Generator().manual_seed(0)
    probs = torch.softmax(2 * torch.randn(40_000, 10, generator=gen), dim=1)
    labels = torch.multinomial(probs, 1, generator=gen).squeeze(1)  # labels drawn from the prediction itself
    assert expected_calibration_error(probs, labels) < 0.01
    # The same predictions sharpened are overconfident.
    sharp = torch.softmax(3 * probs.log(), dim=1)
    assert expected_calibration_error(sharp, labels) > 0.1


def test_nll_clamps_zero_probability():
    probs = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    nll = negative_log_likelihood(probs, torch.tensor([1, 0]))
    # sample 0: -log(1e-12) = 27.631; sample 1: -log 0.5 = 0.693 -> mean 14.162
    assert nll == pytest.approx((-math.log(1e-12) + math.log(2)) / 2)


@pytest.mark.parametrize(
    "probs, labels, match",
    [
        (torch.full((3, 2), 0.5), torch.tensor([0, 1]), "3 rows but labels has 2"),
        (torch.full((2, 2), 0.5), torch.tensor([0, 2]), "outside 0..1"),
        (torch.full((2, 2), 0.5), torch.tensor([-1, 0]), "-1"),
        (torch.tensor([[0.5, float("nan")], [0.5, 0.5]]), torch.tensor([0, 1]), "NaN"),
        (torch.tensor([[2.0, -1.0], [0.5, 0.5]]), torch.tensor([0, 1]), "negative"),
        (torch.full((4,), 0.25), torch.tensor([0]), r"\(B, K\)"),
        (torch.full((2, 2), 0.5), torch.tensor([0.0, 1.0]), "integer"),
        (torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), "empty"),
    ],
)
def test_invalid_inputs_raise(probs, labels, match):
    with pytest.raises(ValueError, match=match):
        negative_log_likelihood(probs, labels)
    with pytest.raises(ValueError):
        expected_calibration_error(probs, labels)


def test_unnormalised_probabilities_are_accepted():
    probs = torch.tensor([[0.7, 0.3001], [0.2, 0.7999]])  # rows sum to 1 +- 1e-4
    assert top_k_accuracy(probs, torch.tensor([0, 1])) == 1.0


def _synthetic(temperature: float, n: int = 50_000, k: int = 10, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(n, k, generator=gen, dtype=torch.float64)
    labels = torch.multinomial(torch.softmax(logits / temperature, dim=1), 1, generator=gen).squeeze(1)
    return logits, labels


@pytest.mark.parametrize("t0", [0.5, 1.0, 2.5])
def test_fit_temperature_recovers_known_temperature(t0):
    logits, labels = _synthetic(t0)
    t = fit_temperature(logits.float(), labels)
    assert abs(t - t0) / t0 < 0.03
    # The fit is a minimum: nearby temperatures give a higher NLL.
    def nll(temp):
        return negative_log_likelihood(torch.softmax(logits / temp, dim=1), labels)

    assert nll(t) <= min(nll(t * 1.05), nll(t / 1.05))


def test_fit_temperature_scales_with_logits():
    logits, labels = _synthetic(1.0, n=5000)
    assert fit_temperature(4 * logits, labels) == pytest.approx(4 * fit_temperature(logits, labels), rel=1e-5)


def test_fit_temperature_handles_log_of_zero_probabilities():
    logits, labels = _synthetic(2.0, n=5000)
    probs = torch.softmax(logits, dim=1)
    probs[:100, 0] = 0.0  # an ensemble whose mean probability underflowed
    probs = probs / probs.sum(1, keepdim=True)
    with_inf = probs.log()
    assert bool(torch.isneginf(with_inf).any())
    t_inf = fit_temperature(with_inf, labels)
    t_clamped = fit_temperature(probs_to_logits(probs), labels)
    assert math.isfinite(t_inf) and t_inf > 0
    assert t_inf == pytest.approx(t_clamped, rel=1e-3)
    with pytest.raises(ValueError, match="NaN"):
        fit_temperature(torch.tensor([[float("nan"), 0.0]]), torch.tensor([0]))


def test_fit_temperature_hits_lower_bound_when_everything_is_right():
    logits = torch.tensor([[2.0, 0.0], [0.0, 3.0]])
    t = fit_temperature(logits, torch.tensor([0, 1]))
    assert t == pytest.approx(0.01) and temperature_at_bound(t)


def test_fit_temperature_inside_the_range_is_not_at_a_bound():
    # Sample 2 is wrong by 1: NLL(b) = [log(1 + e^-2b) + log(1 + e^-3b) + log(1 + e^b)] / 3 (b = 1/T)
    # has slope (-2/(1 + e^2b) - 3/(1 + e^3b) + 1/(1 + e^-b)) / 3: (-0.538 - 0.547 + 0.622) / 3 = -0.154
    # at b = 1/2, (-0.238 - 0.142 + 0.731) / 3 = +0.117 at b = 1, so the optimum lies between T = 1
    # and T = 2, well inside [0.01, 100].
    logits = torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 0.0]])
    t = fit_temperature(logits, torch.tensor([0, 1, 1]))
    assert 1 < t < 2 and not temperature_at_bound(t)
    # All wrong: the NLL falls as T grows, the fit stops at the upper bound, which is flagged too.
    t = fit_temperature(logits, torch.tensor([1, 0, 1]))
    assert t == pytest.approx(100) and temperature_at_bound(t)


def test_classification_metrics_with_temperature_scaling():
    # An overconfident model: labels come from softmax(z / 2.5) but it predicts softmax(z).
    val_logits, val_labels = _synthetic(2.5, n=5000, seed=1)
    test_logits, test_labels = _synthetic(2.5, n=5000, seed=2)
    probs = torch.softmax(test_logits, dim=1)
    m = classification_metrics(probs, test_labels, val_logits=val_logits, val_labels=val_labels)
    assert set(m) == {"acc", "top5", "nll", "ece", "brier", "temperature", "temperature_at_bound", "cnll", "cece"}
    assert all(isinstance(v, float) for k, v in m.items() if k != "temperature_at_bound")
    assert m["temperature"] == pytest.approx(2.5, rel=0.1) and m["temperature_at_bound"] is False
    assert m["cnll"] < m["nll"] - 0.1
    assert m["cece"] < m["ece"] / 3
    # Passing the logits explicitly gives the same calibrated numbers as log(probs).
    m2 = classification_metrics(
        probs, test_labels, val_logits=val_logits, val_labels=val_labels, test_logits=test_logits
    )
    assert m2["cnll"] == pytest.approx(m["cnll"], rel=1e-6)
    with pytest.raises(ValueError, match="val_labels"):
        classification_metrics(probs, test_labels, val_logits=val_logits)


def test_classification_metrics_flag_a_separable_validation_split():
    # Validation: both samples right with a margin, so the fit stops at T = 0.01. Test: one sample
    # wrong by 1, which at T = 0.01 gets p(label) = 1 / (1 + e^100), clamped at 1e-12: it costs
    # log(1e12) = 27.6 nats, so cNLL = 13.8 against NLL = 0.72, a figure set by the bound (and the
    # clamp) alone. It is kept, and flagged.
    val_logits, val_labels = torch.tensor([[2.0, 0.0], [0.0, 3.0]]), torch.tensor([0, 1])
    test_logits, test_labels = torch.tensor([[2.0, 0.0], [1.0, 0.0]]), torch.tensor([0, 1])
    m = classification_metrics(torch.softmax(test_logits, 1), test_labels, val_logits=val_logits,
                               val_labels=val_labels, test_logits=test_logits)
    assert m["temperature"] == pytest.approx(0.01) and m["temperature_at_bound"] is True
    assert m["nll"] == pytest.approx((math.log(1 + math.exp(-2)) + math.log(1 + math.exp(1))) / 2)
    assert m["cnll"] == pytest.approx(math.log(1e12) / 2)


def test_classification_metrics_without_validation_and_few_classes():
    m = classification_metrics(HAND_PROBS, HAND_LABELS)
    assert set(m) == {"acc", "nll", "ece", "brier"}  # no top5 with 3 classes
    assert m["acc"] == pytest.approx(2 / 3) and m["ece"] == pytest.approx(0.1)


# ---- cost ---------------------------------------------------------------------------------


def test_count_parameters():
    model = nn.Sequential(nn.Linear(10, 5), nn.ReLU(), nn.Linear(5, 2))  # 55 + 12
    assert count_parameters(model) == 67
    model[0].weight.requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == 17
    shared = nn.Sequential(model[2], model[2])  # a shared layer is counted once
    assert count_parameters(shared) == 12


def test_count_parameters_with_batch_norm_folded_by_hand():
    from ensemble_kd.metrics.cost import count_parameters_bn_folded

    # conv without bias + BN: the BN's scale goes into the weights, its shift becomes a bias of 4
    model = nn.Sequential(nn.Conv2d(2, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU())
    assert count_parameters(model) == 72 + 8 and count_parameters_bn_folded(model) == 72 + 4
    # a layer with a bias already absorbs the shift: the BN costs nothing
    model = nn.Sequential(nn.Linear(5, 3), nn.BatchNorm1d(3))
    assert count_parameters_bn_folded(model) == 18
    # a BN with nothing before it folds forwards into the next linear: its shift, through the weights,
    # becomes that layer's bias (6), which the BN after it then shares; the last linear keeps its own
    model = nn.Sequential(nn.BatchNorm1d(5), nn.Linear(5, 6, bias=False), nn.BatchNorm1d(6), nn.Linear(6, 2))
    assert count_parameters(model) == 10 + 30 + 12 + 14 and count_parameters_bn_folded(model) == 30 + 6 + 14
    # a BN that folds nowhere (an activation between it and its neighbours, or other widths) keeps its 2C
    model = nn.Sequential(nn.Conv2d(2, 4, 1, bias=False), nn.ReLU(), nn.BatchNorm2d(4), nn.Conv2d(4, 3, 1))
    assert count_parameters_bn_folded(model) == 8 + 8 + 15
    model = nn.Sequential(nn.Conv2d(2, 4, 1, bias=False), nn.Identity(), nn.Dropout(), nn.BatchNorm2d(4))
    assert count_parameters_bn_folded(model) == 8 + 4  # identities and dropouts are no barrier
    assert count_parameters_bn_folded(nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 2, 3))) == 6 + 56
    assert count_parameters_bn_folded(nn.BatchNorm1d(7, affine=False)) == 0


def test_count_flops_linear_and_conv():
    assert count_flops(nn.Linear(10, 5), (10,)) == 2 * 10 * 5  # 100; bias not counted
    # Conv 2 -> 4 channels, 3x3 kernel, 5x5 input, no padding -> 3x3 output:
    # 2 FLOPs * 9 output positions * 4 out channels * (2 in channels * 9 taps) = 1296
    conv = nn.Conv2d(2, 4, kernel_size=3, bias=False)
    assert count_flops(conv, (2, 5, 5)) == 1296
    # The count is per sample and includes every layer: conv then linear on 4*3*3 = 36 features.
    model = nn.Sequential(conv, nn.Flatten(), nn.Linear(36, 3))
    assert count_flops(model, (2, 5, 5)) == 1296 + 2 * 36 * 3


def test_count_macs_by_hand_is_half_the_flops():
    # MACs, the papers' "FLOPs": Linear 10 -> 5 is 50 multiply-accumulates (bias not counted)
    assert count_macs(nn.Linear(10, 5), (10,)) == 10 * 5
    # Conv 2 -> 4, 3x3, 5x5 input, no padding: 9 output positions * 4 out channels * (2 * 9 taps) = 648
    conv = nn.Conv2d(2, 4, kernel_size=3, bias=False)
    assert count_macs(conv, (2, 5, 5)) == 648
    assert count_macs(nn.Sequential(conv, nn.Flatten(), nn.Linear(36, 3)), (2, 5, 5)) == 648 + 36 * 3


def test_evaluation_rows_report_macs_and_flops_named_as_such():
    from types import SimpleNamespace

    from ensemble_kd.evaluation.evaluate import cost_row
    row = cost_row(nn.Linear(10, 5), (10,), torch.device("cpu"), SimpleNamespace(cost=True, latency=False))
    assert row["macs"] == 50 and row["flops"] == 100
    row = cost_row(nn.Sequential(nn.Linear(10, 5, bias=False), nn.BatchNorm1d(5)), (10,), torch.device("cpu"),
                   SimpleNamespace(cost=False, latency=False))
    assert row == {"params": 60, "params_bn_folded": 55}  # EnsembleNet's #Params


def test_latency_is_measured_only_when_asked_and_its_column_then_left_out(tmp_path, capsys):
    from ensemble_kd.cli import EVAL_COLUMNS, _finish
    from ensemble_kd.config import load_config
    from ensemble_kd.evaluation.evaluate import cost_row

    config = load_config(None, [])
    assert config.eval.latency is False
    row = {"name": "m", "acc": 0.5, **cost_row(nn.Linear(10, 5), (10,), torch.device("cpu"), config.eval)}
    assert "latency_ms" not in row and "throughput" not in row and row["macs"] == 50
    _finish(tmp_path, [row], "t", EVAL_COLUMNS)
    assert "latency" not in capsys.readouterr().out
    asked = load_config(None, ["eval.latency=true", "eval.throughput_batch=2"]).eval
    assert cost_row(nn.Linear(10, 5), (10,), torch.device("cpu"), asked)["latency_ms"] > 0


def test_cost_functions_restore_modes_and_follow_dtype():
    layers = [nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)]
    model = nn.Sequential(*layers).double()
    model.train()
    model[1].eval()  # mixed modes must come back exactly
    running_mean = model[1].running_mean.clone()
    count_flops(model, (1, 8, 8))
    latency = measure_latency(model, (1, 8, 8), repeats=3, warmup=1)
    throughput = measure_throughput(model, (1, 8, 8), batch_size=4, repeats=2, warmup=1)
    assert latency.median_ms > 0 and math.isfinite(latency.median_ms) and latency.iqr_ms >= 0
    assert throughput > 0 and math.isfinite(throughput)
    assert [m.training for m in model] == [True, False, True, True, True]
    assert torch.equal(model[1].running_mean, running_mean)  # ran in eval mode: no BN update
    with pytest.raises(ValueError, match="input_shape"):
        count_flops(model, (0, 8, 8))
    with pytest.raises(ValueError, match="repeats"):
        measure_latency(model, (1, 8, 8), repeats=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cost_on_cuda_leaves_model_in_place():
    model = nn.Linear(10, 5)
    assert measure_latency(model, (10,), device="cuda", repeats=3, warmup=1).median_ms > 0
    assert next(model.parameters()).device.type == "cpu"
    model = model.cuda()
    assert count_flops(model, (10,)) == 100
    assert measure_throughput(model, (10,), batch_size=8, repeats=2, warmup=1) > 0


class _ScriptedNet(nn.Module):
    """Each forward advances a fake clock by the next scripted duration (seconds)."""

    def __init__(self, clock: list[float], durations: list[float]):
        super().__init__()
        self.clock, self.durations, self.weight = clock, list(durations), nn.Parameter(torch.zeros(1))

    def forward(self, x):
        self.clock[0] += self.durations.pop(0)
        return x


def test_latency_is_the_median_and_iqr_of_the_timed_repeats_after_warmup(monkeypatch):
    from ensemble_kd.metrics import cost

    clock = [0.0]
    monkeypatch.setattr(cost.time, "perf_counter", lambda: clock[0])
    # Two slow warm-up passes (first-call setup), then five timed ones with one outlier.
    model = _ScriptedNet(clock, [0.5, 0.2, 0.001, 0.002, 0.003, 0.004, 0.050])
    latency = cost.measure_latency(model, (1,), repeats=5, warmup=2)
    assert not model.durations  # 2 + 5 passes, no more
    # ms [1, 2, 3, 4, 50]: median 3; inclusive quartiles 2 and 4 -> IQR 2 (the outlier moves neither).
    assert latency.median_ms == pytest.approx(3.0)
    assert latency.iqr_ms == pytest.approx(2.0)
    assert cost.latency_of([0.004]) == (pytest.approx(4.0), 0.0)
    with pytest.raises(ValueError, match="no timings"):
        cost.latency_of([])


def test_evaluation_rows_carry_latency_spread_and_ensembles_add_members_up():
    from types import SimpleNamespace

    from ensemble_kd.evaluation.evaluate import _sum_costs, cost_row

    cfg = SimpleNamespace(cost=False, latency=True, throughput_batch=2)
    row = cost_row(nn.Linear(4, 2), (4,), torch.device("cpu"), cfg)
    assert row["latency_ms"] > 0 and row["latency_ms_iqr"] >= 0
    members = [{"latency_ms": 1.0, "latency_ms_iqr": 0.1}, {"latency_ms": 2.0, "latency_ms_iqr": 0.3}]
    assert _sum_costs(members) == pytest.approx({"latency_ms": 3.0, "latency_ms_iqr": 0.4})
