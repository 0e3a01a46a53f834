"""LTX-Video and HunyuanVideo backbones on tiny random pipelines, checked against diffusers' own pipelines."""

import json
import shutil

import pytest
import torch
from torch import nn

from lit_videoalign.backbones.base import Conditioning
from lit_videoalign.backbones.diffusers import DiffusersVideoBackbone, pack_latents, unpack_latents
from lit_videoalign.testing import TINY_HUNYUAN_PROMPT_TEMPLATE, tiny_hunyuan_pipeline, tiny_ltx_pipeline

PROMPTS = ["a red ball falls", "a blue ball"]
SPECS = {
    # clip: (frames, height, width) the VAE accepts; latent: (C, T', H', W') it gives; block: a transformer block class
    "ltx": dict(write=tiny_ltx_pipeline, options=None, clip=(9, 64, 64), latent=(8, 2, 2, 2),
                pipeline="LTXPipeline", block="LTXVideoTransformerBlock",
                components={"text_encoder": "T5EncoderModel", "vae": "AutoencoderKLLTXVideo"}),
    "hunyuan_video": dict(write=tiny_hunyuan_pipeline, options={"prompt_template": TINY_HUNYUAN_PROMPT_TEMPLATE},
                          clip=(9, 32, 32), latent=(4, 3, 4, 4), pipeline="HunyuanVideoPipeline",
                          block="HunyuanVideoTransformerBlock",
                          components={"text_encoder": "LlamaModel", "text_encoder_2": "CLIPTextModel",
                                      "vae": "AutoencoderKLHunyuanVideo"}),
}


@pytest.fixture(scope="module", params=list(SPECS))
def family(request, tmp_path_factory):
    """``(name, pipeline folder, spec)`` for each family; the folder is written once per module."""
    spec = SPECS[request.param]
    return request.param, str(spec["write"](tmp_path_factory.mktemp(request.param) / "pipe")), spec


def load(family, path=None, **kwargs) -> DiffusersVideoBackbone:
    name, folder, spec = family
    return DiffusersVideoBackbone(path or folder, max_sequence_length=16, family_options=spec["options"], **kwargs)


@pytest.fixture(scope="module")
def backbone(family):
    return load(family)


@pytest.fixture(scope="module")
def pipeline(family):
    """The same folder loaded by diffusers' own pipeline class."""
    import diffusers

    name, folder, spec = family
    return getattr(diffusers, spec["pipeline"]).from_pretrained(folder)


def raw_transformer_call(name, bb, x, timestep, cond):
    """The transformer called exactly the way the family's diffusers pipeline calls it."""
    from diffusers import LTXPipeline

    if name == "ltx":
        _, _, t, h, w = x.shape
        out = bb.denoiser(hidden_states=LTXPipeline._pack_latents(x, 1, 1), encoder_hidden_states=cond.prompt_embeds,
                          timestep=timestep, encoder_attention_mask=cond.prompt_mask, num_frames=t, height=h, width=w,
                          rope_interpolation_scale=(8 / 25, 32, 32), return_dict=False)[0]
        return LTXPipeline._unpack_latents(out, t, h, w, 1, 1)
    guidance = torch.tensor([6.0] * x.shape[0]) * 1000.0  # the pipeline's default embedded guidance
    return bb.denoiser(hidden_states=x, timestep=timestep, encoder_hidden_states=cond.prompt_embeds,
                       encoder_attention_mask=cond.prompt_mask, pooled_projections=cond.extra["pooled_projections"],
                       guidance=guidance, return_dict=False)[0]


def test_loads_every_component_frozen_except_the_denoiser(family, backbone):
    name, _, spec = family
    assert backbone.family.name == name
    for component, cls in spec["components"].items():
        assert type(getattr(backbone, component)).__name__ == cls
    assert all(p.requires_grad for p in backbone.denoiser.parameters())
    frozen = [backbone.vae, *backbone.text_encoders]
    assert len(backbone.text_encoders) == (2 if name == "hunyuan_video" else 1)
    assert not any(p.requires_grad for m in frozen for p in m.parameters())
    backbone.train()
    assert backbone.denoiser.training and not any(m.training for m in frozen)
    assert spec["block"] in [c.__name__ for c in backbone.block_classes]


