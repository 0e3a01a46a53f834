"""The videoalign CLI: every config runs with a tiny override, generate writes files, bad input is named."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lit_videoalign.cli import main
from lit_videoalign.data.toyworld import ToyWorld
from lit_videoalign.testing import write_tiny_clip
from lit_videoalign.video_io import read_video, write_mp4

ROOT = Path(__file__).resolve().parent.parent
# Reward-model training configs run through `reward-zoo fit` (tests/test_reward_cli.py); the rest through videoalign.
CONFIGS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").rglob("*.yaml")
                 if not p.relative_to(ROOT).as_posix().startswith("configs/rewards/"))


@pytest.fixture(scope="module")
def video_folder(tmp_path_factory) -> Path:
    """Two MP4 clips and a metadata.jsonl, as a user's dataset would look."""
    root = tmp_path_factory.mktemp("videos")
    world = ToyWorld()
    with open(root / "metadata.jsonl", "w") as f:
        for i in range(2):
            ex = world.example(i)
            write_mp4(ex.video, root / f"clip{i}.mp4")
            f.write(json.dumps({"file_name": f"clip{i}.mp4", "prompt": ex.prompt}) + "\n")
    (root / "prompts.txt").write_text("a red ball falls\na blue ball moves left\n")
    return root


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("clip") / "tiny-clip"
    write_tiny_clip(path)
    return str(path)


def tiny_overrides(config: str, tmp: Path, tiny_pipeline: str, video_folder: Path, tiny_clip: str) -> list[str]:
    """Arguments that make a config run in seconds on CPU while keeping its structure."""
    args = [f"--trainer.default_root_dir={tmp}", "--trainer.max_steps=2", "--trainer.logger=false",
            "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false",
            "--trainer.limit_val_batches=1", "--trainer.val_check_interval=2", "--trainer.accelerator=cpu",
            "--trainer.num_sanity_val_steps=0"]
    text = (ROOT / config).read_text()
    if "PipelineExport" in text:
        args.append(f"--trainer.callbacks.init_args.dirpath={tmp / 'pipeline'}")
    if "toyworld.ToyWorldDataModule" in text:
        args += ["--data.init_args.batch_size=2", "--data.init_args.val_size=2"]
    if "objectives.grpo.GRPO" in text:
        args += ["--model.init_args.group_size=2", "--model.init_args.num_sampling_steps=2",
                 "--model.init_args.num_inference_steps=2", "--data.init_args.batch_size=1"]
    if "pretrained_model_name_or_path: outputs/" in text:  # a later stage of the toy base: start from the shipped one
        args.append("--model.init_args.backbone.init_args.pretrained_model_name_or_path=builtin:toyworld-base")
    elif "builtin:toyworld-base" not in text:  # a real Hub model: swap in the tiny random pipeline of its family
        bb = "--model.init_args.backbone.init_args."
        args += [f"{bb}pretrained_model_name_or_path={tiny_pipeline}", f"{bb}torch_dtype=float32",
                 f"{bb}frozen_dtype=float32", f"{bb}max_sequence_length=16", "--model.init_args.num_frames=9",
                 "--model.init_args.height=32", "--model.init_args.width=32", "--model.init_args.lora_rank=4",
                 "--trainer.precision=32-true", "--trainer.accumulate_grad_batches=1"]
    if "reward_zoo.alignment.CLIPScore" in text:
        rw = "--model.init_args.reward.init_args.rewards."
        args += [f"{rw}text.init_args.model_name_or_path={tiny_clip}",
                 f"{rw}consistency.init_args.backbone=test_resnet",
                 f"{rw}consistency.init_args.pretrained_backbone=false"]
    if "data.prompts.PromptFileDataModule" in text:
        args += [f"--data.init_args.train_file={video_folder / 'prompts.txt'}"]
    if "video_folder.VideoFolderDataModule" in text:
        args += [f"--data.init_args.root={video_folder}", "--data.init_args.num_frames=9",
                 "--data.init_args.height=32", "--data.init_args.width=32", "--data.init_args.batch_size=1"]
    return args


def test_there_are_configs():
    assert {"configs/toyworld/pretrain.yaml", "configs/toyworld/sft.yaml",
            "configs/wan2.1-1.3b/sft_lora.yaml"} <= set(CONFIGS)


