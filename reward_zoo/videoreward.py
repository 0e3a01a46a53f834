"""VideoAlign's VideoReward (Liu et al., "Improving Video Generation with Human Feedback", arXiv 2501.13918).

VideoReward is Qwen2-VL-2B-Instruct fine-tuned as a Bradley-Terry reward model on 182k human preference pairs of
generated videos. Its prompt (the ``detailed_special`` template of github.com/KlingAIResearch/VideoAlign) asks for
three ratings and holds one special token per rating, ``<|VQ_reward|>``, ``<|MQ_reward|>`` and ``<|TA_reward|>``; a
bias-free linear ``rm_head`` reads the last hidden state at each of them. With a head of 3 outputs the score of
dimension i is output i at token i (the diagonal); with 1 output (the published checkpoint) it is that output at
each token. ``overall`` is the sum of the three, as VideoAlign's ``inference.py`` defines it; by default each score is
first standardised with the means and stds of ``inference_config`` in the checkpoint's ``model_config.json``.

Preprocessing follows what the model was trained on (VideoAlign's ``vision_process.py``, i.e. qwen-vl-utils):
frames are sampled at ``fps`` (2) from the video's own frame rate, their count clamped to [4, 768] and rounded to an
even number; each frame is resized (bicubic, antialiased) to the ``max_pixels`` budget (448 x 448) with sides that
are multiples of 28; then CLIP normalisation, Qwen2-VL's temporal patching (2 frames) and 2 x 2 merging. All of it
runs in torch, so gradients reach the pixels (the one difference from training: frames are not re-quantised to 8 bit
after resizing).

Weights: the published folder (``model_config.json`` plus ``checkpoint-N/``) loads with
``reward_zoo.videoalign_checkpoint.load_videoalign``, and ``reward-zoo convert videoreward SRC DST --videoalign_repo
PATH`` writes it in this zoo's Hub layout (``config.json``, ``model.safetensors``, model card). The prompt text is
VideoAlign's, not shipped here: conversion reads it from the user's VideoAlign checkout (checked against
``PROMPT_SHA256``) into ``config.json``. The tokenizer and
chat template are Qwen2-VL-2B-Instruct's, named by ``processor_name_or_path``; the three reward tokens are added to
it as VideoAlign does.
"""

from __future__ import annotations

import json
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reward_zoo.alignment import CLIP_MEAN, CLIP_STD
from reward_zoo.base import RewardModel
from reward_zoo.registry import register_reward

PAPER = "https://arxiv.org/abs/2501.13918"
REPO = "https://github.com/KlingAIResearch/VideoAlign"  # formerly KwaiVGI/VideoAlign
REPO_REVISION = "219ab9db64c045e5181a2202d11f686439351292"  # the revision read for this port
WEIGHTS_REPO = "KlingTeam/VideoReward"  # formerly KwaiVGI/VideoReward on the Hugging Face Hub
BASE_MODEL = "Qwen/Qwen2-VL-2B-Instruct"
SPECIAL_TOKENS = ("<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>")
DIMENSIONS = ("visual", "motion", "text")  # VQ, MQ, TA
STAT_KEYS = ("VQ", "MQ", "TA")
# qwen-vl-utils' video constants, as VideoAlign trained with them
FRAME_FACTOR = 2  # sampled frame counts are even (one temporal patch is 2 frames)
FPS_MIN_FRAMES, FPS_MAX_FRAMES = 4, 768
IMAGE_FACTOR = 28  # patch 14 x merge 2
VIDEO_MIN_PIXELS = 128 * 28 * 28
MAX_FRAME_PIXELS = 448 * 448  # data_config.max_frame_pixels of the published checkpoint
MAX_RATIO = 200

# The model input VideoReward was trained on is VideoAlign's ``detailed_special`` prompt: the string constant
# PROMPT_NAME of PROMPT_MODULE in its repository. This zoo does not ship that text; `reward-zoo convert videoreward
# --videoalign_repo` reads it from the user's checkout (without running it) into the converted config.json.
# PROMPT_SHA256 is the SHA-256 of its UTF-8 bytes at REPO_REVISION, the text the checkpoint was trained with.
PROMPT_MODULE = "prompt_template.py"
PROMPT_NAME = "DETAILED_PROMPT_WITH_SPECIAL_TOKEN"
PROMPT_FIELD = "{text_prompt}"  # where the generation prompt goes (VideoAlign fills it with str.format)
PROMPT_SHA256 = "fdb6309bac618dd0c8b1b589d3a0970a974f7856eecbb355a190b2dce54af700"

