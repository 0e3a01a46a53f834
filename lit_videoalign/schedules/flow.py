"""Flow-matching maths (rectified flow, arXiv 2209.03003; SD3 timestep sampling, arXiv 2403.03206; Flow-GRPO SDE,
arXiv 2505.05470): pure functions on tensors, no models and no Lightning.

Conventions: ``sigma`` in ``[0, 1]`` with ``sigma = 1`` pure noise; ``x_sigma = (1 - sigma) * x0 + sigma * noise``;
the model predicts the velocity ``v = noise - x0``; an Euler step is ``x_next = x + (sigma_next - sigma) * v``.
``sigma`` arguments are Python floats or ``Tensor[B]`` and broadcast over every non-batch dimension.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

SIGMA_MODES = ("uniform", "logit_normal")


def _broadcast(sigma: float | Tensor, like: Tensor) -> float | Tensor:
    """Reshape a ``Tensor[B]`` sigma to ``[B, 1, 1, ...]`` so it broadcasts against ``like``."""
    if not isinstance(sigma, Tensor) or sigma.ndim == 0:
        return sigma
    if sigma.ndim != 1 or sigma.shape[0] != like.shape[0]:
        raise ValueError(f"sigma must be a float or Tensor[B] with B={like.shape[0]}, got shape {tuple(sigma.shape)}")
    return sigma.to(like.device).view(-1, *([1] * (like.ndim - 1)))


def add_noise(x0: Tensor, noise: Tensor, sigma: float | Tensor) -> Tensor:
    """Interpolate data and noise: ``(1 - sigma) * x0 + sigma * noise``."""
    if x0.shape != noise.shape:
        raise ValueError(f"x0 and noise must have the same shape, got {tuple(x0.shape)} and {tuple(noise.shape)}")
    s = _broadcast(sigma, x0)
    return (1 - s) * x0 + s * noise


def velocity_target(x0: Tensor, noise: Tensor) -> Tensor:
    """The flow-matching regression target ``noise - x0`` (constant along the straight path)."""
    if x0.shape != noise.shape:
        raise ValueError(f"x0 and noise must have the same shape, got {tuple(x0.shape)} and {tuple(noise.shape)}")
    return noise - x0


def shift_sigmas(sigma: Tensor, shift: float) -> Tensor:
    """Resolution shift of SD3/Wan: ``shift * s / (1 + (shift - 1) * s)``; ``shift > 1`` spends more time near noise."""
    if shift <= 0:
        raise ValueError(f"shift must be positive, got {shift}")
    return shift * sigma / (1 + (shift - 1) * sigma)


def sample_training_sigmas(
    batch_size: int,
    *,
    mode: str = "logit_normal",
    shift: float = 1.0,
    generator: torch.Generator | None = None,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    sigma_range: tuple[float, float] = (0.0, 1.0),
) -> Tensor:
    """Draw one training sigma per sample.

    Args:
        batch_size: number of sigmas.
        mode: ``"uniform"`` on ``[0, 1]`` or ``"logit_normal"`` (``sigmoid(N(logit_mean, logit_std))``, SD3's default).
        shift: resolution shift applied after drawing (1.0 leaves them unchanged).
        generator: random generator for reproducible draws.
        logit_mean: mean of the normal before the sigmoid (``logit_normal`` only).
        logit_std: standard deviation of the normal before the sigmoid (``logit_normal`` only).
        sigma_range: ``(low, high)``: the distribution above truncated to this range (one expert of Wan 2.2 A14B),
            drawn exactly by its inverse CDF; the full range draws as without it.

    Returns:
        ``Tensor[batch_size]`` in ``(0, 1)``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    low, high = sigma_range
    if not 0 <= low < high <= 1:
        raise ValueError(f"sigma_range must be (low, high) with 0 <= low < high <= 1, got {sigma_range}")
    if (low, high) != (0.0, 1.0):
        return _truncated_sigmas(batch_size, mode, shift, generator, logit_mean, logit_std, low, high)
    if mode == "uniform":
        sigma = torch.rand(batch_size, generator=generator)
    elif mode == "logit_normal":
        sigma = torch.sigmoid(logit_mean + logit_std * torch.randn(batch_size, generator=generator))
    else:
        raise ValueError(f"unknown sigma sampling mode {mode!r}; expected one of {list(SIGMA_MODES)}")
    return shift_sigmas(sigma, shift)


def _truncated_sigmas(n: int, mode: str, shift: float, generator: torch.Generator | None, mean: float, std: float,
                      low: float, high: float) -> Tensor:
    """:func:`sample_training_sigmas` conditioned on ``low <= sigma <= high``: the shift and the sigmoid are
    increasing, so the bounds map back to bounds on the uniform (or standard normal) draw, which is drawn between
    them by its inverse CDF."""
    if shift <= 0:
        raise ValueError(f"shift must be positive, got {shift}")
    bounds = torch.tensor([low, high], dtype=torch.float64)
    bounds = bounds / (shift - (shift - 1) * bounds)  # unshifted: the inverse of shift_sigmas
    if mode == "logit_normal":
        bounds = torch.special.ndtr((torch.logit(bounds) - mean) / std)  # the standard normal's CDF at the bounds
    elif mode != "uniform":
        raise ValueError(f"unknown sigma sampling mode {mode!r}; expected one of {list(SIGMA_MODES)}")
    u = bounds[0] + (bounds[1] - bounds[0]) * torch.rand(n, generator=generator, dtype=torch.float64)
    sigma = torch.sigmoid(mean + std * torch.special.ndtri(u)) if mode == "logit_normal" else u
    return shift_sigmas(sigma, shift).clamp(low, high).float()


def sampling_sigmas(num_steps: int, *, shift: float = 1.0) -> Tensor:
    """The decreasing sigma grid ``1.0 ... 0.0`` for an ``num_steps``-step sampler, ``Tensor[num_steps + 1]``."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}")
    return shift_sigmas(torch.linspace(1.0, 0.0, num_steps + 1), shift)


def euler_step(x: Tensor, velocity: Tensor, sigma: float | Tensor, sigma_next: float | Tensor) -> Tensor:
    """One deterministic ODE step: ``x + (sigma_next - sigma) * velocity``."""
    return x + (_broadcast(sigma_next, x) - _broadcast(sigma, x)) * velocity


def sde_step_with_logprob(
    x: Tensor,
    velocity: Tensor,
    sigma: float | Tensor,
    sigma_next: float | Tensor,
    *,
    noise_level: float = 0.7,
    prev_sample: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One step of the Flow-GRPO reverse SDE, which has the same marginals as the flow ODE, with its log-density.

    Args:
        x: current sample ``x_sigma``.
        velocity: the model's velocity prediction at ``(x, sigma)``.
        sigma: current sigma (float or ``Tensor[B]``).
        sigma_next: next, smaller sigma.
        noise_level: the SDE's ``a`` in ``std_t = a * sqrt(sigma / (1 - sigma))``.
        prev_sample: if given, score this sample instead of drawing one (to recompute log-probs of a rollout).
        generator: random generator for the step noise.

    Returns:
        ``(prev_sample, log_prob, mean, std)``: the next sample, the Gaussian log-density of it averaged over all
        non-batch elements (``Tensor[B]``, float32), the step's mean, and its standard deviation
        ``std_t * sqrt(-dt)`` (broadcastable to ``x``).
    """
    if x.shape != velocity.shape:
        raise ValueError(f"x and velocity must have the same shape, got {tuple(x.shape)} and {tuple(velocity.shape)}")
    xf, vf = x.float(), velocity.float()
    s = _broadcast(torch.as_tensor(sigma, dtype=torch.float32), xf)
    s_next = _broadcast(torch.as_tensor(sigma_next, dtype=torch.float32), xf)
    s, s_next = torch.as_tensor(s, device=xf.device), torch.as_tensor(s_next, device=xf.device)
    if bool((s_next >= s).any()) or bool((s <= 0).any()):
        raise ValueError(f"sde step needs 0 <= sigma_next < sigma <= 1, got sigma={sigma}, sigma_next={sigma_next}")
    dt = s_next - s  # negative
    s_for_std = torch.where(s >= 1.0, s_next, s)  # keeps the first step from pure noise finite
    std_t = noise_level * torch.sqrt(s / (1 - s_for_std))
    mean = xf * (1 + std_t**2 / (2 * s) * dt) + vf * (1 + std_t**2 * (1 - s) / (2 * s)) * dt
    std = std_t * torch.sqrt(-dt)
    if prev_sample is None:
        eps = torch.randn(xf.shape, generator=generator, device=xf.device if generator is None else generator.device)
        prev_sample = mean + std * eps.to(xf.device)
    elif prev_sample.shape != x.shape:
        raise ValueError(f"prev_sample must have shape {tuple(x.shape)}, got {tuple(prev_sample.shape)}")
    prev = prev_sample.float()
    log_prob = -((prev.detach() - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    log_prob = log_prob.mean(dim=tuple(range(1, log_prob.ndim)))
    return prev_sample.to(x.dtype), log_prob, mean, std


def euler_sample(
    velocity_fn: Callable[[Tensor, Tensor], Tensor],
    noise: Tensor,
    sigmas: Tensor,
) -> Tensor:
    """Integrate the flow ODE from ``noise`` at ``sigmas[0]`` down to ``sigmas[-1]`` with Euler steps.

    Args:
        velocity_fn: ``(x, sigma Tensor[B]) -> velocity``; classifier-free guidance, if any, lives inside it.
        noise: the starting sample.
        sigmas: decreasing grid, e.g. from :func:`sampling_sigmas`.
    """
    if sigmas.ndim != 1 or len(sigmas) < 2:
        raise ValueError(f"sigmas must be a 1-D grid of at least 2 values, got shape {tuple(sigmas.shape)}")
    x = noise
    for sigma, sigma_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        s = torch.full((x.shape[0],), sigma, device=x.device)
        x = euler_step(x, velocity_fn(x, s), sigma, sigma_next)
    return x
