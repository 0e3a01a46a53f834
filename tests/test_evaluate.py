"""``videoalign evaluate``: confidence intervals by hand, tables/plots/win rates from video folders and from a config,
and clear errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from lit_videoalign.cli import main
from lit_videoalign.data.toyworld import ToyWorld
from lit_videoalign.evaluation import (
    VideoSet,
    bootstrap_interval,
    paired_win_rates,
    read_video_folder,
    score_videos,
    wilson_interval,
    win_rate,
    write_manifest,
)
from lit_videoalign.video_io import write_mp4
from reward_zoo import RewardModel, create_reward

ROOT = Path(__file__).resolve().parent.parent


def test_wilson_interval_by_hand():
    # 8/10, z = 1.96: centre (0.8 + z^2/20) / (1 + z^2/10) = 0.71674, half-width 0.22658
    # abs 1e-5 is for the hand values, worked with z = 1.96: the code's z = 1.959964 moves them by up to 4.5e-6
    # (measured; float64 maths, the same on every torch)
    assert wilson_interval(8, 10) == pytest.approx((0.490158, 0.943318), abs=1e-5)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.277534), abs=1e-5)
    assert wilson_interval(10, 10) == pytest.approx((0.722466, 1.0), abs=1e-5)
    assert wilson_interval(30, 30)[1] == 1.0 and wilson_interval(0, 30)[0] == 0.0  # p itself, not 1 - 1e-16
    with pytest.raises(ValueError, match="successes must lie in"):
        wilson_interval(11, 10)


def test_win_rate_counts_ties_as_half():
    result = win_rate([1.0, 2.0, 3.0, 4.0], [0.0, 2.0, 5.0, 1.0])
    assert (result["wins"], result["losses"], result["ties"], result["n"]) == (2, 1, 1, 4)
    assert result["win_rate"] == pytest.approx(0.625)
    assert (result["ci_low"], result["ci_high"]) == pytest.approx(wilson_interval(2.5, 4))
    tolerant = win_rate([1.0, 2.0], [1.05, 1.0], tie_tolerance=0.1)
    assert (tolerant["wins"], tolerant["ties"]) == (1, 1)
    boot = win_rate([1.0] * 20, [0.0] * 20, ci="bootstrap")
    assert boot["win_rate"] == 1.0 and boot["ci_low"] == boot["ci_high"] == 1.0
    with pytest.raises(ValueError, match="equally long"):
        win_rate([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="ci must be"):
        win_rate([1.0], [0.0], ci="normal")


def test_bootstrap_interval_is_seeded_and_covers_the_mean():
    values = torch.randn(200, generator=torch.Generator().manual_seed(0))
    low, high = bootstrap_interval(values)
    assert low < float(values.mean()) < high and high - low < 0.4  # about 2 * 1.96 / sqrt(200) = 0.28 wide
    assert bootstrap_interval(values) == (low, high)
    assert bootstrap_interval([3.0, 3.0, 3.0]) == (3.0, 3.0)


def test_pairs_must_match():
    a = VideoSet("a", torch.rand(2, 4, 3, 8, 8), ["x", "y"], [0, 1])
    b = VideoSet("b", torch.rand(2, 4, 3, 8, 8), ["x", "y"], [0, 2])
    rows = [{"r/overall": 1.0}, {"r/overall": 0.0}]
    with pytest.raises(ValueError, match=r"same prompts and seeds; e.g. \[\('y', 1\)\]"):
        paired_win_rates(a, rows, b, rows)
    b_reordered = VideoSet("b", torch.rand(2, 4, 3, 8, 8), ["y", "x"], [1, 0])
    wins = paired_win_rates(a, rows, b_reordered, [{"r/overall": 0.5}, {"r/overall": 0.5}])
    assert wins[0]["wins"] == 1 and wins[0]["losses"] == 1  # paired by (prompt, seed), not by position


@pytest.fixture(scope="module")
def clean_and_flickering(tmp_path_factory) -> tuple[Path, Path, list]:
    """Six toy-world clips and the same clips with flicker, as two folders with manifests (files upscaled 4x)."""
    root = tmp_path_factory.mktemp("sets")
    world = ToyWorld()
    clean = [world.example(i) for i in range(6)]
    bad = [world.corrupt(ex, "flicker", torch.Generator().manual_seed(i)) for i, ex in enumerate(clean)]
    for name, examples in (("clean", clean), ("flicker", bad)):
        entries = []
        for i, ex in enumerate(examples):
            write_mp4(ex.video, root / name / f"{i}.mp4", upscale=4)
            entries.append({"file_name": f"{i}.mp4", "prompt": ex.prompt, "seed": i, "upscale": 4})
        write_manifest(root / name, entries)
    return root / "clean", root / "flicker", clean


def test_evaluate_video_folders_writes_tables_plots_and_win_rates(clean_and_flickering, tmp_path):
    clean, flickering, examples = clean_and_flickering
    out = tmp_path / "eval"
    main(["evaluate", "--videos", str(clean), "--baseline_videos", str(flickering), "--rewards", "flicker", "newton",
          "--name", "clean", "--baseline_name", "flickering", "--output_dir", str(out)])
    for name in ("scores.json", "scores.csv", "summary.json", "summary.csv", "summary.md", "win_rates.json",
                 "win_rates.csv", "rewards.png", "win_rates.png"):
        assert (out / name).is_file(), name
    for png in ("rewards.png", "win_rates.png"):
        with Image.open(out / png) as image:
            assert image.format == "PNG" and image.size[0] > 300

    summary = json.loads((out / "summary.json").read_text())
    assert {(r["model"], r["reward"], r["dimension"]) for r in summary} >= {
        ("clean", "flicker", "overall"), ("flickering", "newton", "overall"), ("clean", "newton", "acceleration")}
    assert ("clean", "flicker", "flicker") not in {(r["model"], r["reward"], r["dimension"]) for r in summary}
    row = next(r for r in summary if (r["model"], r["reward"], r["dimension"]) == ("clean", "flicker", "overall"))
    # decoded files (4x upscaled, H.264) score as the original tensors do
    direct = create_reward("flicker")(torch.stack([ex.video for ex in examples]))["overall"]
    # loose on purpose: H.264 is lossy and its output depends on the FFmpeg build; measured 1.5e-5 here
    assert row["mean"] == pytest.approx(float(direct.mean()), abs=5e-3) and row["n"] == 6
    assert row["ci_low"] <= row["mean"] <= row["ci_high"]

    wins = {(w["reward"], w["dimension"]): w for w in json.loads((out / "win_rates.json").read_text())}
    flicker = wins[("flicker", "overall")]
    assert flicker["wins"] == 6 and flicker["ci_low"] > 0.5  # the clean clip wins every pair, significantly
    with open(out / "win_rates.csv") as f:
        assert len(list(csv.DictReader(f))) == len(wins)
    assert "| flicker | overall |" in (out / "summary.md").read_text()


def test_evaluate_a_trained_checkpoint_against_the_unguided_base(tmp_path, monkeypatch):
    """Model: the config with trained weights (--ckpt_path) at guidance 2; baseline: the config's own weights at
    guidance 1 (the same steps). Both are generated, scored and compared; the files they wrote read back."""
    from safetensors.torch import save_file

    from lit_videoalign.backbones.diffusers import DiffusersVideoBackbone
    from lit_videoalign.objectives.sft import SFT

    monkeypatch.chdir(ROOT)
    prompts, seeds = ["a red ball falls", "a blue ball moves left"], [3, 4]
    module = SFT(DiffusersVideoBackbone("builtin:toyworld-base", max_sequence_length=24), lora_rank=8)
    base_videos = module.generate(prompts, seeds, num_inference_steps=2, guidance_scale=1.0)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    trained_videos = module.generate(prompts, seeds, num_inference_steps=2, guidance_scale=2.0)
    save_file({k: v.detach().clone() for k, v in module.state_dict().items()}, tmp_path / "trained.safetensors")

    out = tmp_path / "eval"
    main(["evaluate", "--config", "configs/toyworld/sft.yaml", "--ckpt_path", str(tmp_path / "trained.safetensors"),
          "--prompts", *prompts, "--seeds", "3", "4", "--num_inference_steps", "2", "--guidance_scale", "2.0",
          "--baseline_guidance_scale", "1.0", "--rewards", "flicker", "dynamic_degree", "--name", "trained",
          "--baseline_name", "base", "--output_dir", str(out), "--device", "cpu"])
    wins = json.loads((out / "win_rates.json").read_text())
    assert {(w["reward"], w["dimension"]) for w in wins} == {("flicker", "overall"), ("dynamic_degree", "overall")}
    assert all(w["n"] == 2 and w["model"] == "trained" and w["baseline"] == "base" for w in wins)
    scores = json.loads((out / "scores.json").read_text())
    trained = [s for s in scores if s["model"] == "trained"]
    assert [s["seed"] for s in trained] == seeds

    # the written folders hold exactly those models' videos (upscale undone, H.264 near-lossless)
    for name, expected in (("trained", trained_videos), ("base", base_videos)):
        written = read_video_folder(out / "videos" / name)
        assert written.seeds == seeds and written.prompts == prompts and written.videos.shape == (2, 16, 3, 32, 32)
        assert (written.videos - expected).abs().mean() < 0.005, name
    assert (trained_videos - base_videos).abs().mean() > 0.02

    main(["evaluate", "--videos", str(out / "videos" / "trained"), "--rewards", "flicker",
          "--output_dir", str(tmp_path / "again")])
    rescored = json.loads((tmp_path / "again" / "scores.json").read_text())
    # loose on purpose, as the H.264 round trip above; measured 2.6e-5
    assert [r["flicker/overall"] for r in rescored] == pytest.approx([s["flicker/overall"] for s in trained],
                                                                      abs=5e-3)


def test_evaluate_rejects_bad_requests(clean_and_flickering, tmp_path, monkeypatch):
    clean, flickering, _ = clean_and_flickering
    with pytest.raises(ValueError, match="evaluate needs --videos FOLDER, or --config"):
        main(["evaluate", "--prompts", "a red ball falls", "--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="either as --baseline_videos or as baseline model settings"):
        main(["evaluate", "--videos", str(clean), "--baseline_videos", str(flickering), "--baseline_guidance_scale",
              "1.0", "--output_dir", str(tmp_path)])
    with pytest.raises(FileNotFoundError, match="no metadata.jsonl"):
        main(["evaluate", "--videos", str(tmp_path), "--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="unknown reward 'newtn'"):
        main(["evaluate", "--videos", str(clean), "--rewards", "newtn", "--output_dir", str(tmp_path)])
    monkeypatch.chdir(ROOT)
    with pytest.raises(ValueError, match="one seed per prompt"):
        main(["evaluate", "--config", "configs/toyworld/sft.yaml", "--prompts", "a red ball falls", "--seeds", "1",
              "2", "--output_dir", str(tmp_path)])
    assert not list(tmp_path.glob("*.json"))


class Explaining(RewardModel):
    """Mean brightness that also says why, one rationale per video and question (as ``vlm_judge`` with chain of
    thought keeps them in ``last_rationales``)."""

    dimensions = ("a", "b")

    def forward(self, videos, prompts=None, references=None):
        m = videos.mean((1, 2, 3, 4))  # (b,)
        self.last_rationales = [f"{p} looks {q}" for p in prompts for q in ("a", "b")]
        return {"a": m, "b": 1 - m, "overall": m}


def test_score_videos_keeps_each_videos_rationales_apart():
    videos = torch.rand(5, 2, 3, 8, 8)
    prompts = [f"p{i}" for i in range(5)]
    rationales = [{} for _ in prompts]
    rows = score_videos({"judge": Explaining()}, videos, prompts, batch_size=2, rationales=rationales)
    assert [r["judge"] for r in rationales] == [[f"p{i} looks a", f"p{i} looks b"] for i in range(5)]
    assert all(isinstance(v, float) for row in rows for v in row.values())  # scores stay numbers
    assert score_videos({"judge": Explaining()}, videos, prompts) == rows  # rationales only when asked for
