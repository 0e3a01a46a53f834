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
regulariser of consistency distillation uses it too); the roles, critic, GAN and warm-up machinery, which Self-Forcing
shares, in ``objectives/distribution_matching.py``; the student's sampler in ``schedules/samplers.py``.
"""

from __future__ import annotations

import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor
from typing_extensions import override

from lit_videoalign.backbones.base import Conditioning
from lit_videoalign.objectives.base import AlignmentModule
from lit_videoalign.objectives.distribution_matching import (  # noqa: F401  (ODEPairs' old home was here)
    DistributionMatching,
    ODEPairs,
    check_distillation_args,
    check_student,
)
from lit_videoalign.objectives.gan import gan_discriminator_loss, gan_generator_loss  # noqa: F401  (old home)
from lit_videoalign.objectives.losses import (  # noqa: F401  (dmd_generator_loss's old home was here)
    dmd_generator_loss,
    negative_conditioning,
)
from lit_videoalign.schedules.samplers import (
    Generators,
    multistep_sample,
    next_sample,
    predicted_x0,
)
from reward_zoo.base import RewardModel


# -- the module --------------------------------------------------------------------------------------------------------
class DMD(DistributionMatching, AlignmentModule):
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
        check_distillation_args(lora_rank=lora_rank, shared_base=shared_base, critic_lora_rank=critic_lora_rank,
                                critic_updates=critic_updates, dm_sigma_min=dm_sigma_min, dm_sigma_max=dm_sigma_max,
                                sigma_shift=sigma_shift, critic_sigma_sampling=critic_sigma_sampling,
                                gan_weight=gan_weight, gan_critic_weight=gan_critic_weight,
                                teacher_guidance_scale=teacher_guidance_scale, regression_steps=regression_steps,
                                regression_pairs=regression_pairs, teacher_steps=teacher_steps, reward=reward)
        self.requires_reference = lora_rank is None  # the teacher: a frozen copy unless the base is kept under LoRA
        super().__init__(*args, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, **kwargs)
        check_student(student_sigmas, num_inference_steps, student_sampler)
        self.save_hyperparameters(ignore=["backbone", "optimizer", "lr_scheduler", "critic_optimizer", "reward"])
        self.automatic_optimization = False
        self.critic_optimizer_fn = critic_optimizer
        self.hold_reward(reward)
        self.setup_roles(shared_base, critic_lora_rank, gan_weight, gan_feature_dim, gan_hidden_dim)

    # -- the student's sampler --------------------------------------------------------------------------------------
    def student_x0(self, x: Tensor, sigma: Tensor, cond: Conditioning, uncond: Conditioning | None = None,
                   guidance_scale: float = 1.0) -> Tensor:
        """The student's x0 prediction ``x - sigma * v`` (with gradients when enabled)."""
        return predicted_x0(x, self.velocity("student", x, sigma, cond, uncond, guidance_scale), sigma)

    def sample_student(self, cond: Conditioning, noise: Tensor, grad: bool = False,
                       context: Tensor | None = None) -> Tensor:
        """Student samples for training: with backward simulation from a random step ``j`` (steps ``< j`` without
        gradients), else the full chain; gradients flow only when ``grad``. ``context`` is unused (a bidirectional
        student generates the whole clip)."""
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
