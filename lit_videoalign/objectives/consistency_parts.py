"""The options of consistency distillation (:mod:`lit_videoalign.objectives.consistency`), one part each, mixed into
``ConsistencyDistillation``: they read its hyperparameters, backbone, adapter roles and schedule, and add no weights of
their own, so checkpoints keep their keys.

- :class:`TeacherTrajectories`: training points cut from cached teacher ODE trajectories, optionally DAgger-style
  from the student's own phase steps (``teacher_trajectories``, ``on_policy``).
- :class:`AdversarialTerm`: PCM's adversarial term, a classifier head on the frozen teacher's last-block features
  (``gan_weight``; Kim et al. PCM, arXiv 2405.18407, in DMD2's form, arXiv 2405.14867).
- :class:`ScoreRegularizer`: rCM's score regulariser, DMD's distribution-matching loss on the student's own few-step
  samples with a critic as the fake score (``dmd_weight``; Zheng et al., arXiv 2510.08431).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lit_videoalign.backbones.adapters import checkpointing_off, guided_velocity
from lit_videoalign.backbones.base import Conditioning
from lit_videoalign.objectives.gan import gan_discriminator_loss, gan_generator_loss
from lit_videoalign.objectives.losses import dmd_generator_loss, guidance_conditionings
from lit_videoalign.objectives.sft import flow_matching_loss
from lit_videoalign.schedules.flow import (
    add_noise,
    euler_step,
    sample_training_sigmas,
    shift_sigmas,
    velocity_target,
)
from lit_videoalign.schedules.samplers import predicted_x0


@dataclass
class TrajectoryPoints:
    """Training pairs cut from teacher ODE trajectories, kept on CPU: ``x`` at grid index ``n`` and the teacher's own
    solution ``x_next`` at ``n_next`` (``k`` grid steps on, or the phase end when nearer), with the prompt and, for
    image-to-video, the conditioning image each trajectory was sampled with."""

    x: Tensor  # (m, c, t, h, w)
    x_next: Tensor  # (m, c, t, h, w)
    n: Tensor  # (m,) grid index of x
    n_next: Tensor  # (m,) grid index of x_next
    prompts: list[str]  # one per pair
    images: Tensor | None = None  # (m, 3, h, w) in [0, 1], one per pair (image-to-video)

    def __len__(self) -> int:
        return len(self.prompts)

    def subset(self, idx: Tensor | slice) -> TrajectoryPoints:
        """The pairs at ``idx`` (an index tensor or a slice)."""
        prompts = self.prompts[idx] if isinstance(idx, slice) else [self.prompts[i] for i in idx.tolist()]
        images = None if self.images is None else self.images[idx]
        return TrajectoryPoints(self.x[idx], self.x_next[idx], self.n[idx], self.n_next[idx], prompts, images)

    def cat(self, other: TrajectoryPoints) -> TrajectoryPoints:
        if (self.images is None) != (other.images is None):
            raise ValueError("cannot mix teacher trajectories with and without conditioning images; train on batches "
                             "that all have an 'image' (image-to-video) or none (text-to-video)")
        images = None if self.images is None else torch.cat([self.images, other.images])
        return TrajectoryPoints(torch.cat([self.x, other.x]), torch.cat([self.x_next, other.x_next]),
                                torch.cat([self.n, other.n]), torch.cat([self.n_next, other.n_next]),
                                self.prompts + other.prompts, images)


class TeacherTrajectories:
    """Training pairs from cached teacher ODE trajectories (``teacher_trajectories > 0``), refreshed every
    ``trajectory_every`` steps; with ``on_policy`` each phase starts where the student's own step landed (DAgger).
    The cache (``self._trajectories``) is saved in checkpoints by the module."""

    _trajectories: TrajectoryPoints | None

    @torch.no_grad()
    def teacher_trajectory_points(self, prompts: list[str], images: Tensor | None = None) -> TrajectoryPoints:
        """Teacher ODE trajectories from fresh noise on the schedule (with the teacher's guidance), cut into
        ``points_per_trajectory`` pairs each: the state at a random grid index ``n`` and the teacher's own solution
        ``k`` grid steps on (or at the phase end when nearer). With ``on_policy`` each phase starts from the student's
        own step instead (the teacher's state at the phase end is still the pair's target). ``images``: one
        conditioning image per prompt (image-to-video), kept with each of its pairs."""
        hp = self.hparams
        guided = hp.teacher_guidance_scale != 1.0 or hp.guidance_scale != 1.0
        cond, uncond = guidance_conditionings(self, prompts, images, guided)
        grid = self.schedule().tolist()
        b, p, big_n = len(prompts), hp.points_per_trajectory, hp.num_timesteps
        n = torch.randint(0, big_n, (b, p))  # (b, p)
        n_next = torch.minimum(n + hp.skip_steps, self._end_index[n])  # (b, p)
        shape = self.backbone.latent_shape(hp.num_frames, hp.height, hp.width)
        x = torch.randn((b, *shape), device=self.device)
        xs, xs_next = torch.empty((b, p, *shape)), torch.empty((b, p, *shape))  # (b, p, c, t, h, w)
        starts = set(self._phase_starts) if hp.on_policy else set()
        landing = None  # where the student's step from the current phase start lands
        for i in range(big_n + 1):
            rows, cols = (n_next == i).nonzero(as_tuple=True)
            xs_next[rows, cols] = x[rows].cpu()  # the teacher's point
            if i in starts:
                if landing is not None:
                    x = landing
                s = torch.full((b,), grid[i], device=self.device)
                v = guided_velocity(self.backbone, x, s, cond, uncond, hp.guidance_scale)  # the student's sampler
                landing = euler_step(x, v, grid[i], grid[int(self._end_index[i])])
            rows, cols = (n == i).nonzero(as_tuple=True)
            xs[rows, cols] = x[rows].cpu()
            if i >= int(n_next.max()):
                break
            s = torch.full((b,), grid[i], device=self.device)
            x = euler_step(x, self.teacher_velocity(x, s, cond, uncond), grid[i], grid[i + 1])
        return TrajectoryPoints(xs.flatten(0, 1), xs_next.flatten(0, 1), n.flatten(), n_next.flatten(),
                                [q for q in prompts for _ in range(p)],
                                None if images is None else images.cpu().repeat_interleave(p, dim=0))

    def trajectory_batch(self, prompts: list[str], images: Tensor | None = None) -> TrajectoryPoints:
        """``len(prompts)`` random cached pairs, after growing the cache with this batch's prompts (and conditioning
        ``images``) until it holds ``teacher_trajectories`` trajectories (and, every ``trajectory_every`` steps after
        that, replacing the oldest with new ones)."""
        hp = self.hparams
        p = hp.points_per_trajectory
        have = 0 if self._trajectories is None else len(self._trajectories) // p
        full = have >= hp.teacher_trajectories
        refresh = full and hp.trajectory_every > 0 and self.global_step % hp.trajectory_every == 0
        if not full or refresh:
            take = slice(None) if refresh else slice(hp.teacher_trajectories - have)
            new = self.teacher_trajectory_points(prompts[take], None if images is None else images[take])
            cache = new if self._trajectories is None else self._trajectories.cat(new)
            self._trajectories = cache.subset(slice(max(len(cache) - hp.teacher_trajectories * p, 0), None))  # newest
        return self._trajectories.subset(torch.randperm(len(self._trajectories))[:len(prompts)])


class AdversarialTerm:
    """PCM's adversarial term (``gan_weight > 0``): the module's ``gan_head`` on the frozen teacher's last-block
    features (``_teacher_tap``) tells the teacher's phase-end points from the student's predictions of them."""

    def teacher_features(self, x: Tensor, sigma: Tensor, cond: Conditioning) -> Tensor:
        """The frozen teacher's last-block features at ``(x, sigma)`` (``[B, tokens, dim]``), differentiable in
        ``x``."""
        if self._teacher_tap is None:
            raise RuntimeError("teacher features need the adversarial head (gan_weight > 0)")

        def forward() -> Tensor:
            if self.roles is not None:  # back-propagated once the student's adapter is back: keep the activations
                with self.roles.use(None), checkpointing_off(self.backbone.denoiser):
                    return self.backbone.predict_velocity(x, sigma, cond)
            return self.backbone.predict_velocity(x, sigma, cond, denoiser=self._reference_denoiser)

        return self._teacher_tap.read(forward)[1]

    def adversarial_losses(self, real: Tensor, fake: Tensor, sigma: Tensor, cond: Conditioning
                           ) -> tuple[Tensor, Tensor]:
        """``(classifier loss, student loss)`` of teacher points ``real`` against the student's ``fake`` ones at
        ``sigma``: the head learns from the first only, the student (through the frozen teacher) from the second."""
        with torch.no_grad():
            f_real = self.teacher_features(real, sigma, cond)
        f_fake = self.teacher_features(fake, sigma, cond)
        d_loss = gan_discriminator_loss(self.gan_head(f_real), self.gan_head(f_fake.detach()))
        frozen = {k: v.detach() for k, v in self.gan_head.named_parameters()}
        g_loss = gan_generator_loss(torch.func.functional_call(self.gan_head, frozen, (f_fake,)))
        return d_loss, g_loss


class ScoreRegularizer:
    """rCM's score regulariser (``dmd_weight > 0``): the module's critic (``critic``, or the ``"critic"`` adapter under
    LoRA) is the fake score, the guided teacher the real one."""

    def critic_velocity(self, x: Tensor, sigma: Tensor, cond: Conditioning) -> Tensor:
        """The critic's (fake score's) velocity, with gradients when enabled."""
        if self.roles is not None:  # its backward runs after the student's adapter is back: keep its activations
            with self.roles.use("critic"), checkpointing_off(self.backbone.denoiser):
                return self.backbone.predict_velocity(x, sigma, cond)
        return self.backbone.predict_velocity(x, sigma, cond, denoiser=self.critic)

    def critic_parameters(self) -> list[nn.Parameter]:
        if self.roles is not None:
            return self.roles.parameters("critic")
        return [p for p in self.critic.parameters() if p.requires_grad]

    def student_sample(self, cond: Conditioning, noise: Tensor) -> Tensor:
        """The student's few-step sample from ``noise`` with its own sampler, differentiable from a random step on
        (backward simulation: the steps before it run without gradients, as at inference)."""
        grid = self.student_sigmas().tolist()
        k = len(grid) - 1
        first = int(torch.randint(k, ()))
        x = noise
        for i in range(k):
            with torch.set_grad_enabled(torch.is_grad_enabled() and i >= first):
                sigma = torch.full((len(x),), grid[i], device=x.device)
                v = self.backbone.predict_velocity(x, sigma, cond)
                if self.hparams.phased:  # Euler to the phase end; the last phase ends at 0
                    x = euler_step(x, v, grid[i], grid[i + 1])
                else:  # multistep consistency: predict x0, re-noise it to the next sigma
                    x = self._x0(v, x, sigma)
                    if i < k - 1:
                        x = add_noise(x, torch.randn_like(x), grid[i + 1])
        return x

    def score_regularizer(self, cond: Conditioning, uncond: Conditioning | None) -> tuple[Tensor, Tensor, dict]:
        """rCM's long-skip regulariser: ``(DMD loss of the student, flow-matching loss of the critic, statistics)``.

        The student's samples are noised at a random sigma, where the teacher (with guidance) and the critic predict
        x0; DMD's loss moves the samples towards the teacher's prediction and away from the critic's. The critic
        learns from the same samples, detached, so each loss reaches only its own network.
        """
        hp = self.hparams
        n = len(cond)
        shape = self.backbone.latent_shape(hp.num_frames, hp.height, hp.width)
        x0 = self.student_sample(cond, torch.randn((n, *shape), device=self.device))  # (b, c, t, h, w)
        u = hp.dm_sigma_min + (hp.dm_sigma_max - hp.dm_sigma_min) * torch.rand(n)
        sigma = shift_sigmas(u, self.sampling_shift).to(self.device)  # (b,)
        x_t = add_noise(x0.detach(), torch.randn_like(x0), sigma)
        with torch.no_grad():
            x0_real = predicted_x0(x_t, self.teacher_velocity(x_t, sigma, cond, uncond), sigma)
            x0_fake = predicted_x0(x_t, self.critic_velocity(x_t, sigma, cond), sigma)
        dm = dmd_generator_loss(x0, x0_real, x0_fake)
        sigma_c = sample_training_sigmas(n, mode="logit_normal", shift=self.sampling_shift).to(self.device)
        noise = torch.randn_like(x0)
        fake = x0.detach()
        critic = flow_matching_loss(self.critic_velocity(add_noise(fake, noise, sigma_c), sigma_c, cond),
                                    velocity_target(fake, noise))
        return dm, critic, {"dm_loss": dm.detach(), "critic_loss": critic.detach(),
                            "fake_real_distance": (x0_fake - x0_real).abs().mean()}
