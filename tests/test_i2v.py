"""Image-to-video (Wan 2.1 I2V and FLF2V) on tiny random pipelines: sampling equals diffusers'
``WanImageToVideoPipeline`` for the same noise and image, with and without guidance; the image is encoded once and
carried by the conditioning; text-to-video backbones and bad images are refused with one clear line."""

import json
from pathlib import Path

import lightning as L
import PIL.Image
import pytest
import torch

from lit_videoalign.backbones.base import Conditioning, VideoBackbone
from lit_videoalign.backbones.diffusers import DiffusersVideoBackbone
from lit_videoalign.data.video_folder import VideoFolderDataset
from lit_videoalign.objectives.grpo import GRPO
from lit_videoalign.objectives.sft import SFT
from lit_videoalign.testing import Brightness, tiny_wan_i2v_pipeline
from lit_videoalign.video_io import write_mp4

pytestmark = pytest.mark.usefixtures("ftfy_free_prompt_cleaning")  # its tests run WanImageToVideoPipeline

PROMPTS = ["a red ball falls", "a blue ball moves left"]
FRAMES, SIZE, LATENT = 9, 32, (16, 3, 4, 4)


@pytest.fixture(scope="module")
def i2v(tmp_path_factory) -> str:
    return str(tiny_wan_i2v_pipeline(tmp_path_factory.mktemp("i2v") / "pipe"))


@pytest.fixture(scope="module")
def backbone(i2v) -> DiffusersVideoBackbone:
    return DiffusersVideoBackbone(i2v)




def image(seed: int):
    """A random 8-bit RGB image as ``(1, 3, h, w)`` in [0, 1] and as the PIL image a pipeline user passes."""
    pixels = torch.randint(0, 256, (SIZE, SIZE, 3), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    return pixels.permute(2, 0, 1)[None].float() / 255, PIL.Image.fromarray(pixels.numpy())


def pipeline(path: str):
    from diffusers import WanImageToVideoPipeline

    pipe = WanImageToVideoPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("guidance_scale", [1.0, 4.0])
def test_sampling_equals_the_diffusers_i2v_pipeline(i2v, backbone, guidance_scale):
    img, pil = image(0)
    model = SFT(backbone, num_frames=FRAMES, height=SIZE, width=SIZE, num_inference_steps=2,
                guidance_scale=guidance_scale).eval()
    noise = torch.randn(2, *LATENT, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        cond = backbone.encode_images(img.expand(2, -1, -1, -1), backbone.encode_prompts(PROMPTS), num_frames=FRAMES)
        ours = model.sample_latents(noise, cond, sampler="pipeline")
    theirs = pipeline(i2v)(prompt=PROMPTS, negative_prompt="", image=pil, latents=noise, num_frames=FRAMES,
                           height=SIZE, width=SIZE, num_inference_steps=2, guidance_scale=guidance_scale,
                           output_type="latent").frames
    assert ours.shape == theirs.shape == (2, *LATENT)
    # float32 rounding only: measured max |diff| 6e-7 on latents of max |x| ~4.6 (torch 2.14.1, diffusers 0.42.1,
    # CPU); 1e-4 of the largest is ~100x that, and a conditioning left out moves the result by O(1) (test below).
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4 * theirs.abs().max().item())


@pytest.mark.parametrize("variant", ["flf2v", "no_image_encoder"])
def test_one_step_equals_the_pipeline_for_flf2v_and_without_an_image_encoder(variant, tmp_path):
    """FLF2V (first and last frame; image tokens of both) and an I2V transformer without image tokens (Wan 2.2 A14B's
    layout): one FlowMatchEuler step from sigma 1 is ``noise - v``."""
    path = str(tiny_wan_i2v_pipeline(tmp_path / variant, last_frame=variant == "flf2v",
                                     image_encoder=variant == "flf2v"))
    bb = DiffusersVideoBackbone(path)
    (first, first_pil), (last, last_pil) = image(2), image(3)
    extra = dict(last_image=last_pil) if variant == "flf2v" else {}
    with torch.no_grad():
        cond = bb.encode_images(first.expand(2, -1, -1, -1), bb.encode_prompts(PROMPTS), num_frames=FRAMES,
                                last_images=last.expand(2, -1, -1, -1) if variant == "flf2v" else None)
        noise = torch.randn(2, *LATENT, generator=torch.Generator().manual_seed(4))
        ours = noise - bb.predict_velocity(noise, 1.0, cond)
    theirs = pipeline(path)(prompt=PROMPTS, image=first_pil, latents=noise, num_frames=FRAMES, height=SIZE,
                            width=SIZE, num_inference_steps=1, guidance_scale=1.0, output_type="latent",
                            **extra).frames
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4 * theirs.abs().max().item())
    assert set(cond.extra) == ({"image_latents", "image_embeds"} if variant == "flf2v" else {"image_latents"})
    if variant == "flf2v":  # the mask marks pixel frame 0 (all 4 channels of latent frame 0) and the last frame
        mask = cond.extra["image_latents"][0, :4, :, 0, 0]  # (ft, t')
        assert mask.tolist() == [[1, 0, 0], [1, 0, 0], [1, 0, 0], [1, 0, 1]]
        with pytest.raises(ValueError, match="pass last_images"):
            bb.encode_images(first, bb.encode_prompts(PROMPTS[:1]), num_frames=FRAMES)


