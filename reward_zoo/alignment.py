"""Text-video alignment rewards after CLIP (Radford et al., arXiv 2103.00020): ``clip_score``.

``clip_score`` is the frame-averaged CLIP cosine similarity between a video and its prompt, the "CLIP-SIM" metric
of text-to-video evaluation. Frames are preprocessed in torch exactly as ``CLIPImageProcessor`` does (shortest-side
bicubic resize, centre crop, CLIP mean/std), so gradients reach the pixels and the reward can drive direct reward
fine-tuning as well as GRPO.

The pretrained CLIP is a frozen backbone, named by ``model_name_or_path`` and ``model_revision`` in ``config.json``:
its weights are left out of the reward's ``state_dict`` (and so of ``model.safetensors`` and of Lightning checkpoints
of objectives holding the reward) and are re-loaded through ``CLIPModel.from_pretrained`` when the reward is built.
This module also holds the CLIP helpers the aesthetic family reuses. CLIP weights carry their own licences (OpenAI
CLIP: MIT).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reward_zoo.base import RewardModel
from reward_zoo.clip_preprocess import (  # noqa: F401  (clip_pixel_values re-exported: its old home was here)
    CLIP_MEAN,
    CLIP_STD,
    RESIZE_MODES,
    clip_pixel_values,
    preprocess_frames,
)
from reward_zoo.registry import register_reward

if TYPE_CHECKING:
    from transformers import CLIPModel

CLIP_PAPER = "https://arxiv.org/abs/2103.00020"


# -- CLIP helpers -----------------------------------------------------------------------------------------------
def load_clip(model_name_or_path: str, revision: str | None = None) -> CLIPModel:
    """Load a frozen ``transformers.CLIPModel`` in eval mode (Hub id or folder; cached, honours ``HF_HUB_OFFLINE``)."""
    from transformers import CLIPModel

    if not isinstance(model_name_or_path, str) or not model_name_or_path:
        raise ValueError(f"model_name_or_path must be a CLIP Hub id or folder, got {model_name_or_path!r}")
    model = CLIPModel.from_pretrained(model_name_or_path, revision=revision)
    return model.requires_grad_(False).eval()


def frame_indices(num_video_frames: int, num_frames: int | None, device: torch.device | str = "cpu") -> Tensor:
    """Indices of ``num_frames`` frames evenly spread over the video, first and last included; all if None or more."""
    if num_frames is None or num_frames >= num_video_frames:
        return torch.arange(num_video_frames, device=device)
    return torch.linspace(0, num_video_frames - 1, num_frames, device=device).round().long()


class CLIPImageEncoder(nn.Module):
    """CLIP's image tower with its projection: frames in [0, 1] ``(n, 3, h, w)`` -> image embeddings ``(n, d)``.

    Built from a loaded ``CLIPModel`` (keeping its ``vision_model`` and ``visual_projection``, so the text tower can
    be dropped), which makes the embeddings exactly ``CLIPModel.get_image_features`` of the preprocessed frames.
    ``resize`` fits frames to the square input as the checkpoint's preprocessor did: ``"crop"`` (CLIPImageProcessor)
    or ``"pad"`` (OpenCLIP's ResizeMaxSize); see :mod:`reward_zoo.clip_preprocess`.
    """

    def __init__(self, clip: CLIPModel, resize: str = "crop") -> None:
        super().__init__()
        if resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
        self.resize = resize
        self.vision_model = clip.vision_model
        self.visual_projection = clip.visual_projection
        self.image_size = clip.config.vision_config.image_size
        self.embed_dim = clip.config.projection_dim
        self.register_buffer("mean", torch.tensor(CLIP_MEAN), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD), persistent=False)

    def forward(self, frames: Tensor) -> Tensor:
        dtype = self.visual_projection.weight.dtype  # preprocess in float32 whatever the tower's dtype
        pixels = preprocess_frames(frames.float(), self.image_size, self.mean.float(), self.std.float(), self.resize)
        pooled = self.vision_model(pixel_values=pixels.to(dtype)).pooler_output  # (n, hidden)
        return self.visual_projection(pooled)  # (n, d)


class CLIPTextEncoder(nn.Module):
    """CLIP's text tower with its projection: token ids ``(n, l)`` -> text embeddings ``(n, d)``.

    Exactly ``CLIPModel.get_text_features``; built from a loaded ``CLIPModel`` like :class:`CLIPImageEncoder`.
    """

    def __init__(self, clip: CLIPModel) -> None:
        super().__init__()
        self.text_model = clip.text_model
        self.text_projection = clip.text_projection
        self.max_length = clip.config.text_config.max_position_embeddings

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        pooled = self.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output  # (n, hidden)
        return self.text_projection(pooled)  # (n, d)


def prompt_embeddings(tokenizer, text_encoder: CLIPTextEncoder, prompts: list[str]) -> Tensor:
    """CLIP text embeddings ``(len(prompts), d)`` without gradients (prompts are not optimised), each distinct prompt
    tokenised (padded, truncated to the text tower's context) and encoded once: GRPO repeats prompts."""
    unique = list(dict.fromkeys(prompts))
    tokens = tokenizer(unique, padding=True, truncation=True, max_length=text_encoder.max_length, return_tensors="pt")
    device = text_encoder.text_projection.weight.device
    with torch.no_grad():
        embeds = text_encoder(tokens["input_ids"].to(device), tokens["attention_mask"].to(device))  # (u, d)
    position = {prompt: i for i, prompt in enumerate(unique)}
    return embeds[torch.tensor([position[p] for p in prompts], device=device)]  # (b, d)


def _drop_frozen_keys(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict, *, child: str) -> None:
    for key in [k for k in state_dict if k.startswith(f"{prefix}{child}.")]:
        del state_dict[key]


def _fill_frozen_keys(module: nn.Module, state_dict: dict, prefix: str, *args, child: str) -> None:
    for key, value in getattr(module, child).state_dict(prefix=f"{prefix}{child}.").items():
        state_dict.setdefault(key, value)


def exclude_from_state_dict(module: nn.Module, child: str) -> None:
    """Keep the frozen pretrained submodule ``module.<child>`` out of ``module.state_dict()``.

    The submodule stays registered (``.to(device)``, ``.half()`` and ``.modules()`` still reach it) but its tensors
    are not saved, and a strict ``load_state_dict`` without them keeps the current ones: the pretrained weights are
    identified by the reward's config (Hub id and revision), not copied into every checkpoint. A state dict that does
    carry them still loads them. Works at any nesting depth (the hooks receive the key prefix).
    """
    module.register_state_dict_post_hook(functools.partial(_drop_frozen_keys, child=child))
    module.register_load_state_dict_pre_hook(functools.partial(_fill_frozen_keys, child=child))


# -- rewards ----------------------------------------------------------------------------------------------------
@register_reward("clip_score")
class CLIPScore(RewardModel, paper_url=CLIP_PAPER):
    """Frame-averaged CLIP text-video similarity: ``mean over frames of cos(image_embed(frame), text_embed(prompt))``.

    The score is the raw cosine in [-1, 1], without CLIP's ``logit_scale`` (100 for OpenAI checkpoints) and without
    CLIPScore's ``2.5 * max(cos, 0)`` rescaling (Hessel et al., arXiv 2104.08718): multiply by 100 to compare with
    "CLIP-SIM" numbers reported on that scale. Matched pairs typically score 0.25-0.35 with OpenAI CLIP; only
    differences between videos (or prompts) carry meaning. Prompts are truncated to CLIP's context length (77 tokens
    for OpenAI checkpoints). The text embedding is computed without gradients (prompts are not optimised);
    gradients flow through the image tower to the pixels.

    Args:
        model_name_or_path: a CLIP checkpoint (Hub id or folder) that ``CLIPModel`` and ``AutoTokenizer`` load.
        model_revision: Hub revision (branch, tag or commit) of the CLIP checkpoint, to pin it. (Not ``revision``:
            ``from_pretrained(repo, revision=...)`` already names the revision of the reward's own checkpoint.)
        num_frames: score this many frames, evenly spread over the video (first and last included); None scores
            every frame.
    """

    dimensions = ("text",)
    differentiable = True
    requires_prompts = True
    license = "apache-2.0"
    score_ranges = {"text": (-1.0, 1.0), "overall": (-1.0, 1.0)}  # a raw cosine

    def __init__(self, model_name_or_path: str = "openai/clip-vit-base-patch32", model_revision: str | None = None,
                 num_frames: int | None = None) -> None:
        super().__init__()
        if num_frames is not None and (isinstance(num_frames, bool) or not isinstance(num_frames, int)
                                       or num_frames < 1):
            raise ValueError(f"num_frames must be a positive integer or None, got {num_frames!r}")
        from transformers import AutoTokenizer

        self.num_frames = num_frames
        clip = load_clip(model_name_or_path, model_revision)
        self.image_encoder = CLIPImageEncoder(clip)
        self.text_encoder = CLIPTextEncoder(clip)
        self.tokenizer = AutoTokenizer.from_pretrained(model_name_or_path, revision=model_revision)
        exclude_from_state_dict(self, "image_encoder")
        exclude_from_state_dict(self, "text_encoder")

    def train(self, mode: bool = True) -> CLIPScore:
        """Keep the frozen CLIP towers in eval mode whatever the parent module does."""
        super().train(mode)
        self.image_encoder.eval()
        self.text_encoder.eval()
        return self

    def text_embeddings(self, prompts: list[str]) -> Tensor:
        """CLIP text embeddings ``(len(prompts), d)``, each distinct prompt encoded once (GRPO repeats prompts)."""
        return prompt_embeddings(self.tokenizer, self.text_encoder, prompts)

    def forward(self, videos: Tensor, prompts: list[str] | None = None, references: Tensor | None = None,
                fps: float | None = None) -> dict[str, Tensor]:
        b, t = videos.shape[:2]
        frames = videos[:, frame_indices(t, self.num_frames, videos.device)]  # (b, k, c, h, w)
        k = frames.shape[1]
        image = self.image_encoder(frames.flatten(0, 1)).view(b, k, -1)  # (b, k, d)
        text = self.text_embeddings(prompts)  # (b, d)
        score = F.cosine_similarity(image.float(), text.float().unsqueeze(1), dim=-1).mean(1)  # (b,)
        return {"text": score, "overall": score}
