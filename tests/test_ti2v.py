"""Wan 2.2 TI2V-5B (one model for text- and image-to-video, ``expand_timesteps``) on a tiny random pipeline: sampling
equals diffusers' ``WanPipeline`` (text) and ``WanImageToVideoPipeline`` (image) for the same noise, with and without
guidance; frame 0 stays on the straight path to the image's latents, so it lands on them and carries no training loss
or gradient; LoRA SFT on first-frame data trains the adapter alone."""

import json
import shutil

import lightning as L
import PIL.Image
import pytest
import torch

from lit_videoalign.backbones.diffusers import DiffusersVideoBackbone
from lit_videoalign.data.video_folder import VideoFolderDataset
from lit_videoalign.objectives.sft import SFT
from lit_videoalign.schedules.flow import add_noise, velocity_target
from lit_videoalign.testing import tiny_wan22_ti2v_pipeline, tiny_wan_i2v_pipeline
from lit_videoalign.video_io import write_mp4

pytestmark = pytest.mark.usefixtures("ftfy_free_prompt_cleaning")  # its tests run WanImageToVideoPipeline

PROMPTS = ["a red ball falls", "a blue ball moves left"]
FRAMES, SIZE, LATENT = 9, 64, (48, 3, 4, 4)  # 16x16 pixels per latent, 2x2 latents per token: 2x2 tokens a frame
TEXT = 16  # prompt tokens (TI2V takes no image tokens, so any length works)


@pytest.fixture(scope="module")
def ti2v(tmp_path_factory) -> str:
    return str(tiny_wan22_ti2v_pipeline(tmp_path_factory.mktemp("ti2v") / "pipe"))


@pytest.fixture(scope="module")
def backbone(ti2v) -> DiffusersVideoBackbone:
    return DiffusersVideoBackbone(ti2v, max_sequence_length=TEXT)




def image(seed: int):
    """A random 8-bit RGB image as ``(1, 3, h, w)`` in [0, 1] and as the PIL image a pipeline user passes."""
    pixels = torch.randint(0, 256, (SIZE, SIZE, 3), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    return pixels.permute(2, 0, 1)[None].float() / 255, PIL.Image.fromarray(pixels.numpy())


def diffusers_latents(path: str, mode: str, pil, noise, steps: int, guidance_scale: float):
    from diffusers import WanImageToVideoPipeline, WanPipeline

    pipe = (WanImageToVideoPipeline if mode == "i2v" else WanPipeline).from_pretrained(path)
    assert pipe.config.expand_timesteps
    pipe.set_progress_bar_config(disable=True)
    extra = dict(image=pil) if mode == "i2v" else {}
    return pipe(prompt=PROMPTS, negative_prompt="", latents=noise, num_frames=FRAMES, height=SIZE, width=SIZE,
                num_inference_steps=steps, guidance_scale=guidance_scale, max_sequence_length=TEXT,
                output_type="latent", **extra).frames


def sample(backbone, noise, mode: str, img, steps: int, guidance_scale: float, sampler: str = "pipeline"):
    model = SFT(backbone, num_frames=FRAMES, height=SIZE, width=SIZE, num_inference_steps=steps,
                guidance_scale=guidance_scale).eval()
    with torch.no_grad():
        cond = backbone.encode_prompts(PROMPTS)
        if mode == "i2v":
            cond = backbone.encode_images(img.expand(2, -1, -1, -1), cond, num_frames=FRAMES)
        return model.sample_latents(noise, cond, sampler=sampler), cond


@pytest.mark.parametrize("guidance_scale", [1.0, 4.0])
@pytest.mark.parametrize("mode", ["t2v", "i2v"])
def test_sampling_equals_the_diffusers_pipelines(ti2v, backbone, mode, guidance_scale):
    assert backbone.supports_images
    img, pil = image(0)
    noise = torch.randn(2, *LATENT, generator=torch.Generator().manual_seed(1))
    ours, cond = sample(backbone, noise, mode, img, 3, guidance_scale)
    theirs = diffusers_latents(ti2v, mode, pil, noise, 3, guidance_scale)
    assert ours.shape == theirs.shape == (2, *LATENT)
    # Float32 rounding only, frame 0 included: measured max |diff| 0 (t2v) and 5e-7 / 1.9e-6 (i2v without / with
    # guidance) on latents of max |x| ~4.9 (torch 2.14.1, diffusers 0.42.1, CPU); 1e-4 of the largest is ~250x that.
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4 * theirs.abs().max().item())
    if mode == "i2v":  # the pipeline overwrites frame 0 with the image's latents; ours lands there by itself
        first = cond.extra["image_latents_first"]
        assert set(cond.extra) == {"image_latents_first"} and first.shape == (2, 48, 1, 4, 4)
        torch.testing.assert_close(ours[:, :, :1], first, rtol=0, atol=1e-5 * first.abs().max().item())
        t2v, _ = sample(backbone, noise, "t2v", img, 3, guidance_scale)
        assert (ours[:, :, 1:] - t2v[:, :, 1:]).abs().max() > 0.1  # the image conditions the later frames


