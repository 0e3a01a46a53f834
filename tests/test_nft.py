"""DiffusionNFT and AWM: the pure losses against hand computations and their limits, the optimality probability, bad
arguments named at construction, the EMA sampling policy, and a few updates that move the reward."""

import lightning as L
import pytest
import torch

from lit_videoalign.backbones.diffusers import DiffusersVideoBackbone
from lit_videoalign.objectives.nft import (
    DiffusionNFT,
    adaptive_weight,
    awm_loss,
    nft_adaptive_loss,
    nft_loss,
    old_policy_decay,
    optimality_probability,
)
from lit_videoalign.objectives.sft import flow_matching_loss
from lit_videoalign.testing import Brightness
from reward_zoo.base import RewardModel


# -- pure losses by hand --------------------------------------------------------------------------------------------
# allclose's default rtol 1e-5 in these stands for float32 rounding: they measured exact on torch 2.13.0 / 2.14.1
# (3 seeds, AVX-512 / AVX2 / baseline CPU kernels).
def test_nft_loss_by_hand():
    # one sample, two elements; beta = 0.5: v+ = 0.5 * v_old + 0.5 * v_theta, v- = 1.5 * v_old - 0.5 * v_theta
    v_theta, v_old, target = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 2.0]]), torch.tensor([[1.0, 1.0]])
    # v+ = (1, 1) -> mse 0; v- = (-1, 3) -> mse ((-2)^2 + 2^2) / 2 = 4
    assert torch.allclose(nft_loss(v_theta, v_old, target, torch.tensor([0.25]), 0.5), torch.tensor(0.75 * 4.0))
    assert torch.allclose(nft_loss(v_theta, v_old, target, torch.tensor([1.0]), 0.5), torch.tensor(0.0))
    # batch mean of per-sample terms
    two = nft_loss(v_theta.repeat(2, 1), v_old.repeat(2, 1), target.repeat(2, 1), torch.tensor([1.0, 0.0]), 0.5)
    assert torch.allclose(two, torch.tensor(2.0))


def test_nft_gradient_with_r_one_is_flow_matching_on_the_positive_policy():
    torch.manual_seed(0)
    v_old, target = torch.randn(3, 4, 5), torch.randn(3, 4, 5)
    for beta in (1.0, 0.3):
        v_theta = torch.randn(3, 4, 5, requires_grad=True)
        nft_loss(v_theta, v_old, target, torch.ones(3), beta).backward()
        g_nft = v_theta.grad.clone()
        v_theta.grad = None
        flow_matching_loss((1 - beta) * v_old + beta * v_theta, target).backward()
        assert torch.allclose(g_nft, v_theta.grad)
    # beta = 1: the positive policy is the trained one, so the loss is plain flow matching
    v_theta = torch.randn(3, 4, 5)
    assert torch.allclose(nft_loss(v_theta, v_old, target, torch.ones(3), 1.0), flow_matching_loss(v_theta, target))


def test_nft_as_beta_goes_to_zero():
    """With ``v_theta = v_old + delta``, ``v+- = v_old +- beta delta``: as beta -> 0 the loss tends to the old policy's
    flow-matching error, and its gradient over beta tends to ``2 (2r - 1) <v_old - target, delta>``: the contrastive
    direction, towards the target for r > 1/2 and away from it for r < 1/2 (the paper's policy-improvement form)."""
    torch.manual_seed(1)
    v_old, delta, target = torch.randn(2, 8), torch.randn(2, 8), torch.randn(2, 8)
    r = torch.tensor([0.9, 0.2])
    base = flow_matching_loss(v_old, target)
    expected = (2 * (2 * r - 1) * ((v_old - target) * delta).mean(1)).mean()
    for beta in (1e-3, 1e-4):
        loss = nft_loss(v_old + delta, v_old, target, r, beta)
        # (loss - base) / beta is expected + beta mean(delta^2) exactly; the float32 losses near `base` add rounding of
        # a few ulp(base) / beta, measured up to 2.4 (torch 2.13.0 / 2.14.1, 6000 draws). The tolerance is the
        # second-order term plus 16 of those ulp; the former fixed atol 1e-3 failed on 5% of draws.
        tol = beta * delta.pow(2).mean().item() + 16 * torch.finfo(torch.float32).eps * base.item() / beta
        assert torch.allclose((loss - base) / beta, expected, rtol=1e-2, atol=tol)


