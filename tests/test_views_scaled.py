"""Seeded views for images of any size (RandomResizedCrop, resize + center crop) and seeded mixup / CutMix."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ensemble_kd.data import AugmentSpec, DeviceLoader, ImageDataset
from ensemble_kd.data.crops import ViewSpec, center_crop_box, rrc_box, view_flip, view_of_pixels, view_plan
from ensemble_kd.data.mixing import MixSpec, mix_params, mix_views
from ensemble_kd.data.views import view_params

PIL = pytest.importorskip("PIL.Image")


def test_rrc_boxes_lie_inside_and_follow_scale_and_ratio():
    for index in range(500):
        left, top, w, h = rrc_box(211, 137, seed=3, epoch=1, index=index, scale=(0.2, 0.9), ratio=(0.5, 2.0))
        assert 0 <= left and left + w <= 211 and 0 <= top and top + h <= 137
        # sides are rounded to integers, so area and aspect hold up to a pixel
        assert 0.2 * 211 * 137 * 0.9 <= (w + 1) * (h + 1) and (w - 1) * (h - 1) <= 0.9 * 211 * 137
        assert 0.5 * (h - 1) / (h + 1) <= w / h <= 2.0 * (h + 1) / (h - 1)


def test_rrc_box_is_a_pure_function_of_seed_epoch_index():
    box = rrc_box(300, 200, seed=5, epoch=2, index=17)
    assert box == rrc_box(300, 200, seed=5, epoch=2, index=17)
    others = {rrc_box(300, 200, seed=s, epoch=e, index=i) for s, e, i in [(6, 2, 17), (5, 3, 17), (5, 2, 18)]}
    assert box not in others


def test_rrc_box_falls_back_to_a_centered_crop_at_the_nearest_ratio():
    # a 1000x10 strip: no box of ratio 3/4..4/3 with 8-100% of the area fits, every attempt fails
    assert rrc_box(1000, 10, seed=0, epoch=0, index=0) == ((1000 - 13) // 2, 0, 13, 10)
    assert rrc_box(10, 1000, seed=0, epoch=0, index=0) == (0, (1000 - 13) // 2, 10, 13)


def test_rrc_box_distribution_matches_torchvisions():
    transforms = pytest.importorskip("torchvision.transforms")
    img = PIL.new("RGB", (160, 120))
    torch.manual_seed(0)
    theirs = [transforms.RandomResizedCrop.get_params(img, [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(3000)]
    ours = [rrc_box(160, 120, seed=0, epoch=0, index=i) for i in range(3000)]
    area_t = np.array([h * w for _, _, h, w in theirs]) / (160 * 120)
    area_o = np.array([w * h for _, _, w, h in ours]) / (160 * 120)
    aspect_t = np.log([w / h for _, _, h, w in theirs])
    aspect_o = np.log([w / h for _, _, w, h in ours])
    assert abs(area_t.mean() - area_o.mean()) < 0.03 and abs(area_t.std() - area_o.std()) < 0.03
    assert abs(aspect_t.mean() - aspect_o.mean()) < 0.03 and abs(aspect_t.std() - aspect_o.std()) < 0.03


def _image(w=211, h=137, seed=0):
    return PIL.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def view_of_image(img, spec, *, train, seed, epoch, index):
    """The (S, S, 3) uint8 view of a full-size PIL image, as a numpy array."""
    plan = view_plan(spec, img.width, img.height, train=train, seed=seed, epoch=epoch, index=index)
    return view_of_pixels(torch.from_numpy(np.array(img)), plan, img.size).numpy()


@pytest.mark.parametrize("size", [48, 200])  # down- and upsampling
def test_views_are_torchvisions_pixels_for_the_same_box(size):
    tvf = pytest.importorskip("torchvision.transforms.v2.functional")
    transforms = pytest.importorskip("torchvision.transforms.v2")
    img, spec = _image(), ViewSpec(size=size, flip=False)
    chw = torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous()
    left, top, w, h = rrc_box(img.width, img.height, seed=1, epoch=2, index=3)
    got = view_of_image(img, spec, train=True, seed=1, epoch=2, index=3)
    want = tvf.resized_crop(chw, top, left, h, w, [size, size], antialias=True).permute(1, 2, 0).numpy()
    assert np.array_equal(got, want)  # torchvision's (v2) tensor transform, exactly
    pil = np.asarray(tvf.resized_crop(img, top, left, h, w, [size, size], antialias=True)).astype(int)
    assert np.abs(got - pil).max() <= 1 and np.abs(got - pil).mean() < 0.02  # Pillow's resize, up to rounding
    eval_view = transforms.Compose([transforms.Resize(spec.eval_resize, antialias=True), transforms.CenterCrop(size)])
    got = view_of_image(img, spec, train=False, seed=1, epoch=None, index=3)
    assert np.array_equal(got, eval_view(chw).permute(1, 2, 0).numpy())
    assert np.abs(got - np.asarray(eval_view(img)).astype(int)).max() <= 1


def test_train_flip_is_a_mirror_drawn_like_the_in_memory_flip():
    img = _image()
    flipped = [i for i in range(40) if view_flip(seed=4, epoch=1, index=i)]
    assert 5 < len(flipped) < 35
    _, _, flips = view_params(torch.arange(40), epoch=1, seed=4, spec=AugmentSpec(0, True))
    assert flipped == torch.nonzero(flips).flatten().tolist()
    i = flipped[0]
    on = view_of_image(img, ViewSpec(size=32), train=True, seed=4, epoch=1, index=i)
    off = view_of_image(img, ViewSpec(size=32, flip=False), train=True, seed=4, epoch=1, index=i)
    assert np.array_equal(on, off[:, ::-1])


def test_center_crop_box_hand_case():
    # 300x200 to shorter side 64: 96x64, then the center 56x56 starts at (20, 4)
    assert center_crop_box(300, 200, 64, 56) == ((96, 64), (20, 4, 76, 60))
    assert ViewSpec(size=224).eval_resize == 256


def test_view_spec_refuses_bad_values():
    with pytest.raises(ValueError, match="views.train"):
        ViewSpec(train="random")
    with pytest.raises(ValueError, match="views.scale"):
        ViewSpec(scale=(0.5, 0.2))
    with pytest.raises(ValueError, match="views.mix_prob"):
        MixSpec(mixup_alpha=1.0, mix_prob=1.5)


# ----------------------------------------------------------------------------- mixing

def _params(index, spec, epoch=0, seed=0, n=1000, hw=(16, 16)):
    return mix_params(torch.as_tensor(index), epoch=epoch, seed=seed, num_samples=n, height=hw[0], width=hw[1],
                      spec=spec)


def test_mixup_partner_and_lambda_draws():
    alpha = 0.4
    p = _params(torch.arange(4000), MixSpec(mixup_alpha=alpha))
    assert not bool((p.partner == torch.arange(4000)).any()) and int(p.partner.max()) < 1000
    assert not bool(p.cutmix.any()) and bool(((p.lam >= 0) & (p.lam <= 1)).all())
    # Beta(a, a): mean 1/2, variance 1 / (4 (2a + 1))
    assert abs(float(p.lam.mean()) - 0.5) < 0.02
    assert abs(float(p.lam.var()) - 1 / (4 * (2 * alpha + 1))) < 0.01
    again = _params(torch.tensor([7, 3, 3999]), MixSpec(mixup_alpha=alpha))  # another batch, the same draws
    assert torch.equal(again.partner, p.partner[[7, 3, 3999]]) and torch.equal(again.lam, p.lam[[7, 3, 3999]])
    other_epoch = _params(torch.arange(4000), MixSpec(mixup_alpha=alpha), epoch=1)
    assert not torch.equal(other_epoch.partner, p.partner)


def test_mix_prob_leaves_the_other_samples_alone():
    p = _params(torch.arange(2000), MixSpec(mixup_alpha=1.0, cutmix_alpha=1.0, mix_prob=0.3))
    mixed = p.partner != torch.arange(2000)
    assert abs(float(mixed.float().mean()) - 0.3) < 0.04
    assert bool((p.lam[~mixed] == 1).all()) and not bool(p.cutmix[~mixed].any())
    assert abs(float(p.cutmix[mixed].float().mean()) - 0.5) < 0.06  # both on: CutMix for half of the mixed


def test_cutmix_lambda_is_the_area_kept():
    p = _params(torch.arange(300), MixSpec(cutmix_alpha=1.0), hw=(12, 20))
    y0, y1, x0, x1 = p.box.unbind(1)
    assert bool(p.cutmix.all())
    torch.testing.assert_close(p.lam, 1 - ((y1 - y0) * (x1 - x0)).double() / 240)
    x = torch.zeros(300, 3, 12, 20)
    xp = torch.ones(300, 3, 12, 20)
    y = torch.zeros(300, dtype=torch.long)
    mixed, target = mix_views(x, xp, y, torch.ones(300, dtype=torch.long), p, 4)
    torch.testing.assert_close(mixed.mean((1, 2, 3)), (1 - p.lam).float())  # the pasted fraction is the partner's
    torch.testing.assert_close(target[:, 0], p.lam.float())
    torch.testing.assert_close(target[:, 1], (1 - p.lam).float())
    torch.testing.assert_close(target.sum(1), torch.ones(300))


def test_mixup_blends_pixels_and_targets():
    p = _params(torch.arange(8), MixSpec(mixup_alpha=1.0))
    x, xp = torch.randn(8, 3, 4, 4), torch.randn(8, 3, 4, 4)
    y, yp = torch.arange(8) % 3, (torch.arange(8) + 1) % 3
    mixed, target = mix_views(x, xp, y, yp, p, 3)
    lam = p.lam.float().view(8, 1, 1, 1)
    torch.testing.assert_close(mixed, lam * x + (1 - lam) * xp)
    assert torch.equal(target.argmax(1) == y, p.lam.float() > 0.5)


def test_device_loader_mixes_the_same_way_for_any_batching():
    g = torch.Generator().manual_seed(0)
    data = ImageDataset(torch.randint(0, 256, (50, 3, 8, 8), generator=g, dtype=torch.uint8),
                        torch.arange(50) % 5, tuple("abcde"))
    kw = dict(mean=(0.5,) * 3, std=(0.25,) * 3, spec=AugmentSpec(1, True), seed=3,
              mix=MixSpec(mixup_alpha=0.5, cutmix_alpha=1.0, mix_prob=0.8))
    a = DeviceLoader(data, batch_size=10, **kw)
    b = DeviceLoader(data, batch_size=7, **kw)
    rows = {}
    for batch in a.batches(2):
        assert batch.target.shape == (10, 5) and torch.allclose(batch.target.sum(1), torch.ones(10))
        rows.update({int(i): (x, t) for i, x, t in zip(batch.index, batch.x, batch.target)})
    for batch in b.batches_at([torch.tensor([4, 31, 9]), torch.tensor([0])], 2):
        for i, x, t in zip(batch.index, batch.x, batch.target):
            if int(i) in rows:
                assert torch.equal(x, rows[int(i)][0]) and torch.equal(t, rows[int(i)][1])
    plain = DeviceLoader(data, batch_size=10, **{**kw, "mix": MixSpec()})
    assert all(batch.target is None for batch in plain.batches(2))


@pytest.mark.parametrize("name, options", [("ce", {}), ("aver", {"alpha": 0.0}), ("kd", {"alpha": 0.0}),
                                           ("latentbe", {"alpha": 0.0, "factor_decay": 0.0})])
def test_methods_compare_with_the_soft_targets_of_mixed_batches(name, options):
    from ensemble_kd.data import Batch
    from ensemble_kd.methods import StudentOutput, TeacherOutput, create_method

    torch.manual_seed(0)
    logits, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 0, 1])
    target = torch.softmax(torch.randn(6, 4), -1)
    method = create_method(name, **options)
    members = torch.randn(2, 6, 4)
    student = StudentOutput(members.mean(0), {"members_out": members}) if name == "latentbe" else \
        StudentOutput(logits, {})
    teachers = TeacherOutput(torch.randn(2, 6, 4), {})
    soft = method.loss(Batch(None, y, torch.arange(6), target), student, teachers).loss
    hard = method.loss(Batch(None, y, torch.arange(6)), student, teachers).loss
    z = members.flatten(0, 1) if name == "latentbe" else logits
    want = torch.nn.functional.cross_entropy(z, target.repeat(2, 1) if name == "latentbe" else target)
    torch.testing.assert_close(soft, want)
    assert not torch.allclose(soft, hard)