def test_prompts_are_encoded_exactly_like_the_diffusers_pipeline(family, backbone, pipeline):
    name, _, _ = family
    cond = backbone.encode_prompts(PROMPTS)
    assert cond.prompt_embeds.shape[:2] == (2, 16) and cond.prompt_mask.sum(1).tolist() == [5, 4]  # words + </s>
    with torch.no_grad():
        if name == "ltx":
            embeds, mask, _, _ = pipeline.encode_prompt(PROMPTS, do_classifier_free_guidance=False,
                                                        max_sequence_length=16)
            assert torch.equal(mask, cond.prompt_mask.bool()) and cond.extra == {}
            assert (cond.prompt_embeds[1, 4:] != 0).any()  # padding is masked in the transformer, not zeroed
        else:
            embeds, pooled, mask = pipeline.encode_prompt(PROMPTS, prompt_template=TINY_HUNYUAN_PROMPT_TEMPLATE,
                                                          max_sequence_length=16)
            assert torch.equal(mask, cond.prompt_mask)
            assert torch.equal(pooled, cond.extra["pooled_projections"]) and pooled.shape == (2, 8)
            assert torch.equal(cond.extra["guidance"], torch.full((2,), 6000.0))
    assert torch.equal(embeds, cond.prompt_embeds)


def test_predict_velocity_equals_the_raw_transformer_at_sigma_times_1000(family, backbone):
    name, _, spec = family
    cond = backbone.encode_prompts(PROMPTS)
    x = torch.randn(2, *spec["latent"])
    sigma = torch.tensor([0.3, 0.9])
    ours = backbone.predict_velocity(x, sigma, cond)
    assert ours.shape == x.shape  # the latent layout, LTX tokens unpacked
    assert torch.equal(ours, raw_transformer_call(name, backbone, x, sigma * 1000, cond))
    assert torch.equal(backbone.predict_velocity(x, 0.3, cond),
                       raw_transformer_call(name, backbone, x, torch.full((2,), 300.0), cond))
    # Conditionings (with their extras) batch like tensors: a concatenated batch gives the per-sample velocities.
    both = Conditioning.cat([cond.index(slice(0, 1)), cond.index(slice(1, 2))])
    # measured bit-identical (torch 2.13.0 / 2.14.1, 3 seeds, AVX-512 / AVX2 / baseline CPU kernels); 1e-5 of the
    # largest velocity leaves room for a batch that reduces in another order (4.8e-7 measured in test_inference)
    torch.testing.assert_close(backbone.predict_velocity(x, sigma, both), ours, rtol=0,
                               atol=1e-5 * ours.abs().max().item())


def test_one_diffusers_pipeline_step_equals_an_euler_step_with_our_velocity(family, backbone, pipeline):
    """FlowMatchEulerDiscreteScheduler steps x + (sigma_next - sigma) * model_output: with one step from sigma 1 to 0
    the pipeline returns decode(noise - v), which fixes the sign, the timestep scale, the latent normalisation and the
    decoder call all at once."""
    name, _, spec = family
    frames, height, width = spec["clip"]
    noise = torch.randn(2, *spec["latent"])
    kwargs = dict(prompt=PROMPTS, num_frames=frames, height=height, width=width, num_inference_steps=1,
                  max_sequence_length=16, output_type="pt")
    if name == "ltx":  # no classifier-free guidance; LTXPipeline takes packed latents
        kwargs.update(latents=pack_latents(noise), guidance_scale=1.0)
    else:
        kwargs.update(latents=noise, prompt_template=TINY_HUNYUAN_PROMPT_TEMPLATE)
    pipeline.set_progress_bar_config(disable=True)
    expected = pipeline(**kwargs).frames  # (b, t, c, h, w) in [0, 1]
    ours = backbone.decode_latents(noise - backbone.predict_velocity(noise, 1.0, backbone.encode_prompts(PROMPTS)))
    assert ours.shape == expected.shape == (2, frames, 3, height, width)
    # float32 rounding of two orders of the same maths: max |err| / max |expected| measured 0 for LTX and
    # 1.5e-6..4.5e-6 for HunyuanVideo (torch 2.13.0 / 2.14.1, 160 noise draws each, 1-4 threads, AVX-512 / AVX2 /
    # baseline CPU kernels; the former atol 1e-6 failed in 4 of the first 6 settings, on either torch); 1e-4 is 20x
    # the largest.
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-4 * expected.abs().max().item())


