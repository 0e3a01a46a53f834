"""``FrameReward``: any image reward applied to sampled frames of a video, reduced over them.

This is how the open video RL stacks use image preference models on videos (DanceGRPO with HPSv2.1, FastVideo with
PickScore): score some frames as images and average them (or take the worst, so one bad frame is not hidden). An
image reward here is any :class:`~reward_zoo.base.RewardModel` that scores one-frame videos; the wrapper hands it
the sampled frames as a batch of one-frame videos and reduces each dimension over the frames, so the wrapped
reward's dimensions are the wrapper's.

In a config::

    reward:
      class_path: reward_zoo.frame.FrameReward
      init_args:
        reward: {class_path: reward_zoo.hpsv2.HPSv2, init_args: {num_frames: 1}}
        num_frames: 4
        sampling: uniform

or ``create_reward("frame", reward="pickscore", num_frames=4, reduction="min")``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from reward_zoo.alignment import frame_indices
from reward_zoo.base import RewardModel
from reward_zoo.composite import reward_from_spec, reward_spec
from reward_zoo.registry import register_reward

SAMPLINGS = ("first", "last", "uniform", "random")
REDUCTIONS = ("mean", "min")


@register_reward("frame")
class FrameReward(RewardModel):
    """An image reward scored on ``num_frames`` frames of each video and reduced by ``reduction``.

    Args:
        reward: the image reward: a ``RewardModel``, a registered name (``"pickscore"``), or a
            ``{"class_path": ..., "init_args": {...}}`` spec (the form stored in ``config.json``). It must be able to
            score one-frame videos (``min_frames`` 1).
        num_frames: frames scored per video (fewer if the video is shorter: then every frame).
        sampling: ``"first"`` / ``"last"`` (the first or last ``num_frames`` frames), ``"uniform"`` (evenly spread,
            first and last included) or ``"random"`` (distinct frames drawn per video from a generator seeded with
            ``seed``, so a run is reproducible; the draws advance from call to call).
        reduction: ``"mean"`` or ``"min"`` over the scored frames, per dimension.
        seed: seed of the ``"random"`` sampling generator.
    """

    license = "apache-2.0"

    def __init__(self, reward: RewardModel | dict | str, num_frames: int = 4, sampling: str = "uniform",
                 reduction: str = "mean", seed: int = 0) -> None:
        super().__init__()
        if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
            raise ValueError(f"num_frames must be a positive integer, got {num_frames!r}")
        if sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        if isinstance(reward, str):
            from reward_zoo.registry import create_reward

            reward = create_reward(reward)
        elif isinstance(reward, dict):
            reward = reward_from_spec(reward)
        if not isinstance(reward, RewardModel):
            raise TypeError(f"FrameReward wraps a RewardModel, a registered name or a class_path spec, got "
                            f"{type(reward).__name__}")
        if reward.min_frames > 1:
            raise ValueError(f"FrameReward scores frames as images, but {type(reward).__name__} needs at least "
                             f"{reward.min_frames} frames; wrap an image reward (min_frames 1)")
        self.reward = reward
        self.num_frames, self.sampling, self.reduction, self.seed = num_frames, sampling, reduction, seed
        self.generator = torch.Generator().manual_seed(seed)

    @classmethod
    def _encode_init_arg(cls, name: str, value: Any) -> Any:
        """The wrapped reward goes to ``config.json`` as a ``class_path`` / ``init_args`` spec."""
        return reward_spec(value) if name == "reward" and isinstance(value, RewardModel) else value

    @property
    def dimensions(self) -> tuple[str, ...]:
        return self.reward.dimensions

    @property
    def differentiable(self) -> bool:
        return self.reward.differentiable

    @property
    def requires_prompts(self) -> bool:
        return self.reward.requires_prompts

    @property
    def requires_references(self) -> bool:
        return self.reward.requires_references

    @property
    def score_ranges(self) -> dict[str, tuple[float | None, float | None]]:
        return self.reward.score_ranges  # a mean or minimum of scores stays in their range

    @property
    def expected_resolution(self) -> tuple[int, int] | None:
        return self.reward.expected_resolution

    def frame_indices(self, batch_size: int, num_video_frames: int, device: torch.device) -> Tensor:
        """Indices ``(b, k)`` of the frames scored in each video."""
        k = min(self.num_frames, num_video_frames)
        if self.sampling == "random":
            rows = [torch.randperm(num_video_frames, generator=self.generator)[:k].sort().values
                    for _ in range(batch_size)]  # drawn on the CPU: the same draws on every device
            return torch.stack(rows).to(device)
        if self.sampling == "first":
            idx = torch.arange(k, device=device)
        elif self.sampling == "last":
            idx = torch.arange(num_video_frames - k, num_video_frames, device=device)
        else:
            idx = frame_indices(num_video_frames, k, device)
        return idx.expand(batch_size, -1)

    def forward(self, videos: Tensor, prompts: list[str] | None = None, references: Tensor | None = None,
                fps: float | None = None) -> dict[str, Tensor]:
        b, t = videos.shape[:2]
        idx = self.frame_indices(b, t, videos.device)  # (b, k)
        k = idx.shape[1]
        frames = videos[torch.arange(b, device=videos.device)[:, None], idx]  # (b, k, c, h, w)
        frames = frames.flatten(0, 1).unsqueeze(1)  # (b * k, 1, c, h, w): one-frame videos
        frame_prompts = None if prompts is None else [p for p in prompts for _ in range(k)]
        frame_refs = None if references is None else references.repeat_interleave(k, dim=0)
        scores = self.reward(frames, frame_prompts, frame_refs)  # one frame carries no frame rate
        reduce = (lambda x: x.mean(1)) if self.reduction == "mean" else (lambda x: x.min(1).values)
        return {dim: reduce(value.view(b, k)) for dim, value in scores.items()}
