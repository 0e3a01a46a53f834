"""videoalign precompute: shards that give the same loss as videos, atomic writes, a refused foreign backbone, and SFT
training that never runs the VAE encoder or the text encoder."""

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import default_collate

from lit_videoalign.backbones.diffusers import DiffusersVideoBackbone
from lit_videoalign.cli import VideoAlignCLI
from lit_videoalign.data.precomputed import PrecomputedDataset, precomputed_conditioning
from lit_videoalign.data.toyworld import ToyWorld
from lit_videoalign.data.video_folder import VideoFolderDataModule, VideoFolderDataset
from lit_videoalign.objectives.sft import SFT
from lit_videoalign.precompute import check_backbone, precompute
from lit_videoalign.testing import tiny_wan_pipeline
from lit_videoalign.video_io import write_mp4

SIZE = {"num_frames": 9, "height": 32, "width": 32}  # the tiny Wan VAE: latents (16, 3, 4, 4)


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    """Three MP4 clips and a metadata.jsonl, as a user's dataset looks."""
    root = tmp_path_factory.mktemp("videos")
    world = ToyWorld()
    lines = []
    for i in range(3):
        ex = world.example(i)
        write_mp4(ex.video, root / f"clip{i}.mp4")
        lines.append(json.dumps({"file_name": f"clip{i}.mp4", "prompt": ex.prompt}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def backbone(tiny_pipeline) -> DiffusersVideoBackbone:
    return DiffusersVideoBackbone(tiny_pipeline, max_sequence_length=16)


@pytest.fixture(scope="module")
def shards(backbone, videos, tmp_path_factory) -> Path:
    """The clips encoded in batches of 2 into shards of 2 examples (two shards: 2 + 1)."""
    return precompute(backbone, videos, tmp_path_factory.mktemp("pre") / "latents", **SIZE, batch_size=2,
                      shard_size=2)


def test_shards_hold_latents_embeddings_and_an_index(shards, videos, backbone):
    from safetensors import safe_open

    index = json.loads((shards / "index.json").read_text())
    assert index["latent_shape"] == [16, 3, 4, 4] and index["negative_prompt"] == ""
    assert [s["num_examples"] for s in index["splits"]["train"]["shards"]] == [2, 1]
    assert index["backbone"]["family"] == "wan" and index["backbone"]["max_sequence_length"] == 16
    with safe_open(str(shards / "train-00000.safetensors"), framework="pt") as f:
        assert sorted(f.keys()) == ["latents", "prompt_embeds", "prompt_mask"]
        assert f.get_slice("prompt_embeds").get_shape() == [2, 16, 32]
        meta = f.metadata()
    prompts = [json.loads(line)["prompt"] for line in (videos / "metadata.jsonl").read_text().splitlines()]
    assert json.loads(meta["prompts"]) == prompts[:2] and json.loads(meta["sources"]) == ["clip0.mp4", "clip1.mp4"]
    data = PrecomputedDataset(shards, **SIZE)
    assert len(data) == 3 and data[2]["prompt"] == prompts[2] and data[2]["latents"].shape == (16, 3, 4, 4)


def test_precomputed_batch_gives_exactly_the_loss_of_the_videos(shards, videos, backbone):
    model = SFT(backbone, **SIZE, prompt_dropout=0.0)
    from_videos = default_collate([VideoFolderDataset(str(videos), **SIZE)[i] for i in (0, 1)])
    data = PrecomputedDataset(shards, **SIZE)
    from_shards = data.collate([data[0], data[1]])
    assert "video" not in from_shards
    assert torch.equal(from_shards["latents"], backbone.encode_videos(from_videos["video"]))
    for seed in (0, 1):
        a = model.loss(from_videos, generator=torch.Generator().manual_seed(seed))
        b = model.loss(from_shards, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(a, b), (a, b)
    # Prompt dropout draws the same samples from the global RNG on both paths; dropped ones get the negative prompt.
    torch.manual_seed(0)
    drop = torch.rand(2) < 0.5
    assert drop.tolist() == [True, False]
    torch.manual_seed(0)
    a = model.loss(from_videos, generator=torch.Generator().manual_seed(0), dropout=0.5)
    torch.manual_seed(0)
    b = model.loss(from_shards, generator=torch.Generator().manual_seed(0), dropout=0.5)
    # measured bit-identical (torch 2.13.0 / 2.14.1, 3 seeds, AVX-512 / AVX2 / baseline CPU kernels); rtol 1e-6 (~8 ulp)
    # leaves room for the negative prompt's encoding, cached on one path, to round differently
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    torch.manual_seed(0)
    cond = precomputed_conditioning(from_shards, 0.5, "")
    negative = backbone.encode_prompts([""])
    expected = negative.prompt_embeds[0]
    # measured bit-identical (as above); 1e-6 of the largest value, ~8 ulp
    torch.testing.assert_close(cond.prompt_embeds[0], expected, rtol=0, atol=1e-6 * expected.abs().max().item())
    assert torch.equal(cond.prompt_embeds[1], from_shards["cond"]["prompt_embeds"][1])
    with pytest.raises(ValueError, match="negative prompt 'blurry'"):
        precomputed_conditioning(from_shards, 0.5, "blurry")


def test_family_extras_round_trip_hunyuan(videos, tmp_path):
    """HunyuanVideo's conditioning has a mask and extras (CLIP pooled output, embedded guidance): same loss too."""
    from lit_videoalign.testing import TINY_HUNYUAN_PROMPT_TEMPLATE, tiny_hunyuan_pipeline

    bb = DiffusersVideoBackbone(str(tiny_hunyuan_pipeline(tmp_path / "hunyuan")), max_sequence_length=16,
                                family_options={"prompt_template": TINY_HUNYUAN_PROMPT_TEMPLATE})
    out = precompute(bb, videos, tmp_path / "latents", **SIZE, batch_size=3)
    data = PrecomputedDataset(out, **SIZE)
    from_shards = data.collate([data[i] for i in range(3)])
    assert sorted(from_shards["cond"]["extra"]) == ["guidance", "pooled_projections"]
    from_videos = default_collate([VideoFolderDataset(str(videos), **SIZE)[i] for i in range(3)])
    model = SFT(bb, **SIZE)
    for dropout in (0.0, 0.5):
        torch.manual_seed(0)
        a = model.loss(from_videos, generator=torch.Generator().manual_seed(0), dropout=dropout)
        torch.manual_seed(0)
        b = model.loss(from_shards, generator=torch.Generator().manual_seed(0), dropout=dropout)
        # exact by design without dropout; with it, measured bit-identical too (as in the test above)
        torch.testing.assert_close(a, b, rtol=0 if dropout == 0 else 1e-6, atol=0 if dropout == 0 else 1e-7)


def test_a_failed_precompute_leaves_no_partial_output(backbone, videos, shards, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    lines = (videos / "metadata.jsonl").read_text().splitlines()
    for i in range(3):
        (broken / f"clip{i}.mp4").write_bytes((videos / f"clip{i}.mp4").read_bytes() if i < 2 else b"not a video")
    (broken / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out" / "latents"
    with pytest.raises(ValueError, match="clip2.mp4"):  # refused before anything is written: every file is checked
        precompute(backbone, broken, out, **SIZE, batch_size=1, shard_size=1)
    assert not out.exists() and not list((tmp_path / "out").glob("*"))
    before = (shards / "index.json").read_text()  # an existing folder survives a failed rewrite untouched
    with pytest.raises(ValueError, match="clip2.mp4"):
        precompute(backbone, broken, shards, **SIZE, batch_size=1, shard_size=1)
    assert (shards / "index.json").read_text() == before and len(PrecomputedDataset(shards)) == 3
    assert not [p for p in shards.parent.iterdir() if p.name.startswith(".")]


def test_a_different_backbone_or_size_is_refused(shards, videos, tmp_path):
    other = DiffusersVideoBackbone(str(tiny_wan_pipeline(tmp_path / "other", seed=1)), max_sequence_length=16)
    model = SFT(other, **SIZE, lora_rank=2)
    data = VideoFolderDataModule(str(videos), **SIZE, batch_size=2, precomputed=str(shards))
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    with pytest.raises(ValueError, match="weights_sha256") as err:
        trainer.fit(model, data)
    assert "re-run `videoalign precompute`" in str(err.value) and "config_sha256" not in str(err.value)
    index = json.loads((shards / "index.json").read_text())
    shorter = DiffusersVideoBackbone(str(tmp_path / "other"), max_sequence_length=8)
    with pytest.raises(ValueError, match="max_sequence_length: stored 16, model 8"):
        check_backbone(index, shorter, shards)
    with pytest.raises(ValueError, match="encoded at 9 frames of 32x32"):
        PrecomputedDataset(shards, num_frames=13, height=32, width=32)
    with pytest.raises(ValueError, match="no 'val' split"):
        PrecomputedDataset(shards, "val")
    with pytest.raises(FileNotFoundError, match="videoalign precompute"):
        PrecomputedDataset(tmp_path)


CONFIG = """\
seed_everything: 0
model:
  class_path: lit_videoalign.objectives.sft.SFT
  init_args:
    backbone:
      class_path: lit_videoalign.backbones.diffusers.DiffusersVideoBackbone
      init_args: {{pretrained_model_name_or_path: {pipeline}, max_sequence_length: 16}}
    lora_rank: 4
    prompt_dropout: 0.5
    num_frames: 9
    height: 32
    width: 32
    optimizer:
      class_path: torch.optim.AdamW
      init_args: {{lr: 1.0e-3}}
data:
  class_path: lit_videoalign.data.video_folder.VideoFolderDataModule
  init_args: {{root: {videos}, num_frames: 9, height: 32, width: 32, batch_size: 2}}
trainer:
  accelerator: cpu
  max_steps: 2
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
  default_root_dir: {root}
"""


def test_cli_precompute_then_sft_never_runs_the_encoders(tiny_pipeline, videos, tmp_path, monkeypatch):
    from diffusers import AutoencoderKLWan
    from transformers import UMT5EncoderModel

    calls = {"vae.encode": 0, "text_encoder": 0}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(AutoencoderKLWan, "encode", counted("vae.encode", AutoencoderKLWan.encode))
    monkeypatch.setattr(UMT5EncoderModel, "forward", counted("text_encoder", UMT5EncoderModel.forward))
    cfg = tmp_path / "sft.yaml"
    cfg.write_text(CONFIG.format(pipeline=tiny_pipeline, videos=videos, root=tmp_path / "run"))
    out = tmp_path / "latents"
    VideoAlignCLI(args=["precompute", "--config", str(cfg), "--output_dir", str(out), "--batch_size", "2"])
    assert (out / "index.json").is_file() and (out / "train-00000.safetensors").is_file()
    assert calls["vae.encode"] == 2 and calls["text_encoder"] == 3  # 2 batches of videos, 2 of prompts + negative

    calls.update({"vae.encode": 0, "text_encoder": 0})
    cli = VideoAlignCLI(args=["fit", "--config", str(cfg), f"--data.init_args.precomputed={out}"])
    assert calls == {"vae.encode": 0, "text_encoder": 0}
    assert cli.trainer.global_step == 2 and torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    lora_b = [p for n, p in cli.model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b), "LoRA weights did not move"