def test_video_latent_round_trip_shapes_and_frame_rules(family, backbone):
    name, _, spec = family
    frames, height, width = spec["clip"]
    assert backbone.latent_shape(frames, height, width) == spec["latent"]
    videos = torch.rand(2, frames, 3, height, width)
    latents = backbone.encode_videos(videos)
    assert latents.shape == (2, *spec["latent"]) and torch.isfinite(latents).all()
    # normalised as diffusers' LTX condition/I2V pipelines and Hunyuan's I2V pipeline normalise encoded videos
    vae = backbone.vae
    with torch.no_grad():
        raw = vae.encode(videos.permute(0, 2, 1, 3, 4) * 2 - 1).latent_dist.mode()
    if name == "ltx":
        from diffusers import LTXPipeline

        reference = LTXPipeline._normalize_latents(raw, vae.latents_mean, vae.latents_std, vae.config.scaling_factor)
    else:
        reference = raw * vae.config.scaling_factor
    assert torch.equal(latents, reference)
    decoded = backbone.decode_latents(latents)
    assert decoded.shape == videos.shape and decoded.min() >= 0 and decoded.max() <= 1
    ft, fs = (8, 32) if name == "ltx" else (4, 8)
    with pytest.raises(ValueError, match=rf"1 \+ {ft}k for this VAE, got {frames + 1}"):
        backbone.latent_shape(frames + 1, height, width)
    with pytest.raises(ValueError, match=rf"multiples of {fs} for this VAE, got {height + 4}x{width}"):
        backbone.latent_shape(frames, height + 4, width)
    if name == "hunyuan_video":  # 24 px -> 3 latent pixels, not divisible by the transformer's 2x2 patches
        with pytest.raises(ValueError, match=r"patch size \(1, 2, 2\)"):
            backbone.latent_shape(frames, 24, 24)
    with pytest.raises(ValueError, match="1 \\+"):
        backbone.encode_videos(torch.rand(1, frames + 1, 3, height, width))


def _expected_lora_params(denoiser: nn.Module, targets, rank: int) -> int:
    return sum(rank * (m.in_features + m.out_features) for n, m in denoiser.named_modules()
               if isinstance(m, nn.Linear) and any(n == t or n.endswith("." + t) for t in targets))