def test_adaptive_weighting_by_hand():
    # one sample, two elements, sigma 0.5: v - target = (2, -2) -> x0 error 0.5 * (2, -2), mean |.| = 1.0
    v, target, sigma = torch.tensor([[3.0, -1.0]]), torch.tensor([[1.0, 1.0]]), torch.tensor([0.5])
    assert torch.allclose(adaptive_weight(v, target, sigma), torch.tensor([0.25 / 1.0]))
    # the weighted loss: sigma^2 mse / mean|x0 err| = 0.25 * 4 / 1 for the positive branch with r = 1, beta = 1
    loss = nft_adaptive_loss(v, torch.zeros_like(v), target, torch.ones(1), 1.0, sigma)
    assert torch.allclose(loss, torch.tensor(1.0))
    # the weight is detached: the gradient is the weighted mse's, nothing through the weight
    v = v.clone().requires_grad_(True)
    nft_adaptive_loss(v, torch.zeros_like(v), target, torch.ones(1), 1.0, sigma).backward()
    assert torch.allclose(v.grad, 0.25 * 2 * (v.detach() - target) / 2)
    # a perfect prediction is floored, not divided by zero
    assert torch.isfinite(adaptive_weight(target, target, sigma)).all()


def test_awm_loss_by_hand_and_masking():
    v, target = torch.tensor([[1.0, 1.0], [0.0, 2.0]]), torch.zeros(2, 2)  # mse 1 and 2
    assert torch.allclose(awm_loss(v, target, torch.tensor([1.0, -0.5])), torch.tensor((1.0 - 1.0) / 2))
    assert torch.allclose(awm_loss(v, target, torch.tensor([1.0, -0.5]), valid=torch.tensor([1.0, 0.0])),
                          torch.tensor(1.0))


def test_optimality_probability_by_hand():
    # groups (1, 3) and (5, 5): centred (-1, 1, 0, 0), global std sqrt(2/4), A = centred / std
    r, adv = optimality_probability(torch.tensor([1.0, 3.0, 5.0, 5.0]), 2, adv_clip_max=5.0, eps=0.0)
    std = 0.5**0.5
    assert torch.allclose(adv, torch.tensor([-1 / std, 1 / std, 0.0, 0.0]))
    assert torch.allclose(r, 0.5 + adv / 10)
    # per-group std: the first group's std is 1; an equal group gets r = 0.5 with eps, never NaN
    r, adv = optimality_probability(torch.tensor([1.0, 3.0, 5.0, 5.0]), 2, global_std=False, eps=1e-4)
    assert torch.allclose(adv[:2], torch.tensor([-1.0, 1.0]) / 1.0001) and (r[2:] == 0.5).all()
    # clipping at A_max maps to 0 and 1
    r, _ = optimality_probability(torch.tensor([0.0, 100.0, 0.0, 0.0]), 4, adv_clip_max=1.0)
    assert r.tolist()[1] == 1.0 and r.min() >= 0
    # NaN rewards: left out of the statistics, r = 0.5
    r, adv = optimality_probability(torch.tensor([1.0, float("nan"), 3.0, 1.0]), 2, eps=0.0)
    assert torch.isfinite(r).all() and r[1] == 0.5 and adv[1] == 0
    with pytest.raises(ValueError, match="multiple of group_size=3"):
        optimality_probability(torch.ones(4), 3)


