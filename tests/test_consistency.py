"""Consistency distillation: the boundary condition holds exactly at sigma = 0, losses and EMA by hand, the
multistep sampler, and Trainer steps that move the student (and its EMA target) but never the teacher."""

import lightning as L
import pytest
import torch

from lit_videoalign.backbones.diffusers import DiffusersVideoBackbone
from lit_videoalign.data.toyworld import ToyWorldDataModule
from lit_videoalign.objectives.consistency import (
    ConsistencyDistillation,
    boundary_coefficients,
    consistency_loss,
    consistency_x0,
    ema_update,
    multistep_sample,
    next_sample,
    phase_ends,
)
from lit_videoalign.schedules.samplers import seeded_noise


def make_cd(path, **kwargs):
    bb = DiffusersVideoBackbone(path, max_sequence_length=16)
    defaults = dict(teacher_guidance_scale=2.0, num_timesteps=8, skip_steps=2,
                    optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
    return ConsistencyDistillation(bb, **{**defaults, **kwargs})


def trainer(steps):
    return L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)


def prompts_data(videos=False):
    return ToyWorldDataModule(batch_size=2, train_size=8, val_size=2, prompts_only=not videos)


def snapshot(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


@pytest.mark.parametrize("parameterization", ["flow", "lcm"])
def test_boundary_condition_holds_exactly_at_sigma_zero(parameterization):
    c_skip, c_out = boundary_coefficients(torch.tensor([0.0, 0.5]), parameterization)
    assert c_skip[0] == 1.0 and c_out[0] == 0.0
    x, v = torch.randn(3, 2, 4), 100 * torch.randn(3, 2, 4)
    sigma = torch.tensor([0.0, 0.3, 1.0])
    out = consistency_x0(x, v, sigma, parameterization)
    assert torch.equal(out[0], x[0])  # whatever the network says, f(x, 0) = x
    assert not torch.allclose(out[1:], x[1:])  # measured apart by far more than the scale of x


# allclose's default rtol 1e-5 in the by-hand checks below stands for float32 rounding: measured exact or within
# 1.3e-7 relative (torch 2.13.0 / 2.14.1).
def test_boundary_coefficients_by_hand():
    c_skip, c_out = boundary_coefficients(torch.tensor(0.5), "flow")
    assert c_skip == 1.0 and c_out == -0.5
    x, v = torch.tensor([[2.0]]), torch.tensor([[1.0]])
    assert torch.allclose(consistency_x0(x, v, 0.5), torch.tensor([[1.5]]))  # x - sigma * v
    # LCM at sigma = 1e-4: t = 10 * 1000 * 1e-4 = 1; c_skip = 0.25 / 1.25 = 0.2, c_out = 1 / sqrt(1.25)
    c_skip, c_out = boundary_coefficients(torch.tensor(1e-4), "lcm")
    assert torch.allclose(c_skip, torch.tensor(0.2)) and torch.allclose(c_out, torch.tensor(1.25**-0.5))
    out = consistency_x0(x, v, 1e-4, "lcm")
    assert torch.allclose(out, 0.2 * x + 1.25**-0.5 * (x - 1e-4 * v))
    with pytest.raises(ValueError, match="parameterization"):
        boundary_coefficients(torch.tensor(0.1), "edm")


def test_losses_by_hand():
    pred, target = torch.tensor([[3.0, 4.0]]), torch.zeros(1, 2)
    assert torch.allclose(consistency_loss(pred, target, "l2"), torch.tensor(12.5))
    huber = consistency_loss(pred, target, "huber", huber_c=1.0)
    assert torch.allclose(huber, torch.tensor(((10**0.5 - 1) + (17**0.5 - 1)) / 2))
    assert consistency_loss(pred, pred.clone(), "huber") == 0
    with pytest.raises(ValueError, match="loss_type"):
        consistency_loss(pred, target, "l1")
    with pytest.raises(ValueError, match="same shape"):
        consistency_loss(pred, torch.zeros(2, 2))


def test_ema_update_by_hand():
    target, online = [torch.zeros(2), torch.full((1,), 4.0)], [torch.ones(2), torch.zeros(1)]
    ema_update(target, online, 0.9)
    assert torch.allclose(target[0], torch.full((2,), 0.1)) and torch.allclose(target[1], torch.tensor([3.6]))
    ema_update(target, online, 0.9)
    assert torch.allclose(target[0], torch.full((2,), 0.19))
    with pytest.raises(ValueError, match="decay"):
        ema_update(target, online, 1.5)


def test_multistep_sampler_renoises_with_seeded_noise():
    seen = []

    def x0_fn(x, s):
        seen.append((x.clone(), s.clone()))
        return torch.full_like(x, 0.5)

    noise = torch.randn(2, 3)
    sigmas = torch.tensor([1.0, 0.6, 0.2, 0.0])
    gens = [torch.Generator().manual_seed(i) for i in (7, 8)]
    out = multistep_sample(x0_fn, noise, sigmas, gens)
    assert torch.equal(out, torch.full((2, 3), 0.5)) and len(seen) == 3
    assert [s[0].item() for _, s in seen] == pytest.approx([1.0, 0.6, 0.2])
    eps = torch.randn(3, generator=torch.Generator().manual_seed(7))  # the first re-noising draw of sample 0
    assert torch.allclose(seen[1][0][0], 0.4 * 0.5 + 0.6 * eps)
    # Euler transitions are deterministic: x + (s' - s) (x - x0) / s
    x, x0 = torch.tensor([1.0]), torch.tensor([0.0])
    assert torch.allclose(next_sample(x, x0, 1.0, 0.5, "euler"), torch.tensor([0.5]))
    with pytest.raises(ValueError, match="one per sample"):
        multistep_sample(x0_fn, noise, sigmas, gens[:1])


def test_full_mode_moves_the_student_and_ema_never_the_teacher(tiny_pixel_pipeline):
    model = make_cd(tiny_pixel_pipeline, ema_decay=0.5)
    teacher, student = snapshot(model._reference_denoiser), snapshot(model.backbone.denoiser)
    text = snapshot(model.backbone.text_encoder)
    ema_before = [p.detach().clone() for p in model.ema_parameters()]
    t = trainer(2)
    t.fit(model, prompts_data())
    after = dict(model.backbone.denoiser.named_parameters())
    assert sum(not torch.equal(student[n], after[n]) for n in student) > len(student) // 2
    assert all(torch.equal(teacher[n], p) for n, p in model._reference_denoiser.named_parameters())
    assert all(torch.equal(text[n], p) for n, p in model.backbone.text_encoder.named_parameters())
    assert any(not torch.equal(a, b) for a, b in zip(ema_before, model.ema_parameters()))
    assert all(torch.isfinite(p).all() for p in model.parameters()) and torch.isfinite(t.callback_metrics["train/loss"])
    assert any(k.startswith("ema_denoiser.") for k in model.state_dict())  # the EMA target is checkpointed


@pytest.mark.parametrize("lora", [False, True])
def test_ema_target_follows_the_student_exactly(tiny_pixel_pipeline, lora):
    model = make_cd(tiny_pixel_pipeline, ema_decay=0.75, lora_rank=4 if lora else None,
                    optimizer=lambda p: torch.optim.SGD(p, lr=1e-2))
    ema0 = [p.detach().clone() for p in model.ema_parameters()]
    batch = {"prompt": ["a red ball falls", "a blue ball moves left"]}
    opt = model.configure_optimizers()
    opt.zero_grad()
    model.loss(batch)[0].backward()
    opt.step()
    student = [p.detach().clone() for p in model.student_parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(ema0, student))
    ema_update(model.ema_parameters(), model.student_parameters(), model.hparams.ema_decay)
    for e0, s, e in zip(ema0, student, model.ema_parameters()):
        assert torch.allclose(e, 0.75 * e0 + 0.25 * s)


def test_lora_mode_shares_one_base_for_teacher_student_and_target(tiny_pixel_pipeline):
    model = make_cd(tiny_pixel_pipeline, lora_rank=4, ema_decay=0.5, optimizer=lambda p: torch.optim.AdamW(p, 1e-2))
    assert model._reference_denoiser is None and model.ema_denoiser is None
    one = sum(p.numel() for p in DiffusersVideoBackbone(tiny_pixel_pipeline).denoiser.parameters())
    base = {n: p.clone() for n, p in model.backbone.denoiser.named_parameters() if "lora_" not in n}
    assert sum(p.numel() for p in base.values()) == one
    lora = snapshot(model.backbone.denoiser)
    trainer(2).fit(model, prompts_data())
    moved = {n for n, p in model.backbone.denoiser.named_parameters() if not torch.equal(lora[n], p)}
    assert any(".default." in n for n in moved) and any(".ema." in n for n in moved)
    assert all(torch.equal(p, base[n]) for n, p in model.backbone.denoiser.named_parameters() if n in base)
    flags = {n: p.requires_grad for n, p in model.backbone.denoiser.named_parameters()}
    assert all(flags[n] == (".default." in n and "lora_" in n) for n in flags)  # the EMA adapter stays frozen
    # the teacher is the base with adapters off (guided, g = 2), whatever the adapters learnt
    cond, uncond = model.backbone.encode_prompts(["a red ball falls"]), model.backbone.encode_prompts([""])
    x, s = torch.randn(1, *model.backbone.latent_shape(16, 32, 32)), torch.full((1,), 0.5)
    plain = DiffusersVideoBackbone(tiny_pixel_pipeline, max_sequence_length=16)
    with torch.no_grad():
        v_c, v_u = plain.predict_velocity(x, s, cond), plain.predict_velocity(x, s, uncond)
        expected = v_u + 2.0 * (v_c - v_u)
        # guidance combined in another order: max |err| / max |expected| measured 5.6e-7 (torch 2.13.0 / 2.14.1,
        # 3 seeds, AVX-512 / AVX2 / baseline CPU kernels); 1e-5 is 18x that
        torch.testing.assert_close(model.teacher_velocity(x, s, cond, uncond), expected, rtol=0,
                                   atol=1e-5 * expected.abs().max().item())
        # the adapters moved the student by 3.6e-2 of the scale (measured)
        assert not torch.allclose(model.backbone.predict_velocity(x, s, cond), v_c, atol=1e-5)


def test_distillation_makes_the_student_consistent_on_a_batch(tiny_pixel_pipeline):
    """Training lowers the consistency loss of a fixed batch (fixed points, noise and targets)."""
    torch.manual_seed(0)
    model = make_cd(tiny_pixel_pipeline, ema_decay=0.0, loss_type="l2",
                    optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3))
    batch = next(iter(ToyWorldDataModule(batch_size=2, train_size=2).train_dataloader()))  # real videos

    def fixed_loss():
        torch.manual_seed(1)
        return model.loss(batch)[0]

    before = fixed_loss().item()
    opt = model.configure_optimizers()
    for _ in range(8):
        opt.zero_grad()
        fixed_loss().backward()
        opt.step()
    assert fixed_loss().item() < 0.7 * before


