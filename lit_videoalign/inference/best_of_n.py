"""Best-of-N sampling (rejection sampling against a reward; e.g. Stiennon et al., arXiv 2009.01325, and the survey's
section 6): draw N videos per prompt, keep the one the reward scores highest.

The simplest inference-time alignment and the yardstick for every other one: it needs no gradient, works with any
reward or composite, and its cost grows linearly in N (N full samples per prompt). Candidate 0 of each prompt is the
plain sample of that prompt's seed, so best-of-1 is plain sampling. The N candidates of one prompt are always scored
in one batch, so a composite normalised within the batch compares them with each other only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lit_videoalign.inference.base import (
    InferenceResult,
    candidate_seeds,
    cfg_factor,
    check_images,
    check_prompts_and_seeds,
    check_reward,
    resolve_sampling,
    sample_from_noise,
    score,
    seeded_candidates,
)
from lit_videoalign.objectives.base import AlignmentModule
from reward_zoo.base import RewardModel


def best_of_n(
    module: AlignmentModule,
    prompts: Sequence[str],
    reward: RewardModel,
    n: int,
    seeds: Sequence[int] | None = None,
    *,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    reward_key: str = "overall",
    batch_size: int = 16,
    return_candidates: bool = False,
    sampler: str = "pipeline",
    images: Tensor | None = None,
) -> InferenceResult:
    """Sample ``n`` candidates per prompt with the module's own sampler and return the best of each.

    Args:
        module: the model (any :class:`AlignmentModule`); its sampler (:meth:`~AlignmentModule.sample_latents`: the
            pipeline's scheduler, the Euler ODE, or a student's few-step sampler) draws the candidates, as
            ``generate`` would for their seeds.
        prompts: one prompt per returned video.
        reward: any ``reward_zoo`` reward or ``CompositeReward``; ``reward_key`` of its output is maximised.
        n: candidates per prompt (``n = 1`` is plain sampling).
        seeds: one seed per prompt (default ``0 .. B-1``); candidate ``j`` uses ``seed + j * SEED_STRIDE``.
        num_inference_steps: sampler steps (default: the module's own, e.g. a DMD student's training sigmas).
        guidance_scale: classifier-free guidance (default: the module's).
        reward_key: which score to maximise.
        batch_size: videos generated at once (rounded to whole prompts, at least one prompt's ``n``).
        return_candidates: also return every candidate as ``info["candidates"]`` ``[B, n, T, C, H, W]``.
        sampler: ``"pipeline"`` (the backbone's diffusers scheduler, as ``generate`` samples) or ``"euler"``; a
            few-step student always uses its own.
        images: one conditioning image per prompt ``[B, 3, h, w]`` in ``[0, 1]`` (image-to-video), for all of its
            candidates; None for text-to-video.

    Returns:
        :class:`InferenceResult` with the best videos, their scores, ``all_scores`` ``[B, n]``, ``nfe = n * steps *
        (2 if guided else 1)`` and ``info["best_index"]``, ``info["seeds"]`` (the chosen seeds).
    """
    prompts, seeds = check_prompts_and_seeds(prompts, seeds)
    check_reward(reward, "best_of_n", has_images=images is not None)
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    images = check_images(images, len(prompts))
    steps, scale = resolve_sampling(module, num_inference_steps, guidance_scale)
    all_seeds = candidate_seeds(seeds, n)
    per_chunk = max(1, batch_size // n)  # prompts per sampling call
    best, all_scores, candidates = [], [], []
    for start in range(0, len(prompts), per_chunk):
        chunk = prompts[start:start + per_chunk]
        flat_prompts = [p for p in chunk for _ in range(n)]
        flat_seeds = [s for ss in all_seeds[start:start + per_chunk] for s in ss]
        flat_images = None if images is None else images[start:start + per_chunk].repeat_interleave(n, dim=0)
        noise, generators = seeded_candidates(module, flat_seeds)  # as ``generate`` draws them
        videos = sample_from_noise(module, flat_prompts, noise, num_inference_steps, scale, generators=generators,
                                   sampler=sampler, images=flat_images)  # a student: its own few steps
        videos = videos.view(len(chunk), n, *videos.shape[1:])  # (p, n, t, c, h, w)
        for i, prompt in enumerate(chunk):
            refs = None if flat_images is None else flat_images[i * n:(i + 1) * n]  # its image, n times
            s = score(reward, videos[i], [prompt] * n, reward_key, fps=module.backbone.fps, references=refs)  # (n,)
            all_scores.append(s)
            best.append(videos[i, int(s.argmax())])
        if return_candidates:
            candidates.append(videos)
    all_scores_t = torch.stack(all_scores)  # (b, n)
    index = all_scores_t.argmax(dim=1)
    info = {"best_index": index.tolist(), "seeds": [ss[j] for ss, j in zip(all_seeds, index.tolist())],
            "candidate_seeds": all_seeds}
    if return_candidates:
        info["candidates"] = torch.cat(candidates)
    return InferenceResult(torch.stack(best), all_scores_t.gather(1, index[:, None]).squeeze(1),
                           nfe=n * steps * cfg_factor(scale), all_scores=all_scores_t, info=info)
