"""The toy-world evaluation shared by the benchmarks, and their one output flag."""

from __future__ import annotations

import argparse
import math

import pytest
import torch

from benchmarks import add_output_argument, output_path
from benchmarks.toyworld_eval import agreement_rates, bootstrap_ci, held_out_scenes, paired_ci95, score


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_output_argument(parser, "benchmarks/results/toyworld_x")
    return parser.parse_args(argv)


def test_output_is_one_flag_and_the_old_folder_flag_still_works(tmp_path):
    assert str(output_path(parse([]))) == "benchmarks/results/toyworld_x"
    assert output_path(parse(["--output", str(tmp_path / "run")])) == tmp_path / "run"
    with pytest.warns(FutureWarning, match="--output"):
        assert output_path(parse(["--out", str(tmp_path)])) == tmp_path / "toyworld_x"
    with pytest.warns(FutureWarning):
        assert output_path(parse(["--out", str(tmp_path)]), "ablation") == tmp_path / "ablation"


def test_score_reads_rewards_and_prompt_agreement_of_real_videos():
    from reward_zoo import create_reward

    scenes = held_out_scenes(4)
    videos, prompts = torch.stack([s.video for s in scenes]), [s.prompt for s in scenes]
    newton = create_reward("newton")
    row = score(videos, prompts, {"newton": newton})
    with torch.no_grad():
        expected = newton(videos, prompts)["overall"]
    assert row["newton_per_video"] == expected.tolist()
    assert row["newton"] == pytest.approx(expected.mean().item(), abs=1e-7)  # float32 mean of the same values
    assert row["all"] == agreement_rates(videos, prompts)["all"] == 1.0  # real scenes agree with their prompts
    assert {"colour", "direction", "falls", "newton_sem"} <= set(row)


def test_paired_differences_and_their_intervals():
    row, base = {"x_per_video": [1.0, 2.0, 3.0, 4.0]}, {"x_per_video": [0.0, 1.0, 2.0, 3.0]}
    assert paired_ci95(row, base, "x") == (1.0, 0.0)  # a pure shift: no spread
    assert all(math.isnan(v) for v in paired_ci95(row, {}, "x"))
    low, high = bootstrap_ci([0.0, 1.0, 2.0, 3.0])
    assert 0.0 <= low < 1.5 < high <= 3.0
