"""Image-to-video for DiffusionNFT (nft and awm), Flow-DPO (offline pairs and online candidates) and rejection-SFT on a
tiny random Wan 2.1 I2V pipeline: each trains unchanged apart from the data (finite, LoRA weights move, frozen ones do
not), its samples or loss depend on the batch's image, and the prompt and preference data modules serve images or
refuse bad ones in one error."""

import dataclasses
import json
import math
from pathlib import Path

import lightning as L
import PIL.Image
import pytest
import torch

from lit_videoalign.backbones.diffusers import DiffusersVideoBackbone
from lit_videoalign.data.preference import PreferenceDataModule, PreferenceDataset
from lit_videoalign.data.prompts import PromptFileDataModule
from lit_videoalign.objectives.dpo import DPO, PairPool
from lit_videoalign.objectives.nft import DiffusionNFT
from lit_videoalign.objectives.rejection_sft import RejectionSFT
from lit_videoalign.testing import Brightness, tiny_wan_i2v_pipeline
from lit_videoalign.video_io import write_mp4

PROMPTS = ["a red ball falls", "a blue ball moves left"]
FRAMES, SIZE = 9, 32
VIDEO = dict(num_frames=FRAMES, height=SIZE, width=SIZE)


@pytest.fixture(scope="module")
def i2v(tmp_path_factory) -> str:
    return str(tiny_wan_i2v_pipeline(tmp_path_factory.mktemp("i2v_objectives") / "pipe"))


def image(seed: int, width: int = SIZE) -> torch.Tensor:
    """A random 8-bit RGB image ``(1, 3, SIZE, width)`` in [0, 1]."""
    pixels = torch.randint(0, 256, (3, SIZE, width), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    return pixels[None].float() / 255


def save_png(img: torch.Tensor, path: Path) -> None:
    PIL.Image.fromarray((img[0] * 255).round().byte().permute(1, 2, 0).numpy()).save(path)


def snapshot(model) -> tuple[dict, dict]:
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    return lora, frozen


def fit_and_check(model, loader, steps: int = 2) -> L.Trainer:  # loader: a DataLoader or a data module
    """``steps`` optimizer steps; then every weight is finite, a trained LoRA weight moved and no frozen one did."""
    lora, frozen = snapshot(model)
    t = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    t.fit(model, loader)
    after = dict(model.named_parameters())
    assert t.global_step == steps
    assert all(torch.isfinite(p).all() for p in after.values())
    assert any(not torch.equal(lora[n], after[n]) for n in lora if ".default" in n), "LoRA weights did not move"
    assert all(torch.equal(frozen[n], after[n]) for n in frozen), "a frozen weight moved"
    return t


def far(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``a`` and ``b`` differ far beyond float32 rounding (1 % of ``a``'s largest value)."""
    return bool((a - b).abs().max() > 1e-2 * a.abs().max())


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory) -> Path:
    """A JSONL prompt file naming a conditioning image per prompt (one 48x32, to be centre-cropped)."""
    root = tmp_path_factory.mktemp("i2v_prompts")
    for i, width in enumerate((SIZE, 48)):
        save_png(image(20 + i, width), root / f"first{i}.png")
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p, "image": f"first{i}.png"}) + "\n"
                                                for i, p in enumerate(PROMPTS)))
    return root / "prompts.jsonl"


def prompt_module(prompt_file, batch_size=1) -> PromptFileDataModule:
    return PromptFileDataModule(str(prompt_file), batch_size=batch_size, height=SIZE, width=SIZE)


# -- DiffusionNFT ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss_type, sampler", [("nft", "model"), ("awm", "sde")])
def test_nft_rollouts_condition_on_the_image_and_train(i2v, prompt_file, loss_type, sampler):
    model = DiffusionNFT(DiffusersVideoBackbone(i2v), reward=Brightness(), loss_type=loss_type, sampler=sampler,
                         lora_rank=4,
                         group_size=2, num_sampling_steps=2, rollout_guidance_scale=3.0, **VIDEO,
                         optimizer=lambda p: torch.optim.AdamW(p, lr=3e-2))
    a, b = image(10), image(11)
    seeded = (lambda: torch.Generator().manual_seed(0))
    runs = [model.rollout(PROMPTS[:1], generator=seeded(), images=x) for x in (a, a, b)]
    assert torch.equal(runs[0].latents, runs[1].latents)  # the same image and seed: the same rollouts
    assert far(runs[0].latents, runs[2].latents)  # another image, other rollouts (guided: uncond keeps the image)
    assert torch.equal(runs[0].cond.images, a.expand(2, -1, -1, -1))  # the whole group, and the update, see it
    losses = []
    for cond in (runs[0].cond, runs[2].cond):  # the same samples, sigmas and noise under another image
        torch.manual_seed(1)
        with torch.no_grad():
            losses.append(model.loss(dataclasses.replace(runs[0], cond=cond), torch.arange(2))[0])
    assert (losses[0] - losses[1]).abs() > 1e-3 * losses[0].abs()
    fit_and_check(model, prompt_module(prompt_file))


