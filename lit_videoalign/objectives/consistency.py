"""Latent consistency distillation (LCM, Luo et al., arXiv 2310.04378; consistency models, arXiv 2303.01469) for flows.

A consistency function ``f(x_sigma, sigma)`` maps every point of the teacher's probability-flow ODE trajectory to its
end ``x0``. It is learnt by distillation: draw ``x_sigma`` at a point ``sigma_n`` of a discretised schedule, take one
Euler step of the teacher (with classifier-free guidance) to ``sigma_{n+k}``, and regress the student's ``f`` at
``(x_sigma, sigma_n)`` onto an EMA copy of the student evaluated at the teacher's next point, with a pseudo-Huber or
L2 loss. The EMA target and the boundary condition ``f(x, 0) = x`` anchor the recursion at the data end.

Boundary-condition parameterisation, ``x0 = c_skip(sigma) * x + c_out(sigma) * F``:

- ``"flow"`` (default): ``F`` is the network's velocity, ``c_skip = 1``, ``c_out = -sigma``, i.e. the flow model's own
  x0 prediction ``x - sigma * v``. It holds the boundary exactly (``c_out(0) = 0``), needs no new constants, and the
  student stays a plain velocity model, so its exported pipeline loads and samples like any other.
- ``"lcm"``: ``F = x - sigma * v`` and LCM's ``c_skip = s_d^2 / (t^2 + s_d^2)``, ``c_out = t / sqrt(t^2 + s_d^2)``
  with ``t = timestep_scaling * 1000 * sigma`` (the diffusers timestep, scaled); also exact at ``sigma = 0``.

The student samples in a few steps (multistep consistency sampling): predict ``x0``, re-noise it to the next sigma
with fresh noise, repeat.

Phased consistency (``phased=True``; multistep consistency models, Heek et al., arXiv 2403.06807; PCM, arXiv
2405.18407): the student's sampling grid cuts the trajectory into phases, and the student maps each point to the *end
of its phase* instead of to ``x0``, ``x_end = x + (sigma_end - sigma) * v``: the boundary condition holds exactly at
every phase end, and sampling is deterministic, one Euler step per phase: the student is a plain flow model sampled
by the generic Euler sampler on its grid (a diffusers scheduler must be given the same sigmas, as its own 4-step grid
differs).

Adversarial term (``gan_weight > 0``; PCM's adversarial consistency loss, in DMD2's form): a small head on the
frozen teacher's last-block features learns to tell the teacher's own points at a phase end (from
``teacher_trajectories``) from the student's predictions of them, and the student is pushed (through the frozen
teacher) towards the teacher's distribution: a regression target is matched on average, the classifier rewards being
on the teacher's distribution.

Score regulariser (``dmd_weight > 0``; rCM, Zheng et al., arXiv 2510.08431): consistency distillation matches the
teacher's trajectories point by point, and small errors of the early phases compound along the student's own chain.
rCM adds DMD's reverse-divergence loss (:func:`lit_videoalign.objectives.losses.dmd_generator_loss`) on the student's
own few-step samples: the frozen, guided teacher is the real score and a critic, trained by flow matching on the same
samples in the same optimizer step, the fake one. On the toy world it turns the phased student from 0.63 logits of
the learned physics judge below the 40-step teacher to 0.70 above it.

Training points come from the batch's videos when it has them (LCM's setting) or, for prompt-only data, from the EMA
student's own few-step samples re-noised to ``sigma_n``. With ``teacher_trajectories`` they are instead points of
cached teacher ODE trajectories (with its guidance) and the teacher's step is its own ``k``-step solution: a guided
teacher's trajectories leave the forward process's marginals, so noised data are not where a few-step sampler lands,
and with ``k`` spanning a phase the target is the teacher's own point at the phase end, with no bootstrapping.

Layout: the method and its pure losses are here; its options (the trajectory cache, the adversarial term, the score
regulariser) are parts in ``objectives/consistency_parts.py``; the few-step sampler is in ``schedules/samplers.py``;
the adapter roles and the weight EMA in ``backbones/adapters.py``.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from typing_extensions import override

# The adapter, sampler and EMA helpers moved to backbones/adapters.py and schedules/samplers.py; their names stay
# importable from here for one release.
from lit_videoalign.backbones.adapters import (  # noqa: F401
    AdapterRoles,
    add_named_adapter,
    checkpointing_off,
    ema_update,
    guided_velocity,
)
from lit_videoalign.backbones.base import Conditioning
from lit_videoalign.objectives.base import AlignmentModule
from lit_videoalign.objectives.consistency_parts import (
    AdversarialTerm,
    ScoreRegularizer,
    TeacherTrajectories,
    TrajectoryPoints,
)
from lit_videoalign.objectives.gan import GANHead, LastBlockFeatures, feature_width
from lit_videoalign.objectives.losses import guidance_conditionings, negative_conditioning
from lit_videoalign.schedules.flow import add_noise, euler_sample, euler_step, sampling_sigmas
from lit_videoalign.schedules.samplers import (  # noqa: F401
    SAMPLER_MODES,
    Generators,
    draw_noise,
    multistep_sample,
    next_sample,
    per_sample_sigma,
    predicted_x0,
    seeded_noise,
)
from reward_zoo.base import RewardModel

PARAMETERIZATIONS = ("flow", "lcm")
LOSS_TYPES = ("huber", "l2")


# -- pure functions ----------------------------------------------------------------------------------------------------
def boundary_coefficients(sigma: Tensor, parameterization: str = "flow", sigma_data: float = 0.5,
                          timestep_scaling: float = 10.0) -> tuple[Tensor, Tensor]:
    """``(c_skip, c_out)`` of ``x0 = c_skip * x + c_out * F``, with ``c_skip(0) = 1`` and ``c_out(0) = 0`` exactly.

    Args:
        sigma: flow time(s) in ``[0, 1]``.
        parameterization: ``"flow"`` (``c_skip = 1``, ``c_out = -sigma``, ``F`` the velocity) or ``"lcm"`` (LCM's
            coefficients at diffusers timestep ``1000 * sigma``, ``F`` the x0 prediction ``x - sigma * v``).
        sigma_data: LCM's data standard deviation.
        timestep_scaling: LCM's timestep scaling (10 sharpens the switch from ``F`` to ``x`` near ``sigma = 0``).
    """
    sigma = torch.as_tensor(sigma, dtype=torch.float32)
    if parameterization == "flow":
        return torch.ones_like(sigma), -sigma
    if parameterization == "lcm":
        t = timestep_scaling * 1000.0 * sigma
        return sigma_data**2 / (t**2 + sigma_data**2), t / torch.sqrt(t**2 + sigma_data**2)
    raise ValueError(f"parameterization must be one of {list(PARAMETERIZATIONS)}, got {parameterization!r}")


def consistency_x0(x: Tensor, velocity: Tensor, sigma: float | Tensor, parameterization: str = "flow",
                   sigma_data: float = 0.5, timestep_scaling: float = 10.0) -> Tensor:
    """The consistency function's output ``c_skip * x + c_out * F`` from a velocity prediction at ``(x, sigma)``.

    Args:
        x: ``[B, ...]`` noisy latents at ``sigma``.
        velocity: ``[B, ...]`` the network's velocity prediction.
        sigma: float or ``Tensor[B]``.
        parameterization: see :func:`boundary_coefficients`.
        sigma_data: LCM's data standard deviation (``"lcm"`` only).
        timestep_scaling: LCM's timestep scaling (``"lcm"`` only).

    Returns:
        ``[B, ...]`` the predicted clean latents, equal to ``x`` at ``sigma = 0`` whatever the velocity.
    """
    if x.shape != velocity.shape:
        raise ValueError(f"x and velocity must have the same shape, got {tuple(x.shape)} and {tuple(velocity.shape)}")
    if parameterization == "flow":  # c_skip = 1, c_out = -sigma: the flow model's own x0 prediction
        return predicted_x0(x, velocity, sigma)
    c_skip, c_out = boundary_coefficients(per_sample_sigma(sigma, x), parameterization, sigma_data, timestep_scaling)
    return c_skip.to(x.dtype) * x + c_out.to(x.dtype) * predicted_x0(x, velocity, sigma)


def consistency_loss(pred: Tensor, target: Tensor, loss_type: str = "huber", huber_c: float = 1e-3) -> Tensor:
    """Distance between the student's and the target's x0, averaged over all elements (scalar).

    ``"huber"`` is LCM's pseudo-Huber ``sqrt((pred - target)^2 + c^2) - c`` per element; ``"l2"`` the squared error.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same shape, got {tuple(pred.shape)} and {tuple(target.shape)}")
    diff = pred.float() - target.float()
    if loss_type == "l2":
        return diff.pow(2).mean()
    if loss_type == "huber":
        if huber_c <= 0:
            raise ValueError(f"huber_c must be positive, got {huber_c}")
        return (torch.sqrt(diff.pow(2) + huber_c**2) - huber_c).mean()
    raise ValueError(f"loss_type must be one of {list(LOSS_TYPES)}, got {loss_type!r}")


