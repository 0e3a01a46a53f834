"""Self-Forcing on the tiny pixel-space Wan: the student's rollout is chunk by chunk with a KV cache exactly as its
sampler, earlier chunks never depend on later ones, gradients reach only each chunk's exit step, teacher forcing puts
the real chunks in the cache, training moves the student and the critic and never the teacher, the warm-up regresses
onto teacher ODE pairs, the diffusion-forcing warm-up learns real clips at its own learning rate, resume is exact, and
bad settings are refused in one line."""

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lit_videoalign.backbones.diffusers import DiffusersVideoBackbone
from lit_videoalign.data.resumable import ResumableDataLoader
from lit_videoalign.objectives.self_forcing import (
    SelfForcing,
    check_streaming,
    chunk_exit_steps,
    diffusion_forcing_loss,
    diffusion_forcing_sigmas,
)
from lit_videoalign.testing import Brightness

PROMPTS = ["a red ball falls", "a blue ball moves left"]
VIDEO = dict(num_frames=16, height=32, width=32)  # pixel space: latents (3, 16, 32, 32), 4 chunks of 4 frames


def model(path: str, **kwargs) -> SelfForcing:
    L.seed_everything(0)
    options = dict(chunk_frames=4, num_inference_steps=2, teacher_steps=2, optimizer=adam(1e-3), **VIDEO)
    return SelfForcing(DiffusersVideoBackbone(path, max_sequence_length=16), **{**options, **kwargs})


def adam(lr: float):
    return lambda params: torch.optim.AdamW(params, lr=lr)


def loader(n: int = 4, videos: bool = False) -> ResumableDataLoader:
    g = torch.Generator().manual_seed(0)
    items = [{"prompt": PROMPTS[i % 2], **({"video": torch.rand(16, 3, 32, 32, generator=g)} if videos else {})}
             for i in range(n)]
    return ResumableDataLoader(items, batch_size=2, shuffle=True, generator=torch.Generator().manual_seed(1))


def fit(module, steps: int, data=None, root=None, ckpt_path=None) -> L.Trainer:
    callbacks = [] if root is None else [ModelCheckpoint(dirpath=root, filename="{step}", every_n_train_steps=2,
                                                         save_top_k=-1)]
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=root is not None,
                        callbacks=callbacks, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, data or loader(), ckpt_path=ckpt_path)
    return trainer


def test_the_sampler_is_causal_and_streams_past_the_trained_length(tiny_pixel_pipeline):
    m = model(tiny_pixel_pipeline).eval()
    cond = m.backbone.encode_prompts(PROMPTS)
    noise = torch.randn(2, 3, 16, 32, 32, generator=torch.Generator().manual_seed(0))
    def seeded(fn, *args, **kwargs):  # the renoising draws come from the generator: the same for every call
        return fn(*args, generator=torch.Generator().manual_seed(9), **kwargs)

    video = seeded(m.sample_latents, noise, cond)
    chunks = list(seeded(m.stream_latents, noise, cond))
    assert len(chunks) == 4 and torch.equal(torch.cat(chunks, dim=2), video)
    other = noise.clone()
    other[:, :, 8:] = torch.randn(2, 3, 8, 32, 32)  # later chunks' noise changes, earlier outputs do not
    changed = seeded(m.sample_latents, other, cond)
    torch.testing.assert_close(changed[:, :, :8], video[:, :, :8], rtol=0, atol=1e-6)
    assert (changed[:, :, 8:] - video[:, :, 8:]).abs().max() > 1e-3
    # the teacher is bidirectional: the same weights outside a causal call let later frames change earlier ones
    x, s = noise, torch.full((2,), 0.5)
    with torch.no_grad():
        a, b = m.backbone.predict_velocity(x, s, cond), m.backbone.predict_velocity(other, s, cond)
    assert (a[:, :, :8] - b[:, :, :8]).abs().max() > 1e-4
    # 4x the trained length, with a rolling window of 2 chunks and a sink of 1: 16 chunks, finite
    long = torch.cat(list(m.stream_latents(torch.randn(1, 3, 64, 32, 32), cond.index(slice(0, 1)),
                                           window_chunks=2, sink_chunks=1)), dim=2)
    assert long.shape == (1, 3, 64, 32, 32) and torch.isfinite(long).all()


