"""HunyuanVideo 1.5 T2V and I2V on tiny random pipelines, checked against diffusers' ``HunyuanVideo15Pipeline`` and
``HunyuanVideo15ImageToVideoPipeline``: prompt encoding (Qwen2.5-VL chat template and crop, ByT5 glyph texts), image
encoding (VAE latents of the first frame, SigLIP tokens), latent normalisation, sampling with and without
classifier-free guidance, saving, and LoRA SFT steps."""

import json
import shutil

import lightning as L
import PIL.Image
import pytest
import torch

from lit_videoalign.backbones.diffusers import DiffusersVideoBackbone
from lit_videoalign.data.toyworld import ToyWorldDataModule
from lit_videoalign.data.video_folder import VideoFolderDataset
from lit_videoalign.objectives.sft import SFT
from lit_videoalign.testing import TINY_HUNYUAN15_CROP_START, tiny_hunyuan15_pipeline
from lit_videoalign.video_io import write_mp4

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


def diffusers_pipeline(path: str, guidance_scale: float = 6.0, i2v: bool = False):
    """The folder loaded by diffusers' own pipeline (T2V or I2V), told the tiny tokenizer's crop and our prompt
    length."""
    from diffusers import ClassifierFreeGuidance, HunyuanVideo15ImageToVideoPipeline, HunyuanVideo15Pipeline

    pipe = (HunyuanVideo15ImageToVideoPipeline if i2v else HunyuanVideo15Pipeline).from_pretrained(path)
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


# -- image-to-video (HunyuanVideo15ImageToVideoPipeline) -----------------------------------------------------------


@pytest.fixture(scope="module")
def i2v_folder(tmp_path_factory) -> str:
    return str(tiny_hunyuan15_pipeline(tmp_path_factory.mktemp("hunyuan15_i2v") / "pipe", i2v=True))


@pytest.fixture(scope="module")
def i2v_backbone(i2v_folder):
    return load(i2v_folder)


def image(seed: int):
    """A random 8-bit RGB image as ``(1, 3, 32, 32)`` in [0, 1] and as the PIL image a pipeline user passes."""
    pixels = torch.randint(0, 256, (32, 32, 3), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    return pixels.permute(2, 0, 1)[None].float() / 255, PIL.Image.fromarray(pixels.numpy())


def test_i2v_encodes_the_image_exactly_like_the_pipeline(i2v_folder, i2v_backbone):
    bb = i2v_backbone
    assert bb.supports_images and type(bb.image_encoder).__name__ == "SiglipVisionModel"
    assert type(bb.image_processor).__name__ == "SiglipImageProcessor"
    img, pil = image(0)
    with torch.no_grad():
        cond = bb.encode_images(img.expand(2, -1, -1, -1), bb.encode_prompts(PROMPTS[:2]), num_frames=9)
    pipe = diffusers_pipeline(i2v_folder, i2v=True)
    with torch.no_grad():
        embeds = pipe.encode_image(pil, batch_size=2, device="cpu", dtype=torch.float32)
        latents, mask = pipe.prepare_cond_latents_and_mask(torch.zeros(2, *LATENT), pil, 2, 32, 32, torch.float32,
                                                           "cpu")
    assert set(cond.extra) >= {"image_latents", "image_embeds"} and torch.equal(cond.images, img.expand(2, -1, -1, -1))
    assert cond.extra["image_embeds"].shape == (2, 16, 8) and torch.equal(cond.extra["image_embeds"], embeds)
    assert cond.extra["image_latents"].shape == (2, 4, 1, 2, 2)
    torch.testing.assert_close(cond.extra["image_latents"], latents[:, :, :1], rtol=0, atol=0)
    assert not latents[:, :, 1:].any() and mask[:, 0, :, 0, 0].tolist() == [[1, 0, 0]] * 2


@pytest.mark.parametrize("guidance_scale", [1.0, 4.0])
def test_i2v_sampling_equals_the_diffusers_pipeline_with_and_without_guidance(i2v_folder, i2v_backbone,
                                                                              guidance_scale):
    img, pil = image(1)
    model = SFT(i2v_backbone, num_frames=9, height=32, width=32, num_inference_steps=3,
                guidance_scale=guidance_scale).eval()
    ours = model.generate(PROMPTS[:2], [3, 4], return_latents=True, images=img.expand(2, -1, -1, -1))
    noise = model.initial_noise([3, 4])
    # the pipeline sizes the video from the image (target_size 32 keeps 32x32) and gives every prompt that image
    theirs = diffusers_pipeline(i2v_folder, guidance_scale, i2v=True)(
        image=pil, prompt=PROMPTS[:2], latents=noise, num_frames=9, num_inference_steps=3,
        output_type="latent").frames
    assert ours.shape == theirs.shape == (2, *LATENT)
    # float32 rounding only: max |diff| / max |theirs| measured 0.0 without guidance and 2.4e-7 with it (torch
    # 2.14.1, diffusers 0.42.1, CPU); 2e-5 is ~80x that
    torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-5 * theirs.abs().max().item())
    other = model.generate(PROMPTS[:2], [3, 4], return_latents=True, images=image(2)[0].expand(2, -1, -1, -1))
    assert (other - theirs).abs().max() > 1e-3 * theirs.abs().max()  # another image: the comparison can fail


