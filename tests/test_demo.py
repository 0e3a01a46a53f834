"""`make demo` end to end at a tiny size: it trains, scores held-out prompts before and after, and writes its files."""

import json

from lit_videoalign.demo import heldout_prompts, main


def test_heldout_prompts_are_single_ball_test_scenes():
    prompts = heldout_prompts(5)
    assert len(prompts) == 5 and all(p.count("ball") == 1 for p in prompts)
    assert heldout_prompts(5) == prompts  # seeded


def test_demo_runs_and_writes_its_outputs(tmp_path):
    out = tmp_path / "demo"
    result = main(["--output_dir", str(out), "--max_steps", "1", "--num_heldout", "2",
                   "--model.init_args.group_size=2", "--model.init_args.num_sampling_steps=2",
                   "--model.init_args.num_inference_steps=2", "--data.init_args.batch_size=1",
                   "--trainer.enable_progress_bar=false", "--trainer.logger=false"])
    for name in ["before_after.gif", "reward_curve.png", "heldout.json", "pipeline/model_index.json"]:
        assert (out / name).is_file(), name
    assert len(list((out / "before").glob("*.mp4"))) == 2 == len(list((out / "after").glob("*.mp4")))
    saved = json.loads((out / "heldout.json").read_text())
    assert saved["before"].keys() == saved["after"].keys() >= {"physics_learned (held out)", "prompt_colour"}
    assert len(result["train_reward"]["train/reward/newton/overall"]) == 1
