"""RejectionSFT: the filter and the diversity measure by hand, the buffer's caps and duplicate guard, checkpointed
buffer, and training that changes only the LoRA weights on samples the reward accepted."""

import lightning as L
import pytest
import torch

from lit_videoalign.backbones.diffusers import DiffusersVideoBackbone
from lit_videoalign.objectives.rejection_sft import RejectionSFT, accept_mask, feature_distance, video_features
from reward_zoo.base import RewardModel

PROMPTS = ["a red ball falls", "a blue ball moves left"]


class Brightness(RewardModel):
    dimensions = ("brightness",)
    differentiable = False  # a verifier needs no gradient

    def forward(self, videos, prompts=None, references=None):
        b = videos.mean((1, 2, 3, 4))
        return {"brightness": b, "overall": b}


def make(tiny_pixel_pipeline, **kwargs):
    bb = DiffusersVideoBackbone(tiny_pixel_pipeline, max_sequence_length=16)
    defaults = dict(reward=Brightness(), lora_rank=4, num_candidates=3, generate_every=2, top_fraction=0.34,
                    max_per_prompt=2, min_feature_distance=0.0, num_inference_steps=2, guidance_scale=1.0,
                    optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    return RejectionSFT(bb, **{**defaults, **kwargs})


def test_accept_mask_by_hand():
    s = torch.tensor([0.1, 0.5, 0.3, 0.9, 0.2, 0.2])
    assert accept_mask(s, 3, top_fraction=0.34).tolist() == [False, True, True, True, True, False]  # ceil(1.02) = 2
    assert accept_mask(s, 3, top_fraction=0.3).tolist() == [False, True, False, True, False, False]  # best 1 of 3
    assert accept_mask(s, 3, threshold=0.25).tolist() == [False, True, True, True, False, False]
    assert accept_mask(s, 3, threshold=0.25, top_fraction=0.67).tolist() == [False, True, True, True, False, False]
    assert accept_mask(s, 2, top_fraction=0.5).tolist() == [False, True, False, True, True, False]  # tie: first
    assert accept_mask(torch.tensor([float("nan"), 1.0]), 2, top_fraction=1.0).tolist() == [False, True]
    with pytest.raises(ValueError, match="multiple of group_size=4"):
        accept_mask(s, 4, top_fraction=0.5)


def test_features_and_distance_by_hand():
    # allclose's default rtol 1e-5 stands for float32 rounding: measured rel err <= 1.8e-7 (torch 2.13.0 / 2.14.1)
    a, b = torch.zeros(1, 4), torch.tensor([[2.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    assert torch.allclose(feature_distance(a, b), torch.tensor([[1.0, 1.0]]))  # sqrt(4 / 4), sqrt(4 / 4)
    videos = torch.rand(2, 3, 3, 16, 16)
    f = video_features(videos, grid=2)
    assert f.shape == (2, 3 * 3 * 2 * 2)
    assert torch.allclose(f[0, 0], videos[0, 0, 0, :8, :8].mean())


def test_buffer_caps_duplicates_and_checkpoint_round_trip(tiny_pixel_pipeline, tmp_path):
    model = make(tiny_pixel_pipeline, max_per_prompt=1, buffer_size=2)
    feat = torch.zeros(4)
    for i, prompt in enumerate(["a", "b", "a", "c"]):
        model._append(torch.full((3, 1, 2, 2), float(i)), prompt, float(i), feat + i)
    # "a" was replaced by its newer sample (max_per_prompt=1), then "b" fell out of the 2-entry buffer
    assert model.buffer_prompts == ["a", "c"] and model.buffer_scores.tolist() == [2.0, 3.0]
    assert model.buffer_latents[:, 0, 0, 0, 0].tolist() == [2.0, 3.0]
    ckpt = {}
    model.on_save_checkpoint(ckpt)
    path = tmp_path / "buffer.pt"
    torch.save(ckpt, path)
    restored = make(tiny_pixel_pipeline)
    restored.on_load_checkpoint(torch.load(path, weights_only=True))  # plain tensors and strings, no pickle
    assert restored.buffer_prompts == ["a", "c"] and torch.equal(restored.buffer_latents, model.buffer_latents)
    # a near-duplicate of an entry of the same prompt is rejected; the same video for another prompt is not
    guard = make(tiny_pixel_pipeline, min_feature_distance=1e-3, top_fraction=1.0, num_candidates=2)
    guard.generate = lambda prompts, seeds, **kw: torch.zeros(len(prompts), 3, 16, 32, 32)  # identical samples
    logs = guard.refresh(PROMPTS)
    assert guard.buffer_prompts == PROMPTS and logs["train/rejected_duplicates"] == 2
    with pytest.raises(ValueError, match="reward_threshold, top_fraction or both"):
        make(tiny_pixel_pipeline, top_fraction=None)


def test_training_changes_only_lora_and_learns_from_accepted_samples(tiny_pixel_pipeline):
    model = make(tiny_pixel_pipeline)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    loader = torch.utils.data.DataLoader([{"prompt": p} for p in PROMPTS * 2], batch_size=2)
    trainer.fit(model, train_dataloaders=loader)
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert changed and all("lora_" in n for n in changed)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    m = trainer.callback_metrics
    assert torch.isfinite(m["train/loss"])
    # two generation rounds (steps 0 and 2) of 2 prompts x 3 candidates, the best of each group kept
    assert model.steps_seen == 3 and model.buffer_len == 4 and m["train/buffer_size"] == 4
    assert m["train/accepted_reward"] > m["train/candidate_reward"]
    assert set(model.buffer_prompts) == set(PROMPTS) and m["train/buffer_diversity"] > 0
