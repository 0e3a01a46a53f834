"""Reward-guided sampling on the predicted clean sample (universal guidance, Bansal et al., arXiv 2302.07121; the
``x0``-prediction trick of DPS, Chung et al., arXiv 2209.14687; the gradient-based guidance of the survey's section 6).

At a chosen step of the Euler ODE sampler, the model's velocity gives its prediction of the clean sample,
``x0_hat = x - sigma * v`` (from ``x = (1 - sigma) x0 + sigma noise`` and ``v = noise - x0``). The decoded
``x0_hat`` is scored by a differentiable reward, and the gradient of the score with respect to the current latent
``x`` (through the decoder and, by default, the denoiser) nudges the next latent:

    x_next = x + (sigma_next - sigma) * v + scale * g / rms(g)

with ``g = d reward(decode(x0_hat)) / dx`` normalised per video to unit root-mean-square, so ``scale`` is the size of
the nudge in latent units (the initial noise has unit RMS). With ``scale = 0`` the nudge is exactly zero and the
samples are bit-for-bit those of ``AlignmentModule.generate(..., sampler="euler")``. No weights change.

Guidance needs the differentiable Euler path, so it always samples with the Euler ODE, never with the pipeline's
diffusers scheduler that ``generate``, best-of-N and noise search use by default: its samples at ``scale = 0`` are
those of ``--sampler euler``.

Guidance needs control of every step, so it runs on models whose sampler is the Euler ODE walk of
:meth:`AlignmentModule.sample_latents`; a model with its own sampler (a few-step DMD or consistency student) is
refused with an error naming its class (best-of-N and noise search sample through any model's own sampler).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lit_videoalign.inference.base import (
    InferenceResult,
    cfg_factor,
    check_images,
    check_prompts_and_seeds,
    require_differentiable,
    resolve_sampling,
    score,
)
from lit_videoalign.objectives.base import AlignmentModule
from lit_videoalign.schedules.flow import euler_step, sampling_sigmas
from lit_videoalign.schedules.samplers import predicted_x0  # its old home was here: still importable
from reward_zoo.base import RewardModel


# -- pure maths ------------------------------------------------------------------------------------------------------
def normalize_per_sample(grad: Tensor, eps: float = 1e-12) -> Tensor:
    """``grad`` divided by its root-mean-square over each sample's elements (a zero gradient stays zero)."""
    rms = grad.float().pow(2).flatten(1).mean(1).sqrt()  # (b,)
    return grad / (rms + eps).view(-1, *([1] * (grad.ndim - 1))).to(grad.dtype)


def require_euler_sampler(module: AlignmentModule, who: str) -> None:
    """Refuse a model whose sampler is not the Euler ODE walk of :meth:`AlignmentModule.sample_latents`.

    Reward guidance steers that walk step by step, so it would silently sample a model that samples otherwise (a
    few-step DMD or consistency student overrides ``sample_latents``) with the wrong sampler.
    """
    name = type(module).__name__
    if type(module).sample_latents is not AlignmentModule.sample_latents:
        raise ValueError(f"{who} steers the Euler ODE sampler step by step, but {name} samples with its own sampler "
                         f"({name}.sample_latents, e.g. a few-step student's); use best_of_n or noise_search, which "
                         f"sample through it")


def guided_steps(num_steps: int, step_range: tuple[int, int | None] | None) -> list[int]:
    """Step indices ``[start, stop)`` of a ``num_steps`` sampler that are guided (None: every step)."""
    if step_range is None:
        return list(range(num_steps))
    if len(step_range) != 2:
        raise ValueError(f"step_range must be (start, stop), got {step_range!r}")
    start, stop = step_range
    stop = num_steps if stop is None else stop
    if not 0 <= start < stop <= num_steps:
        raise ValueError(f"step_range must satisfy 0 <= start < stop <= num_inference_steps={num_steps}, "
                         f"got {tuple(step_range)}")
    return list(range(start, stop))


