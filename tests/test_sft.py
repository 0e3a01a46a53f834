"""SFT: the pure loss by hand, Trainer steps that change exactly the trainable weights, and the shared sampler."""

import lightning as L
import pytest
import torch

from lit_videoalign.backbones.diffusers import DiffusersVideoBackbone
from lit_videoalign.data.toyworld import ToyWorldDataModule
from lit_videoalign.objectives.sft import SFT, flow_matching_loss


def make_trainer(steps: int) -> L.Trainer:
    return L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                     limit_val_batches=0)


def snapshot(module, name_filter):
    return {n: p.detach().clone() for n, p in module.named_parameters() if name_filter(n)}


def test_flow_matching_loss_by_hand():
    # allclose's default rtol 1e-5 stands for float32 rounding: both measured exact (torch 2.13.0 / 2.14.1)
    pred, target = torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.zeros(2, 2)
    assert torch.allclose(flow_matching_loss(pred, target), torch.tensor(7.5))  # mean of 2.5 and 12.5
    weighted = flow_matching_loss(pred, target, weights=torch.tensor([1.0, 3.0]))
    assert torch.allclose(weighted, torch.tensor(10.0))  # (2.5 + 3 * 12.5) / 4
    with pytest.raises(ValueError, match="same shape"):
        flow_matching_loss(pred, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="weights"):
        flow_matching_loss(pred, target, weights=torch.ones(3))


def test_lora_sft_changes_only_the_adapter(tiny_pixel_pipeline):
    bb = DiffusersVideoBackbone(tiny_pixel_pipeline, max_sequence_length=16)
    model = SFT(bb, lora_rank=4, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    lora = snapshot(model, lambda n: "lora_" in n)
    frozen = snapshot(model, lambda n: "lora_" not in n)
    make_trainer(3).fit(model, ToyWorldDataModule(batch_size=2, train_size=6, val_size=2))
    after = dict(model.named_parameters())
    assert all(torch.isfinite(p).all() for p in after.values())
    assert any(not torch.equal(lora[n], after[n]) for n in lora), "LoRA weights did not move"
    assert all(torch.equal(frozen[n], after[n]) for n in frozen), "a frozen weight moved"


def test_full_sft_changes_the_denoiser_not_the_text_encoder(tiny_pixel_pipeline):
    bb = DiffusersVideoBackbone(tiny_pixel_pipeline, max_sequence_length=16)
    model = SFT(bb, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
    den = snapshot(model.backbone.denoiser, lambda n: True)
    text = snapshot(model.backbone.text_encoder, lambda n: True)
    make_trainer(2).fit(model, ToyWorldDataModule(batch_size=2, train_size=4, val_size=2))
    assert sum(not torch.equal(den[n], p) for n, p in model.backbone.denoiser.named_parameters()) > len(den) // 2
    assert all(torch.equal(text[n], p) for n, p in model.backbone.text_encoder.named_parameters())


def test_sft_fits_a_batch(tiny_pixel_pipeline):
    """A few steps on one batch lower its (fixed-noise) flow-matching loss: the objective points the right way."""
    bb = DiffusersVideoBackbone(tiny_pixel_pipeline, max_sequence_length=16)
    model = SFT(bb, optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3), prompt_dropout=0.0)
    batch = next(iter(ToyWorldDataModule(batch_size=4, train_size=4).train_dataloader()))
    before = model.loss(batch, generator=torch.Generator().manual_seed(0)).item()
    opt = model.configure_optimizers()
    for _ in range(15):
        opt.zero_grad()
        model.loss(batch).backward()
        opt.step()
    after = model.loss(batch, generator=torch.Generator().manual_seed(0)).item()
    assert after < 0.8 * before, (before, after)


def test_generate_is_seeded_and_follows_the_convention(tiny_pixel_pipeline):
    model = SFT(DiffusersVideoBackbone(tiny_pixel_pipeline, max_sequence_length=16), num_inference_steps=3)
    a = model.generate(["a red ball falls", "a blue ball falls"], seeds=[1, 2])
    b = model.generate(["a red ball falls", "a blue ball falls"], seeds=[1, 2])
    c = model.generate(["a red ball falls", "a blue ball falls"], seeds=[1, 3])
    assert a.shape == (2, 16, 3, 32, 32) and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b) and torch.equal(a[0], c[0]) and not torch.equal(a[1], c[1])
    guided = model.generate(["a red ball falls", "a blue ball falls"], seeds=[1, 2], guidance_scale=4.0)
    assert not torch.equal(guided, a)
    with pytest.raises(ValueError, match="one seed per prompt"):
        model.generate(["a"], seeds=[1, 2])


def test_bad_hyperparameters_are_named(tiny_pixel_pipeline):
    bb = DiffusersVideoBackbone(tiny_pixel_pipeline, max_sequence_length=16)
    with pytest.raises(ValueError, match="sigma_sampling"):
        SFT(bb, sigma_sampling="cosine")
    with pytest.raises(ValueError, match="prompt_dropout"):
        SFT(bb, prompt_dropout=1.5)
    with pytest.raises(ValueError, match="patch size"):
        SFT(bb, num_frames=15)
