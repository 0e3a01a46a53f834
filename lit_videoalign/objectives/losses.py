"""What more than one objective (and the inference-time methods above them) share, so no objective imports another:

- DMD's distribution-matching loss (DMD, Yin et al., arXiv 2311.18828; DMD2, arXiv 2405.14867), which ``DMD`` trains
  its student with and rCM's score regulariser (arXiv 2510.08431) adds to consistency distillation: tensors in, a
  scalar out;
- the checks a reward passes before a method uses it: :func:`check_reward` (a ``reward_zoo`` reward that scores
  text-to-video samples) and :func:`require_differentiable` (a gradient that reaches the videos and is of use);
- :func:`guidance_conditionings` and :func:`negative_conditioning`: prompts, their conditioning images
  (image-to-video) and the unconditional branch of a teacher's or student's guidance, which keeps the image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lit_videoalign.backbones.base import Conditioning
from reward_zoo.base import RewardModel
from reward_zoo.composite import CompositeReward


def dmd_generator_loss(x0_student: Tensor, x0_real: Tensor, x0_fake: Tensor, eps: float = 1e-8) -> Tensor:
    """DMD's distribution-matching loss for the student (scalar).

    ``grad = (x0_fake - x0_real) / mean|x0_student - x0_real|`` (the mean per sample, over non-batch dims, floored at
    ``eps``); ``loss = 0.5 * mse(x0_student, stopgrad(x0_student - grad))``, so the gradient with respect to
    ``x0_student`` is ``grad / numel``: a descent step moves the student towards the teacher's prediction and away
    from the critic's.

    Args:
        x0_student: ``[B, ...]`` the student's samples (with gradients).
        x0_real: ``[B, ...]`` the teacher's x0 prediction at the noised samples (no gradients needed).
        x0_fake: ``[B, ...]`` the critic's x0 prediction at the same points.
        eps: floor of the per-sample normaliser.
    """
    if not (x0_student.shape == x0_real.shape == x0_fake.shape):
        raise ValueError(f"x0_student, x0_real and x0_fake must share a shape, got {tuple(x0_student.shape)}, "
                         f"{tuple(x0_real.shape)}, {tuple(x0_fake.shape)}")
    x = x0_student.float()
    real, fake = x0_real.detach().float(), x0_fake.detach().float()
    norm = (x.detach() - real).abs().flatten(1).mean(1).clamp_min(eps)  # (b,)
    grad = (fake - real) / norm.view(-1, *([1] * (x.ndim - 1)))
    grad = torch.nan_to_num(grad)
    return 0.5 * F.mse_loss(x, (x - grad).detach())


def negative_conditioning(backbone, negative_prompt: str, cond: Conditioning) -> Conditioning:
    """The negative prompt's conditioning for each sample of ``cond``, with ``cond``'s conditioning images and their
    encodings when it has them: the unconditional branch of guidance keeps the image (image-to-video), as the I2V
    pipelines do, so teacher, student and critic see the same image on both branches."""
    uncond = backbone.encode_prompts([negative_prompt] * len(cond))
    return uncond.with_images_from(cond) if cond.images is not None else uncond


def guidance_conditionings(module, prompts: list[str], images: Tensor | None = None, guided: bool = False,
                           num_frames: int | None = None) -> tuple[Conditioning, Conditioning | None]:
    """``(cond, uncond)`` of ``prompts`` for ``module`` (an ``AlignmentModule``): ``cond`` conditioned also on
    ``images`` (one per prompt, image-to-video, encoded for videos of ``num_frames``, the module's by default; None for
    text-to-video), and ``uncond`` the negative prompt with the same images when ``guided``, else None."""
    cond = module.with_images(module.backbone.encode_prompts(prompts), images, num_frames=num_frames)
    return cond, negative_conditioning(module.backbone, module.hparams.negative_prompt, cond) if guided else None


def check_reward(reward: RewardModel, who: str, has_images: bool = False) -> None:
    """Refuse anything but a ``reward_zoo`` reward, and a reward that needs reference images when ``who`` samples
    text-to-video without them (``has_images``: conditioning images are given, and are the references)."""
    if not isinstance(reward, RewardModel):
        raise TypeError(f"{who} needs a reward_zoo RewardModel (or CompositeReward), got {type(reward).__name__}")
    if reward.requires_references and not has_images:
        raise ValueError(f"{who} scores text-to-video samples and has no reference images, but reward "
                         f"{type(reward).__name__} requires references; give conditioning images (image-to-video)")


def require_differentiable(reward: RewardModel, who: str, has_images: bool = False) -> None:
    """Refuse a reward whose gradient with respect to the videos is missing or useless, naming it and why.

    A reward with ``differentiable=False`` has no gradient; a ``CompositeReward`` normalised within the batch
    (``"zscore"``, ``"rank"``) has scores that sum to a constant over the batch, so the gradient of the batch's
    total reward is zero (or absent) and a gradient method would learn nothing. ``has_images``: as for
    :func:`check_reward`.
    """
    check_reward(reward, who, has_images)
    name = type(reward).__name__
    if isinstance(reward, CompositeReward):
        if reward.normalize != "none":
            raise ValueError(f"{who} needs a differentiable reward; CompositeReward with normalize="
                             f"{reward.normalize!r} normalises scores within the batch, so their sum has no useful "
                             f"gradient; use normalize='none' and set the weights to balance the scales")
        for sub_name, sub in reward.rewards.items():
            require_differentiable(sub, f"{who} (sub-reward {sub_name!r})", has_images)
    if not reward.differentiable:
        raise ValueError(f"{who} needs a differentiable reward, but {name} has differentiable=False (no gradient "
                         f"reaches the videos); use a gradient-free method such as best-of-N or noise search")