def test_i2v_refuses_missing_or_bad_images_and_t2v_refuses_images_in_one_line(backbone, i2v_backbone, i2v_folder,
                                                                               tmp_path):
    for change, message in (({"image_embed_dim": 4}, "tokens of width 8 but .* image_embed_dim=4"),
                            ({"use_meanflow": True}, "use_meanflow=True")):
        broken = tmp_path / next(iter(change))
        shutil.copytree(i2v_folder, broken)
        config = json.loads((broken / "transformer" / "config.json").read_text())
        (broken / "transformer" / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(ValueError, match=message):
            load(str(broken), reinit_denoiser=True)  # the config alone: weights would not fit
    img, _ = image(0)
    cond = i2v_backbone.encode_prompts(PROMPTS[:1])
    with pytest.raises(ValueError, match="is text-to-video only") as err:
        backbone.encode_images(img, backbone.encode_prompts(PROMPTS[:1]), num_frames=9)
    assert not backbone.supports_images and "\n" not in str(err.value)
    with pytest.raises(ValueError, match=r"needs a conditioning image per video; call backbone.encode_images") as err:
        i2v_backbone.predict_velocity(torch.randn(1, *LATENT), 0.5, cond)
    assert "\n" not in str(err.value)
    bad = {"grayscale images": img[:, :1], "RGBA images": torch.cat([img, img[:, :1]], dim=1),
           "must be in \\[0, 1\\]": img * 2, "multiples of 16 for this VAE, got 24x24": img[..., :24, :24]}
    for message, images in bad.items():
        with pytest.raises(ValueError, match=message):
            i2v_backbone.encode_images(images, cond, num_frames=9)
    with pytest.raises(ValueError, match="first frame only; got last_images"):
        i2v_backbone.encode_images(img, cond, num_frames=9, last_images=img)
    with torch.no_grad():
        small = i2v_backbone.encode_images(img[..., :16, :16], cond, num_frames=9)
    with pytest.raises(ValueError, match="encode the images at the video's height and width"):
        i2v_backbone.predict_velocity(torch.randn(1, *LATENT), 0.5, small)


def test_i2v_save_pretrained_keeps_the_image_encoder_and_processor_names(i2v_backbone, tmp_path):
    out = i2v_backbone.save_pretrained(tmp_path / "saved")
    assert {"image_encoder", "feature_extractor"} <= {p.name for p in out.iterdir()}
    assert not (out / "image_processor").exists()
    again = load(str(out))
    img, _ = image(3)
    x = torch.randn(1, *LATENT, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        v = [bb.predict_velocity(x, 0.5, bb.encode_images(img, bb.encode_prompts(PROMPTS[:1]), num_frames=9))
             for bb in (i2v_backbone, again)]
    assert torch.equal(v[0], v[1])
    assert type(diffusers_pipeline(str(out), i2v=True).feature_extractor).__name__ == "SiglipImageProcessor"


@pytest.fixture(scope="module")
def video_folder(tmp_path_factory):
    """Four 9x32x32 clips with prompts; no images (each clip's first frame conditions it)."""
    root = tmp_path_factory.mktemp("hunyuan15_videos")
    gen = torch.Generator().manual_seed(0)
    for i in range(4):
        write_mp4(torch.rand(9, 3, 32, 32, generator=gen), root / f"clip{i}.mp4")
    (root / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"clip{i}.mp4", "prompt": PROMPTS[i % 2]})
                                                 + "\n" for i in range(4)))
    return root


def test_i2v_lora_sft_on_first_frames_moves_only_lora_weights(i2v_folder, video_folder):
    data = VideoFolderDataset(str(video_folder), 9, 32, 32, first_frame_image=True)
    model = SFT(load(i2v_folder), lora_rank=4, num_frames=9, height=32, width=32, prompt_dropout=0.0,
                optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    batch = torch.utils.data.default_collate([data[0], data[1]])
    with torch.no_grad():  # the batch's image is in the loss: another image, another loss for the same noise
        losses = [model.loss(b, generator=torch.Generator().manual_seed(0))
                  for b in (batch, {**batch, "image": batch["image"].flip(0)})]
    assert torch.isfinite(losses[0]) and (losses[0] - losses[1]).abs() > 1e-3 * losses[0]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0).fit(
        model, torch.utils.data.DataLoader(data, batch_size=2, shuffle=True))
    after = dict(model.named_parameters())
    assert all(torch.isfinite(p).all() for p in after.values())
    lora = [n for n in before if "lora_" in n]
    assert lora and any(not torch.equal(before[n], after[n]) for n in lora), "LoRA weights did not move"
    assert all(torch.equal(before[n], after[n]) for n in before if "lora_" not in n), "a frozen weight moved"