@pytest.mark.parametrize("config", CONFIGS)
def test_every_config_fits_with_a_tiny_override(config, tmp_path, tiny_pipeline, video_folder, tiny_clip, monkeypatch):
    monkeypatch.chdir(ROOT)
    main(["fit", "--config", config, *tiny_overrides(config, tmp_path, tiny_pipeline, video_folder, tiny_clip)])
    if "PipelineExport" in (ROOT / config).read_text():
        assert (tmp_path / "pipeline" / "model_index.json").is_file()


def test_fit_then_generate_writes_mp4_and_gif(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg = "configs/toyworld/sft.yaml"
    common = ["--config", cfg, f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false",
              f"--trainer.callbacks.init_args.dirpath={tmp_path / 'pipe'}"]
    main(["fit", *common, "--trainer.max_steps=1", "--trainer.val_check_interval=1", "--trainer.limit_val_batches=1",
          "--trainer.enable_progress_bar=false", "--data.init_args.batch_size=2", "--data.init_args.val_size=2"])
    ckpt = next(tmp_path.rglob("*.ckpt"))
    out = tmp_path / "gen"
    main(["generate", *common, "--ckpt_path", str(ckpt), "--prompts", "a red ball falls", "a blue ball moves left",
          "--seeds", "3", "4", "--num_inference_steps", "2", "--output_dir", str(out)])
    mp4s, gifs = sorted(out.glob("*.mp4")), sorted(out.glob("*.gif"))
    assert len(mp4s) == 2 and len(gifs) == 2 and "seed3" in mp4s[0].name
    video = read_video(mp4s[0])
    assert video.shape == (16, 3, 128, 128)  # tiny videos are upscaled 4x for viewing


def test_generate_rejects_bad_requests(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    base = ["generate", "--config", "configs/toyworld/sft.yaml", "--output_dir", str(tmp_path)]
    with pytest.raises(ValueError, match="no prompts"):
        main(base)
    with pytest.raises(ValueError, match="one seed per prompt"):
        main([*base, "--prompts", "a red ball falls", "--seeds", "1", "2"])
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        main([*base, "--prompts", "a", "--ckpt_path", str(tmp_path / "missing.ckpt")])
    pickle_file = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "obj": object()}, pickle_file)
    with pytest.raises(ValueError, match="weights-only"):
        main([*base, "--prompts", "a", "--ckpt_path", str(pickle_file)])
    assert not list(tmp_path.glob("*.mp4"))


def run_cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lit_videoalign.cli", *args], cwd=cwd, capture_output=True,
                          text=True, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})


def test_unknown_key_and_wrong_type_exit_nonzero_naming_them(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text((ROOT / "configs/toyworld/sft.yaml").read_text().replace("lora_rank: 8", "lora_rnak: 8"))
    res = run_cli("fit", "--config", str(cfg))
    assert res.returncode != 0 and "lora_rnak" in res.stderr
    res = run_cli("fit", "--config", "configs/toyworld/sft.yaml", "--model.init_args.lora_rank=eight")
    assert res.returncode != 0 and "lora_rank" in res.stderr and "eight" in res.stderr


def test_missing_pretrained_path_is_named(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises((FileNotFoundError, ValueError), match="nowhere/model"):
        main(["fit", "--config", "configs/toyworld/sft.yaml",
              "--model.init_args.backbone.init_args.pretrained_model_name_or_path=./nowhere/model"])


def test_failed_run_leaves_no_partial_export(tmp_path, monkeypatch):
    """A run that crashes mid-training writes no pipeline folder and no temporary files."""
    monkeypatch.chdir(ROOT)
    cfg = tmp_path / "bad_data.yaml"
    cfg.write_text((ROOT / "configs/toyworld/sft.yaml").read_text())
    with pytest.raises(ValueError, match="batch_size"):
        main(["fit", "--config", str(cfg), f"--trainer.default_root_dir={tmp_path}",
              f"--trainer.callbacks.init_args.dirpath={tmp_path / 'pipe'}", "--data.init_args.batch_size=0"])
    assert not (tmp_path / "pipe").exists()
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".")]
