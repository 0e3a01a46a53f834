"""`make demo` end to end at a tiny size: it trains, scores held-out prompts before and after, and writes its files."""

import json

import torch

from lit_videoalign.demo import heldout_prompts, main, paired_change


def test_heldout_prompts_are_single_ball_test_scenes():
    prompts = heldout_prompts(5)
    assert len(prompts) == 5 and all(p.count("ball") == 1 for p in prompts)
    assert heldout_prompts(5) == prompts  # seeded


def test_demo_runs_and_writes_its_outputs(tmp_path):
    out = tmp_path / "demo"
    result = main(["--output_dir", str(out), "--max_steps", "2", "--num_heldout", "2",
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


def test_paired_change_interval_excludes_zero_only_for_a_consistent_shift():
    before = torch.zeros(6)
    shifted = paired_change(before, torch.tensor([1.0, 1.2, 0.8, 1.1, 0.9, 1.0]))
    assert shifted["ci95_low"] > 0 and abs(shifted["mean"] - 1.0) < 1e-6
    noisy = paired_change(before, torch.tensor([1.0, -1.0, 0.5, -0.5, 0.2, -0.2]))
    assert noisy["ci95_low"] < 0 < noisy["ci95_high"]