def test_phase_ends_by_hand():
    bounds = torch.tensor([1.0, 0.9, 0.75, 0.5, 0.0])
    sigma = torch.tensor([1.0, 0.95, 0.9, 0.8, 0.75, 0.5 + 1e-8, 0.2])
    assert torch.equal(phase_ends(sigma, bounds), torch.tensor([0.9, 0.9, 0.75, 0.75, 0.5, 0.0, 0.0]))
    with pytest.raises(ValueError, match="ending at 0"):
        phase_ends(sigma, torch.tensor([1.0, 0.5]))
    with pytest.raises(ValueError, match="above 0"):
        phase_ends(torch.tensor([0.5, 0.0]), bounds)


def test_phased_loss_is_zero_when_the_teacher_steps_whole_phases(tiny_pixel_pipeline):
    """With the student's grid as the teacher's (one teacher step per phase), no guidance and the target equal to the
    student, every target is the teacher's step to the phase end, which the untrained student predicts exactly; the
    x0-consistency loss of the same setting is not zero."""
    batch = next(iter(ToyWorldDataModule(batch_size=2, train_size=2).train_dataloader()))
    kwargs = dict(num_timesteps=4, skip_steps=1, num_inference_steps=4, teacher_guidance_scale=1.0, loss_type="l2")
    # measured exactly 0 (torch 2.13.0 / 2.14.1); the x0-consistency loss of the same setting is 4.5e-3
    assert make_cd(tiny_pixel_pipeline, phased=True, **kwargs).loss(batch)[0].item() < 1e-10
    assert make_cd(tiny_pixel_pipeline, **kwargs).loss(batch)[0].item() > 1e-4


