"""Search over initial noises, budgeted in denoiser evaluations (inference-time scaling of diffusion models by random
and zero-order search, Ma et al., arXiv 2501.09732; the survey's section 6).

The initial noise decides much of a flow model's sample (a clip's layout and motion are fixed in the first steps),
and some noises are better than others for a given prompt. A verifier (any reward) ranks complete samples:

- ``"random"``: random search; candidates are fresh noises from consecutive seeds, the best sample is kept.
- ``"greedy"``: zero-order search; a first population of fresh noises, then rounds that perturb the best noise so
  far, ``n' = sqrt(1 - lambda^2) n_best + lambda eps`` (which keeps ``n'`` standard normal), keeping a candidate only
  if it beats the incumbent.

Each round scores the incumbent together with its challengers, so rewards normalised within the batch compare them
fairly, and for an absolute reward the best score never decreases. The budget is in NFE per prompt: a sample costs
``steps * (2 if guided else 1)`` evaluations, and the search stops before the next sample would exceed the budget.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from lit_videoalign.inference.base import (
    SEED_STRIDE,
    InferenceResult,
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
from lit_videoalign.schedules.samplers import check_sampler
from reward_zoo.base import RewardModel

SEARCH_MODES = ("random", "greedy")


def perturb_noise(noise: Tensor, eps: Tensor, strength: float) -> Tensor:
    """``sqrt(1 - strength^2) * noise + strength * eps``: a neighbour of ``noise`` that stays standard normal."""
    if noise.shape != eps.shape:
        raise ValueError(f"noise and eps must have the same shape, got {tuple(noise.shape)} and {tuple(eps.shape)}")
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"perturbation strength must be in (0, 1], got {strength}")
    return math.sqrt(1.0 - strength**2) * noise + strength * eps


def noise_search(
    module: AlignmentModule,
    prompts: Sequence[str],
    reward: RewardModel,
    budget_nfe: int,
    seeds: Sequence[int] | None = None,
    *,
    mode: str = "greedy",
    population: int = 4,
    perturbation: float = 0.5,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    reward_key: str = "overall",
    batch_size: int = 16,
    sampler: str = "pipeline",
    images: Tensor | None = None,
) -> InferenceResult:
    """Refine the initial noise of each prompt by reward within ``budget_nfe`` denoiser evaluations per prompt.

    Args:
        module: the model (any :class:`AlignmentModule`); candidates are sampled with its own sampler
            (:meth:`~AlignmentModule.sample_latents`: the pipeline's scheduler, the Euler ODE, or a student's few-step
            sampler). Candidate ``j``
            of the prompt with seed ``s`` draws any sampler noise from seed ``s + j * SEED_STRIDE``.
        prompts: one prompt per returned video.
        reward: any ``reward_zoo`` reward or ``CompositeReward``; ``reward_key`` of its output is maximised.
        budget_nfe: denoiser evaluations allowed per prompt (at least one sample's worth).
        seeds: one seed per prompt (default ``0 .. B-1``); the first candidate is the plain sample of that seed, so
            the search never returns worse than plain sampling under an absolute reward.
        mode: ``"random"`` (fresh noises) or ``"greedy"`` (perturb the best noise after the first population).
        population: candidates per round and prompt.
        perturbation: ``lambda`` of the greedy perturbation, in (0, 1] (1 draws fresh noise).
        num_inference_steps: sampler steps (default: the module's own, e.g. a DMD student's training sigmas).
        guidance_scale: classifier-free guidance (default: the module's).
        reward_key: which score to maximise.
        batch_size: videos sampled at once.
        sampler: ``"pipeline"`` (the backbone's diffusers scheduler, as ``generate`` samples) or ``"euler"``; a
            few-step student always uses its own.
        images: one conditioning image per prompt ``[B, 3, h, w]`` in ``[0, 1]`` (image-to-video), for all of its
            candidates; None for text-to-video.

    Returns:
        :class:`InferenceResult` with the best videos, their ``scores``, ``nfe`` (spent per prompt, at most
        ``budget_nfe``), ``all_scores`` ``[B, samples]`` (each candidate as scored in its round) and
        ``info["history"]`` ``[B, rounds]`` (the incumbent's score after each round), ``info["noise"]`` (the best
        initial noises), ``info["seeds"]`` (the best candidates' seeds), ``info["rounds"]``, ``info["samples"]``.
        ``sample_from_noise(module, prompts, info["noise"], generators=seeded_candidates(module, info["seeds"])[1])``
        samples the winners again, with a stochastic few-step sampler too.
    """
    prompts, seeds = check_prompts_and_seeds(prompts, seeds)
    check_reward(reward, "noise_search", has_images=images is not None)
    if mode not in SEARCH_MODES:
        raise ValueError(f"mode must be one of {SEARCH_MODES}, got {mode!r}")
    if not isinstance(population, int) or population < 1:
        raise ValueError(f"population must be a positive integer, got {population!r}")
    if not 0.0 < perturbation <= 1.0:
        raise ValueError(f"perturbation must be in (0, 1], got {perturbation}")
    images = check_images(images, len(prompts))
    steps, scale = resolve_sampling(module, num_inference_steps, guidance_scale)
    check_sampler(sampler)
    cost = steps * cfg_factor(scale)
    total = budget_nfe // cost if isinstance(budget_nfe, int) else 0
    if total < 1:
        raise ValueError(f"budget_nfe={budget_nfe!r} is below the cost of one sample ({steps} steps x "
                         f"{cfg_factor(scale)} = {cost} NFE); raise it or use fewer steps")
    b = len(prompts)
    shape = module.backbone.latent_shape(module.hparams.num_frames, module.hparams.height, module.hparams.width)

    def fresh(j0: int, k: int) -> tuple[Tensor, list[torch.Generator]]:
        # candidates j0 .. j0 + k - 1 of each prompt: (b, k, ...) noises and their b * k generators, prompt by prompt
        drawn = [seeded_candidates(module, [s + j * SEED_STRIDE for j in range(j0, j0 + k)]) for s in seeds]
        return torch.stack([noise.cpu() for noise, _ in drawn]), [g for _, gens in drawn for g in gens]

    def run(noises: Tensor, generators: list[torch.Generator]) -> Tensor:  # (b, k, ...) -> (b, k, t, c, h, w)
        k = noises.shape[1]
        flat = sample_from_noise(module, [p for p in prompts for _ in range(k)], noises.flatten(0, 1),
                                 num_inference_steps, scale, batch_size=batch_size, generators=generators,
                                 sampler=sampler, images=None if images is None else images.repeat_interleave(k, 0))
        return flat.view(b, k, *flat.shape[1:]).cpu()

    used, rounds = 0, 0
    best_noise = best_video = best_score = best_seed = None
    all_scores, history = [], []
    while used < total:
        k = min(population, total - used)
        noises, generators = fresh(used, k)  # a perturbed candidate keeps only its seed's generator
        if mode == "greedy" and best_noise is not None:
            eps = torch.stack([torch.randn((k, *shape), generator=torch.Generator().manual_seed(
                (s * 7919 + rounds) % 2**63)) for s in seeds])  # per prompt, so batching does not change it
            noises = perturb_noise(best_noise[:, None].expand(-1, k, *shape), eps, perturbation)
        videos = run(noises, generators)
        round_seeds = torch.tensor([[s + j * SEED_STRIDE for j in range(used, used + k)] for s in seeds])  # (b, k)
        round_scores = []
        for i, prompt in enumerate(prompts):
            batch = videos[i] if best_video is None else torch.cat([best_video[i:i + 1], videos[i]])
            refs = None if images is None else images[i:i + 1].expand(len(batch), -1, -1, -1).to(module.device)
            s = score(reward, batch.to(module.device), [prompt] * len(batch), reward_key, fps=module.backbone.fps,
                      references=refs).cpu()
            round_scores.append(s)
        round_scores = torch.stack(round_scores)  # (b, k) or (b, 1 + k) with the incumbent first
        challengers = round_scores if best_video is None else round_scores[:, 1:]
        top = challengers.argmax(1)
        top_score = challengers.gather(1, top[:, None]).squeeze(1)
        top_seed = round_seeds[torch.arange(b), top]
        if best_video is None:
            best_noise, best_video, best_score = noises[torch.arange(b), top], videos[torch.arange(b), top], top_score
            best_seed = top_seed
        else:
            better = top_score > round_scores[:, 0]  # ties keep the incumbent
            best_score = torch.where(better, top_score, round_scores[:, 0])
            best_noise = torch.where(better.view(-1, *[1] * len(shape)), noises[torch.arange(b), top], best_noise)
            best_video = torch.where(better.view(-1, 1, 1, 1, 1), videos[torch.arange(b), top], best_video)
            best_seed = torch.where(better, top_seed, best_seed)
        all_scores.append(challengers)
        history.append(best_score)
        used += k
        rounds += 1
    info = {"history": torch.stack(history, dim=1), "noise": best_noise, "seeds": best_seed.tolist(),
            "rounds": rounds, "samples": used, "mode": mode}
    return InferenceResult(best_video.to(module.device), best_score, nfe=used * cost,
                           all_scores=torch.cat(all_scores, dim=1), info=info)
