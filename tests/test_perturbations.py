"""Input perturbations: ODS draws one weighting vector per sample, its direction is the gradient of
the stated objective, and its temperature defaults to the method's."""

import math

import torch
import torch.nn.functional as F

from ensemble_kd import pipeline
from ensemble_kd.config import load_config
from ensemble_kd.data import Batch
from ensemble_kd.ensemble import TeacherSet
from ensemble_kd.methods import create_method
from ensemble_kd.models import create
from ensemble_kd.perturbations import Perturbation, ods_delta


def _teachers(M=2, K=5):
    torch.manual_seed(1)
    return TeacherSet([create("small_cnn", num_classes=K, in_channels=1, width=0.25).eval() for _ in range(M)])


def test_ods_draws_a_weighting_vector_per_sample():
    teachers = _teachers()
    x = torch.randn(1, 1, 8, 8).expand(4, -1, -1, -1).contiguous()  # four copies of one image
    for kind in ("ods", "confods"):
        out = Perturbation(kind, step=4.0, mean=(0.5,), std=(0.25,))(
            Batch(x, torch.zeros(4, dtype=torch.long), torch.arange(4)), teachers, None, step=2, seed=0)
        moved = out.x - x
        for a in range(4):
            for b in range(a + 1, 4):  # one w for the batch would move the copies alike
                assert not torch.allclose(moved[a], moved[b], atol=1e-6), (kind, a, b)


def test_ods_direction_is_the_gradient_of_the_per_sample_objective():
    torch.manual_seed(0)
    model = create("small_cnn", num_classes=5, in_channels=1, width=0.25).eval()
    x01 = torch.rand(6, 1, 8, 8)
    w = torch.rand(6, 5) * 2 - 1  # (B, K): sample b's own direction in probability space
    delta = ods_delta(model, x01, w, step=2.0, temperature=4.0)
    x = x01.clone().requires_grad_()
    objective = sum((F.softmax(model(x[b:b + 1]) / 4.0, -1)[0] * w[b]).sum() for b in range(6))
    (grad,) = torch.autograd.grad(objective, x)
    torch.testing.assert_close(F.cosine_similarity(delta.flatten(1), grad.flatten(1)), torch.ones(6))
    torch.testing.assert_close(delta.flatten(1).norm(dim=1), torch.full((6,), math.sqrt(64) * 2 / 255))


def test_ods_temperature_defaults_to_the_methods_distillation_temperature():
    data = pipeline.prepare_data(load_config(None, ["device=cpu"]))

    def temperature(overrides, method):
        config = load_config(None, ["device=cpu", "perturb.kind=ods", *overrides])
        return pipeline.perturbation_of(config, data, method).temperature
    assert temperature([], create_method("latentbe")) == 4.0
    assert temperature([], create_method("kd", temperature=2.5)) == 2.5
    assert temperature(["perturb.temperature=1.5"], create_method("kd")) == 1.5  # set: it wins
    assert temperature([], create_method("meal")) == 1.0  # a method without one