# -- Flow-DPO ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pair_folder(tmp_path_factory) -> Path:
    """Four pairs of 9x32x32 clips (brighter chosen), each with a conditioning image."""
    root = tmp_path_factory.mktemp("i2v_pairs")
    gen = torch.Generator().manual_seed(0)
    lines = []
    for i in range(4):
        write_mp4(0.5 + 0.5 * torch.rand(FRAMES, 3, SIZE, SIZE, generator=gen), root / f"w{i}.mp4")
        write_mp4(0.5 * torch.rand(FRAMES, 3, SIZE, SIZE, generator=gen), root / f"l{i}.mp4")
        save_png(image(30 + i), root / f"first{i}.png")
        lines.append({"prompt": PROMPTS[i % 2], "chosen": f"w{i}.mp4", "rejected": f"l{i}.mp4",
                      "image": f"first{i}.png", "tie": i == 3})
    (root / "pairs.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines))
    return root


def make_dpo(i2v, **kwargs) -> DPO:
    return DPO(DiffusersVideoBackbone(i2v), lora_rank=4, beta=1000.0, num_inference_steps=2, **VIDEO,
               optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2), **kwargs)


def test_offline_dpo_conditions_each_pair_on_its_image_and_trains(i2v, pair_folder):
    data = PreferenceDataset(pair_folder, **VIDEO)
    batch = torch.utils.data.default_collate([data[i] for i in (0, 1, 3)])  # the third pair is a tie
    assert batch["image"].shape == (3, 3, SIZE, SIZE)
    model = make_dpo(i2v)
    pairs = model.batch_pairs(batch)
    images, frames = model.pair_images(batch)
    assert len(pairs[0]) == 2 and frames == FRAMES and torch.equal(images, batch["image"][:2])  # the tie is dropped
    gen = (lambda: torch.Generator().manual_seed(0))
    with torch.no_grad():  # another image, another loss for the same pairs and noise
        losses = [model.pair_loss(*pairs[:4], gen(), x, frames)[1]["policy_err_w"] for x in (images, images.flip(0))]
    assert (losses[0] - losses[1]).abs() > 1e-3 * losses[0]
    fit_and_check(model, PreferenceDataModule(str(pair_folder), **VIDEO, batch_size=2))


def test_online_dpo_candidates_condition_on_the_image_and_train(i2v, prompt_file):
    model = make_dpo(i2v, reward=Brightness(), num_candidates=2, pool_seed=3, generate_with="reference",
                     candidate_guidance_scale=3.0, candidate_steps=2)
    a, b = image(40), image(41)
    winners = []
    for x in (a, b):  # the same noise, another image: other candidates
        model.pool, model.pool_generator = PairPool(8), torch.Generator().manual_seed(3)
        assert model.build_pairs(PROMPTS[:1], x)["new_pairs"] == 1
        assert torch.equal(model.pool.images, x)  # the pair keeps its image for the updates
        winners.append(model.pool.winners)
    assert far(winners[0], winners[1])
    with pytest.raises(ValueError, match="one image per pair, or none"):
        model.pool.add(winners[0], winners[0], PROMPTS[:1], torch.ones(1), torch.ones(1))
    model.pool.add(winners[0], winners[0], PROMPTS[:1], torch.ones(1), torch.ones(1), a)
    restored = PairPool(1)  # checkpoints keep the images, the newest with their pairs
    restored.load_state_dict(model.pool.state_dict())
    assert torch.equal(restored.images, a) and torch.equal(restored.winners, winners[0])
    model.hparams.generate_with = "policy"  # the policy's own sampler (guided) conditions on the image too
    model.pool = PairPool(8)
    fit_and_check(model, prompt_module(prompt_file, batch_size=2))
    assert model.pool.images is not None and len(model.pool.images) == len(model.pool)


