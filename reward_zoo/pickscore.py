"""PickScore (Kirstain et al., arXiv 2305.01569, "Pick-a-Pic"): a CLIP-H fine-tuned on human picks between images.

``pickscore`` scores a video as PickScore scores an image, frame by frame: ``logit_scale.exp() * cos(text, image)``
of the checkpoint's CLIP embeddings, averaged over ``num_frames`` evenly spread frames. This is how FastVideo and
Flow-Factory use PickScore on videos. The checkpoint is the published ``transformers`` ``CLIPModel``
(``yuvalkirstain/PickScore_v1``) with the processor of the CLIP-H it was fine-tuned from
(``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``), as the authors' README loads them. Frames are preprocessed in torch
exactly as that ``CLIPImageProcessor`` does (:mod:`reward_zoo.clip_preprocess`), so gradients reach the pixels.

Like ``clip_score``, the CLIP is a frozen pretrained backbone named by ``config.json`` and kept out of the reward's
``state_dict``. :class:`CLIPPreference` is the scoring shared with ``hpsv2`` (:mod:`reward_zoo.hpsv2`).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from reward_zoo.alignment import (
    CLIPImageEncoder,
    CLIPTextEncoder,
    exclude_from_state_dict,
    frame_indices,
    load_clip,
    prompt_embeddings,
)
from reward_zoo.base import RewardModel
from reward_zoo.registry import register_reward

PICKSCORE_PAPER = "https://arxiv.org/abs/2305.01569"
PICKSCORE_REPO = "https://github.com/yuvalkirstain/PickScore"
PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
CLIP_H_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
MODEL_CARD = """---
{{ card_data }}
---

# pickscore