# Qwen2-VL-2B-Instruct's architecture, with the vocabulary VideoAlign resized to (151657 tokens + the 3 reward tokens).
QWEN2_VL_2B: dict[str, Any] = {
    "text_config": {"vocab_size": 151660, "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
                    "num_attention_heads": 12, "num_key_value_heads": 2, "max_position_embeddings": 32768,
                    "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "bos_token_id": 151643,
                    "eos_token_id": 151645, "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0,
                                                                  "mrope_section": [16, 24, 24]}},
    "vision_config": {"depth": 32, "embed_dim": 1280, "hidden_size": 1536, "mlp_ratio": 4, "num_heads": 16,
                      "in_channels": 3, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
    "vision_start_token_id": 151652, "vision_end_token_id": 151653, "vision_token_id": 151654,
    "image_token_id": 151655, "video_token_id": 151656, "tie_word_embeddings": True,
}


# -- preprocessing (pure functions) -----------------------------------------------------------------------------
def sample_frame_indices(num_frames: int, video_fps: float, fps: float = 2.0) -> list[int]:
    """Indices of the frames VideoAlign samples from a ``num_frames``-frame video at ``video_fps``: ``num_frames /
    video_fps * fps`` frames, clamped to [4, min(768, num_frames) rounded down to even], rounded to even (Python's
    round), spread evenly with the first and last included.

    Raises:
        ValueError: the video is shorter than one temporal patch (2 frames).
    """
    max_frames = math.floor(min(FPS_MAX_FRAMES, num_frames) / FRAME_FACTOR) * FRAME_FACTOR
    n = min(max(num_frames / video_fps * fps, FPS_MIN_FRAMES), max_frames)
    n = min(round(n / FRAME_FACTOR) * FRAME_FACTOR, num_frames)
    if n < FRAME_FACTOR:
        raise ValueError(f"VideoReward needs at least {FRAME_FACTOR} frames (one Qwen2-VL temporal patch) after "
                         f"sampling at {fps:g} fps, got a video of {num_frames} frame(s) at {video_fps:g} fps")
    return torch.linspace(0, num_frames - 1, n).round().long().tolist()


