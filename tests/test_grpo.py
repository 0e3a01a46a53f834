"""GRPO: pure losses by hand, the on-policy check, NaN masking, and a few updates that move the reward."""

import lightning as L
import pytest
import torch

from lit_videoalign.backbones.diffusers import DiffusersVideoBackbone
from lit_videoalign.objectives.grpo import GRPO, gaussian_kl, group_advantages, grpo_policy_loss
from lit_videoalign.testing import Brightness


class NaNForOddItems(Brightness):
    def forward(self, videos, prompts=None, references=None):
        b = videos.mean((1, 2, 3, 4)).clone()
        b[1::2] = float("nan")
        return {"brightness": b, "overall": b}


class Broken(Brightness):
    def forward(self, videos, prompts=None, references=None):
        raise RuntimeError("judge offline")


def test_group_advantages_by_hand():
    adv = group_advantages(torch.tensor([1.0, 3.0, 5.0, 5.0]), group_size=2, eps=0.0)
    assert torch.allclose(adv, torch.tensor([-1.0, 1.0, float("nan"), float("nan")]), equal_nan=True)
    adv = group_advantages(torch.tensor([1.0, 3.0, 5.0, 5.0]), group_size=2)  # eps keeps equal groups at 0
    assert torch.allclose(adv, torch.tensor([-1.0 / 1.0001, 1.0 / 1.0001, 0.0, 0.0]), atol=1e-6)
    assert torch.isfinite(group_advantages(torch.ones(8), 4)).all()
    # invalid samples are left out of the statistics and get 0
    adv = group_advantages(torch.tensor([1.0, 100.0, 3.0]), 3, eps=0.0, valid=torch.tensor([True, False, True]))
    assert torch.allclose(adv, torch.tensor([-1.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match="multiple of group_size=3"):
        group_advantages(torch.ones(4), 3)


def test_policy_loss_by_hand_and_clipping_on_both_signs():
    old = torch.zeros(4)
    lp = torch.log(torch.tensor([1.5, 1.5, 0.5, 0.5]))  # ratios 1.5, 1.5, 0.5, 0.5
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    # c = 0.2: A>0, r=1.5 -> max(-1.5, -1.2) = -1.2 (clipped); A<0, r=1.5 -> max(1.5, 1.2) = 1.5 (unclipped);
    #          A>0, r=0.5 -> max(-0.5, -0.8) = -0.5 (unclipped); A<0, r=0.5 -> max(0.5, 0.8) = 0.8 (clipped)
    assert torch.allclose(grpo_policy_loss(lp, old, adv, 0.2), torch.tensor((-1.2 + 1.5 - 0.5 + 0.8) / 4))
    # clipped terms carry no gradient: positive advantage above 1 + c, negative advantage below 1 - c
    lp = lp.clone().requires_grad_(True)
    grpo_policy_loss(lp, old, adv, 0.2).backward()
    assert lp.grad[0] == 0 and lp.grad[3] == 0 and lp.grad[1] != 0 and lp.grad[2] != 0


def test_gaussian_kl_by_hand():
    mean, ref = torch.ones(2, 3), torch.zeros(2, 3)
    std = torch.tensor([1.0, 2.0]).view(2, 1)
    assert torch.allclose(gaussian_kl(mean, ref, std), torch.tensor([0.5, 0.125]))


def make_grpo(tiny_pixel_pipeline, reward=None, **kwargs):
    bb = DiffusersVideoBackbone(tiny_pixel_pipeline, max_sequence_length=16)
    defaults = dict(lora_rank=4, group_size=4, num_sampling_steps=3, num_inference_steps=3,
                    optimizer=lambda p: torch.optim.AdamW(p, lr=3e-2))
    return GRPO(bb, reward=reward or Brightness(), **{**defaults, **kwargs})


def trainer(steps):
    return L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)


def prompt_loader(n=2, batch_size=2):
    prompts = [{"prompt": p} for p in ["a red ball falls", "a blue ball moves left"] * n]
    return torch.utils.data.DataLoader(prompts, batch_size=batch_size)


def test_first_inner_step_is_on_policy(tiny_pixel_pipeline):
    model = make_grpo(tiny_pixel_pipeline, rollout_guidance_scale=3.0, micro_batch_size=3)
    rollout = model.rollout(["a red ball falls", "a blue ball falls"], generator=torch.Generator().manual_seed(0))
    model.train()
    idx = torch.arange(len(rollout.prompts))
    for step in rollout.sde_steps:
        log_prob, _, _ = model.step_log_prob(rollout, idx[:3], step)
        ratio = torch.exp(log_prob - rollout.log_probs[:3, step])
        assert (ratio - 1).abs().max() < 1e-4


def test_updates_change_only_lora_and_log_an_on_policy_ratio(tiny_pixel_pipeline):
    model = make_grpo(tiny_pixel_pipeline)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    t = trainer(2)
    t.fit(model, train_dataloaders=prompt_loader())
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert changed and all("lora_" in n for n in changed)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert t.callback_metrics["train/ratio_first_max_dev"] < 1e-4
    assert model._reference_denoiser is None  # kl_beta = 0 spends no reference weights


def test_several_updates_per_rollout_batch_step_the_optimizer_each_time(tiny_pixel_pipeline):
    model = make_grpo(tiny_pixel_pipeline, micro_batch_size=2, updates_per_epoch=2, clip_range=0.2)
    t = trainer(1)
    t.fit(model, train_dataloaders=prompt_loader(1, 1))  # 4 rollouts in 2 micro-batches, one update after each
    assert t.optimizers[0].state_dict()["state"][0]["step"] == 2
    assert t.callback_metrics["train/ratio_first_max_dev"] < 1e-4  # the first update is on-policy
    assert t.callback_metrics["train/ratio_max"] - t.callback_metrics["train/ratio_min"] > 0  # the second is not
    with pytest.raises(ValueError, match="updates_per_epoch=3 needs at least that many micro-batches"):
        trainer(1).fit(make_grpo(tiny_pixel_pipeline, micro_batch_size=2, updates_per_epoch=3),
                       train_dataloaders=prompt_loader(1, 1))


def test_nan_rewards_are_masked_and_counted(tiny_pixel_pipeline):
    model = make_grpo(tiny_pixel_pipeline, reward=NaNForOddItems())
    rollout = model.rollout(["a red ball falls"])
    assert rollout.valid.tolist() == [True, False, True, False]
    assert (rollout.advantages[1::2] == 0).all() and torch.isfinite(rollout.advantages).all()
    t = trainer(1)
    t.fit(model, train_dataloaders=prompt_loader(1, 1))
    assert t.callback_metrics["train/masked_samples"] == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_raising_reward_skips_the_update(tiny_pixel_pipeline):
    model = make_grpo(tiny_pixel_pipeline, reward=Broken())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.warns(UserWarning, match="judge offline"):  # skipped batches are not optimizer steps
        L.Trainer(max_epochs=1, limit_train_batches=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False).fit(model, prompt_loader(1, 1))
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


def test_kl_term_uses_the_adapter_free_reference(tiny_pixel_pipeline):
    model = make_grpo(tiny_pixel_pipeline, kl_beta=0.1, inner_epochs=2)
    t = trainer(1)
    t.fit(model, train_dataloaders=prompt_loader(1, 1))
    assert model._reference_denoiser is None  # LoRA: the reference is the base with adapters off
    assert torch.isfinite(t.callback_metrics["train/kl"])


def test_full_finetune_kl_keeps_a_frozen_reference(tiny_pixel_pipeline):
    model = make_grpo(tiny_pixel_pipeline, lora_rank=None, kl_beta=0.1,
                      optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
    ref = {n: p.detach().clone() for n, p in model._reference_denoiser.named_parameters()}
    trainer(1).fit(model, train_dataloaders=prompt_loader(1, 1))
    assert all(torch.equal(ref[n], p) for n, p in model._reference_denoiser.named_parameters())
    assert not any(k.startswith("_reference_denoiser.") for k in model.state_dict())


def test_grpo_raises_the_reward(tiny_pixel_pipeline):
    """A few updates on a brightness reward make deterministic samples brighter."""
    torch.manual_seed(0)
    model = make_grpo(tiny_pixel_pipeline, group_size=8, inner_epochs=2, lora_rank=None, clip_range=0.2,
                      optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3))
    prompts = ["a red ball falls", "a blue ball moves left"]
    before = model.generate(prompts, seeds=[0, 1]).mean()
    trainer(6).fit(model, train_dataloaders=prompt_loader(3))
    after = model.generate(prompts, seeds=[0, 1]).mean()
    assert after > before + 0.01, (before, after)


def test_bad_arguments_are_named(tiny_pixel_pipeline):
    with pytest.raises(ValueError, match="group_size"):
        make_grpo(tiny_pixel_pipeline, group_size=1)
    with pytest.raises(ValueError, match="sde_window"):
        make_grpo(tiny_pixel_pipeline, sde_window=9)
    with pytest.raises(TypeError, match="RewardModel"):
        make_grpo(tiny_pixel_pipeline, reward=lambda v: v)
