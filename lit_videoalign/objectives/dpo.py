"""Flow-DPO (Liu et al., arXiv 2501.13918): Diffusion-DPO (Wallace et al., arXiv 2311.12908) for flow video models.

Both videos of a preference pair (winner ``x_w``, loser ``x_l``, one prompt) are noised with the *same* noise and
the *same* ``sigma``. The policy and the frozen reference predict both velocities, and the loss asks the policy to
lower its velocity error on the winner more than on the loser, each measured against the reference:

    loss = -log sigmoid(-beta / 2 * ((err_w - ref_err_w) - (err_l - ref_err_l)))

with per-sample MSE errors (mean over non-batch elements). The argument of the sigmoid is the implicit reward margin
and its sign on a batch gives the implicit accuracy. The reference is the adapter-disabled base when training LoRA (no
second copy of the weights) and a frozen copy otherwise.

Pairs come from files or a data module (offline; e.g. DF-DPO-style ground truth against corrupted videos), or are
built online as in VideoDPO (Liu et al., arXiv 2412.14167): N videos per prompt from the current (or the base)
policy, scored by any ``reward_zoo`` reward, the best against the worst when their score gap clears a threshold,
optionally weighted by that gap. The online pair pool is refreshed every K steps and saved in checkpoints, so a
resumed run continues exactly.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lit_videoalign.backbones.base import Conditioning
from lit_videoalign.objectives.base import AlignmentModule, guarded_scores
from lit_videoalign.schedules.flow import (
    SIGMA_MODES,
    add_noise,
    euler_sample,
    sample_training_sigmas,
    sampling_sigmas,
    velocity_target,
)
from lit_videoalign.schedules.samplers import cfg_velocity
from reward_zoo.base import RewardModel

GENERATORS = ("policy", "reference")


# -- pure losses -----------------------------------------------------------------------------------------------------
def per_sample_mse(pred: Tensor, target: Tensor) -> Tensor:
    """``Tensor[B]``: the mean squared error of each sample over its non-batch elements, in float32."""
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same shape, got {tuple(pred.shape)} and {tuple(target.shape)}")
    return (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)


def implicit_reward_margin(policy_err_w: Tensor, policy_err_l: Tensor, ref_err_w: Tensor, ref_err_l: Tensor,
                           beta: float) -> Tensor:
    """``-beta / 2 * ((policy_err_w - ref_err_w) - (policy_err_l - ref_err_l))`` per pair, ``Tensor[B]``.

    Positive when the policy, relative to the reference, prefers the winner (fits it better than the loser).
    """
    shapes = [tuple(t.shape) for t in (policy_err_w, policy_err_l, ref_err_w, ref_err_l)]
    if len(set(shapes)) != 1 or policy_err_w.ndim != 1:
        raise ValueError(f"the four errors must be Tensor[B] of one shape, got shapes {shapes}")
    if not beta > 0:
        raise ValueError(f"beta must be positive, got {beta}")
    return -beta / 2 * ((policy_err_w - ref_err_w) - (policy_err_l - ref_err_l))


def flow_dpo_loss(policy_err_w: Tensor, policy_err_l: Tensor, ref_err_w: Tensor, ref_err_l: Tensor, beta: float,
                  weights: Tensor | None = None) -> Tensor:
    """Flow-DPO loss, ``mean(-logsigmoid(-beta/2 * ((policy_err_w - ref_err_w) - (policy_err_l - ref_err_l))))``.

    Args:
        policy_err_w: ``Tensor[B]`` policy velocity MSE on the winners.
        policy_err_l: ``Tensor[B]`` policy velocity MSE on the losers.
        ref_err_w: ``Tensor[B]`` reference velocity MSE on the winners.
        ref_err_l: ``Tensor[B]`` reference velocity MSE on the losers.
        beta: strength of the implicit KL regularisation (larger keeps the policy nearer the reference).
        weights: optional ``Tensor[B]`` non-negative pair weights (e.g. VideoDPO's score-gap weights, 0 to mask a
            pair); the loss is then ``sum(w * loss_b) / sum(w)``.

    Returns:
        Scalar loss.
    """
    margin = implicit_reward_margin(policy_err_w, policy_err_l, ref_err_w, ref_err_l, beta)
    per_pair = -F.logsigmoid(margin.float())  # (b,)
    if weights is None:
        return per_pair.mean()
    if weights.shape != per_pair.shape:
        raise ValueError(f"weights must have shape {tuple(per_pair.shape)}, got {tuple(weights.shape)}")
    if (weights < 0).any() or not torch.isfinite(weights).all():
        raise ValueError(f"weights must be finite and non-negative, got {weights.tolist()}")
    total = weights.sum()
    if total <= 0:
        raise ValueError("weights sum to zero: no pair left to learn from")
    return (weights.float() * per_pair).sum() / total.float()


def gap_weights(gaps: Tensor, power: float = 1.0) -> Tensor:
    """VideoDPO-style pair weights from score gaps, ``gap ** power`` (0 for a non-positive gap).

    Only ratios matter: :func:`flow_dpo_loss` normalises the weights by their sum over the batch.
    """
    if not power > 0:
        raise ValueError(f"power must be positive, got {power}")
    return gaps.float().clamp(min=0) ** power


# -- the online pair pool ----------------------------------------------------------------------------------------------
class PairPool:
    """A first-in first-out pool of self-generated pairs: latents on CPU, prompts, score gaps and weights (and each
    pair's conditioning image, image-to-video).

    Args:
        capacity: most pairs kept; adding more drops the oldest.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"pool capacity must be positive, got {capacity}")
        self.capacity = capacity
        self.winners: Tensor | None = None  # (n, c, t, h, w)
        self.losers: Tensor | None = None  # (n, c, t, h, w)
        self.prompts: list[str] = []
        self.gaps = torch.zeros(0)
        self.weights = torch.zeros(0)
        self.images: Tensor | None = None  # (n, 3, h, w), image-to-video

    def __len__(self) -> int:
        return len(self.prompts)

    def add(self, winners: Tensor, losers: Tensor, prompts: list[str], gaps: Tensor, weights: Tensor,
            images: Tensor | None = None) -> None:
        """Append pairs (moved to CPU), with their conditioning ``images`` if any; keep the newest ``capacity``."""
        n = len(prompts)
        if not (winners.shape == losers.shape and winners.shape[0] == n == gaps.numel() == weights.numel()):
            raise ValueError(f"pool.add needs winners and losers of one shape and one prompt, gap and weight per "
                             f"pair; got {tuple(winners.shape)}, {tuple(losers.shape)}, {n} prompts, "
                             f"{gaps.numel()} gaps, {weights.numel()} weights")
        if (images is not None and len(images) != n) or (len(self) and (images is None) != (self.images is None)):
            raise ValueError(f"pool.add needs one image per pair, or none, as the pool holds; got "
                             f"{None if images is None else len(images)} images for {n} pairs")
        if n == 0:
            return
        if images is not None:
            images = images.detach().cpu() if self.images is None else torch.cat([self.images, images.cpu()])
        winners, losers = winners.detach().cpu(), losers.detach().cpu()
        if self.winners is not None:
            if self.winners.shape[1:] != winners.shape[1:]:
                raise ValueError(f"pool holds latents of shape {tuple(self.winners.shape[1:])}, got "
                                 f"{tuple(winners.shape[1:])}")
            winners, losers = torch.cat([self.winners, winners]), torch.cat([self.losers, losers])
        prompts = self.prompts + list(prompts)
        gaps = torch.cat([self.gaps, gaps.detach().float().cpu()])
        weights = torch.cat([self.weights, weights.detach().float().cpu()])
        keep = slice(max(0, len(prompts) - self.capacity), None)
        self.winners, self.losers, self.prompts = winners[keep], losers[keep], prompts[keep]
        self.gaps, self.weights = gaps[keep], weights[keep]
        self.images = images[keep] if images is not None else None

    def sample(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor, list[str], Tensor]:
        """``min(n, len(pool))`` distinct pairs drawn at random: ``(winners, losers, prompts, weights)``."""
        return self.sample_with_images(n, generator)[:4]

    def sample_with_images(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor, list[str], Tensor,
                                                                                Tensor | None]:
        """:meth:`sample` and the pairs' conditioning images (None when the pool holds none)."""
        if len(self) == 0:
            raise RuntimeError("the pair pool is empty")
        idx = torch.randperm(len(self), generator=generator)[:n]
        images = self.images[idx] if self.images is not None else None
        return self.winners[idx], self.losers[idx], [self.prompts[i] for i in idx.tolist()], self.weights[idx], images

    def state_dict(self) -> dict:
        return {"capacity": self.capacity, "winners": self.winners, "losers": self.losers,
                "prompts": list(self.prompts), "gaps": self.gaps, "weights": self.weights, "images": self.images}

    def load_state_dict(self, state: dict) -> None:
        """Restore saved pairs; a smaller ``capacity`` than the saved pool's keeps only the newest pairs."""
        keep = slice(max(0, len(state["prompts"]) - self.capacity), None)
        self.winners = state["winners"][keep] if state["winners"] is not None else None
        self.losers = state["losers"][keep] if state["losers"] is not None else None
        self.prompts = list(state["prompts"])[keep]
        self.gaps, self.weights = state["gaps"][keep], state["weights"][keep]
        self.images = state["images"][keep] if state.get("images") is not None else None


