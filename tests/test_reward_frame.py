"""reward_zoo.frame: FrameReward scores sampled frames with an image reward and reduces them per dimension; its
dimensions, differentiability and prompt needs are the wrapped reward's; it composes by name, spec and config."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import CLIPImageProcessor

from lit_videoalign.testing import Brightness, write_tiny_clip
from reward_zoo import create_reward
from reward_zoo.frame import FrameReward
from reward_zoo.pickscore import PickScore


class FrameIndex(Brightness):
    """Scores a one-frame video by its constant pixel value, so a score names the frame it came from."""

    dimensions = ("value", "half")
    requires_prompts = True

    def forward(self, videos, prompts=None, references=None, fps=None):
        assert videos.shape[1] == 1 and len(prompts) == videos.shape[0]
        value = videos.mean((1, 2, 3, 4))
        return {"value": value, "half": value / 2, "overall": value}


def indexed_videos(b: int = 2, t: int = 10) -> torch.Tensor:
    """Videos whose frame ``i`` of video ``j`` has the constant value ``(i + 10 j) / 100``."""
    values = (torch.arange(t)[None] + 10 * torch.arange(b)[:, None]).float() / 100  # (b, t)
    return values[:, :, None, None, None].expand(b, t, 3, 4, 4).clone()


@pytest.mark.parametrize("sampling, frames", [("first", [0, 1, 2]), ("last", [7, 8, 9]), ("uniform", [0, 4, 9])])
def test_sampling_and_reductions(sampling, frames):
    videos, prompts = indexed_videos(), ["a", "b"]
    for reduction in ("mean", "min"):
        reward = FrameReward(FrameIndex(), num_frames=3, sampling=sampling, reduction=reduction)
        scores = reward(videos, prompts)
        per_frame = torch.tensor([[(i + 10 * j) / 100 for i in frames] for j in range(2)])  # (b, k)
        expected = per_frame.mean(1) if reduction == "mean" else per_frame.min(1).values
        torch.testing.assert_close(scores["value"], expected)  # measured exact up to float32 mean round-off
        torch.testing.assert_close(scores["half"], expected / 2)
        assert set(scores) == {"value", "half", "overall"} and reward.dimensions == ("value", "half")


def test_random_sampling_is_seeded_distinct_and_per_video():
    videos = indexed_videos(b=4, t=12)
    draws = [FrameReward(FrameIndex(), num_frames=5, sampling="random", seed=7).frame_indices(4, 12, "cpu")
             for _ in range(2)]
    assert torch.equal(draws[0], draws[1])  # same seed, same frames
    assert all(len(set(row.tolist())) == 5 and row.tolist() == sorted(row.tolist()) for row in draws[0])
    assert len({tuple(row.tolist()) for row in draws[0]}) > 1  # each video draws its own frames
    reward = FrameReward(FrameIndex(), num_frames=5, sampling="random", seed=7)
    first, second = reward(videos, ["p"] * 4)["value"], reward(videos, ["p"] * 4)["value"]
    assert not torch.equal(first, second)  # the generator advances between calls
    short = FrameReward(FrameIndex(), num_frames=5, sampling="random").frame_indices(1, 3, "cpu")
    assert short.tolist() == [[0, 1, 2]]  # a short video: every frame


def test_wrapped_pickscore_equals_its_own_frame_average(tmp_path):
    write_tiny_clip(tmp_path / "clip")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        tmp_path / "clip")
    args = {"model_name_or_path": str(tmp_path / "clip"), "processor_name_or_path": str(tmp_path / "clip")}
    image = PickScore(**args, num_frames=1)
    wrapped = create_reward("frame", reward=image, num_frames=3)
    assert wrapped.dimensions == ("preference",) and wrapped.differentiable and wrapped.requires_prompts
    videos = torch.rand(2, 7, 3, 32, 32, requires_grad=True)
    prompts = ["a red ball falls", "a blue ball bounces"]
    scores = wrapped(videos, prompts, fps=8)
    with torch.no_grad():
        own = PickScore(**args, num_frames=3)(videos, prompts)["overall"]
    # the same frames and maths batched differently: measured exact over 3 seeds (torch 2.14.1, CPU float32)
    torch.testing.assert_close(scores["overall"].detach(), own, atol=1e-5, rtol=0)
    scores["overall"].sum().backward()
    assert videos.grad[:, [0, 3, 6]].abs().sum() > 0 and videos.grad[:, [1, 2, 4, 5]].abs().sum() == 0

    wrapped.save_pretrained(tmp_path / "saved")  # config.json holds the wrapped reward as a class_path spec
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert config["reward"]["class_path"] == "reward_zoo.pickscore.PickScore" and config["num_frames"] == 3
    with torch.no_grad():
        loaded = create_reward(str(tmp_path / "saved"))(videos, prompts)["overall"]
    assert torch.equal(loaded, scores["overall"].detach())


def test_composes_from_a_spec_and_in_a_composite():
    spec = {"class_path": "lit_videoalign.testing.Brightness", "init_args": {}}
    reward = create_reward("frame", reward=spec, num_frames=2, sampling="last", reduction="min")
    videos = indexed_videos()
    torch.testing.assert_close(reward(videos)["brightness"], torch.tensor([0.08, 0.18]))
    from reward_zoo import CompositeReward

    composite = CompositeReward({"frames": reward, "all": Brightness()}, {"frames": 1.0, "all": 1.0})
    assert set(composite(videos)) == {"frames/brightness", "frames/overall", "all/brightness", "all/overall",
                                      "overall"}
    rebuilt = CompositeReward(**composite.config)  # the nested FrameReward round-trips through its JSON form
    torch.testing.assert_close(rebuilt(videos)["overall"], composite(videos)["overall"])


def test_bad_arguments_get_one_line_errors():
    with pytest.raises(ValueError, match="needs at least 4 frames; wrap an image reward"):
        FrameReward("newton")
    with pytest.raises(ValueError, match="sampling must be one of .* got 'middle'"):
        FrameReward(Brightness(), sampling="middle")
    with pytest.raises(ValueError, match="reduction must be one of .* got 'max'"):
        FrameReward(Brightness(), reduction="max")
    with pytest.raises(ValueError, match="num_frames must be a positive integer, got 0"):
        FrameReward(Brightness(), num_frames=0)
    with pytest.raises(TypeError, match="got int"):
        FrameReward(3)
    with pytest.raises(ValueError, match="needs prompts"):
        FrameReward(FrameIndex())(indexed_videos())