def test_all_equal_rewards_give_a_pure_flow_matching_step():
    r, adv = optimality_probability(torch.full((8,), 0.7), 4)
    assert (r == 0.5).all() and (adv == 0).all()
    torch.manual_seed(2)
    v_theta, v_old, target = torch.randn(8, 6, requires_grad=True), torch.randn(8, 6), torch.randn(8, 6)
    loss = nft_loss(v_theta, v_old, target, r, 1.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(v_theta.grad).all()
    # r = 1/2: the two branches' pulls on v_theta cancel but for the trust-region term beta^2 ||v_theta - v_old||^2
    # the two branches' pulls cancel in float32: measured up to 1.2e-7 of the largest entry (torch 2.13.0 / 2.14.1,
    # 4 seeds, 1-4 threads, AVX-512 / AVX2 / baseline CPU kernels); 1e-5 of that entry is 80x that
    expected = 2 * (v_theta.detach() - v_old) / 6 / 8
    torch.testing.assert_close(v_theta.grad, expected, rtol=0, atol=1e-5 * expected.abs().max().item())


def test_old_policy_decay_schedule():
    assert old_policy_decay(0, 0.001, 0.5) == 0.0
    assert old_policy_decay(100, 0.001, 0.5) == pytest.approx(0.1)
    assert old_policy_decay(10_000, 0.001, 0.5) == 0.5


# -- the module -----------------------------------------------------------------------------------------------------
def make_nft(pipeline, reward=None, **kwargs):
    bb = DiffusersVideoBackbone(pipeline, max_sequence_length=16)
    defaults = dict(lora_rank=4, group_size=4, num_sampling_steps=3, num_inference_steps=3,
                    optimizer=lambda p: torch.optim.AdamW(p, lr=3e-2))
    return DiffusionNFT(bb, reward=reward or Brightness(), **{**defaults, **kwargs})


def trainer(steps):
    return L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)


def prompt_loader(n=2, batch_size=2):
    prompts = [{"prompt": p} for p in ["a red ball falls", "a blue ball moves left"] * n]
    return torch.utils.data.DataLoader(prompts, batch_size=batch_size)


class NotAReward(torch.nn.Module):
    def forward(self, videos, prompts=None):
        return {"brightness": videos.mean((1, 2, 3, 4))}


class FewStepStudent(DiffusionNFT):
    """A model with a sampler of its own (as a DMD or consistency student has)."""

    def sample_latents(self, noise, cond, **kwargs):
        return noise


def test_bad_arguments_are_named_at_construction(tiny_pixel_pipeline):
    for kwargs, match in [(dict(beta=0.0), "beta must be in"), (dict(beta=1.5), "beta must be in"),
                          (dict(group_size=1), "group_size must be at least 2"),
                          (dict(loss_type="ppo"), "loss_type must be one of"),
                          (dict(reward_key="motion"), "reward_key 'motion' is not a score of Brightness"),
                          (dict(sampler="dpm"), "sampler must be one of")]:
        with pytest.raises(ValueError, match=match):
            make_nft(tiny_pixel_pipeline, **kwargs)
    with pytest.raises(TypeError, match="RewardModel"):
        make_nft(tiny_pixel_pipeline, reward=NotAReward())
    bb = DiffusersVideoBackbone(tiny_pixel_pipeline, max_sequence_length=16)
    with pytest.raises(ValueError, match="FewStepStudent samples with its own sampler"):
        FewStepStudent(bb, reward=Brightness(), sampler="sde")
    assert isinstance(Brightness(), RewardModel)


def test_updates_train_only_the_lora_and_the_old_policy_follows(tiny_pixel_pipeline):
    model = make_nft(tiny_pixel_pipeline, micro_batch_size=2, updates_per_epoch=2)
    old = {n: p.detach().clone() for n, p in model.named_parameters() if ".old." in n}
    assert old and all(torch.equal(old[n], dict(model.named_parameters())[n.replace(".old.", ".default.")])
                       for n in old)  # the sampling policy starts as a copy
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    t = trainer(4)
    t.fit(model, train_dataloaders=prompt_loader(1, 1))  # 2 rollout batches, 2 optimizer steps each
    assert t.optimizers[0].state_dict()["state"][0]["step"] == 4
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert changed and all("lora_" in n for n in changed)
    assert any(".old." in n for n in changed) and any(".default." in n for n in changed)
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".old." in n)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # the decay follows the optimizer steps before each rollout batch: 0 (a copy) after the first, 0.002 after the
    # second (2 steps earlier): old = 0.002 * old + 0.998 * trained
    assert t.callback_metrics["train/old_decay"] == pytest.approx(0.002)


