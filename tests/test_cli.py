"""The videoalign CLI: every config runs with a tiny override, generate writes files, bad input is named."""

import contextlib
import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from lit_videoalign.cli import main
from lit_videoalign.data.toyworld import ToyWorld
from lit_videoalign.testing import write_tiny_clip
from lit_videoalign.video_io import read_video, write_mp4
from reward_zoo import create_reward

ROOT = Path(__file__).resolve().parent.parent
# Reward-model training configs run through `reward-zoo fit` (tests/test_reward_cli.py); the rest through videoalign.
# configs/<family> are links to the packages' configs (lit_videoalign/configs, reward_zoo/configs)
CONFIGS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").glob("*/*.yaml")
                 if not p.relative_to(ROOT).as_posix().startswith("configs/rewards/"))


@pytest.fixture(scope="module")
def video_folder(tmp_path_factory) -> Path:
    """Two MP4 clips and a metadata.jsonl, as a user's dataset would look, plus prompt files: plain text, and JSONL
    naming each clip's first frame (a PNG) as its conditioning image (image-to-video)."""
    import PIL.Image

    root = tmp_path_factory.mktemp("videos")
    world = ToyWorld()
    prompts = []
    with open(root / "metadata.jsonl", "w") as f:
        for i in range(2):
            ex = world.example(i)
            write_mp4(ex.video, root / f"clip{i}.mp4")
            f.write(json.dumps({"file_name": f"clip{i}.mp4", "prompt": ex.prompt}) + "\n")
            first = (ex.video[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
            PIL.Image.fromarray(first).save(root / f"first{i}.png")
            prompts.append(ex.prompt)
    (root / "prompts.txt").write_text("a red ball falls\na blue ball moves left\n")
    (root / "prompts_i2v.jsonl").write_text("".join(json.dumps({"prompt": p, "image": f"first{i}.png"}) + "\n"
                                                    for i, p in enumerate(prompts)))
    return root


def image_to_video(text: str) -> bool:
    """Whether a real-model config's backbone takes a conditioning image (its data then names one per example)."""
    return "-I2V-" in text or "Wan2.2-TI2V" in text or "HunyuanVideo-1.5-Diffusers-480p_i2v" in text


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
    if "AdapterExport" in text:
        args.append(f"--trainer.callbacks.init_args.dirpath={tmp / 'lora'}")
    if "toyworld.ToyWorldDataModule" in text:
        args += ["--data.init_args.batch_size=2", "--data.init_args.val_size=2"]
    if "objectives.grpo.GRPO" in text:
        args += ["--model.init_args.group_size=2", "--model.init_args.num_sampling_steps=2",
                 "--model.init_args.micro_batch_size=1", "--model.init_args.updates_per_epoch=2",
                 "--model.init_args.num_inference_steps=2", "--data.init_args.batch_size=1"]
    if "win_rate_pairs: " in text and "win_rate_pairs: null" not in text:  # groups of 2: one opponent each
        args.append("--model.init_args.win_rate_pairs=1")
    if "objectives.nft.DiffusionNFT" in text:
        args += ["--model.init_args.group_size=2", "--model.init_args.num_sampling_steps=2",
                 "--model.init_args.micro_batch_size=1", "--model.init_args.updates_per_epoch=2",
                 "--model.init_args.num_inference_steps=2", "--data.init_args.batch_size=1"]
    if "objectives.reward_gradient.RewardGradient" in text:
        args += ["--model.init_args.num_sampling_steps=2", "--model.init_args.truncation_steps=1",
                 "--model.init_args.num_inference_steps=2", "--data.init_args.batch_size=1"]
    if "objectives.rejection_sft.RejectionSFT" in text:
        args += ["--model.init_args.num_candidates=2", "--model.init_args.candidate_steps=2",
                 "--model.init_args.num_inference_steps=2", "--model.init_args.train_batch_size=2",
                 "--data.init_args.batch_size=1"]
    if "objectives.dmd.DMD" in text:
        args += ["--model.init_args.critic_updates=1"]
    if "objectives.self_forcing.SelfForcing" in text:  # one critic step, a two-step teacher for the warm-up pairs
        args += ["--model.init_args.critic_updates=1", "--model.init_args.regression_pairs=2",
                 "--model.init_args.teacher_steps=2"]
    if "objectives.consistency.ConsistencyDistillation" in text:
        args += ["--model.init_args.num_inference_steps=2"]
    if "pretrained_model_name_or_path: outputs/toyworld-i2v-init" in text:  # the widened toy base, as its comment makes
        from lit_videoalign.backbones.i2v_init import widen_to_image_to_video

        args.append("--model.init_args.backbone.init_args.pretrained_model_name_or_path="
                    f"{widen_to_image_to_video('builtin:toyworld-base', tmp / 'toyworld-i2v-init')}")
    elif "pretrained_model_name_or_path: outputs/" in text:  # a later stage of the toy base: start from the shipped one
        args.append("--model.init_args.backbone.init_args.pretrained_model_name_or_path=builtin:toyworld-base")
    elif "builtin:toyworld-" not in text:  # a real Hub model: swap in the tiny random pipeline of its family
        bb = "--model.init_args.backbone.init_args."
        args += [f"{bb}pretrained_model_name_or_path={tiny_pipeline}", f"{bb}torch_dtype=float32",
                 f"{bb}frozen_dtype=float32", f"{bb}max_sequence_length=16", "--model.init_args.num_frames=9",
                 "--model.init_args.height=32", "--model.init_args.width=32", "--model.init_args.lora_rank=4",
                 "--trainer.precision=32-true", "--trainer.accumulate_grad_batches=1"]
    if "-I2V-" in text:  # an image-to-video model: the tiny random Wan I2V pipeline (its context is 512 text tokens)
        from lit_videoalign.testing import tiny_wan_i2v_pipeline

        bb = "--model.init_args.backbone.init_args."
        args += [f"{bb}pretrained_model_name_or_path={tiny_wan_i2v_pipeline(tmp / 'wan_i2v')}",
                 f"{bb}max_sequence_length=512"]
    if "Wan2.2-TI2V" in text:  # Wan 2.2 TI2V: its tiny random pipeline (16x16 pixels a latent, 32x32 a token)
        from lit_videoalign.testing import tiny_wan22_ti2v_pipeline

        args.append("--model.init_args.backbone.init_args.pretrained_model_name_or_path="
                    f"{tiny_wan22_ti2v_pipeline(tmp / 'wan22_ti2v')}")
    rw = "--model.init_args.reward.init_args.rewards."
    if "reward_zoo.alignment.CLIPScore" in text:
        args.append(f"{rw}text.init_args.model_name_or_path={tiny_clip}")
    if "reward_zoo.temporal.SubjectConsistency" in text and "reward_zoo.composite.CompositeReward" in text:
        args += [f"{rw}consistency.init_args.backbone=test_resnet",
                 f"{rw}consistency.init_args.pretrained_backbone=false"]
    if "reward_zoo.identity.IdentityReward" in text:  # a real frame encoder (DINOv2): timm's tiny random one
        args += [f"{rw}identity.init_args.encoder=test_resnet", f"{rw}identity.init_args.pretrained_encoder=false",
                 f"{rw}identity.init_args.frame_size=[32, 32]"]
    if "name_or_hub_id: checkpoints/" in text:  # converted real rewards (README, "Real rewards"): tiny random ones
        args += tiny_real_rewards(text, tmp, tiny_clip)
    if "data.prompts.PromptFileDataModule" in text and image_to_video(text):  # prompts with conditioning images
        args += [f"--data.init_args.train_file={video_folder / 'prompts_i2v.jsonl'}", "--data.init_args.height=32",
                 "--data.init_args.width=32"]
    elif "data.prompts.PromptFileDataModule" in text:
        args += [f"--data.init_args.train_file={video_folder / 'prompts.txt'}"]
    if "video_folder.VideoFolderDataModule" in text:
        args += [f"--data.init_args.root={video_folder}", "--data.init_args.num_frames=9",
                 "--data.init_args.height=32", "--data.init_args.width=32", "--data.init_args.batch_size=1"]
    if "objectives.dpo.DPO" in text:
        args += ["--model.init_args.num_inference_steps=2"]
        if "num_candidates" in text:  # online pairs
            args += ["--model.init_args.num_candidates=2", "--model.init_args.candidate_steps=2",
                     "--model.init_args.pairs_per_step=2"]
            if "data.prompts.PromptFileDataModule" in text:  # the two prompts of prompts.txt: two steps
                args += ["--data.init_args.batch_size=1"]
        if "toyworld_pairs.ToyWorldPairsDataModule" in text:
            args += ["--data.init_args.batch_size=2", "--data.init_args.val_size=2"]
        if "data.preference.PreferenceDataModule" in text:  # the two clips of the video folder as two pairs
            i2v = image_to_video(text)  # each pair conditioned on its chosen clip's first frame
            manifest = "pairs_i2v.jsonl" if i2v else "pairs.jsonl"
            (video_folder / manifest).write_text("".join(json.dumps(
                {"prompt": "a red ball falls", "chosen": f"clip{i}.mp4", "rejected": f"clip{1 - i}.mp4",
                 **({"image": f"first{i}.png"} if i2v else {})}) + "\n" for i in range(2)))
            args += [f"--data.init_args.root={video_folder}", f"--data.init_args.manifest={manifest}",
                     "--data.init_args.num_frames=9", "--data.init_args.height=32", "--data.init_args.width=32",
                     "--data.init_args.batch_size=1"]
    if "hunyuanvideo-community/HunyuanVideo\n" in text or "Lightricks/LTX-Video" in text:  # the family's tiny pipeline
        from lit_videoalign.testing import TINY_HUNYUAN_PROMPT_TEMPLATE, tiny_hunyuan_pipeline, tiny_ltx_pipeline

        bb = "--model.init_args.backbone.init_args."
        if "hunyuanvideo-community/HunyuanVideo\n" in text:
            args += [f"{bb}pretrained_model_name_or_path={tiny_hunyuan_pipeline(tmp / 'hunyuan')}",
                     f"{bb}family_options={json.dumps({'prompt_template': TINY_HUNYUAN_PROMPT_TEMPLATE})}"]
        else:  # the tiny LTX VAE compresses 32x32 pixels to one latent: 64x64 frames
            args += [f"{bb}pretrained_model_name_or_path={tiny_ltx_pipeline(tmp / 'ltx')}",
                     "--model.init_args.height=64", "--model.init_args.width=64"]
            if "VideoFolderDataModule" in text or "PreferenceDataModule" in text:
                args += ["--data.init_args.height=64", "--data.init_args.width=64"]
    if "Lightricks/LTX-2\n" in text:  # LTX-2, video only: its tiny random pipeline (64x64 frames, as LTX-Video's)
        from lit_videoalign.testing import tiny_ltx2_pipeline

        bb = "--model.init_args.backbone.init_args."
        args += [f"{bb}pretrained_model_name_or_path={tiny_ltx2_pipeline(tmp / 'ltx2')}",
                 "--model.init_args.height=64", "--model.init_args.width=64"]
        if "VideoFolderDataModule" in text or "PreferenceDataModule" in text:
            args += ["--data.init_args.height=64", "--data.init_args.width=64"]
    if "hunyuanvideo-community/HunyuanVideo-1.5-" in text:  # HunyuanVideo 1.5: its tiny pipeline and tokenizer's crop
        from lit_videoalign.testing import TINY_HUNYUAN15_CROP_START, tiny_hunyuan15_pipeline

        bb = "--model.init_args.backbone.init_args."
        i2v = "_i2v" in text  # HunyuanVideo15ImageToVideoPipeline: the tiny one with its SigLIP image encoder
        args += [f"{bb}pretrained_model_name_or_path={tiny_hunyuan15_pipeline(tmp / 'hunyuan15', i2v=i2v)}",
                 f"{bb}family_options={json.dumps({'crop_start': TINY_HUNYUAN15_CROP_START})}"]
    if "-A14B-" in text:  # Wan 2.2 A14B: a tiny random pair of experts (I2V: without image encoder, as the real one)
        from lit_videoalign.testing import tiny_wan22_a14b_pipeline

        pipe = tiny_wan22_a14b_pipeline(tmp / "a14b", i2v="-I2V-" in text, boundary_ratio=0.5)
        args += [f"--model.init_args.backbone.init_args.pretrained_model_name_or_path={pipe}",
                 "--model.init_args.backbone.init_args.max_sequence_length=16"]
    if "class_path: lightning.pytorch.strategies.ModelParallelStrategy" in text:  # FSDP2 on one in-process rank
        args += ["--trainer.devices=1", "--trainer.strategy.init_args.data_parallel_size=1"]
    if "context_parallel.ContextParallelStrategy" in text:  # one in-process rank: CP 1, no replicas
        args += ["--trainer.devices=1", "--trainer.num_nodes=1", "--trainer.strategy.init_args.context_parallel_size=1",
                 "--trainer.strategy.init_args.data_parallel_size=1"]
        if "data_parallel_replicate_size" in text:
            args.append("--trainer.strategy.init_args.data_parallel_replicate_size=1")
    if "strategies.BlockFSDPStrategy" in text or "strategies.FSDPStrategy" in text:  # CUDA only: run it unsharded
        args += ["--trainer.strategy=auto", "--trainer.devices=1"]
        args += ["--model.init_args.lora_rank=null"] if "lora_rank: null" in text else []
    return args


def tiny_real_rewards(text: str, tmp: Path, tiny_clip: str) -> list[str]:
    """Overrides pointing a config's converted real rewards (``checkpoints/videoreward``, ``checkpoints/hpsv2``) at
    tiny random ones in the same Hub layout."""
    from lit_videoalign.testing import write_tiny_videoreward

    composite = "reward_zoo.composite.CompositeReward" in text
    args = []
    if "checkpoints/videoreward" in text:
        folder = write_tiny_videoreward(tmp / "tiny-videoreward")
        where = "rewards.videoreward.init_args." if composite else ""
        args.append(f"--model.init_args.reward.init_args.{where}name_or_hub_id={folder}")
    if "checkpoints/hpsv2" in text:
        from reward_zoo.hpsv2 import HPSv2

        clip_config = json.loads((Path(tiny_clip) / "config.json").read_text())
        HPSv2(clip_config=clip_config, tokenizer_name_or_path=tiny_clip, num_frames=2).save_pretrained(tmp / "hps")
        where = "rewards.hpsv2.init_args." if composite else ""
        args.append(f"--model.init_args.reward.init_args.{where}name_or_hub_id={tmp / 'hps'}")
    if "num_candidates" in text:  # online pairs: a random reward's score gaps are small; keep every pair
        args.append("--model.init_args.min_gap=0.0")
    return args


@contextlib.contextmanager
def served_judge(text: str, tmp: Path):
    """For a config scored by a ``remote`` reward: a tiny random ``vlm_judge`` served on loopback for the run, and the
    override pointing the config at it; otherwise nothing."""
    if "reward_zoo.remote.RemoteReward" not in text:
        yield []
        return
    from lit_videoalign.testing import write_tiny_vlm_judge
    from reward_zoo.server import start_server

    judge = create_reward("vlm_judge", pretrained_model_name_or_path=str(write_tiny_vlm_judge(tmp / "judge")),
                          min_pixels=28 * 28, max_pixels=56 * 56)
    with start_server(judge) as server, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield [f"--model.init_args.reward.init_args.url={server.url}", "--model.init_args.reward.init_args.retries=0"]
        assert server.reward_calls > 0, "the run never reached the served judge"
        failed = [str(w.message) for w in caught if "the reward raised" in str(w.message)]
        assert not failed, failed


def test_there_are_configs():
    assert {"configs/toyworld/pretrain.yaml", "configs/toyworld/sft.yaml",
            "configs/wan2.1-1.3b/sft_lora.yaml"} <= set(CONFIGS)


@pytest.mark.parametrize("config", CONFIGS)
def test_every_config_fits_with_a_tiny_override(config, tmp_path, tiny_pipeline, video_folder, tiny_clip, monkeypatch):
    monkeypatch.chdir(ROOT)
    text = (ROOT / config).read_text()
    given = watch_conditioning_images(monkeypatch) if image_to_video(text) else None
    with served_judge(text, tmp_path) as judge_args:
        main(["fit", "--config", config, *tiny_overrides(config, tmp_path, tiny_pipeline, video_folder, tiny_clip),
              *judge_args])
    if "PipelineExport" in text:
        assert (tmp_path / "pipeline" / "model_index.json").is_file()
    if "AdapterExport" in text:  # Wan 2.2 A14B: one diffusers LoRA file per trained expert
        one = re.search(r"^ +train_experts: \[low_noise\]", text, re.MULTILINE)
        experts = ["low_noise"] if one else ["high_noise", "low_noise"]
        assert sorted(p.parent.name for p in (tmp_path / "lora").rglob("*.safetensors")) == experts
    if given is not None:  # the data's conditioning images reached the model, and the identity reward as references
        assert "model" in given, "an image-to-video config trained without conditioning images"
        assert ("identity" in given) == ("reward_zoo.identity.IdentityReward" in text)


def watch_conditioning_images(monkeypatch) -> set[str]:
    """A set that gains "model" when the module conditions on images and "identity" when an IdentityReward is given
    references (conditioning images), as the run goes."""
    from lit_videoalign.objectives.base import AlignmentModule
    from reward_zoo.identity import IdentityReward

    given, with_images, identity = set(), AlignmentModule.with_images, IdentityReward.forward

    def watched_with_images(self, cond, images, *args, **kwargs):
        given.update(["model"] if images is not None else [])
        return with_images(self, cond, images, *args, **kwargs)

    def watched_identity(self, videos, prompts=None, references=None, fps=None):
        given.update(["identity"] if references is not None else [])
        return identity(self, videos, prompts, references, fps)

    monkeypatch.setattr(AlignmentModule, "with_images", watched_with_images)
    monkeypatch.setattr(IdentityReward, "forward", watched_identity)
    return given


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
    mp4s, gifs = sorted(out.glob("*.mp4")), sorted((out / "previews").glob("*.gif"))  # previews in a subfolder
    assert len(mp4s) == 2 and len(gifs) == 2 and "seed3" in mp4s[0].name
    video = read_video(mp4s[0])
    assert video.shape == (16, 3, 128, 128)  # tiny videos are upscaled 4x for viewing


def test_generate_from_a_prompts_file_writes_a_manifest(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# toy prompts\na red ball falls\n\na green ball moves right\n")
    out = tmp_path / "gen"
    main(["generate", "--config", "configs/toyworld/sft.yaml", "--prompts_file", str(prompts), "--seeds", "7", "8",
          "--num_inference_steps", "1", "--guidance_scale", "1.0", "--gif", "false", "--output_dir", str(out)])
    entries = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [(e["prompt"], e["seed"], e["upscale"]) for e in entries] == [("a red ball falls", 7, 4),
                                                                          ("a green ball moves right", 8, 4)]
    assert sorted(p.name for p in out.iterdir()) == sorted([e["file_name"] for e in entries] + ["metadata.jsonl"])


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


def test_generate_best_of_n_keeps_the_best_candidate_and_logs_its_cost(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    base = ["generate", "--config", "configs/toyworld/sft.yaml", "--prompts", "a red ball falls", "--seeds", "5",
            "--num_inference_steps", "2", "--gif", "false"]
    main([*base, "--output_dir", str(tmp_path / "plain")])
    main([*base, "--output_dir", str(tmp_path / "best"), "--reward", "dynamic_degree", "--best_of_n", "3"])
    log = json.loads((tmp_path / "best" / "inference.json").read_text())
    assert log["method"] == "best_of_n" and log["nfe_per_video"] == 3 * 2 * 2  # candidates x steps x CFG branches
    from reward_zoo import create_reward
    judge = create_reward("dynamic_degree")
    plain = read_video(next((tmp_path / "plain").glob("*.mp4")))[None]
    best = read_video(next((tmp_path / "best").glob("*.mp4")))[None]
    assert log["scores"][0] >= judge(plain.float())["overall"].item() - 0.02  # read back through lossy MP4
    with pytest.raises(ValueError, match="needs --reward"):
        main([*base, "--output_dir", str(tmp_path / "x"), "--best_of_n", "2"])
    with pytest.raises(ValueError, match="choose one"):
        main([*base, "--output_dir", str(tmp_path / "x"), "--reward", "newton", "--best_of_n", "2",
              "--reward_guidance", "0.1"])
    assert best.shape == plain.shape


def test_short_model_names_work_in_fit_validate_generate_and_evaluate(tmp_path, monkeypatch):
    """``--model SFT`` (#22.6) in every subcommand: a checkpoint trained with the short name records the class's own
    path, and generating from it with ``--model SFT`` gives the same video as the config alone. ``fit`` and
    ``generate`` run as the console command does (a subprocess); ``validate`` and ``evaluate`` through ``main``."""
    common = ["--config", "toyworld/sft", "--model", "SFT", f"--trainer.default_root_dir={tmp_path}",
              "--trainer.logger=false", f"--trainer.callbacks.init_args.dirpath={tmp_path / 'pipe'}"]
    res = run_cli("fit", *common, "--trainer.max_steps=1", "--trainer.val_check_interval=1",
                  "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false",
                  "--data.init_args.batch_size=2", "--data.init_args.val_size=2", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    ckpt = next(tmp_path.rglob("*.ckpt"))
    saved = torch.load(ckpt, weights_only=True, map_location="cpu")["hyper_parameters"]["_class_path"]
    assert saved == "lit_videoalign.objectives.sft.SFT"
    gen = ["--ckpt_path", str(ckpt), "--prompts", "a red ball falls", "--seeds", "3", "--num_inference_steps", "2",
           "--gif", "false"]
    res = run_cli("generate", *common, *gen, "--output_dir", str(tmp_path / "short"), cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    monkeypatch.chdir(tmp_path)
    main(["generate", "--config", "toyworld/sft", *gen, "--output_dir", str(tmp_path / "full")])
    short, full = next((tmp_path / "short").glob("*.mp4")), next((tmp_path / "full").glob("*.mp4"))
    assert short.read_bytes() == full.read_bytes()
    # a checkpoint of another class is still refused by name
    with pytest.raises(ValueError, match="checkpoint of SFT .* config's model is DPO"):
        main(["generate", "--config", "toyworld/sft", "--model", "DPO", *gen, "--output_dir", str(tmp_path / "x")])
    main(["validate", *common, "--ckpt_path", str(ckpt), "--trainer.limit_val_batches=1",
          "--data.init_args.batch_size=2", "--data.init_args.val_size=2"])
    main(["evaluate", *common, "--ckpt_path", str(ckpt), "--prompts", "a red ball falls", "--num_inference_steps",
          "1", "--rewards", "newton", "--output_dir", str(tmp_path / "eval")])
    assert (tmp_path / "eval" / "videos" / "model" / "metadata.jsonl").is_file()


def test_an_unknown_short_model_name_lists_the_known_ones(tmp_path):
    res = run_cli("generate", "--config", "toyworld/sft", "--model", "DiffusionNTF", "--prompts", "a", cwd=tmp_path)
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert res.returncode == 2 and len(errors) == 1, res.stderr[-2000:]
    assert "DiffusionNTF" in errors[0] and "did you mean DiffusionNFT?" in errors[0]
    assert all(name in errors[0] for name in ("SFT", "DPO", "GRPO", "DMD", "ConsistencyDistillation"))
