"""HunyuanVideo 1.5 T2V on a tiny random pipeline, checked against diffusers' ``HunyuanVideo15Pipeline``: prompt
encoding (Qwen2.5-VL chat template and crop, ByT5 glyph texts), latent normalisation, sampling with and without
classifier-free guidance, saving, and LoRA SFT steps."""

import json
import shutil

import lightning as L
import pytest
import torch

from lit_videoalign.backbones.diffusers import DiffusersVideoBackbone
from lit_videoalign.data.toyworld import ToyWorldDataModule
from lit_videoalign.objectives.sft import SFT
from lit_videoalign.testing import TINY_HUNYUAN15_CROP_START, tiny_hunyuan15_pipeline

# a plain prompt, one with two quoted glyph texts (straight and curly quotes), and the empty negative prompt
PROMPTS = ["a red ball falls", 'a sign reads "open" and “closed”', ""]
LENGTH = 64  # Qwen tokens kept after the crop: the byte-level tiny tokenizer spends one per byte
OPTIONS = {"crop_start": TINY_HUNYUAN15_CROP_START}
LATENT = (4, 3, 2, 2)  # 9x32x32 clips


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    return str(tiny_hunyuan15_pipeline(tmp_path_factory.mktemp("hunyuan15") / "pipe"))


def load(path: str, **kwargs) -> DiffusersVideoBackbone:
    return DiffusersVideoBackbone(path, max_sequence_length=LENGTH, family_options=OPTIONS, **kwargs)


@pytest.fixture(scope="module")
def backbone(folder):
    return load(folder)


def diffusers_pipeline(path: str, guidance_scale: float = 6.0):
    """The folder loaded by diffusers' own pipeline, told the tiny tokenizer's crop and our prompt length."""
    from diffusers import ClassifierFreeGuidance, HunyuanVideo15Pipeline

    pipe = HunyuanVideo15Pipeline.from_pretrained(path)
    pipe.prompt_template_encode_start_idx, pipe.tokenizer_max_length = TINY_HUNYUAN15_CROP_START, LENGTH
    pipe.guider = ClassifierFreeGuidance(guidance_scale=guidance_scale)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_loads_every_component_and_encodes_prompts_exactly_like_the_pipeline(folder, backbone):
    bb = backbone
    assert bb.family.name == "hunyuan_video15" and bb.fps == 24.0 and bb.default_sampling_shift == 5.0
    assert [type(m).__name__ for m in (bb.text_encoder, bb.text_encoder_2, bb.vae)] == [
        "Qwen2_5_VLTextModel", "T5EncoderModel", "AutoencoderKLHunyuanVideo15"]
    assert not any(p.requires_grad for m in (bb.vae, *bb.text_encoders) for p in m.parameters())
    assert "HunyuanVideo15TransformerBlock" in [c.__name__ for c in bb.block_classes]
    cond = bb.encode_prompts(PROMPTS)
    pipe = diffusers_pipeline(folder)
    with torch.no_grad():
        embeds, mask, glyphs, glyph_mask = pipe.encode_prompt(PROMPTS, device="cpu", dtype=torch.float32,
                                                              batch_size=len(PROMPTS))
    assert cond.prompt_embeds.shape == (3, LENGTH, 16) and torch.equal(cond.prompt_embeds, embeds)
    assert torch.equal(cond.prompt_mask.float(), mask)
    assert torch.equal(cond.extra["glyph_embeds"], glyphs) and torch.equal(cond.extra["glyph_mask"].float(), glyph_mask)
    # the crop cuts the system turn exactly: what is kept starts with the prompt (the empty one is sent as " ")
    chat = [{"role": "system", "content": pipe.system_message}, {"role": "user", "content": PROMPTS[0]}]
    ids = bb.tokenizer.apply_chat_template([chat], add_generation_prompt=True, tokenize=True,
                                           return_dict=True)["input_ids"][0]
    assert bb.tokenizer.decode(ids[TINY_HUNYUAN15_CROP_START:]).startswith(PROMPTS[0] + "<|im_end|>")
    # glyph texts: ByT5 bytes of 'Text "open". Text "closed". ' and </s>; none (zeros, masked) without quotes
    assert cond.extra["glyph_mask"].sum(1).tolist() == [0, len('Text "open". Text "closed". ') + 1, 0]
    assert not cond.extra["glyph_embeds"][0].any() and cond.extra["glyph_embeds"][1].abs().sum() > 0