PickScore (Kirstain et al., [arXiv 2305.01569](https://arxiv.org/abs/2305.01569)) as a `reward_zoo` reward:
`logit_scale.exp() * cos(text, image)` of a CLIP-H fine-tuned on Pick-a-Pic, per sampled frame, averaged.

- Source: the `transformers` checkpoint named by `model_name_or_path` in `config.json` (default
  `yuvalkirstain/PickScore_v1`, pinned with `model_revision`) and the processor of
  `laion/CLIP-ViT-H-14-laion2B-s32B-b79K`; scoring as in {{ repo_url }} (revision
  f79607ff68609c1e6dfa78cba38afeea4c248df1).
- Scores: `preference` (= `overall`) in [-logit_scale.exp(), logit_scale.exp()] = [-100, 100] with the published
  weights; generated images score about 18-24. Differentiable (torch preprocessing).
- Input: any frame rate (frames sampled by index); frames resized and centre-cropped to 224x224 as
  `CLIPImageProcessor` does.
- Parity: equals the authors' README computation (`CLIPProcessor` on PIL frames, `get_image_features` /
  `get_text_features`) on tiny random CLIPs within 1e-5 at the model's input size (measured 7e-7) and 2e-2 on
  resized frames (measured 5e-3, 8-bit PIL against float resampling): `python -m pytest tests/test_reward_pickscore.py`.
- Licence: MIT (the PickScore code repository); the weights' own terms are not verified here.
"""


def check_num_frames(num_frames: int | None) -> int | None:
    """``num_frames`` unchanged, or a one-line error unless it is a positive integer or None."""
    if num_frames is not None and (isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1):
        raise ValueError(f"num_frames must be a positive integer or None, got {num_frames!r}")
    return num_frames


class CLIPPreference(RewardModel):
    """A CLIP preference model scored per frame: ``scale * cos(image_embed(frame), text_embed(prompt))``, averaged
    over ``num_frames`` evenly spread frames (first and last included).

    Subclasses build ``self.image_encoder`` (:class:`~reward_zoo.alignment.CLIPImageEncoder`), ``self.text_encoder``,
    ``self.tokenizer`` and the buffer ``self.scale`` with :meth:`set_clip`. The text embedding is computed without
    gradients; gradients flow through the image tower to the pixels. Frames are sampled by index, so ``fps`` is
    accepted and ignored.
    """

    dimensions = ("preference",)
    differentiable = True
    requires_prompts = True
    num_frames: int | None = None

    def set_clip(self, clip, tokenizer, resize: str, scale_by_logit: bool, mean=None, std=None) -> None:
        """Keep ``clip``'s two towers (the image tower preprocessing with ``resize``), the tokenizer and the score
        scale: ``logit_scale.exp()`` when ``scale_by_logit``, else 1 (the plain cosine)."""
        self.image_encoder = CLIPImageEncoder(clip, resize=resize)
        if mean is not None:
            self.image_encoder.mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
            self.image_encoder.std.copy_(torch.as_tensor(std, dtype=torch.float32))
        self.text_encoder = CLIPTextEncoder(clip)
        self.tokenizer = tokenizer
        scale = clip.logit_scale.detach().float().exp() if scale_by_logit else torch.tensor(1.0)
        self.register_buffer("scale", scale.reshape(()).clone(), persistent=False)

    def train(self, mode: bool = True) -> CLIPPreference:
        """Keep the CLIP towers in eval mode whatever the parent module does (a judge scores deterministically)."""
        super().train(mode)
        self.image_encoder.eval()
        self.text_encoder.eval()
        return self

    def frame_scores(self, videos: Tensor, prompts: list[str]) -> Tensor:
        """Per-frame scores ``(b, k)`` of the ``k`` sampled frames."""
        b, t = videos.shape[:2]
        frames = videos[:, frame_indices(t, self.num_frames, videos.device)]  # (b, k, c, h, w)
        k = frames.shape[1]
        image = F.normalize(self.image_encoder(frames.flatten(0, 1)).float(), dim=-1).view(b, k, -1)  # (b, k, d)
        text = F.normalize(prompt_embeddings(self.tokenizer, self.text_encoder, prompts).float(), dim=-1)  # (b, d)
        return self.scale * (image * text[:, None]).sum(-1)  # (b, k)

    def forward(self, videos: Tensor, prompts: list[str] | None = None, references: Tensor | None = None,
                fps: float | None = None) -> dict[str, Tensor]:
        score = self.frame_scores(videos, prompts).mean(1)  # (b,)
        return {"preference": score, "overall": score}


def load_clip_processor(processor_name_or_path: str, revision: str | None, image_size: int, who: str):
    """The tokenizer and image processor of a CLIP processor folder or Hub id, checked against the torch
    preprocessing: shortest-side resize to ``image_size`` and a centre crop of ``image_size`` (what
    ``CLIPImageProcessor`` does for every CLIP checkpoint the zoo loads)."""
    from transformers import AutoTokenizer, CLIPImageProcessor

    try:
        image_processor = CLIPImageProcessor.from_pretrained(processor_name_or_path, revision=revision)
    except OSError as err:
        raise ValueError(f"{who}: cannot load a CLIPImageProcessor from {processor_name_or_path!r} (expected a "
                         f"folder or Hub id with preprocessor_config.json): {err}") from None
    size = (image_processor.size or {}).get("shortest_edge")
    crop = image_processor.crop_size or {}
    if (size != image_size or not image_processor.do_center_crop
            or (crop.get("height"), crop.get("width")) != (image_size, image_size)):
        raise ValueError(f"{who}: the image processor of {processor_name_or_path!r} resizes to {size} and crops to "
                         f"{crop} (center crop {image_processor.do_center_crop}); expected a shortest-edge resize and "
                         f"a centre crop to the vision tower's image_size {image_size}")
    tokenizer = AutoTokenizer.from_pretrained(processor_name_or_path, revision=revision)
    return tokenizer, image_processor


@register_reward("pickscore")
class PickScore(CLIPPreference, paper_url=PICKSCORE_PAPER, repo_url=PICKSCORE_REPO, model_card_template=MODEL_CARD):
    """PickScore of each sampled frame against the prompt, averaged: ``logit_scale.exp() * cos(text, image)``.

    With the published weights (``logit_scale.exp()`` = 100) scores are in [-100, 100]; generated images typically
    score 18-24, and only differences between videos for one prompt carry meaning (the paper turns them into
    preference probabilities with a softmax over candidates). Prompts are truncated to 77 tokens.

    Args:
        model_name_or_path: the PickScore ``CLIPModel`` (Hub id or folder).
        model_revision: Hub revision of the model, to pin it.
        processor_name_or_path: the CLIP processor (tokenizer and ``preprocessor_config.json``): PickScore was
            fine-tuned from CLIP-ViT-H-14 and uses its processor.
        processor_revision: Hub revision of the processor.
        num_frames: score this many frames, evenly spread over the video (first and last included); None scores
            every frame.
    """

    license = "mit"  # the PickScore code repository's LICENSE; the PickScore_v1 weights' own terms are not verified
    # +-logit_scale.exp(): 100 for the published weights
    score_ranges: ClassVar[dict[str, tuple[float, float]]] = {"preference": (-100.0, 100.0), "overall": (-100.0, 100.0)}
    expected_fps: ClassVar[float | None] = None  # frames sampled by index
    expected_resolution: ClassVar[tuple[int, int] | None] = (224, 224)  # CLIP-H input, after resize and crop

    def __init__(self, model_name_or_path: str = PICKSCORE_MODEL, model_revision: str | None = None,
                 processor_name_or_path: str = CLIP_H_PROCESSOR, processor_revision: str | None = None,
                 num_frames: int | None = 8) -> None:
        super().__init__()
        self.num_frames = check_num_frames(num_frames)
        clip = load_clip(model_name_or_path, model_revision)
        tokenizer, image_processor = load_clip_processor(processor_name_or_path, processor_revision,
                                                         clip.config.vision_config.image_size, "pickscore")
        self.set_clip(clip, tokenizer, resize="crop", scale_by_logit=True, mean=image_processor.image_mean,
                      std=image_processor.image_std)
        exclude_from_state_dict(self, "image_encoder")
        exclude_from_state_dict(self, "text_encoder")
        self.eval()
