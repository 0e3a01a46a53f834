"""LTX-2 (video only) on a tiny random pipeline, checked against diffusers' ``LTX2Pipeline``: prompt encoding through
Gemma 3 and the connectors, the video-only transformer call, sampling, LoRA SFT and saving."""

import json
import shutil

import lightning as L
import pytest
import torch

from lit_videoalign.backbones.diffusers import DiffusersVideoBackbone, pack_latents, unpack_latents
from lit_videoalign.objectives.sft import SFT
from lit_videoalign.testing import tiny_ltx2_pipeline

PROMPTS = ["a red ball falls", " a blue ball "]  # the pipeline strips prompts
SEEDS = [3, 4]
LATENT = (8, 2, 2, 2)  # 9x64x64 clips


def rel_close(actual, expected, rel=1e-5):
    """Equal up to float32 rounding, relative to the largest expected value (so it holds across torch versions).
    Prompt embeddings and velocities measured bit-identical (torch 2.14.1, diffusers 0.42.1, CPU, 3 seeds)."""
    torch.testing.assert_close(actual, expected, rtol=0, atol=rel * expected.abs().max().item())


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return str(tiny_ltx2_pipeline(tmp_path_factory.mktemp("ltx2") / "pipe"))


@pytest.fixture(scope="module")
def backbone(folder):
    return DiffusersVideoBackbone(folder, max_sequence_length=16)


@pytest.fixture(scope="module")
def pipeline(folder):
    from diffusers import LTX2Pipeline

    pipe = LTX2Pipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def silence_audio_to_video(*transformers):
    """Zero every block's audio-to-video attention output, so no audio reaches the video stream."""
    with torch.no_grad():
        for transformer in transformers:
            for block in transformer.transformer_blocks:
                block.audio_to_video_attn.to_out[0].weight.zero_()
                block.audio_to_video_attn.to_out[0].bias.zero_()


def test_loads_the_video_path_frozen_and_targets_the_video_stream(backbone):
    assert backbone.family.name == "ltx2" and type(backbone.connectors).__name__ == "LTX2TextConnectors"
    assert [type(m).__name__ for m in backbone.text_encoders] == ["Gemma3ForConditionalGeneration",
                                                                   "LTX2TextConnectors"]
    assert not hasattr(backbone, "audio_vae") and not hasattr(backbone, "vocoder")
    assert not any(p.requires_grad for m in (backbone.vae, *backbone.text_encoders) for p in m.parameters())
    backbone.train()
    assert backbone.denoiser.training and not backbone.connectors.training
    backbone.eval()
    names = [n for n, _ in backbone.denoiser.named_modules()]
    targeted = [n for n in names if any(n.endswith("." + t) for t in backbone.default_lora_targets)]
    assert targeted and all(".attn1." in n or ".attn2." in n for n in targeted)  # never audio_attn*, a2v or v2a
    assert any("audio_attn1.to_q" in n for n in names)
    assert backbone.latent_shape(9, 64, 64) == LATENT and backbone.fps == 24.0


def test_prompts_are_the_pipelines_gemma_states_through_its_connectors(backbone, pipeline):
    cond = backbone.encode_prompts(PROMPTS)
    with torch.no_grad():
        embeds, mask, _, _ = pipeline.encode_prompt(PROMPTS, do_classifier_free_guidance=False,
                                                    max_sequence_length=16)
        video, audio, connector_mask = pipeline.connectors(embeds, mask, padding_side="left")
    assert mask.sum(1).tolist() == [5, 4] and mask[1, :12].sum() == 0  # words + </s>, padded on the left
    assert cond.prompt_embeds.shape == video.shape == (2, 16, 16)
    assert torch.equal(cond.prompt_mask, connector_mask) and cond.extra == {}
    rel_close(cond.prompt_embeds, video)
    assert (video - audio).abs().max() > 1e-3  # the audio stream's embeddings are another output, dropped
    again = backbone.encode_prompts(["a blue ball"])
    rel_close(again.prompt_embeds, cond.prompt_embeds[1:])


def pipeline_transformer_inputs(pipe, x, timestep, embeds, audio_embeds, mask, frame_rate=24.0, num_frames=9):
    """The transformer's keyword arguments exactly as ``LTX2Pipeline.__call__`` builds them for latents ``x``."""
    b, _, t, h, w = x.shape
    audio_frames = round(num_frames / frame_rate * pipe.audio_sampling_rate / pipe.audio_hop_length
                         / pipe.audio_vae_temporal_compression_ratio)
    audio = pipe.prepare_audio_latents(b, pipe.audio_vae.config.latent_channels, audio_frames,
                                       pipe.audio_vae.config.mel_bins, generator=torch.Generator().manual_seed(1))
    return dict(hidden_states=pack_latents(x), audio_hidden_states=audio, encoder_hidden_states=embeds,
                audio_encoder_hidden_states=audio_embeds, timestep=timestep, sigma=timestep,
                encoder_attention_mask=mask, audio_encoder_attention_mask=mask, num_frames=t, height=h, width=w,
                fps=frame_rate, audio_num_frames=audio_frames,
                video_coords=pipe.transformer.rope.prepare_video_coords(b, t, h, w, x.device, fps=frame_rate),
                audio_coords=pipe.transformer.audio_rope.prepare_audio_coords(b, audio_frames, x.device),
                use_cross_timestep=True, return_dict=False)