def test_phased_student_trains_and_samples_as_a_plain_euler_flow(tiny_pixel_pipeline):
    torch.manual_seed(0)
    model = make_cd(tiny_pixel_pipeline, phased=True, num_inference_steps=3, ema_decay=0.5)
    teacher = snapshot(model._reference_denoiser)
    before = snapshot(model.backbone.denoiser)
    trainer(2).fit(model, datamodule=prompts_data())  # data-free: points from the EMA student's Euler samples
    assert any(not torch.equal(before[n], p) for n, p in model.backbone.denoiser.named_parameters())
    assert all(torch.equal(teacher[n], p) for n, p in model._reference_denoiser.named_parameters())
    assert all(torch.isfinite(p).all() for p in model.parameters())
    calls = []
    handle = model.backbone.denoiser.register_forward_hook(lambda *a: calls.append(1))
    a = model.generate(["a red ball falls"], seeds=[1])
    handle.remove()
    # the same as the generic Euler sampler of AlignmentModule, seed for seed: no re-noising draws
    plain = super(ConsistencyDistillation, model).generate(["a red ball falls"], seeds=[1])
    assert len(calls) == 3 and torch.equal(a, plain)


def test_generate_is_few_step_and_seeded(tiny_pixel_pipeline):
    model = make_cd(tiny_pixel_pipeline, num_inference_steps=3)
    calls = []
    handle = model.backbone.denoiser.register_forward_hook(lambda *a: calls.append(1))
    a = model.generate(["a red ball falls", "a blue ball falls"], seeds=[1, 2])
    handle.remove()
    b = model.generate(["a red ball falls", "a blue ball falls"], seeds=[1, 3])
    assert len(calls) == 3 and a.shape == (2, 16, 3, 32, 32)
    assert torch.equal(a[0], b[0]) and not torch.equal(a[1], b[1])


