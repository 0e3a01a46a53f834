"""DiffusersVideoBackbone on tiny random pipelines loaded through the real from_pretrained code."""

import json
import shutil

import pytest
import torch

from lit_videoalign.backbones.base import Conditioning
from lit_videoalign.backbones.diffusers import DiffusersVideoBackbone


@pytest.fixture(scope="module")
def backbone(tiny_pipeline):
    return DiffusersVideoBackbone(tiny_pipeline, max_sequence_length=16)


def test_loads_every_component_frozen_except_the_denoiser(backbone):
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5EncoderModel

    assert isinstance(backbone.denoiser, WanTransformer3DModel)
    assert isinstance(backbone.vae, AutoencoderKLWan) and isinstance(backbone.text_encoder, UMT5EncoderModel)
    assert all(p.requires_grad for p in backbone.denoiser.parameters())
    assert not any(p.requires_grad for p in backbone.vae.parameters())
    assert not any(p.requires_grad for p in backbone.text_encoder.parameters())
    backbone.train()
    assert backbone.denoiser.training and not backbone.vae.training and not backbone.text_encoder.training
    assert [c.__name__ for c in backbone.block_classes] == ["WanTransformerBlock"]


def test_a_fresh_backbone_trains_its_denoiser_in_train_mode(tiny_pipeline):
    """from_pretrained hands back eval-mode modules and Lightning keeps submodule modes: the backbone must set them."""
    fresh = DiffusersVideoBackbone(tiny_pipeline, max_sequence_length=16)
    assert fresh.training and fresh.denoiser.training
    assert not fresh.vae.training and not fresh.text_encoder.training


def test_predict_velocity_equals_raw_transformer_at_sigma_times_1000(backbone):
    cond = backbone.encode_prompts(["a red ball falls", "a blue ball moves left"])
    latents = torch.randn(2, *backbone.latent_shape(9, 32, 32))
    sigma = torch.tensor([0.3, 0.9])
    ours = backbone.predict_velocity(latents, sigma, cond)
    raw = backbone.denoiser(hidden_states=latents, timestep=sigma * 1000, encoder_hidden_states=cond.prompt_embeds,
                            return_dict=False)[0]
    assert torch.equal(ours, raw)
    scalar = backbone.predict_velocity(latents, 0.3, cond)
    raw_scalar = backbone.denoiser(hidden_states=latents, timestep=torch.full((2,), 300.0),
                                   encoder_hidden_states=cond.prompt_embeds, return_dict=False)[0]
    assert torch.equal(scalar, raw_scalar)


def test_prompts_are_zero_padded_like_wan(backbone):
    cond = backbone.encode_prompts(["a red ball falls", ""])
    assert cond.prompt_embeds.shape == (2, 16, 32)
    assert cond.prompt_mask[0].sum() == 5 and cond.prompt_mask[1].sum() == 1  # words + </s>
    assert (cond.prompt_embeds[0, 5:] == 0).all() and (cond.prompt_embeds[0, :5] != 0).any()
    other = backbone.encode_prompts(["a blue ball falls"])
    assert not torch.allclose(other.prompt_embeds[0], cond.prompt_embeds[0])  # measured apart by 0.8 of their scale


def test_video_latent_round_trip_shapes(backbone):
    videos = torch.rand(2, 9, 3, 32, 32)
    latents = backbone.encode_videos(videos)
    assert latents.shape == (2, *backbone.latent_shape(9, 32, 32)) == (2, 16, 3, 4, 4)
    decoded = backbone.decode_latents(latents)
    assert decoded.shape == (2, 9, 3, 32, 32) and decoded.min() >= 0 and decoded.max() <= 1


def test_pixel_space_pipeline_round_trips_exactly(tiny_pixel_pipeline):
    bb = DiffusersVideoBackbone(tiny_pixel_pipeline, max_sequence_length=16)
    assert bb.pixel_space and bb.latent_shape(16, 32, 32) == (3, 16, 32, 32)
    videos = torch.rand(1, 16, 3, 32, 32)
    latents = bb.encode_videos(videos)
    assert latents.min() >= -1 and latents.max() <= 1
    # measured exact: torch.rand's 24-bit values survive 2v - 1 and back. Other values may round there by up to 3e-8
    # (half an ulp of 1); 1e-6 of the [0, 1] range is 30x that.
    torch.testing.assert_close(bb.decode_latents(latents), videos, rtol=0, atol=1e-6)


