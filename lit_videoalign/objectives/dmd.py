"""Distribution matching distillation: DMD (Yin et al., arXiv 2311.18828) and DMD2 (arXiv 2405.14867); CausVid
(arXiv 2412.07772) for video.

A few-step student generator ``G`` is trained so that the distribution of its samples matches the teacher's. The
gradient of the reverse KL between the two, at a noised student sample ``x_t``, is the difference of two scores,
written here with x0 predictions: the *real* score is the frozen teacher with classifier-free guidance, the *fake*
score a critic that keeps tracking the student's current distribution by flow matching on its (detached) samples.
The student moves towards the teacher's prediction and away from the critic's:

    grad = (x0_fake - x0_real) / mean|x0_student - x0_real|,  loss = 0.5 * mse(x0_student, sg(x0_student - grad))

DMD2's additions are options here: the critic is updated several times per generator update (two time-scale rule)
with its own learning rate; backward simulation trains the student on the inputs it meets at inference (run the
student from pure noise to a random one of its steps without gradients, then take that step with gradients); and a
GAN classifier on the critic's last-block features, trained on real videos against student samples. DMD1/CausVid's
regression warm-up on teacher ODE pairs (noise -> teacher sample) is an option too.

Memory: with ``shared_base`` the student and the critic are two peft LoRA adapters over one frozen base and the
teacher is that base with adapters disabled, so the three roles cost one set of base weights.

The pure loss, :func:`~lit_videoalign.objectives.losses.dmd_generator_loss`, lives in ``objectives/losses.py`` (rCM's
regulariser of consistency distillation uses it too); the student's sampler in ``schedules/samplers.py``; the adapter
roles in ``backbones/adapters.py``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn
from typing_extensions import override

from lit_videoalign.backbones.adapters import AdapterRoles, add_named_adapter, guided_velocity
from lit_videoalign.backbones.base import Conditioning
from lit_videoalign.objectives.base import AlignmentModule
from lit_videoalign.objectives.gan import (
    GANHead,
    LastBlockFeatures,
    feature_width,
    gan_discriminator_loss,
    gan_generator_loss,
)
from lit_videoalign.objectives.losses import (  # dmd_generator_loss's old home was here: still importable
    dmd_generator_loss,
    guidance_conditionings,
    negative_conditioning,
)
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
from lit_videoalign.schedules.samplers import (
    SAMPLER_MODES,
    Generators,
    multistep_sample,
    next_sample,
    predicted_x0,
)
from reward_zoo.base import RewardModel


# -- the module --------------------------------------------------------------------------------------------------------
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


class DMD(AlignmentModule):
    """DMD2 distillation of the backbone (teacher) into a few-step student, with manual optimisation.

    Roles: the *student* is the backbone's denoiser (full, or LoRA with ``lora_rank``), so ``generate`` and the
    pipeline export see it. The *teacher* is the frozen initial denoiser: a frozen copy, or the adapter-disabled base
    under LoRA. The *critic* (fake score) starts as a copy of the teacher and is trained the same way as the student
    (full, or its own LoRA). With ``shared_base`` the student and the critic are two LoRA adapters of one frozen base,
    ``"default"`` (the student's, named as in every other objective) and ``"critic"``; the base alone is the teacher.

    Each training batch (``{"prompt": list[str]}``, plus ``"video"`` or ``"latents"`` when the GAN term is on) makes
    ``critic_updates`` critic steps, each on fresh student samples, then one generator step. Lightning's
    ``trainer.global_step`` counts both optimizers' steps, so ``max_steps`` is ``(critic_updates + 1)`` per batch.
    With an ``"image"`` ``(b, 3, h, w)`` in ``[0, 1]`` (image-to-video) the student, the critic, both branches of the
    teacher's guidance and the warm-up's teacher ODE pairs are all conditioned on it.

    Args:
        num_inference_steps: steps ``K`` of the student.
        student_sigmas: the ``K`` decreasing sigmas the student starts its steps from (e.g. ``[1.0, 0.75, 0.5,
            0.25]``); None takes ``K`` steps of the sampling grid (with the sampling shift).
        student_sampler: ``"renoise"`` (DMD2: predict x0, add fresh noise at the next sigma) or ``"euler"``
            (deterministic Euler step of the implied velocity).
        guidance_scale: guidance when sampling the student (1.0: the teacher's guidance is distilled in).
        teacher_guidance_scale: classifier-free guidance of the real score.
        backward_simulation: train on inputs from the student's own earlier steps (one step with gradients); without
            it the whole ``K``-step chain runs with gradients.
        critic_updates: critic steps per generator step (DMD2 uses 5).
        critic_optimizer: optimizer callable of the critic (and GAN head); None uses ``optimizer``.
        shared_base: student and critic as two LoRA adapters over one frozen base (needs ``lora_rank``).
        critic_lora_rank: rank of the critic adapter under ``shared_base`` (default ``lora_rank``).
        dm_sigma_min: smallest sigma of the distribution-matching noise (before the shift).
        dm_sigma_max: largest sigma of the distribution-matching noise (before the shift).
        sigma_shift: shift of the distribution-matching and critic sigmas; None takes the backbone's.
        critic_sigma_sampling: ``"uniform"`` or ``"logit_normal"`` sigmas of the critic's flow-matching loss.
        gan_weight: weight of the generator's GAN loss (0 turns the GAN head off).
        gan_critic_weight: weight of the classifier loss in the critic's update.
        gan_hidden_dim: width of the GAN head's MLP.
        gan_feature_dim: width of the critic's last-block features; None reads it from the denoiser config.
        regression_steps: generator steps of regression onto teacher ODE pairs before distribution matching.
        regression_pairs: teacher ODE pairs generated (from the first training prompts) and reused in the warm-up.
        teacher_steps: Euler steps of the teacher's ODE for the pairs.
        max_grad_norm: gradient clipping of each optimizer step (None to skip).
        reward: optional ``reward_zoo`` reward; validation then logs its scores of the student's samples.
        **kwargs: :class:`AlignmentModule` arguments (backbone, optimizer, lr_scheduler of the generator, LoRA, video
            size, sampling shift).
    """

    def __init__(
        self,
        *args,
        num_inference_steps: int = 4,
        student_sigmas: list[float] | None = None,
        student_sampler: str = "renoise",
        guidance_scale: float = 1.0,
        teacher_guidance_scale: float = 1.0,
        backward_simulation: bool = True,
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
        max_grad_norm: float | None = 1.0,
        reward: RewardModel | None = None,
        **kwargs,
    ) -> None:
        lora_rank = kwargs.get("lora_rank")
        if shared_base and lora_rank is None:
            raise ValueError("shared_base=True puts student and critic adapters on one frozen base: set lora_rank")
        if critic_lora_rank is not None and not shared_base:
            raise ValueError(f"critic_lora_rank={critic_lora_rank} only applies with shared_base=True (otherwise the "
                             "critic is trained like the student)")
        self.requires_reference = lora_rank is None  # the teacher: a frozen copy unless the base is kept under LoRA
        super().__init__(*args, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, **kwargs)
        if student_sigmas is not None:
            s = list(student_sigmas)
            if len(s) != num_inference_steps:
                raise ValueError(f"student_sigmas has {len(s)} values but num_inference_steps={num_inference_steps}; "
                                 "give one starting sigma per student step")
            if not (0 < s[-1] and s[0] <= 1 and all(b < a for a, b in zip(s[:-1], s[1:]))):
                raise ValueError(f"student_sigmas must be strictly decreasing in (0, 1], got {s}")
        if student_sampler not in SAMPLER_MODES:
            raise ValueError(f"student_sampler must be one of {list(SAMPLER_MODES)}, got {student_sampler!r}")
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
        self.save_hyperparameters(ignore=["backbone", "optimizer", "lr_scheduler", "critic_optimizer", "reward"])
        self.automatic_optimization = False
        self.critic_optimizer_fn = critic_optimizer
        self.hold_reward(reward)
        hp = self.hparams

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

    # -- the student's sampler --------------------------------------------------------------------------------------
    def student_grid(self, num_steps: int | None = None) -> Tensor:
        """The student's sigmas, ``K + 1`` values ending at 0."""
        hp = self.hparams
        if num_steps is None and hp.student_sigmas is not None:
            return torch.tensor([*hp.student_sigmas, 0.0], dtype=torch.float32)
        return sampling_sigmas(num_steps or hp.num_inference_steps, shift=self.sampling_shift)

    def student_x0(self, x: Tensor, sigma: Tensor, cond: Conditioning, uncond: Conditioning | None = None,
                   guidance_scale: float = 1.0) -> Tensor:
        """The student's x0 prediction ``x - sigma * v`` (with gradients when enabled)."""
        return predicted_x0(x, self.velocity("student", x, sigma, cond, uncond, guidance_scale), sigma)

    def sample_student(self, cond: Conditioning, noise: Tensor, grad: bool = False) -> Tensor:
        """Student samples for training: with backward simulation from a random step ``j`` (steps ``< j`` without
        gradients), else the full chain; gradients flow only when ``grad``."""
        hp = self.hparams
        grid = self.student_grid().tolist()
        k = len(grid) - 1
        last = int(torch.randint(k, ())) if hp.backward_simulation else k - 1
        x = noise
        for i in range(last + 1):
            with torch.set_grad_enabled(grad and (i == last or not hp.backward_simulation)):
                sigma = torch.full((len(x),), grid[i], device=x.device)
                x0 = self.student_x0(x, sigma, cond)
                if i < last:
                    eps = torch.randn_like(x0) if hp.student_sampler == "renoise" else None
                    x = next_sample(x, x0, grid[i], grid[i + 1], hp.student_sampler, eps)
        return x0

    def _noise(self, n: int) -> Tensor:
        hp = self.hparams
        return torch.randn((n, *self.backbone.latent_shape(hp.num_frames, hp.height, hp.width)), device=self.device)

    # -- losses -----------------------------------------------------------------------------------------------------
    @property
    def sigma_shift(self) -> float:
        return self.backbone.default_sampling_shift if self.hparams.sigma_shift is None else self.hparams.sigma_shift

    def dm_sigmas(self, n: int) -> Tensor:
        """Sigmas of the distribution-matching noise: uniform in ``[dm_sigma_min, dm_sigma_max]``, then shifted."""
        hp = self.hparams
        u = hp.dm_sigma_min + (hp.dm_sigma_max - hp.dm_sigma_min) * torch.rand(n)
        return shift_sigmas(u, self.sigma_shift).to(self.device)

    def real_latents(self, batch: dict) -> Tensor:
        """Real clean latents for the GAN term, from the batch's ``"latents"`` or ``"video"``."""
        if "latents" in batch:
            return batch["latents"]
        if "video" in batch:
            return self.backbone.encode_videos(batch["video"])
        raise ValueError(f"gan_weight={self.hparams.gan_weight} needs real videos in the batch ('video' or 'latents'),"
                         f" got keys {sorted(batch)}; serve videos (e.g. ToyWorldDataModule(prompts_only=False)) or "
                         "set gan_weight: 0")

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

    def generator_loss(self, cond: Conditioning, uncond: Conditioning | None) -> tuple[Tensor, dict]:
        """DMD loss of fresh student samples (with gradients), plus the GAN generator loss when on."""
        hp = self.hparams
        x0 = self.sample_student(cond, self._noise(len(cond)), grad=True)  # (b, c, t, h, w)
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
        hp = self.hparams
        if self._pairs is None or len(self._pairs.prompts) < hp.regression_pairs:
            new = self.teacher_ode(prompts, images)
            self._pairs = new if self._pairs is None else self._pairs.cat(new)
        pairs = self._pairs
        idx = torch.randperm(len(pairs.prompts))[:len(prompts)]
        j = torch.randint(0, pairs.states.shape[1], (len(idx),))
        x = pairs.states[idx, j].to(self.device)
        sigma = self.student_grid()[j].to(self.device)
        cond = self.with_images(self.backbone.encode_prompts([pairs.prompts[i] for i in idx.tolist()]),
                                None if pairs.images is None else pairs.images[idx])
        return F.mse_loss(self.student_x0(x, sigma, cond).float(), pairs.x0[idx].to(self.device).float())

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
        optimizer.step()  # with a NaN or infinite loss or gradients the guard (AlignmentModule) skips it

    @override
    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        hp = self.hparams
        opt_g, opt_c = self.optimizers()
        prompts = list(batch["prompt"])
        n = len(prompts)
        images = batch.get("image")  # (b, 3, h, w) for image-to-video: every role sees it
        cond, uncond = guidance_conditionings(self, prompts, images, hp.teacher_guidance_scale != 1.0)
        real = self.real_latents(batch) if self.gan_head is not None else None

        for _ in range(hp.critic_updates):  # two time-scale: the critic keeps up with the student
            with torch.no_grad():
                x0 = self.sample_student(cond, self._noise(n))
            with self.role("critic"):  # forward and backward with the critic active (gradient checkpointing)
                critic_loss, critic_stats = self.critic_loss(x0, cond, real)
                self._step(opt_c, critic_loss)

        if self.generator_updates < hp.regression_steps:
            loss = self.regression_loss(prompts, images)
            stats = {"regression_loss": loss.detach()}
        else:
            loss, stats = self.generator_loss(cond, uncond)
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
        checkpoint["dmd_state"] = {"generator_updates": self.generator_updates, "ode_pairs": None if pairs is None else
                                   {"states": pairs.states, "x0": pairs.x0, "prompts": list(pairs.prompts),
                                    "images": pairs.images}}

    @override
    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("dmd_state", {})
        self.generator_updates = state.get("generator_updates", 0)
        pairs = state.get("ode_pairs")
        self._pairs = None if pairs is None else ODEPairs(pairs["states"], pairs["x0"], list(pairs["prompts"]),
                                                        pairs.get("images"))

    # -- sampling and evaluation ------------------------------------------------------------------------------------
    @override
    def sample_latents(self, noise: Tensor, cond: Conditioning, *, num_inference_steps: int | None = None,
                       guidance_scale: float | None = None, generator: Generators = None,
                       uncond: Conditioning | None = None, sampler: str | None = None) -> Tensor:
        """The student's few-step sampler (:func:`~lit_videoalign.schedules.samplers.multistep_sample`): its training
        sigmas, or ``num_inference_steps`` steps of the sampling grid when given, with ``student_sampler``
        transitions. One denoiser call per step (two with guidance).

        Args:
            noise: initial latents at sigma 1.
            cond: prompt conditioning (with its conditioning images for image-to-video).
            num_inference_steps: overrides the student's own steps.
            guidance_scale: classifier-free guidance of the student's velocity; None takes the module's.
            generator: the re-noising draws' source: one generator per sample (seeded sampling), one for the batch,
                or None for the global RNG.
            uncond: the negative-prompt conditioning (encoded here when guidance needs it and it is None).
            sampler: accepted for the base's signature and ignored: a student samples with its own sampler (the one it
                was distilled for), whatever the name.
        """
        hp = self.hparams
        scale = hp.guidance_scale if guidance_scale is None else guidance_scale
        if scale != 1.0 and uncond is None:
            uncond = negative_conditioning(self.backbone, hp.negative_prompt, cond)
        elif uncond is not None and cond.images is not None and uncond.images is None:  # it keeps the image (I2V)
            uncond = uncond.with_images_from(cond)
        return multistep_sample(lambda x, s: self.student_x0(x, s, cond, uncond, scale), noise,
                                self.student_grid(num_inference_steps), generator, hp.student_sampler)

    @override
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Few-step samples of held-out prompts (fixed seeds), scored by ``reward`` when one is given."""
        self.validate_with_reward(batch, batch_idx, prog_bar=False)
