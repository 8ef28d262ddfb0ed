"""Decoding streamed images: Pillow or torchvision, JPEG draft, channels_last batches, and the
decoder named in the teacher cache's fingerprint so that a cache made with one is refused by another."""

from __future__ import annotations

import importlib.util
import io
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ensemble_kd import pipeline
from ensemble_kd.config import load_config
from ensemble_kd.data.crops import ViewPlan, ViewSpec, view_of_pixels, view_plan
from ensemble_kd.data.decode import decode_rgb, decoder_fingerprint
from ensemble_kd.data.samples import DecodeError
from ensemble_kd.data.mixing import MixSpec
from ensemble_kd.data.stream import _ViewBatches

sys.path.insert(0, str(Path(__file__).parent))
from _images import make_image_folder  # noqa: E402

PIL = pytest.importorskip("PIL.Image")


def _photo_jpegs(root: Path, count: int = 6) -> Path:
    """root/train/<a|b>/<i>.jpg and a test split: crops of scikit-learn's china.jpg, 200-260 px, quality 90."""
    from sklearn.datasets import load_sample_image

    photo = load_sample_image("china.jpg")
    rng = np.random.default_rng(0)
    for split, n in (("train", count), ("test", 2)):
        for i in range(n):
            y, x = (int(v) for v in rng.integers(0, 150, 2))
            w, h = (int(v) for v in rng.integers(200, 261, 2))
            folder = root / split / "ab"[i % 2]
            folder.mkdir(parents=True, exist_ok=True)
            PIL.fromarray(photo[y:y + 240, x:x + 320]).resize((w, h), PIL.BICUBIC).save(folder / f"{i}.jpg", quality=90)
    return root


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return _photo_jpegs(tmp_path_factory.mktemp("photos"))


def _data(root, *extra, workers=0, size=32):
    config = load_config(None, ["device=cpu", "data.name=image-folder", f"data.root={root}", f"data.views.size={size}",
                                "data.batch_size=3", f"data.workers={workers}", "data.val_fraction=0",
                                "data.mean=[0.5, 0.4, 0.3]", "data.std=[0.2, 0.25, 0.3]", *extra])
    return pipeline.prepare_data(config)


def _loader(root, *extra, workers=0, size=32):
    data = _data(root, *extra, workers=workers, size=size)
    return data.train_loader(data.config.data, seed=1)


def _epoch_x(loader, epoch=0):
    return torch.cat([b.x for b in loader.batches(epoch)])


# ----------------------------------------------------------------------------- channels_last batches

def test_batches_are_channels_last_memory_with_the_nchw_values_of_each_view(photos):
    loader = _loader(photos)
    item = _ViewBatches(loader.samples, loader.spec, MixSpec(), train=True, seed=1, policy="stop")[(2, [4, 0, 3])]
    x_u8 = item["x"]
    assert x_u8.shape == (3, 3, 32, 32) and x_u8.is_contiguous(memory_format=torch.channels_last)
    assert not x_u8.is_contiguous()  # no NHWC -> NCHW copy was made in the worker
    # the old worker: each view (H, W, 3) stacked, then transposed to contiguous NCHW
    views = []
    for i in (4, 0, 3):
        pixels, full = decode_rgb(loader.samples.read(i), "x")
        views.append(view_of_pixels(pixels, view_plan(loader.spec, *full, train=True, seed=1, epoch=2, index=i), full))
    old = torch.from_numpy(np.stack([v.numpy() for v in views])).permute(0, 3, 1, 2).contiguous()
    assert torch.equal(x_u8, old)
    batch = next(iter(loader.batches_at([torch.tensor([4, 0, 3])], 2)))
    assert batch.x.is_contiguous(memory_format=torch.channels_last)
    mean, std = torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1), torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    assert torch.equal(batch.x, (old.float() / 255 - mean) / std)  # the normalised values, bit for bit


# ----------------------------------------------------------------------------- the decoders

