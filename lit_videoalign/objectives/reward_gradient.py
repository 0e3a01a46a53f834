"""Reward-gradient fine-tuning through the last sampling steps: DRaFT-K (Clark et al., arXiv 2309.17400) and VADER
(Prabhudesai et al., arXiv 2407.08737).

A video is sampled with the model's Euler ODE sampler; the first ``S - K`` steps run without gradients, the last
``K`` with them, the result is decoded (optionally only a window of frames, as VADER does to save memory) and scored
by a differentiable reward, and the negative reward is backpropagated through the decoder and the last ``K``
denoiser calls into the trainable weights (LoRA by default). Truncating to ``K`` steps keeps memory bounded and, as
DRaFT-K shows, loses little: the gradient through many steps is dominated by the last ones and explodes otherwise.
Each step's denoiser call is recomputed in the backward pass (``torch.utils.checkpoint``), so memory grows with
``K`` only by the latents. A regulariser keeps the policy near the base: the velocity MSE to the reference policy
at the visited latents (the KL between Gaussian steps of equal variance, up to a per-step constant), or the squared
L2 distance of the weights to the base (for LoRA, of the adapter's weight delta ``scaling * B @ A``).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint
from typing_extensions import override

from lit_videoalign.backbones.base import Conditioning
from lit_videoalign.objectives.base import AlignmentModule
from lit_videoalign.objectives.losses import guidance_conditionings, require_differentiable
from lit_videoalign.schedules.flow import euler_step, sampling_sigmas
from lit_videoalign.schedules.samplers import cfg_velocity
from reward_zoo.base import RewardModel

REGULARIZERS = ("velocity_kl", "l2")


# -- pure losses -----------------------------------------------------------------------------------------------------
def reward_loss(rewards: Tensor, scale: float = 1.0) -> Tensor:
    """``-scale * mean(rewards)``: minimising it ascends the reward."""
    if rewards.ndim != 1:
        raise ValueError(f"rewards must be Tensor[B], got shape {tuple(rewards.shape)}")
    return -scale * rewards.float().mean()


def velocity_kl(velocity: Tensor, ref_velocity: Tensor) -> Tensor:
    """Per-sample mean squared difference of two velocities, ``Tensor[B]``.

    For two Gaussian steps ``x + dt * v`` of equal variance the KL is ``dt^2 ||v - v_ref||^2 / (2 std^2)``; this is
    that KL without the per-step constant (the flow-matching distance of the two policies at these latents).
    """
    if velocity.shape != ref_velocity.shape:
        raise ValueError(f"velocity and ref_velocity must share a shape, got {tuple(velocity.shape)} and "
                         f"{tuple(ref_velocity.shape)}")
    return (velocity.float() - ref_velocity.float()).pow(2).flatten(1).mean(1)


def weight_delta_l2(deltas: Iterable[Tensor]) -> Tensor:
    """Sum of the squared Frobenius norms of weight differences to the base."""
    total = None
    for d in deltas:
        term = d.float().pow(2).sum()
        total = term if total is None else total + term
    if total is None:
        raise ValueError("weight_delta_l2 got no weight deltas; is anything trainable?")
    return total


# -- the module ------------------------------------------------------------------------------------------------------
class RewardGradient(AlignmentModule):
    """DRaFT-K / VADER: maximise a differentiable reward by backpropagating through the last ``K`` sampling steps.

    Each training batch is ``{"prompt": list[str]}`` (e.g. ``ToyWorldDataModule(prompts_only=True)``); each prompt
    gets one sample from fresh noise per step. With an ``"image"`` ``(B, 3, H, W)`` in ``[0, 1]`` (image-to-video) the
    samples, both branches of the guidance and the reference policy of the regulariser are conditioned on it.

    Args:
        reward: a differentiable ``reward_zoo`` reward; ``reward_key`` of its output is maximised. Refused at
            construction if it has no useful gradient (``differentiable=False``, or a composite normalised within the
            batch).
        num_sampling_steps: Euler steps of a training sample.
        truncation_steps: ``K``, the last steps the gradient flows through (DRaFT-1 is ``K = 1``).
        rollout_guidance_scale: classifier-free guidance while sampling; None uses ``guidance_scale``.
        decode_frames: decode and score only a random window of this many latent frames (VADER's frame subsampling;
            for a causal video VAE the window's first frame decodes as an image frame); None decodes all.
        regularizer: ``"velocity_kl"`` (velocity MSE to the reference policy on the ``K`` steps) or ``"l2"``
            (squared weight distance to the base).
        kl_beta: weight of the regulariser; 0 skips it and the reference forward.
        reward_scale: the loss is ``-reward_scale * mean(reward) + kl_beta * regulariser``.
        checkpoint_steps: recompute each step's denoiser call in the backward pass instead of storing activations.
        reward_key: which reward score to maximise.
        **kwargs: :class:`AlignmentModule` arguments (backbone, optimizer, LoRA, sampling).
    """

    def __init__(
        self,
        *args,
        reward: RewardModel,
        num_sampling_steps: int = 10,
        truncation_steps: int = 1,
        rollout_guidance_scale: float | None = None,
        decode_frames: int | None = None,
        regularizer: str = "velocity_kl",
        kl_beta: float = 0.0,
        reward_scale: float = 1.0,
        checkpoint_steps: bool = True,
        reward_key: str = "overall",
        **kwargs,
    ) -> None:
        require_differentiable(reward, "RewardGradient")  # before building anything heavy
        if regularizer not in REGULARIZERS:
            raise ValueError(f"regularizer must be one of {REGULARIZERS}, got {regularizer!r}")
        if kl_beta < 0:
            raise ValueError(f"kl_beta must be non-negative, got {kl_beta}")
        self.requires_reference = kl_beta > 0  # a frozen copy only when a full fine-tune needs one
        super().__init__(*args, **kwargs)
        if num_sampling_steps < 1:
            raise ValueError(f"num_sampling_steps must be at least 1, got {num_sampling_steps}")
        if not 1 <= truncation_steps <= num_sampling_steps:
            raise ValueError(f"truncation_steps must be in [1, num_sampling_steps={num_sampling_steps}], "
                             f"got {truncation_steps}")
        latent_frames = self.backbone.latent_shape(self.hparams.num_frames, self.hparams.height, self.hparams.width)[1]
        if decode_frames is not None and not 1 <= decode_frames <= latent_frames:
            raise ValueError(f"decode_frames must be in [1, {latent_frames}] (latent frames of a "
                             f"{self.hparams.num_frames}-frame video), got {decode_frames}")
        if decode_frames is not None and self.backbone.pixel_space and \
                decode_frames < reward.min_frames:
            raise ValueError(f"decode_frames={decode_frames} is fewer than the {reward.min_frames} frames "
                             f"{type(reward).__name__} needs")
        self.save_hyperparameters(ignore=["backbone", "optimizer", "lr_scheduler", "reward"])
        self.hold_reward(reward)

    @property
    def rollout_guidance(self) -> float:
        g = self.hparams.rollout_guidance_scale
        return self.hparams.guidance_scale if g is None else g

    # -- pieces ---------------------------------------------------------------------------------------------------
    def reference_guided_velocity(self, x: Tensor, s: Tensor, cond: Conditioning,
                                  uncond: Conditioning | None) -> Tensor:
        """The reference policy's (guided) velocity at ``x``, without gradients."""
        v = self.reference_velocity(x, s, cond)
        if uncond is not None:
            v = cfg_velocity(v, self.reference_velocity(x, s, uncond), self.rollout_guidance)
        return v

    def weight_deltas(self) -> list[Tensor]:
        """The trainable weights' differences to the base: LoRA deltas ``scaling * B @ A``, or ``p - p_ref``."""
        if self.backbone.has_lora:
            from peft.tuners.lora import LoraLayer

            deltas = []
            for module in self.backbone.denoiser.modules():
                if isinstance(module, LoraLayer):
                    deltas += [module.get_delta_weight(name) for name in module.active_adapters
                               if name in module.lora_A]
            return deltas
        ref = dict(self._reference_denoiser.named_parameters())
        return [p - ref[n] for n, p in self.backbone.denoiser.named_parameters() if p.requires_grad]

    def sample_with_grad(self, prompts: list[str], noise: Tensor | None = None,
                         images: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Sample latents, conditioned also on ``images`` (one per prompt, image-to-video) when given; gradients flow
        through the last ``K`` steps only.

        Returns:
            ``(latents, regulariser)``: final latents ``[B, C, T', H', W']`` and the mean velocity KL over the ``K``
            steps (``Tensor[B]``; zeros when the velocity regulariser is off).
        """
        hp = self.hparams
        cond, uncond = guidance_conditionings(self, prompts, images, self.rollout_guidance != 1.0)
        velocity = self.guided_velocity_fn(cond, self.rollout_guidance, uncond)
        shape = self.backbone.latent_shape(hp.num_frames, hp.height, hp.width)
        if noise is None:
            noise = torch.randn((len(prompts), *shape))
        x = noise.to(self.device)
        sigmas = sampling_sigmas(hp.num_sampling_steps, shift=self.sampling_shift).tolist()
        first_grad = hp.num_sampling_steps - hp.truncation_steps
        with torch.no_grad():
            for i in range(first_grad):
                s = torch.full((len(x),), sigmas[i], device=x.device)
                x = euler_step(x, velocity(x, s), sigmas[i], sigmas[i + 1])
        kl = torch.zeros(len(x), device=x.device)
        use_kl = hp.kl_beta > 0 and hp.regularizer == "velocity_kl"
        for i in range(first_grad, hp.num_sampling_steps):
            s = torch.full((len(x),), sigmas[i], device=x.device)
            v = checkpoint(velocity, x, s, use_reentrant=False) if hp.checkpoint_steps else velocity(x, s)
            if use_kl:
                kl = kl + velocity_kl(v, self.reference_guided_velocity(x.detach(), s, cond, uncond))
            x = euler_step(x, v, sigmas[i], sigmas[i + 1])
        return x, kl / hp.truncation_steps

    def decode_for_reward(self, latents: Tensor) -> Tensor:
        """Decode all latent frames, or a random window of ``decode_frames`` of them."""
        f = self.hparams.decode_frames
        if f is not None and f < latents.shape[2]:
            start = int(torch.randint(latents.shape[2] - f + 1, ()))
            latents = latents[:, :, start:start + f]
        return self.backbone.decode_latents(latents)

    def loss(self, prompts: list[str], images: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """The DRaFT-K loss of one batch of prompts (and their conditioning ``images``, image-to-video) and what to
        log."""
        hp = self.hparams
        latents, kl = self.sample_with_grad(prompts, images=images)
        videos = self.decode_for_reward(latents)
        try:
            scores = self.reward(videos, prompts, references=images, fps=self.backbone.fps)
        except FloatingPointError:  # NaN or infinite scores: the non-finite guard skips this step
            self.report_nonfinite("reward")
            scores = self.reward.forward(videos, prompts)
        loss = reward_loss(scores[hp.reward_key], hp.reward_scale)
        logs = {f"train/reward/{k}": v.detach().float().mean() for k, v in scores.items()}
        if hp.kl_beta > 0:
            reg = kl.mean() if hp.regularizer == "velocity_kl" else weight_delta_l2(self.weight_deltas())
            loss = loss + hp.kl_beta * reg
            logs[f"train/{hp.regularizer}"] = reg.detach()
        return loss, logs

    # -- Lightning hooks ------------------------------------------------------------------------------------------
    @override
    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        prompts = list(batch["prompt"])
        loss, logs = self.loss(prompts, batch.get("image"))
        n = len(prompts)
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        self.log_dict(logs, batch_size=n)
        self.log("train/reward", logs[f"train/reward/{self.hparams.reward_key}"], prog_bar=True, batch_size=n)
        return loss

    @override
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Deterministic ODE samples of held-out prompts, scored by the training reward."""
        self.validate_with_reward(batch, batch_idx)