# -- the module --------------------------------------------------------------------------------------------------------
class DPO(AlignmentModule):
    """Flow-DPO on preference pairs, offline (pair batches) or online (prompt batches plus a ``reward``).

    Pair batches take one of two layouts; every video is ``[B, T, C, H, W]`` in ``[0, 1]``, or precomputed latents
    ``[B, C, T', H', W']`` under the ``*_latents`` keys:

    - ``{"prompt", "chosen" | "chosen_latents", "rejected" | "rejected_latents"}``, with optional ``"tie"``
      (``Tensor[B]`` bool), ``"weight"`` (``Tensor[B]``), ``"labels"`` (``{dim: Tensor[B]}`` in ``{+1, 0, -1}``,
      ``+1``: chosen better) and ``"scores"`` (``{"chosen": {dim: Tensor[B]}, "rejected": {...}}``), as served by
      :class:`~lit_videoalign.data.preference.PreferenceDataModule`;
    - ``{"prompt", "video_a", "video_b", "labels"}`` with an optional ``"tie"``, as served by
      :class:`~lit_videoalign.data.toyworld_pairs.ToyWorldPairsDataModule`; ``preference_label`` names the label
      (``+1``: ``video_a`` better, ``-1``: ``video_b`` better).

    Either layout may carry ``"image"`` ``[B, 3, H, W]``, each pair's conditioning image (image-to-video), and so may
    prompt batches, whose candidates are then generated from it.

    Ties (a true ``"tie"`` flag, or label 0 in ``preference_label``) carry no preference: they are dropped from the
    batch before any forward pass and counted in ``train/masked_pairs``; a batch of ties only skips its step.

    Prompt-only batches ``{"prompt": list[str]}`` switch to online pairs and need ``reward``: every ``refresh_every``
    batches (and whenever the pool is empty) the batch's prompts get ``num_candidates`` videos each, sampled with the
    Euler ODE from independent noise by the current policy (``generate_with="policy"``) or the reference; the best
    and the worst of each prompt's videos (by the reward's ``"overall"``) become a pair when their gap exceeds
    ``min_gap``. Each step then trains on ``pairs_per_step`` pairs drawn from the pool.

    Args:
        beta: DPO's beta; with per-element mean errors it must be large (hundreds to thousands).
        sigma_sampling: ``"uniform"`` or ``"logit_normal"`` training sigmas (shared by winner and loser).
        sigma_shift: shift of the training sigmas; None takes the backbone's.
        logit_mean: mean of the logit-normal.
        logit_std: standard deviation of the logit-normal.
        sft_weight: weight of an extra flow-matching (SFT) term on the winners (0 to disable).
        preference_label: the label dimension that says which video wins (``video_a``/``video_b`` batches, or
            ``chosen``/``rejected`` batches that carry ``labels``); None takes ``chosen`` as the winner.
        use_pair_weights: weight pairs by the batch's ``"weight"`` when it has one.
        gap_weighting: weight pairs by their score gap ``gap ** gap_power`` (VideoDPO): online always from the
            reward, offline from the batch's ``"scores"`` in ``score_dimension`` when present.
        gap_power: exponent of the gap weights.
        score_dimension: the score dimension offline gap weights use.
        reward: a ``reward_zoo`` reward (or ``CompositeReward``) that ranks online candidates; also scores validation
            samples of prompt batches.
        num_candidates: videos per prompt when building online pairs.
        refresh_every: batches between pool refreshes.
        min_gap: a pair is kept only if best minus worst exceeds this.
        pool_size: most online pairs kept (oldest dropped first).
        pairs_per_step: pairs drawn from the pool per step; None draws as many as the batch has prompts.
        generate_with: ``"policy"`` (on-policy, current weights) or ``"reference"`` (the base) for online candidates.
        candidate_steps: Euler steps for candidates; None uses ``num_inference_steps``.
        candidate_guidance_scale: guidance for candidates; None uses ``guidance_scale``.
        pool_seed: seed of the generator that draws candidate noise and pool samples (saved in checkpoints).
        **kwargs: :class:`AlignmentModule` arguments (backbone, optimizer, LoRA, sampling).
    """

    requires_reference = True

    def __init__(
        self,
        *args,
        beta: float = 1000.0,
        sigma_sampling: str = "logit_normal",
        sigma_shift: float | None = None,
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        sft_weight: float = 0.0,
        preference_label: str | None = None,
        use_pair_weights: bool = True,
        gap_weighting: bool = False,
        gap_power: float = 1.0,
        score_dimension: str = "overall",
        reward: RewardModel | None = None,
        num_candidates: int = 4,
        refresh_every: int = 1,
        min_gap: float = 0.0,
        pool_size: int = 64,
        pairs_per_step: int | None = None,
        generate_with: str = "policy",
        candidate_steps: int | None = None,
        candidate_guidance_scale: float | None = None,
        pool_seed: int = 0,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        if not beta > 0:
            raise ValueError(f"beta must be positive, got {beta}")
        if sigma_sampling not in SIGMA_MODES:
            raise ValueError(f"sigma_sampling must be one of {list(SIGMA_MODES)}, got {sigma_sampling!r}")
        if sigma_shift is not None and not sigma_shift > 0:
            raise ValueError(f"sigma_shift must be positive, got {sigma_shift}")
        if not sft_weight >= 0:
            raise ValueError(f"sft_weight must be non-negative, got {sft_weight}")
        if not gap_power > 0:
            raise ValueError(f"gap_power must be positive, got {gap_power}")
        if reward is not None and not isinstance(reward, RewardModel):
            raise TypeError(f"reward must be a reward_zoo RewardModel or None, got {type(reward).__name__}")
        if num_candidates < 2:
            raise ValueError(f"num_candidates must be at least 2 to form a best/worst pair, got {num_candidates}")
        if refresh_every < 1 or pool_size < 1:
            raise ValueError(f"refresh_every and pool_size must be positive, got {refresh_every} and {pool_size}")
        if not min_gap >= 0:
            raise ValueError(f"min_gap must be non-negative, got {min_gap}")
        if pairs_per_step is not None and pairs_per_step < 1:
            raise ValueError(f"pairs_per_step must be positive or None, got {pairs_per_step}")
        if generate_with not in GENERATORS:
            raise ValueError(f"generate_with must be one of {list(GENERATORS)}, got {generate_with!r}")
        if candidate_steps is not None and candidate_steps < 1:
            raise ValueError(f"candidate_steps must be positive or None, got {candidate_steps}")
        self.save_hyperparameters(ignore=["backbone", "optimizer", "lr_scheduler", "reward"])
        self.hold_reward(reward)
        self.pool = PairPool(pool_size)
        self.pool_generator = torch.Generator().manual_seed(pool_seed)
        self.online_batches = 0  # prompt batches seen, which schedules pool refreshes

    # -- pairs ----------------------------------------------------------------------------------------------------
    def _latents(self, batch: dict, key: str) -> Tensor:
        if f"{key}_latents" in batch:
            return batch[f"{key}_latents"]
        if key not in batch:
            raise KeyError(f"batch has neither {key!r} nor {key + '_latents'!r}; got keys {sorted(batch)}")
        return self.backbone.encode_videos(batch[key])

    def _label(self, batch: dict, n: int, device: torch.device) -> Tensor:
        """``Tensor[n]`` in ``{+1, 0, -1}``: +1 the first video wins, -1 the second, 0 a tie (masked)."""
        name = self.hparams.preference_label
        if name is None:
            if "video_a" in batch:
                labels = sorted(batch.get("labels", {}))
                raise ValueError(f"the batch holds unordered video_a/video_b pairs; set preference_label to the "
                                 f"label dimension that decides the winner, one of {labels}")
            label = torch.ones(n, dtype=torch.long, device=device)
        else:
            labels = batch.get("labels")
            if not isinstance(labels, dict) or name not in labels:
                found = sorted(labels) if isinstance(labels, dict) else None
                raise KeyError(f"preference_label={name!r} but the batch labels are {found}")
            label = torch.as_tensor(labels[name], device=device).long().sign()
        if "tie" in batch:
            tie = torch.as_tensor(batch["tie"], device=device).bool()
            label = torch.where(tie, torch.zeros_like(label), label)
        return label

    def _weights(self, batch: dict, first_wins: Tensor) -> Tensor | None:
        hp = self.hparams
        weights = None
        if hp.use_pair_weights and "weight" in batch:
            weights = torch.as_tensor(batch["weight"], device=first_wins.device).float()
        scores = batch.get("scores")
        if hp.gap_weighting and isinstance(scores, dict) and "chosen" in scores:
            dim = hp.score_dimension
            if dim not in scores["chosen"] or dim not in scores.get("rejected", {}):
                raise KeyError(f"gap_weighting reads scores[{dim!r}], but the batch scores have dimensions "
                               f"{sorted(scores['chosen'])}")
            s_a = torch.as_tensor(scores["chosen"][dim], device=first_wins.device).float()
            s_b = torch.as_tensor(scores["rejected"][dim], device=first_wins.device).float()
            gap = torch.where(first_wins, s_a - s_b, s_b - s_a)
            g = gap_weights(gap, hp.gap_power)
            weights = g if weights is None else weights * g
        return weights

    def batch_pairs(self, batch: dict) -> tuple[list[str], Tensor, Tensor, Tensor | None, int] | None:
        """``(prompts, x_w, x_l, weights, num_masked)`` of the batch's untied pairs, or None for a prompt batch.

        Latents are ``[N, C, T', H', W']``; ties are dropped here, before any forward pass.
        """
        if "chosen" in batch or "chosen_latents" in batch:
            keys = ("chosen", "rejected")
        elif "video_a" in batch or "video_a_latents" in batch:
            keys = ("video_a", "video_b")
        else:
            return None
        prompts = list(batch["prompt"])
        label = self._label(batch, len(prompts), self.device)
        keep = (label != 0).nonzero().flatten()
        masked = len(prompts) - len(keep)
        if len(keep) == 0:
            return prompts[:0], None, None, None, masked
        first_wins = label[keep] > 0
        weights = self._weights(batch, label > 0)
        weights = weights[keep] if weights is not None else None
        raw = {k: batch.get(k) for k in (*keys, *(f"{k}_latents" for k in keys))}
        if all(raw[f"{k}_latents"] is None for k in keys) and raw[keys[0]] is not None:
            a, b = self.backbone.encode_videos(torch.cat([raw[keys[0]][keep], raw[keys[1]][keep]])).chunk(2)
        else:
            a, b = (self._latents(batch, k)[keep] for k in keys)
        if a.shape[0] != len(keep) or a.shape != b.shape:
            raise ValueError(f"the two videos of each pair must have the same shape, got {tuple(a.shape)} and "
                             f"{tuple(b.shape)}")
        mask = first_wins.view(-1, *([1] * (a.ndim - 1)))
        x_w, x_l = torch.where(mask, a, b), torch.where(mask, b, a)
        return [prompts[i] for i in keep.tolist()], x_w, x_l, weights, masked

    def pair_images(self, batch: dict) -> tuple[Tensor | None, int | None]:
        """The conditioning images of :meth:`batch_pairs`' untied pairs (None without a batch ``"image"``) and the
        frame count of the batch's pixel videos (None for latents: the module's ``num_frames``)."""
        if batch.get("image") is None:
            return None, None
        label = self._label(batch, len(batch["prompt"]), self.device)
        video = next((batch[k] for k in ("chosen", "video_a") if batch.get(k) is not None), None)
        return batch["image"][(label != 0).to(batch["image"].device)], None if video is None else video.shape[1]

    # -- loss -----------------------------------------------------------------------------------------------------
    def pair_loss(self, prompts: list[str], x_w: Tensor, x_l: Tensor, weights: Tensor | None = None,
                  generator: torch.Generator | None = None, images: Tensor | None = None,
                  num_frames: int | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """DPO (plus optional SFT) loss of pairs ``x_w`` over ``x_l`` and the statistics to log.

        Winner and loser share one noise tensor and one sigma per pair, and the pair's conditioning image ``images``
        ``[N, 3, H, W]`` (image-to-video; videos of ``num_frames``, the module's by default); the policy sees both in
        one concatenated batch, and so does the reference (under ``no_grad``).
        """
        hp = self.hparams
        n = x_w.shape[0]
        if len(prompts) != n or x_l.shape != x_w.shape:
            raise ValueError(f"got {len(prompts)} prompts, winners {tuple(x_w.shape)} and losers {tuple(x_l.shape)}; "
                             "expected one prompt per pair and equal shapes")
        cond = self.with_images(self.backbone.encode_prompts(prompts), images, num_frames=num_frames)
        shift = self.backbone.default_sampling_shift if hp.sigma_shift is None else hp.sigma_shift
        sigma = sample_training_sigmas(n, mode=hp.sigma_sampling, shift=shift, generator=generator,
                                       logit_mean=hp.logit_mean, logit_std=hp.logit_std,
                                       sigma_range=self.backbone.training_sigma_range).to(x_w.device)
        noise = torch.randn(x_w.shape, generator=generator, dtype=torch.float32).to(x_w)  # shared by w and l
        x0 = torch.cat([x_w, x_l])  # (2n, c, t, h, w): winners then losers
        noise2, sigma2 = torch.cat([noise, noise]), torch.cat([sigma, sigma])
        cond2 = Conditioning.cat([cond, cond])
        x_t = add_noise(x0, noise2, sigma2)
        target = velocity_target(x0, noise2)
        ref_err_w, ref_err_l = per_sample_mse(self.reference_velocity(x_t, sigma2, cond2), target).chunk(2)
        err_w, err_l = per_sample_mse(self.backbone.predict_velocity(x_t, sigma2, cond2), target).chunk(2)
        if weights is not None:
            weights = weights.to(err_w.device)
        dpo = flow_dpo_loss(err_w, err_l, ref_err_w, ref_err_l, hp.beta, weights=weights)
        loss = dpo
        stats = {"dpo_loss": dpo.detach()}
        if hp.sft_weight > 0:
            w = torch.ones_like(err_w) if weights is None else weights.float()
            sft = (w * err_w).sum() / w.sum()
            loss = loss + hp.sft_weight * sft
            stats["sft_loss"] = sft.detach()
        margin = implicit_reward_margin(err_w, err_l, ref_err_w, ref_err_l, hp.beta).detach()
        stats.update({"reward_margin": margin.mean(), "implicit_acc": (margin > 0).float().mean(),
                      "policy_err_w": err_w.detach().mean(), "policy_err_l": err_l.detach().mean(),
                      "ref_err_w": ref_err_w.mean(), "ref_err_l": ref_err_l.mean()})
        return loss, stats

    # -- online pairs ---------------------------------------------------------------------------------------------
    def _reference_velocity_fn(self, cond: Conditioning, guidance: float) -> Callable[[Tensor, Tensor], Tensor]:
        uncond = None if guidance == 1.0 else self.backbone.encode_prompts([self.hparams.negative_prompt] * len(cond))
        if uncond is not None and cond.images is not None:  # the unconditional branch keeps the image (I2V)
            uncond = uncond.with_images_from(cond)

        def reference(x: Tensor, s: Tensor) -> Tensor:
            if uncond is None:
                return self.reference_velocity(x, s, cond)
            both = Conditioning.cat([cond, uncond])
            v_c, v_u = self.reference_velocity(torch.cat([x, x]), torch.cat([s, s]), both).chunk(2)
            return cfg_velocity(v_c, v_u, guidance)

        return reference

    def score(self, videos: Tensor, prompts: list[str], references: Tensor | None = None) -> dict[str, Tensor] | None:
        """The reward's scores (NaN for samples it cannot score; against the conditioning images ``references``, if
        any), or None if the reward raised."""
        return guarded_scores(self.reward, videos, prompts, "DPO", "no pairs from this batch", fps=self.backbone.fps,
                              references=references)

    @torch.no_grad()
    def build_pairs(self, prompts: list[str], images: Tensor | None = None) -> dict[str, float]:
        """Generate ``num_candidates`` videos per prompt (conditioned on its image of ``images`` ``[N, 3, H, W]``, if
        given), score them, and add best-vs-worst pairs, with their image, to the pool.

        Returns statistics of the refresh (candidates' mean reward, pairs added, their mean gap).
        """
        hp = self.hparams
        k = hp.num_candidates
        was_training = self.training
        self.eval()
        try:
            group = [p for p in prompts for _ in range(k)]
            cond = self.with_images(self.backbone.encode_prompts(group), images, k)
            shape = self.backbone.latent_shape(hp.num_frames, hp.height, hp.width)
            noise = torch.randn((len(group), *shape), generator=self.pool_generator).to(self.device)
            steps = hp.candidate_steps or hp.num_inference_steps
            guidance = hp.guidance_scale if hp.candidate_guidance_scale is None else hp.candidate_guidance_scale
            if hp.generate_with == "policy":  # the policy's own sampler; latents (n * k, c, t, h, w)
                latents = self.sample_latents(noise, cond, num_inference_steps=steps, guidance_scale=guidance)
            else:  # the reference's Euler ODE
                sigmas = sampling_sigmas(steps, shift=self.sampling_shift)
                latents = euler_sample(self._reference_velocity_fn(cond, guidance), noise, sigmas)
            scores = self.score(self.backbone.decode_latents(latents), group, references=cond.images)
        finally:
            self.train(was_training)
        if scores is None:
            return {"new_pairs": 0.0}
        overall = scores["overall"].view(len(prompts), k)  # (n, k)
        valid = torch.isfinite(overall)
        best = torch.where(valid, overall, torch.full_like(overall, -torch.inf)).argmax(1)
        worst = torch.where(valid, overall, torch.full_like(overall, torch.inf)).argmin(1)
        rows = torch.arange(len(prompts), device=overall.device)
        gap = overall[rows, best] - overall[rows, worst]
        keep = (valid.sum(1) >= 2) & torch.isfinite(gap) & (gap > hp.min_gap)
        lat = latents.view(len(prompts), k, *latents.shape[1:])
        idx = keep.nonzero().flatten()
        gaps = gap[idx]
        weights = gap_weights(gaps, hp.gap_power) if hp.gap_weighting else torch.ones_like(gaps)
        self.pool.add(lat[idx, best[idx]], lat[idx, worst[idx]], [prompts[i] for i in idx.tolist()], gaps, weights,
                      None if images is None else images[idx.to(images.device)])
        stats = {f"candidate_reward/{dim}": float(v[torch.isfinite(v)].mean()) for dim, v in scores.items()
                 if torch.isfinite(v).any()}
        stats.update({"new_pairs": float(len(idx)), "masked_candidates": float((~valid).sum())})
        if len(idx):
            stats["new_gap"] = float(gaps.mean())
        return stats

    # -- Lightning hooks ------------------------------------------------------------------------------------------
    def _online_pairs(self, batch: dict) -> tuple[tuple[list[str], Tensor, Tensor, Tensor | None, int],
                                                   Tensor | None] | None:
        """Pairs from the pool (refreshed from the batch's prompts and images as scheduled) and their images."""
        hp = self.hparams
        if self.reward is None:
            raise ValueError(f"the batch holds no preference pairs (keys {sorted(batch)}) and DPO has no reward to "
                             "build pairs online; serve chosen/rejected pairs or pass reward=")
        prompts = list(batch["prompt"])
        if self.online_batches % hp.refresh_every == 0 or len(self.pool) == 0:
            stats = self.build_pairs(prompts, batch.get("image"))
            self.log_dict({f"train/pool/{k}": v for k, v in stats.items()}, batch_size=len(prompts))
        self.online_batches += 1
        self.log("train/pool/size", float(len(self.pool)), batch_size=len(prompts))
        if len(self.pool) == 0:
            return None
        x_w, x_l, pool_prompts, weights, images = self.pool.sample_with_images(hp.pairs_per_step or len(prompts),
                                                                               self.pool_generator)
        weights = weights if hp.gap_weighting else None
        return (pool_prompts, x_w.to(self.device), x_l.to(self.device), weights, 0), images

    @override
    def training_step(self, batch: dict, batch_idx: int) -> Tensor | None:
        pairs = self.batch_pairs(batch)
        if pairs is not None:
            images, frames = self.pair_images(batch)
        else:
            online = self._online_pairs(batch)
            if online is None:
                rank_zero_warn("DPO: no candidate pair cleared min_gap yet; this step is skipped")
                return None
            (pairs, images), frames = online, None
        prompts, x_w, x_l, weights, masked = pairs
        n = max(len(prompts), 1)
        self.log("train/masked_pairs", float(masked), batch_size=n)
        if not prompts:
            return None  # a batch of ties: nothing to prefer
        loss, stats = self.pair_loss(prompts, x_w, x_l, weights, images=images, num_frames=frames)
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        self.log_dict({f"train/{k}": v for k, v in stats.items()}, batch_size=n)
        return loss

    @override
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Pair batches: DPO loss and implicit accuracy with fixed noise; prompt batches: samples scored by reward."""
        pairs = self.batch_pairs(batch)
        if pairs is not None:
            prompts, x_w, x_l, weights, _ = pairs
            if prompts:
                images, frames = self.pair_images(batch)
                loss, stats = self.pair_loss(prompts, x_w, x_l, weights, torch.Generator().manual_seed(batch_idx),
                                             images, frames)
                n = len(prompts)
                self.log("val/loss", loss, prog_bar=True, batch_size=n)
                self.log_dict({f"val/{k}": v for k, v in stats.items()}, batch_size=n)
            return
        if self.reward is None:
            return
        prompts = list(batch["prompt"])
        videos = self.generate(prompts, seeds=[batch_idx * 1000 + i for i in range(len(prompts))],
                               images=batch.get("image"))
        scores = self.score(videos, prompts)
        for dim, values in (scores or {}).items():
            finite = values[torch.isfinite(values)]
            if finite.numel():
                self.log(f"val/reward/{dim}", finite.mean(), batch_size=len(prompts), prog_bar=dim == "overall")

    @override
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["dpo_state"] = {"online_batches": self.online_batches, "pool": self.pool.state_dict(),
                                   "pool_generator": self.pool_generator.get_state()}

    @override
    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("dpo_state")
        if state is None:
            return
        self.online_batches = int(state["online_batches"])
        self.pool.load_state_dict(state["pool"])
        self.pool_generator.set_state(state["pool_generator"])