def test_pil_and_torchvision_decode_every_mode_alike_and_name_broken_files(tmp_path):
    pytest.importorskip("torchvision")
    root = make_image_folder(tmp_path / "modes", per_class=5, sizes=(20, 40))
    files = sorted((root / "train").rglob("*.*"))
    for path in files:
        data = path.read_bytes()
        pil, size = decode_rgb(data, str(path), decoder="pil")
        tv, tv_size = decode_rgb(data, str(path), decoder="torchvision")
        assert size == tv_size == (pil.shape[1], pil.shape[0]) and tv.shape == pil.shape
        if path.suffix == ".png":  # lossless: one right answer
            assert torch.equal(tv, pil), path
        else:  # both libjpeg-turbo with the same settings here; another version may round otherwise
            assert (tv.int() - pil.int()).abs().max() <= 1, path
    assert {p.suffix for p in files} == {".jpg", ".png"}
    bmp = io.BytesIO()
    PIL.new("RGB", (9, 7), (10, 200, 30)).save(bmp, format="BMP")  # torchvision does not read BMP: Pillow does
    pixels, _ = decode_rgb(bmp.getvalue(), "x.bmp", decoder="torchvision")
    assert pixels.shape == (7, 9, 3) and pixels[3, 4].tolist() == [10, 200, 30]
    deep = io.BytesIO()  # a 16-bit PNG: torchvision reads it as uint16, Pillow's 8-bit conversion is used
    PIL.fromarray((np.arange(600).reshape(20, 30) * 97 % 65536).astype(np.uint16)).save(deep, format="PNG")
    pixels, _ = decode_rgb(deep.getvalue(), "deep.png", decoder="torchvision")
    assert pixels.dtype == torch.uint8 and torch.equal(pixels, decode_rgb(deep.getvalue(), "deep.png")[0])
    data = files[0].read_bytes() if files[0].suffix == ".jpg" else next(p for p in files if p.suffix == ".jpg").read_bytes()
    for decoder in ("pil", "torchvision"):
        with pytest.raises(DecodeError, match=r"cannot decode image broken\.jpg"):
            decode_rgb(data[: len(data) // 2], "broken.jpg", decoder=decoder)


def test_the_torchvision_decoder_gives_the_pil_decoders_training_views(photos):
    pytest.importorskip("torchvision")
    pil, tv = _epoch_x(_loader(photos)), _epoch_x(_loader(photos, "data.decoder=torchvision"))
    assert (pil - tv).abs().max() <= 1 / 255 / 0.2 + 1e-6  # at most one level of the 0..255 scale


def test_config_refuses_draft_without_pillow_and_a_missing_torchvision(photos, monkeypatch):
    with pytest.raises(ValueError, match=r"data.draft .* set data.decoder=pil or data.draft=false"):
        _loader(photos, "data.decoder=torchvision", "data.draft=true")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchvision" else real(name, *a))
    with pytest.raises(ValueError, match=r"data.decoder=torchvision needs torchvision .*set data.decoder=pil"):
        ViewSpec(decoder="torchvision")


# ----------------------------------------------------------------------------- JPEG draft

def test_draft_scale_is_the_largest_that_keeps_the_views_pixels():
    assert ViewPlan((0, 0, 100, 90), (32, 32), None, False).draft_scale() == 2  # 100 // 4 = 25 < 32
    assert ViewPlan((5, 5, 300, 256), (32, 32), None, False).draft_scale() == 8
    assert ViewPlan((0, 0, 63, 300), (32, 32), None, False).draft_scale() == 1  # 63 // 2 < 32: no upsampling
    # eval: the whole image resized to its shorter side 36 (size 32 / 0.875), then the center crop
    plan = view_plan(ViewSpec(size=32), 300, 150, train=False, seed=0, epoch=None, index=0)
    assert plan.resize == (72, 36) and plan.draft_scale() == 4


def _snapped(plan: ViewPlan, scale: int, full) -> ViewPlan:
    """The plan with its box on the grid of a 1/scale decode, as view_of_pixels maps it there."""
    left, top, w, h = plan.box
    fx, fy = -(-full[0] // scale) / full[0], -(-full[1] // scale) / full[1]
    x0, y0 = (int(np.floor(v + 0.5)) for v in (left * fx, top * fy))
    x1, y1 = (int(np.floor(v + 0.5)) for v in ((left + w) * fx, (top + h) * fy))
    box = (x0 * scale, y0 * scale, min(full[0], x1 * scale) - x0 * scale, min(full[1], y1 * scale) - y0 * scale)
    return ViewPlan(box, plan.resize, plan.crop, plan.flip)


def test_draft_decodes_less_and_stays_within_its_tolerance_of_the_full_decode(photos):
    """A draft view differs from the full decode's by libjpeg's scaled IDCT (a smoothing filter:
    under 2.5 levels of 255 per view on average against the full decode of the same region) and by its
    box snapped to the reduced grid (each edge moves under scale/2 full-size pixels, half an output
    pixel at most: another crop as likely as the first, which moves textured pixels most)."""
    spec = ViewSpec(size=32, draft=True)
    files = sorted((photos / "train").rglob("*.jpg"))
    decoder_diffs, scales = [], set()
    for i, path in enumerate(files):
        data = path.read_bytes()
        full_pixels, full = decode_rgb(data, "x")
        for epoch in range(4):
            plan = view_plan(spec, *full, train=True, seed=0, epoch=epoch, index=i)
            scale = plan.draft_scale()
            pixels, size = decode_rgb(data, "x", scale_for=lambda w, h: scale)
            assert size == full and pixels.shape[1] == -(-full[0] // scale)  # ceil(W / scale): decoded smaller
            scales.add(scale)
            draft = view_of_pixels(pixels, plan, full)
            snapped = _snapped(plan, scale, full)
            assert all(abs(a - b) <= scale / 2 + 1 for a, b in zip(snapped.box, plan.box))
            same_region = view_of_pixels(full_pixels, snapped, full)
            decoder_diffs.append(float((draft.float() - same_region.float()).abs().mean()))
            again, _ = decode_rgb(data, "x", scale_for=lambda w, h: scale)
            assert torch.equal(view_of_pixels(again, plan, full), draft)  # a pure function of the bytes and plan
    assert {2, 4} <= scales
    assert np.mean(decoder_diffs) < 2.5 and max(decoder_diffs) < 5, decoder_diffs


def test_draft_training_views_are_the_same_with_0_and_2_workers_and_eval_views_decode_in_full(photos):
    full = _epoch_x(_loader(photos))
    drafted = [_epoch_x(_loader(photos, "data.draft=true", workers=w)) for w in (0, 2)]
    assert torch.equal(drafted[0], drafted[1])
    assert not torch.equal(drafted[0], full)
    # eval views (shorter side 36 of 200-260 px photos: draft 4 would apply) are never drafted
    tests = [torch.cat([b.x for b in _data(photos, *extra).test.batches(0)]) for extra in ([], ["data.draft=true"])]
    assert torch.equal(tests[0], tests[1])


# ----------------------------------------------------------------------------- the fingerprint

def test_the_views_fingerprint_names_the_decoder_its_version_and_draft(photos, monkeypatch):
    import PIL as pil_package

    base = _loader(photos).views_fingerprint()
    assert base["decoder"].startswith(f"pil {pil_package.__version__}, libjpeg") and base["draft"] is False
    assert base["resize"] == f"torch {torch.__version__.split('+')[0]}"
    assert _loader(photos, "data.draft=true").views_fingerprint()["draft"] is True
    monkeypatch.setattr(pil_package, "__version__", "0.1.0")
    assert decoder_fingerprint("pil", False)["decoder"].startswith("pil 0.1.0, ")
    if importlib.util.find_spec("torchvision"):
        assert decoder_fingerprint("torchvision", False)["decoder"].startswith("torchvision ")


def test_a_cache_made_with_one_decoder_is_refused_by_a_run_with_another(photos, tmp_path, monkeypatch):
    from ensemble_kd.engine.run_dir import RunDirError, check_resumable
    from ensemble_kd.engine.runs import write_config
    from ensemble_kd.ensemble import TeacherSet
    from ensemble_kd.ensemble.cache import CacheMismatchError, build_cache, open_cache
    from ensemble_kd.models import create

    torch.manual_seed(0)
    teachers = TeacherSet([create("small_cnn", num_classes=2, in_channels=3, width=0.25)])
    cache = build_cache(teachers, _loader(photos), tmp_path / "cache", epochs=1, dtype="float32")
    open_cache(cache, teachers, _loader(photos))  # the same decoder: accepted
    with pytest.raises(CacheMismatchError, match=r"draft=False.* draft=True"):
        open_cache(cache, teachers, _loader(photos, "data.draft=true"))
    if importlib.util.find_spec("torchvision"):
        with pytest.raises(CacheMismatchError, match=r"decoder=pil .*decoder=torchvision"):
            open_cache(cache, teachers, _loader(photos, "data.decoder=torchvision"))
    import PIL as pil_package

    monkeypatch.setattr(pil_package, "__version__", "0.1.0")  # another Pillow moves pixels too
    with pytest.raises(CacheMismatchError, match=r"decoder=pil \d.* decoder=pil 0\.1\.0"):
        open_cache(cache, teachers, _loader(photos))
    monkeypatch.undo()
    # a run resumed with another decoder is refused before it trains (data.decoder is not resume-safe)
    config = load_config(None, ["data.name=image-folder", f"data.root={photos}"])
    write_config(tmp_path / "run", config, "distill")
    with pytest.raises(RunDirError, match=r"data.decoder \('pil' -> 'torchvision'\)"):
        check_resumable(tmp_path / "run", config.model_copy(update={
            "data": config.data.model_copy(update={"decoder": "torchvision"})}))



@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_pinned_batches_reach_the_gpu_channels_last_with_the_cpu_values(photos):
    def epoch(device):
        data = _data(photos, f"device={device}", workers=2)
        loader = data.train_loader(data.config.data, seed=1)
        return torch.cat([b.x for b in loader.batches(0)])

    gpu, cpu = epoch("cuda"), epoch("cpu")
    assert gpu.is_cuda and gpu.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(gpu.cpu(), cpu)


def test_normalising_a_channels_last_batch_gives_the_nchw_values_bit_for_bit():
    from ensemble_kd.data.views import normalize

    g = torch.Generator().manual_seed(0)
    nhwc = torch.randint(0, 256, (4, 9, 7, 3), dtype=torch.uint8, generator=g)
    x = nhwc.permute(0, 3, 1, 2)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    got = normalize(x, mean, std)
    assert got.is_contiguous(memory_format=torch.channels_last)
    want = (x.contiguous().float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert torch.equal(got, want)
