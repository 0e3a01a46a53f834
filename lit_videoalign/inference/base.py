"""What every inference-time method shares: the result record, the sampler from given noise, scoring, NFE counts.

No method-specific maths here. ``NFE`` (number of function evaluations) counts forward passes of the denoiser per
returned video, each classifier-free-guidance branch separately: an ``S``-step sample with guidance costs ``2 S``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lit_videoalign.objectives.base import AlignmentModule
from lit_videoalign.schedules.flow import euler_sample, sampling_sigmas
from reward_zoo.base import RewardModel
from reward_zoo.composite import CompositeReward

# Candidate j of the prompt with seed s starts from the noise of seed ``s + j * SEED_STRIDE``: candidate 0 is the
# plain sample of that seed, and the candidates of consecutive seeds never share a noise.
SEED_STRIDE = 1_000_003


@dataclass
class InferenceResult:
    """The videos an inference-time method returns, with what they scored and what they cost.

    Attributes:
        videos: ``[B, T, C, H, W]`` in ``[0, 1]``, one per prompt.
        scores: ``Tensor[B]``, the selection reward of each returned video (for a batch-normalised reward, relative
            to the batch it was last scored in).
        nfe: denoiser forward evaluations spent per returned video (guidance branches counted separately).
        all_scores: ``Tensor[B, N]`` of every candidate scored, where the method has candidates.
        info: method-specific extras (chosen seeds, search history, backward passes, ...).
    """

    videos: Tensor
    scores: Tensor
    nfe: int
    all_scores: Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)


def check_prompts_and_seeds(prompts: Sequence[str], seeds: Sequence[int] | None) -> tuple[list[str], list[int]]:
    """Prompts as a list and one seed per prompt (default ``0 .. n-1``), or a clear error."""
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r}")
    prompts = list(prompts)
    seeds = list(range(len(prompts))) if seeds is None else [int(s) for s in seeds]
    if len(seeds) != len(prompts):
        raise ValueError(f"got {len(seeds)} seeds for {len(prompts)} prompts; expected one seed per prompt")
    return prompts, seeds


def check_reward(reward: RewardModel, who: str) -> None:
    if not isinstance(reward, RewardModel):
        raise TypeError(f"{who} needs a reward_zoo RewardModel (or CompositeReward), got {type(reward).__name__}")
    if reward.requires_references:
        raise ValueError(f"{who} scores text-to-video samples and has no reference images, but reward "
                         f"{type(reward).__name__} requires references")


def require_differentiable(reward: RewardModel, who: str) -> None:
    """Refuse a reward whose gradient with respect to the videos is missing or useless, naming it and why.

    A reward with ``differentiable=False`` has no gradient; a ``CompositeReward`` normalised within the batch
    (``"zscore"``, ``"rank"``) has scores that sum to a constant over the batch, so the gradient of the batch's
    total reward is zero (or absent) and a gradient method would learn nothing.
    """
    check_reward(reward, who)
    name = type(reward).__name__
    if isinstance(reward, CompositeReward):
        if reward.normalize != "none":
            raise ValueError(f"{who} needs a differentiable reward; CompositeReward with normalize="
                             f"{reward.normalize!r} normalises scores within the batch, so their sum has no useful "
                             f"gradient; use normalize='none' and set the weights to balance the scales")
        for sub_name, sub in reward.rewards.items():
            require_differentiable(sub, f"{who} (sub-reward {sub_name!r})")
    if not reward.differentiable:
        raise ValueError(f"{who} needs a differentiable reward, but {name} has differentiable=False (no gradient "
                         f"reaches the videos); use a gradient-free method such as best-of-N or noise search")


def cfg_factor(guidance_scale: float) -> int:
    """Denoiser evaluations per step and video: 2 with classifier-free guidance, 1 without."""
    return 1 if guidance_scale == 1.0 else 2


def resolve_sampling(module: AlignmentModule, num_inference_steps: int | None,
                     guidance_scale: float | None) -> tuple[int, float]:
    """The module's defaults for whatever is None, checked."""
    steps = num_inference_steps or module.hparams.num_inference_steps
    scale = module.hparams.guidance_scale if guidance_scale is None else float(guidance_scale)
    if steps < 1:
        raise ValueError(f"num_inference_steps must be at least 1, got {steps}")
    if scale < 0:
        raise ValueError(f"guidance_scale must be non-negative, got {scale}")
    return int(steps), scale


def candidate_seeds(seeds: Sequence[int], num_candidates: int, start: int = 0) -> list[list[int]]:
    """Per prompt, the seeds of candidates ``start .. start + num_candidates - 1`` (candidate 0 is the plain seed)."""
    return [[s + j * SEED_STRIDE for j in range(start, start + num_candidates)] for s in seeds]


@torch.no_grad()
def sample_from_noise(module: AlignmentModule, prompts: Sequence[str], noise: Tensor,
                      num_inference_steps: int | None = None, guidance_scale: float | None = None,
                      batch_size: int | None = None) -> Tensor:
    """Euler ODE samples from the given initial noise, decoded to ``[B, T, C, H, W]``.

    The same computation as :meth:`AlignmentModule.generate` (which draws the noise from seeds), in chunks of
    ``batch_size`` videos.
    """
    prompts = list(prompts)
    if noise.shape[0] != len(prompts):
        raise ValueError(f"got {noise.shape[0]} noises for {len(prompts)} prompts; expected one per prompt")
    steps, scale = resolve_sampling(module, num_inference_steps, guidance_scale)
    batch_size = batch_size or len(prompts)
    was_training = module.training
    module.eval()
    try:
        sigmas = sampling_sigmas(steps, shift=module.sampling_shift)
        out = []
        for i in range(0, len(prompts), batch_size):
            cond = module.backbone.encode_prompts(prompts[i:i + batch_size])
            latents = euler_sample(module.guided_velocity_fn(cond, scale), noise[i:i + batch_size].to(module.device),
                                   sigmas)
            out.append(module.backbone.decode_latents(latents))
        return torch.cat(out)
    finally:
        module.train(was_training)


@torch.no_grad()
def score(reward: RewardModel, videos: Tensor, prompts: Sequence[str], reward_key: str = "overall") -> Tensor:
    """``reward(videos, prompts)[reward_key]`` as a detached float ``Tensor[B]``."""
    scores = reward(videos, list(prompts))
    if reward_key not in scores:
        raise KeyError(f"reward {type(reward).__name__} has no score {reward_key!r}; it returns {sorted(scores)}")
    return scores[reward_key].detach().float()
