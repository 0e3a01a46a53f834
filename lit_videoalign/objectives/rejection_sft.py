"""Reward-filtered self-training (rejection-sampling fine-tuning, RAFT: Dong et al., arXiv 2304.06767; the
verifier-guided self-training of the survey's sections 4.1 and 8.2).

Every ``generate_every`` training steps the model samples ``num_candidates`` videos per prompt, a reward (the
verifier) scores them, and the accepted ones (above a threshold, and/or in the top fraction of their prompt's group)
enter a replay buffer. Every step fine-tunes on a minibatch from the buffer with the flow-matching loss of
:class:`~lit_videoalign.objectives.sft.SFT` (same noise and sigma sampling, prompt dropout for guidance).

Self-training on its own outputs lets a model collapse onto a few samples (the survey's section 8.2). The diversity
guard: at most ``max_per_prompt`` buffer entries per prompt (a newer accepted sample replaces the prompt's oldest),
near-duplicates of an entry of the same prompt (feature distance below ``min_feature_distance``) are rejected, and
the buffer's diversity (mean pairwise feature distance within each prompt) is logged. Features are the video
average-pooled to a coarse grid, so distances are in pixel-intensity units.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from typing_extensions import override

from lit_videoalign.objectives.sft import SFT
from lit_videoalign.schedules.samplers import seeded_noise
from reward_zoo.base import RewardModel

FEATURE_GRID = 8  # videos are pooled to (t, c, 8, 8) for the duplicate check and the diversity log


# -- pure functions --------------------------------------------------------------------------------------------------
def accept_mask(scores: Tensor, group_size: int, threshold: float | None = None,
                top_fraction: float | None = None) -> Tensor:
    """Which samples pass the filter: score ``>= threshold`` and among the ``ceil(top_fraction * k)`` best of their
    group (groups are consecutive runs of ``group_size``); a criterion that is None is not applied.

    Ties at the top-fraction boundary go to the earlier sample.
    """
    if scores.ndim != 1 or group_size < 1 or scores.numel() % group_size:
        raise ValueError(f"scores must be Tensor[N] with N a multiple of group_size={group_size}, "
                         f"got shape {tuple(scores.shape)}")
    keep = torch.ones_like(scores, dtype=torch.bool)
    if threshold is not None:
        keep &= scores >= threshold
    if top_fraction is not None:
        k = max(1, math.ceil(top_fraction * group_size))
        groups = scores.view(-1, group_size)
        order = torch.sort(groups, dim=1, descending=True, stable=True).indices[:, :k]
        top = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, order, True)
        keep &= top.flatten()
    return keep & torch.isfinite(scores)


def video_features(videos: Tensor, grid: int = FEATURE_GRID) -> Tensor:
    """Coarse features of pixel videos ``[B, T, C, H, W]``: each frame average-pooled to ``grid x grid``, flattened."""
    b, t = videos.shape[:2]
    return F.adaptive_avg_pool2d(videos.flatten(0, 1).float(), grid).reshape(b, -1)


def feature_distance(a: Tensor, b: Tensor) -> Tensor:
    """Root-mean-square difference between every row of ``a`` ``[N, D]`` and of ``b`` ``[M, D]``: ``[N, M]``."""
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"features must be [N, D] and [M, D], got {tuple(a.shape)} and {tuple(b.shape)}")
    return torch.cdist(a.float(), b.float()) / math.sqrt(a.shape[1])


# -- the module ------------------------------------------------------------------------------------------------------
class RejectionSFT(SFT):
    """Generate, keep what the reward accepts, fine-tune on it with flow matching, repeat.

    Each training batch is ``{"prompt": list[str]}`` (e.g. ``ToyWorldDataModule(prompts_only=True)``), with
    ``"image"`` ``[B, 3, H, W]`` for an image-to-video model: candidates are generated from it, and each buffer entry
    keeps its image for the fine-tuning. The replay buffer (latents, prompts, scores, features, images) is saved in
    checkpoints and restored on resume.

    Args:
        reward: any ``reward_zoo`` reward or ``CompositeReward`` (the verifier); ``reward_key`` is the score used.
        num_candidates: samples per prompt in each generation round.
        generate_every: training steps between generation rounds (the first step always generates).
        candidate_steps: sampler steps of the candidates; None uses ``num_inference_steps``.
        candidate_guidance_scale: guidance of the candidates; None uses ``guidance_scale``.
        reward_threshold: accept only scores ``>=`` this (for a composite normalised within the batch, a score
            relative to the round's candidates).
        top_fraction: accept only the best ``ceil(top_fraction * num_candidates)`` of each prompt's candidates.
        max_per_prompt: most buffer entries of one prompt; a newer accepted sample replaces its oldest.
        min_feature_distance: reject a sample closer than this (RMS of pooled pixels) to an entry of the same prompt;
            0 disables the check.
        buffer_size: most entries in the buffer; the oldest go first.
        train_batch_size: buffer samples per training step; None uses the prompt batch's size.
        reward_key: which reward score filters.
        **kwargs: :class:`~lit_videoalign.objectives.sft.SFT` arguments (sigma sampling, prompt dropout) and
            :class:`AlignmentModule` arguments (backbone, optimizer, LoRA, sampling).
    """

    def __init__(
        self,
        *args,
        reward: RewardModel,
        num_candidates: int = 4,
        generate_every: int = 4,
        candidate_steps: int | None = None,
        candidate_guidance_scale: float | None = None,
        reward_threshold: float | None = None,
        top_fraction: float | None = 0.25,
        max_per_prompt: int = 2,
        min_feature_distance: float = 0.01,
        buffer_size: int = 256,
        train_batch_size: int | None = None,
        reward_key: str = "overall",
        **kwargs,
    ) -> None:
        if not isinstance(reward, RewardModel):
            raise TypeError(f"reward must be a reward_zoo RewardModel, got {type(reward).__name__}")
        super().__init__(*args, **kwargs)
        if num_candidates < 1 or generate_every < 1 or buffer_size < 1 or max_per_prompt < 1:
            raise ValueError(f"num_candidates, generate_every, buffer_size and max_per_prompt must be positive, got "
                             f"{num_candidates}, {generate_every}, {buffer_size}, {max_per_prompt}")
        if reward_threshold is None and top_fraction is None:
            raise ValueError("give reward_threshold, top_fraction or both: with neither, every sample is accepted")
        if top_fraction is not None and not 0.0 < top_fraction <= 1.0:
            raise ValueError(f"top_fraction must be in (0, 1], got {top_fraction}")
        if min_feature_distance < 0:
            raise ValueError(f"min_feature_distance must be non-negative, got {min_feature_distance}")
        if train_batch_size is not None and train_batch_size < 1:
            raise ValueError(f"train_batch_size must be positive, got {train_batch_size}")
        self.save_hyperparameters(ignore=["backbone", "optimizer", "lr_scheduler", "reward"])
        self.hold_reward(reward)
        self.steps_seen = 0
        self.clear_buffer()

    # -- buffer ---------------------------------------------------------------------------------------------------
    def clear_buffer(self) -> None:
        self.buffer_latents: Tensor | None = None  # (n, c, t, h, w) on CPU
        self.buffer_prompts: list[str] = []
        self.buffer_scores = torch.zeros(0)
        self.buffer_features = torch.zeros(0, 0)
        self.buffer_images: Tensor | None = None  # (n, 3, h, w) on CPU, image-to-video

    @property
    def buffer_len(self) -> int:
        return len(self.buffer_prompts)

    def _append(self, latents: Tensor, prompt: str, score: float, feature: Tensor, image: Tensor | None = None) -> None:
        """Add one entry (with its conditioning ``image`` ``(3, h, w)``, image-to-video), evicting the prompt's oldest
        entry beyond ``max_per_prompt`` and the oldest overall beyond ``buffer_size``."""
        hp = self.hparams
        same = [i for i, p in enumerate(self.buffer_prompts) if p == prompt]
        drop = same[:max(0, len(same) - hp.max_per_prompt + 1)]
        keep = [i for i in range(len(self.buffer_prompts)) if i not in set(drop)]
        keep = keep[max(0, len(keep) - hp.buffer_size + 1):]
        lat = latents.detach().cpu()[None]
        if (image is None) != (self.buffer_images is None) and self.buffer_latents is not None:
            raise ValueError("the replay buffer holds entries with and without conditioning images; train on image "
                             "batches throughout (image-to-video) or on none")
        if self.buffer_latents is None:
            self.buffer_latents, self.buffer_features = lat, feature.cpu()[None]
            self.buffer_images = None if image is None else image.detach().cpu()[None]
        else:
            self.buffer_latents = torch.cat([self.buffer_latents[keep], lat])
            self.buffer_features = torch.cat([self.buffer_features[keep], feature.cpu()[None]])
            if image is not None:
                self.buffer_images = torch.cat([self.buffer_images[keep], image.detach().cpu()[None]])
        self.buffer_prompts = [self.buffer_prompts[i] for i in keep] + [prompt]
        self.buffer_scores = torch.cat([self.buffer_scores[keep], torch.tensor([float(score)])])

    def buffer_diversity(self) -> Tensor:
        """Mean pairwise feature distance between buffer entries of the same prompt (NaN if no prompt has two)."""
        dists = []
        for prompt in set(self.buffer_prompts):
            idx = [i for i, p in enumerate(self.buffer_prompts) if p == prompt]
            if len(idx) > 1:
                d = feature_distance(self.buffer_features[idx], self.buffer_features[idx])
                dists.append(d[torch.triu(torch.ones_like(d, dtype=torch.bool), diagonal=1)])
        return torch.cat(dists).mean() if dists else torch.tensor(float("nan"))

    # -- generation rounds ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def refresh(self, prompts: list[str], images: Tensor | None = None) -> dict[str, Tensor]:
        """Generate ``num_candidates`` per prompt (from its image of ``images`` ``[N, 3, H, W]``, image-to-video),
        filter them and add the accepted ones to the buffer."""
        hp = self.hparams
        k = hp.num_candidates
        group_prompts = [p for p in prompts for _ in range(k)]
        seeds = torch.randint(0, 2**31 - 1, (len(group_prompts),)).tolist()
        latents = self._candidates(group_prompts, seeds, images)
        group_images = None if images is None else images.repeat_interleave(k, dim=0)
        videos = self.backbone.decode_latents(latents)
        groups = [self._score(videos[i:i + k], group_prompts[i:i + k],  # one batch per prompt
                              None if group_images is None else group_images[i:i + k].to(videos.device))
                  for i in range(0, len(group_prompts), k)]
        all_scores = {dim: torch.cat([g[dim] for g in groups]).float().cpu() for dim in groups[0]}
        scores = all_scores[hp.reward_key]
        passed = accept_mask(scores, k, hp.reward_threshold, hp.top_fraction)
        features = video_features(videos).cpu()
        accepted, duplicates = [], 0
        for i in passed.nonzero().flatten().tolist():
            same = [j for j, p in enumerate(self.buffer_prompts) if p == group_prompts[i]]
            if hp.min_feature_distance > 0 and same:
                nearest = feature_distance(features[i:i + 1], self.buffer_features[same]).min()
                if nearest < hp.min_feature_distance:
                    duplicates += 1
                    continue
            self._append(latents[i], group_prompts[i], float(scores[i]), features[i],
                         None if group_images is None else group_images[i])
            accepted.append(i)
        logs = {"train/candidate_reward": scores.mean(),
                "train/accept_rate": torch.tensor(len(accepted) / len(scores)),
                "train/rejected_duplicates": torch.tensor(float(duplicates)),
                "train/buffer_size": torch.tensor(float(self.buffer_len)),
                "train/buffer_diversity": self.buffer_diversity()}
        for dim, values in all_scores.items():  # raw sub-scores too: a batch-normalised overall averages to 0
            logs[f"train/candidates/{dim}"] = values.mean()
            if accepted:
                logs[f"train/accepted/{dim}"] = values[accepted].mean()
        if accepted:
            logs["train/accepted_reward"] = scores[accepted].mean()
        return logs

    def _candidates(self, prompts: list[str], seeds: list[int], images: Tensor | None) -> Tensor:
        """Candidate latents from :meth:`generate` with the policy's training-time sampler (the Euler ODE, as before
        pipeline sampling); with ``images`` (one per ``num_candidates`` prompts) sampled as it samples, conditioned on
        them."""
        hp = self.hparams
        if images is None:
            return self.generate(prompts, seeds, num_inference_steps=hp.candidate_steps,
                                 guidance_scale=hp.candidate_guidance_scale, return_latents=True, sampler="euler")
        was_training = self.training
        self.eval()
        try:
            cond = self.with_images(self.backbone.encode_prompts(prompts), images, hp.num_candidates)
            shape = self.backbone.latent_shape(hp.num_frames, hp.height, hp.width)
            noise, generators = seeded_noise(shape, seeds, self.device)
            return self.sample_latents(noise, cond, num_inference_steps=hp.candidate_steps,
                                       guidance_scale=hp.candidate_guidance_scale, generator=generators,
                                       sampler="euler")
        finally:
            self.train(was_training)

    def _score(self, videos: Tensor, prompts: list[str], references: Tensor | None = None) -> dict[str, Tensor]:
        """The reward's scores (against the conditioning images ``references``, if any); a NaN or infinite score is
        kept (and never accepted) instead of raising."""
        try:
            return self.reward(videos, prompts, references=references, fps=self.backbone.fps)
        except FloatingPointError:
            return self.reward.forward(videos, prompts, references, **self.reward.fps_kwargs(self.backbone.fps))

    # -- Lightning hooks ------------------------------------------------------------------------------------------
    @override
    def training_step(self, batch: dict, batch_idx: int) -> Tensor | None:
        hp = self.hparams
        prompts = list(batch["prompt"])
        if self.steps_seen % hp.generate_every == 0 or self.buffer_len == 0:
            logs = self.refresh(prompts, batch.get("image"))
            self.log_dict({k: v for k, v in logs.items() if torch.isfinite(v)}, batch_size=len(prompts))
        self.steps_seen += 1
        if self.buffer_len == 0:
            return None  # nothing accepted yet: Lightning skips the optimizer step
        n = hp.train_batch_size or len(prompts)
        idx = torch.randint(self.buffer_len, (n,))
        batch = {"latents": self.buffer_latents[idx].to(self.device), "prompt": [self.buffer_prompts[i] for i in idx]}
        if self.buffer_images is not None:
            batch["image"] = self.buffer_images[idx]
        loss = self.loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        return loss

    @override
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Deterministic ODE samples of held-out prompts scored by the reward (prompt-only validation data), or the
        flow-matching loss of :class:`SFT` when the batch has videos."""
        if "video" in batch or "latents" in batch:
            return super().validation_step(batch, batch_idx)
        self.validate_with_reward(batch, batch_idx)

    @override
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["rejection_sft_state"] = {
            "steps_seen": self.steps_seen, "prompts": list(self.buffer_prompts), "scores": self.buffer_scores,
            "features": self.buffer_features, "latents": self.buffer_latents, "images": self.buffer_images}

    @override
    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("rejection_sft_state")
        self.clear_buffer()
        if not state:
            return
        self.steps_seen = int(state["steps_seen"])
        self.buffer_prompts = list(state["prompts"])
        self.buffer_scores, self.buffer_features = state["scores"], state["features"]
        self.buffer_latents, self.buffer_images = state["latents"], state.get("images")