def test_generate_goes_through_sample_latents_with_each_seeds_draws(tiny_pixel_pipeline):
    model = make_cd(tiny_pixel_pipeline, num_inference_steps=3, parameterization="lcm", guidance_scale=1.5).eval()
    prompts = ["a red ball falls", "a blue ball falls"]
    hp = model.hparams
    noise, generators = seeded_noise(model.backbone.latent_shape(hp.num_frames, hp.height, hp.width), [1, 2])
    with torch.no_grad():
        latents = model.sample_latents(noise, model.backbone.encode_prompts(prompts), generator=generators)
    assert torch.equal(latents, model.generate(prompts, seeds=[1, 2], return_latents=True))
    alone = model.generate(prompts[1:], seeds=[2], return_latents=True)
    # a video's re-noising draws come from its own seed; alone, it is batched differently: max |err| / max |latents|
    # measured 2.7e-7 (torch 2.13.0 / 2.14.1, 3 seeds, AVX-512 / AVX2 / baseline CPU kernels); 1e-5 is 37x that
    torch.testing.assert_close(alone[0], latents[1], rtol=0, atol=1e-5 * latents[1].abs().max().item())


def test_bad_arguments_are_named(tiny_pixel_pipeline):
    with pytest.raises(ValueError, match="skip_steps"):
        make_cd(tiny_pixel_pipeline, skip_steps=9)
    with pytest.raises(ValueError, match="ema_decay"):
        make_cd(tiny_pixel_pipeline, ema_decay=1.2)
    with pytest.raises(ValueError, match="parameterization"):
        make_cd(tiny_pixel_pipeline, parameterization="v")
    with pytest.raises(ValueError, match="phased.*'lcm'"):
        make_cd(tiny_pixel_pipeline, phased=True, parameterization="lcm")


def test_teacher_trajectory_pairs_are_the_teachers_own_multistep_solution(tiny_pixel_pipeline):
    """Each cached pair ``(x_n, x_{n+k})`` is the teacher's own Euler walk over the grid (with its guidance); phased,
    the walk stops at the phase end."""
    torch.manual_seed(0)
    for phased in (False, True):
        model = make_cd(tiny_pixel_pipeline, num_timesteps=8, skip_steps=3, num_inference_steps=2, phased=phased,
                        teacher_trajectories=2, points_per_trajectory=3)
        pts = model.teacher_trajectory_points(["a red ball falls", "a blue ball moves left"])
        assert len(pts) == 6 and pts.prompts[:3] == ["a red ball falls"] * 3
        limit = torch.where(pts.n < 4, 4, 8) if phased else torch.full_like(pts.n, 8)  # phase ends on the grid
        assert torch.equal(pts.n_next, torch.minimum(pts.n + 3, limit))
        grid = model.schedule().tolist()
        for i in range(len(pts)):
            x = pts.x[i:i + 1]
            cond = model.backbone.encode_prompts(pts.prompts[i:i + 1])
            uncond = model.backbone.encode_prompts([model.hparams.negative_prompt])
            for j in range(int(pts.n[i]), int(pts.n_next[i])):
                v = model.teacher_velocity(x, torch.tensor([grid[j]]), cond, uncond)
                x = x + (grid[j + 1] - grid[j]) * v
            # the same walk, batched differently: max |err| / max |x| measured 1.8e-7 (torch 2.13.0 / 2.14.1, 3 seeds,
            # AVX-512 / AVX2 / baseline CPU kernels); 1e-5 is 55x that
            torch.testing.assert_close(x[0], pts.x_next[i], rtol=0, atol=1e-5 * x.abs().max().item())


