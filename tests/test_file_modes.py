"""File modes (issue 22.5): what the tools write atomically (through ``mkstemp``/``mkdtemp``, which make owner-only
files) ends up with the mode a plain ``open()``/``mkdir()`` gives under the user's umask, so a shared results folder or
a web server can read it when the umask allows, and nobody else can when it does not."""

from __future__ import annotations

import os
import stat
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lit_videoalign.checkpoint_io import AtomicCheckpointIO
from lit_videoalign.video_io import atomic_dir, current_umask, write_frames_png, write_gif, write_mp4

UMASKS = [0o022, 0o077]


@contextmanager
def umask(mask: int):
    """Run the block under ``mask`` and restore the previous umask afterwards, even on failure."""
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def plain_modes(tmp_path: Path) -> tuple[int, int]:
    """The modes ``open()`` and ``mkdir()`` give right now: what every atomic write must match."""
    (tmp_path / "plain.txt").write_text("x")
    (tmp_path / "plain_dir").mkdir()
    return mode(tmp_path / "plain.txt"), mode(tmp_path / "plain_dir")


@pytest.mark.parametrize("mask", UMASKS)
def test_current_umask_is_read_without_changing_it(mask):
    with umask(mask):
        assert current_umask() == mask
        assert current_umask() == mask  # reading twice: still the same, so it was not changed


@pytest.mark.parametrize("mask", UMASKS)
def test_videos_images_checkpoints_exports_and_rewards_get_open_modes(mask, tmp_path):
    from reward_zoo import create_reward
    from reward_zoo.training import RewardTraining

    video = torch.rand(4, 3, 8, 8)  # (t, c, h, w)
    with umask(mask):
        file_mode, dir_mode = plain_modes(tmp_path)
        assert (file_mode, dir_mode) == (0o666 & ~mask, 0o777 & ~mask)
        written = [write_mp4(video, tmp_path / "a.mp4"), write_gif(video, tmp_path / "a.gif"),
                   write_frames_png(video, tmp_path / "a.png")]
        AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.zeros(2)}}, tmp_path / "ckpt" / "last.ckpt")
        written.append(tmp_path / "ckpt" / "last.ckpt")
        with atomic_dir(tmp_path / "export") as folder:  # how pipeline and adapter exports are written
            save_file({"w": torch.zeros(2)}, folder / "model.safetensors")
        written.append(tmp_path / "export" / "model.safetensors")
        RewardTraining(create_reward("physics_learned")).save_pretrained(tmp_path / "reward")
        written += sorted((tmp_path / "reward").iterdir())
        assert {p.name for p in written} >= {"model.safetensors", "config.json", "README.md", "metrics.json"}
        assert {p.name: oct(mode(p)) for p in written} == {p.name: oct(file_mode) for p in written}
        assert oct(mode(tmp_path / "export")) == oct(dir_mode) and oct(mode(tmp_path / "reward")) == oct(dir_mode)
        assert not [p for p in tmp_path.rglob(".*")]  # no temporary left behind
