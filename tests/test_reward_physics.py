"""reward_zoo.physics: ``newton`` ranks true toy-world physics above each physics corruption on held-out seeds."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from lit_videoalign.data.toyworld import TEST_SEED_OFFSET, ToyWorld, simulate
from reward_zoo import create_reward
from reward_zoo.physics import NewtonReward

SEEDS = range(TEST_SEED_OFFSET + 30_000_000, TEST_SEED_OFFSET + 30_000_040)  # held out from any tuning
WORLD = ToyWorld()


@pytest.fixture(scope="module")
def newton() -> NewtonReward:
    return create_reward("newton")


def pairs(kind: str, seeds=SEEDS) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean and corrupted videos ``(n, t, c, h, w)`` for ``seeds``."""
    clean, bad = [], []
    for seed in seeds:
        example = WORLD.example(seed, require_bounce=kind == "time_reversal")
        clean.append(example.video)
        bad.append(WORLD.corrupt(example, kind, torch.Generator().manual_seed(seed)).video)
    return torch.stack(clean), torch.stack(bad)


def frames_after_first_bounce(seed: int) -> int:
    """How many frames of ``example(seed, require_bounce=True)`` follow the first ball's first floor contact."""
    scene = WORLD.example(seed, require_bounce=True).scene
    for f in range(scene.num_frames):
        if bool(simulate(replace(scene, num_frames=f + 1)).bounced[0]):  # contact inside [f, f + 1]
            return scene.num_frames - 1 - f
    raise AssertionError("require_bounce guarantees a bounce")


@pytest.mark.parametrize("kind", ["gravity_wrong", "gravity_zero", "teleport", "size_change"])
def test_newton_ranks_true_physics_above_corruption(newton, kind):
    clean, bad = pairs(kind)
    with torch.no_grad():
        wins = newton(clean)["overall"] > newton(bad)["overall"]
    assert wins.float().mean() >= 0.95, f"{kind}: clean ranked higher for only {wins.float().mean():.0%} of seeds"


def test_newton_detects_time_reversal_of_visible_bounces(newton):
    """Reversal only breaks physics through the energy a bounce gains, so it needs frames after the bounce.

    Seeds are picked by the ground truth (two or more frames after the contact), never by the reward.
    """
    seeds = [s for s in range(TEST_SEED_OFFSET + 31_000_000, TEST_SEED_OFFSET + 31_000_200)
             if frames_after_first_bounce(s) >= 2][:40]
    assert len(seeds) == 40
    clean, bad = pairs("time_reversal", seeds)
    with torch.no_grad():
        clean_scores, bad_scores = newton(clean), newton(bad)
    wins = clean_scores["overall"] > bad_scores["overall"]
    assert wins.float().mean() >= 0.95
    assert (clean_scores["energy"] >= bad_scores["energy"]).float().mean() >= 0.95


@pytest.mark.parametrize(("kind", "dimension"), [
    ("gravity_zero", "acceleration"), ("teleport", "continuity"), ("size_change", "mass"),
])
def test_each_dimension_catches_its_violation(newton, kind, dimension):
    clean, bad = pairs(kind, SEEDS[:20])
    with torch.no_grad():
        wins = newton(clean)[dimension] > newton(bad)[dimension]
    assert wins.float().mean() >= 0.95


def test_scores_are_in_unit_interval_and_differentiable(newton):
    clean, bad = pairs("teleport", SEEDS[:4])
    videos = torch.cat([clean, bad]).requires_grad_(True)
    scores = newton(videos)
    assert set(scores) == {"acceleration", "continuity", "mass", "energy", "overall"}
    for value in scores.values():
        assert ((value > 0) & (value <= 1)).all()
    scores["overall"].sum().backward()
    assert torch.isfinite(videos.grad).all() and videos.grad.abs().sum() > 0
    assert newton.differentiable


def test_frozen_video_breaks_gravity(newton):
    clean, _ = pairs("gravity_zero", SEEDS[:10])
    frozen = clean[:, :1].expand_as(clean)
    with torch.no_grad():
        assert (newton(clean)["overall"] > newton(frozen)["overall"]).all()


def test_empty_scene_scores_one_without_nan(newton):
    background = torch.tensor([0.08, 0.08, 0.10]).view(1, 1, 3, 1, 1).expand(2, 6, 3, 16, 16)
    scores = newton(background.contiguous())
    for value in scores.values():
        torch.testing.assert_close(value, torch.ones(2))  # measured exact (torch 2.13.0 / 2.14.1)


def test_other_modes_rank_gravity_violations():
    clean, bad = pairs("gravity_zero", SEEDS[:20])
    single_track = NewtonReward(colours=None, background=[0.08, 0.08, 0.10])  # all foreground as one object
    with torch.no_grad():
        assert (single_track(clean)["overall"] > single_track(bad)["overall"]).float().mean() >= 0.95
    unknown_gravity = NewtonReward(gravity=None)  # only asks for a consistent downward acceleration
    upward = torch.stack([WORLD.make(replace(scene, gravity=-scene.gravity)).video
                          for scene in (WORLD.example(s).scene for s in SEEDS[:20])])
    with torch.no_grad():
        assert (unknown_gravity(clean)["overall"] > unknown_gravity(upward)["overall"]).float().mean() >= 0.95


def test_config_round_trip(tmp_path):
    reward = NewtonReward(gravity=None, mass_tolerance=0.2)
    reward.save_pretrained(tmp_path)
    loaded = create_reward(str(tmp_path))
    assert isinstance(loaded, NewtonReward) and loaded.config == reward.config
    assert loaded.gravity is None and loaded.tolerances["mass"] == 0.2


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"colours": [[1.0, 0.0]]}, "colours must be a list of"),
    ({"colours": [[2.0, 0.0, 0.0]]}, "colours must be a list of"),
    ({"background": [0.1, 0.1]}, r"background must be \[r, g, b\]"),
    ({"mass_tolerance": 0.0}, "mass_tolerance must be positive"),
])
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NewtonReward(**kwargs)


def test_colour_matching_the_background_raises(newton):
    white = torch.full((1, 4, 3, 16, 16), 0.95)  # the estimated background is the palette's white
    with pytest.raises(ValueError, match="indistinguishable from the background"):
        newton(white)


def test_needs_four_frames(newton):
    with pytest.raises(ValueError, match="at least 4 frames"):
        newton(torch.rand(1, 3, 3, 16, 16))
