"""Which methods run on which timm/torchvision families: one training step each, a works/refused table.

    python benchmarks/ecosystem_methods.py [--size 32] [--families timm/resnet10t,...] [--methods kd,meal,...]

Per (family, method): two teachers and a student of that architecture (random weights, the
teachers as the engine runs them: BatchNorm folded), the student built as the method builds it
(EnsembleNet's multi-head, LatentBE's BatchEnsemble), bind, one loss and backward. A cell says
`works` or the sentence the library refused with (its first line).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from ensemble_kd.data.loader import Batch
from ensemble_kd.ensemble import TeacherSet
from ensemble_kd.methods import StudentOutput, create_method
from ensemble_kd.models import create, forward_with_taps

FAMILIES = {
    "timm/resnet10t": {}, "timm/resnext26ts": {}, "timm/mobilenetv3_small_050": {}, "timm/efficientnet_b0": {},
    "timm/convnext_atto": {}, "timm/vit_tiny_patch16_224": {"img_size": 32},
    "timm/swin_tiny_patch4_window7_224": {"img_size": 32, "window_size": 2},
    "torchvision/resnet18": {}, "torchvision/resnext50_32x4d": {}, "torchvision/mobilenet_v2": {},
    "torchvision/mobilenet_v3_small": {}, "torchvision/efficientnet_b0": {}, "torchvision/convnext_tiny": {},
    "torchvision/swin_t": {},
}
METHODS = {"kd": {}, "aver": {}, "aekd": {}, "aekd features": {"variant": "features"}, "meal": {},
           "ensemblenet": {}, "latentbe": {}}
NUM_CLASSES, TEACHERS, BATCH = 4, 2, 4


def one_step(arch: str, kwargs: dict, method_name: str, options: dict, size: int) -> str:
    torch.manual_seed(0)
    method = create_method(method_name.split()[0], **options)
    teachers = None
    if method.needs.teachers:
        teachers = TeacherSet([create(arch, num_classes=NUM_CLASSES, **kwargs) for _ in range(TEACHERS)])
        teachers.prepare_for_inference(fold_bn=method.needs.teacher_bn == "eval")
    student_arch, student_kwargs = method.student_spec(arch, dict(kwargs), TEACHERS if teachers else None)
    student = create(student_arch, num_classes=NUM_CLASSES, **student_kwargs).train()
    x, y = torch.randn(BATCH, 3, size, size), torch.randint(0, NUM_CLASSES, (BATCH,))
    method.bind(student, teachers, x)
    logits, taps = forward_with_taps(student, x, method.needs.student_taps)
    out = None
    if teachers is not None:
        out = teachers.outputs(x, method.needs, members=method.teacher_indices(0, TEACHERS, 0))
    loss = method.loss(Batch(x, y, torch.arange(BATCH)), StudentOutput(logits, taps), out).loss
    loss.backward()
    if not torch.isfinite(loss):
        return f"non-finite loss {loss.item()}"
    unreached = [n for n, p in student.named_parameters() if p.requires_grad and p.grad is None]
    if unreached:  # e.g. a layer whose parent reads its weight itself: trained as if it were not there
        return f"BROKEN: no gradient reaches {len(unreached)} parameters ({unreached[0]}, ...)"
    shipped = method.deployable(student)  # LatentBE's collapse back into the plain architecture
    if shipped is not None:
        shipped.eval()(x)
    return "works"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--methods", default=",".join(METHODS))
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    methods = args.methods.split(",")
    print(f"| family | {' | '.join(methods)} |")
    print(f"|{' --- |' * (len(methods) + 1)}")
    for arch in args.families.split(","):
        cells, started = [], time.perf_counter()
        for name in methods:
            try:
                cells.append(one_step(arch, FAMILIES.get(arch, {}), name, METHODS[name], args.size))
            except Exception as err:  # the table reports the refusal; it is what a user would read
                text = str(err).strip().splitlines()[0] if str(err).strip() else ""
                cells.append(f"refused: {type(err).__name__}: {text}".replace("|", "/"))
        print(f"| {arch} | {' | '.join(cells)} |", flush=True)
        print(f"  ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
