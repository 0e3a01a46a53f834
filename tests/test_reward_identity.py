"""reward_zoo.identity: the shipped ``identity`` reward ranks identity-preserving toy-world videos above colour- and
size-changed ones on held-out seeds; references, the mean/worst blend and any timm encoder work."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from lit_videoalign.data.toyworld import TEST_SEED_OFFSET, ToyWorld, render
from lit_videoalign.data.toyworld_pairs import apply_corruption
from reward_zoo import create_reward
from reward_zoo.identity import IdentityReward

SEEDS = range(TEST_SEED_OFFSET + 42_000_000, TEST_SEED_OFFSET + 42_000_040)  # held out from training and model cards
WORLD = ToyWorld()


@pytest.fixture(scope="module")
def identity() -> IdentityReward:
    return create_reward("identity", pretrained=True)


def pairs(kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    clean, bad = [], []
    for seed in SEEDS:
        example = WORLD.example(seed)
        clean.append(example.video)
        bad.append(apply_corruption(WORLD, example, kind, torch.Generator().manual_seed(seed)).video)
    return torch.stack(clean), torch.stack(bad)


@pytest.mark.parametrize("kind", ["colour_change", "size_change"])
@pytest.mark.parametrize("dimension", ["mean", "worst", "overall"])
def test_shipped_identity_ranks_identity_preserving_videos_higher(identity, kind, dimension):
    clean, bad = pairs(kind)
    with torch.no_grad():
        wins = identity(clean)[dimension] > identity(bad)[dimension]
    assert wins.float().mean() >= 0.9, f"{dimension}/{kind}: clean higher for only {wins.float().mean():.0%}"


def test_motion_alone_keeps_identity_high(identity):
    """A clean bouncing ball stays close to its first frame: higher than any colour change, near the top of [-1, 1]."""
    clean, bad = pairs("colour_change")
    with torch.no_grad():
        clean_scores, bad_scores = identity(clean)["worst"], identity(bad)["worst"]
    assert clean_scores.median() > bad_scores.median()
    assert clean_scores.median() > 0.5


def test_reference_image_of_another_subject_scores_lower(identity):
    example = WORLD.example(SEEDS[0])
    scene = example.scene
    other_colour = next(c for c in ("red", "green", "blue") if c not in {b.colour for b in scene.balls})
    impostor = replace(scene, balls=(replace(scene.balls[0], colour=other_colour), *scene.balls[1:]))
    own, wrong = example.video[0], render(impostor, example.trajectory)[0]  # (c, h, w) reference images
    videos = example.video[None].expand(2, -1, -1, -1, -1)
    with torch.no_grad():
        scores = identity(videos, references=torch.stack([own, wrong]))
    assert scores["mean"][0] > scores["mean"][1] and scores["worst"][0] > scores["worst"][1]
    with torch.no_grad():  # a reference video works too (its frames' mean embedding)
        assert identity(example.video[None], references=example.video[None])["mean"].item() > 0.5


def test_scores_are_cosines_and_overall_blends_mean_and_worst():
    torch.manual_seed(0)
    reward = IdentityReward(worst_weight=0.25)
    videos = torch.rand(3, 5, 3, 32, 32, requires_grad=True)
    scores = reward(videos)
    assert (scores["worst"] <= scores["mean"] + 1e-6).all() and (scores["mean"].abs() <= 1 + 1e-6).all()
    # measured exact (torch 2.13.0 / 2.14.1)
    assert torch.allclose(scores["overall"], 0.75 * scores["mean"] + 0.25 * scores["worst"])
    scores["overall"].sum().backward()
    assert videos.grad.abs().sum() > 0
    frozen = torch.rand(1, 1, 3, 32, 32).expand(1, 4, -1, -1, -1)
    # a still frame is itself: a cosine, in [-1, 1]; measured 1.2e-7 off 1 (torch 2.14.1), 1e-5 is 80x that
    # in eval mode: in train mode BatchNorm normalises identical frames to rounding noise (0 with baseline kernels)
    assert torch.allclose(reward.eval()(frozen.contiguous())["worst"], torch.ones(1), atol=1e-5)


def test_any_timm_encoder_name_resizes_to_its_input_size():
    torch.manual_seed(0)
    reward = IdentityReward(encoder="test_vit", frame_size=None)  # timm's test ViT takes 160 x 160
    assert reward.frame_size == (160, 160)
    with torch.no_grad():
        scores = reward(torch.rand(1, 2, 3, 24, 40))
    assert scores["mean"].shape == (1,)
    with pytest.raises(ValueError, match="worst_weight"):
        IdentityReward(worst_weight=1.5)
