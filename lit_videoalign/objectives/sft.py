"""Supervised fine-tuning by flow matching (Lipman et al., arXiv 2210.02747; rectified flow, arXiv 2209.03003).

The model regresses the constant velocity ``noise - x0`` of the straight path between a clean video and Gaussian
noise at a random ``sigma``. Full fine-tuning or LoRA; uniform, logit-normal and shifted sigma sampling; prompt
dropout so the model also learns the unconditional velocity that classifier-free guidance needs.
"""

from __future__ import annotations

import torch
from torch import Tensor
from typing_extensions import override

from lit_videoalign.objectives.base import AlignmentModule
from lit_videoalign.schedules.flow import SIGMA_MODES, add_noise, sample_training_sigmas, velocity_target


def flow_matching_loss(pred: Tensor, target: Tensor, weights: Tensor | None = None) -> Tensor:
    """Mean squared error between predicted and target velocity.

    Args:
        pred: ``[B, ...]`` predicted velocity.
        target: ``[B, ...]`` target velocity ``noise - x0``.
        weights: optional ``Tensor[B]`` per-sample weights; the loss is then ``sum(w * mse_b) / sum(w)``.

    Returns:
        Scalar loss.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same shape, got {tuple(pred.shape)} and {tuple(target.shape)}")
    per_sample = (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)  # (b,)
    if weights is None:
        return per_sample.mean()
    if weights.shape != per_sample.shape:
        raise ValueError(f"weights must have shape {tuple(per_sample.shape)}, got {tuple(weights.shape)}")
    return (weights * per_sample).sum() / weights.sum()


class SFT(AlignmentModule):
    """Flow-matching fine-tuning on ``(video, prompt)`` batches.

    Batches are dicts with ``"prompt"`` (list of strings) and either ``"video"`` (``[B, T, C, H, W]`` in ``[0, 1]``)
    or precomputed ``"latents"`` (``[B, C, T', H', W']``), and then possibly the prompts' precomputed ``"cond"``
    (``VideoFolderDataModule(precomputed=...)``, see ``videoalign precompute``).

    Args:
        sigma_sampling: ``"uniform"`` or ``"logit_normal"``.
        sigma_shift: shift applied to training sigmas (``> 1`` favours noisy steps, as for high resolutions); None
            takes the backbone's (its scheduler config's), so training and sampling agree.
        logit_mean: mean of the logit-normal.
        logit_std: standard deviation of the logit-normal.
        prompt_dropout: probability of replacing a prompt by the negative prompt (classifier-free guidance).
        **kwargs: :class:`AlignmentModule` arguments (backbone, optimizer, LoRA, sampling).
    """

    def __init__(
        self,
        *args,
        sigma_sampling: str = "logit_normal",
        sigma_shift: float | None = None,
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        prompt_dropout: float = 0.1,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        if sigma_sampling not in SIGMA_MODES:
            raise ValueError(f"sigma_sampling must be one of {list(SIGMA_MODES)}, got {sigma_sampling!r}")
        if not 0.0 <= prompt_dropout < 1.0:
            raise ValueError(f"prompt_dropout must be in [0, 1), got {prompt_dropout}")
        if sigma_shift is not None and sigma_shift <= 0:
            raise ValueError(f"sigma_shift must be positive, got {sigma_shift}")
        self.save_hyperparameters(ignore=["backbone", "optimizer", "lr_scheduler"])

    def batch_latents(self, batch: dict) -> Tensor:
        if "latents" in batch:
            return batch["latents"]
        if "video" not in batch:
            raise KeyError(f"batch must contain 'video' or 'latents', got keys {sorted(batch)}")
        return self.backbone.encode_videos(batch["video"])

    def loss(self, batch: dict, generator: torch.Generator | None = None, dropout: float | None = None) -> Tensor:
        """Flow-matching loss of one batch; a ``generator`` makes the noise and sigmas reproducible (validation)."""
        hp = self.hparams
        x0 = self.batch_latents(batch)  # (b, c, t, h, w)
        prompts = batch["prompt"]
        if len(prompts) != x0.shape[0]:
            raise ValueError(f"batch has {len(prompts)} prompts for {x0.shape[0]} videos")
        cond = self.batch_conditioning(batch, dropout=hp.prompt_dropout if dropout is None else dropout)
        shift = self.backbone.default_sampling_shift if hp.sigma_shift is None else hp.sigma_shift
        sigma = sample_training_sigmas(x0.shape[0], mode=hp.sigma_sampling, shift=shift,
                                       generator=generator, logit_mean=hp.logit_mean, logit_std=hp.logit_std,
                                       sigma_range=self.backbone.training_sigma_range)
        noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0)
        sigma = sigma.to(x0.device)
        x_t = add_noise(x0, noise, sigma)
        pred = self.backbone.predict_velocity(x_t, sigma, cond)
        return flow_matching_loss(pred, velocity_target(x0, noise))

    @override
    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        loss = self.loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["prompt"]))
        return loss

    @override
    def validation_step(self, batch: dict, batch_idx: int) -> Tensor:
        # Fixed noise and sigmas per batch index and no prompt dropout, so validation losses are comparable.
        generator = torch.Generator().manual_seed(batch_idx)
        loss = self.loss(batch, generator=generator, dropout=0.0)
        self.log("val/loss", loss, prog_bar=True, batch_size=len(batch["prompt"]))
        return loss