def test_lora_trains_only_adapters_and_disabling_gives_the_base(tiny_pipeline):
    bb = DiffusersVideoBackbone(tiny_pipeline, max_sequence_length=16)
    cond = bb.encode_prompts(["a red ball falls"])
    x = torch.randn(1, *bb.latent_shape(9, 32, 32))
    base = bb.predict_velocity(x, 0.5, cond).detach()
    bb.add_lora(rank=4)
    trainable = {n for n, p in bb.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert sum(p.numel() for p in bb.trainable_parameters()) == 3072
    with torch.no_grad():
        for n, p in bb.denoiser.named_parameters():
            if "lora_B" in n:
                p.normal_()
    adapted = bb.predict_velocity(x, 0.5, cond)
    assert not torch.allclose(adapted, base)  # measured apart by 0.76 of their scale
    with bb.adapters_disabled():
        assert torch.equal(bb.predict_velocity(x, 0.5, cond), base)
    assert torch.equal(bb.predict_velocity(x, 0.5, cond), adapted)  # re-enabled afterwards


def test_lora_bad_targets_and_rank(tiny_pipeline):
    bb = DiffusersVideoBackbone(tiny_pipeline, max_sequence_length=16)
    with pytest.raises(ValueError, match="not_a_layer"):
        bb.add_lora(4, target_modules=["not_a_layer"])
    with pytest.raises(ValueError, match="rank"):
        bb.add_lora(0)
    with pytest.raises(RuntimeError, match="add_lora"):
        with bb.adapters_disabled():
            pass


def test_save_pretrained_merges_lora_and_reloads(tiny_pipeline, tmp_path):
    bb = DiffusersVideoBackbone(tiny_pipeline, max_sequence_length=16)
    bb.add_lora(4)
    with torch.no_grad():
        for n, p in bb.denoiser.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)
    cond = bb.encode_prompts(["a red ball falls"])
    x = torch.randn(1, *bb.latent_shape(9, 32, 32))
    expected = bb.predict_velocity(x, 0.4, cond)
    out = bb.save_pretrained(tmp_path / "merged")
    assert not list(tmp_path.glob(".merged*")), "temporary folder left behind"
    assert not list(out.rglob("*.bin")) and list(out.rglob("*.safetensors"))
    again = DiffusersVideoBackbone(str(out), max_sequence_length=16)
    assert not again.has_lora
    # merged weights round differently from base + LoRA: max |err| / max |expected| measured 1.4e-7..3.1e-7 (torch
    # 2.13.0 / 2.14.1, 4 seeds, 1-4 threads, AVX-512 / AVX2 / baseline CPU kernels); 1e-5 is 30x that
    torch.testing.assert_close(again.predict_velocity(x, 0.4, cond), expected, rtol=0,
                               atol=1e-5 * expected.abs().max().item())


def test_folder_also_loads_as_a_diffusers_wan_pipeline(tiny_pipeline):
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(tiny_pipeline)
    assert type(pipe.transformer).__name__ == "WanTransformer3DModel"


def test_bad_inputs_are_named(backbone, tmp_path):
    with pytest.raises(ValueError, match=r"\[B, T, C, H, W\]"):
        backbone.encode_videos(torch.rand(9, 3, 32, 32))
    with pytest.raises(ValueError, match="range"):
        backbone.encode_videos(torch.rand(1, 9, 3, 32, 32) * 2)
    with pytest.raises(TypeError, match="dtype"):
        backbone.encode_videos(torch.zeros(1, 9, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        backbone.latent_shape(8, 32, 32)
    with pytest.raises(ValueError, match="prompts is empty"):
        backbone.encode_prompts([])
    with pytest.raises(TypeError, match="list of strings"):
        backbone.encode_prompts("a red ball")
    with pytest.raises(ValueError, match="conditioning batch 1"):
        backbone.predict_velocity(torch.randn(2, 16, 3, 4, 4), 0.5, backbone.encode_prompts(["x"]))


def test_missing_or_wrong_paths_are_named(tmp_path, tiny_pipeline):
    with pytest.raises(FileNotFoundError, match="does/not/exist"):
        DiffusersVideoBackbone(str(tmp_path / "does/not/exist"))
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        DiffusersVideoBackbone(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no built-in pipeline 'nope'"):
        DiffusersVideoBackbone("builtin:nope")
    with pytest.raises(ValueError, match="torch_dtype"):
        DiffusersVideoBackbone(tiny_pipeline, torch_dtype="fp8")
    # a pipeline naming a class outside diffusers/transformers is refused before anything is imported
    evil = tmp_path / "evil"
    shutil.copytree(tiny_pipeline, evil)
    index = json.loads((evil / "model_index.json").read_text())
    index["vae"] = ["os", "system"]
    (evil / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="not allowed"):
        DiffusersVideoBackbone(str(evil))


def test_unknown_hub_id_offline_fails_clearly():
    from huggingface_hub.errors import LocalEntryNotFoundError

    with pytest.raises((LocalEntryNotFoundError, OSError)):
        DiffusersVideoBackbone("no-such-org/no-such-model")


def test_conditioning_helpers():
    c = Conditioning(torch.arange(6.0).view(3, 2, 1), torch.ones(3, 2), {"img": torch.zeros(3, 4)})
    r = c.repeat_interleave(2)
    assert len(r) == 6 and torch.equal(r.prompt_embeds[1], c.prompt_embeds[0])
    both = Conditioning.cat([c, c.index(slice(0, 1))])
    assert len(both) == 4 and both.extra["img"].shape == (4, 4)