def phase_ends(sigma: Tensor, boundaries: Tensor, atol: float = 1e-6) -> Tensor:
    """For each ``sigma``, the end of its phase: the largest of ``boundaries`` below it (phased consistency).

    Args:
        sigma: ``Tensor[B]`` flow times in ``(0, 1]``.
        boundaries: the sampler's decreasing grid ending at 0, e.g. ``[1.0, 0.9, 0.75, 0.5, 0.0]``.
        atol: a boundary within ``atol`` of ``sigma`` counts as ``sigma`` itself (a phase's start), not its end.

    Returns:
        ``Tensor[B]``: the phase ends (0 for points of the last phase).
    """
    if boundaries.ndim != 1 or len(boundaries) < 2 or boundaries[-1] != 0:
        raise ValueError(f"boundaries must be a 1-D decreasing grid ending at 0, got {boundaries.tolist()}")
    if sigma.ndim != 1 or bool((sigma <= atol).any()):
        raise ValueError(f"sigma must be Tensor[B] of flow times above 0, got {sigma.tolist()}")
    below = boundaries.view(1, -1) < (sigma.view(-1, 1) - atol)  # (b, n): boundaries strictly below each sigma
    return torch.where(below, boundaries.view(1, -1), torch.zeros_like(boundaries).view(1, -1)).amax(dim=1)