def test_trajectory_training_spanning_phases_needs_no_target_network(tiny_pixel_pipeline):
    """With ``k`` spanning a phase every target is the teacher's own point at the phase end: the EMA network never
    runs; the cache fills from the first prompts and a fit moves the student, never the teacher."""
    torch.manual_seed(0)
    model = make_cd(tiny_pixel_pipeline, num_timesteps=8, skip_steps=2, num_inference_steps=4, phased=True,
                    teacher_trajectories=3, points_per_trajectory=2)
    ema_calls = []
    handle = model.ema_denoiser.register_forward_hook(lambda *a: ema_calls.append(1))
    teacher = snapshot(model._reference_denoiser)
    before = snapshot(model.backbone.denoiser)
    trainer(3).fit(model, datamodule=prompts_data())
    handle.remove()
    assert not ema_calls and len(model._trajectories) == 3 * 2
    assert any(not torch.equal(before[n], p) for n, p in model.backbone.denoiser.named_parameters())
    assert all(torch.equal(teacher[n], p) for n, p in model._reference_denoiser.named_parameters())
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # the cache is part of a checkpoint
    checkpoint = {}
    model.on_save_checkpoint(checkpoint)
    fresh = make_cd(tiny_pixel_pipeline, num_timesteps=8, skip_steps=2, num_inference_steps=4, phased=True,
                    teacher_trajectories=3, points_per_trajectory=2)
    fresh.on_load_checkpoint(checkpoint)
    assert torch.equal(fresh._trajectories.x_next, model._trajectories.x_next)


def test_trajectory_arguments_are_checked(tiny_pixel_pipeline):
    with pytest.raises(ValueError, match="teacher_trajectories"):
        make_cd(tiny_pixel_pipeline, teacher_trajectories=-1)
    with pytest.raises(ValueError, match="multiple of num_inference_steps=3"):
        make_cd(tiny_pixel_pipeline, num_timesteps=8, num_inference_steps=3, phased=True, teacher_trajectories=2)


def test_adversarial_term_trains_student_and_head_through_a_frozen_teacher(tiny_pixel_pipeline):
    """PCM's adversarial term: the head learns from its classifier loss only, the student from the rest; the teacher
    it reads features from never moves."""
    torch.manual_seed(0)
    kwargs = dict(num_timesteps=8, skip_steps=2, num_inference_steps=4, phased=True, teacher_trajectories=2,
                  points_per_trajectory=2)
    model = make_cd(tiny_pixel_pipeline, gan_weight=0.1, gan_lr=1e-2, **kwargs)
    pts = model.trajectory_batch(["a red ball falls", "a blue ball falls"])
    sigma = model.schedule()[pts.n_next]
    cond = model.backbone.encode_prompts(pts.prompts)
    fake = (pts.x_next + 0.1 * torch.randn_like(pts.x_next)).requires_grad_(True)
    d_loss, g_loss = model.adversarial_losses(pts.x_next, fake, sigma, cond)
    head = list(model.gan_head.parameters())
    assert all(g is None for g in torch.autograd.grad(g_loss, head, retain_graph=True, allow_unused=True))
    assert torch.autograd.grad(d_loss, fake, allow_unused=True)[0] is None  # the classifier loss leaves the student
    assert torch.autograd.grad(g_loss, fake)[0].abs().sum() > 0  # the student's loss reaches it through the teacher
    teacher = snapshot(model._reference_denoiser)
    before, head_before = snapshot(model.backbone.denoiser), snapshot(model.gan_head)
    trainer(2).fit(model, datamodule=prompts_data())
    assert any(not torch.equal(before[n], p) for n, p in model.backbone.denoiser.named_parameters())
    assert all(not torch.equal(head_before[n], p) for n, p in model.gan_head.named_parameters())
    assert all(torch.equal(teacher[n], p) for n, p in model._reference_denoiser.named_parameters())
    assert all(torch.isfinite(p).all() for p in model.parameters())
    with pytest.raises(ValueError, match="gan_weight"):
        make_cd(tiny_pixel_pipeline, gan_weight=0.1, phased=True)  # no teacher trajectories: no real samples


