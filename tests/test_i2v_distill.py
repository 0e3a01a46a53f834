"""Image-to-video distillation, reward gradients and inference-time methods on a tiny random Wan 2.1 I2V pipeline:
DMD, consistency distillation and DRaFT train unchanged apart from the data, every denoiser call of every role (the
student, the teacher on both branches of its guidance, the critic, the EMA target, cached teacher trajectories) sees
the batch's images, and best-of-N, noise search and reward guidance condition every candidate on its prompt's image."""

import lightning as L
import pytest
import torch

from lit_videoalign.backbones.diffusers import DiffusersVideoBackbone
from lit_videoalign.inference import best_of_n, noise_search, reward_guided_sample, sample_from_noise
from lit_videoalign.inference.base import seeded_candidates
from lit_videoalign.objectives.consistency import ConsistencyDistillation, TrajectoryPoints
from lit_videoalign.objectives.dmd import DMD
from lit_videoalign.objectives.losses import guidance_conditionings
from lit_videoalign.objectives.reward_gradient import RewardGradient
from lit_videoalign.objectives.sft import SFT
from lit_videoalign.testing import Brightness, tiny_wan_i2v_pipeline

PROMPTS = ["a red ball falls", "a blue ball moves left"]
FRAMES, SIZE = 9, 32
VIDEO = dict(num_frames=FRAMES, height=SIZE, width=SIZE)


@pytest.fixture(scope="module")
def i2v(tmp_path_factory) -> str:
    return str(tiny_wan_i2v_pipeline(tmp_path_factory.mktemp("i2v") / "pipe"))


def image(seed: int) -> torch.Tensor:
    """A random RGB image ``(3, h, w)`` in [0, 1]."""
    return torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


A, B = image(1), image(2)


def adamw(lr: float):
    return lambda p: torch.optim.AdamW(p, lr=lr)


def fit(model, items: list[dict], steps: int) -> L.Trainer:
    t = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    t.fit(model, train_dataloaders=torch.utils.data.DataLoader(items, batch_size=2))
    return t


def items(videos: bool = False) -> list[dict]:
    """Two prompts with images A and B (and random 9-frame clips when ``videos``)."""
    gen = torch.Generator().manual_seed(3)
    return [{"prompt": p, "image": img, **({"video": torch.rand(FRAMES, 3, SIZE, SIZE, generator=gen)} if videos
                                            else {})} for p, img in zip(PROMPTS, (A, B))]


def spy_images(model) -> list[torch.Tensor | None]:
    """Record the conditioning images of every denoiser call of ``model`` from now on (every role calls the backbone's
    ``predict_velocity``)."""
    seen, predict = [], model.backbone.predict_velocity

    def recording(x, sigma, cond, **kwargs):
        seen.append(None if cond.images is None else cond.images.detach().cpu())
        return predict(x, sigma, cond, **kwargs)

    model.backbone.predict_velocity = recording
    return seen


def assert_every_call_saw_the_batch_images(seen: list) -> None:
    assert seen, "no denoiser call was recorded"
    for images in seen:
        assert images is not None, "a denoiser call ran without the conditioning image"
        for row in images:  # each sample's image is one of the batch's (cond and uncond rows alike)
            assert min((row - x).abs().max().item() for x in (A, B)) == 0.0


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def moved(before: dict, model, keep) -> set[str]:
    return {n for n, p in model.named_parameters() if keep(n) and not torch.equal(before[n], p)}


