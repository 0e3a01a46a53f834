"""The distribution-matching machinery that DMD (arXiv 2311.18828, 2405.14867) and Self-Forcing (arXiv 2506.08009)
share, as a mixin of :class:`~lit_videoalign.objectives.base.AlignmentModule`: the three roles over one set of weights
(student, critic as the fake score, frozen teacher as the real score), the critic's flow-matching and GAN losses, the
DMD generator loss on the student's samples, the teacher's ODE pairs for the regression warm-up, and the two-optimizer
training step with its checkpoint state.

A module using it sets up the roles with :meth:`DistributionMatching.setup_roles` in its ``__init__`` and provides
``student_grid``, ``student_x0`` and ``sample_student(cond, noise, grad=False, context=None)``: how its student
generates (few steps of a bidirectional model for DMD, chunk by chunk with a KV cache for Self-Forcing).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from typing_extensions import override

from lit_videoalign.backbones.adapters import AdapterRoles, add_named_adapter, guided_velocity
from lit_videoalign.backbones.base import Conditioning
from lit_videoalign.objectives.gan import (
    GANHead,
    LastBlockFeatures,
    feature_width,
    gan_discriminator_loss,
    gan_generator_loss,
)
from lit_videoalign.objectives.losses import dmd_generator_loss, guidance_conditionings
from lit_videoalign.objectives.sft import flow_matching_loss
from lit_videoalign.schedules.flow import (
    SIGMA_MODES,
    add_noise,
    euler_step,
    sample_training_sigmas,
    sampling_sigmas,
    shift_sigmas,
    velocity_target,
)
from lit_videoalign.schedules.samplers import SAMPLER_MODES, predicted_x0
from reward_zoo.base import RewardModel


@dataclass
class ODEPairs:
    """Teacher ODE trajectories for the regression warm-up, kept on CPU."""

    states: Tensor  # (n, k, c, t, h, w) the teacher's x at each student sigma
    x0: Tensor  # (n, c, t, h, w) the teacher's sample
    prompts: list[str]
    images: Tensor | None = None  # (n, 3, h, w) in [0, 1]: each trajectory's conditioning image (image-to-video)

    def cat(self, other: ODEPairs) -> ODEPairs:
        if (self.images is None) != (other.images is None):
            raise ValueError("cannot mix teacher ODE pairs with and without conditioning images; train on batches "
                             "that all have an 'image' (image-to-video) or none (text-to-video)")
        images = None if self.images is None else torch.cat([self.images, other.images])
        return ODEPairs(torch.cat([self.states, other.states]), torch.cat([self.x0, other.x0]),
                        self.prompts + other.prompts, images)


def check_distillation_args(*, lora_rank: int | None, shared_base: bool, critic_lora_rank: int | None,
                            critic_updates: int, dm_sigma_min: float, dm_sigma_max: float, sigma_shift: float | None,
                            critic_sigma_sampling: str, gan_weight: float, gan_critic_weight: float,
                            teacher_guidance_scale: float, regression_steps: int, regression_pairs: int,
                            teacher_steps: int, reward: RewardModel | None) -> None:
    """Refuse bad distribution-matching settings in one line each, before any weights are copied."""
    if shared_base and lora_rank is None:
        raise ValueError("shared_base=True puts student and critic adapters on one frozen base: set lora_rank")
    if critic_lora_rank is not None and not shared_base:
        raise ValueError(f"critic_lora_rank={critic_lora_rank} only applies with shared_base=True (otherwise the "
                         "critic is trained like the student)")
    if critic_updates < 1:
        raise ValueError(f"critic_updates must be at least 1, got {critic_updates}")
    if not 0 < dm_sigma_min < dm_sigma_max <= 1:
        raise ValueError(f"need 0 < dm_sigma_min < dm_sigma_max <= 1, got {dm_sigma_min}, {dm_sigma_max}")
    if critic_sigma_sampling not in SIGMA_MODES:
        raise ValueError(f"critic_sigma_sampling must be one of {list(SIGMA_MODES)}, got {critic_sigma_sampling!r}")
    if sigma_shift is not None and sigma_shift <= 0:
        raise ValueError(f"sigma_shift must be positive, got {sigma_shift}")
    if gan_weight < 0 or gan_critic_weight < 0 or teacher_guidance_scale < 0:
        raise ValueError(f"need gan_weight, gan_critic_weight, teacher_guidance_scale >= 0, got {gan_weight}, "
                         f"{gan_critic_weight}, {teacher_guidance_scale}")
    if regression_steps < 0 or (regression_steps and regression_pairs < 1) or teacher_steps < 1:
        raise ValueError(f"need regression_steps >= 0, regression_pairs >= 1 (with a warm-up), teacher_steps >= 1; "
                         f"got {regression_steps}, {regression_pairs}, {teacher_steps}")
    if reward is not None and not isinstance(reward, RewardModel):
        raise TypeError(f"reward must be a reward_zoo RewardModel or None, got {type(reward).__name__}")


def check_student(student_sigmas: list[float] | None, num_inference_steps: int, student_sampler: str) -> None:
    """Refuse a student grid that is not one strictly decreasing sigma in (0, 1] per step, or an unknown sampler."""
    if student_sigmas is not None:
        s = list(student_sigmas)
        if len(s) != num_inference_steps:
            raise ValueError(f"student_sigmas has {len(s)} values but num_inference_steps={num_inference_steps}; "
                             "give one starting sigma per student step")
        if not (0 < s[-1] and s[0] <= 1 and all(b < a for a, b in zip(s[:-1], s[1:]))):
            raise ValueError(f"student_sigmas must be strictly decreasing in (0, 1], got {s}")
    if student_sampler not in SAMPLER_MODES:
        raise ValueError(f"student_sampler must be one of {list(SAMPLER_MODES)}, got {student_sampler!r}")


class DistributionMatching:
    """Mixin: the roles, losses and training step of distribution-matching distillation (see the module docstring).

    Reads from ``hparams``: ``teacher_guidance_scale``, ``critic_updates``, ``dm_sigma_min``, ``dm_sigma_max``,
    ``sigma_shift``, ``critic_sigma_sampling``, ``gan_weight``, ``gan_critic_weight``, ``regression_steps``,
    ``regression_pairs``, ``teacher_steps``, ``max_grad_norm`` and the video size.
    """

    state_key = "dmd_state"  # where the checkpoint keeps the generator count and the ODE pairs

    def setup_roles(self, shared_base: bool, critic_lora_rank: int | None, gan_weight: float,
                    gan_feature_dim: int | None, gan_hidden_dim: int) -> None:
        """The critic (a LoRA adapter beside the student's under ``shared_base``, else a copy of the denoiser) and the
        GAN head on its last block's features; call once the student's own LoRA (if any) is attached."""
        hp = self.hparams
        lora_rank = hp.lora_rank
        self.roles: AdapterRoles | None = None
        self.critic: nn.Module | None = None
        if shared_base:  # the student is the base class's LoRA adapter ("default"); the critic a second one
            add_named_adapter(self.backbone, "critic", critic_lora_rank or lora_rank, hp.lora_alpha,
                              hp.lora_target_modules)
            self.roles = AdapterRoles(self.backbone.denoiser, {"default": True, "critic": True}, default="default")
        else:  # a separate critic, trained like the student: full copy, or a copy with its own LoRA adapter
            self.critic = copy.deepcopy(self.backbone.denoiser)

        self.gan_head: GANHead | None = None
        self._critic_tap: LastBlockFeatures | None = None
        if gan_weight > 0:
            critic_module = self.critic if self.critic is not None else self.backbone.denoiser
            self.gan_head = GANHead(gan_feature_dim or feature_width(self.backbone.denoiser), gan_hidden_dim)
            self._critic_tap = LastBlockFeatures(critic_module, self.backbone.block_classes, "critic")
        self.generator_updates = 0
        self._pairs: ODEPairs | None = None

    # -- roles ------------------------------------------------------------------------------------------------------
    @contextmanager
    def role(self, name: str) -> Iterator[nn.Module | None]:
        """Context running ``"student"``, ``"critic"`` or ``"teacher"``; yields the ``denoiser`` argument of
        ``predict_velocity`` (None: the backbone's denoiser in its current adapter state)."""
        if name not in ("student", "critic", "teacher"):
            raise ValueError(f"unknown role {name!r}; expected 'student', 'critic' or 'teacher'")
        if self.roles is not None:
            with self.roles.use({"student": "default", "critic": "critic", "teacher": None}[name]):
                yield None
        elif name == "student":
            yield None
        elif name == "critic":
            yield self.critic
        elif self.backbone.has_lora:
            with self.backbone.adapters_disabled():
                yield None
        else:
            yield self._reference_denoiser

    def student_parameters(self) -> list[nn.Parameter]:
        if self.roles is not None:
            return self.roles.parameters("default")
        return [p for p in self.backbone.denoiser.parameters() if p.requires_grad]

    def critic_parameters(self) -> list[nn.Parameter]:
        params = (self.roles.parameters("critic") if self.roles is not None
                  else [p for p in self.critic.parameters() if p.requires_grad])
        return params + (list(self.gan_head.parameters()) if self.gan_head is not None else [])

    def velocity(self, role: str, x: Tensor, sigma: Tensor, cond: Conditioning, uncond: Conditioning | None = None,
                 guidance_scale: float = 1.0) -> Tensor:
        """Velocity of one role, with classifier-free guidance when ``guidance_scale != 1``."""
        with self.role(role) as denoiser:
            return guided_velocity(self.backbone, x, sigma, cond, uncond, guidance_scale, denoiser=denoiser)

    def critic_features(self, x: Tensor, sigma: Tensor, cond: Conditioning) -> tuple[Tensor, Tensor]:
        """The critic's velocity and its last block's features (for the GAN head)."""
        if self._critic_tap is None:
            raise RuntimeError("critic features need the GAN head (gan_weight > 0)")
        return self._critic_tap.read(lambda: self.velocity("critic", x, sigma, cond))

    def _noise(self, n: int) -> Tensor:
        hp = self.hparams
        return torch.randn((n, *self.backbone.latent_shape(hp.num_frames, hp.height, hp.width)), device=self.device)

    def student_grid(self, num_steps: int | None = None) -> Tensor:
        """The student's sigmas (for a causal student, each chunk's), ``K + 1`` values ending at 0: ``student_sigmas``,
        or ``num_steps`` (default ``num_inference_steps``) steps of the sampling grid."""
        hp = self.hparams
        if num_steps is None and hp.student_sigmas is not None:
            return torch.tensor([*hp.student_sigmas, 0.0], dtype=torch.float32)
        return sampling_sigmas(num_steps or hp.num_inference_steps, shift=self.sampling_shift)

    def student_context(self, batch: dict) -> Tensor | None:
        """What the student's sampler is given besides noise: nothing here (a causal student under teacher forcing
        takes the batch's clean latents)."""
        return None

    # -- losses -----------------------------------------------------------------------------------------------------
    @property
    def sigma_shift(self) -> float:
        return self.backbone.default_sampling_shift if self.hparams.sigma_shift is None else self.hparams.sigma_shift

    def dm_sigmas(self, n: int) -> Tensor:
        """Sigmas of the distribution-matching noise: uniform in ``[dm_sigma_min, dm_sigma_max]``, then shifted."""
        hp = self.hparams
        u = hp.dm_sigma_min + (hp.dm_sigma_max - hp.dm_sigma_min) * torch.rand(n)
        return shift_sigmas(u, self.sigma_shift).to(self.device)

    def real_latents(self, batch: dict, needed_by: str) -> Tensor:
        """Real clean latents from the batch's ``"latents"`` or ``"video"``, for ``needed_by`` (the setting that wants
        them, named in the error when the batch has neither)."""
        if "latents" in batch:
            return batch["latents"]
        if "video" in batch:
            return self.backbone.encode_videos(batch["video"])
        raise ValueError(f"{needed_by} needs real videos in the batch ('video' or 'latents'), got keys {sorted(batch)};"
                         f" serve videos (e.g. ToyWorldDataModule(prompts_only=False)) or change {needed_by}")

    def critic_loss(self, x0: Tensor, cond: Conditioning, real: Tensor | None = None) -> tuple[Tensor, dict]:
        """Flow matching of the critic on (detached) student samples, plus the GAN classifier loss when on."""
        hp = self.hparams
        x0 = x0.detach()
        sigma = sample_training_sigmas(len(x0), mode=hp.critic_sigma_sampling, shift=self.sigma_shift).to(self.device)
        noise = torch.randn_like(x0)
        x_t = add_noise(x0, noise, sigma)
        stats = {}
        if self.gan_head is None:
            v = self.velocity("critic", x_t, sigma, cond)
            return flow_matching_loss(v, velocity_target(x0, noise)), stats
        v, fake_features = self.critic_features(x_t, sigma, cond)
        loss = flow_matching_loss(v, velocity_target(x0, noise))
        if real is None:
            raise ValueError("the GAN classifier needs real latents")
        real_t = add_noise(real.to(x0), torch.randn_like(x0), sigma)
        _, real_features = self.critic_features(real_t, sigma, cond)
        logits_real, logits_fake = self.gan_head(real_features), self.gan_head(fake_features)
        gan = gan_discriminator_loss(logits_real, logits_fake)
        stats = {"gan_critic": gan.detach(), "gan_real_acc": (logits_real > 0).float().mean(),
                 "gan_fake_acc": (logits_fake < 0).float().mean()}
        return loss + hp.gan_critic_weight * gan, stats

    def generator_loss(self, cond: Conditioning, uncond: Conditioning | None,
                       context: Tensor | None = None) -> tuple[Tensor, dict]:
        """DMD loss of fresh student samples (with gradients), plus the GAN generator loss when on; ``context``
        goes to the student's sampler (clean context latents for a teacher-forced causal student)."""
        x0 = self.sample_student(cond, self._noise(len(cond)), grad=True, context=context)  # (b, c, t, h, w)
        return self.dm_loss(x0, cond, uncond)

    def dm_loss(self, x0: Tensor, cond: Conditioning, uncond: Conditioning | None) -> tuple[Tensor, dict]:
        """DMD loss of student samples ``x0`` (with their gradients), plus the GAN generator loss when on."""
        hp = self.hparams
        sigma = self.dm_sigmas(len(x0))
        x_t = add_noise(x0.detach(), torch.randn_like(x0), sigma)
        with torch.no_grad():
            x0_real = predicted_x0(x_t, self.velocity("teacher", x_t, sigma, cond, uncond,
                                                      hp.teacher_guidance_scale), sigma)
            x0_fake = predicted_x0(x_t, self.velocity("critic", x_t, sigma, cond), sigma)
        loss = dmd_generator_loss(x0, x0_real, x0_fake)
        stats = {"dm_loss": loss.detach(), "fake_real_distance": (x0_fake - x0_real).abs().mean()}
        if self.gan_head is not None:
            # The classifier's gradient with respect to the sample, taken through the critic while it is active (a
            # checkpointed backward recomputes blocks with the active adapter), then chained into the student.
            x0_in = x0.detach().requires_grad_(True)
            with self.role("critic"):
                _, features = self.critic_features(add_noise(x0_in, torch.randn_like(x0), sigma), sigma, cond)
                gan = gan_generator_loss(self.gan_head(features))
                (grad_x0,) = torch.autograd.grad(gan, x0_in)
            surrogate = (x0.float() * grad_x0.float()).sum()  # d/dx0 = grad_x0
            loss = loss + hp.gan_weight * (surrogate - surrogate.detach() + gan.detach())
            stats["gan_generator"] = gan.detach()
        return loss, stats

    @torch.no_grad()
    def teacher_ode(self, prompts: list[str], images: Tensor | None = None) -> ODEPairs:
        """Teacher ODE trajectories from fresh noise: states at the student's sigmas and the final sample."""
        hp = self.hparams
        cond, uncond = guidance_conditionings(self, prompts, images, hp.teacher_guidance_scale != 1.0)
        student = self.student_grid()[:-1]
        grid = torch.cat([sampling_sigmas(hp.teacher_steps, shift=self.sampling_shift), student])
        grid = torch.unique(grid).flip(0).tolist()  # decreasing, with every student sigma on it
        wanted = set(student.tolist())
        x = self._noise(len(prompts))
        states = []
        for sigma, sigma_next in zip(grid[:-1], grid[1:]):
            if sigma in wanted:
                states.append(x.cpu())
            s = torch.full((len(x),), sigma, device=x.device)
            v = self.velocity("teacher", x, s, cond, uncond, hp.teacher_guidance_scale)
            x = euler_step(x, v, sigma, sigma_next)
        return ODEPairs(torch.stack(states, 1), x.cpu(), list(prompts), None if images is None else images.cpu())

    def regression_loss(self, prompts: list[str], images: Tensor | None = None) -> Tensor:
        """CausVid's warm-up: from teacher ODE states at a random student step, regress the student onto the
        teacher's sample. Pairs are made from the first training prompts (and images) until ``regression_pairs``
        exist."""
        pairs, idx = self.ode_pairs_for(prompts, images)
        j = torch.randint(0, pairs.states.shape[1], (len(idx),))
        x = pairs.states[idx, j].to(self.device)
        sigma = self.student_grid()[j].to(self.device)
        cond = self.with_images(self.backbone.encode_prompts([pairs.prompts[i] for i in idx.tolist()]),
                                None if pairs.images is None else pairs.images[idx])
        return F.mse_loss(self.student_x0(x, sigma, cond).float(), pairs.x0[idx].to(self.device).float())

    def warmup_loss(self, batch: dict, prompts: list[str], images: Tensor | None = None) -> Tensor:
        """The student's loss during the first ``regression_steps`` batches: the ODE regression here."""
        return self.regression_loss(prompts, images)

    def set_warmup_lr(self, optimizer, warming: bool) -> None:
        """With a ``warmup_lr`` hyperparameter, run the student's optimizer at it during the warm-up and at its own
        learning rate afterwards (kept in each parameter group, so it survives a resume)."""
        warmup_lr = self.hparams.get("warmup_lr")
        if warmup_lr is None:
            return
        for group in optimizer.param_groups:
            group.setdefault("after_warmup_lr", group["lr"])
            group["lr"] = warmup_lr if warming else group["after_warmup_lr"]

    def ode_pairs_for(self, prompts: list[str], images: Tensor | None = None) -> tuple[ODEPairs, Tensor]:
        """The teacher ODE pairs, grown from these prompts (and images) until ``regression_pairs`` exist, and the
        indices of ``len(prompts)`` of them drawn at random for one warm-up step."""
        if self._pairs is None or len(self._pairs.prompts) < self.hparams.regression_pairs:
            new = self.teacher_ode(prompts, images)
            self._pairs = new if self._pairs is None else self._pairs.cat(new)
        return self._pairs, torch.randperm(len(self._pairs.prompts))[:len(prompts)]

    # -- optimisation -----------------------------------------------------------------------------------------------
    @override
    def configure_optimizers(self):
        student, critic = self.student_parameters(), self.critic_parameters()
        if not student or not critic:
            raise RuntimeError(f"no trainable parameters (student: {len(student)}, critic: {len(critic)} tensors)")
        opt_g = self.optimizer_fn(student)
        opt_c = (self.critic_optimizer_fn or self.optimizer_fn)(critic)
        if self.lr_scheduler_fn is None:
            return [opt_g, opt_c]
        return [opt_g, opt_c], [{"scheduler": self.lr_scheduler_fn(opt_g), "interval": "step"}]

    def _step(self, optimizer, loss: Tensor) -> None:
        optimizer.zero_grad()
        self.manual_backward(loss)
        if self.hparams.max_grad_norm is not None:
            self.clip_gradients(optimizer, gradient_clip_val=self.hparams.max_grad_norm,
                                gradient_clip_algorithm="norm")
        optimizer.step()  # with a NaN or infinite loss or gradients the guard of AlignmentModule skips it

    @override
    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        hp = self.hparams
        opt_g, opt_c = self.optimizers()
        prompts = list(batch["prompt"])
        n = len(prompts)
        images = batch.get("image")  # (b, 3, h, w) for image-to-video: every role sees it
        cond, uncond = guidance_conditionings(self, prompts, images, hp.teacher_guidance_scale != 1.0)
        real = self.real_latents(batch, f"gan_weight={hp.gan_weight}") if self.gan_head is not None else None
        context = self.student_context(batch)

        for _ in range(hp.critic_updates):  # two time-scale: the critic keeps up with the student
            with torch.no_grad():
                x0 = self.sample_student(cond, self._noise(n), context=context)
            with self.role("critic"):  # forward and backward with the critic active (gradient checkpointing)
                critic_loss, critic_stats = self.critic_loss(x0, cond, real)
                self._step(opt_c, critic_loss)

        warming = self.generator_updates < hp.regression_steps
        self.set_warmup_lr(opt_g, warming)
        if warming:
            loss = self.warmup_loss(batch, prompts, images)
            stats = {"regression_loss": loss.detach()}
        else:
            loss, stats = self.generator_loss(cond, uncond, context)
        self._step(opt_g, loss)
        self.generator_updates += 1
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()
        self.log_dict({"train/critic_loss": critic_loss.detach(), "train/generator_loss": loss.detach(),
                       **{f"train/{k}": v for k, v in {**stats, **critic_stats}.items()}},
                      prog_bar=False, batch_size=n)
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=n)
        return loss.detach()

    @override
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        pairs = self._pairs
        checkpoint[self.state_key] = {
            "generator_updates": self.generator_updates, "ode_pairs": None if pairs is None else
            {"states": pairs.states, "x0": pairs.x0, "prompts": list(pairs.prompts), "images": pairs.images}}

    @override
    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get(self.state_key, {})
        self.generator_updates = state.get("generator_updates", 0)
        pairs = state.get("ode_pairs")
        self._pairs = None if pairs is None else ODEPairs(pairs["states"], pairs["x0"], list(pairs["prompts"]),
                                                        pairs.get("images"))