# -- the module --------------------------------------------------------------------------------------------------------
class ConsistencyDistillation(TeacherTrajectories, AdversarialTerm, ScoreRegularizer, AlignmentModule):
    """Multistep latent consistency distillation of the backbone (teacher) into a few-step student.

    The student starts as a copy of the teacher: the backbone's denoiser itself, fully or through LoRA. The teacher
    is the frozen initial denoiser (the adapter-disabled base under LoRA, a frozen copy otherwise). The EMA target is
    a frozen copy of the denoiser, or under LoRA a second, frozen ``"ema"`` adapter over the same base, so teacher,
    student and target then share one set of base weights. The EMA weights are part of the module's state, so they
    are saved in and restored from checkpoints.

    Batches are ``{"prompt": list[str]}``, optionally with ``"video"`` (``[B, T, C, H, W]`` in ``[0, 1]``) or
    ``"latents"``; with videos the training points are noised data, without them the EMA student's samples. With an
    ``"image"`` ``(B, 3, H, W)`` in ``[0, 1]`` (image-to-video) the student, the teacher (both branches of its
    guidance), the EMA target, the critic and the cached teacher trajectories are all conditioned on it.

    Args:
        num_timesteps: points ``N`` of the discretised schedule (the teacher's sampling grid, with the sampling shift).
        skip_steps: ``k``: the teacher's Euler step goes from ``sigma_n`` to ``sigma_{n+k}``.
        teacher_guidance_scale: classifier-free guidance of the teacher's step (distilled into the student).
        ema_decay: decay of the target network's EMA (LCM uses 0.95).
        loss_type: ``"huber"`` (pseudo-Huber) or ``"l2"``.
        huber_c: the pseudo-Huber ``c``.
        parameterization: ``"flow"`` or ``"lcm"``, see the module docstring.
        sigma_data: LCM's data standard deviation (``"lcm"`` only).
        timestep_scaling: LCM's timestep scaling (``"lcm"`` only).
        phased: map each point to the end of its phase of the student's grid rather than to ``x0`` and sample with
            deterministic Euler steps (see the module docstring); needs ``parameterization="flow"``.
        teacher_trajectories: train on points of this many cached teacher ODE trajectories (sampled on the
            schedule with the teacher's guidance, from the first training prompts, as DMD's regression pairs) rather
            than on noised clean latents; 0 keeps LCM's noised training points. Phased, the student's grid must lie on
            the schedule (``num_timesteps`` a multiple of ``num_inference_steps``).
        points_per_trajectory: training pairs ``(x_n, x_{n+k})`` kept from each cached trajectory.
        trajectory_every: once the cache is full, a new batch of trajectories replaces the oldest every this many
            training steps (0: the cache is made once).
        on_policy: each phase of a cached trajectory starts where the *student's* own step from the previous phase
            start landed, and the teacher solves the phase from there (DAgger: the teacher corrects the student on
            the inputs its sampler meets rather than only on the teacher's own); needs ``phased``.
        gan_weight: weight of the adversarial term (0: off); needs ``phased`` and ``teacher_trajectories``.
        gan_hidden_dim: width of the classifier head's MLP.
        gan_lr: learning rate of the classifier head (None: the optimizer's own).
        dmd_weight: weight of rCM's score regulariser (0: off): DMD's distribution-matching loss on the student's
            own few-step samples, with the frozen teacher (with its guidance) as the real score and a critic, a copy
            of the teacher (its own LoRA adapter under LoRA) trained by flow matching on those samples, as the fake
            one.
        critic_lr: learning rate of the critic (None: the optimizer's own); a faster critic tracks the student.
        dm_sigma_min: smallest sigma of the distribution-matching noise (before the sampling shift).
        dm_sigma_max: largest sigma of the distribution-matching noise (before the sampling shift).
        reward: optional ``reward_zoo`` reward; validation then logs its scores of the student's samples.
        num_inference_steps: steps of the student's sampler (``generate`` and data-free training points).
        guidance_scale: guidance when sampling the student (1.0: the teacher's guidance is distilled in).
        **kwargs: :class:`AlignmentModule` arguments (backbone, optimizer, LoRA, video size, shift).
    """

    def __init__(
        self,
        *args,
        num_timesteps: int = 40,
        skip_steps: int = 1,
        teacher_guidance_scale: float = 1.0,
        ema_decay: float = 0.95,
        loss_type: str = "huber",
        huber_c: float = 1e-3,
        parameterization: str = "flow",
        sigma_data: float = 0.5,
        timestep_scaling: float = 10.0,
        phased: bool = False,
        teacher_trajectories: int = 0,
        points_per_trajectory: int = 4,
        trajectory_every: int = 0,
        on_policy: bool = False,
        gan_weight: float = 0.0,
        gan_hidden_dim: int = 256,
        gan_lr: float | None = None,
        dmd_weight: float = 0.0,
        critic_lr: float | None = None,
        dm_sigma_min: float = 0.02,
        dm_sigma_max: float = 0.98,
        reward: RewardModel | None = None,
        num_inference_steps: int = 4,
        guidance_scale: float = 1.0,
        **kwargs,
    ) -> None:
        self.requires_reference = kwargs.get("lora_rank") is None  # the teacher: a frozen copy unless LoRA
        super().__init__(*args, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, **kwargs)
        if num_timesteps < 1 or not 1 <= skip_steps <= num_timesteps:
            raise ValueError(f"need num_timesteps >= 1 and 1 <= skip_steps <= num_timesteps, got num_timesteps="
                             f"{num_timesteps}, skip_steps={skip_steps}")
        if not 0.0 <= ema_decay <= 1.0:
            raise ValueError(f"ema_decay must be in [0, 1], got {ema_decay}")
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {list(LOSS_TYPES)}, got {loss_type!r}")
        if parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"parameterization must be one of {list(PARAMETERIZATIONS)}, got {parameterization!r}")
        if phased and parameterization != "flow":
            raise ValueError(f"phased consistency maps to phase ends with the velocity, so it needs "
                             f"parameterization='flow', got {parameterization!r}")
        if huber_c <= 0 or teacher_guidance_scale < 0:
            raise ValueError(f"need huber_c > 0 and teacher_guidance_scale >= 0, got {huber_c}, "
                             f"{teacher_guidance_scale}")
        if teacher_trajectories < 0 or points_per_trajectory < 1:
            raise ValueError(f"need teacher_trajectories >= 0 and points_per_trajectory >= 1, got "
                             f"{teacher_trajectories}, {points_per_trajectory}")
        if trajectory_every < 0 or (on_policy and not (phased and teacher_trajectories)):
            raise ValueError(f"need trajectory_every >= 0, and on_policy needs phased=True and teacher_trajectories > "
                             f"0; got trajectory_every={trajectory_every}, on_policy={on_policy}, phased={phased}, "
                             f"teacher_trajectories={teacher_trajectories}")
        if gan_weight < 0 or (gan_weight > 0 and not (phased and teacher_trajectories)):
            raise ValueError(f"gan_weight must be >= 0, and > 0 needs phased=True and teacher_trajectories > 0 (its "
                             f"real samples are the teacher's points at phase ends); got gan_weight={gan_weight}, "
                             f"phased={phased}, teacher_trajectories={teacher_trajectories}")
        if dmd_weight < 0 or not 0 < dm_sigma_min < dm_sigma_max <= 1 or (critic_lr is not None and critic_lr <= 0):
            raise ValueError(f"need dmd_weight >= 0, 0 < dm_sigma_min < dm_sigma_max <= 1 and critic_lr > 0 (or None); "
                             f"got {dmd_weight}, {dm_sigma_min}, {dm_sigma_max}, {critic_lr}")
        if reward is not None and not isinstance(reward, RewardModel):
            raise TypeError(f"reward must be a reward_zoo RewardModel or None, got {type(reward).__name__}")
        self.save_hyperparameters(ignore=["backbone", "optimizer", "lr_scheduler", "reward"])
        self.hold_reward(reward)
        hp = self.hparams
        self.critic: nn.Module | None = None
        if self.backbone.has_lora:  # the target is a frozen second adapter over the same base (the critic a third)
            add_named_adapter(self.backbone, "ema", hp.lora_rank, hp.lora_alpha, hp.lora_target_modules)
            trainable = {"default": True, "ema": False}
            if dmd_weight > 0:
                add_named_adapter(self.backbone, "critic", hp.lora_rank, hp.lora_alpha, hp.lora_target_modules)
                trainable["critic"] = True
            self.roles: AdapterRoles | None = AdapterRoles(self.backbone.denoiser, trainable, default="default")
            with torch.no_grad():
                for t, s in zip(self.roles.parameters("ema"), self.roles.parameters("default")):
                    t.copy_(s)
            self.ema_denoiser: nn.Module | None = None
        else:
            self.roles = None
            self.ema_denoiser = copy.deepcopy(self.backbone.denoiser).requires_grad_(False).eval()
            if dmd_weight > 0:  # the fake score starts as the teacher
                self.critic = copy.deepcopy(self.backbone.denoiser).requires_grad_(True)
        self._trajectories: TrajectoryPoints | None = None
        self.gan_head: GANHead | None = None
        self._teacher_tap: LastBlockFeatures | None = None
        if gan_weight > 0:  # a head on the frozen teacher's last-block features
            teacher = self.backbone.denoiser if self.roles is not None else self._reference_denoiser
            self._teacher_tap = LastBlockFeatures(teacher, self.backbone.block_classes, "teacher")
            self.gan_head = GANHead(feature_width(self.backbone.denoiser), gan_hidden_dim)
        # the grid index of each point's target end: its phase end (phased) or the schedule's end
        self._end_index = torch.full((num_timesteps,), num_timesteps, dtype=torch.long)
        self._phase_starts: list[int] = []  # grid indices where the student's phases start (phased, on the grid)
        if phased:
            grid, student = self.schedule(), self.student_sigmas()
            matches = [torch.isclose(grid, s, atol=1e-6).nonzero().flatten() for s in student]
            on_grid = [int(m[0]) if len(m) else None for m in matches]
            if teacher_trajectories and None in on_grid:
                raise ValueError(f"teacher trajectories of a phased student need its sigmas {student.tolist()} on the "
                                 f"{num_timesteps}-point schedule; choose num_timesteps a multiple of "
                                 f"num_inference_steps={num_inference_steps}")
            if None not in on_grid:
                for start, end in zip(on_grid[:-1], on_grid[1:]):
                    self._end_index[start:end] = end
                self._phase_starts = on_grid[:-1]

    @override
    def train(self, mode: bool = True):
        super().train(mode)
        if self.ema_denoiser is not None:
            self.ema_denoiser.eval()
        return self

    # -- roles ------------------------------------------------------------------------------------------------------
    def student_parameters(self) -> list[nn.Parameter]:
        if self.roles is not None:
            return self.roles.parameters("default")
        return list(self.backbone.denoiser.parameters())

    def ema_parameters(self) -> list[Tensor]:
        if self.roles is not None:
            return self.roles.parameters("ema")
        return list(self.ema_denoiser.parameters())

    def _x0(self, velocity: Tensor, x: Tensor, sigma: Tensor) -> Tensor:
        hp = self.hparams
        return consistency_x0(x, velocity, sigma, hp.parameterization, hp.sigma_data, hp.timestep_scaling)

    def _consistency_output(self, velocity: Tensor, x: Tensor, sigma: Tensor, end: Tensor | None) -> Tensor:
        """The consistency function's output from a velocity at ``(x, sigma)``: ``x0``, or with ``end`` (phased) the
        point at the phase end ``end`` (``Tensor[B]``)."""
        return self._x0(velocity, x, sigma) if end is None else euler_step(x, velocity, sigma, end)

    def student_x0(self, x: Tensor, sigma: Tensor, cond: Conditioning) -> Tensor:
        """The student's consistency function (with gradients)."""
        return self._x0(self.backbone.predict_velocity(x, sigma, cond), x, sigma)

    @torch.no_grad()
    def ema_velocity(self, x: Tensor, sigma: Tensor, cond: Conditioning) -> Tensor:
        """The EMA target's velocity."""
        if self.roles is not None:
            with self.roles.use("ema"):
                return self.backbone.predict_velocity(x, sigma, cond)
        return self.backbone.predict_velocity(x, sigma, cond, denoiser=self.ema_denoiser)

    @torch.no_grad()
    def ema_x0(self, x: Tensor, sigma: Tensor, cond: Conditioning) -> Tensor:
        """The EMA target's consistency function."""
        return self._x0(self.ema_velocity(x, sigma, cond), x, sigma)

    @torch.no_grad()
    def teacher_velocity(self, x: Tensor, sigma: Tensor, cond: Conditioning, uncond: Conditioning | None) -> Tensor:
        """The frozen teacher's velocity with classifier-free guidance."""
        g = self.hparams.teacher_guidance_scale
        if self.roles is not None:
            with self.roles.use(None):
                return guided_velocity(self.backbone, x, sigma, cond, uncond, g)
        return guided_velocity(self.backbone, x, sigma, cond, uncond, g, denoiser=self._reference_denoiser)

    # -- training -----------------------------------------------------------------------------------------------------
    def schedule(self) -> Tensor:
        """The discretised schedule ``sigma_0 = 1 > ... > sigma_N = 0``."""
        return sampling_sigmas(self.hparams.num_timesteps, shift=self.sampling_shift)

    def student_sigmas(self, num_steps: int | None = None) -> Tensor:
        """The sampler's grid: ``num_steps`` (default ``num_inference_steps``) steps at the sampling shift, to 0."""
        return sampling_sigmas(num_steps or self.hparams.num_inference_steps, shift=self.sampling_shift)

    def clean_latents(self, batch: dict, cond: Conditioning) -> Tensor:
        """Clean latents to noise: the batch's videos, or for prompt-only batches the EMA student's samples."""
        if "latents" in batch:
            return batch["latents"]
        if "video" in batch:
            return self.backbone.encode_videos(batch["video"])
        hp = self.hparams
        shape = self.backbone.latent_shape(hp.num_frames, hp.height, hp.width)
        noise = torch.randn((len(cond), *shape), device=self.device)
        sigmas = self.student_sigmas().to(self.device)
        if hp.phased:
            return euler_sample(lambda x, s: self.ema_velocity(x, s, cond), noise, sigmas)
        return multistep_sample(lambda x, s: self.ema_x0(x, s, cond), noise, sigmas)

    def loss(self, batch: dict) -> tuple[Tensor, dict[str, Tensor]]:
        """Consistency-distillation loss of one batch and statistics to log."""
        hp = self.hparams
        prompts = list(batch["prompt"])
        grid = self.schedule().to(self.device)
        end_index = self._end_index.to(self.device)
        images = batch.get("image")  # (b, 3, h, w) for image-to-video
        if hp.teacher_trajectories:  # the teacher's k-step solution comes from the cache
            pts = self.trajectory_batch(prompts, images)
            cond = self.with_images(self.backbone.encode_prompts(pts.prompts), pts.images)
            x_t, x_next = pts.x.to(self.device), pts.x_next.to(self.device)
            n, n_next = pts.n.to(self.device), pts.n_next.to(self.device)
        else:
            frames = batch["video"].shape[1] if "video" in batch else None
            cond, uncond = guidance_conditionings(self, prompts, images, hp.teacher_guidance_scale != 1.0, frames)
            with torch.no_grad():
                x0 = self.clean_latents(batch, cond)  # (b, c, t, h, w)
            if x0.shape[0] != len(prompts):
                raise ValueError(f"batch has {len(prompts)} prompts for {x0.shape[0]} videos")
            n = torch.randint(0, hp.num_timesteps - hp.skip_steps + 1, (len(prompts),), device=self.device)
            n_next = n + hp.skip_steps
            x_t = add_noise(x0, torch.randn_like(x0), grid[n])
        sigma, sigma_next = grid[n], grid[n_next]  # (b,), (b,)
        end = None
        if hp.phased:  # the teacher's step stops at the phase end, where the target is the point itself
            end = phase_ends(sigma, self.student_sigmas().to(self.device))  # (b,)
            sigma_next = torch.maximum(sigma_next, end)
        with torch.no_grad():
            if not hp.teacher_trajectories:
                x_next = euler_step(x_t, self.teacher_velocity(x_t, sigma, cond, uncond), sigma, sigma_next)
            at_end = (n_next >= end_index[n]) if end is None else (sigma_next <= end)  # (b,) target is x_next itself
            target = x_next
            if not bool(at_end.all()):
                ema = self._consistency_output(self.ema_velocity(x_next, sigma_next, cond), x_next, sigma_next, end)
                target = torch.where(at_end.view(-1, *[1] * (x_next.ndim - 1)), x_next, ema)
        pred = self._consistency_output(self.backbone.predict_velocity(x_t, sigma, cond), x_t, sigma, end)
        loss = consistency_loss(pred, target, hp.loss_type, hp.huber_c)
        stats = {"target_distance": (pred.detach() - target).pow(2).mean(), "sigma": sigma.mean()}
        rows = at_end.nonzero().flatten()  # the teacher's own phase-end points are the real samples
        if self.gan_head is not None and len(rows):
            d_loss, g_loss = self.adversarial_losses(x_next[rows], pred[rows], sigma_next[rows], cond.index(rows))
            loss = loss + d_loss + hp.gan_weight * g_loss
            stats.update(gan_classifier=d_loss.detach(), gan_student=g_loss.detach())
        if hp.dmd_weight > 0:  # on the batch's prompts; the critic's loss reaches only the critic
            if hp.teacher_trajectories:  # cond above is the cached pairs' prompts; otherwise it is the batch's
                cond, uncond = guidance_conditionings(self, prompts, images, hp.teacher_guidance_scale != 1.0)
            dm, critic, dm_stats = self.score_regularizer(cond, uncond)
            loss = loss + hp.dmd_weight * dm + critic
            stats.update(dm_stats)
        return loss, stats

    @override
    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        loss, stats = self.loss(batch)
        n = len(batch["prompt"])
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        self.log_dict({f"train/{k}": v for k, v in stats.items()}, batch_size=n)
        return loss

    @override
    def optimizer_step(self, *args, **kwargs) -> None:
        # After every optimizer step (not every micro-batch under gradient accumulation) the target follows, here
        # rather than in on_train_batch_end, which runs after the step's checkpoint is written. A step the
        # non-finite guard skipped moves nothing, the target included.
        super().optimizer_step(*args, **kwargs)
        if not self.last_step_skipped():
            ema_update(self.ema_parameters(), self.student_parameters(), self.hparams.ema_decay)

    @override
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        t = self._trajectories
        checkpoint["consistency_trajectories"] = None if t is None else dict(vars(t))

    @override
    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        t = checkpoint.get("consistency_trajectories")
        self._trajectories = None if t is None else TrajectoryPoints(**t)

    @override
    def configure_optimizers(self):
        params = [p for p in self.student_parameters() if p.requires_grad]
        if not params:
            raise RuntimeError("no trainable parameters: every weight of the student is frozen")
        groups = [{"params": params}]
        if self.gan_head is not None:
            groups.append({"params": list(self.gan_head.parameters())})
            if self.hparams.gan_lr is not None:
                groups[-1]["lr"] = self.hparams.gan_lr
        if self.hparams.dmd_weight > 0:
            groups.append({"params": self.critic_parameters()})
            if self.hparams.critic_lr is not None:
                groups[-1]["lr"] = self.hparams.critic_lr
        optimizer = self.optimizer_fn(groups if len(groups) > 1 else params)
        if self.lr_scheduler_fn is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.lr_scheduler_fn(optimizer),
                                                          "interval": "step"}}

    @override
    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        # The student, the classifier head and the critic are clipped each on its own norm: one global norm would let
        # the critic's or the head's gradients shrink the student's step.
        if not gradient_clip_val or len(optimizer.param_groups) == 1 or gradient_clip_algorithm == "value":
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        for group in optimizer.param_groups:
            torch.nn.utils.clip_grad_norm_(group["params"], gradient_clip_val)

    # -- sampling and evaluation --------------------------------------------------------------------------------------
    @override
    def sample_latents(self, noise: Tensor, cond: Conditioning, *, num_inference_steps: int | None = None,
                       guidance_scale: float | None = None, generator: Generators = None,
                       uncond: Conditioning | None = None, sampler: str | None = None) -> Tensor:
        """The student's sampler: multistep consistency sampling (predict ``x0``, re-noise it to the next sigma,
        :func:`~lit_videoalign.schedules.samplers.multistep_sample`) on ``num_inference_steps`` steps (default the
        module's), or for a phased student the Euler ODE on its phase grid. ``guidance_scale`` other than 1 applies
        classifier-free guidance to the student's velocity. One denoiser call per step (two with guidance).

        Args:
            noise: initial latents at sigma 1.
            cond: prompt conditioning (with its conditioning images for image-to-video).
            num_inference_steps: student steps; None takes the module's.
            guidance_scale: classifier-free guidance; None takes the module's.
            generator: the re-noising draws' source: one generator per sample (seeded sampling), one for the batch,
                or None for the global RNG.
            uncond: the negative-prompt conditioning (encoded here when guidance needs it and it is None).
            sampler: accepted for the base's signature and ignored: a student samples with its own sampler (the one it
                was distilled for), whatever the name.
        """
        if self.hparams.phased:
            return super().sample_latents(noise, cond, num_inference_steps=num_inference_steps,
                                          guidance_scale=guidance_scale, generator=generator, uncond=uncond)
        scale = self.hparams.guidance_scale if guidance_scale is None else guidance_scale
        if scale != 1 and uncond is None:
            uncond = negative_conditioning(self.backbone, self.hparams.negative_prompt, cond)
        elif uncond is not None and cond.images is not None and uncond.images is None:  # it keeps the image (I2V)
            uncond = uncond.with_images_from(cond)

        def x0_fn(x: Tensor, s: Tensor) -> Tensor:
            return self._x0(guided_velocity(self.backbone, x, s, cond, uncond, scale), x, s)

        return multistep_sample(x0_fn, noise, self.student_sigmas(num_inference_steps), generator)

    @override
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Few-step samples of held-out prompts (fixed seeds), scored by ``reward`` when one is given."""
        self.validate_with_reward(batch, batch_idx, prog_bar=False)