def smart_resize(height: int, width: int, min_pixels: int = VIDEO_MIN_PIXELS, max_pixels: int = MAX_FRAME_PIXELS,
                 factor: int = IMAGE_FACTOR) -> tuple[int, int]:
    """qwen-vl-utils' frame size: sides multiples of ``factor``, pixels within [min_pixels, max_pixels], aspect ratio
    kept as closely as possible."""
    if max(height, width) / min(height, width) > MAX_RATIO:
        raise ValueError(f"VideoReward needs an aspect ratio below {MAX_RATIO}, got frames of {height}x{width}")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h, w = math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def patchify(frames: Tensor, patch_size: int = 14, merge_size: int = 2, temporal_patch_size: int = 2) -> Tensor:
    """Qwen2-VL's video patches: frames ``(t, c, h, w)`` -> ``(t/2 * h/14 * w/14, c * 2 * 14 * 14)``, ordered so that
    each 2 x 2 block of patches the merger fuses is contiguous (the layout of ``Qwen2VLVideoProcessor``)."""
    t, c, h, w = frames.shape
    gt, gh, gw = t // temporal_patch_size, h // patch_size, w // patch_size
    x = frames.reshape(gt, temporal_patch_size, c, gh // merge_size, merge_size, patch_size,
                       gw // merge_size, merge_size, patch_size)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # (gt, gh/m, gw/m, m, m, c, tp, p, p)
    return x.reshape(gt * gh * gw, c * temporal_patch_size * patch_size * patch_size)


# -- the reward -------------------------------------------------------------------------------------------------
@register_reward("videoreward")
class VideoReward(RewardModel, paper_url=PAPER, repo_url=REPO):
    """VideoAlign's VideoReward: visual quality, motion quality and text alignment of a generated video.

    Scores are unbounded reals; standardised (``normalize=True``) they are z-scores against VideoAlign's validation
    set, and only differences between videos carry meaning. Needs prompts and the videos' frame rate (``fps=`` in
    the call): frames are sampled by time.

    Args:
        model_config: ``Qwen2VLConfig`` arguments (the default is Qwen2-VL-2B with VideoAlign's 151660-token
            vocabulary); the reward holds the ``Qwen2VLModel`` trunk (no LM head) and ``rm_head``.
        processor_name_or_path: the Qwen2-VL processor (tokenizer and chat template), Hub id or folder.
        processor_revision: its Hub revision, to pin it.
        output_dim: outputs of ``rm_head``: 1 (one score read at each reward token) or 3 (the diagonal).
        fps: the frame rate frames are sampled at (``data_config.fps`` of the checkpoint).
        max_pixels, min_pixels: the per-frame pixel budget of the resize.
        normalize: standardise each score with ``reward_stats``.
        reward_stats: ``{"VQ_mean", "VQ_std", "MQ_mean", ...}``, the checkpoint's ``inference_config``.
        prompt_template: VideoAlign's ``detailed_special`` prompt (``{text_prompt}`` and the three reward tokens once
            each), which ``reward-zoo convert videoreward --videoalign_repo`` reads from a VideoAlign checkout; this
            zoo does not ship it. Required for scoring.
    """

    dimensions = DIMENSIONS
    differentiable = True
    requires_prompts = True
    min_frames = FRAME_FACTOR
    license = "mit"  # the VideoAlign repository's licence (the weights build on Qwen2-VL-2B-Instruct, apache-2.0)
    score_ranges = {dim: (None, None) for dim in (*DIMENSIONS, "overall")}  # unbounded head outputs (or z-scores)
    expected_fps = 2.0  # frames are sampled at this rate from the videos' own (the call's fps)
    expected_resolution = (448, 448)  # the pixel budget each frame is resized to (aspect ratio kept)

    def __init__(self, model_config: dict | None = None, processor_name_or_path: str = BASE_MODEL,
                 processor_revision: str | None = None, output_dim: int = 1, fps: float = 2.0,
                 max_pixels: int = MAX_FRAME_PIXELS, min_pixels: int = VIDEO_MIN_PIXELS, normalize: bool = True,
                 reward_stats: dict[str, float] | None = None, prompt_template: str | None = None) -> None:
        super().__init__()
        from transformers import AutoProcessor, Qwen2VLConfig, Qwen2VLModel

        if output_dim not in (1, 3):
            raise ValueError(f"output_dim must be 1 or 3 (the rm_head outputs of VideoAlign), got {output_dim!r}")
        if not (isinstance(fps, (int, float)) and fps > 0):
            raise ValueError(f"fps must be a positive number, got {fps!r}")
        if not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in (min_pixels, max_pixels)):
            raise ValueError(f"min_pixels and max_pixels must be positive integers, got {min_pixels!r}, {max_pixels!r}")
        if normalize:
            check_reward_stats(reward_stats, "reward_stats")
        if prompt_template is not None:
            check_prompt_template(prompt_template, "prompt_template")
        self.prompt_template = prompt_template
        self.fps, self.max_pixels, self.min_pixels = float(fps), max_pixels, min_pixels
        self.normalize = normalize
        self.qwen_config = Qwen2VLConfig(**(QWEN2_VL_2B if model_config is None else model_config))
        self.model = Qwen2VLModel(self.qwen_config)
        self.rm_head = nn.Linear(self.qwen_config.text_config.hidden_size, output_dim, bias=False)
        stats = reward_stats or {}
        self.register_buffer("stat_mean", torch.tensor([float(stats.get(f"{k}_mean", 0.0)) for k in STAT_KEYS]),
                             persistent=False)
        self.register_buffer("stat_std", torch.tensor([float(stats.get(f"{k}_std", 1.0)) for k in STAT_KEYS]),
                             persistent=False)
        self.register_buffer("pixel_mean", torch.tensor(CLIP_MEAN), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(CLIP_STD), persistent=False)

        self.processor = AutoProcessor.from_pretrained(processor_name_or_path, revision=processor_revision)
        self.tokenizer = self.processor.tokenizer
        self.tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)})
        self.tokenizer.padding_side = "right"  # as VideoAlign: pooling reads fixed positions, pads come after
        self.special_ids = self.tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))
        self.video_token = self.processor.video_token
        vocab = self.qwen_config.text_config.vocab_size
        if len(self.tokenizer) > vocab:
            raise ValueError(f"the tokenizer of {processor_name_or_path} has {len(self.tokenizer)} tokens with the "
                             f"3 reward tokens, more than the model's vocab_size {vocab}")
        if self.tokenizer.convert_tokens_to_ids(self.video_token) != self.qwen_config.video_token_id:
            raise ValueError(f"the tokenizer of {processor_name_or_path} maps {self.video_token} to "
                             f"{self.tokenizer.convert_tokens_to_ids(self.video_token)} but the model config expects "
                             f"video_token_id {self.qwen_config.video_token_id}")
        self.requires_grad_(False)  # a judge: gradients flow through it to the pixels, never into it

    # -- inputs -------------------------------------------------------------------------------------------------
    def texts(self, prompts: list[str], num_video_tokens: int) -> list[str]:
        """The chat text of each prompt, ``<|video_pad|>`` expanded to the video's tokens (what the processor does)."""
        if self.prompt_template is None:
            raise ValueError(NO_TEMPLATE)
        texts = []
        for prompt in prompts:
            if any(tok in prompt for tok in SPECIAL_TOKENS):
                raise ValueError(f"VideoReward prompts must not contain the reward tokens {SPECIAL_TOKENS}, got "
                                 f"{prompt[:80]!r}")
            text = build_prompt(self.prompt_template, prompt)
            chat = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": text}]}]
            text = self.processor.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
            texts.append(text.replace(self.video_token, self.video_token * num_video_tokens))
        return texts

    def pixel_values(self, videos: Tensor, fps: float) -> tuple[Tensor, list[int]]:
        """Videos ``(b, t, c, h, w)`` in [0, 1] -> Qwen2-VL ``pixel_values_videos`` ``(b * n, d)`` and the grid
        ``[t', h', w']`` of one video, differentiably."""
        b, t, c, h, w = videos.shape
        vision = self.qwen_config.vision_config
        frames = videos[:, sample_frame_indices(t, fps, self.fps)].flatten(0, 1)  # (b * k, c, h, w)
        size = smart_resize(h, w, self.min_pixels, self.max_pixels, vision.patch_size * vision.spatial_merge_size)
        if size != (h, w):
            frames = F.interpolate(frames.float(), size=size, mode="bicubic", align_corners=False,
                                   antialias=True).clamp(0.0, 1.0)
        frames = (frames.float() - self.pixel_mean.view(1, c, 1, 1)) / self.pixel_std.view(1, c, 1, 1)
        frames = frames.view(b, -1, c, *size)  # (b, k, c, h', w')
        patches = [patchify(v, vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size)
                   for v in frames]
        k = frames.shape[1]
        grid = [k // vision.temporal_patch_size, size[0] // vision.patch_size, size[1] // vision.patch_size]
        return torch.cat(patches), grid

    def num_video_tokens(self, grid: list[int]) -> int:
        return grid[0] * grid[1] * grid[2] // self.qwen_config.vision_config.spatial_merge_size ** 2

    # -- scoring ------------------------------------------------------------------------------------------------
    def forward(self, videos: Tensor, prompts: list[str] | None = None, references: Tensor | None = None,
                fps: float | None = None) -> dict[str, Tensor]:
        fps = self.require_fps(fps, expected=self.fps)
        pixels, grid = self.pixel_values(videos, fps)
        tokens = self.tokenizer(self.texts(prompts, self.num_video_tokens(grid)), padding=True, return_tensors="pt")
        device = self.rm_head.weight.device
        input_ids, mask = tokens["input_ids"].to(device), tokens["attention_mask"].to(device)
        raw = self.score_tokens(input_ids, mask, pixels, torch.tensor([grid] * videos.shape[0], device=device))
        return self.finish(raw)

    def score_tokens(self, input_ids: Tensor, attention_mask: Tensor, pixel_values_videos: Tensor,
                     video_grid_thw: Tensor) -> Tensor:
        """Raw ``(b, 3)`` scores (VQ, MQ, TA) from tokenised inputs, pooled at the reward tokens."""
        types = (input_ids == self.qwen_config.video_token_id).int() * 2  # mm_token_type_ids: text 0, video 2
        dtype = self.rm_head.weight.dtype
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                            pixel_values_videos=pixel_values_videos.to(dtype), video_grid_thw=video_grid_thw,
                            mm_token_type_ids=types).last_hidden_state  # (b, l, d)
        return pool_reward_tokens(self.rm_head(hidden), input_ids, self.special_ids)

    def finish(self, raw: Tensor) -> dict[str, Tensor]:
        """Scores per dimension from raw ``(b, 3)`` scores: standardised if ``normalize``, and their sum."""
        scores = raw.float()
        if self.normalize:
            scores = (scores - self.stat_mean) / self.stat_std
        out = {dim: scores[:, i] for i, dim in enumerate(DIMENSIONS)}
        out["overall"] = scores.sum(1)
        return out