@pytest.mark.parametrize("kwargs", [dict(loss_type="awm"), dict(old_policy="base", kl_beta=0.1),
                                    dict(lora_rank=None, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3)),
                                    dict(sampler="sde", sigma_sampling="logit_normal", sigmas_per_sample=2,
                                         rollout_guidance_scale=2.0, adaptive_weighting=False)])
def test_every_variant_steps_and_stays_finite(tiny_pixel_pipeline, kwargs):
    model = make_nft(tiny_pixel_pipeline, **kwargs)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    t = trainer(1)
    t.fit(model, train_dataloaders=prompt_loader(1, 1))
    assert torch.isfinite(t.callback_metrics["train/policy_loss"])
    assert all(torch.isfinite(p).all() for p in model.parameters())
    named = dict(model.named_parameters())
    # frozen weights stay put, except the EMA sampling policy, which moves by its own update
    assert all(torch.equal(v, named[n]) for n, v in frozen.items() if ".old." not in n and "old_denoiser." not in n)
    if kwargs.get("lora_rank", 4) is None:  # full fine-tuning: the sampling policy is a frozen copy, moved by EMA
        assert model.old_denoiser is not None and not any(p.requires_grad for p in model.old_denoiser.parameters())
    if "kl_beta" in kwargs:
        assert torch.isfinite(t.callback_metrics["train/kl"])


def test_nan_rewards_are_masked_and_a_raising_reward_skips(tiny_pixel_pipeline):
    class NaNOdd(Brightness):
        def forward(self, videos, prompts=None, references=None):
            b = videos.mean((1, 2, 3, 4)).clone()
            b[1::2] = float("nan")
            return {"brightness": b, "overall": b}

    class Broken(Brightness):
        def forward(self, videos, prompts=None, references=None):
            raise RuntimeError("judge offline")

    model = make_nft(tiny_pixel_pipeline, reward=NaNOdd())
    rollout = model.rollout(["a red ball falls"])
    assert rollout.valid.tolist() == [True, False, True, False] and (rollout.r[1::2] == 0.5).all()
    t = trainer(1)
    t.fit(model, train_dataloaders=prompt_loader(1, 1))
    assert t.callback_metrics["train/masked_samples"] == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())
    model = make_nft(tiny_pixel_pipeline, reward=Broken())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.warns(UserWarning, match="judge offline"):
        L.Trainer(max_epochs=1, limit_train_batches=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False).fit(model, prompt_loader(1, 1))
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


def test_rollouts_come_from_the_sampling_policy(tiny_pixel_pipeline):
    """Under ``old_policy: ema`` rollouts sample with the old adapter: once it differs from the trained one, the
    rollout equals a sample of the old weights, not of the trained ones."""
    model = make_nft(tiny_pixel_pipeline)
    with torch.no_grad():
        for p in model.roles.parameters("default"):
            p.add_(0.05 * torch.randn_like(p))
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    rollout = model.rollout(["a red ball falls"], generator=gen())
    cond = model.backbone.encode_prompts(["a red ball falls"] * 4)
    noise = torch.randn((4, *model.backbone.latent_shape(16, 32, 32)), generator=gen())
    with torch.no_grad(), model.roles.use("old"):
        old = model.sample_latents(noise, cond, num_inference_steps=3, guidance_scale=1.0)
    with torch.no_grad():
        trained = model.sample_latents(noise, cond, num_inference_steps=3, guidance_scale=1.0)
    assert torch.equal(rollout.latents, old) and not torch.allclose(old, trained)  # measured 0.024 of the scale apart


@pytest.mark.parametrize("loss_type", ["nft", "awm"])
def test_nft_raises_the_reward(tiny_pixel_pipeline, loss_type):
    """A few updates on a brightness reward make deterministic samples brighter."""
    torch.manual_seed(0)
    model = make_nft(tiny_pixel_pipeline, loss_type=loss_type, group_size=8, lora_rank=None, sigmas_per_sample=2,
                     optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3))
    prompts = ["a red ball falls", "a blue ball moves left"]
    before = model.generate(prompts, seeds=[0, 1]).mean()
    trainer(8).fit(model, train_dataloaders=prompt_loader(4))  # measured: +0.016 (nft), +0.013 (awm)
    after = model.generate(prompts, seeds=[0, 1]).mean()
    assert after > before + 0.01, (before, after)
