"""The non-finite guard: a NaN or infinite loss, gradient or reward skips its optimizer step (weights and optimizer
state untouched), is counted and logged, and enough of them in a row stop the run with a message that says where and
what to change; for automatic (SFT, consistency, reward-gradient) and manual (GRPO) optimisation alike."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lit_videoalign.backbones.diffusers import DiffusersVideoBackbone
from lit_videoalign.data.toyworld import ToyWorldDataModule
from lit_videoalign.objectives import grpo as grpo_module
from lit_videoalign.objectives.base import NonFiniteError
from lit_videoalign.objectives.consistency import ConsistencyDistillation
from lit_videoalign.objectives.grpo import GRPO
from lit_videoalign.objectives.reward_gradient import RewardGradient
from lit_videoalign.objectives.sft import SFT
from lit_videoalign.testing import Brightness
from reward_zoo.base import RewardModel

NAN = float("nan")



class NaNReward(Brightness):
    def forward(self, videos, prompts=None, references=None):
        b = videos.mean((1, 2, 3, 4)) * NAN
        return {"brightness": b, "overall": b}


class FlakySFT(SFT):
    """SFT whose loss is NaN at ``nan_loss_steps`` and whose gradients are infinite at ``inf_grad_steps``."""

    nan_loss_steps: tuple[int, ...] = ()
    inf_grad_steps: tuple[int, ...] = ()

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * NAN if self.trainer.global_step in self.nan_loss_steps else loss

    def on_after_backward(self) -> None:
        if self.trainer.global_step in self.inf_grad_steps:
            next(p for p in self.parameters() if p.grad is not None).grad.fill_(float("inf"))


class Record(Callback):
    """Trainable weights and the optimizer's step count after every batch."""

    def __init__(self) -> None:
        self.weights, self.adam_steps = [], []

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self.weights.append({n: p.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad})
        state = trainer.optimizers[0].state
        self.adam_steps.append(max((float(s["step"]) for s in state.values()), default=0.0))


def trainer(steps: int, *callbacks) -> L.Trainer:
    return L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                     num_sanity_val_steps=0, callbacks=list(callbacks))


def toy(prompts_only: bool, batch_size: int = 2) -> ToyWorldDataModule:
    return ToyWorldDataModule(batch_size=batch_size, train_size=8, val_size=2, max_balls=1, prompts_only=prompts_only)


def backbone(path: str) -> DiffusersVideoBackbone:
    return DiffusersVideoBackbone(path, max_sequence_length=16)


def unchanged(a: dict, b: dict) -> bool:
    return all(torch.equal(a[n], b[n]) for n in a)


