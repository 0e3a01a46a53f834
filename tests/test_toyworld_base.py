"""The shipped toy-world base: a real diffusers pipeline under 20 MB whose samples do what the prompt says."""

import json

import pytest
import torch

from lit_videoalign.backbones.diffusers import DiffusersVideoBackbone
from lit_videoalign.data.toyworld import prompt_agreement
from lit_videoalign.objectives.sft import SFT
from lit_videoalign.pretrained import TOYWORLD_BASE

PROMPTS = ["a red ball falls", "a blue ball moves left", "a green ball moves right", "a yellow ball falls",
           "a white ball moves left", "a red ball moves right", "a blue ball falls", "a green ball moves left",
           "a yellow ball moves right", "a white ball falls", "a red ball moves left and bounces",
           "a blue ball moves right and bounces"]


def test_shipped_folder_is_small_safetensors_with_a_card():
    files = [p for p in TOYWORLD_BASE.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 20 * 2**20
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl")]
    card = (TOYWORLD_BASE / "README.md").read_text()
    assert "held-out" in card and "pretrain.yaml" in card
    assert json.loads((TOYWORLD_BASE / "model_index.json").read_text())["vae"] == [None, None]


@pytest.fixture(scope="module")
def samples():
    model = SFT(DiffusersVideoBackbone("builtin:toyworld-base", max_sequence_length=24), guidance_scale=2.0,
                num_inference_steps=40)
    return model.generate(PROMPTS, seeds=list(range(len(PROMPTS))))


def test_samples_have_the_prompted_colour(samples):
    """Colour is read back from the generated pixels (chance is 1 in 5; the untrained init gets 3 of 12, the
    previous release 10, this one 12).

    Direction and falling are weaker in the shipped base (see its model card) and are what post-training improves,
    so they are measured in benchmarks rather than asserted here.
    """
    agree = [prompt_agreement(v, p) for v, p in zip(samples, PROMPTS)]
    assert sum(a["colour"] for a in agree) >= 11, agree


def test_samples_are_not_static_or_empty(samples):
    assert samples.shape == (len(PROMPTS), 16, 3, 32, 32)
    motion = (samples[:, 1:] - samples[:, :-1]).abs().mean((1, 2, 3, 4))
    assert (motion > 1e-3).all()
    assert torch.isfinite(samples).all()


def test_the_image_to_video_base_starts_from_the_given_frame():
    """``builtin:toyworld-i2v`` conditions on the first frame: each sample's frame 0 is much closer to its own given
    frame than to the other's (two held-out scenes, their prompts swapped, so the prompt cannot be the cue): the ball
    starts where the given frame has it."""
    from lit_videoalign.backbones.diffusers import DiffusersVideoBackbone
    from lit_videoalign.data.toyworld import TEST_SEED_OFFSET, ToyWorld
    from lit_videoalign.objectives.sft import SFT

    world = ToyWorld(max_balls=1)
    scenes = [world.example(TEST_SEED_OFFSET + i) for i in (3, 4)]
    images = torch.stack([s.video[0] for s in scenes])  # (2, 3, 32, 32)
    model = SFT(DiffusersVideoBackbone("builtin:toyworld-i2v", max_sequence_length=24), num_inference_steps=10)
    assert model.backbone.supports_images and model.backbone.fps == 8.0
    videos = model.generate([scenes[1].prompt, scenes[0].prompt], seeds=[0, 1], images=images, sampler="euler")
    from lit_videoalign.data.toyworld import observe

    start = [observe(x[None]).centroid[0] for x in images]  # (x, y) of each given ball, px
    generated = [observe(v[:1]).centroid[0] for v in videos]
    own = [float((g - s).norm()) for g, s in zip(generated, start)]
    other = [float((g - s).norm()) for g, s in zip(generated, start[::-1])]
    gap = float((start[0] - start[1]).norm())
    assert gap > 5 and all(o < 2 and x > gap / 2 for o, x in zip(own, other)), (own, other, gap)