@pytest.mark.parametrize("guidance_scale", [1.0, 4.0])
def test_sampling_equals_the_diffusers_pipeline_with_and_without_guidance(folder, backbone, guidance_scale):
    torch.manual_seed(0)
    model = SFT(backbone, num_frames=9, height=32, width=32, num_inference_steps=3,
                guidance_scale=guidance_scale).eval()
    ours = model.generate(PROMPTS[:2], [3, 4], return_latents=True)
    noise = model.initial_noise([3, 4])
    theirs = diffusers_pipeline(folder, guidance_scale)(prompt=PROMPTS[:2], latents=noise, num_frames=9, height=32,
                                                        width=32, num_inference_steps=3, output_type="latent").frames
    assert ours.shape == theirs.shape == (2, *LATENT)
    # float32 rounding only (our guidance batches both branches in one call, the pipeline calls them one after the
    # other): max |diff| / max |theirs| measured 0.0 without guidance and 2.4e-7..3.2e-7 with it (3 noise draws,
    # torch 2.14.1, diffusers 0.42.1, CPU); 2e-5 is 60x the largest
    torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-5 * theirs.abs().max().item())
    other = model.generate(PROMPTS[:2], [3, 4], return_latents=True, guidance_scale=2.0)
    assert (other - theirs).abs().max() > 1e-3  # another guidance scale: the comparison can fail


def test_latents_normalise_and_decode_like_the_pipeline(folder, backbone):
    """One pipeline step from sigma 1 to 0 returns decode(noise - v): the sign, timestep scale, latent scaling and
    decoder call at once. Batches encode and decode (the diffusers VAE's attention handles one video at a time)."""
    videos = torch.rand(2, 9, 3, 32, 32)
    latents = backbone.encode_videos(videos)
    vae = backbone.vae
    with torch.no_grad():
        raw = torch.cat([vae.encode(v.permute(1, 0, 2, 3)[None] * 2 - 1).latent_dist.mode() for v in videos])
    assert latents.shape == (2, *LATENT) and torch.equal(latents, raw * vae.config.scaling_factor)
    noise = torch.randn(2, *LATENT)
    cond = backbone.encode_prompts(PROMPTS[:2])
    ours = backbone.decode_latents(noise - backbone.predict_velocity(noise, 1.0, cond))
    pipe = diffusers_pipeline(folder, 1.0)
    pipe.vae.enable_slicing()  # diffusers 0.42's HunyuanVideo 1.5 VAE fails on a batch of 2 otherwise
    expected = pipe(prompt=PROMPTS[:2], latents=noise, num_frames=9, height=32, width=32, num_inference_steps=1,
                    output_type="pt").frames
    assert ours.shape == expected.shape == (2, 9, 3, 32, 32)
    # the same calls in the same order: measured 0.0 (3 noise draws, torch 2.14.1, CPU); 1e-4 allows float32 rounding
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-4 * expected.abs().max().item())
    with pytest.raises(ValueError, match=r"1 \+ 4k for this VAE, got 10"):
        backbone.latent_shape(10, 32, 32)
    with pytest.raises(ValueError, match="multiples of 16 for this VAE, got 40x32"):
        backbone.latent_shape(9, 40, 32)


def test_two_lora_sft_steps_move_only_lora_weights_and_save_reloads(folder, tmp_path):
    model = SFT(load(folder), lora_rank=4, num_frames=9, height=32, width=32,
                optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0).fit(
        model, ToyWorldDataModule(num_frames=9, batch_size=2, train_size=4, val_size=2))
    after = dict(model.named_parameters())
    lora = [n for n in before if "lora_" in n]
    assert lora and any(not torch.equal(before[n], after[n]) for n in lora), "LoRA weights did not move"
    assert all(torch.equal(before[n], after[n]) for n in before if "lora_" not in n), "a frozen weight moved"
    bb = model.backbone
    cond = bb.encode_prompts(PROMPTS[:2])
    x = torch.randn(2, *LATENT)
    expected = bb.predict_velocity(x, 0.4, cond)
    out = bb.save_pretrained(tmp_path / "merged")
    assert {p.name for p in out.iterdir()} >= {*bb.family.components, "vae", "scheduler", "guider"}
    again = load(str(out))
    # merged weights round differently from base + LoRA; 1e-5 of the largest value allows for it
    torch.testing.assert_close(again.predict_velocity(x, 0.4, again.encode_prompts(PROMPTS[:2])), expected, rtol=0,
                               atol=1e-5 * expected.abs().max().item())
    assert type(diffusers_pipeline(str(out)).transformer).__name__ == "HunyuanVideo15Transformer3DModel"


def test_errors_name_the_value_and_what_is_expected(folder, backbone, tmp_path):
    with pytest.raises(ValueError, match="crop_start must be an integer >= 0, got -1"):
        DiffusersVideoBackbone(folder, family_options={"crop_start": -1})
    cond = backbone.encode_prompts(PROMPTS[:1])
    cond.extra.pop("glyph_mask")
    with pytest.raises(ValueError, match=r"extra\['glyph_mask'\]"):
        backbone.predict_velocity(torch.randn(1, *LATENT), 0.5, cond)
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    config = json.loads((broken / "transformer" / "config.json").read_text())
    config["in_channels"] = 4
    (broken / "transformer" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"4 input channels; the T2V pipeline feeds 2 \* 4 \+ 1"):
        DiffusersVideoBackbone(str(broken), reinit_denoiser=True)  # the config alone: weights would not fit
