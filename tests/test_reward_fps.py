"""Rewards know time (DESIGN.md section 7): ``reward(videos, prompts, references, fps)`` checks ``fps`` and hands it to
every ``forward`` that takes it; rewards that sample by time raise without it; the suite passes the generator's fps
(backbone attribute) through objectives, evaluation and callbacks, and the file's fps where it reads files."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from lit_videoalign.backbones.diffusers import DiffusersVideoBackbone
from lit_videoalign.evaluation import VideoSet, evaluate_sets, read_video_folder, score_videos, write_manifest
from lit_videoalign.objectives.base import guarded_scores
from lit_videoalign.objectives.grpo import GRPO
from lit_videoalign.testing import Brightness
from lit_videoalign.video_io import probe_video, write_mp4
from reward_zoo import CompositeReward
from reward_zoo.base import RewardModel, check_fps
from reward_zoo.cli import score_files
from reward_zoo.frame import FrameReward


class FpsRecorder(RewardModel):
    """Records the ``fps`` each call received; scores the frame count per second (so it needs ``fps``)."""

    dimensions = ("duration",)

    def __init__(self, checkpoint_fps: float = 2.0) -> None:
        super().__init__()
        self.checkpoint_fps = checkpoint_fps
        self.seen: list[float | None] = []

    def forward(self, videos, prompts=None, references=None, fps=None):
        self.seen.append(fps)
        fps = self.require_fps(fps, self.checkpoint_fps)
        seconds = torch.full((videos.shape[0],), videos.shape[1] / fps)
        return {"duration": seconds, "overall": seconds}


class Legacy(RewardModel):
    """A reward written before rewards knew time: its forward has no ``fps``."""

    def forward(self, videos, prompts=None, references=None):
        return {"overall": videos.mean((1, 2, 3, 4))}


@pytest.mark.parametrize("bad", [0, -8, float("nan"), math.inf, "16", True])
def test_fps_must_be_a_positive_number_or_none(bad):
    with pytest.raises(ValueError, match=f"FpsRecorder: fps must be a positive number of frames per second or None, "
                                         f"got {bad!r}"[:60]):
        FpsRecorder()(torch.rand(1, 4, 3, 8, 8), fps=bad)
    assert check_fps(None) is None and check_fps(16) == 16.0 and isinstance(check_fps(16), float)


def test_forward_gets_fps_and_a_reward_that_needs_it_names_the_rate_it_expects():
    reward = FpsRecorder()
    assert reward(torch.rand(2, 8, 3, 8, 8), fps=16)["duration"].tolist() == [0.5, 0.5]
    assert reward.seen == [16.0]
    with pytest.raises(ValueError, match="FpsRecorder samples frames by time and needs the videos' frame rate \\(its "
                                         "checkpoint samples frames at 2 fps\\); pass fps="):
        reward(torch.rand(2, 8, 3, 8, 8))


def test_rewards_without_an_fps_argument_accept_and_ignore_it():
    videos = torch.rand(2, 3, 3, 8, 8)
    assert torch.equal(Legacy()(videos, fps=24)["overall"], Legacy()(videos)["overall"])
    assert Legacy().fps_kwargs(24.0) == {} and FpsRecorder().fps_kwargs(24.0) == {"fps": 24.0}
    # every family's forward takes fps now; a temporal reward's score does not change with it
    from reward_zoo import create_reward

    flicker = create_reward("flicker")
    assert flicker.fps_kwargs(8.0) == {"fps": 8.0}
    assert torch.equal(flicker(videos, fps=8)["overall"], flicker(videos)["overall"])


def test_composite_forwards_fps_and_frame_reward_scores_single_frames_without_it():
    inner = FpsRecorder()
    composite = CompositeReward({"t": inner, "b": Brightness()}, {"t": 1.0, "b": 1.0})
    composite(torch.rand(2, 6, 3, 8, 8), fps=12)
    assert inner.seen == [12.0]
    recorder = FpsRecorder()
    frames = FrameReward(recorder, num_frames=2)
    with pytest.raises(ValueError, match="needs the videos' frame rate"):  # a single frame carries no frame rate
        frames(torch.rand(1, 6, 3, 8, 8), fps=12)
    assert recorder.seen == [None]


def test_backbone_fps_from_the_family_or_the_config(tiny_pixel_pipeline):
    assert DiffusersVideoBackbone("builtin:toyworld-base").fps == 8.0  # the toy world renders at 8 fps
    assert DiffusersVideoBackbone(tiny_pixel_pipeline, max_sequence_length=16).fps == 16.0  # Wan's default
    assert DiffusersVideoBackbone(tiny_pixel_pipeline, max_sequence_length=16, fps=24).fps == 24.0
    with pytest.raises(ValueError, match="fps must be a positive number of frames per second or None, got 0"):
        DiffusersVideoBackbone(tiny_pixel_pipeline, fps=0)


def test_guarded_scores_pass_fps_also_on_the_nan_fallback():
    class NaNRecorder(FpsRecorder):
        def forward(self, videos, prompts=None, references=None, fps=None):
            out = super().forward(videos, prompts, references, fps)
            return {k: torch.cat([v[:1], torch.tensor([float("nan")])]) for k, v in out.items()}

    reward = NaNRecorder()
    scores = guarded_scores(reward, torch.rand(2, 4, 3, 8, 8), ["a", "b"], "GRPO", "skipped", fps=8)
    assert reward.seen == [8.0, 8.0] and scores["overall"][0] == 0.5 and scores["overall"][1].isnan()


def test_grpo_scores_its_rollouts_at_the_backbone_fps(tiny_pixel_pipeline):
    reward = FpsRecorder()
    bb = DiffusersVideoBackbone(tiny_pixel_pipeline, max_sequence_length=16, fps=12)
    model = GRPO(bb, reward=reward, lora_rank=4, group_size=2, num_sampling_steps=2, num_inference_steps=2,
                 optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
    prompts = torch.utils.data.DataLoader([{"prompt": "a red ball falls"}] * 2, batch_size=1)
    L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, limit_val_batches=0).fit(model, prompts)
    assert reward.seen and set(reward.seen) == {12.0}


def test_evaluation_and_score_read_the_frame_rate_of_the_files(tmp_path):
    folder = tmp_path / "videos"
    entries = []
    for i in range(2):
        write_mp4(torch.rand(6, 3, 16, 16), folder / f"v{i}.mp4", fps=12)
        entries.append({"file_name": f"v{i}.mp4", "prompt": "a ball"})
    write_manifest(folder, entries)
    assert probe_video(folder / "v0.mp4").fps == 12.0 and probe_video(folder / "v0.mp4", decode=False).fps == 12.0
    videoset = read_video_folder(folder)
    assert videoset.fps == 12.0
    reward = FpsRecorder()
    evaluate_sets([videoset], {"t": reward}, tmp_path / "eval")
    assert reward.seen == [12.0]
    rows = score_videos({"t": reward}, videoset.videos, videoset.prompts, fps=6)
    assert rows[0]["t/overall"] == 1.0  # 6 frames at 6 fps
    in_memory = VideoSet("generated", videoset.videos, videoset.prompts)  # no fps known: the reward says so
    with pytest.raises(ValueError, match="needs the videos' frame rate"):
        evaluate_sets([in_memory], {"t": FpsRecorder()}, tmp_path / "eval2")

    saved = tmp_path / "recorder"
    FpsRecorder().save_pretrained(saved)
    rows = score_files(str(saved), [str(folder / "v0.mp4"), str(folder / "v1.mp4")])
    assert [row["overall"] for row in rows] == [0.5, 0.5]  # 6 frames at the files' 12 fps
    write_mp4(torch.rand(6, 3, 16, 16), folder / "v1.mp4", fps=8)
    with pytest.raises(ValueError, match="different frame rates \\[8.0, 12.0\\]"):
        read_video_folder(folder)


def test_generated_files_carry_the_generator_fps_for_the_next_tool(tmp_path):
    """``generate`` writes its MP4s at the backbone's rate (Wan 16 fps here), so ``reward-zoo score`` reads it back."""
    from types import SimpleNamespace

    from lit_videoalign.generation import generate_videos

    model = SimpleNamespace(backbone=SimpleNamespace(fps=16.0))
    _, files = generate_videos(model, ["a ball"], [0], tmp_path / "gen", gif=False,
                               sampler=lambda m, prompts, seeds, **_: torch.rand(len(prompts), 8, 3, 16, 16))
    assert probe_video(files[0]).fps == 16.0
    _, files = generate_videos(model, ["a ball"], [0], tmp_path / "gen24", gif=False, fps=24,
                               sampler=lambda m, prompts, seeds, **_: torch.rand(len(prompts), 8, 3, 16, 16))
    assert probe_video(files[0]).fps == 24.0  # an explicit --fps wins
