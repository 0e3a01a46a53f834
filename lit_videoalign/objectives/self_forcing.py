"""Self-Forcing (Huang et al., arXiv 2506.08009): a causal, few-step, chunk-by-chunk student distilled from a
bidirectional teacher on its own autoregressive rollouts; CausVid (arXiv 2412.07772) for the initialisation.

A student trained on clean context (teacher forcing) and rolled out on its own outputs meets inputs it never saw and
its errors compound over the video: exposure bias. Self-Forcing trains on exactly what inference does. The student
generates the whole clip chunk by chunk (``chunk_frames`` latent frames each) with a KV cache of its earlier chunks and
``K`` denoising steps per chunk; the finished chunk is fed back, at sigma 0, into the cache for the next. The loss is
distribution matching (DMD) on the whole rollout: the bidirectional teacher is the real score, a critic trained on the
rollouts the fake score. Gradients are truncated: each chunk runs its steps without gradients up to one step chosen at
random (its exit), which runs with gradients and gives the chunk's output, and the cache is updated without gradients.

``context: teacher`` is the teacher-forcing baseline with everything else equal: each chunk is generated against the
cache of the batch's *real* clean chunks instead of the student's own. Before distribution matching,
``regression_steps`` regress the causal student onto the teacher's ODE pairs with an independent student sigma per
chunk (CausVid's initialisation, diffusion-forcing style). Options: the GAN term of DMD2 and a reward term on the
decoded rollout (Reward Forcing style). The causal attention, per-chunk timesteps and KV cache are in
:mod:`lit_videoalign.backbones.causal`; the roles, critic, GAN and warm-up in ``objectives/distribution_matching.py``.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor
from typing_extensions import override

from lit_videoalign.backbones.base import Conditioning
from lit_videoalign.backbones.causal import CausalWan, KVCache
from lit_videoalign.objectives.base import AlignmentModule
from lit_videoalign.objectives.distribution_matching import (
    DistributionMatching,
    check_distillation_args,
    check_student,
)
from lit_videoalign.schedules.flow import sample_training_sigmas, velocity_target
from lit_videoalign.schedules.samplers import Generators, draw_noise, next_sample, predicted_x0
from reward_zoo.base import RewardModel

CONTEXTS = ("self", "teacher")
WARMUPS = ("ode", "diffusion_forcing")


# -- pure parts ------------------------------------------------------------------------------------------------------
def chunk_exit_steps(num_chunks: int, num_steps: int, generator: torch.Generator | None = None) -> list[int]:
    """Self-Forcing's gradient truncation: for each chunk, the one denoising step (of ``num_steps``) that runs with
    gradients and whose x0 prediction is the chunk's output; uniform over the steps."""
    if num_chunks < 1 or num_steps < 1:
        raise ValueError(f"need num_chunks >= 1 and num_steps >= 1, got {num_chunks}, {num_steps}")
    return torch.randint(num_steps, (num_chunks,), generator=generator).tolist()


def diffusion_forcing_sigmas(batch_size: int, num_chunks: int, shift: float = 1.0,
                             generator: torch.Generator | None = None) -> Tensor:
    """Per-chunk flow times of the diffusion-forcing warm-up (Chen et al., arXiv 2407.01392), ``(b, num_chunks)``: a
    clean prefix (sigma 0) of ``m`` chunks, ``m`` uniform in ``[0, num_chunks)``, the context a causal student meets at
    inference; every later chunk at its own logit-normal, shifted sigma, the base's training distribution."""
    if batch_size < 1 or num_chunks < 1:
        raise ValueError(f"need batch_size >= 1 and num_chunks >= 1, got {batch_size}, {num_chunks}")
    sigmas = sample_training_sigmas(batch_size * num_chunks, mode="logit_normal", shift=shift, generator=generator)
    prefix = torch.randint(0, num_chunks, (batch_size, 1), generator=generator)
    clean = torch.arange(num_chunks)[None] < prefix  # (b, chunks)
    return torch.where(clean, 0.0, sigmas.view(batch_size, num_chunks))


