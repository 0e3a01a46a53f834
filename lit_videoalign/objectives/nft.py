"""DiffusionNFT (Zheng et al., arXiv 2509.16117) and advantage-weighted matching (AWM, Xue et al., arXiv 2509.25050):
online RL on the forward (noising) process.

Each prompt gets ``group_size`` clean samples from the sampling policy, with any sampler (the model's own ODE by
default, no likelihoods). Their rewards become group-relative advantages ``A`` and an optimality probability
``r = 0.5 + clip(A, -A_max, A_max) / (2 A_max)`` in ``[0, 1]``. The update is flow matching on those clean samples,
noised afresh at new sigmas, so it needs neither the sampling trajectory nor an SDE:

- ``nft``: the trained velocity ``v_theta`` and the frozen sampling policy's ``v_old`` define an implicit positive
  policy ``v+ = (1 - beta) v_old + beta v_theta`` and a negative one ``v- = (1 + beta) v_old - beta v_theta``; the
  loss ``r ||v+ - target||^2 + (1 - r) ||v- - target||^2`` pulls ``v+`` towards good samples and ``v-`` towards bad
  ones, so ``v_theta`` moves towards the good and away from the bad, in a trust region of size ``1 / beta`` around
  ``v_old``. With the paper's adaptive weighting each branch's squared x0 error is divided by its own (detached) mean
  absolute x0 error.
- ``awm``: the flow-matching loss weighted by the advantage, ``mean(A ||v_theta - target||^2)`` (AWM's on-policy
  gradient), with a pull ``||v_theta - v_old||^2`` towards the sampling policy that keeps pushing away from bad
  samples bounded.

The sampling policy (``v_old``) is the paper's lagging EMA of the trained weights (a second LoRA adapter ``"old"``
under LoRA, a frozen copy otherwise), or the frozen base. Sampling is CFG-free by default, so the model learns to need
no guidance. Pref-GRPO's win rates can replace the rewards, and rollouts can be scored in the background while the next
chunk is generated (``rollout_scoring``).
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from typing_extensions import override

from lit_videoalign.backbones.adapters import AdapterRoles, add_named_adapter, ema_update
from lit_videoalign.backbones.base import Conditioning
from lit_videoalign.objectives import rollout_scoring as scoring
from lit_videoalign.objectives.base import AlignmentModule
from lit_videoalign.schedules.flow import (
    SIGMA_MODES,
    add_noise,
    sample_training_sigmas,
    sampling_sigmas,
    sde_step_with_logprob,
    velocity_target,
)
from reward_zoo.base import RewardModel

LOSS_TYPES = ("nft", "awm")
OLD_POLICIES = ("ema", "base")
SAMPLERS = ("model", "sde")
SIGMA_SAMPLINGS = ("grid", *SIGMA_MODES)


# -- pure losses -----------------------------------------------------------------------------------------------------
def _per_sample_mse(pred: Tensor, target: Tensor) -> Tensor:
    if pred.shape != target.shape:
        raise ValueError(f"prediction and target must share a shape, got {tuple(pred.shape)} and {tuple(target.shape)}")
    return (pred.float() - target.float()).pow(2).flatten(1).mean(1)  # (b,)


def implicit_policies(v_theta: Tensor, v_old: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """``(v+, v-)``: ``v+ = (1 - beta) v_old + beta v_theta`` and ``v- = (1 + beta) v_old - beta v_theta``."""
    if v_theta.shape != v_old.shape:
        raise ValueError(f"v_theta and v_old must share a shape, got {tuple(v_theta.shape)} and {tuple(v_old.shape)}")
    v_old = v_old.detach()
    return (1 - beta) * v_old + beta * v_theta, (1 + beta) * v_old - beta * v_theta


def nft_loss(v_theta: Tensor, v_old: Tensor, target: Tensor, r: Tensor, beta: float) -> Tensor:
    """DiffusionNFT's loss: the batch mean of ``r * mse(v+, target) + (1 - r) * mse(v-, target)``.

    Args:
        v_theta: ``(b, ...)`` the trained policy's velocity (gradients flow through it).
        v_old: ``(b, ...)`` the sampling policy's velocity (detached here).
        target: ``(b, ...)`` the flow-matching target ``noise - x0`` of the clean samples.
        r: ``Tensor[b]`` optimality probabilities in ``[0, 1]``.
        beta: the mixing strength in ``(0, 1]``.

    Each mse is a per-sample mean over the non-batch elements; adaptive weighting is applied outside
    (:func:`nft_adaptive_loss`).
    """
    _check_r(r, v_theta)
    v_pos, v_neg = implicit_policies(v_theta, v_old, beta)
    return (r * _per_sample_mse(v_pos, target) + (1 - r) * _per_sample_mse(v_neg, target)).mean()


def adaptive_weight(velocity: Tensor, target: Tensor, sigma: Tensor, floor: float = 1e-5) -> Tensor:
    """The paper's adaptive weight of one branch, per sample: ``sigma^2 / sg(mean |x0_hat - x0|)``, ``Tensor[b]``.

    With ``x0_hat = x - sigma v`` the x0 error is ``sigma (target - v)``, so weighting the velocity mse by this equals
    the paper's squared x0 error divided by its detached mean absolute x0 error (floored at ``floor``).
    """
    err = (sigma.view(-1, *([1] * (velocity.ndim - 1))) * (velocity.detach().double() - target.double())).abs()
    return (sigma.double() ** 2 / err.flatten(1).mean(1).clamp(min=floor)).float()


def nft_adaptive_loss(v_theta: Tensor, v_old: Tensor, target: Tensor, r: Tensor, beta: float, sigma: Tensor,
                      valid: Tensor | None = None, adaptive: bool = True) -> Tensor:
    """:func:`nft_loss` with each branch's per-sample mse weighted by :func:`adaptive_weight` (the paper's default;
    unweighted when ``adaptive`` is False), averaged over the ``valid`` samples (all when None)."""
    _check_r(r, v_theta)
    v_pos, v_neg = implicit_policies(v_theta, v_old, beta)
    pos, neg = _per_sample_mse(v_pos, target), _per_sample_mse(v_neg, target)
    if adaptive:
        pos, neg = adaptive_weight(v_pos, target, sigma) * pos, adaptive_weight(v_neg, target, sigma) * neg
    return _masked_mean(r * pos + (1 - r) * neg, valid)


def awm_loss(v_theta: Tensor, target: Tensor, advantages: Tensor, valid: Tensor | None = None) -> Tensor:
    """Advantage-weighted matching: ``mean(A * mse(v_theta, target))`` over the ``valid`` samples.

    AWM's policy-gradient form at ratio 1 (on-policy), with uniform time weighting: a positive advantage pulls the
    velocity towards its sample, a negative one pushes it away.
    """
    if advantages.shape != (v_theta.shape[0],):
        raise ValueError(f"advantages must be Tensor[{v_theta.shape[0]}], got shape {tuple(advantages.shape)}")
    return _masked_mean(advantages * _per_sample_mse(v_theta, target), valid)


def optimality_probability(rewards: Tensor, group_size: int, adv_clip_max: float = 5.0, valid: Tensor | None = None,
                           global_std: bool = True, eps: float = 1e-4) -> tuple[Tensor, Tensor]:
    """Rewards to advantages and optimality probabilities, as DiffusionNFT computes them.

    ``A = (R - group mean) / (std + eps)``, the std over every valid reward of the batch (``global_std``) or within
    each group; ``r = clamp(clip(A, -A_max, A_max) / (2 A_max) + 0.5, 0, 1)``. A group of equal rewards gets ``A = 0``
    and ``r = 0.5``; invalid samples (NaN rewards) get ``A = 0``, ``r = 0.5`` and are left out of every statistic.

    Args:
        rewards: ``Tensor[N]``, group by group (``N = groups * group_size``).
        group_size: samples per prompt.
        adv_clip_max: ``A_max``.
        valid: optional ``Tensor[N]`` bool.
        global_std: one std over the batch (the paper) instead of one per group.
        eps: added to the std.

    Returns:
        ``(r, A)``, each ``Tensor[N]``.
    """
    if rewards.ndim != 1 or group_size < 2 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be Tensor[N] with N a multiple of group_size={group_size} >= 2, "
                         f"got shape {tuple(rewards.shape)}")
    if adv_clip_max <= 0:
        raise ValueError(f"adv_clip_max must be positive, got {adv_clip_max}")
    valid = torch.isfinite(rewards) if valid is None else valid & torch.isfinite(rewards)
    v = valid.view(-1, group_size).float()  # (groups, k)
    r_ = torch.where(valid, rewards.float(), torch.zeros_like(rewards, dtype=torch.float32)).view(-1, group_size)
    mean = (r_ * v).sum(1, keepdim=True) / v.sum(1, keepdim=True).clamp(min=1)
    centred = (r_ - mean) * v
    if global_std:
        std = (centred.pow(2).sum() / v.sum().clamp(min=1)).sqrt()
    else:
        std = (centred.pow(2).sum(1, keepdim=True) / v.sum(1, keepdim=True).clamp(min=1)).sqrt()
    adv = (centred / (std + eps)).flatten()
    r = (adv.clamp(-adv_clip_max, adv_clip_max) / (2 * adv_clip_max) + 0.5).clamp(0, 1)
    return r, adv


def old_policy_decay(num_updates: int, rate: float, max_decay: float) -> float:
    """The paper's schedule of the sampling policy's EMA decay: ``min(rate * updates, max_decay)`` (0 at first, so
    the old policy starts as a copy and follows the trained one closely until it lags more)."""
    return min(rate * num_updates, max_decay)


def _check_r(r: Tensor, like: Tensor) -> None:
    if r.shape != (like.shape[0],):
        raise ValueError(f"r must be Tensor[{like.shape[0]}], got shape {tuple(r.shape)}")
    if bool(((r < 0) | (r > 1)).any()):
        raise ValueError(f"r must lie in [0, 1], got values from {r.min().item():.4g} to {r.max().item():.4g}")


def _masked_mean(values: Tensor, valid: Tensor | None) -> Tensor:
    if valid is None:
        return values.mean()
    return (values * valid).sum() / valid.sum().clamp(min=1)


# -- the module ------------------------------------------------------------------------------------------------------
@dataclass
class NFTRollout:
    """Clean samples of one rollout batch and what the update needs of them."""

    latents: Tensor  # (n, c, t, h, w) clean samples
    cond: Conditioning
    prompts: list[str]
    rewards: dict[str, Tensor]  # per dimension, (n,)
    valid: Tensor  # (n,) bool: finite reward
    r: Tensor  # (n,) optimality probability
    advantages: Tensor  # (n,)
    scoring: dict[str, float] = field(default_factory=dict)  # scoring stats, logged as train/<name>


class DiffusionNFT(AlignmentModule):
    """DiffusionNFT / AWM with manual optimisation: sample groups with the sampling policy, score them, then update by
    flow matching on the clean samples.

    Each training batch is ``{"prompt": list[str]}``, with ``"image"`` ``[B, 3, H, W]`` for an image-to-video model;
    every prompt gets ``group_size`` samples.

    Args:
        reward: a ``reward_zoo`` reward (or ``CompositeReward``).
        reward_key: the reward's score that trains (``"overall"``, or one of its dimensions).
        loss_type: ``"nft"`` (DiffusionNFT) or ``"awm"`` (advantage-weighted matching).
        group_size: samples per prompt (K >= 2).
        beta: NFT's mixing strength in ``(0, 1]`` (the trust region is ``1 / beta``; the paper uses 1.0 and 0.1).
        adaptive_weighting: the paper's per-branch adaptive loss weighting (NFT only).
        adv_clip_max: advantages are clipped to ``[-A_max, A_max]`` and mapped to ``r`` (and to ``A / A_max`` for AWM).
        global_std: standardise advantages with one std over the batch (the paper) instead of per group.
        old_policy: ``"ema"``: the sampling policy and ``v_old`` are a lagging EMA of the trained weights (the paper);
            ``"base"``: the frozen base (the adapter-disabled base under LoRA), rollouts from the trained policy.
        old_decay_rate: the EMA decay is ``min(old_decay_rate * updates, old_decay_max)`` (the paper: 0.001, 0.5).
        old_decay_max: see ``old_decay_rate``.
        sampler: ``"model"``: rollouts through the model's own sampler (:meth:`sample_latents`: the Euler ODE here);
            ``"sde"``: Flow-GRPO's reverse SDE with ``sde_noise_level``, for more diverse groups.
        sde_noise_level: the SDE's noise level (``sampler: sde``).
        num_sampling_steps: sampler steps of a rollout.
        rollout_guidance_scale: classifier-free guidance of the rollouts; 1.0 (the default) is CFG-free, so the
            model learns to need no guidance.
        sigmas_per_sample: fresh (sigma, noise) draws per clean sample per update pass.
        sigma_sampling: ``"grid"`` (the rollout sampler's sigma grid, as the paper), ``"uniform"`` or
            ``"logit_normal"``.
        sigma_min: training sigmas below this are not drawn (their targets carry little signal).
        kl_beta: weight of ``mean((v_theta - v_ref)^2)`` to the reference (base) policy; the paper uses 1e-4.
        awm_old_weight: weight of AWM's pull ``mean((v_theta - v_old)^2)`` towards the sampling policy.
        inner_epochs: passes over each rollout batch (off-policy reuse after the first).
        micro_batch_size: samples per forward/backward (gradients accumulate); None = all at once.
        updates_per_epoch: optimizer steps per pass: the micro-batches are split into this many groups.
        max_grad_norm: gradient clipping before each optimizer step (None to skip).
        advantage: ``"reward"`` (the ``reward_key`` scores become ``r``) or ``"win_rate"`` (Pref-GRPO: each sample's
            win rate against its group does; the reward may then be a ``PairwiseReward``); see :mod:`.rollout_scoring`.
        win_rate_pairs: random opponents per sample, seeded by the run's seed and step; None compares every pair.
        async_scoring: score chunk ``j`` in a background thread while chunk ``j + 1`` is generated (bit-identical).
        rollout_chunk_size: prompts per generated and scored chunk, dividing the batch; None is one chunk.
        **kwargs: :class:`AlignmentModule` arguments (backbone, optimizer, LoRA, sampling).
    """

    def __init__(
        self,
        *args,
        reward: RewardModel,
        reward_key: str = "overall",
        loss_type: str = "nft",
        group_size: int = 8,
        beta: float = 1.0,
        adaptive_weighting: bool = True,
        adv_clip_max: float = 5.0,
        global_std: bool = True,
        old_policy: str = "ema",
        old_decay_rate: float = 0.001,
        old_decay_max: float = 0.5,
        sampler: str = "model",
        sde_noise_level: float = 0.7,
        num_sampling_steps: int = 10,
        rollout_guidance_scale: float = 1.0,
        sigmas_per_sample: int = 1,
        sigma_sampling: str = "grid",
        sigma_min: float = 0.0,
        kl_beta: float = 0.0,
        awm_old_weight: float = 1.0,
        inner_epochs: int = 1,
        micro_batch_size: int | None = None,
        updates_per_epoch: int = 1,
        max_grad_norm: float | None = 1.0,
        advantage: str = "reward",
        win_rate_pairs: int | None = None,
        async_scoring: bool = False,
        rollout_chunk_size: int | None = None,
        **kwargs,
    ) -> None:
        self.requires_reference = kl_beta > 0 or old_policy == "base"
        super().__init__(*args, **kwargs)
        scoring.check_scoring_options(reward, advantage, win_rate_pairs, group_size, async_scoring, rollout_chunk_size,
                                      "DiffusionNFT")
        if reward_key not in (dims := scoring.reward_dimensions(reward, advantage)):
            raise ValueError(f"reward_key {reward_key!r} is not a score of {type(reward).__name__}; expected one of "
                             f"{list(dims)}")
        checks = {
            "loss_type": (loss_type in LOSS_TYPES, f"one of {LOSS_TYPES}"),
            "old_policy": (old_policy in OLD_POLICIES, f"one of {OLD_POLICIES}"),
            "sampler": (sampler in SAMPLERS, f"one of {SAMPLERS}"),
            "sigma_sampling": (sigma_sampling in SIGMA_SAMPLINGS, f"one of {SIGMA_SAMPLINGS}"),
            "group_size": (group_size >= 2, "at least 2 (advantages are relative within a group)"),
            "beta": (0.0 < beta <= 1.0, "in (0, 1]"),
            "adv_clip_max": (adv_clip_max > 0, "positive"),
            "old_decay_rate": (old_decay_rate >= 0, "non-negative"),
            "old_decay_max": (0.0 <= old_decay_max < 1.0, "in [0, 1)"),
            "sde_noise_level": (sde_noise_level > 0, "positive"),
            "num_sampling_steps": (num_sampling_steps >= 1, "at least 1"),
            "rollout_guidance_scale": (rollout_guidance_scale >= 0, "non-negative"),
            "sigmas_per_sample": (sigmas_per_sample >= 1, "at least 1"),
            "sigma_min": (0.0 <= sigma_min < 1.0, "in [0, 1)"),
            "kl_beta": (kl_beta >= 0, "non-negative"),
            "awm_old_weight": (awm_old_weight >= 0, "non-negative"),
            "inner_epochs": (inner_epochs >= 1, "at least 1"),
            "micro_batch_size": (micro_batch_size is None or micro_batch_size >= 1, "at least 1, or null"),
            "updates_per_epoch": (updates_per_epoch >= 1, "at least 1"),
        }
        for name, (ok, expected) in checks.items():
            if not ok:
                raise ValueError(f"DiffusionNFT {name} must be {expected}, got {locals()[name]!r}")
        if sampler == "sde" and type(self).sample_latents is not AlignmentModule.sample_latents:
            raise ValueError(f"sampler 'sde' runs the Euler grid's reverse SDE, but {type(self).__name__} samples with "
                             f"its own sampler; use sampler: model")
        self.save_hyperparameters(ignore=["backbone", "optimizer", "lr_scheduler", "reward"])
        self.automatic_optimization = False
        self.hold_reward(reward)
        self.roles: AdapterRoles | None = None
        self.old_denoiser: nn.Module | None = None
        if old_policy == "ema":
            if self.backbone.has_lora:
                hp = self.hparams
                add_named_adapter(self.backbone, "old", hp.lora_rank, hp.lora_alpha, hp.lora_target_modules)
                self.roles = AdapterRoles(self.backbone.denoiser, {"default": True, "old": False}, default="default")
                ema_update(self.roles.parameters("old"), self.roles.parameters("default"), 0.0)  # a copy at first
            else:
                self.old_denoiser = copy.deepcopy(self.backbone.denoiser).requires_grad_(False).eval()

    @override
    def train(self, mode: bool = True):
        super().train(mode)  # keeps the reward in eval mode
        if self.old_denoiser is not None:
            self.old_denoiser.eval()
        return self

    @override
    def configure_optimizers(self):
        if self.roles is None:
            return super().configure_optimizers()
        optimizer = self.optimizer_fn(self.backbone.parameter_groups(self.roles.parameters("default")))
        if self.lr_scheduler_fn is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.lr_scheduler_fn(optimizer),
                                                          "interval": "step"}}

    # -- the sampling policy ----------------------------------------------------------------------------------------
    @contextmanager
    def sampling_policy(self):
        """Context in which the backbone's denoiser is the sampling (old) policy: the ``"old"`` adapter under LoRA,
        the EMA copy's weights swapped in otherwise; the trained policy under ``old_policy: base``."""
        if self.roles is not None:
            with self.roles.use("old"):
                yield
        elif self.old_denoiser is not None:
            with _swapped(self.backbone.denoiser, self.old_denoiser):
                yield
        else:
            yield

    def old_velocity(self, x: Tensor, sigma: Tensor, cond: Conditioning) -> Tensor:
        """``v_old``: the sampling policy's velocity (no gradients)."""
        with torch.no_grad():
            if self.hparams.old_policy == "base":
                return self.reference_velocity(x, sigma, cond)
            if self.roles is not None:
                with self.roles.use("old"):
                    return self.backbone.predict_velocity(x, sigma, cond)
            return self.backbone.predict_velocity(x, sigma, cond, denoiser=self.old_denoiser)

    @torch.no_grad()
    def update_old_policy(self, optimizer_steps: int) -> None:
        """Move the EMA sampling policy towards the trained weights, with the paper's decay schedule over the
        optimizer steps taken before this rollout batch's updates (0 at first: the old policy is then a copy)."""
        hp = self.hparams
        if hp.old_policy != "ema":
            return
        decay = old_policy_decay(optimizer_steps, hp.old_decay_rate, hp.old_decay_max)
        if self.roles is not None:
            ema_update(self.roles.parameters("old"), self.roles.parameters("default"), decay)
        else:
            ema_update(self.old_denoiser.parameters(), self.backbone.denoiser.parameters(), decay)
        self.log("train/old_decay", decay)

    # -- rollouts -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def rollout(self, prompts: list[str], generator: torch.Generator | None = None,
                images: Tensor | None = None) -> NFTRollout:
        """``group_size`` clean samples per prompt from the sampling policy, scored, with ``r`` and advantages; chunk by
        chunk, each scored in turn or in the background (:func:`.rollout_scoring.generate_and_score`). ``images``:
        one conditioning image per prompt (image-to-video), for its whole group; the update keeps it."""
        hp = self.hparams
        group_prompts = [p for p in prompts for _ in range(hp.group_size)]
        was_training = self.training
        self.eval()
        try:
            cond = self.with_images(self.backbone.encode_prompts(group_prompts), images, hp.group_size)
            uncond = None
            if hp.rollout_guidance_scale != 1.0:
                uncond = self.backbone.encode_prompts([hp.negative_prompt] * len(group_prompts))
            chunks, scored = scoring.generate_and_score(self, group_prompts, lambda sl: self._sample_chunk(
                cond.index(sl), None if uncond is None else uncond.index(sl), generator), hp.reward_key,
                references=cond.images)
        finally:
            self.train(was_training)
        r, adv = optimality_probability(scored.signal, hp.group_size, hp.adv_clip_max, scored.valid, hp.global_std)
        return NFTRollout(torch.cat(chunks), cond, group_prompts, scored.rewards, scored.valid, r, adv, scored.stats)

    def _sample_chunk(self, cond: Conditioning, uncond: Conditioning | None,
                      generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """One chunk's clean latents from the sampling policy, and its videos."""
        hp = self.hparams
        shape = self.backbone.latent_shape(hp.num_frames, hp.height, hp.width)
        noise = torch.randn((len(cond), *shape), generator=generator).to(self.device)
        with self.sampling_policy():
            if hp.sampler == "model":
                latents = self.sample_latents(noise, cond, num_inference_steps=hp.num_sampling_steps,
                                              guidance_scale=hp.rollout_guidance_scale, generator=generator,
                                              uncond=uncond)
            else:
                latents = self._sde_sample(noise, cond, uncond, generator)
        return latents, self.backbone.decode_latents(latents)

    def _sde_sample(self, noise: Tensor, cond: Conditioning, uncond: Conditioning | None,
                    generator: torch.Generator | None) -> Tensor:
        hp = self.hparams
        velocity = self.guided_velocity_fn(cond, hp.rollout_guidance_scale, uncond)
        sigmas = sampling_sigmas(hp.num_sampling_steps, shift=self.sampling_shift).to(self.device)
        x = noise
        for i in range(hp.num_sampling_steps):
            s, s_next = sigmas[i].expand(len(x)), sigmas[i + 1].expand(len(x))
            if i == hp.num_sampling_steps - 1:  # the last step lands on sigma 0, where the SDE has no noise
                x = x + (s_next - s).view(-1, 1, 1, 1, 1) * velocity(x, s)
            else:
                x, _, _, _ = sde_step_with_logprob(x, velocity(x, s), s, s_next, noise_level=hp.sde_noise_level,
                                                   generator=generator)
        return x

    def score(self, videos: Tensor, prompts: list[str],
              references: Tensor | None = None) -> tuple[dict[str, Tensor], Tensor]:
        """Reward every video (against its conditioning image, if any); NaN or raising rewards are masked out."""
        return self.reward_scores(videos, prompts, "DiffusionNFT", "this rollout batch is skipped",
                                  key=self.hparams.reward_key, references=references)

    # -- update -------------------------------------------------------------------------------------------------
    def training_sigmas(self, n: int) -> Tensor:
        """``Tensor[n]`` training sigmas: points of the rollout grid (above ``sigma_min`` and 0), or drawn."""
        hp = self.hparams
        low, high = self.backbone.training_sigma_range  # one expert of Wan 2.2 A14B: its range, after the floor
        if hp.sigma_sampling == "grid":
            grid = sampling_sigmas(hp.num_sampling_steps, shift=self.sampling_shift)[:-1]
            grid = grid[(grid > hp.sigma_min) & self.backbone.trains_at(grid)]
            if not len(grid):
                raise ValueError(f"no point of the {hp.num_sampling_steps}-step grid lies above sigma_min="
                                 f"{hp.sigma_min} in the trained experts' sigma range {(low, high)}")
            return grid[torch.randint(len(grid), (n,))]
        floor = hp.sigma_min
        if high <= floor:
            raise ValueError(f"sigma_min={floor} leaves nothing of the trained experts' sigma range {(low, high)}")
        raw = (max(0.0, (low - floor) / (1 - floor)), (high - floor) / (1 - floor))
        sigmas = sample_training_sigmas(n, mode=hp.sigma_sampling, shift=self.sampling_shift, sigma_range=raw)
        return floor + (1 - floor) * sigmas

    def loss(self, rollout: NFTRollout, idx: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The update loss of samples ``idx`` at one fresh (sigma, noise) each."""
        hp = self.hparams
        x0 = rollout.latents[idx]
        cond = rollout.cond.index(idx)
        sigma = self.training_sigmas(len(idx)).to(self.device)
        noise = torch.randn_like(x0)
        x = add_noise(x0, noise, sigma)
        target = velocity_target(x0, noise)
        v_theta = self.backbone.predict_velocity(x, sigma, cond)
        v_old = self.old_velocity(x, sigma, cond)
        valid = rollout.valid[idx].float()
        if hp.loss_type == "nft":
            r = rollout.r[idx]
            loss = nft_adaptive_loss(v_theta, v_old, target, r, hp.beta, sigma, valid, hp.adaptive_weighting)
            loss = loss * hp.adv_clip_max / hp.beta  # the paper's scale: the same step size across beta
        else:
            adv = rollout.advantages[idx].clamp(-hp.adv_clip_max, hp.adv_clip_max) / hp.adv_clip_max
            loss = awm_loss(v_theta, target, adv, valid)
            if hp.awm_old_weight > 0:
                loss = loss + hp.awm_old_weight * _per_sample_mse(v_theta, v_old).mean()
        stats = {"policy_loss": loss.detach()}
        if hp.kl_beta > 0:
            kl = _per_sample_mse(v_theta, self.reference_velocity(x, sigma, cond)).mean()
            loss = loss + hp.kl_beta * kl
            stats["kl"] = kl.detach()
        return loss, stats

    @override
    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        hp = self.hparams
        rollout = self.rollout(list(batch["prompt"]), images=batch.get("image"))
        n = len(rollout.prompts)
        self._log_rollout(rollout)
        last = torch.zeros((), device=self.device)
        if not bool(rollout.valid.any()):
            self.skip_nonfinite_step("reward")  # nothing to learn from; weights untouched, and counted
            return last
        opt = self.optimizers()
        steps_before = self.trainer.global_step
        mb = hp.micro_batch_size or n
        stats: dict[str, list[Tensor]] = {}
        for _ in range(hp.inner_epochs):
            order = torch.randperm(n, device=self.device)
            chunks = [order[i:i + mb] for i in range(0, n, mb)]
            if hp.updates_per_epoch > len(chunks):
                raise ValueError(f"updates_per_epoch={hp.updates_per_epoch} needs at least that many micro-batches; "
                                 f"{n} samples in micro-batches of {mb} give {len(chunks)} (lower micro_batch_size)")
            per_update = -(-len(chunks) // hp.updates_per_epoch)
            for u in range(0, len(chunks), per_update):
                group = chunks[u:u + per_update]
                n_group = sum(len(idx) for idx in group)
                opt.zero_grad()
                for idx in group:
                    for _ in range(hp.sigmas_per_sample):
                        loss, step_stats = self.loss(rollout, idx)
                        self.manual_backward(loss * len(idx) / n_group / hp.sigmas_per_sample)
                        last = loss.detach()
                        for k, v in step_stats.items():
                            stats.setdefault(k, []).append(v)
                if hp.max_grad_norm is not None:
                    self.clip_gradients(opt, gradient_clip_val=hp.max_grad_norm, gradient_clip_algorithm="norm")
                opt.step()  # with NaN or infinite gradients the guard (AlignmentModule) skips it
        self.update_old_policy(steps_before)
        self.log_dict({f"train/{k}": torch.stack(v).mean() for k, v in stats.items()}, batch_size=n)
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()
        return last

    def _log_rollout(self, rollout: NFTRollout) -> None:
        n = len(rollout.prompts)
        valid = rollout.valid
        self.log("train/masked_samples", (~valid).sum().float(), batch_size=n)
        scoring.log_scoring(self, rollout.scoring, n)
        for dim, values in rollout.rewards.items():
            if values[valid].numel():
                self.log(f"train/reward/{dim}", values[valid].mean(), prog_bar=dim == "overall", batch_size=n)
        self.log("train/r_mean", rollout.r[valid].mean() if valid.any() else torch.tensor(0.5), batch_size=n)

    # -- evaluation ---------------------------------------------------------------------------------------------
    @override
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Deterministic samples of held-out prompts (the module's sampler and guidance), scored by the reward (if
        pointwise)."""
        if isinstance(self.reward, RewardModel):
            self.validate_with_reward(batch, batch_idx)


@contextmanager
def _swapped(module: nn.Module, other: nn.Module):
    """Context in which ``module`` holds ``other``'s weights (the tensors are swapped, not copied), then its own."""
    pairs = list(zip(module.parameters(), other.parameters()))

    def swap() -> None:
        for p, q in pairs:
            p.data, q.data = q.data, p.data

    swap()
    try:
        yield
    finally:
        swap()

