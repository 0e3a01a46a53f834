"""Pairwise rewards: ``PairwiseReward.compare(videos_a, videos_b, prompts, fps) -> {dimension: P(a beats b)}``.

A judge that sees two videos at once (a VLM asked "which is better?") cannot be reduced to a score per video; a
pointwise reward can always be read as a pairwise one through Bradley-Terry, ``P(a beats b) = sigmoid(r_a - r_b)``
(:func:`bt_pairwise`). Win-rate advantages (Pref-GRPO, arXiv 2508.20751) only need the pairwise view:
:func:`comparison_pairs` picks which samples of a group meet, :func:`win_rates` turns the judge's probabilities into
each sample's win rate.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor, nn

from lit_videoalign.video_io import check_video
from reward_zoo.base import RewardModel, check_fps


class PairwiseReward:
    """Mixin of a reward that compares two videos: ``compare(videos_a, videos_b, prompts=None, fps=None)``.

    Subclasses implement :meth:`forward_pair` with the same signature; ``compare`` checks the inputs (equal batch
    sizes, videos ``[B, T, C, H, W]`` in [0, 1], prompts aligned, ``fps`` positive) before it runs and the output
    after: exactly ``pairwise_dimensions`` plus ``"overall"``, each a ``Tensor[B]`` of probabilities in [0, 1].
    A class may be pointwise too (a ``RewardModel``), as the VLM judge is.
    """

    pairwise_dimensions: ClassVar[tuple[str, ...]] = ()
    requires_prompts: ClassVar[bool] = False

    def compare(self, videos_a: Tensor, videos_b: Tensor, prompts: list[str] | None = None,
                fps: float | None = None) -> dict[str, Tensor]:
        """P(``videos_a[i]`` beats ``videos_b[i]``) per dimension, with ``"overall"``: ``{dimension: Tensor[B]}``."""
        name = type(self).__name__
        fps = check_fps(fps, name)
        for what, videos in (("videos_a", videos_a), ("videos_b", videos_b)):
            check_video(videos.detach() if isinstance(videos, Tensor) else videos, batched=True, name=what)
        if videos_a.shape[0] != videos_b.shape[0]:
            raise ValueError(f"{name}.compare: videos_a has {videos_a.shape[0]} items but videos_b has "
                             f"{videos_b.shape[0]}; pairs need equal batch sizes")
        if videos_a.shape[0] == 0:
            raise ValueError(f"{name}.compare got an empty batch of pairs")
        if prompts is None:
            if self.requires_prompts:
                raise ValueError(f"{name} compares prompt following and needs prompts, got prompts=None")
        elif isinstance(prompts, str) or len(prompts) != videos_a.shape[0]:
            got = "a string" if isinstance(prompts, str) else f"{len(prompts)} prompts"
            raise ValueError(f"{name}.compare: {videos_a.shape[0]} pairs but {got} (one prompt per pair)")
        probs = self.forward_pair(videos_a, videos_b, prompts, fps)
        check_probabilities(probs, (*self.pairwise_dimensions, "overall"), videos_a.shape[0], name)
        return probs

    def forward_pair(self, videos_a: Tensor, videos_b: Tensor, prompts: list[str] | None,
                     fps: float | None) -> dict[str, Tensor]:
        """The probabilities; called by :meth:`compare` after its checks."""
        raise NotImplementedError(f"{type(self).__name__} must implement forward_pair")


def check_probabilities(probs: dict[str, Tensor], dimensions: tuple[str, ...], batch_size: int, who: str) -> None:
    """Raise unless ``probs`` holds exactly ``dimensions``, each a finite ``Tensor[batch_size]`` in [0, 1]."""
    if not isinstance(probs, dict) or set(probs) != set(dimensions):
        got = sorted(probs) if isinstance(probs, dict) else type(probs).__name__
        raise KeyError(f"{who}.forward_pair returned {got}, expected {sorted(dimensions)}")
    for key, p in probs.items():
        if not isinstance(p, Tensor) or p.shape != (batch_size,):
            shape = tuple(p.shape) if isinstance(p, Tensor) else type(p).__name__
            raise ValueError(f"{who} probability {key!r} must be a Tensor of shape ({batch_size},), got {shape}")
        if not torch.isfinite(p).all() or (p < 0).any() or (p > 1).any():
            raise FloatingPointError(f"{who} probability {key!r} is not in [0, 1] at items "
                                     f"{((p < 0) | (p > 1) | ~torch.isfinite(p)).nonzero().flatten().tolist()}")


class BradleyTerryPairwise(nn.Module, PairwiseReward):
    """A pointwise reward read pairwise: ``P(a beats b) = sigmoid((r_a - r_b) / temperature)`` per dimension.

    Each video is scored once; the pairs only index the scores, so a group's all-pairs comparison costs one reward
    call per video. Build it with :func:`bt_pairwise`.
    """

    def __init__(self, reward: RewardModel, temperature: float = 1.0) -> None:
        super().__init__()
        if not isinstance(reward, RewardModel):
            raise TypeError(f"bt_pairwise wraps a RewardModel, got {type(reward).__name__}")
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"bt_pairwise: temperature must be a positive number, got {temperature!r}")
        self.reward = reward
        self.temperature = float(temperature)
        self.pairwise_dimensions = tuple(reward.dimensions)
        self.requires_prompts = reward.requires_prompts

    def forward_pair(self, videos_a, videos_b, prompts, fps):
        b = videos_a.shape[0]
        scores = self.reward(torch.cat([videos_a, videos_b]), None if prompts is None else [*prompts, *prompts],
                             fps=fps)
        return {k: torch.sigmoid((v[:b] - v[b:]).float() / self.temperature) for k, v in scores.items()}

    def score_then_compare(self, videos: Tensor, prompts: list[str] | None, pairs: Tensor,
                           fps: float | None = None) -> dict[str, Tensor]:
        """P(``videos[i]`` beats ``videos[j]``) for each row ``(i, j)`` of ``pairs`` ``[P, 2]``, scoring each video
        once (the cheap path :func:`win_rates` takes for a pointwise reward)."""
        scores = self.reward(videos, prompts, fps=fps)
        i, j = pairs[:, 0], pairs[:, 1]
        return {k: torch.sigmoid((v[i] - v[j]).float() / self.temperature) for k, v in scores.items()}


def bt_pairwise(reward: RewardModel, temperature: float = 1.0) -> BradleyTerryPairwise:
    """``reward`` as a :class:`PairwiseReward` through Bradley-Terry: ``sigmoid((r_a - r_b) / temperature)``."""
    return BradleyTerryPairwise(reward, temperature)


def comparison_pairs(num_samples: int, group_size: int, pairs_per_sample: int | None = None,
                     generator: torch.Generator | None = None) -> Tensor:
    """``LongTensor[P, 2]`` of index pairs ``(i, j)``, ``i != j``, both in the same group of ``group_size``
    consecutive samples: every unordered pair once (``pairs_per_sample=None``), or for each sample ``i`` that many
    distinct opponents drawn from its group with ``generator`` (a pair drawn from both ends appears twice)."""
    if group_size < 2 or num_samples % group_size:
        raise ValueError(f"win rates need groups of at least 2 that tile the batch, got {num_samples} samples in "
                         f"groups of {group_size}")
    rows = []
    for start in range(0, num_samples, group_size):
        if pairs_per_sample is None:
            rows += [(start + a, start + b) for a in range(group_size) for b in range(a + 1, group_size)]
            continue
        if not 1 <= pairs_per_sample <= group_size - 1:
            raise ValueError(f"pairs_per_sample must be in [1, group_size - 1] = [1, {group_size - 1}], "
                             f"got {pairs_per_sample}")
        for a in range(group_size):
            others = [b for b in range(group_size) if b != a]
            pick = torch.randperm(len(others), generator=generator)[:pairs_per_sample].tolist()
            rows += [(start + a, start + others[k]) for k in pick]
    return torch.tensor(rows, dtype=torch.long)


def win_rates(probs: Tensor, pairs: Tensor, num_samples: int) -> Tensor:
    """Each sample's win rate ``Tensor[num_samples]``: the mean, over the comparisons it took part in, of its
    probability of winning (``probs[p]`` for the first of pair ``p``, ``1 - probs[p]`` for the second). NaN
    probabilities (a failed comparison) are left out; a sample with no valid comparison gets NaN."""
    if probs.shape != (pairs.shape[0],):
        raise ValueError(f"probs must have one entry per pair, got {tuple(probs.shape)} for {pairs.shape[0]} pairs")
    ok = torch.isfinite(probs)
    p = torch.where(ok, probs, torch.zeros_like(probs)).float()
    pairs = pairs.to(probs.device)
    zeros = torch.zeros(num_samples, device=probs.device)
    wins = zeros.index_add(0, pairs[:, 0], p).index_add_(0, pairs[:, 1], (1 - p) * ok)  # (num_samples,)
    count = zeros.index_add(0, pairs[:, 0], ok.float()).index_add_(0, pairs[:, 1], ok.float())  # (num_samples,)
    return torch.where(count > 0, wins / count.clamp_min(1), torch.full_like(wins, float("nan")))
