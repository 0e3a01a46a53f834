"""What every inference-time method shares: the result record, the sampler from given noise, scoring, NFE counts.

No method-specific maths here. Every method samples through the model's own sampler,
:meth:`~lit_videoalign.objectives.base.AlignmentModule.sample_latents`, so a few-step DMD or consistency student is
searched and best-of-N'd with its own few steps. A base model samples with its pipeline's own diffusers scheduler by
default (``sampler="pipeline"``, as ``generate`` does; ``"euler"`` for the Euler ODE); reward guidance alone needs the
Euler ODE. ``NFE`` (number of function evaluations) counts forward passes of
the denoiser per returned video, each classifier-free-guidance branch separately: an ``S``-step sample with guidance
costs ``2 S`` (a few-step student calls its denoiser once per step, like the Euler sampler).

On an image-to-video model every method takes ``images``, one conditioning image ``(3, h, w)`` in ``[0, 1]`` per
prompt (a ``[B, 3, h, w]`` tensor), which every candidate of that prompt and both branches of guidance are conditioned
on; the same image and seed give the same video.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lit_videoalign.objectives.base import AlignmentModule
from lit_videoalign.objectives.losses import check_reward, require_differentiable  # noqa: F401  (re-exported)
from lit_videoalign.schedules.samplers import check_sampler, seeded_noise
from reward_zoo.base import RewardModel

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


def check_images(images: Tensor | None, num_prompts: int) -> Tensor | None:
    """``images`` as given (None for text-to-video), or a clear error unless it is one image ``(3, h, w)`` per prompt
    (the backbone checks the channels, range and size when it encodes them)."""
    if images is None:
        return None
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[0] != num_prompts:
        got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a [B, 3, H, W] tensor with one conditioning image per prompt ({num_prompts}"
                         f"), got {got}")
    return images


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


def seeded_candidates(module: AlignmentModule, seeds: Sequence[int]) -> tuple[Tensor, list[torch.Generator]]:
    """The initial noise of each seed, as :meth:`AlignmentModule.generate` draws it, and each seed's generator,
    advanced past that draw: a stochastic sampler (a few-step student re-noises between its steps) continues from it,
    so :func:`sample_from_noise` with both samples what ``generate`` samples for these seeds."""
    hp = module.hparams
    return seeded_noise(module.backbone.latent_shape(hp.num_frames, hp.height, hp.width), seeds, module.device)


@torch.no_grad()
def sample_from_noise(module: AlignmentModule, prompts: Sequence[str], noise: Tensor,
                      num_inference_steps: int | None = None, guidance_scale: float | None = None,
                      batch_size: int | None = None, generators: Sequence[torch.Generator] | None = None,
                      sampler: str = "pipeline", images: Tensor | None = None) -> Tensor:
    """Samples from the given initial noise with the module's own sampler (:meth:`AlignmentModule.sample_latents`:
    the pipeline's scheduler or the Euler ODE as ``sampler`` says, or a student's few-step sampler), decoded to
    ``[B, T, C, H, W]``.

    The same computation as :meth:`AlignmentModule.generate` (which draws the noise from seeds), in chunks of
    ``batch_size`` videos. ``generators`` (one per video, e.g. from :func:`seeded_candidates`) feed a stochastic
    sampler's draws; None leaves them to the global RNG (a deterministic sampler draws nothing). ``images``: one
    conditioning image per video ``[B, 3, h, w]`` in ``[0, 1]`` (image-to-video), encoded with its prompt.
    """
    prompts = list(prompts)
    images = check_images(images, len(prompts))
    if noise.shape[0] != len(prompts):
        raise ValueError(f"got {noise.shape[0]} noises for {len(prompts)} prompts; expected one per prompt")
    if generators is not None and len(generators) != len(prompts):
        raise ValueError(f"got {len(generators)} generators for {len(prompts)} prompts; expected one per prompt")
    _, scale = resolve_sampling(module, num_inference_steps, guidance_scale)
    check_sampler(sampler)
    batch_size = batch_size or len(prompts)
    was_training = module.training
    module.eval()
    try:
        out = []
        for i in range(0, len(prompts), batch_size):
            cond = module.with_images(module.backbone.encode_prompts(prompts[i:i + batch_size]),
                                      None if images is None else images[i:i + batch_size])
            latents = module.sample_latents(noise[i:i + batch_size].to(module.device), cond,
                                            num_inference_steps=num_inference_steps, guidance_scale=scale,
                                            generator=None if generators is None else generators[i:i + batch_size],
                                            sampler=sampler)
            out.append(module.backbone.decode_latents(latents))
        return torch.cat(out)
    finally:
        module.train(was_training)


@torch.no_grad()
def score(reward: RewardModel, videos: Tensor, prompts: Sequence[str], reward_key: str = "overall",
          fps: float | None = None, references: Tensor | None = None) -> Tensor:
    """``reward(videos, prompts, references, fps=fps)[reward_key]`` as a detached float ``Tensor[B]`` (``fps``: the
    generator's; ``references``: the videos' conditioning images, image-to-video)."""
    references = None if references is None else references.to(videos.device)
    scores = reward(videos, list(prompts), references=references, fps=fps)
    if reward_key not in scores:
        raise KeyError(f"reward {type(reward).__name__} has no score {reward_key!r}; it returns {sorted(scores)}")
    return scores[reward_key].detach().float()
