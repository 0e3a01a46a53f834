"""The toy-world alignment benchmark's own measures: trajectory error against true physics and sample diversity (the
benchmark itself needs trained models and is run from benchmarks/, never here)."""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks.toyworld_alignment import diversity, parse_model, track, trajectory_error
from lit_videoalign.data.toyworld import TEST_SEED_OFFSET, ToyWorld


@pytest.fixture(scope="module")
def examples():
    world = ToyWorld(max_balls=1)
    return world, [world.example(TEST_SEED_OFFSET + i, require_bounce=i % 2 == 0) for i in range(8)]


def test_tracker_finds_the_true_centre(examples):
    _, exs = examples
    pos, area = track(torch.stack([e.video for e in exs]))
    true = torch.stack([e.trajectory.positions[:, 0] for e in exs])  # (b, t, 2)
    assert (pos - true).norm(dim=-1).max() < 0.25
    assert (area > 10).all()


def test_real_videos_follow_true_physics_and_wrong_gravity_does_not(examples):
    world, exs = examples
    real = trajectory_error(torch.stack([e.video for e in exs]))
    assert real.max() < 0.5  # pixels; real bounces included
    g = torch.Generator().manual_seed(0)
    for kind in ("gravity_wrong", "gravity_zero", "teleport"):
        corrupted = trajectory_error(torch.stack([world.corrupt(e, kind, g).video for e in exs]))
        assert corrupted.min() > 2.0, kind
        assert corrupted.mean() > 10 * real.mean(), kind


def test_no_ball_is_nan_and_fit_frames_are_checked(examples):
    _, exs = examples
    empty = torch.full_like(exs[0].video, 0.09)[None]  # background only
    assert math.isnan(trajectory_error(empty)[0].item())
    with pytest.raises(ValueError, match="fit_frames"):
        trajectory_error(exs[0].video[None], fit_frames=16)


def test_diversity(examples):
    _, exs = examples
    video = exs[0].video
    assert diversity(torch.stack([video, video, video])) == 0.0
    assert diversity(torch.stack([e.video for e in exs[:3]])) > 0.01
    with pytest.raises(ValueError, match="two videos"):
        diversity(video[None])


def test_model_spec_with_cpu_minutes():
    assert parse_model("dmd=configs/toyworld/dmd.yaml:outputs/dmd/pipeline@17") == (
        "dmd=configs/toyworld/dmd.yaml:outputs/dmd/pipeline", 17.0)
    assert parse_model("dmd=configs/toyworld/dmd.yaml") == ("dmd=configs/toyworld/dmd.yaml", None)
    assert parse_model("grpo=grpo.yaml:pipeline@-") == ("grpo=grpo.yaml:pipeline", None)
    assert parse_model("grpo=grpo.yaml:runs@3/pipeline") == ("grpo=grpo.yaml:runs@3/pipeline", None)
    with pytest.raises(ValueError, match="CPU_MINUTES"):
        parse_model("grpo=grpo.yaml:pipeline@GRPO_MIN")
