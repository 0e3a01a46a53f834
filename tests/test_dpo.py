"""DPO: the loss by hand, shared noise, LoRA-only updates, the weight-free reference, ties, online pairs and resume."""

import math

import lightning as L
import pytest
import torch

from lit_videoalign.backbones.diffusers import DiffusersVideoBackbone
from lit_videoalign.data.toyworld import PHYSICS_CORRUPTIONS, ToyWorld
from lit_videoalign.data.toyworld_pairs import ToyWorldPairsDataModule
from lit_videoalign.objectives.dpo import DPO, PairPool, flow_dpo_loss, gap_weights, implicit_reward_margin
from lit_videoalign.objectives.sft import SFT
from lit_videoalign.testing import Brightness


def trainer(steps, **kwargs):
    return L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                     num_sanity_val_steps=0, **kwargs)


def make_dpo(pipeline, **kwargs):
    bb = DiffusersVideoBackbone(pipeline, max_sequence_length=16)
    defaults = dict(lora_rank=4, beta=1000.0, num_inference_steps=2,
                    optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    return DPO(bb, **{**defaults, **kwargs})


def pair_items(n=4, seed=0):
    """Clean toy-world videos chosen, the same scenes without gravity rejected."""
    world = ToyWorld(max_balls=1)
    items = []
    for i in range(n):
        ex = world.example(seed + i)
        bad = world.corrupt(ex, "gravity_zero", torch.Generator().manual_seed(i))
        items.append({"prompt": ex.prompt, "chosen": ex.video, "rejected": bad.video})
    return items


def pair_batch(n=4, seed=0):
    return torch.utils.data.default_collate(pair_items(n, seed))


# -- pure maths --------------------------------------------------------------------------------------------------------
# allclose's default rtol 1e-5 in these stands for float32 rounding: measured rel err <= 1.2e-7 (torch 2.13.0 / 2.14.1)
def test_flow_dpo_loss_by_hand():
    pw, pl = torch.tensor([0.1, 0.3]), torch.tensor([0.3, 0.1])
    rw, rl = torch.tensor([0.2, 0.2]), torch.tensor([0.2, 0.2])
    # pair 0: -10/2 * ((0.1-0.2) - (0.3-0.2)) = +1 -> log(1 + e^-1); pair 1: -1 -> log(1 + e^1)
    expected = (math.log1p(math.exp(-1)) + math.log1p(math.exp(1))) / 2
    assert torch.allclose(flow_dpo_loss(pw, pl, rw, rl, beta=10.0), torch.tensor(expected))
    assert torch.allclose(implicit_reward_margin(pw, pl, rw, rl, 10.0), torch.tensor([1.0, -1.0]))
    # weights: sum(w * l) / sum(w); a zero weight masks a pair
    w = torch.tensor([3.0, 0.0])
    assert torch.allclose(flow_dpo_loss(pw, pl, rw, rl, 10.0, weights=w), torch.tensor(math.log1p(math.exp(-1))))
    # policy equal to the reference: log 2 whatever the errors
    assert torch.allclose(flow_dpo_loss(pw, pl, pw, pl, 10.0), torch.tensor(math.log(2)))
    assert torch.allclose(gap_weights(torch.tensor([0.5, -0.1, 2.0]), power=2.0), torch.tensor([0.25, 0.0, 4.0]))


def test_flow_dpo_loss_gradient_signs_and_bad_input():
    pw, pl = torch.tensor([0.2], requires_grad=True), torch.tensor([0.2], requires_grad=True)
    flow_dpo_loss(pw, pl, torch.tensor([0.2]), torch.tensor([0.2]), beta=100.0).backward()
    assert pw.grad.item() > 0 and pl.grad.item() < 0  # lowering the winner's error lowers the loss
    lower = flow_dpo_loss(torch.tensor([0.19]), pl.detach(), torch.tensor([0.2]), torch.tensor([0.2]), 100.0)
    assert lower < math.log(2)
    with pytest.raises(ValueError, match="one shape"):
        flow_dpo_loss(torch.ones(2), torch.ones(3), torch.ones(2), torch.ones(2), 1.0)
    with pytest.raises(ValueError, match="beta"):
        flow_dpo_loss(torch.ones(2), torch.ones(2), torch.ones(2), torch.ones(2), 0.0)
    with pytest.raises(ValueError, match="sum to zero"):
        flow_dpo_loss(torch.ones(2), torch.ones(2), torch.ones(2), torch.ones(2), 1.0, weights=torch.zeros(2))


# -- the module --------------------------------------------------------------------------------------------------------
def test_winner_and_loser_share_noise_and_sigma(tiny_pixel_pipeline):
    """A pair of two identical videos has exactly equal errors: the same noise and sigma reached both."""
    model = make_dpo(tiny_pixel_pipeline)
    model.backbone.denoiser.requires_grad_(False)
    x = model.backbone.encode_videos(pair_batch(3)["chosen"])
    _, stats = model.pair_loss(["a red ball falls"] * 3, x, x.clone(), generator=torch.Generator().manual_seed(0))
    # both measured exactly equal (torch 2.13.0 / 2.14.1, 3 seeds, AVX-512 / AVX2 / baseline CPU kernels). The margin
    # is beta / 2 = 500 times a difference of errors near 2.1 (an ulp there is 2.4e-7), so 1e-3 allows ~8 ulp.
    assert torch.allclose(stats["policy_err_w"], stats["policy_err_l"], rtol=1e-5)
    assert stats["reward_margin"].abs() < 1e-3


def test_lora_dpo_changes_only_the_adapter_and_moves_the_implicit_reward(tiny_pixel_pipeline):
    model = make_dpo(tiny_pixel_pipeline)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = pair_batch(4)
    g = torch.Generator
    _, start = model.pair_loss(*model.batch_pairs(batch)[:4], generator=g().manual_seed(1))
    t = trainer(6)
    t.fit(model, torch.utils.data.DataLoader(pair_items(4) * 6, batch_size=4))
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert changed and all("lora_" in n for n in changed)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    for key in ("train/loss", "train/reward_margin", "train/implicit_acc", "train/policy_err_w", "train/ref_err_l"):
        assert torch.isfinite(t.callback_metrics[key]), key
    loss, end = model.pair_loss(*model.batch_pairs(batch)[:4], generator=g().manual_seed(1))
    assert start["reward_margin"] == 0  # the LoRA starts as the identity: policy == reference
    assert end["reward_margin"] > 0 and end["implicit_acc"] > 0.5 and loss < math.log(2)


def test_reference_is_the_base_without_a_weight_copy(tiny_pixel_pipeline):
    dpo = make_dpo(tiny_pixel_pipeline)
    sft = SFT(DiffusersVideoBackbone(tiny_pixel_pipeline, max_sequence_length=16), lora_rank=4)
    count = lambda m: sum(p.numel() for p in m.parameters()) + sum(b.numel() for b in m.buffers())
    assert dpo._reference_denoiser is None and count(dpo) == count(sft)
    with torch.no_grad():
        for p in (p for n, p in dpo.named_parameters() if "lora_B" in n):
            p.normal_()  # a trained adapter
    base = DiffusersVideoBackbone(tiny_pixel_pipeline, max_sequence_length=16)
    x, sigma = torch.randn(2, *dpo.backbone.latent_shape(16, 32, 32)), torch.tensor([0.3, 0.8])
    cond = base.encode_prompts(["a red ball falls", "a blue ball falls"])
    ref = dpo.reference_velocity(x, sigma, cond)
    with torch.no_grad():
        expected = base.predict_velocity(x, sigma, cond)
        # adapters off: measured bit-identical (torch 2.13.0 / 2.14.1, 3 seeds, AVX-512 / AVX2 / baseline CPU
        # kernels); 1e-5 of the largest velocity leaves room for a reordered float32 reduction
        torch.testing.assert_close(ref, expected, rtol=0, atol=1e-5 * expected.abs().max().item())
        # the trained adapter moves it by 0.78 of the scale (measured), far above 1e-3
        assert not torch.allclose(ref, dpo.backbone.predict_velocity(x, sigma, cond), atol=1e-3)
    full = make_dpo(tiny_pixel_pipeline, lora_rank=None)  # full fine-tuning: a frozen copy, kept out of checkpoints
    lora = sum(p.numel() for n, p in sft.named_parameters() if "lora_" in n)
    assert count(full) == count(sft) - lora + count(full._reference_denoiser)
    assert not any(p.requires_grad for p in full._reference_denoiser.parameters())
    assert not any(k.startswith("_reference_denoiser.") for k in full.state_dict())


def test_ties_are_masked_and_a_batch_of_ties_skips_the_step(tiny_pixel_pipeline):
    model = make_dpo(tiny_pixel_pipeline)
    batch = pair_batch(3)
    batch["tie"] = torch.tensor([False, True, False])
    prompts, x_w, _, _, masked = model.batch_pairs(batch)
    assert masked == 1 and len(prompts) == 2 and x_w.shape[0] == 2
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    items = [{**it, "tie": torch.tensor(True)} for it in pair_items(2)]
    t = trainer(1)
    t.fit(model, torch.utils.data.DataLoader(items, batch_size=2))
    assert t.callback_metrics["train/masked_pairs"] == 2
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


def test_unordered_pairs_follow_the_preference_label(tiny_pixel_pipeline):
    dm = ToyWorldPairsDataModule(batch_size=4, corruptions=list(PHYSICS_CORRUPTIONS), tie_prob=0.0, mixed_prob=0.0,
                                 max_balls=1)
    batch = next(iter(dm.train_dataloader()))
    with pytest.raises(ValueError, match="preference_label"):
        make_dpo(tiny_pixel_pipeline).batch_pairs(batch)
    model = make_dpo(tiny_pixel_pipeline, preference_label="physics")
    _, x_w, x_l, _, _ = model.batch_pairs(batch)
    a_wins = batch["labels"]["physics"] > 0
    assert a_wins.any() and (~a_wins).any()  # the random order put winners on both sides
    clean = torch.where(a_wins.view(-1, 1, 1, 1, 1), batch["video_a"], batch["video_b"])
    assert torch.equal(x_w, model.backbone.encode_videos(clean))
    assert not torch.equal(x_l, x_w)


# -- online pairs ------------------------------------------------------------------------------------------------------
def test_online_pool_ranks_by_reward_and_round_trips_through_checkpoints(tiny_pixel_pipeline, tmp_path):
    model = make_dpo(tiny_pixel_pipeline, reward=Brightness(), num_candidates=3, gap_weighting=True, pool_size=3,
                     pool_seed=7)
    prompts = ["a red ball falls", "a blue ball moves left"]
    stats = model.build_pairs(prompts)
    assert stats["new_pairs"] == 2 and len(model.pool) == 2
    w, lo = model.backbone.decode_latents(model.pool.winners), model.backbone.decode_latents(model.pool.losers)
    assert (w.mean((1, 2, 3, 4)) > lo.mean((1, 2, 3, 4))).all()  # best beats worst
    assert torch.allclose(model.pool.weights, model.pool.gaps)  # gap weighting, power 1
    model.build_pairs(prompts)
    assert len(model.pool) == 3  # capacity: the oldest pair was dropped

    # Save through a real Trainer checkpoint, read back weights-only, and continue identically.
    t = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                  enable_model_summary=False, default_root_dir=tmp_path, limit_val_batches=0)
    t.fit(model, torch.utils.data.DataLoader([{"prompt": p} for p in prompts], batch_size=2))
    ckpt = torch.load(next(tmp_path.rglob("*.ckpt")), weights_only=True)
    restored = make_dpo(tiny_pixel_pipeline, reward=Brightness(), num_candidates=3, gap_weighting=True, pool_size=3)
    restored.load_state_dict(ckpt["state_dict"])
    restored.on_load_checkpoint(ckpt)
    assert restored.pool.prompts == model.pool.prompts and restored.online_batches == model.online_batches == 1
    assert torch.equal(restored.pool.winners, model.pool.winners)
    a, b = model.pool.sample(2, model.pool_generator), restored.pool.sample(2, restored.pool_generator)
    assert a[2] == b[2] and torch.equal(a[0], b[0])
    model.build_pairs(prompts), restored.build_pairs(prompts)
    assert torch.equal(restored.pool.losers, model.pool.losers)


def test_online_step_without_a_qualifying_pair_is_skipped(tiny_pixel_pipeline):
    model = make_dpo(tiny_pixel_pipeline, reward=Brightness(), num_candidates=2, min_gap=10.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.warns(UserWarning, match="min_gap"):
        trainer(1).fit(model, torch.utils.data.DataLoader([{"prompt": "a red ball falls"}], batch_size=1))
    assert len(model.pool) == 0
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    with pytest.raises(ValueError, match="no reward"):
        make_dpo(tiny_pixel_pipeline).training_step({"prompt": ["a red ball falls"]}, 0)


def test_pair_pool_rejects_mismatched_pairs():
    pool = PairPool(4)
    with pytest.raises(ValueError, match="one prompt, gap and weight per pair"):
        pool.add(torch.zeros(2, 3), torch.zeros(2, 3), ["a"], torch.zeros(2), torch.zeros(2))
    with pytest.raises(ValueError, match="capacity"):
        PairPool(0)