def differ(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Whether ``x`` and ``y`` differ far beyond float32 rounding (1e-3 of the larger magnitude)."""
    return (x - y).abs().max().item() > 1e-3 * max(x.abs().max().item(), y.abs().max().item())


def same(x: torch.Tensor, y: torch.Tensor) -> None:
    """``x`` equals ``y`` up to float32 rounding (rows of one batch may round differently)."""
    torch.testing.assert_close(x, y, rtol=0, atol=1e-5 * max(x.abs().max().item(), 1.0))


def student_samples(model, images: torch.Tensor, seed: int = 5) -> torch.Tensor:
    """The model's own sampler from seeded noise (and seeded re-noising draws), conditioned on ``images``."""
    hp = model.hparams
    noise, gens = seeded_candidates(model, [seed] * len(images))
    cond = model.with_images(model.backbone.encode_prompts([PROMPTS[0]] * len(images)), images)
    with torch.no_grad():
        return model.sample_latents(noise, cond, generator=gens, guidance_scale=hp.guidance_scale)


def assert_samples_follow_the_image(model) -> None:
    """Another image, another sample from the same noise; the same image and seed, the same sample."""
    samples = student_samples(model.eval(), torch.stack([A, B, A]))
    assert differ(samples[0], samples[1])
    same(samples[0], samples[2])


# -- distillation and reward gradients ---------------------------------------------------------------------------------
def test_dmd_conditions_student_teacher_and_critic_on_the_image_and_trains(i2v):
    """Shared-base LoRA roles, the teacher's guidance, the regression warm-up's ODE pairs and the GAN head, on I2V."""
    model = DMD(DiffusersVideoBackbone(i2v), lora_rank=4, shared_base=True, num_inference_steps=2,
                teacher_guidance_scale=3.0, guidance_scale=2.0, gan_weight=0.5, gan_hidden_dim=16, regression_steps=1,
                regression_pairs=2, teacher_steps=2, optimizer=adamw(1e-2), **VIDEO)
    cond, uncond = guidance_conditionings(model, PROMPTS, torch.stack([A, B]), guided=True)
    assert torch.equal(uncond.images, cond.images) and set(uncond.extra) == set(cond.extra)  # guidance keeps the image
    before = snapshot(model)
    seen = spy_images(model)
    fit(model, items(videos=True), steps=4)  # 2 batches: critic + regression warm-up, then critic + DMD with GAN
    assert_every_call_saw_the_batch_images(seen)
    assert torch.equal(model._pairs.images, torch.stack([A, B]))  # the warm-up's teacher ODE pairs keep their images
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert moved(before, model, lambda n: ".default." in n), "the student did not move"
    assert moved(before, model, lambda n: ".critic." in n), "the critic did not move"
    assert moved(before, model, lambda n: n.startswith("gan_head.")), "the GAN head did not move"
    assert not moved(before, model, lambda n: "lora_" not in n and not n.startswith("gan_head.")), "a frozen weight"
    # The image is in the loss: another image, another generator loss for the same draws.
    losses = []
    for img in (A, B):
        torch.manual_seed(0)
        c, u = guidance_conditionings(model, PROMPTS[:1], img[None], guided=True)
        losses.append(model.generator_loss(c, u)[0].detach())
    assert (losses[0] - losses[1]).abs() > 1e-3 * losses[0].abs()
    assert_samples_follow_the_image(model)


def test_consistency_on_videos_conditions_teacher_and_target_on_the_image(i2v):
    """LCM's noised-data setting with the teacher's guidance: the image enters the loss and the few-step sampler."""
    model = ConsistencyDistillation(DiffusersVideoBackbone(i2v), lora_rank=4, num_timesteps=4, skip_steps=1,
                                    num_inference_steps=2, teacher_guidance_scale=3.0, optimizer=adamw(1e-2), **VIDEO)
    batch = torch.utils.data.default_collate(items(videos=True))
    losses = []
    for images in (batch["image"], batch["image"].flip(0)):
        torch.manual_seed(0)
        with torch.no_grad():
            losses.append(model.loss({**batch, "image": images})[0])
    assert (losses[0] - losses[1]).abs() > 1e-3 * losses[0]
    before = snapshot(model)
    seen = spy_images(model)
    fit(model, items(videos=True), steps=2)
    assert_every_call_saw_the_batch_images(seen)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert moved(before, model, lambda n: ".default." in n), "the student did not move"
    assert not moved(before, model, lambda n: "lora_" not in n), "a frozen weight moved"
    assert_samples_follow_the_image(model)


def test_phased_consistency_with_trajectories_gan_and_critic_keeps_the_images_in_its_cache(i2v):
    """Cached on-policy teacher trajectories, PCM's adversarial term and rCM's critic, on prompt-and-image batches."""
    model = ConsistencyDistillation(DiffusersVideoBackbone(i2v), lora_rank=4, num_timesteps=4, skip_steps=1,
                                    num_inference_steps=2, phased=True, teacher_trajectories=2, points_per_trajectory=2,
                                    on_policy=True, gan_weight=0.5, gan_hidden_dim=16, dmd_weight=0.5,
                                    teacher_guidance_scale=3.0, optimizer=adamw(1e-2), **VIDEO)
    before = snapshot(model)
    seen = spy_images(model)
    fit(model, items(), steps=2)
    assert_every_call_saw_the_batch_images(seen)
    cache = model._trajectories
    assert torch.equal(cache.images, torch.stack([A, A, B, B]))  # each trajectory's pairs keep its image
    assert cache.prompts == [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2
    sub = cache.subset(torch.tensor([3, 0]))
    assert sub.prompts == [PROMPTS[1], PROMPTS[0]] and torch.equal(sub.images, torch.stack([B, A]))
    checkpoint = {}
    model.on_save_checkpoint(checkpoint)
    assert torch.equal(TrajectoryPoints(**checkpoint["consistency_trajectories"]).images, cache.images)
    with pytest.raises(ValueError, match="cannot mix teacher trajectories with and without conditioning images"):
        cache.cat(TrajectoryPoints(cache.x, cache.x_next, cache.n, cache.n_next, cache.prompts))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    for role in ("default", "critic"):
        assert moved(before, model, lambda n, r=role: f".{r}." in n), f"the {role} adapter did not move"
    assert moved(before, model, lambda n: n.startswith("gan_head.")), "the GAN head did not move"
    assert not moved(before, model, lambda n: "lora_" not in n and not n.startswith("gan_head.")), "a frozen weight"
    assert_samples_follow_the_image(model)


def test_reward_gradient_samples_and_regularises_with_the_image(i2v):
    model = RewardGradient(DiffusersVideoBackbone(i2v), reward=Brightness(), lora_rank=4, num_sampling_steps=2,
                           truncation_steps=1, rollout_guidance_scale=3.0, kl_beta=0.1, optimizer=adamw(1e-2), **VIDEO)
    noise = torch.randn(1, *model.backbone.latent_shape(FRAMES, SIZE, SIZE))
    with torch.no_grad():  # the samples the reward's gradient flows through: another image, another sample
        latents = [model.sample_with_grad(PROMPTS[:1], noise, images=img[None])[0] for img in (A, B, A)]
    assert differ(latents[0], latents[1]) and torch.equal(latents[0], latents[2])
    before = snapshot(model)
    seen = spy_images(model)
    fit(model, items(), steps=2)
    assert_every_call_saw_the_batch_images(seen)  # the policy and the reference of the velocity KL alike
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert moved(before, model, lambda n: "lora_" in n), "LoRA weights did not move"
    assert not moved(before, model, lambda n: "lora_" not in n), "a frozen weight moved"


# -- inference-time methods --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base(i2v) -> SFT:
    return SFT(DiffusersVideoBackbone(i2v), num_inference_steps=2, guidance_scale=2.0, **VIDEO)


def test_best_of_n_conditions_every_candidate_on_its_prompts_image(base):
    prompts, seeds = [PROMPTS[0]] * 3, [0, 0, 0]  # one prompt and seed: the image alone tells the videos apart
    res = best_of_n(base, prompts, Brightness(), n=2, seeds=seeds, images=torch.stack([A, B, A]),
                    return_candidates=True, batch_size=4)
    cands = res.info["candidates"]  # (3, 2, t, c, h, w)
    assert differ(cands[0, 0], cands[1, 0]) and differ(cands[0, 1], cands[1, 1])
    same(cands[0], cands[2])  # the same image and seed: the same candidates
    noise, gens = seeded_candidates(base, [0])
    plain = sample_from_noise(base, prompts[:1], noise, generators=gens, images=A[None])
    same(cands[0, 0], plain[0])  # candidate 0 is the seed's plain sample
    with pytest.raises(ValueError, match="one conditioning image per prompt \\(3\\), got \\(2, 3, 32, 32\\)"):
        best_of_n(base, prompts, Brightness(), n=2, images=torch.stack([A, B]))


def test_noise_search_conditions_every_candidate_on_its_prompts_image(base):
    prompts = [PROMPTS[0]] * 3
    res = noise_search(base, prompts, Brightness(), budget_nfe=2 * 4, seeds=[0, 0, 0], mode="greedy", population=1,
                       images=torch.stack([A, B, A]))
    assert res.info["samples"] == 2
    assert differ(res.videos[0], res.videos[1])
    same(res.videos[0], res.videos[2])
    same(res.all_scores[0], res.all_scores[2])


def test_reward_guidance_conditions_on_the_image_and_is_plain_sampling_at_scale_zero(base):
    prompts, images = [PROMPTS[0]] * 3, torch.stack([A, B, A])
    guided = reward_guided_sample(base, prompts, Brightness(), seeds=[0, 0, 0], scale=0.5, images=images)
    assert differ(guided.videos[0], guided.videos[1])
    same(guided.videos[0], guided.videos[2])
    plain = reward_guided_sample(base, prompts, Brightness(), seeds=[0, 0, 0], scale=0.0, images=images)
    euler = sample_from_noise(base, prompts, base.initial_noise([0, 0, 0]), sampler="euler", images=images)
    assert torch.equal(plain.videos, euler)
    assert differ(guided.videos[0], plain.videos[0])  # the nudge moved the image-conditioned sample
    with pytest.raises(ValueError, match="needs conditioning images"):  # an I2V model without them: one clear line
        reward_guided_sample(base, prompts, Brightness(), scale=0.5)