def test_the_training_rollout_is_the_sampler_and_gradients_reach_only_exit_steps(tiny_pixel_pipeline, monkeypatch):
    m = model(tiny_pixel_pipeline).eval()
    cond = m.backbone.encode_prompts(PROMPTS)
    noise = torch.randn(2, 3, 16, 32, 32, generator=torch.Generator().manual_seed(0))
    # with every exit at the last step, the training rollout without gradients is the sampler (renoise draws aside:
    # the sampler's 2 steps renoise once per chunk from the same global RNG stream)
    import lit_videoalign.objectives.self_forcing as sf

    monkeypatch.setattr(sf, "chunk_exit_steps", lambda n, k, generator=None: [k - 1] * n)
    torch.manual_seed(5)
    rollout = m.sample_student(cond, noise)
    torch.manual_seed(5)
    sampled = m.sample_latents(noise, cond)  # no generator: the global RNG, as the training rollout draws
    torch.testing.assert_close(rollout, sampled, rtol=0, atol=1e-6)
    # gradients: the student's calls with gradients are exactly one per chunk (its exit), the cache updates none
    calls = []
    forward = m.causal.forward_chunk

    def counting(*args, **kwargs):
        calls.append(torch.is_grad_enabled())
        return forward(*args, **kwargs)

    monkeypatch.setattr(m.causal, "forward_chunk", counting)
    monkeypatch.setattr(sf, "chunk_exit_steps", lambda n, k, generator=None: [0, 1, 1, 0])
    out = m.sample_student(cond, noise, grad=True)
    assert calls.count(True) == 4 and len(calls) == 6 + 3  # exits 0,1,1,0: 1+2+2+1 step calls, 3 cache updates
    out.square().mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.backbone.denoiser.parameters())
    steps = chunk_exit_steps(4000, 4, torch.Generator().manual_seed(0))
    assert set(steps) == {0, 1, 2, 3} and abs(sum(steps) / len(steps) - 1.5) < 0.1  # uniform over the steps


