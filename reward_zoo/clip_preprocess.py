"""CLIP image preprocessing in torch, differentiable: what ``CLIPImageProcessor`` and OpenCLIP's transforms do to an
image, on frames ``(n, 3, h, w)`` in [0, 1], so gradients reach the pixels.

Two ways to fit a frame into CLIP's square input, after the preprocessors of the checkpoints the zoo loads:

- ``"crop"`` (``CLIPImageProcessor``, OpenCLIP's default eval transform; ``clip_score``, ``laion_aesthetic``,
  ``pickscore``): resize the shortest side to ``image_size``, centre-crop a square;
- ``"pad"`` (OpenCLIP's ``ResizeMaxSize``, which HPSv2 scores with): resize the longest side to ``image_size``, pad
  the short side with black to a square, centred.

Both resize bicubically with antialiasing and then normalise with the checkpoint's mean and std.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

# The normalisation every OpenAI CLIP checkpoint was trained with (CLIPImageProcessor's image_mean / image_std); the
# LAION OpenCLIP models (CLIP-H: PickScore, HPSv2) use the same values.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
RESIZE_MODES = ("crop", "pad")


def _normalise(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    c = x.shape[1]
    return (x - mean.view(1, c, 1, 1)) / std.view(1, c, 1, 1)


def clip_pixel_values(frames: Tensor, image_size: int, mean: Tensor, std: Tensor) -> Tensor:
    """CLIP ``pixel_values`` ``(n, 3, s, s)`` from frames ``(n, 3, h, w)`` in [0, 1], differentiably.

    Mirrors ``CLIPImageProcessor``: resize the shortest side to ``image_size`` (bicubic, antialiased, the long side
    truncated like transformers' ``get_resize_output_image_size``), centre-crop a square, normalise with ``mean`` and
    ``std``. The resized frame is clamped to [0, 1] as an 8-bit image would be.
    """
    n, c, h, w = frames.shape
    short, long = min(h, w), max(h, w)
    new_long = int(image_size * long / short)
    size = (image_size, new_long) if h <= w else (new_long, image_size)
    x = F.interpolate(frames, size=size, mode="bicubic", align_corners=False, antialias=True).clamp(0.0, 1.0)
    top, left = (size[0] - image_size) // 2, (size[1] - image_size) // 2
    x = x[..., top:top + image_size, left:left + image_size]  # (n, c, s, s)
    return _normalise(x, mean, std)


def padded_pixel_values(frames: Tensor, image_size: int, mean: Tensor, std: Tensor) -> Tensor:
    """CLIP ``pixel_values`` ``(n, 3, s, s)`` from frames ``(n, 3, h, w)`` in [0, 1], resized to fit and padded.

    Mirrors OpenCLIP's ``ResizeMaxSize`` eval transform: scale so the longest side is ``image_size`` (the other side
    rounded), resize bicubically with antialiasing (clamped to [0, 1]), pad with 0 (black, before normalisation) to a
    square with the extra column/row on the right/bottom, normalise. A square frame is only resized. (A non-square
    frame whose long side already is ``image_size`` is padded too; ``ResizeMaxSize`` would leave it non-square.)
    """
    n, c, h, w = frames.shape
    size = (round(h * image_size / max(h, w)), round(w * image_size / max(h, w)))
    x = frames
    if size != (h, w):
        x = F.interpolate(frames, size=size, mode="bicubic", align_corners=False, antialias=True).clamp(0.0, 1.0)
    pad_h, pad_w = image_size - size[0], image_size - size[1]
    x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))  # (n, c, s, s)
    return _normalise(x, mean, std)


def preprocess_frames(frames: Tensor, image_size: int, mean: Tensor, std: Tensor, resize: str = "crop") -> Tensor:
    """``clip_pixel_values`` (``resize="crop"``) or ``padded_pixel_values`` (``resize="pad"``)."""
    if resize == "crop":
        return clip_pixel_values(frames, image_size, mean, std)
    if resize == "pad":
        return padded_pixel_values(frames, image_size, mean, std)
    raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