def test_with_the_real_unipc_scheduler_frame_0_stays_within_its_timestep_rounding(ti2v, tmp_path):
    """Wan 2.2 TI2V ships UniPC (``flow_shift`` 5), whose model timesteps are integers: frames 1.. equal the pipeline's,
    and frame 0 (which the pipeline overwrites with the image's latents ``c``) ends within ~1e-3 |noise - c| of ``c``
    (the model's sigma is up to 1e-3 off the scheduler's; see ``WanFamily._call_ti2v``)."""
    from diffusers import UniPCMultistepScheduler

    path = tmp_path / "unipc"
    shutil.copytree(ti2v, path)
    shutil.rmtree(path / "scheduler")
    UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0, solver_order=2,
                            final_sigmas_type="zero", lower_order_final=True).save_pretrained(path / "scheduler")
    index = json.loads((path / "model_index.json").read_text())
    (path / "model_index.json").write_text(json.dumps({**index, "scheduler": ["diffusers", "UniPCMultistepScheduler"]}))
    img, pil = image(0)
    noise = torch.randn(2, *LATENT, generator=torch.Generator().manual_seed(1))
    ours, cond = sample(DiffusersVideoBackbone(str(path), max_sequence_length=TEXT), noise, "i2v", img, 4, 4.0)
    theirs = diffusers_latents(str(path), "i2v", pil, noise, 4, 4.0)
    # frames 1..: measured max |diff| 1.9e-6 on |x| ~4.9; frame 0: 3.4e-3 from c, with max |noise - c| 3.7
    torch.testing.assert_close(ours[:, :, 1:], theirs[:, :, 1:], rtol=0, atol=1e-4 * theirs.abs().max().item())
    first = cond.extra["image_latents_first"]
    torch.testing.assert_close(ours[:, :, :1], first, rtol=0, atol=2e-3 * (noise[:, :, :1] - first).abs().max().item())


def test_euler_keeps_frame_0_on_the_straight_path_and_lands_on_the_image(backbone):
    img, _ = image(2)
    noise = torch.randn(2, *LATENT, generator=torch.Generator().manual_seed(3))
    ours, cond = sample(backbone, noise, "i2v", img, 4, 4.0, sampler="euler")
    first = cond.extra["image_latents_first"]  # (2, 48, 1, 4, 4)
    # Exactly, up to float32 rounding: measured 3e-8 on max |c| ~1.0.
    torch.testing.assert_close(ours[:, :, :1], first, rtol=0, atol=1e-6 * first.abs().max().item())
    with torch.no_grad():  # one Euler step from sigma 1 to 0.25 puts frame 0 at 0.75 c + 0.25 noise
        x = noise + (0.25 - 1.0) * backbone.predict_velocity(noise, 1.0, cond)
    torch.testing.assert_close(x[:, :, :1], 0.75 * first + 0.25 * noise[:, :, :1], rtol=0, atol=1e-5)
    assert (x[:, :, 1:] - (0.75 * first + 0.25 * noise[:, :, 1:])).abs().max() > 0.1  # later frames: the model's