def test_on_policy_trajectories_start_each_phase_where_the_student_landed(tiny_pixel_pipeline):
    """DAgger pairs: after the first phase, a phase starts at the student's own Euler step from the previous phase
    start, and its target is the teacher's walk from there; the cache turns over every ``trajectory_every`` steps."""
    torch.manual_seed(0)
    model = make_cd(tiny_pixel_pipeline, num_timesteps=8, skip_steps=4, num_inference_steps=2, phased=True,
                    teacher_trajectories=1, points_per_trajectory=16, on_policy=True, trajectory_every=1)
    torch.manual_seed(1)
    pts = model.teacher_trajectory_points(["a red ball falls"])
    grid = model.schedule().tolist()
    cond = model.backbone.encode_prompts(["a red ball falls"])
    uncond = model.backbone.encode_prompts([model.hparams.negative_prompt])
    first = (pts.n == 0).nonzero().flatten()
    second = (pts.n == 4).nonzero().flatten()
    assert len(first) and len(second), "seed 1 draws pairs at both phase starts"
    start = pts.x[first[0]:first[0] + 1]
    landing = start + (grid[4] - grid[0]) * model.backbone.predict_velocity(start, torch.tensor([grid[0]]), cond)
    # the student's point, not the teacher's: measured bit-identical (torch 2.13.0 / 2.14.1, AVX-512 / AVX2 / baseline
    # CPU kernels); 1e-5 of the largest value leaves room for another batching (2e-7 measured in this file)
    torch.testing.assert_close(pts.x[second[0]], landing[0], rtol=0, atol=1e-5 * landing.abs().max().item())
    # the target stays the teacher's: measured 0.27 apart, far above 1e-3
    assert not torch.allclose(pts.x_next[first[0]], landing[0], atol=1e-3)
    x = landing
    for j in range(4, 8):
        x = x + (grid[j + 1] - grid[j]) * model.teacher_velocity(x, torch.tensor([grid[j]]), cond, uncond)
    torch.testing.assert_close(pts.x_next[second[0]], x[0], rtol=0, atol=1e-5 * x.abs().max().item())  # as above
    model._trajectories = pts  # full: every step now replaces it rather than growing it
    trainer(2).fit(model, datamodule=prompts_data())
    assert len(model._trajectories) == 16 and not torch.equal(model._trajectories.x, pts.x)
    with pytest.raises(ValueError, match="on_policy"):
        make_cd(tiny_pixel_pipeline, on_policy=True, teacher_trajectories=2)  # not phased


