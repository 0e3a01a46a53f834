"""reward_zoo.temporal: flicker, dynamic degree and subject consistency rank toy-world videos the right way."""

from __future__ import annotations

import pytest
import torch

from lit_videoalign.data.toyworld import TEST_SEED_OFFSET, ToyWorld
from reward_zoo import create_reward
from reward_zoo.temporal import DynamicDegree, SubjectConsistency, TemporalFlicker

SEEDS = range(TEST_SEED_OFFSET + 32_000_000, TEST_SEED_OFFSET + 32_000_040)
WORLD = ToyWorld()


@pytest.fixture(scope="module")
def toy() -> dict[str, torch.Tensor]:
    """Clean, flickering, noisy and frozen versions of the same held-out videos, ``(n, t, c, h, w)`` each."""
    out = {"clean": [], "flicker": [], "noise": []}
    for seed in SEEDS:
        example = WORLD.example(seed)
        out["clean"].append(example.video)
        for kind in ("flicker", "noise"):
            out[kind].append(WORLD.corrupt(example, kind, torch.Generator().manual_seed(seed)).video)
    out = {k: torch.stack(v) for k, v in out.items()}
    out["frozen"] = out["clean"][:, :1].expand_as(out["clean"])
    return out


def overall(name: str, videos: torch.Tensor, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return create_reward(name, **kwargs)(videos)["overall"]


def test_flicker_ranks_clean_above_flickering(toy):
    clean, flicker = overall("flicker", toy["clean"]), overall("flicker", toy["flicker"])
    assert (clean > flicker).all()
    assert ((clean > 0) & (clean <= 1)).all()


def test_dynamic_degree_ranks_original_above_frozen(toy):
    original, frozen = overall("dynamic_degree", toy["clean"]), overall("dynamic_degree", toy["frozen"])
    assert (original > frozen).all()
    torch.testing.assert_close(frozen, torch.zeros_like(frozen))  # measured exact (torch 2.13.0 / 2.14.1)


def test_consistency_rewards_favour_frozen_videos(toy):
    """The documented failure mode: alone, consistency and flicker prefer a video that does not move."""
    for name in ("subject_consistency", "flicker"):
        assert (overall(name, toy["frozen"]) >= overall(name, toy["clean"])).all()
    assert (overall("dynamic_degree", toy["frozen"]) < overall("dynamic_degree", toy["clean"])).all()  # the remedy


def test_subject_consistency_ranks_clean_above_noise(toy):
    assert (overall("subject_consistency", toy["clean"]) > overall("subject_consistency", toy["noise"])).all()


@pytest.mark.parametrize("name", ["subject_consistency", "flicker", "dynamic_degree"])
def test_scores_are_differentiable(toy, name):
    videos = toy["clean"][:3].clone().requires_grad_(True)
    reward = create_reward(name)
    scores = reward(videos)
    assert set(scores) == {name, "overall"} and reward.differentiable
    scores["overall"].sum().backward()
    assert torch.isfinite(videos.grad).all() and videos.grad.abs().sum() > 0


def test_timm_backbone_features_and_round_trip(toy, tmp_path):
    """A real timm model gives the features (tiny random config: no download in tests)."""
    torch.manual_seed(0)
    reward = SubjectConsistency(backbone="test_vit", pretrained_backbone=False)
    videos = toy["clean"][:2, :3].clone().requires_grad_(True)
    scores = reward(videos)["overall"]
    scores.sum().backward()
    assert scores.shape == (2,) and torch.isfinite(videos.grad).all()
    reward.train()
    assert not reward.backbone.training  # the frozen backbone stays in eval mode
    assert not any(p.requires_grad for p in reward.parameters())
    reward.save_pretrained(tmp_path)
    loaded = create_reward(str(tmp_path))
    assert loaded.config == {"backbone": "test_vit", "pretrained_backbone": False, "feature_size": 16}
    with torch.no_grad():
        # measured exact (torch 2.13.0 / 2.14.1)
        torch.testing.assert_close(loaded(videos)["overall"], reward(videos)["overall"])


def test_raft_flow_runs_on_small_clips(toy):
    """torchvision RAFT (random weights, few updates) plugs in; only shapes and finiteness are meaningful here."""
    torch.manual_seed(0)
    reward = DynamicDegree(flow_model="raft_small", flow_weights=None, flow_size=128, num_flow_updates=2)
    with torch.no_grad():
        scores = reward(toy["clean"][:1, :3])["overall"]
    assert scores.shape == (1,) and torch.isfinite(scores).all()
    assert "flow.feature_encoder.convnormrelu.0.weight" in reward.state_dict()


@pytest.mark.parametrize(("build", "match"), [
    (lambda: DynamicDegree(flow_model="pwcnet"), "flow_model must be"),
    (lambda: DynamicDegree(flow_model="raft_small", flow_weights="NOPE"), "flow_weights for raft_small"),
    (lambda: DynamicDegree(flow_size=100), "multiple of 8"),
    (lambda: DynamicDegree(top_fraction=0.0), "top_fraction"),
    (lambda: TemporalFlicker(grid=0), "grid must be positive"),
    (lambda: SubjectConsistency(feature_size=0), "feature_size must be positive"),
])
def test_bad_arguments_raise(build, match):
    with pytest.raises(ValueError, match=match):
        build()


@pytest.mark.parametrize(("name", "frames"), [("flicker", 3), ("dynamic_degree", 2), ("subject_consistency", 2)])
def test_minimum_frames(name, frames):
    with pytest.raises(ValueError, match=f"at least {frames} frames"):
        create_reward(name)(torch.rand(1, frames - 1, 3, 8, 8))
