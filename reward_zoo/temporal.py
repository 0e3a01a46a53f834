"""Temporal rewards after VBench (arXiv 2311.17982): subject consistency, temporal flicker and dynamic degree.

Consistency and flicker rewards are maximised by a frozen video (every frame equal): used alone as a training
signal they teach a generator to stop moving. Always pair them with ``dynamic_degree`` (or a motion or physics
reward) in a ``CompositeReward``.

The defaults are cheap, download-free pixel features so the rewards run offline and on the toy world; for real
footage pass a timm backbone (``backbone="vit_small_patch16_224.dino"`` as in VBench) or ``flow_model="raft_small"``.
Pretrained backbone weights carry their own licences (torchvision's RAFT weights: BSD-3-Clause).

How often each ranks clean toy-world videos above flicker, noise, blur and frozen copies on held-out seeds:
``benchmarks/results/reward_zoo.md`` (``python -m benchmarks.reward_zoo``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reward_zoo.base import RewardModel
from reward_zoo.registry import register_reward

VBENCH = "https://arxiv.org/abs/2311.17982"


@register_reward("subject_consistency")
class SubjectConsistency(RewardModel, paper_url=VBENCH):
    """How much each frame looks like the first and the previous one (VBench subject consistency).

    ``score = mean over t >= 1 of (cos(f_t, f_0) + cos(f_t, f_{t-1})) / 2`` with per-frame features ``f``. Without
    a backbone, ``f`` is the frame average-pooled to ``feature_size`` and centred per frame (so the cosine is the
    normalised cross-correlation of the frames); a uniform frame has no structure and scores 0 against any other.
    Favours frozen videos: pair it with ``dynamic_degree``.

    Args:
        backbone: a timm model name giving per-frame features (e.g. ``"vit_small_patch16_224.dino"``), or None for
            pooled pixels.
        pretrained_backbone: load the backbone's pretrained timm weights (downloads them once).
        feature_size: side of the pooled pixel grid when there is no backbone.
    """

    dimensions = ("subject_consistency",)
    differentiable = True
    min_frames = 2
    license = "apache-2.0"
    score_ranges = {"subject_consistency": (-1.0, 1.0), "overall": (-1.0, 1.0)}  # mean of cosines

    def __init__(self, backbone: str | None = None, pretrained_backbone: bool = True, feature_size: int = 16) -> None:
        super().__init__()
        if feature_size < 1:
            raise ValueError(f"feature_size must be positive, got {feature_size}")
        self.feature_size = feature_size
        self.backbone: nn.Module | None = None
        if backbone is not None:
            import timm

            self.backbone = timm.create_model(backbone, pretrained=pretrained_backbone, num_classes=0)
            self.backbone.requires_grad_(False).eval()
            cfg = timm.data.resolve_model_data_config(self.backbone)
            self.backbone_size = tuple(cfg["input_size"][1:])
            self.register_buffer("mean", torch.tensor(cfg["mean"]).view(1, 3, 1, 1), persistent=False)
            self.register_buffer("std", torch.tensor(cfg["std"]).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> SubjectConsistency:
        """Keep the frozen backbone in eval mode (no dropout, no batch-norm updates) whatever the parent does."""
        super().train(mode)
        if self.backbone is not None:
            self.backbone.eval()
        return self

    def features(self, frames: Tensor) -> Tensor:
        """Per-frame feature vectors ``(n, d)`` for frames ``(n, c, h, w)`` in [0, 1]."""
        if self.backbone is None:
            pooled = F.adaptive_avg_pool2d(frames, self.feature_size).flatten(1)  # (n, c * s * s)
            return pooled - pooled.mean(1, keepdim=True)
        x = F.interpolate(frames, size=self.backbone_size, mode="bilinear", align_corners=False, antialias=True)
        return self.backbone((x - self.mean) / self.std)

    def forward(self, videos: Tensor, prompts: list[str] | None = None, references: Tensor | None = None,
                fps: float | None = None) -> dict[str, Tensor]:
        b, t = videos.shape[:2]
        feats = self.features(videos.flatten(0, 1)).view(b, t, -1)  # (b, t, d)
        to_first = F.cosine_similarity(feats[:, 1:], feats[:, :1], dim=-1)  # (b, t-1)
        to_previous = F.cosine_similarity(feats[:, 1:], feats[:, :-1], dim=-1)
        score = ((to_first + to_previous) / 2).mean(1)
        return {"subject_consistency": score, "overall": score}


@register_reward("flicker")
class TemporalFlicker(RewardModel, paper_url=VBENCH):
    """Absence of high-frequency temporal flicker: ``1 - mean |x_{t+1} - 2 x_t + x_{t-1}| / 2`` on low-pass frames.

    Frames are average-pooled to a ``grid`` x ``grid`` layout first, so small moving objects mostly average out
    while brightness and colour flicker (local or global) stays. The second temporal difference ignores steady
    change (a linear fade or a constant-speed pan contributes nothing) and doubles an alternating one. In [0, 1],
    1 = no flicker. Favours frozen videos: pair it with ``dynamic_degree``.

    Args:
        grid: side of the pooled grid (the spatial low-pass).
    """

    dimensions = ("flicker",)
    differentiable = True
    min_frames = 3
    license = "apache-2.0"
    score_ranges = {"flicker": (0.0, 1.0), "overall": (0.0, 1.0)}

    def __init__(self, grid: int = 4) -> None:
        super().__init__()
        if grid < 1:
            raise ValueError(f"grid must be positive, got {grid}")
        self.grid = grid

    def forward(self, videos: Tensor, prompts: list[str] | None = None, references: Tensor | None = None,
                fps: float | None = None) -> dict[str, Tensor]:
        b, t = videos.shape[:2]
        low = F.adaptive_avg_pool2d(videos.flatten(0, 1), self.grid).reshape(b, t, -1)  # (b, t, c * grid * grid)
        high = low[:, 2:] - 2 * low[:, 1:-1] + low[:, :-2]  # (b, t-2, ...) second temporal difference, in [-2, 2]
        score = 1 - high.abs().mean((1, 2)) / 2
        return {"flicker": score, "overall": score}


@register_reward("dynamic_degree")
class DynamicDegree(RewardModel, paper_url=VBENCH):
    """How much the video moves: mean over frame pairs of the mean of the top ``top_fraction`` motion magnitudes.

    With ``flow_model`` (``"raft_small"`` or ``"raft_large"``, torchvision) motion is the optical-flow length in
    frame heights per frame, as in VBench (which thresholds it into static / dynamic; this keeps it continuous).
    Without, it is the absolute frame difference averaged over channels, a cheap proxy in intensity units. 0 for a
    frozen video; higher is more dynamic. Use it to balance consistency rewards, not alone (noise is "dynamic").

    Args:
        flow_model: ``"raft_small"``, ``"raft_large"`` or None for frame differences.
        flow_weights: torchvision weights name for the flow model (``"DEFAULT"``, ``"C_T_V2"``, ...), or None for
            random initialisation (tests only).
        flow_size: frames are resized to this height (a multiple of 8, at least 128, as RAFT needs) before flow.
        num_flow_updates: RAFT refinement iterations.
        top_fraction: fraction of pixels with the largest motion that are averaged per frame pair.
    """

    dimensions = ("dynamic_degree",)
    differentiable = True
    min_frames = 2
    license = "apache-2.0"
    score_ranges = {"dynamic_degree": (0.0, None), "overall": (0.0, None)}  # a motion magnitude

    def __init__(self, flow_model: str | None = None, flow_weights: str | None = "DEFAULT", flow_size: int = 256,
                 num_flow_updates: int = 12, top_fraction: float = 0.05) -> None:
        super().__init__()
        if not 0 < top_fraction <= 1:
            raise ValueError(f"top_fraction must be in (0, 1], got {top_fraction}")
        if flow_size < 128 or flow_size % 8:
            raise ValueError(f"flow_size must be a multiple of 8 and at least 128 (RAFT's minimum), got {flow_size}")
        self.flow_size, self.num_flow_updates, self.top_fraction = flow_size, num_flow_updates, top_fraction
        self.flow: nn.Module | None = None
        if flow_model is not None:
            from torchvision.models import get_model, get_model_weights

            if flow_model not in ("raft_small", "raft_large"):
                raise ValueError(f"flow_model must be 'raft_small', 'raft_large' or None, got {flow_model!r}")
            names = [w.name for w in get_model_weights(flow_model)] + ["DEFAULT"]
            if flow_weights is not None and flow_weights not in names:
                raise ValueError(f"flow_weights for {flow_model} must be one of {names} or None, got {flow_weights!r}")
            weights = None if flow_weights is None else get_model_weights(flow_model)[flow_weights]
            self.flow = get_model(flow_model, weights=weights).requires_grad_(False).eval()

    def train(self, mode: bool = True) -> DynamicDegree:
        """Keep the frozen flow model in eval mode whatever the parent does."""
        super().train(mode)
        if self.flow is not None:
            self.flow.eval()
        return self

    def motion(self, videos: Tensor) -> Tensor:
        """Per-pixel motion magnitude ``(b, t-1, h', w')`` between consecutive frames."""
        b, t, c, h, w = videos.shape
        if self.flow is None:
            return (videos[:, 1:] - videos[:, :-1]).abs().mean(2)
        size = (self.flow_size, max(8, round(self.flow_size * w / h / 8) * 8))
        frames = F.interpolate(videos.flatten(0, 1), size=size, mode="bilinear", align_corners=False)
        frames = (frames * 2 - 1).view(b, t, c, *size)  # RAFT takes [-1, 1]
        flow = self.flow(frames[:, :-1].flatten(0, 1), frames[:, 1:].flatten(0, 1),
                         num_flow_updates=self.num_flow_updates)[-1]  # (b * (t-1), 2, h', w') in pixels
        return flow.norm(dim=1).view(b, t - 1, *size) / self.flow_size

    def forward(self, videos: Tensor, prompts: list[str] | None = None, references: Tensor | None = None,
                fps: float | None = None) -> dict[str, Tensor]:
        magnitude = self.motion(videos).flatten(2)  # (b, t-1, pixels)
        k = max(1, int(self.top_fraction * magnitude.shape[-1]))
        score = magnitude.topk(k, dim=-1).values.mean((1, 2))
        return {"dynamic_degree": score, "overall": score}
