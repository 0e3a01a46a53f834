"""The identity-preserving I2V alignment benchmark runs end to end at its smoke size, and its image measures mean what
they say on real toy-world videos (figures are not checked: they belong in benchmarks/results/)."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks.toyworld_eval import add_image_measures, held_out_images, held_out_scenes, load_reward


def test_image_measures_of_real_videos_against_their_own_first_frames():
    scenes = held_out_scenes(3)
    videos, images = torch.stack([s.video for s in scenes]), held_out_images(3)
    row: dict = {}
    add_image_measures(row, videos, images, load_reward("identity"))
    assert row["first_frame_error"] == 0.0  # frame 0 is the image
    assert row["colour_drift"] < 0.1 and row["identity"] > 0.5
    assert len(row["identity_per_video"]) == 3
    swapped: dict = {}  # another scene's image: identity falls, the first frame no longer matches
    add_image_measures(swapped, videos, images.roll(1, dims=0), load_reward("identity"))
    assert swapped["first_frame_error"] > 0.0 and swapped["identity"] < row["identity"]


def test_quick_run_writes_the_table_and_the_gif(tmp_path):
    from benchmarks.toyworld_i2v_alignment import main

    out = tmp_path / "toyworld_i2v_alignment"
    result = main(["--quick", "--methods", "nft_i2v", "--output", str(out)])
    for suffix in (".json", ".md", ".png", ".gif"):
        assert out.with_suffix(suffix).is_file(), suffix
    summary = json.loads(out.with_suffix(".json").read_text())["summary"]
    assert {"identity", "colour_drift", "first_frame_error", "physics_learned"} <= set(summary["keys"])
    (run,) = summary["runs"]
    assert run["method"] == "nft_i2v_quick" and run["points"][-1]["step"] > 0
    assert "| identity |" in out.with_suffix(".md").read_text()
    assert result["command"].startswith("python -m benchmarks.toyworld_i2v_alignment --quick")


def test_bad_method_is_refused(tmp_path):
    from benchmarks.toyworld_i2v_alignment import main

    with pytest.raises(SystemExit):
        main(["--methods", "grpo", "--output", str(tmp_path / "x")])