@pytest.fixture(scope="module")
def video_folder(tmp_path_factory):
    """Two 9x64x64 clips, each conditioned on its own first frame."""
    root = tmp_path_factory.mktemp("ti2v_videos")
    gen = torch.Generator().manual_seed(0)
    lines = []
    for i in range(2):
        write_mp4(torch.rand(FRAMES, 3, SIZE, SIZE, generator=gen), root / f"clip{i}.mp4")
        lines.append(json.dumps({"file_name": f"clip{i}.mp4", "prompt": PROMPTS[i]}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return VideoFolderDataset(str(root), FRAMES, SIZE, SIZE, first_frame_image=True)


def test_frame_0_carries_no_loss_and_no_gradient_when_the_image_is_the_first_frame(ti2v, video_folder):
    bb = DiffusersVideoBackbone(ti2v, max_sequence_length=TEXT)
    batch = torch.utils.data.default_collate([video_folder[0], video_folder[1]])
    assert torch.equal(batch["image"], batch["video"][:, 0])
    with torch.no_grad():
        x0 = bb.encode_videos(batch["video"])  # (2, 48, 3, 4, 4)
        cond = bb.encode_images(batch["image"], bb.encode_prompts(PROMPTS), num_frames=FRAMES)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(4))
    sigma = torch.tensor([0.3, 0.8])
    pred = bb.predict_velocity(add_noise(x0, noise, sigma), sigma, cond)
    error = (pred - velocity_target(x0, noise)) ** 2  # the flow-matching loss, element by element
    # Frame 0: float32 rounding of the VAE and the straight path (measured 3e-15 against 1.5 on the other frames).
    assert error[:, :, :1].mean() < 1e-8 * error[:, :, 1:].mean()
    error[:, :, :1].sum().backward(retain_graph=True)
    grads = [p.grad for p in bb.denoiser.parameters() if p.requires_grad]
    assert grads and all(g is None or not g.any() for g in grads), "frame 0's loss reached the transformer"
    error[:, :, 1:].sum().backward()
    assert any(p.grad is not None and p.grad.any() for p in bb.denoiser.parameters())  # the others do


def test_sft_lora_on_first_frame_data_moves_only_the_lora_weights(ti2v, video_folder):
    model = SFT(DiffusersVideoBackbone(ti2v, max_sequence_length=TEXT), lora_rank=4, num_frames=FRAMES, height=SIZE,
                width=SIZE, prompt_dropout=0.0, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0).fit(
        model, torch.utils.data.DataLoader(video_folder, batch_size=2))
    after = dict(model.named_parameters())
    assert all(torch.isfinite(p).all() for p in after.values())
    assert any(not torch.equal(lora[n], after[n]) for n in lora), "LoRA weights did not move"
    assert all(torch.equal(frozen[n], after[n]) for n in frozen), "a frozen weight moved"


def test_bad_ti2v_input_and_pipelines_are_refused_in_one_line(ti2v, backbone, tmp_path):
    img, _ = image(0)
    cond = backbone.encode_prompts(PROMPTS[:1])
    with pytest.raises(ValueError, match="first frame only; got last_images"):
        backbone.encode_images(img, cond, num_frames=FRAMES, last_images=img)
    with pytest.raises(ValueError, match="height and width must be multiples of 16"):
        backbone.encode_images(img[..., :56, :56], cond, num_frames=FRAMES)
    with torch.no_grad():
        small = backbone.encode_images(img[..., :32, :32], cond, num_frames=FRAMES)
    with pytest.raises(ValueError, match="encode the images at the video's height and width"):
        backbone.predict_velocity(torch.randn(1, *LATENT), 0.5, small)
    out = backbone.save_pretrained(tmp_path / "saved")  # the export stays a TI2V pipeline
    assert json.loads((out / "model_index.json").read_text())["expand_timesteps"] is True
    i2v = tiny_wan_i2v_pipeline(tmp_path / "i2v", image_encoder=False)  # Wan 2.1 I2V channels with expand_timesteps
    index = json.loads((i2v / "model_index.json").read_text())
    (i2v / "model_index.json").write_text(json.dumps({**index, "expand_timesteps": True}))
    with pytest.raises(ValueError, match="takes no image channels") as err:
        DiffusersVideoBackbone(str(i2v), max_sequence_length=TEXT)
    assert "\n" not in str(err.value)