def test_velocity_is_the_transformers_video_output_with_the_audio_stream_isolated(backbone, pipeline):
    cond = backbone.encode_prompts(PROMPTS)
    with torch.no_grad():
        embeds, mask, _, _ = pipeline.encode_prompt(PROMPTS, do_classifier_free_guidance=False,
                                                    max_sequence_length=16)
        video, audio, connector_mask = pipeline.connectors(embeds, mask, padding_side="left")
    x = torch.randn(2, *LATENT)
    sigma = torch.tensor([0.3, 0.9])
    with torch.no_grad():
        ours = backbone.predict_velocity(x, sigma, cond)
        kwargs = pipeline_transformer_inputs(pipeline, x, sigma * 1000, video, audio, connector_mask)
        isolated = pipeline.transformer(isolate_modalities=True, **kwargs)[0]
        joint = pipeline.transformer(isolate_modalities=False, **kwargs)[0]
        kwargs["audio_hidden_states"] = 3 * torch.randn_like(kwargs["audio_hidden_states"])
        other_audio = pipeline.transformer(isolate_modalities=True, **kwargs)[0]
    assert ours.shape == x.shape
    rel_close(ours, unpack_latents(isolated, LATENT[1:]))
    assert torch.equal(other_audio, isolated)  # isolated, the video stream reads nothing of the audio stream
    # the pipeline's main pass lets the noisy audio into the video: another prediction, so the check above can fail
    assert (unpack_latents(joint, LATENT[1:]) - ours).abs().max() > 1e-3 * ours.abs().max()


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_sampling_equals_ltx2_pipeline_when_no_audio_reaches_the_video(folder, guidance_scale):
    """With a2v silenced the pipeline's video does not depend on its audio; then ``generate`` (the pipeline's
    scheduler, sigmas and ``mu``, plain CFG) gives its video latents, denormalised as ``output_type="latent"``."""
    from diffusers import LTX2Pipeline

    model = SFT(DiffusersVideoBackbone(folder, max_sequence_length=16), num_frames=9, height=64, width=64,
                num_inference_steps=3, guidance_scale=guidance_scale).eval()
    pipe = LTX2Pipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    silence_audio_to_video(model.backbone.denoiser, pipe.transformer)
    ours = model.generate(PROMPTS, SEEDS, return_latents=True)
    noise = model.initial_noise(SEEDS)
    theirs, _ = pipe(prompt=PROMPTS, num_frames=9, height=64, width=64, num_inference_steps=3,
                     guidance_scale=guidance_scale, stg_scale=0.0, modality_scale=1.0, guidance_rescale=0.0,
                     latents=pack_latents(noise), max_sequence_length=16, output_type="latent", return_dict=False,
                     generator=torch.Generator().manual_seed(0))
    theirs = model.backbone.family.normalize_latents(pipe.vae, theirs)
    assert theirs.shape == ours.shape == noise.shape
    # measured max |diff| / max |theirs| 1.3e-7 (CFG off) and 2.5e-7 (CFG 3), torch 2.14.1, diffusers 0.42.1, CPU;
    # with a2v left on it is 0.41: the pipeline's joint sampling is another one
    rel_close(ours, theirs, rel=2e-5)
    assert (ours - noise).abs().max() > 0.1  # it sampled


def test_two_lora_sft_steps_move_lora_weights_only(folder):
    model = SFT(DiffusersVideoBackbone(folder, max_sequence_length=16), lora_rank=4,
                optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2), num_frames=9, height=64, width=64)
    with torch.no_grad():  # LoRA B starts at zero: give it a value so A gets gradients too
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.01)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batches = [{"video": torch.rand(1, 9, 3, 64, 64), "prompt": ["a red ball falls"]} for _ in range(2)]
    L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0).fit(
        model, torch.utils.data.DataLoader(batches, batch_size=None))
    after = dict(model.named_parameters())
    lora = [n for n in before if "lora_" in n]
    assert lora and all(".attn1." in n or ".attn2." in n for n in lora)
    assert all(not torch.equal(before[n], after[n]) for n in lora), "a LoRA weight did not move"
    assert all(torch.equal(before[n], after[n]) for n in before if "lora_" not in n), "a frozen weight moved"


def test_save_pretrained_keeps_connectors_and_the_audio_branch_for_diffusers(backbone, folder, tmp_path):
    from diffusers import LTX2Pipeline

    out = backbone.save_pretrained(tmp_path / "saved")
    assert {"connectors", "audio_vae", "vocoder", "text_encoder", "tokenizer", "vae", "scheduler"} <= {
        p.name for p in out.iterdir()}
    again = DiffusersVideoBackbone(str(out), max_sequence_length=16)
    assert torch.equal(again.encode_prompts(PROMPTS).prompt_embeds, backbone.encode_prompts(PROMPTS).prompt_embeds)
    pipe = LTX2Pipeline.from_pretrained(out)
    assert type(pipe.vocoder).__name__ == "LTX2Vocoder"


def test_bad_ltx2_settings_are_named(folder, tmp_path):
    with pytest.raises(ValueError, match="multiple of the 8 learnable registers of the video text connector, got 12"):
        DiffusersVideoBackbone(folder, max_sequence_length=12)
    with pytest.raises(ValueError, match="motion_speed must be a positive number, got 0"):
        DiffusersVideoBackbone(folder, max_sequence_length=16, family_options={"motion_speed": 0})
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    shutil.rmtree(broken / "connectors")
    with pytest.raises(FileNotFoundError, match="no connectors/config.json"):
        DiffusersVideoBackbone(str(broken), max_sequence_length=16)
    index = json.loads((broken / "model_index.json").read_text())
    index["connectors"] = ["ltx2", "SomethingElse"]
    (broken / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"connectors = \['ltx2', 'LTX2TextConnectors'\]"):
        DiffusersVideoBackbone(str(broken), max_sequence_length=16)