def test_the_image_conditions_the_video_and_travels_with_the_batch(backbone):
    cond = backbone.encode_prompts(PROMPTS)
    (a, _), (b, _) = image(5), image(6)
    with torch.no_grad():
        cond_a = backbone.encode_images(torch.cat([a, b]), cond, num_frames=FRAMES)
        cond_b = backbone.encode_images(torch.cat([b, a]), cond, num_frames=FRAMES)
        x = torch.randn(2, *LATENT, generator=torch.Generator().manual_seed(7))
        v_a, v_b = backbone.predict_velocity(x, 0.7, cond_a), backbone.predict_velocity(x, 0.7, cond_b)
        # Another image gives another velocity, sample by sample, far beyond rounding.
        for i in range(2):
            assert (v_a[i] - v_b[i]).abs().max() > 1e-2 * v_a[i].abs().max()
        # Groups, sub-batches and concatenations carry the images and their encodings with the prompt.
        group = cond_a.repeat_interleave(2)
        assert torch.equal(group.images, cond_a.images.repeat_interleave(2, dim=0))
        v_group = backbone.predict_velocity(x.repeat_interleave(2, dim=0), 0.7, group)
        torch.testing.assert_close(v_group[::2], v_a, rtol=0, atol=1e-5 * v_a.abs().max().item())
        swapped = Conditioning.cat([cond_a.index(slice(1, 2)), cond_a.index(slice(0, 1))])
        assert torch.equal(swapped.images, torch.cat([b, a]))
        torch.testing.assert_close(backbone.predict_velocity(x.flip(0), 0.7, swapped), v_a.flip(0), rtol=0,
                                   atol=1e-5 * v_a.abs().max().item())
    with pytest.raises(ValueError, match="only some have conditioning images"):
        Conditioning.cat([cond_a, cond])
    uncond = backbone.encode_prompts(["", ""]).with_images_from(cond_a)  # guidance's unconditional branch
    assert torch.equal(uncond.images, cond_a.images) and set(uncond.extra) == set(cond_a.extra)
    with pytest.raises(ValueError, match="needs conditioning images; call backbone.encode_images"):
        backbone.predict_velocity(x, 0.7, cond)


def test_text_to_video_backbones_refuse_images_in_one_line(tiny_pipeline):
    t2v = DiffusersVideoBackbone(tiny_pipeline, max_sequence_length=16)
    assert not t2v.supports_images and not VideoBackbone.supports_images
    img, _ = image(0)
    for bb in (t2v, VideoBackbone()):
        with pytest.raises(ValueError, match="is text-to-video only") as err:
            bb.encode_images(img, t2v.encode_prompts(PROMPTS[:1]), num_frames=FRAMES)
        assert type(bb).__name__ in str(err.value) and "\n" not in str(err.value)