def diffusion_forcing_loss(velocity: Tensor, target: Tensor, sigmas: Tensor) -> Tensor:
    """Flow matching over the noisy chunks only: ``velocity``/``target`` (b, c, frames, h, w), ``sigmas`` (b, chunks).
    A clean chunk (sigma 0) is context; its velocity target (the noise) is not in its input, so it carries no loss."""
    b, chunks = sigmas.shape
    if velocity.shape != target.shape or velocity.shape[0] != b or velocity.shape[2] % chunks:
        raise ValueError(f"velocity {tuple(velocity.shape)} and target {tuple(target.shape)} must match, with frames "
                         f"a multiple of the {chunks} chunks of sigmas {tuple(sigmas.shape)}")
    noisy = (sigmas > 0).repeat_interleave(velocity.shape[2] // chunks, dim=1)  # (b, frames)
    if not bool(noisy.any()):
        raise ValueError("every chunk is clean (sigma 0): nothing to regress")
    per_frame = (velocity.float() - target.float()).pow(2).mean(dim=(1, 3, 4))  # (b, frames)
    return per_frame[noisy].mean()


def check_streaming(num_frames: int, chunk_frames: int, window_chunks: int | None, sink_chunks: int) -> None:
    """Refuse, in one line each, a chunk size that does not divide the latent frames, a KV window smaller than one
    chunk, and a frame sink that fills the window."""
    if chunk_frames < 1 or num_frames % chunk_frames:
        raise ValueError(f"chunk_frames={chunk_frames} does not divide the {num_frames} latent frames of the video; "
                         f"expected a divisor of {num_frames}")
    if window_chunks is not None and window_chunks < 1:
        raise ValueError(f"kv_window_chunks={window_chunks}: the KV window must hold at least one chunk")
    if sink_chunks < 0 or (sink_chunks and (window_chunks is None or sink_chunks >= window_chunks)):
        raise ValueError(f"sink_chunks={sink_chunks} must be 0, or smaller than kv_window_chunks={window_chunks} "
                         "(the window holds the sink plus at least one recent chunk)")


# -- the module ------------------------------------------------------------------------------------------------------
class SelfForcing(DistributionMatching, AlignmentModule):
    """Self-Forcing distillation of the backbone (the bidirectional teacher) into a causal few-step student.

    Roles as in :class:`~lit_videoalign.objectives.dmd.DMD`: the student is the backbone's denoiser (full or LoRA)
    run block-causally, the teacher the frozen initial denoiser (a copy, or the adapter-disabled base), the critic a
    copy or, with ``shared_base``, a second adapter. ``generate``, validation and the pipeline export see the student;
    :meth:`stream_latents` generates past the trained length with a rolling KV window (``generate --stream``).

    Args:
        chunk_frames: latent frames per chunk (a multiple of the transformer's temporal patch; it must divide the
            video's latent frames).
        num_inference_steps: denoising steps ``K`` per chunk.
        student_sigmas: the ``K`` decreasing sigmas each chunk starts its steps from; None takes ``K`` steps of the
            sampling grid.
        student_sampler: ``"renoise"`` (predict x0, add fresh noise at the next sigma) or ``"euler"``.
        context: ``"self"`` (Self-Forcing: the cache holds the student's own chunks) or ``"teacher"`` (teacher
            forcing: the batch's real clean chunks, which the batch must then carry as ``"video"`` or ``"latents"``).
        kv_window_chunks: chunks kept in the KV cache when streaming (None: all); ``sink_chunks`` of them are the
            first chunks, kept for good (a frame sink, LongLive).
        warmup: what the first ``regression_steps`` batches train the student with: ``"ode"`` (CausVid: regression
            onto the teacher's ODE pairs, :meth:`regression_loss`) or ``"diffusion_forcing"`` (flow matching on the
            batch's real clips, each chunk at its own noise level after a clean prefix of random length,
            :meth:`diffusion_forcing_loss`; the batch must carry ``"video"`` or ``"latents"``).
        warmup_lr: the student's learning rate during the warm-up (None: its optimizer's own). Turning a bidirectional
            model causal is a bigger change than distribution matching's fine-tuning and wants a larger step.
        regression_clean_context: in the ODE warm-up, give each sample a clean prefix of a random number of chunks
            (the teacher's sample at sigma 0), the context the student has at inference (:meth:`regression_loss`).
        reward_weight: weight of ``-reward`` of the decoded rollout in the student's loss (Reward Forcing style; the
            reward must be differentiable); 0 uses ``reward`` for validation only.
        Others: as :class:`~lit_videoalign.objectives.dmd.DMD` (critic, GAN, warm-up, teacher guidance).
    """

    state_key = "self_forcing_state"

    def __init__(
        self,
        *args,
        chunk_frames: int = 4,
        num_inference_steps: int = 4,
        student_sigmas: list[float] | None = None,
        student_sampler: str = "renoise",
        context: str = "self",
        kv_window_chunks: int | None = None,
        sink_chunks: int = 0,
        teacher_guidance_scale: float = 1.0,
        critic_updates: int = 1,
        critic_optimizer: OptimizerCallable | None = None,
        shared_base: bool = False,
        critic_lora_rank: int | None = None,
        dm_sigma_min: float = 0.02,
        dm_sigma_max: float = 0.98,
        sigma_shift: float | None = None,
        critic_sigma_sampling: str = "logit_normal",
        gan_weight: float = 0.0,
        gan_critic_weight: float = 1.0,
        gan_hidden_dim: int = 256,
        gan_feature_dim: int | None = None,
        regression_steps: int = 0,
        regression_pairs: int = 64,
        teacher_steps: int = 40,
        regression_clean_context: bool = False,
        warmup: str = "ode",
        warmup_lr: float | None = None,
        reward_weight: float = 0.0,
        max_grad_norm: float | None = 1.0,
        reward: RewardModel | None = None,
        **kwargs,
    ) -> None:
        lora_rank = kwargs.get("lora_rank")
        check_distillation_args(lora_rank=lora_rank, shared_base=shared_base, critic_lora_rank=critic_lora_rank,
                                critic_updates=critic_updates, dm_sigma_min=dm_sigma_min, dm_sigma_max=dm_sigma_max,
                                sigma_shift=sigma_shift, critic_sigma_sampling=critic_sigma_sampling,
                                gan_weight=gan_weight, gan_critic_weight=gan_critic_weight,
                                teacher_guidance_scale=teacher_guidance_scale, regression_steps=regression_steps,
                                regression_pairs=regression_pairs, teacher_steps=teacher_steps, reward=reward)
        if context not in CONTEXTS:
            raise ValueError(f"context must be one of {list(CONTEXTS)}, got {context!r}")
        check_student(student_sigmas, num_inference_steps, student_sampler)
        if warmup not in WARMUPS:
            raise ValueError(f"warmup must be one of {list(WARMUPS)}, got {warmup!r}")
        if regression_clean_context and warmup != "ode":
            raise ValueError("regression_clean_context applies to warmup: ode (diffusion forcing always draws a clean "
                             "prefix); drop it or use warmup: ode")
        if warmup_lr is not None and (not warmup_lr > 0 or kwargs.get("lr_scheduler") is not None):
            raise ValueError(f"warmup_lr={warmup_lr} must be positive, and cannot be combined with an lr_scheduler "
                             "(which sets the student's learning rate itself)")
        if reward_weight < 0 or (reward_weight and reward is None):
            raise ValueError(f"reward_weight={reward_weight} must be >= 0, and > 0 needs a reward")
        if reward_weight and not reward.differentiable:
            raise ValueError(f"reward_weight={reward_weight} back-propagates through the reward, but "
                             f"{type(reward).__name__} is not differentiable")
        self.requires_reference = lora_rank is None
        super().__init__(*args, num_inference_steps=num_inference_steps, guidance_scale=1.0, **kwargs)
        hp_frames = self.backbone.latent_shape(self.hparams.num_frames, self.hparams.height, self.hparams.width)[1]
        check_streaming(hp_frames, chunk_frames, kv_window_chunks, sink_chunks)
        if not self.backbone.supports_causal:
            raise ValueError(f"{type(self.backbone).__name__} ({type(self.backbone.denoiser).__name__}) cannot run "
                             "causally (chunk by chunk with a KV cache); Self-Forcing needs a Wan-architecture "
                             "denoiser")
        if self.backbone.supports_images:
            raise ValueError("Self-Forcing of an image-to-video model is not supported yet; use a text-to-video "
                             "backbone")
        self.save_hyperparameters(ignore=["backbone", "optimizer", "lr_scheduler", "critic_optimizer", "reward"])
        self.automatic_optimization = False
        self.critic_optimizer_fn = critic_optimizer
        self.hold_reward(reward)
        self.setup_roles(shared_base, critic_lora_rank, gan_weight, gan_feature_dim, gan_hidden_dim)
        # After the critic and teacher copies: only the student's transformer gets the causal processors (which run
        # bidirectionally outside a causal call, so under shared_base the same weights still serve every role).
        self.causal = CausalWan(self.backbone.denoiser, chunk_frames)

    # -- the student ----------------------------------------------------------------------------------------------
    def _embeds(self, cond: Conditioning) -> Tensor:
        return cond.prompt_embeds.to(self.backbone.denoiser.dtype)

    def chunk_x0(self, x: Tensor, chunk: int, sigma: Tensor, embeds: Tensor, cache: KVCache) -> Tensor:
        """The student's x0 prediction of chunk ``chunk`` at ``sigma`` (b,), attending to ``cache``."""
        with self.role("student"):
            v = self.causal.forward_chunk(x.to(self.backbone.denoiser.dtype), chunk, sigma, embeds, cache)
        return predicted_x0(x, v.to(x.dtype), sigma)

    def _commit(self, x0: Tensor, chunk: int, embeds: Tensor, cache: KVCache) -> None:
        """Append a finished chunk (clean, sigma 0) to the cache, without gradients, as at inference."""
        with torch.no_grad(), self.role("student"):
            zero = torch.zeros(len(x0), device=x0.device)
            self.causal.forward_chunk(x0.to(self.backbone.denoiser.dtype), chunk, zero, embeds, cache,
                                      update_cache=True)

    def student_x0(self, x: Tensor, sigma: Tensor, cond: Conditioning, *args) -> Tensor:
        """The causal student's x0 over the whole clip, every chunk at ``sigma`` (b,) or its own ``(b, chunks)``
        (the regression warm-up)."""
        n = self.causal.num_chunks(x.shape[2])
        sigmas = sigma[:, None].expand(-1, n) if sigma.ndim == 1 else sigma
        with self.role("student"):
            v = self.causal.forward_full(x.to(self.backbone.denoiser.dtype), sigmas, self._embeds(cond))
        return x - self.frame_sigmas(sigmas).to(x.dtype) * v.to(x.dtype)

    def frame_sigmas(self, sigmas: Tensor) -> Tensor:
        """Per-chunk sigmas (b, chunks) as per-frame ones shaped to broadcast against latents: (b, 1, frames, 1, 1)."""
        return sigmas.repeat_interleave(self.hparams.chunk_frames, dim=1)[:, None, :, None, None]

    @override
    def student_context(self, batch: dict) -> Tensor | None:
        """Teacher forcing: the batch's real clean latents; Self-Forcing: none (the student's own chunks)."""
        return self.real_latents(batch, "context='teacher'") if self.hparams.context == "teacher" else None

    def sample_student(self, cond: Conditioning, noise: Tensor, grad: bool = False,
                       context: Tensor | None = None) -> Tensor:
        """A training rollout, chunk by chunk: each chunk's steps up to its random exit step without gradients, the
        exit step with them (when ``grad``), then the chunk (or, with ``context``, the real chunk) into the cache."""
        hp = self.hparams
        grid = self.student_grid().tolist()
        cf, embeds, cache = hp.chunk_frames, self._embeds(cond), KVCache()
        exits = chunk_exit_steps(self.causal.num_chunks(noise.shape[2]), len(grid) - 1)
        out = []
        for j, last in enumerate(exits):
            x = noise[:, :, j * cf:(j + 1) * cf]
            for i in range(last + 1):
                with torch.set_grad_enabled(grad and i == last):
                    x0 = self.chunk_x0(x, j, torch.full((len(x),), grid[i], device=x.device), embeds, cache)
                if i < last:
                    eps = torch.randn_like(x0) if hp.student_sampler == "renoise" else None
                    x = next_sample(x, x0.detach(), grid[i], grid[i + 1], hp.student_sampler, eps)
            out.append(x0)
            if j < len(exits) - 1:  # the last chunk's keys and values would serve no later chunk
                self._commit(x0 if context is None else context[:, :, j * cf:(j + 1) * cf].to(x0), j, embeds, cache)
        return torch.cat(out, dim=2)  # (b, c, frames, h, w)

    # -- losses -----------------------------------------------------------------------------------------------------
    @override
    def generator_loss(self, cond: Conditioning, uncond: Conditioning | None,
                       context: Tensor | None = None) -> tuple[Tensor, dict]:
        """DMD (and GAN) on the rollout, plus ``-reward_weight`` times the reward of the decoded rollout when on
        (its gradient flows through the decoder into the exit steps); samples with a non-finite reward are left out."""
        hp = self.hparams
        x0 = self.sample_student(cond, self._noise(len(cond)), grad=True, context=context)  # (b, c, frames, h, w)
        loss, stats = self.dm_loss(x0, cond, uncond)
        if hp.reward_weight:
            scores = self.reward(self.backbone.decode_latents(x0), self.last_prompts, fps=self.backbone.fps)
            finite = torch.isfinite(scores["overall"])
            if bool(finite.any()):
                reward = scores["overall"][finite].mean()
                loss = loss - hp.reward_weight * reward
                stats["reward"] = reward.detach()
        return loss, stats

    @override
    def regression_loss(self, prompts: list[str], images: Tensor | None = None) -> Tensor:
        """CausVid's initialisation: from the teacher's ODE states, a random student sigma *per chunk*, regress the
        causal student's whole-clip x0 onto the teacher's sample. With ``regression_clean_context`` each sample's first
        ``m`` chunks (``m`` uniform in ``[0, chunks)``) are the teacher's clean sample at sigma 0 instead, so the
        student also learns from the clean context it meets at inference (there the cache holds finished chunks)."""
        pairs, idx = self.ode_pairs_for(prompts, images)
        n, k = len(idx), pairs.states.shape[1]
        chunks = self.causal.num_chunks(pairs.states.shape[3])
        j = torch.randint(0, k, (n, chunks))  # (b, chunks) student steps
        if self.hparams.regression_clean_context:  # step k of the grid is sigma 0: the clean sample itself
            prefix = torch.randint(0, chunks, (n, 1))
            j = torch.where(torch.arange(chunks)[None] < prefix, k, j)
        per_frame = j.repeat_interleave(self.hparams.chunk_frames, dim=1)  # (b, frames)
        states = torch.cat([pairs.states[idx], pairs.x0[idx][:, None]], dim=1)  # (b, k + 1, c, frames, h, w)
        x = torch.stack([states[b, per_frame[b], :, torch.arange(per_frame.shape[1])] for b in range(n)])
        x = x.permute(0, 2, 1, 3, 4).to(self.device)  # (b, frames, c, h, w) -> (b, c, frames, h, w)
        sigma = self.student_grid()[j].to(self.device)  # (b, chunks)
        cond = self.backbone.encode_prompts([pairs.prompts[i] for i in idx.tolist()])
        return F.mse_loss(self.student_x0(x, sigma, cond).float(), pairs.x0[idx].to(self.device).float())

    @override
    def warmup_loss(self, batch: dict, prompts: list[str], images: Tensor | None = None) -> Tensor:
        if self.hparams.warmup == "ode":
            return self.regression_loss(prompts, images)
        return self.diffusion_forcing_loss(batch, prompts)

    def diffusion_forcing_loss(self, batch: dict, prompts: list[str]) -> Tensor:
        """Diffusion forcing (arXiv 2407.01392) of the causal student on the batch's real clips: a clean prefix of
        random length, every later chunk noised to its own sigma (:func:`diffusion_forcing_sigmas`), flow matching on
        the noisy chunks. It teaches the causal model to continue real context, which the ODE pairs teach slowly."""
        x0 = self.real_latents(batch, "warmup='diffusion_forcing'").float()  # (b, c, frames, h, w)
        sigmas = diffusion_forcing_sigmas(len(x0), self.causal.num_chunks(x0.shape[2]), self.sigma_shift)
        sigmas = sigmas.to(self.device)  # (b, chunks)
        per_frame = self.frame_sigmas(sigmas).to(x0.dtype)
        noise = torch.randn_like(x0)
        x_t = (1 - per_frame) * x0 + per_frame * noise
        cond = self.backbone.encode_prompts(prompts)
        with self.role("student"):
            v = self.causal.forward_full(x_t.to(self.backbone.denoiser.dtype), sigmas, self._embeds(cond))
        return diffusion_forcing_loss(v, velocity_target(x0, noise), sigmas)

    @override
    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        self.last_prompts = list(batch["prompt"])  # the reward term scores the rollout against them
        return super().training_step(batch, batch_idx)

    # -- sampling ---------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def stream_latents(self, noise: Tensor, cond: Conditioning, *, num_inference_steps: int | None = None,
                       generator: Generators = None, window_chunks: int | None = None,
                       sink_chunks: int | None = None) -> Iterator[Tensor]:
        """Yield the student's chunks ``(b, c, chunk_frames, h, w)`` one by one as they are finished, for a video as
        long as ``noise`` (any multiple of ``chunk_frames``, also past the trained length): each chunk's
        ``num_inference_steps`` steps against a KV cache of at most ``window_chunks`` chunks (the module's
        ``kv_window_chunks`` by default), ``sink_chunks`` of them the first ones."""
        hp = self.hparams
        window = hp.kv_window_chunks if window_chunks is None else window_chunks
        sink = hp.sink_chunks if sink_chunks is None else sink_chunks
        check_streaming(noise.shape[2], hp.chunk_frames, window, sink)
        grid, cf = self.student_grid(num_inference_steps).tolist(), hp.chunk_frames
        embeds, cache = self._embeds(cond), KVCache(window, sink)
        for j in range(noise.shape[2] // cf):
            x = noise[:, :, j * cf:(j + 1) * cf]
            for i in range(len(grid) - 1):
                x0 = self.chunk_x0(x, j, torch.full((len(x),), grid[i], device=x.device), embeds, cache)
                if i < len(grid) - 2:
                    eps = draw_noise(x0, generator) if hp.student_sampler == "renoise" else None
                    x = next_sample(x, x0, grid[i], grid[i + 1], hp.student_sampler, eps)
            if j < noise.shape[2] // cf - 1:  # the last chunk's keys and values would serve no later chunk
                self._commit(x0, j, embeds, cache)
            yield x0

    @override
    def sample_latents(self, noise: Tensor, cond: Conditioning, *, num_inference_steps: int | None = None,
                       guidance_scale: float | None = None, generator: Generators = None,
                       uncond: Conditioning | None = None, sampler: str | None = None) -> Tensor:
        """The causal student's chunk-by-chunk sampler (:meth:`stream_latents`), whole. ``sampler`` is ignored (a
        student samples with its own); guidance is distilled in, so ``guidance_scale`` must be 1 or None."""
        if guidance_scale not in (None, 1.0):
            raise ValueError(f"guidance_scale={guidance_scale}: the causal student samples without classifier-free "
                             "guidance (the teacher's is distilled in); use 1.0")
        if cond.images is not None:
            raise ValueError("the causal student is text-to-video; it cannot be conditioned on images")
        return torch.cat(list(self.stream_latents(noise, cond, num_inference_steps=num_inference_steps,
                                                  generator=generator)), dim=2)

    @override
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Chunk-by-chunk samples of held-out prompts (fixed seeds), scored by ``reward`` when one is given."""
        self.validate_with_reward(batch, batch_idx, prog_bar=False)