def test_lora_trains_only_adapters_and_disabling_gives_the_base(family):
    _, _, spec = family
    bb = load(family)
    cond = bb.encode_prompts(PROMPTS[:1])
    x = torch.randn(1, *spec["latent"])
    base = bb.predict_velocity(x, 0.5, cond).detach()
    expected = _expected_lora_params(bb.denoiser, bb.default_lora_targets, 4)
    bb.add_lora(rank=4)
    trainable = {n for n, p in bb.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert sum(p.numel() for p in bb.trainable_parameters()) == expected > 0
    with torch.no_grad():
        for n, p in bb.denoiser.named_parameters():
            if "lora_B" in n:
                p.normal_()
    adapted = bb.predict_velocity(x, 0.5, cond)
    assert not torch.allclose(adapted, base)  # measured apart by 0.9 of their scale
    with bb.adapters_disabled():
        assert torch.equal(bb.predict_velocity(x, 0.5, cond), base)
    assert torch.equal(bb.predict_velocity(x, 0.5, cond), adapted)


def test_save_pretrained_merges_lora_and_reloads_here_and_in_diffusers(family, tmp_path):
    import diffusers

    name, _, spec = family
    bb = load(family)
    bb.add_lora(4)
    with torch.no_grad():
        for n, p in bb.denoiser.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)
    cond = bb.encode_prompts(PROMPTS)
    x = torch.randn(2, *spec["latent"])
    expected = bb.predict_velocity(x, 0.4, cond)
    out = bb.save_pretrained(tmp_path / "merged")
    assert not list(out.rglob("*.bin")) and list(out.rglob("*.safetensors"))
    assert {p.name for p in out.iterdir()} >= {*bb.family.components, "vae", "scheduler", "model_index.json"}
    again = load(family, str(out))
    assert not again.has_lora
    cond_again = again.encode_prompts(PROMPTS)  # every text encoder and tokenizer came back
    assert torch.equal(cond_again.prompt_embeds, cond.prompt_embeds)
    assert all(torch.equal(cond_again.extra[k], v) for k, v in cond.extra.items())
    # merged weights round differently from base + LoRA: max |err| / max |expected| measured 1.2e-7..2.3e-7 (torch
    # 2.13.0 / 2.14.1, 3 seeds, AVX-512 / AVX2 / baseline CPU kernels); 1e-5 is 40x that
    torch.testing.assert_close(again.predict_velocity(x, 0.4, cond_again), expected, rtol=0,
                               atol=1e-5 * expected.abs().max().item())
    pipe = getattr(diffusers, spec["pipeline"]).from_pretrained(out)
    assert type(pipe.transformer).__name__ == type(bb.denoiser).__name__


def test_family_errors_name_the_value_and_what_is_expected(family, backbone, tmp_path):
    name, folder, spec = family
    with pytest.raises(ValueError, match=r"unknown family_options \['nope'\] for model family"):
        DiffusersVideoBackbone(folder, family_options={"nope": 1})
    with pytest.raises(ValueError, match="not a supported family"):
        bad = tmp_path / "bad"
        shutil.copytree(folder, bad)
        index = json.loads((bad / "model_index.json").read_text())
        index["transformer"] = ["diffusers", "FluxTransformer2DModel"]
        (bad / "model_index.json").write_text(json.dumps(index))
        DiffusersVideoBackbone(str(bad))
    if name == "hunyuan_video":
        with pytest.raises(ValueError, match="crop_start"):
            DiffusersVideoBackbone(folder, family_options={"prompt_template": {"template": "no placeholder"}})
        broken = tmp_path / "broken"
        shutil.copytree(folder, broken)
        index = json.loads((broken / "model_index.json").read_text())
        del index["text_encoder_2"]
        (broken / "model_index.json").write_text(json.dumps(index))
        with pytest.raises(ValueError, match=r"lacks required components \['text_encoder_2'\]"):
            DiffusersVideoBackbone(str(broken))
        cond = backbone.encode_prompts(PROMPTS[:1])
        cond.extra.pop("pooled_projections")
        with pytest.raises(ValueError, match=r"extra\['pooled_projections'\]"):
            backbone.predict_velocity(torch.randn(1, *spec["latent"]), 0.5, cond)


def test_pack_unpack_match_ltx_pipeline_and_invert_with_patches():
    from diffusers import LTXPipeline

    x = torch.randn(2, 3, 4, 6, 8)
    assert torch.equal(pack_latents(x), LTXPipeline._pack_latents(x, 1, 1))
    tokens = pack_latents(x)
    assert torch.equal(unpack_latents(tokens, (4, 6, 8)), LTXPipeline._unpack_latents(tokens, 4, 6, 8))
    tokens = pack_latents(x, patch_size=2, patch_size_t=2)
    assert tokens.shape == (2, 2 * 3 * 4, 3 * 8)
    assert torch.equal(unpack_latents(tokens, (2, 3, 4), patch_size=2, patch_size_t=2), x)