NO_TEMPLATE = ("videoreward needs VideoAlign's prompt template; convert the checkpoint with `reward-zoo convert "
               "videoreward SRC DST --videoalign_repo PATH_TO_VIDEOALIGN_CHECKOUT`")


def build_prompt(template: str, prompt: str) -> str:
    """The model's text for a generation prompt: ``template.format(text_prompt=prompt)``, as VideoAlign's
    ``build_prompt`` fills it (braces in ``prompt`` stay as they are)."""
    return template.format(text_prompt=prompt)


def check_prompt_template(template: Any, where: str) -> str:
    """``template`` if it is a string that formats with ``text_prompt`` alone and holds the prompt and each reward
    token once, else a one-line error naming what is missing."""
    if not isinstance(template, str):
        raise ValueError(f"{where} must be a string (VideoAlign's prompt template), got {type(template).__name__}")
    marker = "\x00"
    try:
        text = template.format(text_prompt=marker)
    except (KeyError, IndexError, ValueError) as err:
        raise ValueError(f"{where} must format with {PROMPT_FIELD} as its only field, as VideoAlign's template does; "
                         f"str.format failed: {type(err).__name__}: {err}") from None
    counts = {PROMPT_FIELD: text.count(marker), **{tok: text.count(tok) for tok in SPECIAL_TOKENS}}
    wrong = [f"{name} {n} times" for name, n in counts.items() if n != 1]
    if wrong:
        raise ValueError(f"{where} must contain {PROMPT_FIELD} and each reward token {', '.join(SPECIAL_TOKENS)} once; "
                         f"it has {', '.join(wrong)}")
    return template