def test_bad_images_are_refused_naming_the_problem(backbone, i2v, tmp_path):
    assert backbone.supports_images
    cond = backbone.encode_prompts(PROMPTS[:1])
    img, _ = image(0)
    bad = {
        "grayscale images": img[:, :1],
        "RGBA images": torch.cat([img, img[:, :1]], dim=1),
        "must be in \\[0, 1\\]": img * 2,
        "2 images for a conditioning batch of 1": torch.cat([img, img]),
        "must be floating point": (img * 255).to(torch.uint8),
        "height and width must be multiples of 8": img[..., :30, :30],
    }
    for message, images in bad.items():
        with pytest.raises(ValueError, match=message):
            backbone.encode_images(images, cond, num_frames=FRAMES)
    with pytest.raises(ValueError, match="num_frames must be 1 \\+ 4k"):
        backbone.encode_images(img, cond, num_frames=8)
    with pytest.raises(ValueError, match="takes one image per video"):
        backbone.encode_images(img, cond, num_frames=FRAMES, last_images=img)
    with torch.no_grad():
        short = backbone.encode_images(img, cond, num_frames=5)  # 2 latent frames, for latents of 3
    with pytest.raises(ValueError, match="encode the images with the video's num_frames"):
        backbone.predict_velocity(torch.randn(1, *LATENT), 0.5, short)
    with pytest.raises(ValueError, match="max_sequence_length must be 512"):
        DiffusersVideoBackbone(i2v, max_sequence_length=16)


def test_save_pretrained_keeps_the_image_encoder(backbone, tmp_path):
    out = backbone.save_pretrained(tmp_path / "saved")
    again = DiffusersVideoBackbone(str(out))
    img, _ = image(8)
    x = torch.randn(1, *LATENT)
    with torch.no_grad():
        conds = [bb.encode_images(img, bb.encode_prompts(PROMPTS[:1]), num_frames=FRAMES) for bb in (backbone, again)]
        v = [bb.predict_velocity(x, 0.5, c) for bb, c in zip((backbone, again), conds)]
    assert torch.equal(v[0], v[1])
    assert type(again.image_encoder).__name__ == "CLIPVisionModel"
    assert again.image_processor.crop_size == backbone.image_processor.crop_size


# -- training on I2V: unchanged apart from the data ---------------------------------------------------------------


def fit(model, loader, steps: int) -> L.Trainer:
    t = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    t.fit(model, train_dataloaders=loader)
    return t


