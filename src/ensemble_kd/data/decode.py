"""Encoded image bytes -> (H, W, 3) uint8 pixels, by the decoder that data.decoder names.

`pil`: Pillow (with its libjpeg-turbo for JPEGs). With `draft`, a JPEG is decoded at 1/2, 1/4 or
1/8 scale in the DCT domain (libjpeg's scaled IDCT) when the region its view resizes still has
at least the view's pixels at that scale: less to decode, and other pixels than a full decode.
`torchvision`: torchvision.io.decode_image (its own libjpeg-turbo, libpng, libwebp) for JPEG, PNG,
WebP and GIF, Pillow for what it cannot read; it returns the pixels in place (no RGBX copy).

Both are libjpeg-turbo with the same settings, so they agree on the JPEGs and PNGs we test, but
another version of either may move pixels: `decoder_fingerprint` names the decoder, its version
and the draft setting, and the teacher cache refuses a run whose decoder differs from its own.
"""

from __future__ import annotations

import importlib.util
import io
import warnings
from typing import Callable

import numpy as np
import torch

from .samples import DecodeError

__all__ = ["DECODERS", "check_decoder", "decode_rgb", "decoder_fingerprint", "open_rgb"]

DECODERS = ("pil", "torchvision")


def check_decoder(decoder: str, draft: bool) -> None:
    """Refuse, in one sentence, a decoder that is unknown or not installed, and draft without Pillow."""
    if decoder not in DECODERS:
        raise ValueError(f"data.decoder must be one of {', '.join(DECODERS)}, got {decoder!r}.")
    if decoder == "torchvision" and importlib.util.find_spec("torchvision") is None:
        raise ValueError("data.decoder=torchvision needs torchvision (pip install 'ensemble-kd[vision]'); "
                         "install it or set data.decoder=pil.")
    if draft and decoder != "pil":
        raise ValueError("data.draft decodes JPEGs at reduced scale with Pillow; torchvision's decoder has no "
                         "such mode: set data.decoder=pil or data.draft=false.")


def decoder_fingerprint(decoder: str, draft: bool) -> dict:
    """What the decoded pixels depend on besides the bytes: the decoder and its version, draft, and
    the resize (torch's antialiased bilinear, data/crops.py): named in the teacher cache's fingerprint."""
    if decoder == "pil":
        import PIL
        from PIL import features

        jpeg = features.version("libjpeg_turbo")
        name = f"pil {PIL.__version__}, " + (f"libjpeg-turbo {jpeg}" if jpeg else f"libjpeg {features.version('jpg')}")
    else:
        import torchvision

        name = f"torchvision {torchvision.__version__.split('+')[0]}"
    return {"decoder": name, "draft": bool(draft), "resize": f"torch {torch.__version__.split('+')[0]}"}


def open_rgb(data: bytes, what: str):
    """The decoded RGB PIL image of encoded bytes; DecodeError naming `what` when they are no image."""
    return _open(data, what, None)[0]


def _open(data: bytes, what: str, scale_for: Callable[[int, int], int] | None):
    """(RGB PIL image, its full (width, height)); `scale_for(width, height)` is the JPEG draft scale
    (1, 2, 4 or 8) to decode at; other formats ignore it."""
    from PIL import Image

    try:
        im = Image.open(io.BytesIO(data))  # in memory: nothing to close
        full = im.size
        scale = scale_for(*full) if scale_for is not None else 1
        if scale > 1:  # Pillow takes the largest libjpeg scale that keeps at least this size: exactly `scale`
            im.draft("RGB", (im.width // scale, im.height // scale))
        im.load()
        return (im if im.mode == "RGB" else im.convert("RGB")), full  # CMYK, palette, grayscale, RGBA
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DecodeError(f"cannot decode image {what} ({err})") from None


def _pil_pixels(data: bytes, what: str, scale_for) -> tuple[torch.Tensor, tuple[int, int]]:
    image, full = _open(data, what, scale_for)
    with warnings.catch_warnings():  # a read-only array: the views only read it
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.asarray(image)), full


def _torchvision_pixels(data: bytes, what: str) -> tuple[torch.Tensor, tuple[int, int]] | None:
    from torchvision.io import ImageReadMode, decode_image

    try:
        chw = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError:
        return None  # a format it does not read, or a broken file: Pillow decodes it or names it
    if chw.dtype != torch.uint8:  # a 16-bit PNG: Pillow's 8-bit conversion, as the pil decoder's
        return None
    if chw.dim() == 4:  # an animated GIF: its first frame, as Pillow's
        chw = chw[0]
    hwc = chw.permute(1, 2, 0)  # the decoder's own (H, W, 3) memory: no copy
    return hwc, (hwc.shape[1], hwc.shape[0])


def decode_rgb(data: bytes, what: str, *, decoder: str = "pil",
               scale_for: Callable[[int, int], int] | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
    """((H, W, 3) uint8 pixels, (full width, full height)) of encoded bytes; the pixels are smaller than
    the full size when `scale_for` (pil only) asked for a JPEG draft. DecodeError names `what`."""
    if decoder == "torchvision":
        found = _torchvision_pixels(data, what)
        if found is not None:
            return found
        scale_for = None
    return _pil_pixels(data, what, scale_for)
