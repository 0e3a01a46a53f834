"""Multi-dimensional learned video quality, after VideoReward / VideoAlign (arXiv 2501.13918).

VideoReward scores a video on separate dimensions (visual quality, motion quality, text alignment) with one model:
a video-language backbone reads the frames and the prompt and a separate reward token per dimension feeds a linear
head; it is trained with Bradley-Terry-with-ties on human preference pairs labelled per dimension. ``quality`` keeps
that structure at a size that trains on a laptop: a timm frame encoder (appearance), a small convolutional encoder of
frames and frame differences (motion), a temporal transformer over the frames, a small learned text encoder over a
word vocabulary, and one learned query per dimension that attends over the frames before its head. Train it with
``reward_zoo.training.RewardTraining``; the shipped ``quality`` weights are trained on toy-world pairs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_videoalign.errors import shorten
from reward_zoo.base import RewardModel
from reward_zoo.registry import register_reward
from reward_zoo.toyworld import VOCABULARY, build_word_tokenizer

VIDEOREWARD = "https://arxiv.org/abs/2501.13918"


@register_reward("quality")
class QualityReward(RewardModel, paper_url=VIDEOREWARD):
    """Learned visual, motion and text-alignment scores (logits; higher is better), ``overall`` their mean.

    Per frame, the timm encoder gives an appearance vector, and a small convolutional motion encoder reading the
    frame, its difference to the previous frame and two coordinate channels (so positions and displacements are
    visible) gives a ``motion_grid`` x ``motion_grid`` motion map; both are projected to ``width`` and summed with a
    learned time embedding into one token per frame. A temporal transformer mixes the tokens; then three learned
    queries (visual, motion, text) attend over them, the text query shifted by the prompt embedding, and each pooled
    vector goes through its own MLP head (the text head also sees the prompt embedding). Prompts are tokenised into
    words of ``vocabulary`` (unknown words share one token) and embedded by a small transformer.

    The defaults are the shipped toy-world model. For real footage use a pretrained encoder, e.g.
    ``encoder="vit_small_patch14_dinov2.lvd142m", pretrained_encoder=True, frame_size=None`` (frames are resized to
    the encoder's input size), a vocabulary of your prompts' words, and train on your preference pairs.

    Args:
        encoder: timm model name of the frame encoder (built with ``num_classes=0``, so it returns pooled features).
        pretrained_encoder: load the encoder's pretrained timm weights (downloads them once).
        encoder_kwargs: extra ``timm.create_model`` arguments (e.g. ``{"img_size": 64}`` for a ViT).
        frame_size: ``[height, width]`` frames are resized to before encoding, or None for the encoder's input size.
        motion_channels: channels of the motion encoder's convolutions.
        motion_grid: side of the grid the motion map is pooled to (its cells keep where things move).
        width: token width of the temporal and text transformers.
        temporal_layers: layers of the temporal transformer.
        text_layers: layers of the text transformer.
        num_heads: attention heads everywhere.
        max_frames: longest video the time embedding covers.
        vocabulary: the words the text encoder knows (the toy world's by default); stored in ``config.json``.
        max_prompt_tokens: longest prompt in tokens (words, punctuation and the end token).
    """

    dimensions = ("visual", "motion", "text")
    differentiable = True
    requires_prompts = True
    min_frames = 2
    license = "apache-2.0"
    score_ranges = {d: (None, None) for d in (*dimensions, "overall")}  # logits
    expected_fps = 8.0  # tuned on the toy world, rendered at 8 fps

    @property
    def expected_resolution(self) -> tuple[int, int]:
        """The ``frame_size`` frames are resized to (the card's ``expected_resolution``)."""
        return tuple(self.frame_size)

    def __init__(
        self,
        encoder: str = "test_convnext",
        pretrained_encoder: bool = False,
        encoder_kwargs: dict | None = None,
        frame_size: list[int] | None = (32, 32),
        motion_channels: int = 16,
        motion_grid: int = 4,
        width: int = 64,
        temporal_layers: int = 2,
        text_layers: int = 1,
        num_heads: int = 4,
        max_frames: int = 64,
        vocabulary: list[str] = VOCABULARY,
        max_prompt_tokens: int = 48,
    ) -> None:
        super().__init__()
        import timm

        for name, value in [("motion_grid", motion_grid), ("motion_channels", motion_channels), ("width", width),
                            ("max_frames", max_frames),
                            ("max_prompt_tokens", max_prompt_tokens), ("num_heads", num_heads)]:
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if width % num_heads:
            raise ValueError(f"width ({width}) must be divisible by num_heads ({num_heads})")
        if frame_size is not None and (len(frame_size) != 2 or min(frame_size) < 1):
            raise ValueError(f"frame_size must be [height, width] or None, got {frame_size!r}")
        if not vocabulary or not all(isinstance(w, str) and w for w in vocabulary):
            raise ValueError(f"vocabulary must be a non-empty list of words, got {vocabulary!r}")

        # frame encoder (appearance)
        self.encoder = timm.create_model(encoder, pretrained=pretrained_encoder, num_classes=0,
                                         **(encoder_kwargs or {}))
        cfg = timm.data.resolve_model_data_config(self.encoder)
        self.frame_size = tuple(frame_size) if frame_size is not None else tuple(cfg["input_size"][1:])
        self.register_buffer("mean", torch.tensor(cfg["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg["std"]).view(1, 3, 1, 1), persistent=False)
        self.appearance = nn.Linear(self.encoder.num_features, width)

        # motion features and temporal mixing
        self.motion_grid, self.max_frames = motion_grid, max_frames
        self.motion = nn.Sequential(  # (frame, difference to the previous frame, y, x) -> a coarse motion map
            nn.Conv2d(3 + 3 + 2, motion_channels, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(motion_channels, motion_channels, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(motion_channels, motion_channels, 3, stride=2, padding=1), nn.GELU(),
            nn.AdaptiveAvgPool2d(motion_grid), nn.Flatten(), nn.Linear(motion_channels * motion_grid**2, width))
        self.time_embed = nn.Parameter(torch.zeros(max_frames, width))
        self.temporal = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(width, num_heads, 2 * width, dropout=0.0, batch_first=True, norm_first=True),
            temporal_layers, enable_nested_tensor=False)
        self.temporal_norm = nn.LayerNorm(width)

        # prompt encoder
        self.tokenizer = build_word_tokenizer(list(vocabulary), model_max_length=max_prompt_tokens)
        self.max_prompt_tokens = max_prompt_tokens
        self.token_embed = nn.Embedding(len(self.tokenizer), width)
        self.position_embed = nn.Parameter(torch.zeros(max_prompt_tokens, width))
        self.text = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(width, num_heads, 2 * width, dropout=0.0, batch_first=True, norm_first=True),
            text_layers, enable_nested_tensor=False)
        self.text_norm = nn.LayerNorm(width)

        # one query per dimension, attention pooling over frames, one head per dimension
        self.queries = nn.Parameter(torch.randn(len(self.dimensions), width) * 0.02)
        self.text_query = nn.Linear(width, width)
        self.pool = nn.MultiheadAttention(width, num_heads, batch_first=True)
        self.heads = nn.ModuleDict({
            "visual": _mlp(width, width),
            "motion": _mlp(width, width),
            "text": _mlp(3 * width, width),
        })
        nn.init.normal_(self.time_embed, std=0.02)
        nn.init.normal_(self.position_embed, std=0.02)

    def encode_prompts(self, prompts: list[str]) -> Tensor:
        """Prompt embeddings ``(b, width)``: the masked mean of the text transformer's outputs."""
        tokens = self.tokenizer(prompts, padding=True, return_tensors="pt")
        ids, mask = tokens["input_ids"], tokens["attention_mask"].bool()  # (b, l)
        if ids.shape[1] > self.max_prompt_tokens:
            longest = max(prompts, key=lambda p: len(self.tokenizer(p)["input_ids"]))
            raise ValueError(f"prompt {shorten(longest)} has {ids.shape[1]} tokens; QualityReward takes at most "
                             f"max_prompt_tokens={self.max_prompt_tokens}")
        ids, mask = ids.to(self.position_embed.device), mask.to(self.position_embed.device)
        x = self.token_embed(ids) + self.position_embed[: ids.shape[1]]  # (b, l, d)
        x = self.text(x, src_key_padding_mask=~mask)
        x = (x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return self.text_norm(x)

    def frame_tokens(self, videos: Tensor) -> Tensor:
        """One token per frame ``(b, t, width)`` after temporal mixing."""
        b, t = videos.shape[:2]
        if t > self.max_frames:
            raise ValueError(f"QualityReward covers at most max_frames={self.max_frames} frames, got {t}")
        frames = videos.flatten(0, 1)  # (b t, c, h, w)
        if frames.shape[-2:] != self.frame_size:
            frames = F.interpolate(frames, size=self.frame_size, mode="bilinear", align_corners=False, antialias=True)
        appearance = self.appearance(self.encoder((frames - self.mean) / self.std)).reshape(b, t, -1)
        seq = frames.reshape(b, t, *frames.shape[1:])  # (b, t, c, h, w)
        diffs = torch.cat([torch.zeros_like(seq[:, :1]), seq[:, 1:] - seq[:, :-1]], dim=1)
        h, w = self.frame_size
        ys = torch.linspace(-1, 1, h, device=frames.device, dtype=frames.dtype).view(1, 1, h, 1).expand(b * t, 1, h, w)
        xs = torch.linspace(-1, 1, w, device=frames.device, dtype=frames.dtype).view(1, 1, 1, w).expand(b * t, 1, h, w)
        motion = self.motion(torch.cat([frames, diffs.flatten(0, 1), ys, xs], dim=1)).view(b, t, -1)  # (b, t, d)
        tokens = appearance + motion + self.time_embed[:t]
        return self.temporal_norm(self.temporal(tokens))

    def forward(self, videos: Tensor, prompts: list[str] | None = None, references: Tensor | None = None,
                fps: float | None = None) -> dict[str, Tensor]:
        tokens = self.frame_tokens(videos)  # (b, t, d)
        text = self.encode_prompts(prompts)  # (b, d)
        queries = self.queries.expand(len(videos), -1, -1).clone()  # (b, 3, d)
        queries[:, 2] = queries[:, 2] + self.text_query(text)
        pooled, _ = self.pool(queries, tokens, tokens, need_weights=False)  # (b, 3, d)
        visual, motion, aligned = pooled.unbind(1)
        scores = {
            "visual": self.heads["visual"](visual).squeeze(-1),
            "motion": self.heads["motion"](motion).squeeze(-1),
            "text": self.heads["text"](torch.cat([aligned, text, aligned * text], dim=-1)).squeeze(-1),
        }
        scores["overall"] = torch.stack(list(scores.values())).mean(0)
        return scores


def _mlp(dim_in: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(dim_in), nn.Linear(dim_in, hidden), nn.GELU(), nn.Linear(hidden, 1))
