"""RewardGradient (DRaFT-K / VADER): pure losses by hand, refusal of gradient-less rewards, checkpointed steps give the
same gradient, and a few updates move the reward while changing only the LoRA weights."""

import lightning as L
import pytest
import torch

from lit_videoalign.backbones.diffusers import DiffusersVideoBackbone
from lit_videoalign.objectives.reward_gradient import RewardGradient, reward_loss, velocity_kl, weight_delta_l2
from lit_videoalign.testing import Brightness
from reward_zoo.composite import CompositeReward

PROMPTS = ["a red ball falls", "a blue ball moves left"]



class Judge(Brightness):
    differentiable = False


def make(tiny_pixel_pipeline, reward=None, **kwargs):
    bb = DiffusersVideoBackbone(tiny_pixel_pipeline, max_sequence_length=16)
    defaults = dict(lora_rank=4, num_sampling_steps=3, truncation_steps=2, num_inference_steps=3,
                    optimizer=lambda p: torch.optim.AdamW(p, lr=3e-2))
    return RewardGradient(bb, reward=reward or Brightness(), **{**defaults, **kwargs})


def test_pure_losses_by_hand():
    # allclose's default rtol 1e-5 stands for float32 rounding: all measured exact (torch 2.13.0 / 2.14.1)
    assert torch.allclose(reward_loss(torch.tensor([1.0, 3.0]), scale=0.5), torch.tensor(-1.0))
    v, ref = torch.zeros(2, 2, 1, 1, 1), torch.tensor([[1.0, 3.0], [2.0, 2.0]]).view(2, 2, 1, 1, 1)
    assert torch.allclose(velocity_kl(v, ref), torch.tensor([5.0, 4.0]))  # (1 + 9) / 2, (4 + 4) / 2
    assert torch.allclose(weight_delta_l2([torch.tensor([[1.0, 2.0]]), torch.tensor([3.0])]), torch.tensor(14.0))
    with pytest.raises(ValueError, match="Tensor\\[B\\]"):
        reward_loss(torch.ones(2, 2))
    with pytest.raises(ValueError, match="no weight deltas"):
        weight_delta_l2([])


def test_refuses_a_reward_without_gradient_at_construction(tiny_pixel_pipeline):
    with pytest.raises(ValueError, match="RewardGradient needs a differentiable reward, but Judge"):
        make(tiny_pixel_pipeline, reward=Judge())
    zscored = CompositeReward({"a": Brightness(), "b": Brightness()}, {"a": 1.0, "b": 0.5}, normalize="zscore")
    with pytest.raises(ValueError, match="normalize='zscore'"):
        make(tiny_pixel_pipeline, reward=zscored)
    with pytest.raises(ValueError, match="truncation_steps"):
        make(tiny_pixel_pipeline, truncation_steps=4)
    with pytest.raises(ValueError, match="decode_frames"):
        make(tiny_pixel_pipeline, decode_frames=17)

    class FourFrames(Brightness):
        min_frames = 4

    with pytest.raises(ValueError, match="decode_frames=2 is fewer than the 4 frames FourFrames needs"):
        make(tiny_pixel_pipeline, reward=FourFrames(), decode_frames=2)


def test_checkpointed_steps_give_the_same_gradient_and_frames_are_windowed(tiny_pixel_pipeline):
    model = make(tiny_pixel_pipeline, kl_beta=0.5)
    lora = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():  # move B off zero so the LoRA A matrices get gradients too
        for p in lora:
            p.add_(0.01 * torch.randn_like(p))
    grads = []
    for ckpt in (True, False):
        model.hparams.checkpoint_steps = ckpt
        torch.manual_seed(1)
        loss, logs = model.loss(PROMPTS)
        grads.append(torch.autograd.grad(loss, lora))
        assert logs["train/velocity_kl"] > 0  # the adapter moved the policy off the reference
    # measured bit-identical (the recomputation runs the same kernels; torch 2.13.0 / 2.14.1, 3 seeds, AVX-512 / AVX2 /
    # baseline CPU kernels); 1e-5 of each gradient's largest entry leaves room for a reordered float32 reduction
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=0, atol=1e-5 * b.abs().max().item())
    assert any(g.abs().sum() > 0 for g in grads[0])
    model.hparams.decode_frames = 5
    assert model.decode_for_reward(torch.rand(1, 3, 16, 32, 32) * 2 - 1).shape == (1, 5, 3, 32, 32)


def test_l2_regulariser_is_the_lora_weight_delta(tiny_pixel_pipeline):
    model = make(tiny_pixel_pipeline, regularizer="l2", kl_beta=1.0)
    assert weight_delta_l2(model.weight_deltas()) == 0  # LoRA starts with B = 0
    layer = next(m for m in model.backbone.denoiser.modules() if hasattr(m, "lora_B") and "default" in m.lora_B)
    with torch.no_grad():
        layer.lora_B["default"].weight.fill_(1.0)
    a = layer.lora_A["default"].weight
    expected = (layer.scaling["default"] * torch.ones(layer.lora_B["default"].weight.shape) @ a).pow(2).sum()
    assert torch.allclose(weight_delta_l2(model.weight_deltas()), expected)  # measured exact; default rtol 1e-5


def test_updates_change_only_lora_and_raise_the_reward(tiny_pixel_pipeline):
    model = make(tiny_pixel_pipeline, kl_beta=0.01)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    reward = Brightness()
    seeds = [11, 12]
    start = reward(model.generate(PROMPTS, seeds))["overall"].mean()
    trainer = L.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    loader = torch.utils.data.DataLoader([{"prompt": p} for p in PROMPTS * 2], batch_size=2)
    trainer.fit(model, train_dataloaders=loader)
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert changed and all("lora_" in n for n in changed)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    end = reward(model.generate(PROMPTS, seeds))["overall"].mean()
    assert end > start + 0.01
