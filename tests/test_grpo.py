"""GRPO: pure losses by hand, the on-policy check, NaN masking, a few updates that move the reward, and the
stabilisers (ratio normalisation, step weighting, KL schedule, batch arithmetic checked before any rollout)."""

import math

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lit_videoalign.backbones.diffusers import DiffusersVideoBackbone
from lit_videoalign.data.toyworld import ToyWorldDataModule
from lit_videoalign.objectives import grpo as grpo_module
from lit_videoalign.objectives.grpo import (
    GRPO,
    gaussian_kl,
    group_advantages,
    grpo_policy_loss,
    kl_coefficient,
    micro_batches_per_update,
    ratio_norm_log_ratio,
    step_weights,
)
from lit_videoalign.schedules.flow import sde_step_with_logprob
from lit_videoalign.testing import Brightness


class NaNForOddItems(Brightness):
    def forward(self, videos, prompts=None, references=None):
        b = videos.mean((1, 2, 3, 4)).clone()
        b[1::2] = float("nan")
        return {"brightness": b, "overall": b}


class Broken(Brightness):
    def forward(self, videos, prompts=None, references=None):
        raise RuntimeError("judge offline")


class Counted(Brightness):
    calls = 0

    def forward(self, videos, prompts=None, references=None):
        Counted.calls += 1
        return super().forward(videos, prompts, references)


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


# -- stabilisers: pure functions by hand --------------------------------------------------------------------------
def test_ratio_norm_by_hand():
    # one sample, two elements: old mean 0, new mean (1, -1), std 0.5, x' = old + 0.5 * eps with eps = (1, 2), so
    # x' = (0.5, 1): log_prob - old = mean(-(x' - m)^2 + (x' - m_old)^2) / (2 * 0.25) = mean(0, -3) / 0.5 = -3;
    # drift = mean(1, 1) = 1, bias 1 / (2 * 0.25) = 2; normalised: 0.5 * (-3 + 2) = -0.5 = mean(eps * d) = (1 - 2) / 2
    out = ratio_norm_log_ratio(torch.tensor([-3.0]), torch.tensor([0.0]), torch.tensor([[1.0, -1.0]]),
                               torch.zeros(1, 2), 0.5)
    assert torch.allclose(out, torch.tensor([-0.5]))
    # per-sample stds broadcast like the SDE step's; no drift leaves std * log-ratio
    out = ratio_norm_log_ratio(torch.tensor([1.0, 1.0]), torch.zeros(2), torch.zeros(2, 3), torch.zeros(2, 3),
                               torch.tensor([0.5, 2.0]).view(2, 1, 1))
    assert torch.allclose(out, torch.tensor([0.5, 2.0]))
    with pytest.raises(ValueError, match="same b"):
        ratio_norm_log_ratio(torch.zeros(2), torch.zeros(2), torch.zeros(3, 4), torch.zeros(3, 4), 1.0)


def test_ratio_norm_centres_the_log_ratio_at_every_noise_level():
    """Raw log-ratios are biased below 0 and scale like 1 / std; the normalised one is mean(eps * drift) at any step."""
    g = torch.Generator().manual_seed(0)
    x, v_old = torch.randn(4, 3, 2, 8, 8, generator=g), torch.randn(4, 3, 2, 8, 8, generator=g)
    v_new = v_old + 0.3 * torch.randn(4, 3, 2, 8, 8, generator=g)
    for sigma, sigma_next in [(0.9, 0.8), (0.2, 0.1)]:
        prev, old_lp, old_mean, std = sde_step_with_logprob(x, v_old, sigma, sigma_next, generator=g)
        _, lp, mean, _ = sde_step_with_logprob(x, v_new, sigma, sigma_next, prev_sample=prev)
        eps, drift = (prev - old_mean) / std, mean - old_mean
        expected = (eps * drift).flatten(1).mean(1)  # (b,)
        assert torch.allclose(ratio_norm_log_ratio(lp, old_lp, mean, old_mean, std), expected, atol=1e-5)
        assert ((lp - old_lp) < expected / std).all()  # the raw ratio sits below: the left shift RatioNorm removes


