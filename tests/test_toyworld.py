"""The toy world: seeded, physically correct, prompts that describe the video, labelled corruptions."""

import pytest
import torch

from lit_videoalign.data.toyworld import (
    BACKGROUND,
    COLOURS,
    CORRUPTIONS,
    VOCABULARY,
    ToyWorld,
    ToyWorldDataModule,
    simulate,
)

WORLD = ToyWorld(max_balls=1)


def foreground(video):
    """Mask (t, h, w) of pixels that differ from the background."""
    return (video - torch.tensor(BACKGROUND).view(1, 3, 1, 1)).abs().sum(1) > 0.3


def centroids(video):
    mask = foreground(video).float()
    ys = torch.arange(video.shape[-2]).view(1, -1, 1).float()
    xs = torch.arange(video.shape[-1]).view(1, 1, -1).float()
    area = mask.sum((1, 2)).clamp(min=1)
    return (mask * xs).sum((1, 2)) / area, (mask * ys).sum((1, 2)) / area


def test_same_seed_same_video_and_valid_range():
    a, b, c = WORLD.example(5), WORLD.example(5), WORLD.example(6)
    assert torch.equal(a.video, b.video) and a.prompt == b.prompt
    assert not torch.equal(a.video, c.video)
    assert a.video.shape == (16, 3, 32, 32) and a.video.dtype == torch.float32
    assert a.video.min() >= 0 and a.video.max() <= 1
    assert set(a.prompt.split()) <= set(VOCABULARY)


def test_motion_is_constant_acceleration_between_contacts():
    for seed in range(10):
        ex = WORLD.example(seed)
        y = ex.trajectory.positions[:, 0, 1]
        accel = y[2:] - 2 * y[1:-1] + y[:-2]
        # a threshold, not a tolerance: free-fall frames measured within 2.9e-6 of gravity (float32 rounding of the
        # positions), contact frames at least 0.42 away
        free = (accel - ex.scene.gravity).abs() < 1e-4
        assert free.float().mean() >= 0.5, f"seed {seed}: only {free.float().mean():.2f} of frames in free fall"
        # frames that are not free fall are floor contacts: the ball is near the floor there
        floor = ex.scene.height - 0.5 - ex.trajectory.radii[0, 0]
        for f in torch.nonzero(~free).flatten().tolist():
            assert y[f:f + 3].max() > floor - 3


def test_prompt_names_the_colour_and_direction_seen_in_the_video():
    for seed in range(20):
        ex = WORLD.example(seed)
        colour = ex.prompt.split()[1]
        mask = foreground(ex.video)
        seen = ex.video.permute(1, 0, 2, 3)[:, mask].mean(1)
        nearest = min(COLOURS, key=lambda c: (torch.tensor(COLOURS[c]) - seen).abs().sum())
        assert nearest == colour, f"seed {seed}: prompt says {colour}, video looks {nearest}"
        x, _ = centroids(ex.video)
        dx = float(x[3] - x[0])
        if "moves left" in ex.prompt:
            assert dx < -1
        elif "moves right" in ex.prompt:
            assert dx > 1
        else:
            assert abs(dx) < 0.5
        bounced = bool(ex.trajectory.bounced[0])
        assert ("bounces" in ex.prompt) == bounced


def test_two_ball_scenes_describe_both_balls():
    world = ToyWorld(max_balls=2, two_ball_prob=1.0)
    ex = world.example(0)
    assert len(ex.scene.balls) == 2 and ex.prompt.count("ball") == 2
    assert ex.scene.balls[0].colour != ex.scene.balls[1].colour


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_each_corruption_is_labelled_and_changes_what_it_says(kind):
    clean = WORLD.example(11, require_bounce=True)
    bad = WORLD.corrupt(clean, kind, torch.Generator().manual_seed(0))
    assert bad.corruption == kind
    assert bad.video.shape == clean.video.shape and bad.video.min() >= 0 and bad.video.max() <= 1
    if kind in ("wrong_colour", "wrong_direction"):
        assert torch.equal(bad.video, clean.video) and bad.prompt != clean.prompt
    else:
        assert bad.prompt == clean.prompt and (bad.video - clean.video).abs().max() > 0.1


