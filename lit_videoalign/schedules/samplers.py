"""Samplers of flow models: pure loops over a velocity or x0 function, no models and no Lightning.

The Euler ODE sampler is :func:`~lit_videoalign.schedules.flow.euler_sample` (and the Flow-GRPO SDE step
:func:`~lit_videoalign.schedules.flow.sde_step_with_logprob`); this module adds what the few-step students and the
guided samplers share:

- :func:`predicted_x0`, the clean sample a velocity points to, ``x0 = x - sigma * v``;
- :func:`cfg_velocity`, classifier-free guidance ``v_u + g * (v_c - v_u)``;
- :func:`multistep_sample`, few-step sampling of an x0 predictor (multistep consistency sampling, Song et al., arXiv
  2303.01469, Algorithm 1; DMD2's student, arXiv 2405.14867), with :func:`next_sample` its transition;
- :func:`seeded_noise`, the starting noise of each seed with the seed's generator, whose later draws (a few-step
  sampler's re-noising) then depend on that seed alone, not on the batch;
- :func:`scheduler_sample`, sampling with a pipeline's own diffusers scheduler (UniPC with Wan's ``flow_shift``,
  FlowMatchEuler, ...) exactly as the diffusers pipeline loop does, so samples match what a user deploys.

Phased sampling (phased consistency, arXiv 2405.18407) is ``euler_sample`` on the student's phase grid.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from lit_videoalign.schedules.flow import add_noise

SAMPLER_MODES = ("renoise", "euler")
# How a base model samples (AlignmentModule.sample_latents): with its pipeline's diffusers scheduler, or our Euler ODE.
SAMPLERS = ("pipeline", "euler")

# A sampler's source of randomness: the global RNG (None), one generator for the batch, or one per sample (seeded
# sampling that does not depend on how samples are batched).
Generators = torch.Generator | Sequence[torch.Generator] | None


def per_sample_sigma(sigma: float | Tensor, like: Tensor) -> Tensor:
    """``sigma`` (float or ``Tensor[B]``) as a float32 tensor shaped ``[B, 1, 1, ...]`` (or a scalar) against
    ``like``."""
    s = torch.as_tensor(sigma, dtype=torch.float32, device=like.device)
    if s.ndim == 0:
        return s
    if s.ndim != 1 or s.shape[0] != like.shape[0]:
        raise ValueError(f"sigma must be a float or Tensor[B] with B={like.shape[0]}, got shape {tuple(s.shape)}")
    return s.view(-1, *([1] * (like.ndim - 1)))


def predicted_x0(x: Tensor, velocity: Tensor, sigma: float | Tensor) -> Tensor:
    """The clean sample the velocity points to: ``x - sigma * v`` (from ``x = (1 - sigma) x0 + sigma noise`` and
    ``v = noise - x0``).

    Args:
        x: ``[B, ...]`` noisy latents at ``sigma``.
        velocity: ``[B, ...]`` the velocity prediction at ``(x, sigma)``.
        sigma: a float, a scalar tensor or ``Tensor[B]``; it multiplies in ``x``'s dtype.
    """
    if x.shape != velocity.shape:
        raise ValueError(f"x and velocity must have the same shape, got {tuple(x.shape)} and {tuple(velocity.shape)}")
    return x - per_sample_sigma(sigma, x).to(x.dtype) * velocity


def cfg_velocity(v_cond: Tensor, v_uncond: Tensor, guidance_scale: float) -> Tensor:
    """Classifier-free guidance (Ho and Salimans, arXiv 2207.12598): ``v_u + g * (v_c - v_u)``."""
    if v_cond.shape != v_uncond.shape:
        raise ValueError(f"v_cond and v_uncond must have the same shape, got {tuple(v_cond.shape)} and "
                         f"{tuple(v_uncond.shape)}")
    return v_uncond + guidance_scale * (v_cond - v_uncond)


def next_sample(x: Tensor, x0: Tensor, sigma: float, sigma_next: float, mode: str = "renoise",
                noise: Tensor | None = None) -> Tensor:
    """One few-step sampler transition from ``x`` at ``sigma``, given the prediction ``x0``, to ``sigma_next``.

    ``"renoise"`` (consistency models, DMD2): ``(1 - sigma_next) * x0 + sigma_next * noise`` with fresh ``noise``;
    ``"euler"``: the Euler step of the velocity the prediction implies, ``x + (sigma_next - sigma) * (x - x0) / sigma``.
    """
    if mode == "renoise":
        if noise is None:
            raise ValueError("the renoise transition needs fresh noise, got None")
        return add_noise(x0, noise, sigma_next)
    if mode == "euler":
        if sigma <= 0:
            raise ValueError(f"an Euler transition needs sigma > 0, got {sigma}")
        return x + (sigma_next - sigma) / sigma * (x - x0)
    raise ValueError(f"sampler mode must be one of {list(SAMPLER_MODES)}, got {mode!r}")


def _check_generators(generators: Generators, batch: int) -> None:
    if generators is None or isinstance(generators, torch.Generator):
        return
    if len(generators) != batch:
        raise ValueError(f"got {len(generators)} generators for a batch of {batch}; expected one per sample")


def draw_noise(like: Tensor, generators: Generators = None) -> Tensor:
    """Standard normal noise shaped like ``like``: one draw per sample from a sequence of ``generators`` (seeded, on
    CPU, so a seed gives the same draw on every device), one draw for the batch from a single generator, or from the
    global RNG (None)."""
    if generators is None:
        return torch.randn_like(like)
    if isinstance(generators, torch.Generator):
        return torch.randn(like.shape, generator=generators, device=generators.device).to(like)
    _check_generators(generators, like.shape[0])
    return torch.stack([torch.randn(like.shape[1:], generator=g) for g in generators]).to(like)


def seeded_noise(shape: Sequence[int], seeds: Sequence[int],
                 device: torch.device | str | None = None) -> tuple[Tensor, list[torch.Generator]]:
    """The starting noise ``(len(seeds), *shape)`` of each seed, drawn on CPU (a seed gives the same noise on every
    device, as :meth:`~lit_videoalign.objectives.base.AlignmentModule.initial_noise` draws it), and the seeds' CPU
    generators, advanced past that draw: a sampler's later draws from them depend on each sample's seed only."""
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    noise = torch.stack([torch.randn(tuple(shape), generator=g) for g in generators])
    return noise.to(device) if device is not None else noise, generators


def multistep_sample(
    x0_fn: Callable[[Tensor, Tensor], Tensor],
    noise: Tensor,
    sigmas: Tensor,
    generators: Generators = None,
    mode: str = "renoise",
) -> Tensor:
    """Few-step sampling of an x0 predictor: predict ``x0``, move to the next sigma (:func:`next_sample`), repeat.

    With ``mode="renoise"`` this is multistep consistency sampling (Song et al., Algorithm 1). It calls ``x0_fn`` once
    per step: ``len(sigmas) - 1`` times for a grid ending at 0.

    Args:
        x0_fn: ``(x, sigma Tensor[B]) -> x0`` of a few-step student.
        noise: the starting sample at ``sigmas[0]``.
        sigmas: decreasing grid ending at 0, e.g. ``[1.0, 0.75, 0.5, 0.25, 0.0]`` for 4 steps.
        generators: the re-noising draws' source (:func:`draw_noise`): one generator per sample (seeded sampling),
            one for the batch, or None for the global RNG.
        mode: ``"renoise"`` or ``"euler"``.

    Returns:
        The last ``x0`` prediction.
    """
    if sigmas.ndim != 1 or len(sigmas) < 2:
        raise ValueError(f"sigmas must be a 1-D grid of at least 2 values, got shape {tuple(sigmas.shape)}")
    if mode not in SAMPLER_MODES:
        raise ValueError(f"sampler mode must be one of {list(SAMPLER_MODES)}, got {mode!r}")
    _check_generators(generators, noise.shape[0])
    x, x0 = noise, noise
    values = sigmas.tolist()
    for i, (sigma, sigma_next) in enumerate(zip(values[:-1], values[1:])):
        x0 = x0_fn(x, torch.full((x.shape[0],), sigma, device=x.device))
        if i == len(values) - 2 or sigma_next <= 0:
            break
        eps = draw_noise(x0, generators) if mode == "renoise" else None
        x = next_sample(x, x0, sigma, sigma_next, mode, eps)
    return x0


def check_sampler(sampler: str | None) -> None:
    """Refuse a sampler name other than ``"pipeline"``, ``"euler"`` or None (the module's default)."""
    if sampler is not None and sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {list(SAMPLERS)} or None, got {sampler!r}")


def dynamic_shift_mu(config: Any, num_tokens: int) -> float:
    """``mu`` of a resolution-dependent (``use_dynamic_shifting``) scheduler for ``num_tokens`` latent tokens: linear
    from ``base_shift`` at ``base_image_seq_len`` to ``max_shift`` at ``max_image_seq_len``, as the LTX-Video and Flux
    pipelines compute it."""
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    slope = (max_shift - base_shift) / (max_len - base_len)
    return num_tokens * slope + base_shift - slope * base_len


def scheduler_sample(
    scheduler: Any,
    velocity_fn: Callable[[Tensor, Tensor], Tensor],
    noise: Tensor,
    num_inference_steps: int,
    generators: Generators = None,
    **set_timesteps_kwargs: Any,
) -> Tensor:
    """Sample with a diffusers scheduler, as a diffusers pipeline's denoising loop does.

    ``scheduler.set_timesteps(num_inference_steps)``, then for each timestep ``t``: the model's output at ``(x, t)``,
    and ``x = scheduler.step(output, t, x)``. A flow pipeline's transformer output is the velocity ``noise - x0`` at
    ``timestep = sigma * num_train_timesteps``, so ``velocity_fn`` gets ``sigma = t / num_train_timesteps`` (for UniPC,
    whose timesteps are integers, that is the rounded-down sigma the model sees, not the scheduler's own sigma).

    The scheduler is deep-copied per call (its step counter and multistep history live in it), so the caller's is
    never changed and concurrent or nested samples do not interfere.

    Args:
        scheduler: a diffusers scheduler (``SchedulerMixin``) of a flow model, e.g. ``UniPCMultistepScheduler`` with
            ``use_flow_sigmas`` or ``FlowMatchEulerDiscreteScheduler``.
        velocity_fn: ``(x, sigma Tensor[B]) -> velocity``; classifier-free guidance, if any, lives inside it.
        noise: ``(b, c, t, h, w)`` starting latents, as passed to a pipeline's ``latents=``.
        num_inference_steps: the pipeline's ``num_inference_steps`` (a second-order scheduler calls the model about
            twice per step).
        generators: the draws of a stochastic scheduler (its ``step`` takes ``generator``): one per sample, one for
            the batch, or None for the global RNG. Deterministic schedulers draw nothing.
        **set_timesteps_kwargs: passed to ``set_timesteps`` (e.g. ``mu`` of a dynamic-shifting scheduler).

    Returns:
        The final latents, shaped like ``noise``.
    """
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be at least 1, got {num_inference_steps}")
    _check_generators(generators, noise.shape[0])
    scheduler = copy.deepcopy(scheduler)
    scheduler.set_timesteps(num_inference_steps, device=noise.device, **set_timesteps_kwargs)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(0)
    step_kwargs: dict[str, Any] = {}
    if generators is not None and "generator" in inspect.signature(scheduler.step).parameters:
        step_kwargs["generator"] = generators if isinstance(generators, torch.Generator) else list(generators)
    num_train = scheduler.config.num_train_timesteps
    x = noise
    for t in scheduler.timesteps:
        sigma = (t.to(torch.float32) / num_train).to(x.device).expand(x.shape[0])  # (b,)
        x = scheduler.step(velocity_fn(x, sigma), t, x, return_dict=False, **step_kwargs)[0]
    return x
