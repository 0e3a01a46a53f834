"""The reward-zoo CLI: every reward config trains for 2 steps, score writes JSON/CSV tables, list shows the zoo, and
bad input (unknown reward, mismatched checkpoint, wrong prompt count, missing file) is named."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from lit_videoalign.data.toyworld import ToyWorld
from lit_videoalign.video_io import write_mp4
from reward_zoo import create_reward
from reward_zoo.cli import main, zoo_table

ROOT = Path(__file__).resolve().parent.parent
# training configs (a ``model:`` section); the reward specs beside them (a top-level ``class_path``, for
# ``reward-zoo serve --reward``) build a reward, not a run
REWARD_CONFIGS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs" / "rewards").glob("*.yaml")
                        if "model" in (yaml.safe_load(p.read_text()) or {}))
SHIPPED = ("quality", "identity", "physics_learned")


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    """Three toy-world MP4 clips with a metadata.jsonl of their prompts (the videofolder layout)."""
    root = tmp_path_factory.mktemp("clips")
    world = ToyWorld()
    with open(root / "metadata.jsonl", "w") as f:
        for i in range(3):
            example = world.example(100 + i)
            write_mp4(example.video, root / f"clip{i}.mp4")
            f.write(json.dumps({"file_name": f"clip{i}.mp4", "prompt": example.prompt}) + "\n")
    return root


def test_there_are_reward_configs():
    assert {f"configs/rewards/{name}.yaml" for name in SHIPPED} <= set(REWARD_CONFIGS)


@pytest.mark.parametrize("config", REWARD_CONFIGS)
def test_every_reward_config_fits_for_two_steps(config, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    export = tmp_path / "export"
    main(["fit", "--config", config, f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=2",
          "--trainer.logger=false", "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false",
          "--trainer.enable_model_summary=false", "--trainer.val_check_interval=2", "--trainer.limit_val_batches=1",
          "--trainer.num_sanity_val_steps=0", "--trainer.accelerator=cpu",
          f"--trainer.callbacks.init_args.dirpath={export}",
          "--data.init_args.batch_size=2", "--data.init_args.val_size=2", "--data.init_args.test_size=2"])
    reward = create_reward(str(export))
    assert (export / "README.md").is_file() and type(reward).__name__ in (export / "README.md").read_text()


def test_score_writes_json_and_csv_with_one_column_per_dimension(clips, tmp_path):
    out = tmp_path / "scores"
    main(["score", "--reward", "quality", "--videos", str(clips), "--output_dir", str(out)])  # prompts from metadata
    rows = json.loads((out / "scores.json").read_text())
    assert [Path(r["video"]).name for r in rows] == ["clip0.mp4", "clip1.mp4", "clip2.mp4"]
    with open(out / "scores.csv") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == ["video", "prompt", "overall", "visual", "motion", "text"]
    assert table[1]["prompt"] == rows[1]["prompt"] and rows[1]["prompt"].startswith("a ")
    assert float(table[2]["text"]) == pytest.approx(rows[2]["text"], rel=1e-6)


def test_score_without_prompts_and_with_explicit_files(clips, tmp_path):
    out = tmp_path / "newton"
    main(["score", "--reward", "newton", "--videos", str(clips / "clip0.mp4"), str(clips / "clip1.mp4"),
          "--output_dir", str(out), "--num_frames", "12"])
    rows = json.loads((out / "scores.json").read_text())
    assert len(rows) == 2 and set(rows[0]) == {"video", "prompt", "overall", "acceleration", "continuity", "mass",
                                               "energy"}
    out = tmp_path / "quality"
    main(["score", "--reward", "quality", "--videos", str(clips / "clip2.mp4"), "--prompts", "a red ball falls",
          "--output_dir", str(out)])
    assert json.loads((out / "scores.json").read_text())[0]["prompt"] == "a red ball falls"


def test_list_shows_families_licences_and_shipped_weights(tmp_path, capsys):
    rows = {row["name"]: row for row in zoo_table()}
    for name in SHIPPED:
        assert rows[name]["weights"] == "yes" and rows[name]["license"] == "apache-2.0"
    assert rows["newton"]["weights"] == "no" and rows["newton"]["family"] == "physics"
    assert rows["physics_learned"]["family"] == "physics" and rows["quality"]["dimensions"].startswith("visual")
    main(["list", "--family", "identity", "--output", str(tmp_path / "zoo.csv")])
    assert "identity" in capsys.readouterr().out
    with open(tmp_path / "zoo.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["name"] for r in table] == ["identity"]
    assert list(table[0]) == ["name", "family", "dimensions", "differentiable", "license", "weights"]


def test_unknown_reward_name_is_named(clips, tmp_path):
    with pytest.raises(ValueError, match="unknown reward 'qualty'.*did you mean.*quality"):
        main(["score", "--reward", "qualty", "--videos", str(clips), "--output_dir", str(tmp_path)])


def test_mismatched_checkpoint_names_the_first_offending_key(tmp_path):
    folder = tmp_path / "physics"
    create_reward("physics_learned").save_pretrained(folder)
    state = load_file(folder / "model.safetensors")
    key = "head.3.weight"
    state[key] = torch.zeros(1, 7)
    save_file(state, folder / "model.safetensors")
    with pytest.raises(ValueError, match=f"'{key}' has shape \\(1, 7\\)"):
        create_reward(str(folder))
    state.pop(key)
    save_file(state, folder / "model.safetensors")
    with pytest.raises(ValueError, match=f"missing key '{key}'"):
        create_reward(str(folder))
    (folder / "config.json").write_text(json.dumps({**create_reward("physics_learned").config, "width": 32}))
    with pytest.raises(ValueError, match="does not match LearnedPhysicsReward"):
        create_reward(str(folder))


@pytest.mark.parametrize(("args", "error", "match"), [
    (["--prompts", "a", "b"], ValueError, "2 prompts for 3 videos"),
    (["--prompts_file", "nowhere.txt"], FileNotFoundError, "nowhere.txt"),
    (["--references", "ref.png"], ValueError, "1 references for 3 videos"),
])
def test_bad_score_requests_are_named(clips, tmp_path, args, error, match):
    with pytest.raises(error, match=match):
        main(["score", "--reward", "quality", "--videos", str(clips), "--output_dir", str(tmp_path), *args])
    assert not (tmp_path / "scores.json").exists()


def test_missing_video_and_missing_prompts_are_named(clips, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.mp4"):
        main(["score", "--reward", "newton", "--videos", str(tmp_path / "missing.mp4")])
    alone = tmp_path / "alone"  # no metadata.jsonl beside it to bring its prompt
    alone.mkdir()
    (alone / "clip0.mp4").write_bytes((clips / "clip0.mp4").read_bytes())
    with pytest.raises(ValueError, match=r"needs prompts.*1 of 1 videos have none \(first: .*clip0.mp4\)"):
        main(["score", "--reward", "quality", "--videos", str(alone / "clip0.mp4"), "--output_dir", str(tmp_path)])


def test_console_script_runs_in_a_fresh_process():
    result = subprocess.run([sys.executable, "-m", "reward_zoo.cli", "list"], cwd=ROOT, capture_output=True,
                            text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    assert "physics_learned" in result.stdout and "weights" in result.stdout