def test_step_weights_by_hand():
    sigmas = torch.tensor([1.0, 0.5, 0.0])
    # step stds 0.7 * sqrt(1 / 0.5) * sqrt(0.5) = 0.7 and 0.7 * sqrt(0.5 / 0.5) * sqrt(0.5) = 0.7 / sqrt(2)
    assert torch.equal(step_weights(sigmas, [0, 1], "uniform"), torch.ones(2))
    r2 = math.sqrt(2)
    assert torch.allclose(step_weights(sigmas, [0, 1], "noise"), torch.tensor([2 * r2, 2]) / (1 + r2))
    assert torch.allclose(step_weights(sigmas, [0, 1], "inverse_dt"), torch.tensor([2.0, 2.0]))
    # a subset of a finer schedule: stds 0.7 * sqrt(3) * sqrt(0.5) and 0.7 / sqrt(3) * 0.5, a ratio of 3 sqrt(2)
    sigmas = torch.tensor([1.0, 0.75, 0.25, 0.0])
    w = step_weights(sigmas, [1, 2], "noise", noise_level=0.3)  # the noise level cancels
    assert torch.allclose(w, torch.tensor([6 * r2, 2]) / (3 * r2 + 1)) and torch.isclose(w.mean(), torch.tensor(1.0))
    assert torch.allclose(step_weights(sigmas, [1, 2], "inverse_dt"), torch.tensor([2.0, 4.0]))
    with pytest.raises(ValueError, match="step_weighting must be one of"):
        step_weights(sigmas, [0], "sigma")
    with pytest.raises(ValueError, match=r"steps in \[0, S\)"):
        step_weights(sigmas, [3], "noise")


def test_kl_coefficient_by_hand():
    assert kl_coefficient(123, 0.1) == 0.1
    assert kl_coefficient(0, 0.1, 0.0, "linear", 10) == pytest.approx(0.1)
    assert kl_coefficient(5, 0.1, 0.0, "linear", 10) == pytest.approx(0.05)
    assert kl_coefficient(20, 0.1, 0.0, "linear", 10) == 0.0  # stays at the end value
    assert kl_coefficient(3, 0.0, 0.2, "linear", 4) == pytest.approx(0.15)  # a growing KL
    assert kl_coefficient(0, 0.1, 0.0, "cosine", 9) == pytest.approx(0.1)
    assert kl_coefficient(3, 0.1, 0.0, "cosine", 9) == pytest.approx(0.1 * (1 + 0.5) / 2)  # cos(pi / 3) = 0.5
    assert kl_coefficient(6, 0.1, 0.0, "cosine", 9) == pytest.approx(0.1 * (1 - 0.5) / 2)
    assert kl_coefficient(9, 0.1, 0.0, "cosine", 9) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="kl_schedule must be one of"):
        kl_coefficient(0, 0.1, 0.0, "exponential", 10)
    with pytest.raises(ValueError, match="kl_schedule='linear' needs kl_beta_final and kl_schedule_steps"):
        kl_coefficient(0, 0.1, None, "linear", 10)


def test_micro_batches_per_update_by_hand():
    assert micro_batches_per_update(2, 4, 2, 2) == 2  # 8 rollouts, 4 micro-batches, 2 per optimizer step
    assert micro_batches_per_update(2, 4, None, 1) == 1
    assert micro_batches_per_update(1, 4, 3, 2) == 1  # micro-batches of 3 and 1
    with pytest.raises(ValueError, match=r"4 rollouts \(1 prompts x group_size=4\) in micro-batches of "
                                         r"micro_batch_size=2 give 2: lower micro_batch_size to at most 1"):
        micro_batches_per_update(1, 4, 2, 3)
    with pytest.raises(ValueError, match="lower updates_per_epoch to at most 2 or raise the batch size"):
        micro_batches_per_update(1, 2, 1, 3)


# -- stabilisers in the module ------------------------------------------------------------------------------------
def test_defaults_backpropagate_the_plain_clipped_surrogate(tiny_pixel_pipeline, monkeypatch):
    """With every stabiliser off, each backward is exactly ``grpo_policy_loss`` on the raw log-probs, unweighted."""
    calls, losses = [], []

    def spy(log_prob, old_log_prob, advantages, clip_range):
        out = grpo_policy_loss(log_prob, old_log_prob, advantages, clip_range)
        calls.append((old_log_prob, out.detach()))
        return out

    monkeypatch.setattr(grpo_module, "grpo_policy_loss", spy)
    model = make_grpo(tiny_pixel_pipeline)  # one micro-batch of 4 rollouts, all 3 steps trained
    backward = model.manual_backward
    monkeypatch.setattr(model, "manual_backward", lambda loss: (losses.append(loss.detach()), backward(loss)))
    trainer(1).fit(model, train_dataloaders=prompt_loader(1, 1))
    assert len(calls) == len(losses) == 3
    for (old, policy), loss in zip(calls, losses):
        assert old.abs().min() > 0  # the rollout's log-probs, not a pre-normalised ratio
        assert torch.equal(loss, policy * 4 / 4 / 3)


