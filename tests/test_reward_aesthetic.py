"""reward_zoo.aesthetic: laion_aesthetic loads the public predictor's key layout and scores like the original."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from transformers import CLIPModel

from lit_videoalign.testing import write_tiny_clip
from reward_zoo import create_reward, list_rewards
from reward_zoo.aesthetic import LaionAesthetic, laion_key_map
from reward_zoo.alignment import CLIP_MEAN, CLIP_STD, clip_pixel_values

EMBED_DIM = 16  # the tiny CLIP's projection_dim


class PublicPredictor(nn.Module):
    """The public predictor's module tree, written out independently: attribute ``layers``, Dropouts included."""

    def __init__(self, input_size: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(input_size, 1024), nn.Dropout(0.2), nn.Linear(1024, 128),
                                    nn.Dropout(0.2), nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16),
                                    nn.Linear(16, 1))

    def forward(self, x):
        return self.layers(x)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("clip") / "tiny-clip"
    write_tiny_clip(path, seed=3)
    return str(path)


@pytest.fixture
def public() -> PublicPredictor:
    torch.manual_seed(7)
    return PublicPredictor(EMBED_DIM).eval()


def reference_scores(predictor: nn.Module, clip_path: str, videos: torch.Tensor) -> torch.Tensor:
    """The original recipe: CLIP image features, L2-normalised, through the predictor, averaged over frames."""
    model = CLIPModel.from_pretrained(clip_path).eval()
    b, t = videos.shape[:2]
    pixels = clip_pixel_values(videos.flatten(0, 1), 32, torch.tensor(CLIP_MEAN), torch.tensor(CLIP_STD))
    with torch.no_grad():
        features = model.get_image_features(pixel_values=pixels).pooler_output
        return predictor(F.normalize(features, dim=-1)).view(b, t).mean(1)


def test_registered():
    assert list_rewards("aesthetic") == ["laion_aesthetic"]
    assert LaionAesthetic.dimensions == ("aesthetic",) and LaionAesthetic.differentiable


def test_public_key_layout_maps_exactly(public, tiny_clip):
    public_keys = {f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")}
    assert set(public.state_dict()) == public_keys  # Dropouts at 1, 3, 5 hold no parameters
    assert laion_key_map() == {k: k.replace("layers.", "head.") for k in public_keys}
    reward = LaionAesthetic.from_laion_state_dict(public.state_dict(), clip_model_name_or_path=tiny_clip)
    assert set(reward.state_dict()) == {k.replace("layers.", "head.") for k in public_keys}  # no CLIP tensors
    for key, value in public.state_dict().items():
        assert torch.equal(reward.state_dict()[key.replace("layers.", "head.")], value)
    assert not reward.training


def test_scores_equal_the_original_recipe(public, tiny_clip):
    reward = LaionAesthetic.from_laion_state_dict(public.state_dict(), clip_model_name_or_path=tiny_clip)
    videos = torch.rand(3, 4, 3, 32, 48)
    with torch.no_grad():
        scores = reward(videos)
    expected = reference_scores(public, tiny_clip, videos)
    # measured bit-identical (torch 2.13.0 / 2.14.1, 3 seeds, AVX-512 / AVX2 / baseline CPU kernels); 1e-5 of the
    # largest score leaves room for another batching of the frames (6e-8 measured for CLIP scores)
    torch.testing.assert_close(scores["aesthetic"], expected, rtol=0, atol=1e-5 * expected.abs().max().item())
    torch.testing.assert_close(scores["overall"], scores["aesthetic"])
    # the embeddings are L2-normalised first: without that the original head gives other scores
    model = CLIPModel.from_pretrained(tiny_clip).eval()
    pixels = clip_pixel_values(videos.flatten(0, 1), 32, torch.tensor(CLIP_MEAN), torch.tensor(CLIP_STD))
    with torch.no_grad():
        raw = public(model.get_image_features(pixel_values=pixels).pooler_output).view(3, 4).mean(1)
    assert not torch.allclose(raw, expected, atol=1e-3)  # measured apart by 0.04 or more, 40x the 1e-3


def test_num_frames_subset(public, tiny_clip):
    videos = torch.rand(2, 7, 3, 32, 32)
    reward = LaionAesthetic.from_laion_state_dict(public.state_dict(), clip_model_name_or_path=tiny_clip,
                                                  num_frames=2)
    with torch.no_grad():
        expected = reference_scores(public, tiny_clip, videos[:, [0, 6]])
        # measured bit-identical, as above; 1e-5 of the largest score
        torch.testing.assert_close(reward(videos)["overall"], expected, rtol=0, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize(("edit", "match"), [
    (lambda s: {k: v for k, v in s.items() if k != "layers.7.bias"}, r"missing keys \['layers.7.bias'\]"),
    (lambda s: {**s, "layers.8.weight": torch.zeros(1)}, r"unexpected keys \['layers.8.weight'\]"),
    (lambda s: {k.replace("layers.", "model.layers."): v for k, v in s.items()}, "missing keys"),
    (lambda s: {**s, "layers.0.weight": torch.zeros(1024, 768)},
     r"key 'layers.0.weight' has shape \(1024, 768\), expected \(1024, 16\) .* need CLIP ViT-L/14, 768-d"),
    (lambda s: {**s, "layers.6.bias": torch.zeros(15)}, r"'layers.6.bias' has shape \(15,\), expected \(16,\)"),
])
def test_bad_state_dicts_are_refused(public, tiny_clip, edit, match):
    with pytest.raises(ValueError, match=match):
        LaionAesthetic.from_laion_state_dict(edit(public.state_dict()), clip_model_name_or_path=tiny_clip)


def test_loads_the_public_pth_file_and_round_trips(public, tiny_clip, tmp_path):
    torch.save(public.state_dict(), tmp_path / "sac+logos+ava1-l14-linearMSE.pth")
    reward = LaionAesthetic.from_laion_checkpoint(tmp_path / "sac+logos+ava1-l14-linearMSE.pth",
                                                  clip_model_name_or_path=tiny_clip)
    reward.save_pretrained(tmp_path / "ckpt")
    assert set(load_file(tmp_path / "ckpt" / "model.safetensors")) == set(laion_key_map().values())
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text()) == {
        "clip_model_name_or_path": tiny_clip, "clip_revision": None, "num_frames": None}
    loaded = create_reward(str(tmp_path / "ckpt"))
    videos = torch.rand(2, 3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(videos)["overall"], reward(videos)["overall"])
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    with pytest.raises(ValueError, match="holds a Tensor, expected the predictor's state dict"):
        LaionAesthetic.from_laion_checkpoint(tmp_path / "tensor.pth", clip_model_name_or_path=tiny_clip)


def test_differentiable_and_head_trainable(tiny_clip):
    reward = create_reward("laion_aesthetic", clip_model_name_or_path=tiny_clip)
    videos = torch.rand(2, 3, 3, 32, 32, requires_grad=True)
    reward.eval()(videos)["overall"].sum().backward()
    assert videos.grad.abs().sum() > 0
    assert all(p.grad is not None for p in reward.head.parameters())  # the head is the reward's own weights
    assert all(p.grad is None and not p.requires_grad for p in reward.image_encoder.parameters())
    reward.train()
    assert reward.head.training and not reward.image_encoder.training
