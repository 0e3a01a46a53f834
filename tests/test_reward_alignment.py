"""reward_zoo.alignment: clip_score loads a real CLIPModel, preprocesses like CLIPImageProcessor, ranks prompts."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPImageProcessor, CLIPModel

from lit_videoalign.data.toyworld import TEST_SEED_OFFSET, ToyWorld
from lit_videoalign.testing import write_tiny_clip
from reward_zoo import CompositeReward, create_reward, list_rewards
from reward_zoo.alignment import (
    CLIP_MEAN,
    CLIP_STD,
    CLIPImageEncoder,
    CLIPScore,
    CLIPTextEncoder,
    clip_pixel_values,
    frame_indices,
)

WORLD = ToyWorld(max_balls=1)
HELD_OUT = range(TEST_SEED_OFFSET + 41_000_000, TEST_SEED_OFFSET + 41_000_040)


def contrastive_finetune(model: CLIPModel, tokenizer, steps: int = 120, seed: int = 0) -> CLIPModel:
    """Train ``model`` CLIP-style on single toy-world frames and their prompts (same-prompt pairs count as matches).

    Uses the reward's own encoders and preprocessing, so training and scoring see identical inputs.
    """
    generator = torch.Generator().manual_seed(seed)
    train = [WORLD.example(s) for s in range(256)]
    images, texts = CLIPImageEncoder(model), CLIPTextEncoder(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4)
    for _ in range(steps):
        batch = [train[i] for i in torch.randperm(len(train), generator=generator)[:32].tolist()]
        frames = torch.stack([ex.video[int(torch.randint(len(ex.video), (), generator=generator))] for ex in batch])
        prompts = [ex.prompt for ex in batch]
        tokens = tokenizer(prompts, padding=True, return_tensors="pt")
        logits = 10 * F.normalize(images(frames), dim=-1) @ F.normalize(
            texts(tokens["input_ids"], tokens["attention_mask"]), dim=-1).T  # (32, 32)
        same = torch.tensor([[a == b for b in prompts] for a in prompts], dtype=torch.float32)
        target = same / same.sum(1, keepdim=True)
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.requires_grad_(False).eval()


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> str:
    """A tiny random CLIP checkpoint folder (weights + tokenizer)."""
    path = tmp_path_factory.mktemp("clip") / "tiny-clip"
    write_tiny_clip(path)
    return str(path)


@pytest.fixture(scope="module")
def trained_clip(tmp_path_factory) -> str:
    """A tiny CLIP trained for 120 contrastive steps on toy-world frames (about 2 s), saved as a checkpoint folder."""
    path = tmp_path_factory.mktemp("clip") / "trained-clip"
    model = write_tiny_clip(path, seed=1)
    from transformers import AutoTokenizer

    contrastive_finetune(model, AutoTokenizer.from_pretrained(path)).save_pretrained(path)
    return str(path)


def test_clip_score_is_registered():
    assert "clip_score" in list_rewards("alignment")
    assert CLIPScore.family == "alignment" and CLIPScore.requires_prompts and CLIPScore.differentiable


def test_ranks_own_prompt_above_wrong_colour(trained_clip):
    reward = create_reward("clip_score", model_name_or_path=trained_clip)
    videos, own, wrong = [], [], []
    for seed in HELD_OUT:
        example = WORLD.example(seed)
        corrupted = WORLD.corrupt(example, "wrong_colour", torch.Generator().manual_seed(seed))
        assert corrupted.prompt != example.prompt and torch.equal(corrupted.video, example.video)
        videos.append(example.video)
        own.append(example.prompt)
        wrong.append(corrupted.prompt)
    videos = torch.stack(videos)  # (40, t, c, h, w)
    with torch.no_grad():
        matched, mismatched = reward(videos, own)["overall"], reward(videos, wrong)["overall"]
    assert (matched > mismatched).float().mean() >= 0.9
    assert (matched - mismatched).mean() > 0.1
    assert ((matched >= -1) & (matched <= 1)).all()  # a raw cosine


def test_score_is_the_mean_frame_cosine(tiny_clip):
    """Against ``CLIPModel.get_image_features``/``get_text_features`` called directly on processor-style inputs."""
    reward = create_reward("clip_score", model_name_or_path=tiny_clip)
    model = CLIPModel.from_pretrained(tiny_clip).eval()
    videos, prompts = torch.rand(2, 5, 3, 24, 40), ["a red ball falls", "a blue ball moves left and bounces"]
    with torch.no_grad():
        scores = reward(videos, prompts)
        pixels = clip_pixel_values(videos.flatten(0, 1), 32, torch.tensor(CLIP_MEAN), torch.tensor(CLIP_STD))
        image = model.get_image_features(pixel_values=pixels).pooler_output.view(2, 5, -1)
        tokens = reward.tokenizer(prompts, padding=True, return_tensors="pt")
        text = model.get_text_features(input_ids=tokens["input_ids"],
                                       attention_mask=tokens["attention_mask"]).pooler_output
    expected = F.cosine_similarity(image, text[:, None], dim=-1).mean(1)
    # Cosines lie in [-1, 1], so atol is relative to that range. Measured exact here, and 6e-8 for another batching
    # below (torch 2.13.0 / 2.14.1, 3 seeds, AVX-512 / AVX2 / baseline CPU kernels); 1e-5 is 150x that.
    torch.testing.assert_close(scores["text"], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scores["overall"], scores["text"])  # measured exact (torch 2.13.0 / 2.14.1)
    # distinct prompts are encoded once, and batch items do not interact
    with torch.no_grad():
        repeated = reward(videos[[0, 0, 1]], [prompts[0], prompts[0], prompts[1]])["overall"]
        alone = reward(videos[1:], prompts[1:])["overall"]
    torch.testing.assert_close(repeated, scores["overall"][[0, 0, 1]], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(alone, scores["overall"][1:], atol=1e-5, rtol=1e-5)


def test_num_frames_scores_an_evenly_spread_subset(tiny_clip):
    assert frame_indices(9, 3).tolist() == [0, 4, 8]
    assert frame_indices(4, None).tolist() == [0, 1, 2, 3] and frame_indices(4, 10).tolist() == [0, 1, 2, 3]
    videos, prompts = torch.rand(2, 9, 3, 32, 32), ["a red ball falls", "a green ball falls"]
    subset = create_reward("clip_score", model_name_or_path=tiny_clip, num_frames=3)
    every = create_reward("clip_score", model_name_or_path=tiny_clip)
    with torch.no_grad():
        expected = every(videos[:, [0, 4, 8]], prompts)["overall"]
        # cosines: measured exact; another batching of the same frames measured 6e-8 (above), 1e-6 is 16x that
        torch.testing.assert_close(subset(videos, prompts)["overall"], expected, atol=1e-6, rtol=1e-6)
        assert not torch.allclose(every(videos, prompts)["overall"], expected)  # measured apart by 0.3 of the scale
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match=f"num_frames must be a positive integer or None, got {bad!r}"):
            CLIPScore(tiny_clip, num_frames=bad)


def test_preprocessing_matches_clip_image_processor():
    """Same resize, crop and normalisation as transformers' CLIPImageProcessor (OpenAI defaults, 224 px)."""
    processor = CLIPImageProcessor()
    mean, std = torch.tensor(CLIP_MEAN), torch.tensor(CLIP_STD)
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, 48), torch.linspace(-1, 1, 80), indexing="ij")
    smooth = torch.stack([0.5 + 0.4 * torch.exp(-(xs**2 + ys**2) / 0.3), 0.3 + 0.2 * xs, 0.5 + 0.3 * ys])
    for image in (smooth, smooth.transpose(1, 2)):  # landscape and portrait: shortest side to 224, centre crop
        expected = processor(images=image, do_rescale=False, return_tensors="pt")["pixel_values"]
        # normalised pixels span about +-2: measured exact here and 2.4e-7 for the frame below (1.1e-7 of the range;
        # torch 2.14.1, torchvision 0.29.1); 1e-5 is 40x that
        torch.testing.assert_close(clip_pixel_values(image[None], 224, mean, std), expected, atol=1e-5, rtol=0)
    # a sharp toy-world frame overshoots under bicubic upsampling: ours clamps to [0, 1] like an 8-bit image would
    frame = WORLD.example(0).video[0]
    expected = processor(images=frame, do_rescale=False, return_tensors="pt")["pixel_values"]
    clamped = ((expected * std.view(3, 1, 1) + mean.view(3, 1, 1)).clamp(0, 1) - mean.view(3, 1, 1)) / std.view(3, 1, 1)
    torch.testing.assert_close(clip_pixel_values(frame[None], 224, mean, std), clamped, atol=1e-5, rtol=0)


