"""`make demo` end to end at a tiny size: it trains (DiffusionNFT, the demo's method, and GRPO through --config),
scores held-out prompts before and after against both references, and writes its files."""

import json
from pathlib import Path

import pytest
import torch

from lit_videoalign.demo import heldout_prompts, main, paired_change

ROOT = Path(__file__).resolve().parent.parent


def test_heldout_prompts_are_single_ball_test_scenes():
    prompts = heldout_prompts(5)
    assert len(prompts) == 5 and all(p.count("ball") == 1 for p in prompts)
    assert heldout_prompts(5) == prompts  # seeded


@pytest.mark.parametrize("config", [None, "toyworld/grpo"])  # a shipped config by name, as from an installed wheel
def test_demo_runs_and_writes_its_outputs(tmp_path, config):
    out = tmp_path / "demo"
    result = main(["--output_dir", str(out), "--max_steps", "2", "--num_heldout", "2",
                   *(["--config", config] if config else []),
                   "--model.init_args.group_size=2", "--model.init_args.num_sampling_steps=2",
                   "--model.init_args.micro_batch_size=1", "--model.init_args.updates_per_epoch=2",
                   "--model.init_args.num_inference_steps=2", "--data.init_args.batch_size=1",
                   "--trainer.enable_progress_bar=false", "--trainer.logger=false"])
    for name in ["before_after.gif", "reward_curve.png", "heldout.json", "pipeline/model_index.json"]:
        assert (out / name).is_file(), name
    assert len(list((out / "before").glob("*.mp4"))) == 2 == len(list((out / "after").glob("*.mp4")))
    saved = json.loads((out / "heldout.json").read_text())
    assert saved["before"].keys() == saved["after"].keys() >= {"physics_learned (held out)", "prompt_colour"}
    assert saved["paired_change"].keys() == saved["before"].keys()
    assert all(c["ci95_low"] <= c["mean"] <= c["ci95_high"] for c in saved["paired_change"].values())
    assert len(result["train_reward"]["train/reward/newton/overall"]) == 1
    assert result["method"] == ("GRPO" if config else "DiffusionNFT")
    reference = saved["against_guided_base"]
    if config is None:  # the CFG-free model is also paired with the base's own guided sampler
        assert reference["guidance_scale"] == 2.0 and reference["paired_change"].keys() == saved["before"].keys()
        assert reference["before"] != saved["before"]
    else:  # GRPO samples with the base's guidance already
        assert reference is None


def test_paired_change_interval_excludes_zero_only_for_a_consistent_shift():
    before = torch.zeros(6)
    shifted = paired_change(before, torch.tensor([1.0, 1.2, 0.8, 1.1, 0.9, 1.0]))
    # a float32 mean of six values near 1: measured 1.2e-7 off (1 ulp; torch 2.13.0 / 2.14.1), 1e-5 is 80x that
    assert shifted["ci95_low"] > 0 and abs(shifted["mean"] - 1.0) < 1e-5
    noisy = paired_change(before, torch.tensor([1.0, -1.0, 0.5, -0.5, 0.2, -0.2]))
    assert noisy["ci95_low"] < 0 < noisy["ci95_high"]