@pytest.fixture(scope="module")
def video_folder(tmp_path_factory) -> Path:
    """Four 9x32x32 clips, each with a conditioning image (one 48x32, to be centre-cropped)."""
    root = tmp_path_factory.mktemp("i2v_videos")
    gen = torch.Generator().manual_seed(0)
    lines = []
    for i in range(4):
        write_mp4(torch.rand(FRAMES, 3, SIZE, SIZE, generator=gen), root / f"clip{i}.mp4")
        pixels = torch.randint(0, 256, (SIZE, 48 if i == 3 else SIZE, 3), generator=gen, dtype=torch.uint8)
        PIL.Image.fromarray(pixels.numpy()).save(root / f"first{i}.png")
        lines.append(json.dumps({"file_name": f"clip{i}.mp4", "prompt": PROMPTS[i % 2], "image": f"first{i}.png"}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_sft_on_i2v_data_moves_only_the_lora_weights(i2v, video_folder):
    with pytest.warns(UserWarning, match="1 of 4 conditioning images .* centre-cropped"):
        data = VideoFolderDataset(str(video_folder), FRAMES, SIZE, SIZE)
    item = data[3]
    assert item["image"].shape == (3, SIZE, SIZE) and 0 <= item["image"].min() <= item["image"].max() <= 1
    model = SFT(DiffusersVideoBackbone(i2v), lora_rank=4, num_frames=FRAMES, height=SIZE, width=SIZE,
                prompt_dropout=0.0, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    batch = torch.utils.data.default_collate([data[0], data[1]])
    gen = (lambda: torch.Generator().manual_seed(0))
    with torch.no_grad():  # the batch's image is in the loss: another image, another loss for the same noise
        losses = [model.loss(b, generator=gen()) for b in (batch, {**batch, "image": batch["image"].flip(0)})]
    assert (losses[0] - losses[1]).abs() > 1e-3 * losses[0]
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    fit(model, torch.utils.data.DataLoader(data, batch_size=2, shuffle=True), steps=2)
    after = dict(model.named_parameters())
    assert all(torch.isfinite(p).all() for p in after.values())
    assert any(not torch.equal(lora[n], after[n]) for n in lora), "LoRA weights did not move"
    assert all(torch.equal(frozen[n], after[n]) for n in frozen), "a frozen weight moved"


def test_first_frame_images_and_bad_manifests(video_folder, tmp_path):
    with pytest.raises(ValueError, match="name their own 'image'; use one"):
        VideoFolderDataset(str(video_folder), FRAMES, SIZE, SIZE, first_frame_image=True)
    root = tmp_path / "bad"
    root.mkdir()
    for name in ("clip0.mp4", "clip1.mp4"):
        (root / name).write_bytes((video_folder / name).read_bytes())
    plain = [{"file_name": "clip0.mp4", "prompt": "a"}, {"file_name": "clip1.mp4", "prompt": "b"}]

    def manifest(*images):
        (root / "metadata.jsonl").write_text("\n".join(json.dumps({**e, **({"image": i} if i else {})})
                                                      for e, i in zip(plain, images)) + "\n")

    manifest(None, None)  # no images: each clip's first frame, by the option
    first = VideoFolderDataset(str(root), FRAMES, SIZE, SIZE, first_frame_image=True)
    assert torch.equal(first[1]["image"], first[1]["video"][0])
    assert "image" not in VideoFolderDataset(str(root), FRAMES, SIZE, SIZE)[0]
    PIL.Image.new("L", (SIZE, SIZE)).save(root / "gray.png")
    PIL.Image.new("RGBA", (SIZE, SIZE)).save(root / "rgba.png")
    PIL.Image.new("RGB", (SIZE, SIZE)).save(root / "rgb.png")
    (root / "text.png").write_text("not an image")
    bad = {("gray.png", "rgb.png"): "gray.png is grayscale; conditioning images must be RGB",
           ("rgb.png", "rgba.png"): "rgba.png is RGBA; conditioning images must be RGB",
           ("text.png", "rgb.png"): "text.png does not decode as an image",
           ("rgb.png", "none.png"): "image file 'none.png' not found",
           ("rgb.png", "../clip0.mp4"): "escapes the dataset root",
           ("rgb.png", None): "1 of 2 entries .* name an 'image' and the others do not"}
    for images, message in bad.items():
        manifest(*images)
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            VideoFolderDataset(str(root), FRAMES, SIZE, SIZE)


def test_grpo_rollouts_condition_on_the_image_and_train(i2v):
    model = GRPO(DiffusersVideoBackbone(i2v), reward=Brightness(), lora_rank=4, group_size=2, num_sampling_steps=2,
                 num_inference_steps=2, rollout_guidance_scale=3.0, num_frames=FRAMES, height=SIZE, width=SIZE,
                 optimizer=lambda p: torch.optim.AdamW(p, lr=3e-2))
    (a, _), (b, _) = image(10), image(11)
    seeded = (lambda: torch.Generator().manual_seed(0))
    runs = [model.rollout(PROMPTS[:1], generator=seeded(), images=x).latents for x in (a, a, b)]
    assert torch.equal(runs[0], runs[1])  # the same image and seed: the same rollouts
    assert (runs[0][:, -1] - runs[2][:, -1]).abs().max() > 1e-2 * runs[0][:, -1].abs().max()  # another image
    loader = torch.utils.data.DataLoader([{"prompt": PROMPTS[0], "image": a[0]}, {"prompt": PROMPTS[1], "image": b[0]}],
                                         batch_size=2)
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    t = fit(model, loader, steps=1)
    assert t.callback_metrics["train/ratio_first_max_dev"] < 1e-4  # the recorded steps replay with their images
    assert any(not torch.equal(lora[n], p) for n, p in model.named_parameters() if "lora_" in n)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_generate_cli_conditions_on_images_and_refuses_bad_ones(i2v, tmp_path, monkeypatch):
    from lit_videoalign.cli import main
    from lit_videoalign.errors import UsageError
    from lit_videoalign.video_io import read_video

    monkeypatch.chdir(Path(__file__).resolve().parent.parent)
    bb = "--model.init_args.backbone.init_args."
    common = ["generate", "--config", "configs/wan2.1-i2v-14b/sft_lora.yaml",
              f"{bb}pretrained_model_name_or_path={i2v}", f"{bb}torch_dtype=float32", f"{bb}frozen_dtype=float32",
              "--model.init_args.num_frames=9", "--model.init_args.height=32", "--model.init_args.width=32",
              "--model.init_args.lora_rank=4", "--num_inference_steps", "2", "--gif", "false", "--device", "cpu"]
    files = []
    for seed in (0, 1):
        path = tmp_path / f"image{seed}.png"
        image(seed)[1].save(path)
        files.append(str(path))
    outs = {}
    for name, images in (("a", [files[0]]), ("a_again", [files[0], files[0]]), ("b", [files[1]])):
        outs[name] = tmp_path / name
        main([*common, "--prompts", "a red ball falls", "a red ball falls", "--seeds", "3", "3", "--images", *images,
              "--output_dir", str(outs[name])])
    videos = {k: [read_video(p) for p in sorted(v.glob("*.mp4"))] for k, v in outs.items()}
    assert len(videos["a"]) == 2 and torch.equal(videos["a"][0], videos["a"][1])  # one image for both prompts
    assert torch.equal(videos["a"][0], videos["a_again"][0])  # the same as naming it once per prompt
    assert not torch.equal(videos["a"][0], videos["b"][0])  # another image, another video
    grey = tmp_path / "grey.png"
    PIL.Image.new("L", (SIZE, SIZE)).save(grey)
    for images, message in (([files[0]] * 3, "got 3 --images for 2 prompts"), ([str(grey)], "grayscale"),
                            ([str(tmp_path / "missing.png")], "no image file")):
        with pytest.raises((UsageError, SystemExit)) as err:
            main([*common, "--prompts", "a", "b", "--images", *images, "--output_dir", str(tmp_path / "bad")])
        assert message in str(err.value) or message in str(getattr(err.value, "__context__", ""))
    assert not (tmp_path / "bad").exists()


def test_the_sample_logger_samples_from_its_images(i2v, tmp_path):
    from lit_videoalign.callbacks.video_sample_logger import VideoSampleLogger

    model = SFT(DiffusersVideoBackbone(i2v), num_frames=FRAMES, height=SIZE, width=SIZE, num_inference_steps=2)
    files = []
    for seed in (0, 1):
        files.append(tmp_path / f"image{seed}.png")
        image(seed)[1].save(files[-1])
    videos = [VideoSampleLogger(prompts=PROMPTS, seeds=[0, 0], images=[str(f)]).generate(model) for f in files]
    assert not torch.equal(videos[0], videos[1])  # another image, other samples
    with pytest.raises(ValueError, match="got 3 images for 2 prompts"):
        VideoSampleLogger(prompts=PROMPTS, images=[str(files[0])] * 3)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        VideoSampleLogger(prompts=PROMPTS, images=[str(tmp_path / "missing.png")])


class SeesReferences(Brightness):
    """Brightness that records the references each call was given."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list = []

    def forward(self, videos, prompts=None, references=None):
        self.seen.append(None if references is None else references.clone())
        return super().forward(videos, prompts, references)


@pytest.mark.parametrize("objective", ["grpo", "nft"])
def test_rollout_rewards_score_against_the_conditioning_images(i2v, objective):
    """A reward that compares against a reference (identity) gets each rollout's conditioning image, in both scoring
    modes (in turn and in the background, chunk by chunk)."""
    from lit_videoalign.objectives.nft import DiffusionNFT

    (a, _), (b, _) = image(10), image(11)
    images = torch.cat([a, b])
    for chunked in ({}, {"async_scoring": True, "rollout_chunk_size": 1}):
        reward = SeesReferences()
        cls = GRPO if objective == "grpo" else DiffusionNFT
        model = cls(DiffusersVideoBackbone(i2v), reward=reward, lora_rank=4, group_size=2, num_sampling_steps=2,
                    num_frames=FRAMES, height=SIZE, width=SIZE, **chunked)
        model.rollout(PROMPTS, generator=torch.Generator().manual_seed(0), images=images)
        seen = torch.cat(reward.seen)
        assert torch.equal(seen, images.repeat_interleave(2, dim=0))  # each sample of a group: its prompt's image
        assert len(reward.seen) == (2 if chunked else 1)


def test_inference_and_candidate_rewards_score_against_the_conditioning_images(i2v):
    """Best-of-N, noise search, reward guidance, online DPO pairs and rejection-SFT candidates give the reward each
    sample's conditioning image as its reference; a reward that requires references is then accepted."""
    from lit_videoalign import inference
    from lit_videoalign.objectives.dpo import DPO
    from lit_videoalign.objectives.rejection_sft import RejectionSFT

    (a, _), (b, _) = image(10), image(11)
    images = torch.cat([a, b])
    video = dict(num_frames=FRAMES, height=SIZE, width=SIZE, num_inference_steps=2)
    model = SFT(DiffusersVideoBackbone(i2v), **video)

    class NeedsReferences(SeesReferences):
        requires_references = True

    runs = {"best_of_n": lambda r: inference.best_of_n(model, PROMPTS, r, 2, [0, 1], images=images),
            "noise_search": lambda r: inference.noise_search(model, PROMPTS, r, 8, [0, 1], population=2,
                                                             images=images),
            "reward_guidance": lambda r: inference.reward_guided_sample(model, PROMPTS, r, [0, 1], scale=0.5,
                                                                        images=images)}
    for name, run in runs.items():
        reward = NeedsReferences()
        run(reward)
        assert reward.seen and all(s is not None for s in reward.seen), name
        for seen in reward.seen:  # every call's references are images of the prompts scored, in their order
            assert all(any(torch.equal(row, img) for img in images) for row in seen), name
    with pytest.raises(ValueError, match="requires references"):
        inference.best_of_n(model, PROMPTS, NeedsReferences(), 2, [0, 1])
    dpo = DPO(DiffusersVideoBackbone(i2v), reward=SeesReferences(), lora_rank=4, num_candidates=2, candidate_steps=2,
              **video)
    dpo.build_pairs(PROMPTS, images=images)
    rejection = RejectionSFT(DiffusersVideoBackbone(i2v), reward=SeesReferences(), lora_rank=4, num_candidates=2,
                             candidate_steps=2, **video)
    rejection.refresh(PROMPTS, images=images)
    for module in (dpo, rejection):
        assert torch.equal(torch.cat(module.reward.seen), images.repeat_interleave(2, dim=0)), type(module).__name__


def test_a_text_to_video_model_widens_into_an_image_to_video_one_that_starts_equal(tmp_path, tiny_pipeline):
    """``i2v_init`` adds the image channels with zero weights: the widened model takes images (pixel space too, as
    the toy base) and predicts exactly what the text-to-video model did; bad sources are refused in one line."""
    from lit_videoalign.backbones.i2v_init import main as widen
    from lit_videoalign.errors import UsageError

    for source, name in (("builtin:toyworld-base", "toy"), (tiny_pipeline, "wan")):
        out = widen([source, str(tmp_path / name)])
        t2v, i2v = (DiffusersVideoBackbone(p, max_sequence_length=16) for p in (source, str(out)))
        assert not t2v.supports_images and i2v.supports_images
        assert i2v.denoiser.config.in_channels == t2v.denoiser.config.in_channels + (4 if name == "toy" else 20)
        shape = i2v.latent_shape(FRAMES if name == "wan" else 16, SIZE, SIZE)
        x, sigma = torch.randn(1, *shape, generator=torch.Generator().manual_seed(0)), torch.tensor([0.6])
        cond = t2v.encode_prompts(PROMPTS[:1])
        with torch.no_grad():
            plain = t2v.predict_velocity(x, sigma, cond)
            widened = i2v.predict_velocity(x, sigma, i2v.encode_images(image(0)[0], cond, num_frames=shape[1]
                                                                        if name == "toy" else FRAMES))
        assert torch.equal(plain, widened), name
    for source, message in ((str(tmp_path / "toy"), "already takes"), ("builtin:toyworld-base", "exists")):
        with pytest.raises(UsageError, match=message):
            widen([source, str(tmp_path / ("again" if message == "already takes" else "toy"))])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # nothing half-written left behind