def test_physics_corruptions_break_the_physics():
    clean = WORLD.example(11, require_bounce=True)
    g = torch.Generator().manual_seed(0)
    zero = WORLD.corrupt(clean, "gravity_zero", g)
    y = zero.trajectory.positions[:, 0, 1]
    # float32 positions (5 px here): second differences measured 4.8e-7, 9e-8 of the positions' scale; 1e-5 of that
    # scale (5e-5) is 100x above it and 5000x below the gravity (0.25 px / frame^2) whose absence this checks
    assert torch.allclose(y[2:] - 2 * y[1:-1] + y[:-2], torch.zeros(14), rtol=0, atol=1e-5 * y.abs().max().item())
    jump = WORLD.corrupt(clean, "teleport", g)
    steps = (jump.trajectory.positions[1:, 0] - jump.trajectory.positions[:-1, 0]).norm(dim=-1)
    assert steps.max() > 3 * (clean.trajectory.positions[1:, 0] - clean.trajectory.positions[:-1, 0]).norm(dim=-1).max()
    grown = WORLD.corrupt(clean, "size_change", g)
    ratio = grown.trajectory.radii[-1, 0] / grown.trajectory.radii[0, 0]
    assert ratio < 0.6 or ratio > 1.6
    rev = WORLD.corrupt(clean, "time_reversal", g)
    assert torch.equal(rev.video, clean.video.flip(0))


def test_time_reversal_refuses_a_scene_without_a_bounce():
    no_bounce = next(WORLD.example(s) for s in range(200) if not bool(WORLD.example(s).trajectory.bounced[0]))
    with pytest.raises(ValueError, match="require_bounce"):
        WORLD.corrupt(no_bounce, "time_reversal", torch.Generator())


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="unknown corruption 'melt'"):
        WORLD.corrupt(WORLD.example(0), "melt", torch.Generator())
    with pytest.raises(ValueError, match="max_balls"):
        ToyWorld(max_balls=3)
    with pytest.raises(ValueError, match="colours"):
        ToyWorld(colours=["red", "mauve"])


def test_simulate_keeps_balls_inside_the_frame():
    for seed in range(30):
        ex = ToyWorld().example(seed)
        traj = simulate(ex.scene)
        r = traj.radii.unsqueeze(-1)
        assert (traj.positions >= r - 0.5 - 1e-4).all() and (traj.positions <= 32 - 0.5 - r + 1e-4).all()


def test_datamodule_batches_and_disjoint_splits():
    dm = ToyWorldDataModule(batch_size=4, train_size=8, val_size=4)
    batch = next(iter(dm.train_dataloader()))
    assert batch["video"].shape == (4, 16, 3, 32, 32) and len(batch["prompt"]) == 4
    val = next(iter(dm.val_dataloader()))
    train_all = torch.stack([dm.train_dataloader().dataset[i]["video"] for i in range(8)])
    for v in val["video"]:
        assert not any(torch.equal(v, t) for t in train_all)


def test_first_frame_images_fix_the_start_for_image_to_video():
    """With first_frame_image every item carries its clip's first frame, also when only prompts are served (online
    image-to-video methods generate the motion from it)."""

    batches = {}
    for prompts_only in (False, True):
        data = ToyWorldDataModule(num_frames=8, batch_size=2, train_size=4, val_size=2, prompts_only=prompts_only,
                                  first_frame_image=True)
        batches[prompts_only] = next(iter(data.val_dataloader()))
    clips, prompts = batches[False], batches[True]
    assert clips["image"].shape == (2, 3, 32, 32) and torch.equal(clips["image"], clips["video"][:, 0])
    assert torch.equal(prompts["image"], clips["image"]) and prompts["prompt"] == clips["prompt"]
    assert "image" not in next(iter(ToyWorldDataModule(num_frames=8, batch_size=2, val_size=2).val_dataloader()))