@pytest.mark.parametrize("kind", ["loss", "gradient"])
def test_a_nonfinite_step_is_skipped_counted_and_training_goes_on(kind, tiny_pixel_pipeline):
    model = FlakySFT(backbone(tiny_pixel_pipeline), lora_rank=4, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    setattr(model, "nan_loss_steps" if kind == "loss" else "inf_grad_steps", (1,))  # the second step only
    record = Record()
    t = trainer(3, record)
    with pytest.warns(UserWarning, match=f"NaN or infinite {kind} at global step 1: the optimizer step is skipped"):
        t.fit(model, toy(prompts_only=False))
    w0, w1, w2 = record.weights
    assert not unchanged(w0, w2) and unchanged(w0, w1)  # trained, except in the skipped step
    assert record.adam_steps == [1.0, 1.0, 2.0]  # the optimizer's own state did not move either
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert model.nonfinite_skips == 1 and t.callback_metrics["train/nonfinite_skips"] == 1
    assert t.global_step == 3  # a skipped step still counts towards max_steps


def test_consecutive_nonfinite_steps_stop_the_run_with_a_clear_message(tiny_pixel_pipeline):
    model = FlakySFT(backbone(tiny_pixel_pipeline), lora_rank=4, max_consecutive_nonfinite=2)
    model.nan_loss_steps = tuple(range(10))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(NonFiniteError, match=r"2 optimizer steps in a row had a NaN or infinite loss \(the last at "
                                             r"global step 1\).*max_consecutive_nonfinite \(now 2\)"):
        trainer(5).fit(model, toy(prompts_only=False))
    assert unchanged(before, dict(model.named_parameters()))
    with pytest.raises(ValueError, match="max_consecutive_nonfinite must be at least 1"):
        SFT(backbone(tiny_pixel_pipeline), max_consecutive_nonfinite=0)


def test_a_finite_step_resets_the_run_of_nonfinite_ones(tiny_pixel_pipeline):
    model = FlakySFT(backbone(tiny_pixel_pipeline), lora_rank=4, max_consecutive_nonfinite=2)
    model.nan_loss_steps = (0, 2)  # never two in a row
    with pytest.warns(UserWarning, match="NaN or infinite loss"):
        trainer(4).fit(model, toy(prompts_only=False))
    assert model.nonfinite_skips == 2


def make_grpo(path: str, reward: RewardModel) -> GRPO:
    return GRPO(backbone(path), reward=reward, lora_rank=4, group_size=2, num_sampling_steps=2, num_inference_steps=2,
                max_consecutive_nonfinite=2, optimizer=lambda p: torch.optim.AdamW(p, lr=3e-2))


def test_grpo_skips_a_batch_whose_rewards_are_all_nan_and_stops_after_the_limit(tiny_pixel_pipeline):
    model = make_grpo(tiny_pixel_pipeline, NaNReward())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(NonFiniteError, match="2 optimizer steps in a row had a NaN or infinite reward"):
        trainer(5).fit(model, toy(prompts_only=True, batch_size=1))
    assert unchanged(before, dict(model.named_parameters())) and model.nonfinite_skips == 2


def test_grpo_nan_loss_leaves_the_weights_and_the_optimizer_untouched(tiny_pixel_pipeline, monkeypatch):
    """Manual optimisation: GRPO calls ``opt.step()`` itself and the guard turns it into a no-op."""
    model = make_grpo(tiny_pixel_pipeline, Brightness())
    monkeypatch.setattr(grpo_module, "grpo_policy_loss", lambda log_prob, *args: (log_prob * NAN).mean())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    t = trainer(1)
    with pytest.warns(UserWarning, match="NaN or infinite loss"):
        t.fit(model, toy(prompts_only=True, batch_size=1))
    assert unchanged(before, dict(model.named_parameters()))
    assert not t.optimizers[0].state and t.callback_metrics["train/nonfinite_skips"] == 1


def test_reward_gradient_skips_a_nan_reward(tiny_pixel_pipeline):
    model = RewardGradient(backbone(tiny_pixel_pipeline), reward=NaNReward(), lora_rank=4, num_sampling_steps=2,
                           truncation_steps=1, num_inference_steps=2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.warns(UserWarning, match="NaN or infinite reward and loss"):
        trainer(1).fit(model, toy(prompts_only=True, batch_size=1))
    assert unchanged(before, dict(model.named_parameters())) and model.nonfinite_skips == 1


def test_a_skipped_step_does_not_move_the_consistency_ema_target(tiny_pixel_pipeline, monkeypatch):
    model = ConsistencyDistillation(backbone(tiny_pixel_pipeline), lora_rank=4, num_timesteps=4, skip_steps=2,
                                    num_inference_steps=2, ema_decay=0.5)
    ema = [p.detach().clone() for p in model.ema_parameters()]
    nan_loss = lambda batch: (sum(p.sum() for p in model.student_parameters()) * NAN, {})  # noqa: E731
    monkeypatch.setattr(model, "loss", nan_loss)
    with pytest.warns(UserWarning, match="NaN or infinite loss"):
        trainer(1).fit(model, toy(prompts_only=True))
    assert all(torch.equal(a, b) for a, b in zip(ema, model.ema_parameters()))