def test_teacher_forcing_caches_the_real_chunks(tiny_pixel_pipeline, monkeypatch):
    import lit_videoalign.objectives.self_forcing as sf

    m = model(tiny_pixel_pipeline, context="teacher").eval()
    monkeypatch.setattr(sf, "chunk_exit_steps", lambda n, k, generator=None: [k - 1] * n)
    cond = m.backbone.encode_prompts(PROMPTS)
    noise = torch.randn(2, 3, 16, 32, 32, generator=torch.Generator().manual_seed(0))
    real = torch.rand(2, 16, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    context = m.student_context({"prompt": PROMPTS, "video": real})
    torch.testing.assert_close(context, m.backbone.encode_videos(real))
    outs = []
    for ctx in (context, -context):
        torch.manual_seed(3)
        outs.append(m.sample_student(cond, noise, context=ctx))
    torch.testing.assert_close(outs[0][:, :, :4], outs[1][:, :, :4], rtol=0, atol=1e-6)  # chunk 0 has no context
    assert (outs[0][:, :, 4:] - outs[1][:, :, 4:]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="needs real videos in the batch"):
        m.student_context({"prompt": PROMPTS})


@pytest.mark.parametrize("context", ["self", "teacher"])
def test_training_moves_student_and_critic_never_the_teacher(tiny_pixel_pipeline, context):
    m = model(tiny_pixel_pipeline, context=context, regression_steps=1, regression_pairs=2)
    student, critic = ({n: p.detach().clone() for n, p in mod.named_parameters()}
                       for mod in (m.backbone.denoiser, m.critic))
    teacher = {n: p.detach().clone() for n, p in m._reference_denoiser.named_parameters()}
    fit(m, 6, loader(videos=context == "teacher"))  # 3 batches: the warm-up, then 2 of distribution matching
    assert m.generator_updates == 3 and m.nonfinite_skips == 0
    for before, module in ((student, m.backbone.denoiser), (critic, m.critic)):
        assert all(torch.isfinite(p).all() for p in module.parameters())
        assert any(not torch.equal(before[n], p) for n, p in module.named_parameters())
    assert all(torch.equal(teacher[n], p) for n, p in m._reference_denoiser.named_parameters())


def test_shared_base_lora_and_the_reward_term_train_the_adapters_alone(tiny_pixel_pipeline):
    m = model(tiny_pixel_pipeline, lora_rank=4, shared_base=True, reward=Brightness(), reward_weight=1.0)
    base = {n: p.detach().clone() for n, p in m.backbone.denoiser.named_parameters() if "lora_" not in n}
    adapters = {n: p.detach().clone() for n, p in m.backbone.denoiser.named_parameters() if "lora_" in n}
    fit(m, 4)
    after = dict(m.backbone.denoiser.named_parameters())
    assert all(torch.equal(base[n], after[n]) for n in base)
    for role in (".default.", ".critic."):
        assert any(not torch.equal(adapters[n], after[n]) for n in adapters if role in n), f"{role} did not train"


@pytest.mark.parametrize("clean_context", [False, True])
def test_the_warm_up_regresses_each_chunk_at_its_own_sigma(tiny_pixel_pipeline, clean_context, monkeypatch):
    m = model(tiny_pixel_pipeline, regression_steps=50, regression_pairs=2, optimizer=adam(3e-3),
              regression_clean_context=clean_context)
    seen = []
    full = m.causal.forward_full
    monkeypatch.setattr(m.causal, "forward_full", lambda x, sigmas, *a, **k: seen.append(sigmas) or full(x, sigmas,
                                                                                                        *a, **k))
    with torch.no_grad():
        first = m.regression_loss(PROMPTS).item()
    torch.manual_seed(0)
    opt = torch.optim.AdamW([p for p in m.backbone.denoiser.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(30):
        opt.zero_grad()
        m.regression_loss(PROMPTS).backward()
        opt.step()
    with torch.no_grad():
        last = sum(m.regression_loss(PROMPTS).item() for _ in range(4)) / 4
    assert last < 0.7 * first
    sigmas = torch.cat(seen)  # (calls * b, chunks)
    clean = sigmas == 0
    assert bool(clean.any()) == clean_context  # sigma 0 only as a clean prefix: never after a noisy chunk
    assert not bool((clean[:, 1:] & ~clean[:, :-1]).any())


def test_diffusion_forcing_draws_a_clean_prefix_and_regresses_only_noisy_chunks():
    g = torch.Generator().manual_seed(0)
    sigmas = diffusion_forcing_sigmas(512, 4, shift=3.0, generator=g)  # (b, chunks)
    clean = sigmas == 0
    assert sigmas.shape == (512, 4) and bool((sigmas >= 0).all()) and bool((sigmas < 1).all())
    assert not bool((clean[:, 1:] & ~clean[:, :-1]).any())  # clean chunks only as a prefix
    assert not bool(clean.all(dim=1).any())  # at least the last chunk is noisy
    prefix = clean.sum(dim=1)
    assert all(bool((prefix == m).any()) for m in range(4))  # every prefix length is drawn
    assert sigmas[~clean].median() > 0.5  # shift 3 pushes the noisy chunks' sigmas up
    v, target = torch.randn(2, 3, 8, 4, 4), torch.randn(2, 3, 8, 4, 4)
    s = torch.tensor([[0.0, 0.5], [0.3, 0.7]])  # sample 0's first chunk (frames 0-3) is clean
    loss = diffusion_forcing_loss(v, target, s)
    by_frame = (v - target).pow(2).mean(dim=(1, 3, 4))
    torch.testing.assert_close(loss, torch.cat([by_frame[0, 4:], by_frame[1]]).mean())
    v2 = v.clone()
    v2[0, :, :4] += 10.0  # a clean chunk's prediction carries no loss
    torch.testing.assert_close(diffusion_forcing_loss(v2, target, s), loss)
    with pytest.raises(ValueError, match="every chunk is clean"):
        diffusion_forcing_loss(v, target, torch.zeros(2, 2))


def test_the_diffusion_forcing_warm_up_learns_real_clips_at_its_own_lr(tiny_pixel_pipeline, monkeypatch):
    m = model(tiny_pixel_pipeline, warmup="diffusion_forcing", regression_steps=3, warmup_lr=5e-3,
              optimizer=adam(1e-4))
    batch = next(iter(loader(2, videos=True)))
    seen = []
    full = m.causal.forward_full
    monkeypatch.setattr(m.causal, "forward_full", lambda x, sigmas, *a, **k: seen.append(sigmas) or full(x, sigmas,
                                                                                                        *a, **k))

    @torch.no_grad()
    def held_loss():  # the same noise and sigmas each time
        torch.manual_seed(1)
        return sum(m.diffusion_forcing_loss(batch, batch["prompt"]).item() for _ in range(8)) / 8

    first = held_loss()
    opt = torch.optim.AdamW([p for p in m.backbone.denoiser.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(30):
        opt.zero_grad()
        m.diffusion_forcing_loss(batch, batch["prompt"]).backward()
        opt.step()
    assert held_loss() < 0.8 * first
    assert any(bool((s == 0).any()) for s in seen) and all(bool((s > 0).any(dim=1).all()) for s in seen)

    m = model(tiny_pixel_pipeline, warmup="diffusion_forcing", regression_steps=2, warmup_lr=5e-3,
              optimizer=adam(1e-4))
    lrs = []
    step = m._step
    monkeypatch.setattr(m, "_step", lambda opt, loss: (lrs.append(opt.param_groups[0]["lr"]), step(opt, loss)))
    fit(m, 8, data=loader(8, videos=True))  # 4 batches: 2 warm-up, then distribution matching
    assert lrs[1::2] == [5e-3, 5e-3, 1e-4, 1e-4]  # per batch: the critic's step, then the student's
    assert set(lrs[0::2]) == {1e-4}
    m = model(tiny_pixel_pipeline, warmup="diffusion_forcing", regression_steps=2)
    with pytest.raises(ValueError, match="warmup='diffusion_forcing' needs real videos in the batch"):
        fit(m, 3)


@pytest.mark.parametrize("warmup", [None, "diffusion_forcing"])
def test_resume_is_exact(tiny_pixel_pipeline, tmp_path, warmup):
    # with a warm-up: resumed inside it (at its own learning rate), then past its end (back to the optimizer's)
    options = {} if warmup is None else dict(warmup=warmup, regression_steps=2, warmup_lr=5e-3)
    steps, data = (4, loader) if warmup is None else (6, lambda: loader(8, videos=True))
    fit(model(tiny_pixel_pipeline, **options), steps, data(), root=tmp_path / "full")
    fit(model(tiny_pixel_pipeline, **options), steps, data(), root=tmp_path / "resumed",
        ckpt_path=tmp_path / "full" / "step=2.ckpt")
    full, resumed = (torch.load(tmp_path / d / f"step={steps}.ckpt", weights_only=True) for d in ("full", "resumed"))
    assert full["state_dict"].keys() == resumed["state_dict"].keys()
    assert all(torch.equal(full["state_dict"][k], resumed["state_dict"][k]) for k in full["state_dict"])
    assert full["self_forcing_state"]["generator_updates"] == steps // 2
    assert [g["lr"] for g in resumed["optimizer_states"][0]["param_groups"]] == [1e-3]


def test_bad_settings_are_refused_in_one_line(tiny_pixel_pipeline, tmp_path):
    from lit_videoalign.testing import tiny_ltx_pipeline

    bad = {"chunk_frames=3 does not divide the 16 latent frames": dict(chunk_frames=3),
           "kv_window_chunks=0: the KV window must hold at least one chunk": dict(kv_window_chunks=0),
           "sink_chunks=2 must be 0, or smaller than kv_window_chunks=2": dict(kv_window_chunks=2, sink_chunks=2),
           "context must be one of": dict(context="clean"),
           "reward_weight=1.0 must be >= 0, and > 0 needs a reward": dict(reward_weight=1.0),
           "warmup must be one of": dict(warmup="causvid"),
           "regression_clean_context applies to warmup: ode": dict(warmup="diffusion_forcing",
                                                                   regression_clean_context=True),
           "warmup_lr=0.0 must be positive": dict(warmup_lr=0.0)}
    for message, kwargs in bad.items():
        with pytest.raises(ValueError, match=message) as err:
            model(tiny_pixel_pipeline, **kwargs)
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="cannot run causally"):
        SelfForcing(DiffusersVideoBackbone(str(tiny_ltx_pipeline(tmp_path / "ltx")), max_sequence_length=16),
                    num_frames=9, height=64, width=64, chunk_frames=1)
    m = model(tiny_pixel_pipeline)
    cond = m.backbone.encode_prompts(PROMPTS[:1])
    with pytest.raises(ValueError, match="samples without classifier-free guidance"):
        m.sample_latents(torch.randn(1, 3, 16, 32, 32), cond, guidance_scale=3.0)
    with pytest.raises(ValueError, match="does not divide the 18 latent frames"):
        next(m.stream_latents(torch.randn(1, 3, 18, 32, 32), cond))
    with pytest.raises(ValueError, match="sink_chunks=1 must be 0, or smaller"):
        check_streaming(16, 4, None, 1)