@pytest.mark.parametrize("lora", [False, True])
def test_score_regulariser_trains_student_and_critic_never_the_teacher(tiny_pixel_pipeline, lora):
    """rCM's regulariser: DMD's loss reaches only the student, the critic's flow matching only the critic; a few
    Trainer steps move both (under LoRA: their two adapters over the untouched base) and stay finite."""
    torch.manual_seed(0)
    model = make_cd(tiny_pixel_pipeline, phased=True, num_inference_steps=4, dmd_weight=1.0, critic_lr=1e-2,
                    lora_rank=4 if lora else None)
    cond = model.backbone.encode_prompts(["a red ball falls", "a blue ball falls"])
    uncond = model.backbone.encode_prompts(["", ""])
    dm, critic, stats = model.score_regularizer(cond, uncond)
    student, critic_params = model.student_parameters(), model.critic_parameters()
    assert not set(map(id, student)) & set(map(id, critic_params))
    assert all(g is None for g in torch.autograd.grad(dm, critic_params, retain_graph=True, allow_unused=True))
    assert all(g is None for g in torch.autograd.grad(critic, student, retain_graph=True, allow_unused=True))
    assert sum(g.abs().sum() for g in torch.autograd.grad(dm, student, allow_unused=True) if g is not None) > 0
    assert stats["fake_real_distance"] > 0  # the guided teacher and the unguided critic disagree from the start
    base = snapshot(model.backbone.denoiser if lora else model._reference_denoiser)
    before, critic_before = [p.detach().clone() for p in student], [p.detach().clone() for p in critic_params]
    trainer(2).fit(model, datamodule=prompts_data())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.student_parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(critic_before, model.critic_parameters()))
    if lora:
        assert all(torch.equal(base[n], p) for n, p in model.backbone.denoiser.named_parameters() if "lora_" not in n)
        flags = {n: p.requires_grad for n, p in model.backbone.denoiser.named_parameters()}
        assert all(flags[n] == ("lora_" in n and (".default." in n or ".critic." in n)) for n in flags)
    else:
        assert all(torch.equal(base[n], p) for n, p in model._reference_denoiser.named_parameters())
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("phased", [True, False])
def test_score_regulariser_is_silent_while_the_critic_is_the_teacher(tiny_pixel_pipeline, phased):
    """Without guidance the critic starts as an exact copy of the teacher, so the fake and real scores agree and the
    DMD term gives the student no gradient until the critic has learnt the student's samples (with either sampler:
    phased Euler steps, or x0 predictions re-noised)."""
    torch.manual_seed(0)
    model = make_cd(tiny_pixel_pipeline, teacher_guidance_scale=1.0, phased=phased, dmd_weight=1.0)
    cond = model.backbone.encode_prompts(["a red ball falls"])
    dm, _, stats = model.score_regularizer(cond, None)
    assert stats["fake_real_distance"] == 0 and torch.isfinite(dm)
    grads = torch.autograd.grad(dm, model.student_parameters(), allow_unused=True)
    assert all(g is None or g.abs().max() == 0 for g in grads)
    with pytest.raises(ValueError, match="dmd_weight"):
        make_cd(tiny_pixel_pipeline, dmd_weight=-1.0)


def test_critic_and_teacher_gradients_are_right_under_gradient_checkpointing(tiny_pixel_pipeline):
    """Under LoRA the critic's (and, for the adversarial term, the teacher's) backward runs once the student's adapter
    is active again; checkpointed blocks would be recomputed with the student's adapter. Their forwards keep their
    activations instead, so every gradient equals the one without checkpointing."""
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        bb = DiffusersVideoBackbone(tiny_pixel_pipeline, max_sequence_length=16, gradient_checkpointing=checkpointing)
        model = ConsistencyDistillation(bb, lora_rank=4, teacher_guidance_scale=2.0, num_timesteps=8, skip_steps=4,
                                        phased=True, teacher_trajectories=2, points_per_trajectory=2, gan_weight=0.1,
                                        dmd_weight=1.0)
        with torch.no_grad():  # a critic and a student that differ from the teacher (LoRA starts as a no-op)
            for n, p in model.backbone.denoiser.named_parameters():
                if "lora_" in n:
                    p.add_(0.02 * torch.randn_like(p))
        model.train()
        loss, _ = model.loss({"prompt": ["a red ball falls", "a blue ball falls"]})
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.backbone.denoiser.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any(".critic." in n for n in grads[0])
    # measured bit-identical (torch 2.13.0 / 2.14.1, 3 seeds, AVX-512 / AVX2 / baseline CPU kernels); 1e-5 of each
    # gradient's largest entry leaves room for a reordered float32 reduction
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], rtol=0, atol=1e-5 * grads[0][n].abs().max().item()), n


def test_each_role_is_clipped_on_its_own_norm(tiny_pixel_pipeline):
    """Gradient clipping per parameter group: a huge critic gradient does not shrink the student's step."""
    model = make_cd(tiny_pixel_pipeline, phased=True, dmd_weight=1.0, critic_lr=1e-2)
    optimizer = model.configure_optimizers()
    student, critic = model.student_parameters(), model.critic_parameters()
    assert [len(g["params"]) for g in optimizer.param_groups] == [len(student), len(critic)]
    assert optimizer.param_groups[1]["lr"] == 1e-2
    for p in student:
        p.grad = torch.full_like(p, 1e-4)
    for p in critic:
        p.grad = torch.full_like(p, 1e3)
    model.configure_gradient_clipping(optimizer, gradient_clip_val=1.0, gradient_clip_algorithm="norm")
    assert all(torch.equal(p.grad, torch.full_like(p, 1e-4)) for p in student)  # under its own norm: untouched
    assert torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in critic])) <= 1.0 + 1e-4
