"""Flow-GRPO (Liu et al., arXiv 2505.05470) and DanceGRPO (Xue et al., arXiv 2505.07818): online RL for flow models.

The deterministic flow ODE is turned into a reverse SDE with the same marginals, so every denoising step is a
Gaussian policy with a log-probability. For each prompt a group of K videos is sampled with that SDE, scored by a
reward, and each video's advantage is its reward standardised within its group (GRPO: no value network). The policy
is updated with PPO's clipped surrogate on the recorded steps, plus an optional KL term to the reference policy,
which between two Gaussian steps of equal variance is ``||mean - mean_ref||^2 / (2 std^2)``. MixGRPO's sliding
window (arXiv 2507.21802) and DanceGRPO's shared group noise and best/worst-k selection are options, and so are
Pref-GRPO's win-rate advantages and scoring in the background while the next chunk is generated (``rollout_scoring``).

Stabilisers, all off by default: GRPO-Guard's ratio normalisation (arXiv 2510.22319), which re-centres and rescales
each step's log-ratio so that the PPO clip binds evenly across noise levels; per-step weighting of the policy loss by
the step's noise (TempFlow-GRPO, arXiv 2508.04324) or by ``1/dt`` (GRPO-Guard's gradient reweighting); and a KL
coefficient that decays or grows over optimizer steps.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lit_videoalign.backbones.base import Conditioning
from lit_videoalign.objectives import rollout_scoring as scoring
from lit_videoalign.objectives.base import AlignmentModule
from lit_videoalign.schedules.flow import euler_step, sampling_sigmas, sde_step_with_logprob
from reward_zoo.base import RewardModel


# -- pure losses -----------------------------------------------------------------------------------------------------
def group_advantages(rewards: Tensor, group_size: int, eps: float = 1e-4, valid: Tensor | None = None) -> Tensor:
    """Standardise rewards within each group: ``(r - group mean) / (group std + eps)``, std with ``unbiased=False``.

    Args:
        rewards: ``Tensor[N]`` laid out group by group (``N = num_groups * group_size``).
        group_size: samples per group (per prompt).
        eps: added to the std, so a group of equal rewards gets zero advantages rather than NaN.
        valid: optional ``Tensor[N]`` bool; invalid samples (e.g. a NaN reward) are left out of their group's
            statistics and get advantage 0.

    Returns:
        ``Tensor[N]`` advantages.
    """
    if rewards.ndim != 1 or group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be Tensor[N] with N a multiple of group_size={group_size}, "
                         f"got shape {tuple(rewards.shape)}")
    r = rewards.float().view(-1, group_size)  # (groups, k)
    if valid is None:
        return ((r - r.mean(1, keepdim=True)) / (r.std(1, unbiased=False, keepdim=True) + eps)).flatten()
    v = valid.view(-1, group_size).float()
    r = torch.where(v.bool(), r, torch.zeros_like(r))
    count = v.sum(1, keepdim=True).clamp(min=1)
    mean = (r * v).sum(1, keepdim=True) / count
    std = (((r - mean) ** 2) * v).sum(1, keepdim=True).div(count).sqrt()
    return (((r - mean) / (std + eps)) * v).flatten()


def grpo_policy_loss(log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, clip_range: float) -> Tensor:
    """PPO clipped surrogate: ``mean(max(-A * ratio, -A * clip(ratio, 1 - c, 1 + c)))``, ``ratio = exp(lp - old)``."""
    if not (log_prob.shape == old_log_prob.shape == advantages.shape):
        raise ValueError(f"log_prob, old_log_prob and advantages must share a shape, got {tuple(log_prob.shape)}, "
                         f"{tuple(old_log_prob.shape)}, {tuple(advantages.shape)}")
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return torch.maximum(unclipped, clipped).mean()


def gaussian_kl(mean: Tensor, mean_ref: Tensor, std: Tensor | float) -> Tensor:
    """KL between two Gaussian steps of equal std, per sample: ``mean(||mean - mean_ref||^2) / (2 std^2)``."""
    if mean.shape != mean_ref.shape:
        raise ValueError(f"mean and mean_ref must share a shape, got {tuple(mean.shape)} and {tuple(mean_ref.shape)}")
    sq = (mean.float() - mean_ref.float()).pow(2).flatten(1).mean(1)  # (b,)
    std = torch.as_tensor(std, dtype=torch.float32, device=mean.device)
    if std.ndim:
        std = std.reshape(std.shape[0], -1)[:, 0]  # one std per sample
    return sq / (2 * std**2)


def _per_sample(std: Tensor | float, n: int, device) -> Tensor:
    std = torch.as_tensor(std, dtype=torch.float32, device=device)
    return std.reshape(n, -1)[:, 0] if std.ndim else std.expand(n)  # (b,)


def ratio_norm_log_ratio(log_prob: Tensor, old_log_prob: Tensor, mean: Tensor, old_mean: Tensor,
                         std: Tensor | float) -> Tensor:
    """GRPO-Guard's RatioNorm (Wang et al., arXiv 2510.22319): the log-ratio a step's clip should act on, per sample.

    A step is ``x' = old_mean + std * eps``. With ``d = mean - old_mean`` (the policy's drift) and log-probs averaged
    over the ``D`` elements, ``log_prob - old_log_prob = mean(eps * d) / std - mean(d^2) / (2 std^2)``: its mean sits
    below 0 by the drift term (the ratio is biased below 1, so positive-advantage samples rarely reach ``1 + clip``) and
    its spread scales like ``1 / std``, which differs by an order of magnitude between noisy and clean steps. RatioNorm
    adds the drift term back and multiplies by ``std``: ``std * (log_prob - old_log_prob + mean(d^2) / (2 std^2))``,
    which equals ``mean(eps * d)``, centred at 0 with a spread set by the drift alone, at every step.

    Args:
        log_prob, old_log_prob: ``Tensor[B]`` element-averaged log-probs of the recorded step (current, rollout).
        mean, old_mean: the step's Gaussian means under the current and the rollout policy, ``(b, ...)``.
        std: the step's std ``std_t * sqrt(-dt)``, a float or broadcastable to ``mean`` with one value per sample.

    Returns:
        ``Tensor[B]`` normalised log-ratios; ``exp`` of it is the ratio to clip.
    """
    if mean.shape != old_mean.shape or mean.shape[0] != log_prob.shape[0] or log_prob.shape != old_log_prob.shape:
        raise ValueError(f"need log_prob, old_log_prob of shape (b,) and mean, old_mean of shape (b, ...) with the "
                         f"same b; got {tuple(log_prob.shape)}, {tuple(old_log_prob.shape)}, {tuple(mean.shape)}, "
                         f"{tuple(old_mean.shape)}")
    drift = (mean.float() - old_mean.float()).pow(2).flatten(1).mean(1)  # (b,)
    std = _per_sample(std, len(log_prob), mean.device)
    return std * (log_prob - old_log_prob + drift / (2 * std**2))


STEP_WEIGHTINGS = ("uniform", "noise", "inverse_dt")
KL_SCHEDULES = ("constant", "linear", "cosine")


def step_weights(sigmas: Tensor, steps: Sequence[int], mode: str = "uniform", noise_level: float = 0.7) -> Tensor:
    """Weight of the policy loss of each step in ``steps``, ``Tensor[len(steps)]`` (float32, on CPU).

    - ``"uniform"``: 1 for every step (Flow-GRPO).
    - ``"noise"``: TempFlow-GRPO's noise-aware weighting (arXiv 2508.04324): proportional to the step's SDE std
      ``std_t * sqrt(sigma - sigma_next)`` (the ``std`` that ``sde_step_with_logprob`` returns), normalised to mean 1
      over ``steps``. Noisy early steps, where the layout is decided, weigh more than the clean
      last steps, whose unweighted log-prob gradients (``~ 1 / std``) would otherwise dominate.
    - ``"inverse_dt"``: GRPO-Guard's gradient reweighting (arXiv 2510.22319): ``1 / (sigma - sigma_next)``, not
      normalised. With ``ratio_norm`` the gradient of a step scales like ``dt``; this makes it the same at every step.

    Args:
        sigmas: ``Tensor[S + 1]`` sampling sigmas, decreasing.
        steps: indices of the weighted steps (each in ``[0, S)``).
        mode: one of ``"uniform"``, ``"noise"``, ``"inverse_dt"``.
        noise_level: the SDE's ``a`` (cancels in ``"noise"``; kept so the std is the rollout's).
    """
    if mode not in STEP_WEIGHTINGS:
        raise ValueError(f"step_weighting must be one of {STEP_WEIGHTINGS}, got {mode!r}")
    sigmas = sigmas.detach().float().cpu()
    if sigmas.ndim != 1 or not steps or not all(0 <= k < len(sigmas) - 1 for k in steps):
        raise ValueError(f"need sigmas of shape (S + 1,) and steps in [0, S); got {tuple(sigmas.shape)} and {steps}")
    idx = torch.tensor(list(steps))
    s, s_next = sigmas[idx], sigmas[idx + 1]  # (k,)
    if mode != "noise":
        return torch.ones(len(idx)) if mode == "uniform" else 1.0 / (s - s_next)
    zeros = torch.zeros(len(idx), 1)
    std = sde_step_with_logprob(zeros, zeros, s, s_next, noise_level=noise_level, prev_sample=zeros)[3].flatten()
    return std / std.mean()


def kl_coefficient(step: int, kl_beta: float, kl_beta_final: float | None = None, schedule: str = "constant",
                   schedule_steps: int | None = None) -> float:
    """The KL weight at optimizer step ``step``: ``kl_beta`` moving to ``kl_beta_final`` over ``schedule_steps``.

    With ``p = min(step / schedule_steps, 1)``: ``"constant"`` gives ``kl_beta``; ``"linear"`` gives
    ``kl_beta + (kl_beta_final - kl_beta) * p``; ``"cosine"`` gives
    ``kl_beta_final + (kl_beta - kl_beta_final) * (1 + cos(pi * p)) / 2``. After ``schedule_steps`` it stays at
    ``kl_beta_final``. Either end may be the larger (a decaying or a growing KL).
    """
    if schedule not in KL_SCHEDULES:
        raise ValueError(f"kl_schedule must be one of {KL_SCHEDULES}, got {schedule!r}")
    if schedule == "constant":
        return kl_beta
    if kl_beta_final is None or schedule_steps is None or schedule_steps < 1:
        raise ValueError(f"kl_schedule={schedule!r} needs kl_beta_final and kl_schedule_steps >= 1, got "
                         f"kl_beta_final={kl_beta_final}, kl_schedule_steps={schedule_steps}")
    p = min(max(step, 0) / schedule_steps, 1.0)
    if schedule == "linear":
        return kl_beta + (kl_beta_final - kl_beta) * p
    return kl_beta_final + (kl_beta - kl_beta_final) * 0.5 * (1.0 + math.cos(math.pi * p))


def micro_batches_per_update(num_prompts: int, group_size: int, micro_batch_size: int | None,
                             updates_per_epoch: int) -> int:
    """Micro-batches each optimizer step of an inner epoch accumulates, for ``num_prompts * group_size`` rollouts.

    Raises a ``ValueError`` naming the values and the fix when the rollouts give fewer micro-batches than
    ``updates_per_epoch``.
    """
    n = num_prompts * group_size
    mb = micro_batch_size or n
    chunks = -(-n // mb)
    if updates_per_epoch > chunks:
        fix = (f"lower micro_batch_size to at most {n // updates_per_epoch} or updates_per_epoch to at most {chunks}"
               if n >= updates_per_epoch else f"lower updates_per_epoch to at most {chunks} or raise the batch size")
        raise ValueError(f"updates_per_epoch={updates_per_epoch} needs at least that many micro-batches; {n} rollouts "
                         f"({num_prompts} prompts x group_size={group_size}) in micro-batches of "
                         f"micro_batch_size={mb} give {chunks}: {fix}")
    return -(-chunks // updates_per_epoch)


# -- the module ------------------------------------------------------------------------------------------------------
@dataclass
class Rollout:
    """A batch of SDE trajectories with everything the update needs."""

    latents: Tensor  # (n, s + 1, c, t, h, w) x at every sigma
    log_probs: Tensor  # (n, s) log-prob of each step under the rollout policy
    sigmas: Tensor  # (s + 1,)
    sde_steps: list[int]  # steps that were stochastic (and can be trained)
    cond: Conditioning
    uncond: Conditioning | None  # negative-prompt conditioning when guidance is on
    prompts: list[str]
    rewards: dict[str, Tensor]  # per dimension, (n,)
    valid: Tensor  # (n,) bool: the reward was finite
    advantages: Tensor  # (n,)
    means: dict[int, Tensor] = field(default_factory=dict)  # step -> (n, c, t, h, w) rollout-policy means (ratio_norm)
    scoring: dict[str, float] = field(default_factory=dict)  # scoring stats, logged as train/<name>


class GRPO(AlignmentModule):
    """Flow-GRPO with manual optimisation: roll out groups, score, then update on the recorded steps.

    Each training batch is ``{"prompt": list[str]}``; every prompt gets ``group_size`` rollouts.

    Args:
        reward: a ``reward_zoo`` reward (or ``CompositeReward``); its ``"overall"`` is the training signal.
        group_size: rollouts per prompt (K).
        num_sampling_steps: denoising steps of a rollout.
        noise_level: the SDE's ``a`` (0.7 in Flow-GRPO).
        rollout_guidance_scale: classifier-free guidance during rollouts and updates; None uses ``guidance_scale``.
        same_noise_per_group: start every rollout of a group from the same noise (DanceGRPO).
        train_fraction: fraction of the SDE steps trained on per inner epoch, drawn at random (Flow-GRPO).
        sde_window: if set, only this many consecutive steps are stochastic and trained, the rest are ODE steps
            (MixGRPO); the window moves one step later every ``window_shift_every`` updates and wraps around.
        window_shift_every: updates between window moves.
        inner_epochs: passes over each rollout batch.
        micro_batch_size: samples per forward/backward in the update (gradients accumulate); None = all at once.
        updates_per_epoch: optimizer steps per inner epoch: the micro-batches of a rollout batch are split into this
            many consecutive groups with one step after each (Flow-GRPO steps per sample batch). More updates per
            rollout at the same compute; after the first, the policy is off the rollouts' and the PPO clip acts.
        clip_range: PPO ratio clip (small, since log-probs are averaged over elements).
        adv_clip_max: advantages are clipped to ``[-adv_clip_max, adv_clip_max]``.
        kl_beta: weight of the KL to the reference policy; 0 skips the reference forward entirely.
        kl_schedule: ``"constant"`` (``kl_beta`` throughout), ``"linear"`` or ``"cosine"``: the KL weight moves from
            ``kl_beta`` to ``kl_beta_final`` over the first ``kl_schedule_steps`` optimizer steps, then stays there
            (:func:`kl_coefficient`). It follows ``trainer.global_step``, so a resumed run continues the schedule.
        kl_beta_final: the KL weight at the end of the schedule (larger than ``kl_beta`` for a growing KL).
        kl_schedule_steps: optimizer steps the schedule takes (e.g. ``trainer.max_steps``).
        ratio_norm: GRPO-Guard's RatioNorm (:func:`ratio_norm_log_ratio`): clip ``exp(std * (log-ratio + drift))``
            instead of the raw ratio, so the clip binds evenly across steps. The rollout keeps each SDE step's mean
            (memory of one more latent per step). ``clip_range`` then bounds a latent-space quantity (about
            ``std`` times the raw log-ratio) and may need retuning.
        step_weighting: per-step weight of the policy loss (:func:`step_weights`): ``"uniform"`` (Flow-GRPO),
            ``"noise"`` (TempFlow-GRPO: proportional to the step's SDE std, mean 1 over the rollout's SDE steps) or
            ``"inverse_dt"`` (GRPO-Guard: ``1 / dt``; with ``ratio_norm`` this is GRPO-Guard as published). The KL
            term is not weighted.
        per_prompt_stats: standardise with each prompt's running reward history instead of its current group.
        history_size: rewards kept per prompt for ``per_prompt_stats``.
        top_bottom_k: keep only the best and worst k rollouts of each group in the loss (DanceGRPO).
        max_grad_norm: gradient clipping before each optimizer step (None to skip).
        advantage: ``"reward"`` (standardise the rewards) or ``"win_rate"`` (Pref-GRPO: each sample's win rate against
            its group; the reward may then be a ``PairwiseReward``); see :mod:`.rollout_scoring`.
        win_rate_pairs: random opponents per sample, seeded by the run's seed and step; None compares every pair.
        async_scoring: score chunk ``j`` in a background thread while chunk ``j + 1`` is generated (bit-identical).
        rollout_chunk_size: prompts per generated and scored chunk, dividing the batch; None is one chunk.
        **kwargs: :class:`AlignmentModule` arguments (backbone, optimizer, LoRA, sampling).
    """

    requires_reference = True

    def __init__(
        self,
        *args,
        reward: RewardModel,
        group_size: int = 8,
        num_sampling_steps: int = 10,
        noise_level: float = 0.7,
        rollout_guidance_scale: float | None = None,
        same_noise_per_group: bool = False,
        train_fraction: float = 1.0,
        sde_window: int | None = None,
        window_shift_every: int = 1,
        inner_epochs: int = 1,
        micro_batch_size: int | None = None,
        updates_per_epoch: int = 1,
        clip_range: float = 1e-4,
        adv_clip_max: float = 5.0,
        kl_beta: float = 0.0,
        kl_schedule: str = "constant",
        kl_beta_final: float | None = None,
        kl_schedule_steps: int | None = None,
        ratio_norm: bool = False,
        step_weighting: str = "uniform",
        per_prompt_stats: bool = False,
        history_size: int = 32,
        top_bottom_k: int | None = None,
        max_grad_norm: float | None = 1.0,
        advantage: str = "reward",
        win_rate_pairs: int | None = None,
        async_scoring: bool = False,
        rollout_chunk_size: int | None = None,
        **kwargs,
    ) -> None:
        kl_max = kl_beta if kl_schedule == "constant" or kl_beta_final is None else max(kl_beta, kl_beta_final)
        self.requires_reference = kl_max > 0  # no reference copy or forward when the KL term is off
        super().__init__(*args, **kwargs)
        scoring.check_scoring_options(reward, advantage, win_rate_pairs, group_size, async_scoring, rollout_chunk_size,
                                      "GRPO")
        if group_size < 2:
            raise ValueError(f"group_size must be at least 2 for group-relative advantages, got {group_size}")
        if not 0.0 < train_fraction <= 1.0:
            raise ValueError(f"train_fraction must be in (0, 1], got {train_fraction}")
        if sde_window is not None and not 1 <= sde_window <= num_sampling_steps:
            raise ValueError(f"sde_window must be in [1, num_sampling_steps={num_sampling_steps}], got {sde_window}")
        if top_bottom_k is not None and not 1 <= 2 * top_bottom_k <= group_size:
            raise ValueError(f"top_bottom_k must satisfy 1 <= 2k <= group_size={group_size}, got {top_bottom_k}")
        if updates_per_epoch < 1 or inner_epochs < 1 or window_shift_every < 1:
            raise ValueError(f"updates_per_epoch, inner_epochs and window_shift_every must be at least 1, got "
                             f"{updates_per_epoch}, {inner_epochs}, {window_shift_every}")
        if micro_batch_size is not None and micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be at least 1 (None: the whole batch), got {micro_batch_size}")
        if micro_batch_size is None and updates_per_epoch > 1:
            raise ValueError(f"updates_per_epoch={updates_per_epoch} needs micro_batch_size: without it an inner epoch "
                             f"is one micro-batch, so one optimizer step; set micro_batch_size to at most "
                             f"batch_size * group_size / {updates_per_epoch}")
        if step_weighting not in STEP_WEIGHTINGS:
            raise ValueError(f"step_weighting must be one of {STEP_WEIGHTINGS}, got {step_weighting!r}")
        if kl_beta_final is not None and kl_beta_final < 0:
            raise ValueError(f"kl_beta_final must be >= 0, got {kl_beta_final}")
        kl_coefficient(0, kl_beta, kl_beta_final, kl_schedule, kl_schedule_steps)  # names a bad schedule now
        if kl_beta < 0 or clip_range <= 0 or noise_level <= 0:
            raise ValueError(f"need kl_beta >= 0, clip_range > 0, noise_level > 0; got {kl_beta}, {clip_range}, "
                             f"{noise_level}")
        self.save_hyperparameters(ignore=["backbone", "optimizer", "lr_scheduler", "reward"])
        self.automatic_optimization = False
        self.hold_reward(reward)
        self.prompt_history: dict[str, deque] = {}
        self.num_updates = 0

    @override
    def on_fit_start(self) -> None:
        """Called at the start of ``fit``, before the sanity check and any rollout: the datamodule's batch size must
        feed ``updates_per_epoch`` micro-batches."""
        super().on_fit_start()
        self.check_batch_arithmetic(getattr(self.trainer.datamodule, "batch_size", None), "the datamodule")

    @override
    def on_train_start(self) -> None:
        """Called once the train loader exists, before the first rollout: the same check on the loader's batch size
        (for loaders passed to ``fit`` directly)."""
        super().on_train_start()
        self.check_batch_arithmetic(getattr(self.trainer.train_dataloader, "batch_size", None), "the train loader")

    def check_batch_arithmetic(self, batch_size: int | None, source: str) -> None:
        """Raise if ``batch_size`` prompts cannot give ``updates_per_epoch`` optimizer steps; None skips the check."""
        if not isinstance(batch_size, int) or batch_size < 1:
            return
        hp = self.hparams
        scoring.chunk_slices(batch_size, hp.group_size, hp.rollout_chunk_size)  # the chunk size divides the batch
        try:
            per_update = micro_batches_per_update(batch_size, hp.group_size, hp.micro_batch_size, hp.updates_per_epoch)
        except ValueError as err:
            raise ValueError(f"{err} (batch_size={batch_size} from {source}, before the first rollout)") from None
        n = batch_size * hp.group_size
        chunks = -(-n // (hp.micro_batch_size or n))
        if (steps := -(-chunks // per_update)) != hp.updates_per_epoch:
            rank_zero_warn(f"GRPO: {chunks} micro-batches per inner epoch in groups of {per_update} give {steps} "
                           f"optimizer steps, not updates_per_epoch={hp.updates_per_epoch}; choose micro_batch_size so "
                           f"that batch_size * group_size = {n} splits evenly")

    # -- rollouts -----------------------------------------------------------------------------------------------
    @property
    def rollout_guidance(self) -> float:
        g = self.hparams.rollout_guidance_scale
        return self.hparams.guidance_scale if g is None else g

    def sde_steps(self) -> list[int]:
        """The stochastic (trainable) steps of the next rollout: of those a trained expert runs (all but for one
        expert of Wan 2.2 A14B), all or a window that shifts every ``window_shift_every`` updates."""
        s, w = self.hparams.num_sampling_steps, self.hparams.sde_window
        steps = self.backbone.trains_at(sampling_sigmas(s, shift=self.sampling_shift)[:-1]).nonzero().flatten().tolist()
        if len(steps) < (w or 1):
            raise ValueError(f"the trained experts run {len(steps)} of the {s} sampling steps, < sde_window={w}")
        start = 0 if w is None else (self.num_updates // self.hparams.window_shift_every) % (len(steps) - w + 1)
        return steps[start:start + (w or s)]

    @torch.no_grad()
    def rollout(self, prompts: list[str], generator: torch.Generator | None = None,
                images: Tensor | None = None) -> Rollout:
        """Sample ``group_size`` videos per prompt with the SDE, record the trajectory, score and standardise; chunk
        by chunk, each scored in turn or in the background (:func:`.rollout_scoring.generate_and_score`). ``images``:
        one conditioning image per prompt (image-to-video), for its whole group."""
        hp = self.hparams
        was_training = self.training
        self.eval()
        try:
            group_prompts = [p for p in prompts for _ in range(hp.group_size)]
            cond = self.with_images(self.backbone.encode_prompts(group_prompts), images, hp.group_size)
            sigmas = sampling_sigmas(hp.num_sampling_steps, shift=self.sampling_shift).to(self.device)
            steps = self.sde_steps()
            uncond = self._uncond(len(group_prompts))
            uncond = uncond.with_images_from(cond) if uncond is not None and cond.images is not None else uncond
            chunks, scored = scoring.generate_and_score(self, group_prompts, lambda sl: self._sample_chunk(
                cond.index(sl), None if uncond is None else uncond.index(sl), sigmas, steps, generator), "overall",
                references=cond.images)
            advantages = self.advantages(scored.signal, scored.valid, group_prompts)
        finally:
            self.train(was_training)
        latents, log_probs, means = zip(*chunks)
        means = {i: torch.cat([m[i] for m in means]) for i in means[0]}
        return Rollout(torch.cat(latents), torch.cat(log_probs), sigmas, steps, cond, uncond, group_prompts,
                       scored.rewards, scored.valid, advantages, means, scored.stats)

    def _sample_chunk(self, cond: Conditioning, uncond: Conditioning | None, sigmas: Tensor, steps: list[int],
                      generator: torch.Generator | None) -> tuple[tuple[Tensor, Tensor, dict[int, Tensor]], Tensor]:
        """One chunk's SDE trajectories, ``(latents (b, s + 1, ...), log_probs (b, s), means)``, and its videos."""
        hp = self.hparams
        n = len(cond)
        shape = self.backbone.latent_shape(hp.num_frames, hp.height, hp.width)
        noise = torch.randn((n // hp.group_size if hp.same_noise_per_group else n, *shape), generator=generator)
        noise = noise.repeat_interleave(hp.group_size, dim=0) if hp.same_noise_per_group else noise
        noise = noise.to(self.device)
        velocity = self.guided_velocity_fn(cond, self.rollout_guidance, uncond)
        x, latents, means = noise, [noise], {}
        log_probs = torch.zeros(n, hp.num_sampling_steps, device=self.device)
        for i in range(hp.num_sampling_steps):
            s, s_next = sigmas[i].expand(len(x)), sigmas[i + 1].expand(len(x))
            v = velocity(x, s)
            if i in steps:
                x, log_probs[:, i], mean, _ = sde_step_with_logprob(x, v, s, s_next, noise_level=hp.noise_level,
                                                                    generator=generator)
                if hp.ratio_norm:
                    means[i] = mean
            else:
                x = euler_step(x, v, s, s_next)
            latents.append(x)
        return (torch.stack(latents, dim=1), log_probs, means), self.backbone.decode_latents(x)

    def score(self, videos: Tensor, prompts: list[str], references: Tensor | None = None) -> tuple[dict, Tensor]:
        """Reward every video (against its conditioning image, if any); NaN or raising rewards are masked out."""
        return self.reward_scores(videos, prompts, "GRPO", "this rollout batch is skipped", references=references)

    def advantages(self, rewards: Tensor, valid: Tensor, prompts: list[str]) -> Tensor:
        hp = self.hparams
        if hp.per_prompt_stats:
            adv = torch.zeros_like(rewards)
            for r, p in zip(rewards[valid].tolist(), [p for p, ok in zip(prompts, valid.tolist()) if ok]):
                self.prompt_history.setdefault(p, deque(maxlen=hp.history_size)).append(r)
            for i, (r, ok, p) in enumerate(zip(rewards.tolist(), valid.tolist(), prompts)):
                if ok:
                    hist = torch.tensor(list(self.prompt_history[p]))
                    adv[i] = (r - hist.mean()) / (hist.std(unbiased=False) + 1e-4)
        else:
            adv = group_advantages(rewards, hp.group_size, valid=valid)
        adv = adv.clamp(-hp.adv_clip_max, hp.adv_clip_max)
        if hp.top_bottom_k is not None:
            k = hp.top_bottom_k
            groups = adv.view(-1, hp.group_size)
            keep = torch.zeros_like(groups, dtype=torch.bool)
            order = groups.argsort(dim=1)
            keep.scatter_(1, order[:, :k], True)
            keep.scatter_(1, order[:, -k:], True)
            adv = torch.where(keep.flatten(), adv, torch.zeros_like(adv))
        return adv * valid

    # -- update -------------------------------------------------------------------------------------------------
    def step_log_prob(self, rollout: Rollout, idx: Tensor, step: int) -> tuple[Tensor, Tensor, Tensor]:
        """Recompute one recorded step under the current policy: ``(log_prob, mean, std)``, with gradients."""
        x = rollout.latents[idx, step]
        s = rollout.sigmas[step].expand(len(idx))
        s_next = rollout.sigmas[step + 1].expand(len(idx))
        uncond = rollout.uncond.index(idx) if rollout.uncond is not None else None
        v = self.guided_velocity_fn(rollout.cond.index(idx), self.rollout_guidance, uncond)(x, s)
        _, log_prob, mean, std = sde_step_with_logprob(x, v, s, s_next, noise_level=self.hparams.noise_level,
                                                       prev_sample=rollout.latents[idx, step + 1])
        return log_prob, mean, std

    def _uncond(self, n: int) -> Conditioning | None:
        if self.rollout_guidance == 1.0:
            return None
        return self.backbone.encode_prompts([self.hparams.negative_prompt] * n)

    def reference_mean(self, rollout: Rollout, idx: Tensor, step: int) -> Tensor:
        x = rollout.latents[idx, step]
        s = rollout.sigmas[step].expand(len(idx))
        s_next = rollout.sigmas[step + 1].expand(len(idx))
        cond, g = rollout.cond.index(idx), self.rollout_guidance
        with torch.no_grad():
            v_c = self.reference_velocity(x, s, cond)
            if rollout.uncond is not None:
                v_u = self.reference_velocity(x, s, rollout.uncond.index(idx))
                v_c = v_u + g * (v_c - v_u)
            _, _, mean, _ = sde_step_with_logprob(x, v_c, s, s_next, noise_level=self.hparams.noise_level,
                                                  prev_sample=rollout.latents[idx, step + 1])
        return mean

    @override
    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        hp = self.hparams
        prompts = list(batch["prompt"])
        rollout = self.rollout(prompts, images=batch.get("image"))
        n = len(rollout.prompts)
        self._log_rollout(rollout)
        opt = self.optimizers()
        mb = hp.micro_batch_size or n
        last_loss = torch.zeros((), device=self.device)
        first_dev = 0.0
        if not bool(rollout.valid.any()):
            self.skip_nonfinite_step("reward")  # nothing to learn from; weights untouched, and counted
            return last_loss
        weights = None  # step -> weight of its policy loss
        if hp.step_weighting != "uniform":
            w = step_weights(rollout.sigmas, rollout.sde_steps, hp.step_weighting, hp.noise_level).tolist()
            weights = dict(zip(rollout.sde_steps, w))
        for epoch in range(hp.inner_epochs):
            n_train = max(1, round(hp.train_fraction * len(rollout.sde_steps)))
            pick = torch.randperm(len(rollout.sde_steps))[:n_train].tolist()
            steps = sorted(rollout.sde_steps[i] for i in pick)
            order = torch.randperm(n, device=self.device)
            chunks = [order[i:i + mb] for i in range(0, n, mb)]
            per_update = micro_batches_per_update(len(prompts), hp.group_size, hp.micro_batch_size,
                                                  hp.updates_per_epoch)  # a short last batch may still fail here
            stats = {"ratio": [], "clipfrac": [], "kl": [], "approx_kl": [], "policy": []}
            for u in range(0, len(chunks), per_update):
                group = chunks[u:u + per_update]
                n_group = sum(len(idx) for idx in group)
                kl_beta = kl_coefficient(self.global_step, hp.kl_beta, hp.kl_beta_final, hp.kl_schedule,
                                         hp.kl_schedule_steps)
                opt.zero_grad()
                for idx in group:
                    adv = rollout.advantages[idx]
                    for step in steps:
                        log_prob, mean, std = self.step_log_prob(rollout, idx, step)
                        old = rollout.log_probs[idx, step]
                        if hp.ratio_norm:
                            log_ratio = ratio_norm_log_ratio(log_prob, old, mean, rollout.means[step][idx], std)
                            policy = grpo_policy_loss(log_ratio, torch.zeros_like(log_ratio), adv, hp.clip_range)
                        else:
                            log_ratio = log_prob - old
                            policy = grpo_policy_loss(log_prob, old, adv, hp.clip_range)
                        loss = policy if weights is None else weights[step] * policy
                        if kl_beta > 0:
                            kl = gaussian_kl(mean, self.reference_mean(rollout, idx, step), std).mean()
                            loss = loss + kl_beta * kl
                            stats["kl"].append(kl.detach())
                        self.manual_backward(loss * len(idx) / n_group / len(steps))
                        ratio = torch.exp(log_ratio.detach())  # the ratio the clip acts on
                        if epoch == 0 and u == 0:  # on-policy check: nothing has moved yet, so the ratio must be 1
                            first_dev = max(first_dev, (ratio - 1).abs().max().item())
                        stats["ratio"].append(ratio)
                        stats["clipfrac"].append(((ratio - 1).abs() > hp.clip_range).float())
                        stats["approx_kl"].append(0.5 * (log_prob.detach() - old) ** 2)
                        stats["policy"].append(policy.detach())
                        last_loss = loss.detach()
                if hp.max_grad_norm is not None:
                    self.clip_gradients(opt, gradient_clip_val=hp.max_grad_norm, gradient_clip_algorithm="norm")
                opt.step()  # with NaN or infinite gradients the guard (AlignmentModule) skips it
            self.num_updates += 1
            ratio = torch.cat(stats["ratio"])
            if epoch == 0:
                self.log("train/ratio_first_max_dev", first_dev, batch_size=n)
            self.log_dict({"train/ratio_mean": ratio.mean(), "train/ratio_min": ratio.min(),
                           "train/ratio_max": ratio.max(), "train/clipfrac": torch.cat(stats["clipfrac"]).mean(),
                           "train/approx_kl": torch.cat(stats["approx_kl"]).mean(),
                           "train/policy_loss": torch.stack(stats["policy"]).mean()}, batch_size=n)
            if stats["kl"]:
                self.log("train/kl", torch.stack(stats["kl"]).mean(), batch_size=n)
            if hp.kl_schedule != "constant":
                self.log("train/kl_beta", kl_beta, batch_size=n)
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()
        return last_loss

    def _log_rollout(self, rollout: Rollout) -> None:
        n = len(rollout.prompts)
        valid = rollout.valid
        self.log("train/masked_samples", (~valid).sum().float(), batch_size=n)
        scoring.log_scoring(self, rollout.scoring, n)
        for dim, values in rollout.rewards.items():
            finite = values[valid]
            if finite.numel():
                self.log(f"train/reward/{dim}", finite.mean(), prog_bar=dim == "overall", batch_size=n)
        if valid.any():
            self.log("train/reward_std", rollout.rewards["overall"][valid].std(unbiased=False), batch_size=n)

    # -- evaluation ---------------------------------------------------------------------------------------------
    @override
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Deterministic ODE samples of held-out prompts, scored by the training reward (if pointwise)."""
        if isinstance(self.reward, RewardModel):
            self.validate_with_reward(batch, batch_idx)

    @override
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["grpo_state"] = {"num_updates": self.num_updates,
                                    "prompt_history": {p: list(h) for p, h in self.prompt_history.items()}}

    @override
    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("grpo_state", {})
        self.num_updates = state.get("num_updates", 0)
        self.prompt_history = {p: deque(h, maxlen=self.hparams.history_size)
                               for p, h in state.get("prompt_history", {}).items()}