# -- the sampler -----------------------------------------------------------------------------------------------------
def reward_guided_sample(
    module: AlignmentModule,
    prompts: Sequence[str],
    reward: RewardModel,
    seeds: Sequence[int] | None = None,
    *,
    scale: float,
    step_range: tuple[int, int | None] | None = None,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    normalize_gradient: bool = True,
    backprop_denoiser: bool = True,
    reward_key: str = "overall",
    noise: Tensor | None = None,
    batch_size: int | None = None,
    images: Tensor | None = None,
) -> InferenceResult:
    """Sample with the Euler ODE sampler (always: guidance differentiates through its steps, which a pipeline's
    diffusers scheduler does not expose), nudging the latent up the reward's gradient at the guided steps.

    Args:
        module: the model, an :class:`AlignmentModule` that samples with the Euler ODE (one that overrides
            ``sample_latents``, such as a few-step DMD or consistency student, is refused: see
            :func:`require_euler_sampler`).
        prompts: one prompt per video.
        reward: a differentiable ``reward_zoo`` reward (a non-differentiable one is refused).
        seeds: one seed per prompt (default ``0 .. B-1``); the same seed as ``generate`` gives the same noise.
        scale: size of each nudge (per-video RMS in latent units when ``normalize_gradient``); 0 is plain sampling.
        step_range: ``(start, stop)`` step indices to guide, ``stop`` exclusive or None for the end; None guides
            every step. Early steps decide the layout, late ones the details.
        num_inference_steps: sampler steps (default: the module's).
        guidance_scale: classifier-free guidance (default: the module's).
        normalize_gradient: rescale each video's gradient to unit RMS (else ``scale`` multiplies the raw gradient).
        backprop_denoiser: differentiate through the denoiser's velocity too (exact ``d r / dx``, one backward pass
            through the denoiser per guided step); False treats ``v`` as constant, ``d x0_hat / dx = I`` (cheap).
        reward_key: which score to maximise.
        noise: start from this latent noise ``[B, C, T', H', W']`` instead of the seeds' noise.
        batch_size: videos sampled at once (default: all).
        images: one conditioning image per prompt ``[B, 3, h, w]`` in ``[0, 1]`` (image-to-video; both branches of
            classifier-free guidance keep it); None for text-to-video.

    Returns:
        :class:`InferenceResult` with the videos, their final reward ``scores``, ``nfe`` (forward evaluations per
        video) and ``info["guided_steps"]``, ``info["denoiser_backward"]`` (backward passes per video),
        ``info["guided_reward"]`` ``[B, len(guided_steps)]`` (the reward of ``x0_hat`` at each guided step).
    """
    prompts, seeds = check_prompts_and_seeds(prompts, seeds)
    require_euler_sampler(module, "reward guidance")
    require_differentiable(reward, "reward guidance", has_images=images is not None)
    images = check_images(images, len(prompts))
    if not isinstance(scale, (int, float)) or not scale >= 0:
        raise ValueError(f"scale must be a non-negative number, got {scale!r}")
    steps, cfg = resolve_sampling(module, num_inference_steps, guidance_scale)
    guided = guided_steps(steps, step_range)
    if noise is None:
        noise = module.initial_noise(seeds)
    elif noise.shape[0] != len(prompts):
        raise ValueError(f"got {noise.shape[0]} noises for {len(prompts)} prompts; expected one per prompt")
    batch_size = batch_size or len(prompts)
    reward.requires_grad_(False)
    videos, traces = [], []
    was_training = module.training
    module.eval()
    try:
        for i in range(0, len(prompts), batch_size):
            v, t = _guided_sample(module, prompts[i:i + batch_size], reward, noise[i:i + batch_size].to(module.device),
                                  steps, cfg, set(guided), float(scale), normalize_gradient, backprop_denoiser,
                                  reward_key, None if images is None else images[i:i + batch_size])
            videos.append(v)
            traces.append(t)
    finally:
        module.train(was_training)
    videos_t = torch.cat(videos)
    info = {"guided_steps": guided, "guided_reward": torch.cat(traces),
            "denoiser_backward": len(guided) * cfg_factor(cfg) if backprop_denoiser and scale > 0 else 0}
    return InferenceResult(videos_t, score(reward, videos_t, prompts, reward_key, fps=module.backbone.fps,
                                           references=images),
                           nfe=steps * cfg_factor(cfg), info=info)


@torch.no_grad()
def _guided_sample(module: AlignmentModule, prompts: list[str], reward: RewardModel, noise: Tensor, steps: int,
                   guidance_scale: float, guided: set[int], scale: float, normalize_gradient: bool,
                   backprop_denoiser: bool, reward_key: str, images: Tensor | None) -> tuple[Tensor, Tensor]:
    """One batch; the plain steps are exactly ``euler_sample``'s, so ``scale = 0`` reproduces ``generate``."""
    cond = module.with_images(module.backbone.encode_prompts(prompts), images)
    velocity_fn = module.guided_velocity_fn(cond, guidance_scale)
    sigmas = sampling_sigmas(steps, shift=module.sampling_shift)
    x = noise
    trace = []
    for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1].tolist(), sigmas[1:].tolist())):
        s = torch.full((x.shape[0],), sigma, device=x.device)
        if i not in guided:
            x = euler_step(x, velocity_fn(x, s), sigma, sigma_next)
            continue
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            if backprop_denoiser:
                v = velocity_fn(x_in, s)
            else:
                with torch.no_grad():
                    v = velocity_fn(x_in, s)
            x0 = predicted_x0(x_in, v, sigma)  # (b, c, t, h, w)
            refs = None if images is None else images.to(x.device)
            r = reward(module.backbone.decode_latents(x0), prompts, references=refs,
                       fps=module.backbone.fps)[reward_key]  # (b,)
            (grad,) = torch.autograd.grad(r.sum(), x_in)
        trace.append(r.detach().float())
        nudge = normalize_per_sample(grad) if normalize_gradient else grad
        x = euler_step(x, v.detach(), sigma, sigma_next) + scale * nudge
    videos = module.backbone.decode_latents(x)
    trace_t = torch.stack(trace, dim=1) if trace else torch.zeros(len(prompts), 0)
    return videos, trace_t