# -- rejection-SFT -----------------------------------------------------------------------------------------------------
def test_rejection_sft_generates_from_the_image_and_fine_tunes_on_it(i2v, prompt_file):
    model = RejectionSFT(DiffusersVideoBackbone(i2v), reward=Brightness(), num_candidates=2, generate_every=1,
                         top_fraction=0.5, min_feature_distance=0.0, candidate_steps=2, candidate_guidance_scale=3.0,
                         lora_rank=4, **VIDEO, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    a, b = image(50), image(51)
    latents = []
    for x in (a, b):
        model.clear_buffer()
        torch.manual_seed(0)  # the candidates' seeds
        model.refresh(PROMPTS[:1], x)
        assert model.buffer_len == 1 and torch.equal(model.buffer_images, x)
        latents.append(model.buffer_latents)
    assert far(latents[0], latents[1])
    state: dict = {}
    model.on_save_checkpoint(state)
    model.clear_buffer()
    model.on_load_checkpoint(state)
    assert torch.equal(model.buffer_images, b) and torch.equal(model.buffer_latents, latents[1])
    with pytest.raises(ValueError, match="with and without conditioning images"):
        model._append(latents[0][0], PROMPTS[0], 0.0, model.buffer_features[0])
    model.clear_buffer()
    fit_and_check(model, prompt_module(prompt_file))
    assert model.buffer_images is not None and len(model.buffer_images) == model.buffer_len


# -- data modules ------------------------------------------------------------------------------------------------------
def test_prompt_files_serve_images_at_the_model_size_or_their_own(prompt_file, tmp_path):
    module = prompt_module(prompt_file, batch_size=2)
    module.setup("fit")
    item = module.train_set[1]  # 48x32, centre-cropped and resized
    assert item["prompt"] == PROMPTS[1] and item["image"].shape == (3, SIZE, SIZE)
    assert 0 <= item["image"].min() <= item["image"].max() <= 1
    batch = next(iter(module.train_dataloader()))
    assert batch["image"].shape == (2, 3, SIZE, SIZE)
    # Without a size, images keep their own (one size for the file); plain text files hold no images.
    save_png(image(1), tmp_path / "a.png")
    (tmp_path / "own.jsonl").write_text(json.dumps({"prompt": "x", "image": "a.png"}) + "\n")
    native = PromptFileDataModule(str(tmp_path / "own.jsonl"))
    native.setup("fit")
    assert torch.allclose(native.train_set[0]["image"], image(1)[0], atol=1 / 255)
    with pytest.raises(ValueError, match="differ in size .*set height and width"):
        PromptFileDataModule(str(prompt_file)).setup("fit")
    (tmp_path / "plain.txt").write_text("a\nb\n")
    plain = PromptFileDataModule(str(tmp_path / "plain.txt"))
    plain.setup("fit")
    assert plain.train_set[0] == {"prompt": "a"}


def bad_files(root: Path) -> dict[str, str]:
    """Images that cannot condition a video, by name, and the error each gives."""
    PIL.Image.new("L", (SIZE, SIZE)).save(root / "gray.png")
    PIL.Image.new("RGBA", (SIZE, SIZE)).save(root / "rgba.png")
    save_png(image(2), root / "rgb.png")
    (root / "text.png").write_text("not an image")
    return {"gray.png": "gray.png is grayscale; conditioning images must be RGB",
            "rgba.png": "rgba.png is RGBA; conditioning images must be RGB",
            "text.png": "text.png does not decode as an image",
            "none.png": "image file 'none.png' not found",
            "../x.png": "escapes the dataset root",
            None: "name an 'image' and the others do not|but .* has one; give every pair a conditioning image or none"}


def test_prompt_files_refuse_bad_images_in_one_error(tmp_path):
    for name, message in bad_files(tmp_path).items():
        lines = [{"prompt": "a", "image": "rgb.png"}, {"prompt": "b", **({"image": name} if name else {})}]
        (tmp_path / "p.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines))
        with pytest.raises(ValueError, match=message) as err:
            PromptFileDataModule(str(tmp_path / "p.jsonl"), height=SIZE, width=SIZE).setup("fit")
        assert "\n" not in str(err.value)


def test_preference_manifests_refuse_bad_images_in_one_error(pair_folder, tmp_path):
    for name in ("w0.mp4", "l0.mp4"):
        (tmp_path / name).write_bytes((pair_folder / name).read_bytes())
    for name, message in bad_files(tmp_path).items():
        lines = [{"prompt": p, "chosen": "w0.mp4", "rejected": "l0.mp4", **({"image": i} if i else {})}
                 for p, i in (("a", "rgb.png"), ("b", name))]
        (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines))
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            PreferenceDataset(tmp_path, **VIDEO)


# -- validation ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("objective", ["nft", "dpo"])
def test_reward_validation_generates_from_the_batch_images(i2v, prompt_file, objective):
    """Validation on held-out prompts with images samples from them (it used to generate from prompts alone)."""
    common = dict(lora_rank=4, num_inference_steps=2, **VIDEO)
    if objective == "nft":
        model = DiffusionNFT(DiffusersVideoBackbone(i2v), reward=Brightness(), group_size=2, num_sampling_steps=2,
                             **common)
    else:
        model = make_dpo(i2v, reward=Brightness(), num_candidates=2, candidate_steps=2, pairs_per_step=1)
    seen = []
    generate = model.generate
    model.generate = lambda *a, **k: seen.append(k.get("images")) or generate(*a, **k)
    data = PromptFileDataModule(str(prompt_file), val_file=str(prompt_file), batch_size=2, height=SIZE, width=SIZE)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=1)
    scores = trainer.validate(model, data, verbose=False)[0]
    assert len(seen) == 1 and seen[0] is not None and seen[0].shape == (2, 3, SIZE, SIZE)
    assert math.isfinite(scores["val/reward/overall"])