def pool_reward_tokens(logits: Tensor, input_ids: Tensor, special_ids: list[int]) -> Tensor:
    """``rm_head`` outputs ``(b, l, o)`` read at the three reward tokens -> ``(b, 3)``: output i at token i when
    ``o == 3`` (the diagonal), the single output at each token when ``o == 1``."""
    b = input_ids.shape[0]
    found = [(input_ids == i).sum(1) for i in special_ids]
    if any((n != 1).any() for n in found):
        raise ValueError(f"each sequence must hold each reward token {SPECIAL_TOKENS} once, got counts "
                         f"{[n.tolist() for n in found]} (was the prompt cut?)")
    positions = torch.stack([(input_ids == i).int().argmax(1) for i in special_ids], 1)  # (b, 3)
    pooled = logits[torch.arange(b, device=logits.device)[:, None], positions]  # (b, 3, o)
    return pooled.diagonal(dim1=1, dim2=2) if pooled.shape[-1] == 3 else pooled[..., 0]


def check_reward_stats(stats: Any, where: str) -> dict[str, float]:
    """``stats`` if it holds a finite mean and a positive std for VQ, MQ and TA, else a one-line error."""
    keys = [f"{k}_{s}" for k in STAT_KEYS for s in ("mean", "std")]
    if not isinstance(stats, dict) or any(not isinstance(stats.get(k), (int, float)) for k in keys):
        raise ValueError(f"{where}: normalisation needs {{{', '.join(keys)}}} (VideoAlign's inference_config), got "
                         f"{json.dumps(stats)[:200]}; pass normalize=False for raw scores")
    if any(not math.isfinite(stats[k]) for k in keys) or any(stats[f"{k}_std"] <= 0 for k in STAT_KEYS):
        raise ValueError(f"{where}: normalisation needs finite means and positive stds, got {stats}")
    return stats
