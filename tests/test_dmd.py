"""DMD: the pure losses by hand (and the sign of the generator gradient), Trainer steps that move student and critic
but never the teacher, the shared-base adapter mode, the regression warm-up, GAN head and the few-step sampler."""

import lightning as L
import pytest
import torch

from lit_videoalign.backbones.diffusers import DiffusersVideoBackbone
from lit_videoalign.cli import load_weights
from lit_videoalign.data.toyworld import ToyWorldDataModule
from lit_videoalign.objectives.dmd import DMD, dmd_generator_loss, gan_discriminator_loss, gan_generator_loss
from lit_videoalign.schedules.samplers import seeded_noise


def make_dmd(path, **kwargs):
    bb = DiffusersVideoBackbone(path, max_sequence_length=16)
    defaults = dict(teacher_guidance_scale=2.0, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
    return DMD(bb, **{**defaults, **kwargs})


def trainer(steps, **kwargs):
    return L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, **kwargs)


def prompts_data(videos=False):
    return ToyWorldDataModule(batch_size=2, train_size=8, val_size=2, prompts_only=not videos)


def snapshot(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def changed(before, module):
    return {n for n, p in module.named_parameters() if not torch.equal(before[n], p)}


def test_generator_loss_by_hand_and_the_sign_of_its_gradient():
    x = torch.tensor([[1.0, 2.0], [3.0, 5.0]], requires_grad=True)
    real = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    fake = torch.tensor([[1.0, 1.0], [1.0, 3.0]])
    # normalisers mean|x - real| = 1.5 and 3; grad = (fake - real) / norm = [[2/3, 2/3], [0, 2/3]]
    # (allclose's default rtol 1e-5 in this file's by-hand checks stands for float32 rounding: measured rel err
    # <= 2.7e-7, torch 2.13.0 / 2.14.1)
    loss = dmd_generator_loss(x, real, fake)
    assert torch.allclose(loss, torch.tensor(0.5 * (3 * 4 / 9) / 4))  # 0.5 * mean(grad^2) = 1/6
    loss.backward()
    assert torch.allclose(x.grad, torch.tensor([[2 / 3, 2 / 3], [0.0, 2 / 3]]) / 4)  # d loss / d x = grad / numel
    # a descent step moves the student towards the teacher's prediction and away from the critic's
    step = -x.grad
    assert (step * (real - fake)).sum() > 0
    assert torch.all((step * (real - fake)) >= 0)
    # gradient descent on a free sample whose critic sits beside it pulls it onto the teacher's side
    y = torch.zeros(1, 4, requires_grad=True)
    opt = torch.optim.SGD([y], lr=1.0)
    for _ in range(3):
        opt.zero_grad()
        dmd_generator_loss(y, torch.ones(1, 4), y.detach() - 0.5).backward()
        opt.step()
    assert (y > 0).all()


def test_generator_loss_is_finite_where_student_equals_teacher_and_checks_shapes():
    x = torch.ones(2, 3, requires_grad=True)
    loss = dmd_generator_loss(x, torch.ones(2, 3), torch.zeros(2, 3))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    with pytest.raises(ValueError, match="share a shape"):
        dmd_generator_loss(x, torch.ones(2, 4), torch.ones(2, 3))


def test_gan_losses_by_hand():
    log2 = torch.log(torch.tensor(2.0))
    assert torch.allclose(gan_generator_loss(torch.zeros(3)), log2)
    sp = torch.nn.functional.softplus
    expected = (sp(torch.tensor(-2.0)) + sp(torch.tensor(1.0))) / 2
    assert torch.allclose(gan_generator_loss(torch.tensor([2.0, -1.0])), expected)
    assert torch.allclose(gan_discriminator_loss(torch.zeros(2), torch.zeros(2)), 2 * log2)
    # a confident, correct classifier has a small loss; the reverse a large one
    assert gan_discriminator_loss(torch.full((2,), 5.0), torch.full((2,), -5.0)) < 0.02
    assert gan_discriminator_loss(torch.full((2,), -5.0), torch.full((2,), 5.0)) > 9


def test_full_mode_moves_student_and_critic_never_the_teacher(tiny_pixel_pipeline):
    model = make_dmd(tiny_pixel_pipeline, critic_updates=2)
    teacher = snapshot(model._reference_denoiser)
    student, critic = snapshot(model.backbone.denoiser), snapshot(model.critic)
    text = snapshot(model.backbone.text_encoder)
    t = trainer(3)  # one batch: 2 critic + 1 generator optimizer steps
    t.fit(model, prompts_data())
    assert model.generator_updates == 1 and t.global_step == 3
    assert len(changed(student, model.backbone.denoiser)) > len(student) // 2
    assert len(changed(critic, model.critic)) > len(critic) // 2
    assert not changed(teacher, model._reference_denoiser) and not changed(text, model.backbone.text_encoder)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(torch.isfinite(v) for k, v in t.callback_metrics.items())
    assert not any(k.startswith("_reference_denoiser.") for k in model.state_dict())


def test_lora_mode_keeps_the_base_as_teacher(tiny_pixel_pipeline):
    model = make_dmd(tiny_pixel_pipeline, lora_rank=4, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    assert model._reference_denoiser is None
    before, critic = snapshot(model.backbone.denoiser), snapshot(model.critic)
    trainer(2).fit(model, prompts_data())
    moved = changed(before, model.backbone.denoiser)
    assert moved and all("lora_" in n for n in moved)
    moved_critic = changed(critic, model.critic)
    assert moved_critic and all("lora_" in n for n in moved_critic)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def base_numel(module):
    """Elements of distinct non-LoRA denoiser weights (storage counted once, however many modules share it)."""
    seen, total = set(), 0
    for name, p in module.named_parameters():
        if "lora_" in name or "text_encoder" in name or "gan_head" in name:
            continue
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel()
    return total


def test_shared_base_costs_one_set_of_base_weights(tiny_pixel_pipeline):
    shared = make_dmd(tiny_pixel_pipeline, lora_rank=4, shared_base=True)
    separate = make_dmd(tiny_pixel_pipeline)
    one = sum(p.numel() for n, p in DiffusersVideoBackbone(tiny_pixel_pipeline).denoiser.named_parameters())
    assert base_numel(shared) == one
    assert base_numel(separate) == 3 * one  # student, critic and the frozen teacher copy
    assert shared.critic is None and shared._reference_denoiser is None
    trainable = [p for p in shared.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) < one // 4


def test_shared_base_switches_adapters_and_trains_both(tiny_pixel_pipeline):
    model = make_dmd(tiny_pixel_pipeline, lora_rank=4, shared_base=True,
                     optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    plain = DiffusersVideoBackbone(tiny_pixel_pipeline, max_sequence_length=16)
    with torch.no_grad():  # give each adapter its own non-zero weights
        for name, p in model.backbone.denoiser.named_parameters():
            if "lora_B.default" in name:
                p.normal_(0, 0.5)
            elif "lora_B.critic" in name:
                p.normal_(0, 0.5)
    cond = model.backbone.encode_prompts(["a red ball falls"])
    x, s = torch.randn(1, *model.backbone.latent_shape(16, 32, 32)), torch.full((1,), 0.6)
    with torch.no_grad():
        v = {r: model.velocity(r, x, s, cond) for r in ("student", "critic", "teacher")}
        v_base = plain.predict_velocity(x, s, cond)
        v_default = model.backbone.predict_velocity(x, s, cond)
    # adapters off is exactly the pretrained model: measured bit-identical (torch 2.13.0 / 2.14.1, 3 seeds, AVX-512 /
    # AVX2 / baseline CPU kernels); 1e-5 of the largest velocity leaves room for a reordered float32 reduction
    torch.testing.assert_close(v["teacher"], v_base, rtol=0, atol=1e-5 * v_base.abs().max().item())
    # each pair measured apart by 0.6 of the scale or more
    assert not torch.allclose(v["student"], v["critic"]) and not torch.allclose(v["student"], v["teacher"])
    assert torch.equal(v_default, v["student"])  # outside a role the student is active (generate, export)
    flags = {n: p.requires_grad for n, p in model.backbone.denoiser.named_parameters()}
    assert all(flags[n] == ("lora_" in n) for n in flags)  # both adapters trainable again after every switch

    base = {n: p.clone() for n, p in model.backbone.denoiser.named_parameters() if "lora_" not in n}
    before = snapshot(model.backbone.denoiser)
    trainer(2).fit(model, prompts_data())
    moved = changed(before, model.backbone.denoiser)
    assert any(".default." in n for n in moved) and any(".critic." in n for n in moved)
    assert all(torch.equal(p, base[n]) for n, p in model.backbone.denoiser.named_parameters() if n in base)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_pipeline_export_of_shared_base_is_the_student(tiny_pixel_pipeline, tmp_path):
    model = make_dmd(tiny_pixel_pipeline, lora_rank=4, shared_base=True)
    with torch.no_grad():
        for name, p in model.backbone.denoiser.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    model.backbone.save_pretrained(tmp_path / "pipe")
    exported = DiffusersVideoBackbone(str(tmp_path / "pipe"), max_sequence_length=16)
    cond = model.backbone.encode_prompts(["a blue ball falls"])
    x, s = torch.randn(1, *model.backbone.latent_shape(16, 32, 32)), torch.full((1,), 0.5)
    with torch.no_grad():
        expected = model.velocity("student", x, s, cond)
        # merged weights round differently from base + LoRA: max |err| / max |expected| measured up to 3.0e-7
        # (torch 2.13.0 / 2.14.1, 4 seeds, 1-4 threads, AVX-512 / AVX2 / baseline CPU kernels); 1e-5 is 30x that
        torch.testing.assert_close(exported.predict_velocity(x, s, cond), expected, rtol=0,
                                   atol=1e-5 * expected.abs().max().item())


def test_regression_warmup_fits_teacher_ode_pairs(tiny_pixel_pipeline):
    """The warm-up regresses the student onto teacher samples: its loss on the pairs falls."""
    torch.manual_seed(0)
    model = make_dmd(tiny_pixel_pipeline, regression_steps=100, regression_pairs=4, teacher_steps=4,
                     student_sigmas=[1.0, 0.5], num_inference_steps=2,
                     optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3))
    prompts = ["a red ball falls", "a blue ball moves left", "a green ball falls", "a white ball moves right"]
    model.regression_loss(prompts)  # builds the 4 pairs
    pairs = model._pairs
    assert pairs.states.shape[:2] == (4, 2) and pairs.x0.shape[0] == 4

    def pair_loss():
        cond = model.backbone.encode_prompts(pairs.prompts)
        with torch.no_grad():
            return sum(torch.nn.functional.mse_loss(model.student_x0(pairs.states[:, j], torch.full((4,), s), cond),
                                                    pairs.x0).item() for j, s in enumerate([1.0, 0.5]))

    before = pair_loss()
    opt = torch.optim.AdamW(model.student_parameters(), lr=3e-3)
    for _ in range(8):
        opt.zero_grad()
        model.regression_loss(prompts).backward()
        opt.step()
    assert pair_loss() < 0.7 * before


def test_gan_head_and_warmup_train_and_need_real_videos(tiny_pixel_pipeline):
    # Gradient checkpointing recomputes blocks in the backward pass: each adapter's backward must run while that
    # adapter is active (different ranks would make a mismatch raise).
    bb = DiffusersVideoBackbone(tiny_pixel_pipeline, max_sequence_length=16, gradient_checkpointing=True)
    model = DMD(bb, lora_rank=4, shared_base=True, critic_lora_rank=2, gan_weight=0.1, regression_steps=1,
                regression_pairs=2, teacher_steps=3, teacher_guidance_scale=2.0)
    head = snapshot(model.gan_head)
    t = trainer(4)
    t.fit(model, prompts_data(videos=True))
    assert changed(head, model.gan_head)
    for key in ("train/regression_loss", "train/gan_critic", "train/gan_generator", "train/dm_loss"):
        assert torch.isfinite(t.callback_metrics[key]), key
    model = make_dmd(tiny_pixel_pipeline, gan_weight=0.1)
    with pytest.raises(ValueError, match="needs real videos"):
        trainer(2).fit(model, prompts_data(videos=False))


def count_denoiser_calls(model):
    calls = []
    handles = [m.register_forward_hook(lambda *a: calls.append(1)) for m in
               (model.backbone.denoiser, model._reference_denoiser, model.critic) if m is not None]
    return calls, handles


def test_generate_takes_the_student_steps_and_is_seeded(tiny_pixel_pipeline):
    model = make_dmd(tiny_pixel_pipeline, student_sigmas=[1.0, 0.8, 0.5, 0.2])
    calls, handles = count_denoiser_calls(model)
    a = model.generate(["a red ball falls", "a blue ball falls"], seeds=[1, 2])
    assert len(calls) == 4  # one batched student call per step, no guidance
    b = model.generate(["a red ball falls", "a blue ball falls"], seeds=[1, 3])
    assert a.shape == (2, 16, 3, 32, 32) and 0 <= a.min() and a.max() <= 1
    assert torch.equal(a[0], b[0]) and not torch.equal(a[1], b[1])
    calls.clear()
    model.generate(["a red ball falls"], num_inference_steps=2)
    assert len(calls) == 2
    for h in handles:
        h.remove()
    assert model.student_grid().tolist() == pytest.approx([1.0, 0.8, 0.5, 0.2, 0.0])


def test_generate_goes_through_sample_latents_with_each_seeds_draws(tiny_pixel_pipeline):
    model = make_dmd(tiny_pixel_pipeline, student_sigmas=[1.0, 0.8, 0.5, 0.2], guidance_scale=1.5).eval()
    prompts = ["a red ball falls", "a blue ball falls"]
    hp = model.hparams
    noise, generators = seeded_noise(model.backbone.latent_shape(hp.num_frames, hp.height, hp.width), [1, 2])
    with torch.no_grad():
        latents = model.sample_latents(noise, model.backbone.encode_prompts(prompts), generator=generators)
    assert torch.equal(latents, model.generate(prompts, seeds=[1, 2], return_latents=True))
    alone = model.generate(prompts[1:], seeds=[2], return_latents=True)
    # a video's re-noising draws come from its own seed; alone, it is batched differently: max |err| / max |latents|
    # measured 2.2e-7 (torch 2.13.0 / 2.14.1, 3 seeds, AVX-512 / AVX2 / baseline CPU kernels); 1e-5 is 45x that
    torch.testing.assert_close(alone[0], latents[1], rtol=0, atol=1e-5 * latents[1].abs().max().item())


def test_checkpoint_loads_for_generation(tiny_pixel_pipeline, tmp_path):
    model = make_dmd(tiny_pixel_pipeline, lora_rank=4, shared_base=True, optimizer=lambda p: torch.optim.AdamW(p, 1e-2))
    t = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                  limit_val_batches=0, default_root_dir=tmp_path)  # one batch: a critic and a generator step
    t.fit(model, prompts_data())
    ckpt = next(tmp_path.rglob("*.ckpt"))
    fresh = make_dmd(tiny_pixel_pipeline, lora_rank=4, shared_base=True)
    load_weights(fresh, ckpt)
    assert torch.equal(fresh.generate(["a red ball falls"], seeds=[5]), model.generate(["a red ball falls"], seeds=[5]))


def test_bad_arguments_are_named(tiny_pixel_pipeline):
    with pytest.raises(ValueError, match="lora_rank"):
        make_dmd(tiny_pixel_pipeline, shared_base=True)
    with pytest.raises(ValueError, match="student_sigmas"):
        make_dmd(tiny_pixel_pipeline, student_sigmas=[1.0, 0.5])
    with pytest.raises(ValueError, match="decreasing"):
        make_dmd(tiny_pixel_pipeline, student_sigmas=[1.0, 0.5, 0.6, 0.1])
    with pytest.raises(ValueError, match="student_sampler"):
        make_dmd(tiny_pixel_pipeline, student_sampler="ddim")
    with pytest.raises(ValueError, match="critic_lora_rank"):
        make_dmd(tiny_pixel_pipeline, critic_lora_rank=4)