@pytest.mark.parametrize("options", [
    dict(ratio_norm=True, micro_batch_size=2, updates_per_epoch=2, clip_range=0.2),
    dict(step_weighting="noise", inner_epochs=2),
    dict(step_weighting="inverse_dt", ratio_norm=True, micro_batch_size=2, updates_per_epoch=2),
    dict(kl_beta=0.1, kl_beta_final=0.0, kl_schedule="cosine", kl_schedule_steps=2, train_fraction=0.5),
], ids=["ratio_norm", "noise_weighting", "grpo_guard", "kl_cosine"])
def test_each_stabiliser_trains_lora_and_stays_finite(tiny_pixel_pipeline, options):
    model = make_grpo(tiny_pixel_pipeline, **options)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    t = trainer(2)
    t.fit(model, train_dataloaders=prompt_loader())
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert changed and all("lora_" in n for n in changed)
    assert all(torch.isfinite(p).all() for p in model.parameters()) and model.nonfinite_skips == 0
    assert torch.isfinite(t.callback_metrics["train/policy_loss"])
    assert t.callback_metrics["train/ratio_first_max_dev"] < 1e-4  # normalised or not, the first update is on-policy


def test_a_growing_kl_starts_without_the_reference_and_logs_its_coefficient(tiny_pixel_pipeline):
    model = make_grpo(tiny_pixel_pipeline, kl_beta=0.0, kl_beta_final=0.2, kl_schedule="linear", kl_schedule_steps=2)
    assert model.requires_reference
    t = trainer(2)
    t.fit(model, train_dataloaders=prompt_loader())
    assert t.callback_metrics["train/kl_beta"] == pytest.approx(0.1)  # the second step's coefficient
    assert torch.isfinite(t.callback_metrics["train/kl"])  # computed once the coefficient is above 0
    full = make_grpo(tiny_pixel_pipeline, lora_rank=None, kl_beta=0.0, kl_beta_final=0.1, kl_schedule="linear",
                     kl_schedule_steps=5)
    assert full._reference_denoiser is not None  # full fine-tuning keeps a frozen copy for the later KL


def test_batch_arithmetic_fails_before_any_rollout(tiny_pixel_pipeline):
    Counted.calls = 0
    model = make_grpo(tiny_pixel_pipeline, reward=Counted(), micro_batch_size=2, updates_per_epoch=3)
    with pytest.raises(ValueError, match=r"updates_per_epoch=3 needs at least that many micro-batches.*lower "
                                         r"micro_batch_size to at most 1.*batch_size=1 from the train loader"):
        trainer(1).fit(model, train_dataloaders=prompt_loader(1, 1))
    # with a datamodule it fails at fit start, before the sanity check's validation samples are scored
    data = ToyWorldDataModule(batch_size=1, train_size=4, val_size=2, max_balls=1, prompts_only=True)
    t = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False, limit_val_batches=1, num_sanity_val_steps=1)
    with pytest.raises(ValueError, match="batch_size=1 from the datamodule"):
        t.fit(model, data)
    assert Counted.calls == 0


def test_stabiliser_arguments_are_named(tiny_pixel_pipeline):
    with pytest.raises(ValueError, match="micro_batch_size must be at least 1"):
        make_grpo(tiny_pixel_pipeline, micro_batch_size=0)
    with pytest.raises(ValueError, match="updates_per_epoch=2 needs micro_batch_size"):
        make_grpo(tiny_pixel_pipeline, updates_per_epoch=2)
    with pytest.raises(ValueError, match="step_weighting must be one of"):
        make_grpo(tiny_pixel_pipeline, step_weighting="sigma")
    with pytest.raises(ValueError, match="kl_schedule must be one of"):
        make_grpo(tiny_pixel_pipeline, kl_schedule="step")
    with pytest.raises(ValueError, match="kl_schedule='cosine' needs kl_beta_final and kl_schedule_steps"):
        make_grpo(tiny_pixel_pipeline, kl_beta=0.1, kl_schedule="cosine", kl_beta_final=0.0)
    with pytest.raises(ValueError, match="kl_beta_final must be >= 0"):
        make_grpo(tiny_pixel_pipeline, kl_beta_final=-1.0)


def test_stabilisers_resume_exactly(tiny_pixel_pipeline, tmp_path):
    """Two rollout batches straight through, or one, a checkpoint, and a resumed fit: the same weights bit for bit."""
    def fit(steps, ckpt_path=None):
        L.seed_everything(0)
        model = make_grpo(tiny_pixel_pipeline, group_size=2, num_sampling_steps=2, ratio_norm=True,
                          step_weighting="noise", kl_beta=0.1, kl_beta_final=0.0, kl_schedule="linear",
                          kl_schedule_steps=4, micro_batch_size=1, updates_per_epoch=2)
        data = ToyWorldDataModule(batch_size=1, train_size=3, val_size=2, max_balls=1, prompts_only=True)
        L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                  enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path,
                  callbacks=[ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=2,
                                             save_top_k=-1)]).fit(model, data, ckpt_path=ckpt_path)
        return {n: p.detach().clone() for n, p in model.named_parameters()}

    straight = fit(4)
    fit(2)
    resumed = fit(4, ckpt_path=tmp_path / "step=2.ckpt")
    assert all(torch.equal(straight[n], resumed[n]) for n in straight)