def test_gradients_reach_the_pixels(trained_clip):
    reward = create_reward("clip_score", model_name_or_path=trained_clip)
    example = WORLD.example(HELD_OUT[0])
    videos = example.video[None].clone().requires_grad_(True)
    score = reward(videos, [example.prompt])["overall"]
    score.sum().backward()
    assert videos.grad is not None and videos.grad.abs().sum() > 0
    assert all(p.grad is None for p in reward.parameters())  # CLIP stays frozen
    with torch.no_grad():  # a small step along the gradient raises the score
        stepped = (videos + 0.01 * videos.grad.sign()).clamp(0, 1)
        assert reward(stepped, [example.prompt])["overall"] > score


def test_clip_weights_stay_out_of_checkpoints(tiny_clip, tmp_path):
    """The frozen CLIP is named by config.json (Hub id + revision), not copied into model.safetensors."""
    reward = create_reward("clip_score", model_name_or_path=tiny_clip, num_frames=2)
    assert reward.state_dict() == {}
    assert sum(p.numel() for p in reward.parameters()) > 0 and not any(p.requires_grad for p in reward.parameters())
    reward.save_pretrained(tmp_path / "ckpt")
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text()) == {
        "model_name_or_path": tiny_clip, "model_revision": None, "num_frames": 2}
    loaded = create_reward(str(tmp_path / "ckpt"))
    videos, prompts = torch.rand(2, 4, 3, 32, 32), ["a red ball falls", "a white ball falls"]
    with torch.no_grad():
        # measured exact (torch 2.13.0 / 2.14.1)
        torch.testing.assert_close(loaded(videos, prompts)["overall"], reward(videos, prompts)["overall"])
    # strict loads work with or without the CLIP tensors, also nested in a CompositeReward
    full = {f"image_encoder.{k}": torch.zeros_like(v) for k, v in reward.image_encoder.state_dict().items()}
    reward.load_state_dict(full, strict=True)
    assert all((p == 0).all() for p in reward.image_encoder.parameters())
    composite = CompositeReward({"clip": loaded}, {"clip": 1.0})
    assert composite.state_dict() == {}
    composite.load_state_dict({}, strict=True)
    # measured exact (torch 2.13.0 / 2.14.1)
    torch.testing.assert_close(loaded.image_encoder.visual_projection.weight,
                               CLIPModel.from_pretrained(tiny_clip).visual_projection.weight)


def test_frozen_towers_stay_in_eval_mode(tiny_clip):
    reward = create_reward("clip_score", model_name_or_path=tiny_clip).train()
    assert reward.training and not reward.image_encoder.training and not reward.text_encoder.training


def test_needs_prompts(tiny_clip):
    with pytest.raises(ValueError, match="needs prompts"):
        create_reward("clip_score", model_name_or_path=tiny_clip)(torch.rand(1, 2, 3, 32, 32))


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(OSError, match="not-a-clip"):
        CLIPScore(str(tmp_path / "not-a-clip"))
    with pytest.raises(ValueError, match="model_name_or_path must be a CLIP Hub id or folder, got ''"):
        CLIPScore("")
